"""`fastchar train --config FILE.toml`: a run's settings in a TOML file, and the file every run writes.

The keys are the names of `fastchar train`'s flags, spelled either way (`d-model` or `d_model`), at
the top level of the file. Flags given on the command line override the file; the file overrides a
`--recipe` (which may itself be named in the file) and the defaults. An unknown key, a table, a key
given twice or a value of the wrong type is an error naming the key.

Every fresh run writes its resolved settings to `config.toml` in its run folder (`resolved_config`,
`dumps`), so that `fastchar train --config runs/x/config.toml` repeats it: the same text, model,
schedule, seed, backend and precision give the same losses and weights, bit for bit. The run folder
itself is not recorded: a repeat goes to a new run folder unless the command line names one.

Leaves out: what the values mean and their ranges (config.py checks them as for flags).
"""

from __future__ import annotations

import argparse
import difflib
import math
from pathlib import Path
from typing import Any

from fastchar.errors import ConfigError

CONFIG_NAME = "config.toml"
NOT_KEYS = ("help", "config")  # flags a file cannot hold
HINT = "the keys are `fastchar train` flags without the dashes (see `fastchar train --help`), e.g. d_model = 64"


def _toml_module() -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the package tomllib came from
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError(
                "--config needs Python 3.11's tomllib or, on Python 3.10, the tomli package",
                hint="pip install tomli (fastchar's install requires it on Python 3.10)",
            ) from None
    return tomllib


def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action of every flag a config file may set."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_KEYS}


def read(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The settings of a TOML file as {dest: value}, each checked against its flag's type."""
    tomllib = _toml_module()
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"--config {path}: cannot read it ({exc.strerror or exc})", hint="pass an existing TOML file"
        ) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"--config {path} is not valid TOML: {exc}", hint="see https://toml.io for the syntax"
        ) from None
    actions = flag_actions(parser)
    settings: dict[str, Any] = {}
    spelled: dict[str, str] = {}  # dest -> the key as the file wrote it
    for key, value in data.items():
        dest = key.replace("-", "_")
        if dest in settings:
            raise ConfigError(f"--config {path}: {dest!r} is given twice (as {spelled[dest]} and {key})", hint=HINT)
        spelled[dest] = key
        if dest not in actions:
            raise ConfigError(f"--config {path}: unknown key {key!r}{_why_unknown(dest, actions)}", hint=HINT)
        settings[dest] = _checked(path, key, value, actions[dest])
    return settings


def _why_unknown(dest: str, actions: dict[str, argparse.Action]) -> str:
    if dest == "vocab_size":
        return " (the vocabulary is the text's distinct characters, never a setting)"
    close = difflib.get_close_matches(dest, list(actions), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _checked(path: Path, key: str, value: Any, action: argparse.Action) -> Any:
    """value as the flag would have parsed it, or a ConfigError naming key and the type expected."""

    def wrong(expected: str) -> ConfigError:
        shown = repr(value) if not isinstance(value, dict) else "a table"
        return ConfigError(f"--config {path}: {key} must be {expected}, got {shown}", hint=HINT)

    if isinstance(action, argparse._StoreTrueAction):
        if type(value) is not bool:
            raise wrong("true or false")
        return value
    kind = getattr(action.type, "__name__", None)
    if action.nargs == 2:
        if type(value) is not list or len(value) != 2 or not all(_is_number(v) for v in value):
            raise wrong("a list of two numbers")
        return [float(v) for v in value]
    if action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
        items = value if type(value) is list else None
        if items is None or not all(type(v) is str for v in items):
            raise wrong("a list of strings")
        return list(items)
    if kind == "int":
        if type(value) is not int:
            raise wrong("an integer")
    elif kind == "float":
        if not _is_number(value):
            raise wrong("a finite number")
        value = float(value)
    elif type(value) is not str:
        raise wrong("a string")
    if action.choices is not None and value not in action.choices:
        raise wrong(f"one of {', '.join(map(str, action.choices))}")
    return value


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def apply(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    """Set each file setting on args unless its flag was given (flags override the file).

    A flag not given is None (or False for an on/off flag): a flag given as 0 or 0.0 (--seed 0,
    --warmup 0, --sample-chars 0) compares equal to False but was given, and wins over the file."""
    for dest, value in settings.items():
        current = getattr(args, dest, None)
        if current is None or current is False:  # identity: 0 == False, but 0 is a given value
            setattr(args, dest, value)


# -- writing ------------------------------------------------------------------------------------


def dumps(settings: dict[str, Any], comment: str = "") -> str:
    """settings as TOML (flat: strings, booleans, integers, finite floats and lists of them)."""
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [f"{key} = {_value(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"TOML has no {value}")
        return repr(value)  # shortest round-trip form, a valid TOML float ("0.001", "1e-08", "60.0")
    if isinstance(value, str):
        return '"' + "".join(_char(c) for c in value) + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _char(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\u{ord(c):04x}"
    return c
