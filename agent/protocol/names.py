"""One check for every name that can reach a file path, a topic, a log line or a shell.

Model names and versions, recipe and profile ids, deployment, command and event ids and power
source labels arrive from outside (a manifest, a desired state, a command, a CLI argument). None
of them may carry a path separator, a `..`, whitespace, a control or bidi-format character, or a
leading `-` (read as an option by a shell tool), and all are bounded in length.
"""

from __future__ import annotations

import re
import unicodedata

from agent.protocol.errors import ProtocolError

# Longest name: a model name plus a version fits easily; 128 keeps file names (255 bytes on
# ext4, even as 4-byte UTF-8) and log lines bounded.
MAX_NAME_LENGTH = 128

# Names made only of these characters need no further check (the hot path: telemetry labels).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_+=@:,][A-Za-z0-9._+=@:,-]*")


def _describe(char: str) -> str:
    """A character as U+XXXX with its Unicode name, readable even when it is invisible."""
    name = unicodedata.name(char, "") or unicodedata.category(char)
    return f"U+{ord(char):04X} {name}"


def _problem(value: str, max_length: int) -> str | None:
    """What is wrong with a name (None when nothing is); names the first bad character."""
    if len(value) > max_length:
        return f"is longer than {max_length} characters ({len(value)})"
    if ".." in value:
        return "contains '..' (parent directory)"
    if value == ".":
        return "is '.' (current directory)"
    for position, char in enumerate(value):
        if char in "/\\":
            return f"contains path separator {char!r} at position {position}"
        if char.isspace():
            return f"contains whitespace {_describe(char)} at position {position}"
        if not char.isprintable():
            return f"contains control or format character {_describe(char)} at position {position}"
    if value.startswith("-"):
        return "starts with '-' (a shell tool would read it as an option)"
    return None


def validate_name(
    kind: str, value: object, *, max_length: int = MAX_NAME_LENGTH, allow_empty: bool = False
) -> str:
    """Return `value` if it is a safe name, else raise ProtocolError naming `kind` and the flaw."""
    if not isinstance(value, str):
        raise ProtocolError(f"Invalid {kind}: expected a string, got {type(value).__name__}")
    if not value:
        if allow_empty:
            return value
        raise ProtocolError(f"Invalid {kind}: empty")
    if len(value) <= max_length and _PLAIN_NAME.fullmatch(value) and ".." not in value:
        return value
    problem = _problem(value, max_length)
    if problem is not None:
        raise ProtocolError(f"Invalid {kind}: {value[:max_length]!r} {problem}")
    return value


# Longest label: an hwmon power source names every summed rail ("hwmon:ina3221/VDD_IN+…"), so
# labels get more room than names while staying bounded for logs and metric label values.
MAX_LABEL_LENGTH = 1024


def validate_label(kind: str, value: object, *, max_length: int = MAX_LABEL_LENGTH) -> str:
    """Return a free-form label (never a path) if printable and bounded, else raise naming `kind`.

    Labels such as power sources may carry '/' and spaces (sysfs rail names); they only reach
    SQLite parameters, metric label values and log lines, where control and bidi characters
    are what does harm.
    """
    if not isinstance(value, str):
        raise ProtocolError(f"Invalid {kind}: expected a string, got {type(value).__name__}")
    if not value:
        raise ProtocolError(f"Invalid {kind}: empty")
    if len(value) > max_length:
        raise ProtocolError(
            f"Invalid {kind}: {value[:40]!r}… is longer than {max_length} characters ({len(value)})"
        )
    if not value.isprintable():
        position, char = next((i, c) for i, c in enumerate(value) if not c.isprintable())
        raise ProtocolError(
            f"Invalid {kind}: {value[:max_length]!r} contains control or format character "
            f"{_describe(char)} at position {position}"
        )
    return value


def escape_controls(text: str) -> str:
    """`text` with every non-printable character (controls, newlines, ESC, bidi overrides,
    zero-width marks) written as its Python escape (`\\n`, `\\x1b`, `\\u202e`), so free text
    from a device can neither forge a log line nor drive a terminal; printable text, including
    letters outside ASCII, is unchanged."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )
