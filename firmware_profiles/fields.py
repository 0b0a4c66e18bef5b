"""The building blocks of the profile models: strict scalar types, validators, one-line errors."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, ConfigDict, PlainSerializer, Strict, ValidationError

from firmware_profiles.validation import one_line, rule_error

# Unknown keys are refused; a key may be given by its TOML name (`class`) or its attribute
# name (`device_class`, what dataclasses.replace passes).
CONFIG = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

T = TypeVar("T")
# Attribute names that differ from their TOML key, for error messages about objects built in code.
TOML_NAMES = {"device_class": "class", "identity": "match"}


class ProfileError(ValueError):
    """A device profile is invalid or unknown; the message names the file and the dotted key."""


def non_blank(value: str) -> str:
    """Refuse an empty or whitespace-only string."""
    if not value.strip():
        raise rule_error("", f"must be a non-empty string, got {value!r}")
    return value


def matching(pattern: re.Pattern[str], what: str) -> AfterValidator:
    """A validator that requires `pattern` to match the whole string, naming `what` it wants."""

    def check(value: str) -> str:
        """Refuse a string that does not match."""
        if not pattern.fullmatch(value):
            raise rule_error("", f"must be {what}, got {value!r}")
        return value

    return AfterValidator(check)


def anchored(pattern: re.Pattern[str]) -> str:
    """The regex for JSON Schema, whose `pattern` searches: anchored to match the whole value."""
    return f"^(?:{pattern.pattern})$"


def frozen_table(value: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only view of a table, so a frozen profile stays immutable."""
    return MappingProxyType(dict(value))


Text = Annotated[str, Strict(), AfterValidator(non_blank)]
Int = Annotated[int, Strict()]
Number = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Table = PlainSerializer(dict, return_type=dict)


def section(toml_key: str) -> Callable[[type[T]], type[T]]:
    """Make errors of a section built in code one line, named as in the file (`runtime.version`).

    Loading goes through `build` (a TypeAdapter, which names the full path); this covers
    `Runtime(...)` and `dataclasses.replace(...)`, which call `__init__`.
    """

    def wrap(cls: type[T]) -> type[T]:
        """Replace the pydantic __init__ with one that raises ProfileError."""
        init = cls.__init__
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            """Validate as pydantic does; report the first problem as a ProfileError."""
            if len(args) > len(names):
                raise TypeError(f"{cls.__name__} takes at most {len(names)} arguments")
            # By name, so an error names the key rather than the argument's position.
            for name, value in zip(names, args, strict=False):
                if name in kwargs:
                    raise TypeError(f"{cls.__name__} got two values for {name!r}")
                kwargs[name] = value
            try:
                init(self, **kwargs)
            except ValidationError as exc:
                raise ProfileError(one_line(exc, toml_key, TOML_NAMES)) from None

        cls.__init__ = __init__  # type: ignore[method-assign]
        return cls

    return wrap
