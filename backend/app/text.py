"""Text that users and handlers supply, made safe to store and to show."""

from __future__ import annotations

import re
import unicodedata

#: A decimal number as text, which pydantic would read as Unix time where a date-time is
#: expected (the API and the CLI refuse it there).
NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")

#: Unicode categories that are not shown as themselves: control, format (zero-width, bidi
#: overrides), lone surrogate, line and paragraph separator.
UNSHOWABLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def storable(text: str) -> str:
    """``text`` as both engines can store and log it: NUL characters (which PostgreSQL
    refuses in text) and lone surrogates (which no UTF-8 text holds) written as escapes."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def shown(text: str, *, keep: str = "\n\t") -> str:
    """``text`` for a terminal: every character of UNSHOWABLE_CATEGORIES except those in
    ``keep`` written as an escape (\\x1b, \\u202e), so that text users chose cannot
    move the cursor, clear the screen, set the window title or reorder what is shown."""
    if text.isprintable():
        return text
    return "".join(
        c if c in keep or unicodedata.category(c) not in UNSHOWABLE_CATEGORIES else _escape(c)
        for c in text
    )


def is_showable(text: str) -> bool:
    """No character of UNSHOWABLE_CATEGORIES in ``text``."""
    return text.isprintable() or not any(
        unicodedata.category(c) in UNSHOWABLE_CATEGORIES for c in text
    )


def _escape(c: str) -> str:
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def error_line(exc: BaseException) -> str:
    """``Class: first line`` of an error, at most 200 characters of it: a driver's error
    carries the whole statement and its parameters, which a log line does not need."""
    text = str(exc)
    return f"{exc.__class__.__name__}: {text.splitlines()[0][:200] if text else ''}"
