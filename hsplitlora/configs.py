"""Typed configs with their help on the field, and the command line built from them.

A config is a dataclass whose fields say their default, their type and, through `option`, their
help (as PEFT's configs do). `add_arguments(parser, Config)` makes one `--flag` per field (nested
configs included, e.g. a planner's), typed and with the dataclass's default shown in the help;
`from_arguments(Config, args)` builds the config back. Each default is thus written once, on its
field, for the code, the command line and its `--help` alike (as litgpt builds its CLI from typed
signatures). A command with `add_config_file` also reads its options from a TOML file whose keys
are its flags' names (`apply_config_file`; flags still win), and `describe_arguments` writes the
effective options back in that form, secrets left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Callable

MISSING = dataclasses.MISSING
# The help of fields that several configs share.
ALPHA_HELP = "LoRA alpha; an adapter's scale is alpha / rank"
LR_HELP = "AdamW learning rate"
SEED_HELP = "random seed (data order, fresh adapters)"


def option(default: Any = MISSING, *, help: str, default_factory: Callable[[], Any] | Any = MISSING,
           flag: str | None = None, choices: typing.Sequence | None = None, parse: Callable[[str], Any] | None = None,
           metavar: str | None = None, cli: bool = True, secret: bool = False) -> Any:
    """A dataclass field with its help. `flag` renames its command-line flag (default: the field's
    name with dashes), `parse` reads its value from text (default: from its type), `cli=False`
    keeps it off the command line (values no flag can give, e.g. a measured profile), `secret`
    keeps its value out of logs (`describe_arguments`)."""
    metadata = {"help": help, "flag": flag, "choices": choices, "parse": parse, "metavar": metavar, "cli": cli,
                "secret": secret}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def parse_bytes(text: str) -> float:
    """'2GB', '512MiB', '1.5e9' -> bytes (powers of 1024 for GiB/MiB, of 1000 for GB/MB)."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (try 2GB, 512MiB or a number of bytes)")
    number, prefix, binary = float(match[1]), match[2].upper(), bool(match[3])
    return number * (1024 if binary else 1000) ** " KMGT".index(prefix or " ")


def _default(f: dataclasses.Field) -> Any:
    """The field's default; MISSING for a field the config cannot do without (a required flag)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _optional(hint) -> tuple[Any, bool]:
    """(the type inside Optional, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else hint), len(args) < len(typing.get_args(hint))
    return hint, False


def _parser_for(hint) -> Callable[[str], Any]:
    inner, _ = _optional(hint)
    if typing.get_origin(inner) is tuple:
        item = typing.get_args(inner)[0]

        def items(text: str) -> tuple:
            try:
                return tuple(item(part.strip()) for part in text.split(",") if part.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__}s, got {text!r}") from None

        items.__name__ = f"comma-separated {item.__name__}s"
        return items
    if inner in (int, float, str, Path):
        return inner
    raise TypeError(f"no command-line form for a field of type {hint!r}: give it `parse=` or `cli=False`")


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: typing.Collection[str] = (), _prefix: str = ""
                  ) -> argparse.ArgumentParser:
    """One flag per field of the config `cls` (and of its nested configs, each in a group of its
    own), except `skip` (field names, dotted for nested ones: 'planner.reserve')."""
    hints = typing.get_type_hints(cls)
    title = (cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip(".")
    group = parser.add_argument_group(title) if _prefix else parser
    for f in dataclasses.fields(cls):
        name = _prefix + f.name
        if name in skip or not f.metadata.get("cli", True) or not f.init:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            add_arguments(parser, hint, skip, name + ".")
            continue
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no help: declare it with hsplitlora.configs.option")
        meta, default = f.metadata, _default(f)
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        text = meta["help"]
        if hint is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default,
                               help=f"{text} (default: {'on' if default else 'off'})")
            continue
        required = default is MISSING
        if not required and default is not None:
            text += f" (default: {_shown(default)})"
        metavar = meta.get("metavar") or (None if meta.get("choices") else flag.lstrip("-").replace("-", "_").upper())
        action = group.add_argument(flag, dest=name, type=meta.get("parse") or _parser_for(hint), required=required,
                                    **({} if required else {"default": default}), choices=meta.get("choices"),
                                    metavar=metavar, help=text.replace("%", "%%"))
        action.secret = meta.get("secret", False)  # kept out of logs by describe_arguments
    return parser


def from_arguments(cls: type, args: argparse.Namespace, _prefix: str = "", **given):
    """The config `cls` from parsed arguments (fields the parser did not add keep their
    defaults; `given` overrides top-level fields)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        name = _prefix + f.name
        if not f.init:
            continue
        if f.name in given and not _prefix:
            values[f.name] = given[f.name]
        elif dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = from_arguments(hints[f.name], args, name + ".")
        elif hasattr(args, name):
            values[f.name] = getattr(args, name)
    return cls(**values)


CONFIG_HELP = ("a TOML file of this command's options: keys are the flags' names with underscores "
               "(--local-steps: local_steps), or as the command logs its configuration at start; a group's "
               "options may go in its table (e.g. [planner]); flags given here override the file")
_NOT_OPTIONS = {"help", "config", "func", "command_parser", "verbose"}


def add_config_file(parser: argparse.ArgumentParser) -> None:
    """`--config FILE` for this (sub)command; `apply_config_file` reads it."""
    parser.add_argument("--config", type=Path, metavar="FILE", help=CONFIG_HELP)
    parser.set_defaults(command_parser=parser)


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in _NOT_OPTIONS and a.dest != argparse.SUPPRESS}


def _flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key.replace("-", "_")] = value
    return out


def _from_file(action: argparse.Action, value: Any, where: str) -> Any:
    """A TOML value as the flag would give it (text through the flag's own parser)."""
    if action.nargs == 0:  # a switch: --flag / --no-flag, store_true
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a value for {action.option_strings[0]}, got {value!r}")
    if isinstance(value, list):
        value = ",".join(map(str, value))
    convert = action.type or str
    if convert is int and isinstance(value, float):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    try:
        result = convert(value if isinstance(value, str) or convert in (int, float) else str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    if action.choices is not None and result not in action.choices:
        raise ValueError(f"{where}: {result!r} is not one of {', '.join(map(str, action.choices))}")
    return result


def apply_config_file(parser: argparse.ArgumentParser, path: Path) -> None:
    """Make a TOML file's options the defaults of `parser`, so that parsing again gives flags
    precedence over the file (ValueError: an unknown key, a value of the wrong kind, bad TOML)."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not TOML: {e}") from None
    options = _options(parser)
    # A key is an option's name as `describe_arguments` writes it, or its flag's with underscores.
    names = {a.option_strings[0].lstrip("-").replace("-", "_"): dest for dest, a in options.items() if a.option_strings}
    names.update({dest: dest for dest in options})
    values = {}
    for key, value in _flatten(table).items():
        dest = names.get(key)
        if dest is None:
            raise ValueError(f"{path}: no option {key!r} here; the options are: {', '.join(sorted(options))}")
        values[dest] = _from_file(options[dest], value, f"{path}: {key}")
        options[dest].required = False  # the file gives it
    parser.set_defaults(**values)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: its escapes are JSON's


def describe_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The options in effect, as the TOML a --config file would hold (secrets and unset ones as comments)."""
    top, tables = [], {}
    for dest, action in _options(parser).items():
        value = getattr(args, dest, None)
        table, _, key = dest.rpartition(".")
        if getattr(action, "secret", False) and value is not None:
            line = f"# {key} = (given; not shown)"
        elif value is None:
            line = f"# {key} = (not set)"
        else:
            line = f"{key} = {_toml_value(value)}"
        (tables.setdefault(table, []) if table else top).append(line)
    return "\n".join(top + [f"\n[{t}]\n" + "\n".join(lines) for t, lines in tables.items()])
