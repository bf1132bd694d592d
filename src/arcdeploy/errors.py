"""The one exception type the CLI turns into a one-line message, and how foreign
exceptions are cut down to one line."""

from __future__ import annotations

import re


class ArcdeployError(Exception):
    """A user-facing failure: the message names the file and the problem, in one line."""


# lines that say where an error was raised, not what went wrong (OpenVINO puts the
# reason on the third line: "Exception from src/...cpp:84:", "Check '...' failed at ...")
_LOCATION_LINES = (
    re.compile(r"^Exception from \S+:\d+:?$"),
    re.compile(r"^Check '.*' failed at \S+"),
    re.compile(r"^\[ ?(GENERAL_ERROR|NOT_FOUND|PARAMETER_MISMATCH|NOT_IMPLEMENTED) ?\]\s*$"),
    re.compile(r"^Traceback \(most recent call last\):$"),
    re.compile(r"^(Error|Exception)\s*:?$"),
)


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    ch = match.group()
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, kept by os.fsdecode as a surrogate
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` as one printable line: line breaks, tabs and other control characters (U+2028 and
    U+2029 too), and bytes of a file name that are not UTF-8, written as backslash escapes, so a
    file name can neither split a one-line message nor forge a line of its own."""
    return _UNPRINTABLE.sub(_escape, text)


def in_users_terms(exc: ArcdeployError, places: dict[str, str]) -> ArcdeployError:
    """``exc`` with every path inside a temporary folder of ours (a key of ``places``) named as the
    user knows it (its value): an error must not name a folder that is gone by the time it is read."""
    text = str(exc)
    for temp, user in sorted(places.items(), key=lambda kv: -len(kv[0])):
        if temp:
            text = re.sub(re.escape(temp) + r"[^\s:()'\"]*", user.replace("\\", "\\\\"), text)
    if text == str(exc):
        return exc
    new = type(exc).__new__(type(exc))
    ArcdeployError.__init__(new, text)
    return new


def first_line(exc: BaseException | str, limit: int = 240) -> str:
    """The line of an exception message that says what went wrong, whitespace squeezed.

    Location-only lines (OpenVINO's ``Exception from src/...cpp:84:``) are skipped;
    an empty message gives the exception's type name.
    """
    text = str(exc)
    for raw in text.splitlines():
        line = " ".join(raw.split())
        if not line or any(p.match(line) for p in _LOCATION_LINES):
            continue
        line = re.sub(r"^\[ ?(GENERAL_ERROR|NOT_FOUND|PARAMETER_MISMATCH) ?\]\s*", "", line)
        return line if len(line) <= limit else line[: limit - 3] + "..."
    return type(exc).__name__ if isinstance(exc, BaseException) else ""


def describe(exc: BaseException) -> str:
    """``TypeName: first line`` for an unexpected exception (ArcdeployError: its message)."""
    if isinstance(exc, ArcdeployError):
        return first_line(exc)
    line = first_line(exc)
    name = type(exc).__name__
    return name if line == name else f"{name}: {line}"
