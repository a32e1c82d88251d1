"""The click options that say how to read an MCore checkpoint ckptbridge did not write (one trained
by Megatron-LM): which iteration, and where its HF config comes from. Shared by ``convert``,
``inspect`` and ``compare``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click



def _field(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"{text!r}: expected FIELD=VALUE (VALUE as JSON, e.g. eos_token_id=2)")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string


def source_read_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--iteration/--hf-config/--arch/--vocab-size/--hf-set``, passed on as ``iteration`` and ``config``
    (a `ConfigOptions`)."""
    options = [
        click.option("--iteration", type=click.IntRange(0), default=None,
                     help="MCore source: read iter_NNNNNNN instead of the one latest_checkpointed_iteration.txt names."),
        click.option("--hf-config", type=click.Path(path_type=Path, exists=True), default=None,
                     help="MCore source not written by ckptbridge: an HF folder (its config, tokenizer and generation "
                          "config are used) or a config.json. Checked against the checkpoint's args. "
                          "Default: synthesized from the args."),
        click.option("--arch", default=None,
                     help="Architecture (e.g. MistralForCausalLM) or mapping family for a synthesized HF config "
                          "(default: picked from the checkpoint's args)."),
        click.option("--vocab-size", type=click.IntRange(1), default=None,
                     help="Unpadded vocabulary of a synthesized config, when the checkpoint stores only the padded one."),
        click.option("--hf-set", "hf_set", multiple=True, callback=lambda _c, _p, v: tuple(_field(t) for t in v),
                     metavar="FIELD=VALUE", help="Set a field of the synthesized or given HF config (repeatable), "
                                                 "e.g. --hf-set eos_token_id=128001."),
    ]

    def wrapped(hf_config, arch, vocab_size, hf_set, **kwargs):  # noqa: ANN001, ANN202
        from .config_source import ConfigOptions  # imports the mapping registry (and torch): only when run

        return f(config=ConfigOptions(hf_config, arch, vocab_size, hf_set), **kwargs)

    wrapped.__name__, wrapped.__doc__ = f.__name__, f.__doc__
    for option in reversed(options):
        wrapped = option(wrapped)
    return wrapped

