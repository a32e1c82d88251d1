"""``python -m ckptbridge``: what torchrun starts (``torchrun ... -m ckptbridge convert ...``)."""

from .cli import main

main(prog_name="ckptbridge")
