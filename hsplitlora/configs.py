"""Typed configs with their help on the field, and the command line built from them.

A config is a dataclass whose fields say their default, their type and, through `option`, their
help (as PEFT's configs do). `add_arguments(parser, Config)` makes one `--flag` per field (nested
configs included, e.g. a planner's), typed and with the dataclass's default shown in the help;
`from_arguments(Config, args)` builds the config back. Each default is thus written once, on its
field, for the code, the command line and its `--help` alike (as litgpt builds its CLI from typed
signatures).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
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
           metavar: str | None = None, cli: bool = True) -> Any:
    """A dataclass field with its help. `flag` renames its command-line flag (default: the field's
    name with dashes), `parse` reads its value from text (default: from its type), `cli=False`
    keeps it off the command line (values no flag can give, e.g. a measured profile)."""
    metadata = {"help": help, "flag": flag, "choices": choices, "parse": parse, "metavar": metavar, "cli": cli}
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
        group.add_argument(flag, dest=name, type=meta.get("parse") or _parser_for(hint), required=required,
                           **({} if required else {"default": default}), choices=meta.get("choices"),
                           metavar=metavar, help=text.replace("%", "%%"))
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
