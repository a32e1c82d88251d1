"""``python -m ckptbridge``: what torchrun starts (``torchrun ... -m ckptbridge convert ...``)."""

from .cli import run

run()
