"""Pipeline configuration files (TOML): every command-line option, as a key.

A key is an option's long name without the dashes (``max-abs-err`` or ``max_abs_err``); a
``[run]``, ``[build]``, ... table holds keys for that command only, top-level keys apply to every
command that has the option. Repeatable options take a list (or one value); flags take true or
false (``pooling = false`` is ``--no-pooling``). Relative paths are relative to the file's folder.
Options given on the command line win over the file. Values are checked with the option's own
type before anything runs, and any problem is one line naming the file, the key and the fix.

A ``[fp32]``, ``[fp16]`` or ``[int8]`` table (top level) holds values for engines of that
precision only, for the options declared as ``PerPrecisionOption`` (the verification gates).
For one engine a gate comes from, first to last: the command line (every precision), the file's
table of the engine's precision, the file's command table or top level (every precision), the
precision's built-in default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from bert_compiler.core.errors import InputError
from bert_compiler.core.files import read_regular_file
from bert_compiler.core.targets import PRECISIONS

MAX_CONFIG_BYTES = 1 << 20
_NOT_CONFIGURABLE = {"config", "help", "version"}
_PER_PRECISION_KEY = "bert_compile.per_precision"


class PerPrecisionOption(click.Option):
    """An option a config file may also set for one precision, in a ``[fp32]``, ``[fp16]`` or
    ``[int8]`` table (``click.option(..., cls=PerPrecisionOption)``)."""


@dataclass(frozen=True)
class CommandConfig:
    """What a config file sets for one command.

    Attributes:
        defaults: option name -> value, click's ``default_map`` (the command line still wins).
        per_precision: precision -> {option name: value} from the precision tables, values
            already converted by the option's type.
    """

    defaults: dict[str, Any] = field(default_factory=dict)
    per_precision: dict[str, dict[str, Any]] = field(default_factory=dict)


def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file with a size limit.

    Raises:
        InputError: missing, too large, not UTF-8 or not TOML.
    """
    path = Path(path)
    try:
        data = read_regular_file(path, MAX_CONFIG_BYTES, "config file")
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: config file is not UTF-8 ({err.reason})") from err
    try:
        return _toml().loads(text)
    except _toml().TOMLDecodeError as err:
        raise InputError(f"{path}: not valid TOML ({err})") from err
    except RecursionError:
        raise InputError(f"{path}: TOML nested too deeply to read") from None


def _options(command) -> dict[str, Any]:
    """Config key -> click Option of ``command`` (both dash and underscore spellings)."""
    keys = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in _NOT_CONFIGURABLE:
            continue
        for opt in param.opts:
            if opt.startswith("--"):
                keys[opt[2:]] = param
                keys[opt[2:].replace("-", "_")] = param
        keys[param.name] = param
    return keys


def command_defaults(path: Path, command, commands: dict[str, Any], ctx) -> dict[str, Any]:
    """The ``default_map`` for ``command`` from the config file at ``path`` (read_config)."""
    return read_config(path, command, commands, ctx).defaults


def read_config(path: Path, command, commands: dict[str, Any], ctx) -> CommandConfig:
    """What the config file at ``path`` sets for ``command``.

    Args:
        command: the click command being run.
        commands: every command of the CLI by name (a top-level key must exist in one of them,
            and a table must be named after one or after a precision).
        ctx: the command's click context, for type conversion.

    Raises:
        InputError: unknown keys or tables, values of the wrong type or shape.
    """
    path = Path(path)
    data = read_toml(path)
    base = path.resolve().parent
    known_anywhere = {k: p for c in commands.values() for k, p in _options(c).items()}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for name in tables:
        if name not in commands and name in known_anywhere:
            raise InputError(f"{path}: {name}: expected a value, not a table")
        if name not in commands and name not in PRECISIONS:
            raise InputError(
                f"{path}: table [{name}] is not a command or a precision; tables: "
                f"{', '.join(sorted(commands))}, {', '.join(PRECISIONS)}"
            )
    per_precision_keys = sorted(
        {f"--{p.opts[0].lstrip('-')}" for p in known_anywhere.values() if _per_precision(p)}
    )
    for name, table in tables.items():
        for key, value in table.items():
            if name in PRECISIONS:
                if not _per_precision(known_anywhere.get(key)):
                    raise InputError(
                        f"{path}: [{name}] {key}: a precision table takes only the gates "
                        f"({', '.join(k[2:] for k in per_precision_keys)})"
                    )
            elif isinstance(value, dict) and key in PRECISIONS:
                raise InputError(
                    f"{path}: [{name}.{key}]: precision tables are top-level ([{key}]) and "
                    "apply to every command"
                )
            elif key not in _options(commands[name]):
                raise InputError(
                    f"{path}: [{name}] {key}: `bert-compile {name}` has no such option"
                )
    settings = {k: v for k, v in data.items() if k not in tables}
    for key in settings:
        if key not in known_anywhere:
            raise InputError(
                f"{path}: unknown key {key!r}; keys are option names, e.g. max-abs-err"
            )
    settings.update(tables.get(command.name, {}))
    options = _options(command)
    defaults: dict[str, Any] = {}
    for key, value in settings.items():
        param = options.get(key)
        if param is None:
            continue  # a top-level key for other commands
        where = f"{path}: {key} = {value!r}"
        defaults[param.name] = _checked(param, value, where, base, ctx)
    per_precision: dict[str, dict[str, Any]] = {}
    for precision in PRECISIONS:
        for key, value in tables.get(precision, {}).items():
            param = options.get(key)
            if param is None:
                continue  # a gate of another command
            where = f"{path}: [{precision}] {key} = {value!r}"
            _checked(param, value, where, base, ctx)
            per_precision.setdefault(precision, {})[param.name] = param.type.convert(
                value, param, ctx
            )
    return CommandConfig(defaults, per_precision)


def apply_config(ctx, path: Path) -> None:
    """Make the config file at ``path`` the defaults of ``ctx``'s command (read_config); its
    precision tables are kept for ``per_precision_values``."""
    config = read_config(path, ctx.command, ctx.find_root().command.commands, ctx)
    ctx.default_map = {**(ctx.default_map or {}), **config.defaults}
    ctx.meta[_PER_PRECISION_KEY] = config.per_precision


def per_precision_values(ctx) -> Mapping[str, Mapping[str, Any]]:
    """precision -> {option name: value} that ``apply_config`` found in the precision tables of
    ``ctx``'s config file (empty without a config file or outside a command)."""
    if ctx is None:
        return {}
    return ctx.meta.get(_PER_PRECISION_KEY, {})


def _per_precision(param) -> bool:
    return isinstance(param, PerPrecisionOption)


def _checked(param, value: Any, where: str, base: Path, ctx) -> Any:
    """``value`` as ``param`` takes it, or InputError saying why not."""
    if param.multiple:
        values = value if isinstance(value, list) else [value]
        return [_checked_one(param, v, where, base, ctx) for v in values]
    if isinstance(value, list):
        raise InputError(f"{where}: takes one value, not a list")
    return _checked_one(param, value, where, base, ctx)


def _checked_one(param, value: Any, where: str, base: Path, ctx) -> Any:
    if isinstance(value, (dict, list)):
        raise InputError(f"{where}: expected a single value")
    if param.is_flag and param.is_bool_flag:
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected true or false")
        return value
    if isinstance(value, bool):
        raise InputError(f"{where}: expected {param.type.name}, not true/false")
    if isinstance(param.type, click.Path) and isinstance(value, str):
        value = str(base / value) if value and not Path(value).is_absolute() else value
    elif param.name == "model" and isinstance(value, str) and (base / value).exists():
        value = str(base / value)  # a model folder beside the config; else an alias
    try:
        param.type.convert(value, param, ctx)
    except click.BadParameter as err:
        raise InputError(f"{where}: {err.format_message()}") from err
    except (OverflowError, ValueError, TypeError) as err:
        # click converts a float to int with int(): infinity and NaN escape its own checks.
        raise InputError(f"{where}: not a {param.type.name} ({err})") from err
    return value
