"""What an option group is: a set of command-line flags and the frozen spec they build.

Shaped after Polygraphy's ``tools/args`` classes: a group declares its options (``options``, like
``add_parser_args_impl``) and turns the parsed values into its spec (``parse``, like
``parse_impl`` + ``create_config``). Defaults and choices are never written in a group: they come
from the spec dataclass or the module that owns the concept (``default_of``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import click
from click.core import ParameterSource

Values = Mapping[str, Any]
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def default_of(spec: type, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``spec``: the one place it is written."""
    for item in dataclasses.fields(spec):
        if item.name == name:
            if item.default is not dataclasses.MISSING:
                return item.default
            if item.default_factory is not dataclasses.MISSING:
                return item.default_factory()
    raise KeyError(f"{spec.__name__} has no field {name!r} with a default")


def int_range(bounds: tuple[int, int]) -> click.IntRange:
    return click.IntRange(*bounds)


class OptionGroup:
    """A set of options and the spec they build. Subclasses implement ``options`` and ``parse``."""

    def options(self) -> list[Decorator]:
        raise NotImplementedError

    def parse(self, values: Values, *args: Any, **kwargs: Any) -> Any:
        """The spec of these options (a group may take what its spec also needs: the model, a
        precision)."""
        raise NotImplementedError


def given(*names: str, config: bool = False) -> list[str]:
    """The flags (``--sweep-methods``) of the parameters ``names`` that the command line set
    (with ``config``, a config file too); a default is never reported."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return []
    sources = {ParameterSource.COMMANDLINE}
    if config:
        sources.add(ParameterSource.DEFAULT_MAP)
    flags = {param.name: param.opts[0] for param in ctx.command.params}
    return [
        flags[name] for name in names if name in flags and ctx.get_parameter_source(name) in sources
    ]


def listed(flag: str, parse: Callable[..., Any], text: str, *args: Any) -> Any:
    """``parse(text, *args)`` with a bad value reported as click reports its own options'
    ("Invalid value for '--sweep-methods': ..."), naming the flag."""
    try:
        return parse(text, *args)
    except click.BadParameter as err:
        err.param_hint = f"'{flag}'"
        raise


# The largest count (rows, lengths, layers) a comma-separated list option takes: generous, but
# no value that overflows numpy or asks for terabytes.
MAX_LISTED_COUNT = 1 << 20


def count_in_range(text: str, low: int, high: int) -> int | None:
    """``text`` as an int in [low, high] (ASCII digits only), else None."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        return None
    return int(text)
