"""One-line errors from pydantic: the controller side's files are validated by pydantic models.

A `ValidationError` lists every problem over several lines; a user editing a file wants one
line naming the key and what is wrong with it. `one_line` renders the first problem in the
house's shape (`'cpu.cores' must be an integer, got 'two'`) and counts the rest. Validators
raise `rule_error(key, problem)` so rules across keys read the same way.

`read_json_model` reads a JSON file the controller wrote (or a user edited) through its model:
a bad file is one `FileContentError` line naming the file, the key and the problem.

The agent never imports this (a device runs without pydantic; import-linter forbids it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError

__all__ = [
    "RULE",
    "FileContentError",
    "describe",
    "dotted",
    "one_line",
    "problem",
    "read_json_model",
    "rule_error",
]

M = TypeVar("M", bound=BaseModel)

# The error type of the house's own rules: ctx carries the key (below the error's location)
# and the problem in words.
RULE = "edgefleet_rule"

# Pydantic error types rendered as "must be <what>, got <input>".
_MUST_BE = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a non-empty string",
    "list_type": "an array",
    "tuple_type": "an array",
    "dict_type": "a table",
    "mapping_type": "a table",
    "dataclass_type": "a table",
    "dataclass_exact_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}
_BOUNDS = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}


def rule_error(key: str, problem: str) -> PydanticCustomError:
    """An error for `key` (dotted, below the validator's location; "" for the location itself)."""
    return PydanticCustomError(RULE, "{problem}", {"key": key, "problem": problem})


def dotted(loc: Sequence[int | str], rename: Mapping[str, str] | None = None) -> str:
    """A pydantic location as the dotted key a user reads: ('accelerators', 0, 'kind') ->
    accelerators[0].kind; a mapping key's own error ('[key]') is named by the key itself.
    `rename` maps attribute names to file keys (device_class -> class) where they differ."""
    out = ""
    for part in loc:
        if part == "[key]":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = (rename or {}).get(part, part)
            out = f"{out}.{name}" if out else name
    return out


def _join(prefix: str, key: str) -> str:
    """Dotted `key` below `prefix`."""
    return f"{prefix}.{key}" if prefix and key else prefix or key


def _choices(expected: str) -> str:
    """Pydantic's literal_error expectation "'a', 'b' or 'c'" as "a, b, c"."""
    return ", ".join(re.findall(r"'([^']*)'", expected)) or expected


def _template(error: ErrorDetails) -> tuple[str, str]:
    """(key below the error's location, the message with `{key}` where the key goes)."""
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    got = describe(value)
    if kind == RULE:
        return str(ctx["key"]), "'{key}' " + str(ctx["problem"])
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return "", "unknown key '{key}'"
    if kind in ("missing", "missing_keyword_argument", "missing_argument"):
        return "", "missing required key '{key}'"
    if kind in _MUST_BE:
        return "", f"'{{key}}' must be {_MUST_BE[kind]}, got {got}"
    if kind == "literal_error":
        return "", f"'{{key}}' must be one of {_choices(str(ctx['expected']))}; got {got}"
    if kind in _BOUNDS:
        limit = next(iter(ctx.values()))
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)  # a float field's bound 0 is shown as written: 0, not 0.0
        return "", f"'{{key}}' must be {_BOUNDS[kind]} {limit}, got {got}"
    if kind in ("too_short", "string_too_short"):
        return "", "'{key}' must not be empty"
    if kind == "string_pattern_mismatch":
        return "", f"'{{key}}' must match {ctx['pattern']}, got {got}"
    message = str(error["msg"])
    return "", f"'{{key}}' {message[:1].lower()}{message[1:]}, got {got}"


def problem(
    error: ErrorDetails,
    prefix: str = "",
    rename: Mapping[str, str] | None = None,
    items: bool = False,
) -> str:
    """One pydantic error as "'key' what is wrong" (or "unknown key 'key'").

    With `items`, a key inside an array item names the item first, as lists of records read
    best: "candidates[0]: 'threads' must be ..." rather than "'candidates[0].threads' ...".
    """
    below, template = _template(error)
    key = _join(_join(prefix, dotted(error["loc"], rename)), below)
    if not error["loc"] and not key:  # the document itself (a JSON array where a table goes)
        return template.replace("'{key}'", "the top level", 1)
    where, _, inner = key.rpartition("].")
    if items and where:
        return f"{where}]: " + template.replace("{key}", inner, 1)
    return template.replace("{key}", key, 1)


def one_line(
    exc: ValidationError,
    prefix: str = "",
    rename: Mapping[str, str] | None = None,
    items: bool = False,
) -> str:
    """The first problem of a ValidationError on one line, and how many more there are."""
    errors: list[ErrorDetails] = exc.errors(include_url=False)
    first = problem(errors[0], prefix, rename, items)
    more = len(errors) - 1
    return first if more == 0 else f"{first} (and {more} more problem{'s' * (more > 1)})"


def describe(value: Any) -> str:
    """repr() of a value, shortened to keep an error on one readable line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class FileContentError(ValueError):
    """A file that is not JSON or not what its model expects; one line naming the file."""


def read_json_model(path: Path, model: type[M], *, items: bool = False) -> M:
    """`path` parsed as JSON and validated by `model`; OSError (a missing file) passes through.

    `items` names an array item first (see `problem`).
    """
    text = path.read_text()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise FileContentError(f"{path}: not valid JSON ({exc})") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise FileContentError(f"{path}: {one_line(exc, items=items)}") from None
