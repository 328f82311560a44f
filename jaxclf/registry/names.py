"""Naming rules of the registry: model names, aliases, tags, descriptions, and references (NAME@vN).

A name becomes a directory under models/, so the rules keep it to one safe path component; tag
values and descriptions are shown on terminals, so they may not hold control characters.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from jaxclf.registry.errors import InvalidNameError

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,99}")
_ALIAS = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_VERSION = re.compile(r"v?([0-9]{1,9})")
_TAG_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
# C0/C1 controls, and the Unicode line separators and bidi overrides that can disguise a name on a terminal
_INVISIBLE = frozenset("\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
NAME_RULE = "1-100 characters: lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
ALIAS_RULE = ("1-64 characters: lowercase letters, digits, '_' or '-', starting with a letter; not 'latest' "
              "and not shaped like a version (v3)")
TAG_KEY_RULE = "1-64 characters: letters, digits, '_', '.' or '-', starting with a letter or '_'"
MAX_TAG_VALUE = 256
MAX_DESCRIPTION = 4000


def _is_control(c: str) -> bool:
    return ord(c) < 32 or 127 <= ord(c) < 160 or c in _INVISIBLE


def _has_control(text: str, allowed: str = "") -> bool:
    return any(_is_control(c) and c not in allowed for c in text)


def printable(value: Any, keep: str = "") -> str:
    """`value` as text that is safe on a terminal: control characters, line separators and bidi overrides
    become escapes (\\x1b, \\n, \\u202e), except those in `keep`.

    Metric keys, creators and other recorded strings can come from an imported archive, whose author
    could otherwise move the cursor, retitle the terminal or forge output lines.
    """
    text = str(value)
    if not _has_control(text, keep):
        return text
    return "".join(c.encode("unicode_escape").decode("ascii") if _is_control(c) and c not in keep else c
                   for c in text)


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidNameError(f"invalid model name {name!r}: use {NAME_RULE}")
    return name


def check_alias(alias: Any) -> str:
    if not isinstance(alias, str) or not _ALIAS.fullmatch(alias) or alias == "latest" or _VERSION.fullmatch(alias):
        raise InvalidNameError(f"invalid alias {alias!r}: use {ALIAS_RULE}")
    return alias


def check_tags(tags: Mapping[str, str] | None) -> dict[str, str]:
    out = {}
    for key, value in (tags or {}).items():
        if not isinstance(key, str) or not _TAG_KEY.fullmatch(key):
            raise InvalidNameError(f"invalid tag key {key!r}: use {TAG_KEY_RULE}")
        if not isinstance(value, str) or len(value) > MAX_TAG_VALUE or _has_control(value):
            raise InvalidNameError(f"invalid value {value!r} for tag {key!r}: use at most {MAX_TAG_VALUE} "
                                   f"characters and no control characters")
        out[key] = value
    return out


def parse_tag(text: str) -> tuple[str, str]:
    """'key=value' -> (key, value), checked."""
    key, sep, value = text.partition("=")
    if not sep:
        raise InvalidNameError(f"invalid tag {text!r}: write it as key=value")
    check_tags({key: value})
    return key, value


def check_description(text: Any) -> str:
    if not isinstance(text, str) or len(text) > MAX_DESCRIPTION or _has_control(text, allowed="\n\t"):
        raise InvalidNameError(f"invalid description {str(text)[:60]!r}: use at most {MAX_DESCRIPTION} characters "
                               f"and no control characters other than newline and tab")
    return text


def version_ref(name: str, version: int) -> str:
    return f"{name}@v{version}"


@dataclasses.dataclass(frozen=True)
class Ref:
    """A parsed reference: NAME, NAME@vN (or NAME@N), NAME@latest or NAME@ALIAS."""

    name: str
    version: int | None = None
    alias: str | None = None  # "latest" or an alias name

    @classmethod
    def parse(cls, text: str, default_alias: str | None = "latest") -> "Ref":
        if not isinstance(text, str):
            raise InvalidNameError(f"invalid model reference {text!r}: use NAME, NAME@vN or NAME@ALIAS")
        name, sep, selector = text.partition("@")
        check_name(name)
        if not sep:
            return cls(name, alias=default_alias)
        if match := _VERSION.fullmatch(selector):
            return cls(name, version=int(match.group(1)))
        if selector == "latest":
            return cls(name, alias="latest")
        try:
            return cls(name, alias=check_alias(selector))
        except InvalidNameError:
            raise InvalidNameError(f"invalid model reference {text!r}: after '@' put a version (v3), 'latest' or "
                                   f"an alias ({ALIAS_RULE})") from None

    def __str__(self) -> str:
        if self.version is not None:
            return version_ref(self.name, self.version)
        return f"{self.name}@{self.alias}" if self.alias else self.name
