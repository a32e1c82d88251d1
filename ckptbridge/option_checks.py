"""Refusing command-line options that would have no effect (a flag that silently does nothing
misleads: the user believes it was applied)."""

from __future__ import annotations

import click
from click.core import ParameterSource


def given_options(ctx: click.Context, names: tuple[str, ...]) -> list[str]:
    """The options among ``names`` (click parameter names) that the user set, even to their default
    value, spelled as on the command line."""
    return [max(p.opts, key=len) for p in ctx.command.params
            if p.name in names and ctx.get_parameter_source(p.name) not in (None, ParameterSource.DEFAULT)]


def refuse_given(ctx: click.Context, names: tuple[str, ...], why: str) -> None:
    """A usage error (exit 2) naming each option of ``names`` that was set; ``why`` completes the sentence."""
    given = given_options(ctx, names)
    if given:
        raise click.UsageError(f"{'/'.join(given)} {why}")
