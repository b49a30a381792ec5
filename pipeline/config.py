"""Pipeline configuration files (TOML): every command-line option, as a key.

A key is an option's long name without the dashes (``max-abs-err`` or ``max_abs_err``); a
``[run]``, ``[build]``, ... table holds keys for that command only, top-level keys apply to every
command that has the option. Repeatable options take a list (or one value); flags take true or
false (``pooling = false`` is ``--no-pooling``). Relative paths are relative to the file's folder.
Options given on the command line win over the file. Values are checked with the option's own
type before anything runs, and any problem is one line naming the file, the key and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bert_compiler.core.errors import InputError

MAX_CONFIG_BYTES = 1 << 20
_NOT_CONFIGURABLE = {"config", "help", "version"}


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
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise InputError(f"{path}: config file over {MAX_CONFIG_BYTES >> 20} MiB")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError as err:
        raise InputError(f"{path}: config file not found") from err
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: config file is not UTF-8 ({err.reason})") from err
    try:
        return _toml().loads(text)
    except _toml().TOMLDecodeError as err:
        raise InputError(f"{path}: not valid TOML ({err})") from err


def _options(command) -> dict[str, Any]:
    """Config key -> click Option of ``command`` (both dash and underscore spellings)."""
    import click

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
    """The ``default_map`` for ``command`` from the config file at ``path``.

    Args:
        command: the click command being run.
        commands: every command of the CLI by name (a top-level key must exist in one of them,
            and a table must be named after one).
        ctx: the command's click context, for type conversion.

    Raises:
        InputError: unknown keys or tables, values of the wrong type or shape.
    """
    import click

    path = Path(path)
    data = read_toml(path)
    base = path.resolve().parent
    known_anywhere = {k for c in commands.values() for k in _options(c)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for name in tables:
        if name not in commands and name in known_anywhere:
            raise InputError(f"{path}: {name}: expected a value, not a table")
        if name not in commands:
            raise InputError(
                f"{path}: table [{name}] is not a command; tables: {', '.join(sorted(commands))}"
            )
    for name, table in tables.items():
        for key in table:
            if key not in _options(commands[name]):
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
        defaults[param.name] = _checked(param, value, where, base, ctx, click)
    return defaults


def _checked(param, value: Any, where: str, base: Path, ctx, click) -> Any:
    """``value`` as ``param`` takes it, or InputError saying why not."""
    if param.multiple:
        values = value if isinstance(value, list) else [value]
        return [_checked_one(param, v, where, base, ctx, click) for v in values]
    if isinstance(value, list):
        raise InputError(f"{where}: takes one value, not a list")
    return _checked_one(param, value, where, base, ctx, click)


def _checked_one(param, value: Any, where: str, base: Path, ctx, click) -> Any:
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
