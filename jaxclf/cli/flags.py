"""Command-line flags generated from a config dataclass, so each knob keeps one default: the field's.

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, EngineConfig, "inference")      # --max-batch-size, --no-batching, ...
    engine = config_from_args(EngineConfig, parser.parse_args())

Each field becomes --kebab-name. Its type comes from the annotation (int, float, str, bool, T | None,
tuple[int, ...], tuple[str, ...]), its help from `metadata={"help": ...}` or else the comment after
the field (metadata "choices" limits the values). A flag that is not given sets nothing (argparse.SUPPRESS), so the dataclass default
applies; the help text shows it. Booleans get --name / --no-name. A tuple takes comma-separated
values and may be repeated. An optional field whose default is not None also gets an "off" flag,
`metadata["off_flag"]` or --no-name, that sets it to None.

JAX-free: `--help` answers without loading JAX.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from typing import Any

_SCALARS = {int: int, float: float, str: str}
_METAVARS = {int: "N", float: "X"}  # a str flag is named after its field


def kebab(name: str) -> str:
    return name.replace("_", "-")


def _field_comments(cls: type) -> dict[str, str]:
    """name -> the comment after `name: type = default` in the class body (no source: none)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments = {}
    for line in source.splitlines():
        match = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+?)\s*$", line)
        if match:
            comments.setdefault(match.group(1), match.group(2))
    return comments


def _split_optional(hint: Any) -> tuple[Any, bool]:
    """(the type inside `T | None`, True) or (hint, False)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def _list_parser(item_type: type):
    def parse(text: str) -> list:
        try:
            return [item_type(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {item_type.__name__} values like "
                f"{'1,4,16' if item_type is int else 'a,b'}; got {text!r}") from None
    parse.__name__ = f"list of {item_type.__name__}"  # argparse names the type in its own errors
    return parse


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _argument_options(name: str, hint: Any) -> dict[str, Any]:
    """argparse add_argument options for a field of type `hint`."""
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is tuple:
        item_type, *rest = typing.get_args(hint)
        if rest != [Ellipsis] or item_type not in _SCALARS:
            raise TypeError(f"field {name}: only tuple[int, ...], tuple[float, ...] or tuple[str, ...] "
                            f"make a flag, not {hint}")
        item = _METAVARS.get(item_type, "X")
        return {"type": _list_parser(item_type), "action": "extend", "metavar": f"{item},{item},..."}
    if hint in _SCALARS:
        return {"type": _SCALARS[hint], "metavar": _METAVARS.get(hint) or name.upper()}
    raise TypeError(f"field {name}: no command-line flag for type {hint}")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, title: str | None = None):
    """Add one flag per field of dataclass `cls` (in an argument group named `title`); returns the group."""
    group = parser.add_argument_group(title) if title else parser
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        hint, optional = _split_optional(hints[field.name])
        default = _default_of(field)
        help_text = field.metadata.get("help") or comments.get(field.name, "")
        shown = ("none" if default in (None, ()) else ",".join(map(str, default)) if isinstance(default, tuple)
                 else default)
        options = _argument_options(field.name, hint)
        if "choices" in field.metadata:
            options["choices"] = field.metadata["choices"]
        group.add_argument(f"--{kebab(field.name)}", dest=field.name, default=argparse.SUPPRESS,
                           help=f"{help_text} (default: {shown})".replace("%", "%%"), **options)
        if optional and default is not None:
            off_flag = field.metadata.get("off_flag", f"--no-{kebab(field.name)}")
            group.add_argument(off_flag, dest=field.name, action="store_const", const=None,
                               default=argparse.SUPPRESS, help=f"set {field.name} to none")
    return group


def given_fields(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` that the command line set (flags not given are absent)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for field in dataclasses.fields(cls):
        if field.init and hasattr(args, field.name):
            value = getattr(args, field.name)
            if isinstance(value, list) and typing.get_origin(_split_optional(hints[field.name])[0]) is tuple:
                value = tuple(value)
            out[field.name] = value
    return out


def config_from_args(cls: type, args: argparse.Namespace, **changes: Any):
    """An instance of `cls` from the flags given (others keep their defaults), then `changes` on top."""
    return cls(**{**given_fields(cls, args), **changes})
