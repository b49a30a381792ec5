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
