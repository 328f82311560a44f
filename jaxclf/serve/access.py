"""What a request may put into metrics and logs: bounded labels and escaped, clipped text.

Every Prometheus label value lives as long as the process and is sent on every scrape, so a label
must come from a fixed set: the methods the app answers and its route rules; anything else is
"other". The access log writes client-chosen text (the path, the method); control characters are
escaped (a "%0A" in a path must not start a forged log line) and each field is clipped.
"""

from __future__ import annotations

import re

# GET and POST are the routes' methods; Flask answers HEAD for every GET and OPTIONS for every route.
KNOWN_METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS"})
OTHER = "other"  # the label of every method and path outside the app's own
LOG_FIELD_CHARS = 256  # most characters of one client-chosen access-log field

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators; the backslash and the quote
# too, so an escaped field cannot be confused with a literal one.
_UNSAFE = re.compile(r'[\x00-\x1f\x7f-\x9f\u2028\u2029\\"]')


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else OTHER


def endpoint_label(rule: str | None) -> str:
    """The matched route rule (never the raw path), or "other" for a path no route matches."""
    return rule if rule is not None else OTHER


def _escape(match: re.Match) -> str:
    char = match.group()
    if char in '\\"':
        return "\\" + char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def loggable(text: str | None, limit: int = LOG_FIELD_CHARS) -> str:
    """`text` safe for one log line: control characters escaped, clipped to `limit` characters."""
    if text is None:
        return "-"
    clipped = _UNSAFE.sub(_escape, text[:limit])
    return clipped if len(text) <= limit else f"{clipped}...[{len(text) - limit} more]"
