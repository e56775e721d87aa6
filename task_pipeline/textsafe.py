"""Text from scripts and file names, made safe to print on a terminal.

Output names, stderr lines and log contents are data written by scripts. Printed
raw, an escape sequence in them can rewrite the screen, change the window title
or write the clipboard (OSC 52). Everything such text passes through one of
these before it reaches a terminal. Pure functions.
"""

from __future__ import annotations

import re

# C0 controls, DEL and C1 controls; \t and \n are handled per function
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_NL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_FORMAT = re.compile("[\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")  # invisible and bidi controls


def _escape(m: re.Match) -> str:
    c = m.group(0)
    return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(c, f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def one_line(text: str) -> str:
    """For one line (a message, a table cell, a log line): every control character escaped."""
    text = _CONTROL_NL.sub(_escape, text)
    return _FORMAT.sub(_escape, text)


def block(text: str) -> str:
    """For several lines (a log shown by `logs`): line breaks and tabs kept, other controls escaped."""
    text = text.replace("\r\n", "\n")
    text = _CONTROL.sub(_escape, text)
    return _FORMAT.sub(_escape, text)


def last_line(text: str) -> str:
    """The line a person wants from the end of a stderr: the last non-blank one, and of a line that
    redraws itself with carriage returns (curl's progress meter), only what was drawn last."""
    lines = [ln for ln in text.replace("\r\n", "\n").split("\n") if ln.strip()]
    if not lines:
        return ""
    last = lines[-1]
    parts = [p for p in last.split("\r") if p.strip()]
    return one_line((parts[-1] if parts else last).strip())
