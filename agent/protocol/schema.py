"""Strict decoding of JSON values into frozen dataclasses, naming the path of any bad field."""

from __future__ import annotations

import dataclasses
import math
import reprlib
import sys
import types
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from agent.protocol.errors import ProtocolError
from agent.protocol.limits import MAX_TEXT_LENGTH

T = TypeVar("T")

# dataclasses.field(metadata={OMIT_DEFAULT: True}): encode() leaves the field out at its default.
OMIT_DEFAULT = "omit_default"

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass, cached (they are strings under postponed evaluation)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _type_name(tp: Any) -> str:
    """Readable name of a type for error messages."""
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# Bounded repr for error messages: a rejected value may be a 256 KiB list or nested 1,000 deep
# (a plain repr would be huge or raise RecursionError); a few levels and items name it well enough.
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel = 3
_SHORT_REPR.maxstring = 60
_SHORT_REPR.maxother = 60


def _show(value: Any) -> str:
    """A short, always-safe repr of a rejected value for an error message."""
    return _SHORT_REPR.repr(value)


Decoder = Callable[[Any, str], Any]

# One compiled decoder per type, built on first use: walking typing objects (get_origin,
# get_args, is_dataclass) on every value cost ~190 µs per telemetry record; a closure per type
# does the same checks in a fraction of that (bench/bench_telemetry.py).
_DECODERS: dict[Any, Decoder] = {}


def _decoder(tp: Any) -> Decoder:
    """The cached decoder of type `tp`: fn(value, path) checks value and builds the result."""
    decoder = _DECODERS.get(tp)
    if decoder is None:
        decoder = _build(tp)
        _DECODERS[tp] = decoder
    return decoder


def _decode(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against type `tp` and build nested dataclasses; raise naming `path`."""
    return _decoder(tp)(value, path)


def _identity(value: Any, path: str) -> Any:
    """Any: accepted as it is."""
    return value


def _decode_bool(value: Any, path: str) -> bool:
    """A JSON boolean."""
    if not isinstance(value, bool):
        raise ProtocolError(f"{path}: expected a boolean, got {_show(value)}")
    return value


# Integers must fit a signed 64-bit column: SQLite raises OverflowError on anything wider, and
# no counter, size or sequence number of the protocol comes near it.
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


def _decode_int(value: Any, path: str) -> int:
    """A JSON integer (a boolean is not one) that fits in 64 bits."""
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ProtocolError(f"{path}: expected an integer, got {_show(value)}")
    if not _INT_MIN <= value <= _INT_MAX:
        raise ProtocolError(f"{path}: outside the 64-bit integer range")
    return int(value)


# Largest integer float() converts without OverflowError: a bigger JSON integer in a number
# field is refused, not a crash.
_MAX_FLOAT_INT = int(sys.float_info.max)


def _decode_float(value: Any, path: str) -> float:
    """A finite JSON number."""
    kind = type(value)
    if (kind is not float and kind is not int) and (
        isinstance(value, bool) or not isinstance(value, (int, float))
    ):
        raise ProtocolError(f"{path}: expected a number, got {_show(value)}")
    if kind is not float and not -_MAX_FLOAT_INT <= value <= _MAX_FLOAT_INT:
        raise ProtocolError(f"{path}: must be finite, got an integer of {len(str(value))} digits")
    if not math.isfinite(value):
        raise ProtocolError(f"{path}: must be finite, got {_show(value)}")
    return float(value)


def _decode_str(value: Any, path: str) -> str:
    """A JSON string of bounded length."""
    if not isinstance(value, str):
        raise ProtocolError(f"{path}: expected a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT_LENGTH:
        raise ProtocolError(f"{path}: longer than {MAX_TEXT_LENGTH} characters")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800"): JSON allows, UTF-8 not
            raise ProtocolError(f"{path}: not valid Unicode ({exc.reason})") from None
    return value


def _decode_path(value: Any, path: str) -> Path:
    """A filesystem path, given as a string (agent.toml; no wire message carries one)."""
    return Path(_decode_str(value, path))


_SCALARS: dict[Any, Decoder] = {
    bool: _decode_bool,
    int: _decode_int,
    float: _decode_float,
    str: _decode_str,
    Path: _decode_path,
}


def _build(tp: Any) -> Decoder:
    """Compile the decoder of one type (called once per type)."""
    if tp is Any:
        return _identity
    if tp in _SCALARS:
        return _SCALARS[tp]
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return _build_union(tp)
    if origin is Literal:
        allowed = get_args(tp)

        def decode_literal(value: Any, path: str) -> Any:
            if value not in allowed:
                raise ProtocolError(f"{path}: must be one of {list(allowed)}, got {_show(value)}")
            return value

        return decode_literal
    if isinstance(tp, type) and issubclass(tp, Enum):
        return _build_enum(tp)
    if origin is list or origin is tuple:
        return _build_sequence(get_args(tp)[0])
    if origin is dict:
        value_decoder = _decoder(get_args(tp)[1])

        def decode_dict(value: Any, path: str) -> dict[str, Any]:
            if not isinstance(value, dict):
                raise ProtocolError(f"{path}: expected an object, got {type(value).__name__}")
            return {k: value_decoder(v, f"{path}.{k}") for k, v in value.items()}

        return decode_dict
    if dataclasses.is_dataclass(tp):
        dataclass_type: type = tp  # type: ignore[assignment]  # a class here, never an instance
        return lambda value, path: decode_dataclass(value, dataclass_type, path)

    def unsupported(value: Any, path: str) -> Any:  # pragma: no cover
        raise ProtocolError(f"{path}: unsupported schema type {_type_name(tp)}")

    return unsupported


def _build_enum(tp: type[Enum]) -> Decoder:
    """An Enum: one of its members' values, decoded into the member."""
    members = {member.value: member for member in tp}

    def decode_enum(value: Any, path: str) -> Enum:
        try:
            return members[value]
        except (KeyError, TypeError):  # TypeError: an unhashable value (a list, an object)
            raise ProtocolError(
                f"{path}: must be one of {list(members)}, got {_show(value)}"
            ) from None

    return decode_enum


def _build_union(tp: Any) -> Decoder:
    """Optional and union types: null where allowed, else the first variant that matches."""
    args = get_args(tp)
    nullable = type(None) in args
    variants = [_decoder(arg) for arg in args if arg is not type(None)]

    def decode_union(value: Any, path: str) -> Any:
        if value is None:
            if nullable:
                return None
            raise ProtocolError(f"{path}: must not be null")
        errors = []
        for variant in variants:
            try:
                return variant(value, path)
            except ProtocolError as exc:
                errors.append(str(exc))
        raise ProtocolError(errors[0] if len(errors) == 1 else f"{path}: no variant matched")

    return decode_union


def _build_sequence(item_tp: Any) -> Decoder:
    """A JSON list decoded into a tuple; plain integers (histogram counts) take a fast path."""
    item_decoder = _decoder(item_tp)
    ints = item_tp is int

    def decode_sequence(value: Any, path: str) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ProtocolError(f"{path}: expected a list, got {type(value).__name__}")
        if (  # C-speed check of 31 histogram counts
            ints
            and set(map(type, value)) <= {int}
            and (not value or (min(value) >= _INT_MIN and max(value) <= _INT_MAX))
        ):
            return tuple(value)
        return tuple(item_decoder(item, f"{path}[{i}]") for i, item in enumerate(value))

    return decode_sequence


_FIELDS: dict[type, tuple[frozenset[str], tuple[tuple[str, Decoder, bool], ...]]] = {}


def _fields_of(cls: type) -> tuple[frozenset[str], tuple[tuple[str, Decoder, bool], ...]]:
    """(field names, (name, decoder, has_default) per field) of a dataclass, cached."""
    cached = _FIELDS.get(cls)
    if cached is None:
        hints = _hints(cls)
        fields = dataclasses.fields(cls)
        plan = tuple(
            (
                f.name,
                _decoder(hints[f.name]),
                f.default is not dataclasses.MISSING
                or f.default_factory is not dataclasses.MISSING,
            )
            for f in fields
        )
        cached = (frozenset(f.name for f in fields), plan)
        _FIELDS[cls] = cached
    return cached


# Fast-path kinds of a field: a plain value of the usual type is taken as it is, without a
# decoder call or its path string (most of parse's time on a telemetry record, ~20 fields);
# anything else goes to the field's decoder, which accepts or names it exactly as before.
_SLOW, _INT, _FLOAT, _STR, _BOOL = range(5)
_KINDS: dict[Any, int] = {int: _INT, float: _FLOAT, str: _STR, bool: _BOOL}
_MISSING = object()
_PLANS: dict[type, Any] = {}


def _kind(tp: Any) -> tuple[int, bool]:
    """(fast-path kind, null allowed) of a field type: scalars and Optional scalars."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2 and args[0] in _KINDS:
            return _KINDS[args[0]], True
        return _SLOW, False
    return _KINDS.get(tp, _SLOW), False


def _plan_of(cls: type) -> tuple[frozenset[str], tuple[tuple[str, int, bool, Decoder, bool], ...]]:
    """(field names, (name, kind, nullable, decoder, has_default) per field), cached."""
    cached = _PLANS.get(cls)
    if cached is None:
        names, fields = _fields_of(cls)
        hints = _hints(cls)
        cached = (
            names,
            tuple((n, *_kind(hints[n]), d, default) for n, d, default in fields),
        )
        _PLANS[cls] = cached
    return cached


def _decode_dataclass_checked(value: Any, cls: type[T], path: str) -> T:
    """The field-by-field decoder: every error named with its path (the fast path's fallback)."""
    if not isinstance(value, dict):
        raise ProtocolError(f"{path}: expected an object, got {type(value).__name__}")
    names, plan = _fields_of(cls)
    for key in value:
        if key not in names:
            raise ProtocolError(f"{path}.{key}: unknown field")
    kwargs: dict[str, Any] = {}
    for name, decoder, has_default in plan:
        if name not in value:
            if has_default:
                continue
            raise ProtocolError(f"{path}.{name}: missing field")
        kwargs[name] = decoder(value[name], f"{path}.{name}")
    return _construct(cls, kwargs, path)


def _construct(cls: type[T], kwargs: dict[str, Any], path: str) -> T:
    """cls(**kwargs), its validation errors as ProtocolErrors naming `path`."""
    try:
        return cls(**kwargs)
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{path}: {exc}") from exc


def decode_dataclass(value: Any, cls: type[T], path: str = "$") -> T:
    """Build `cls` from a JSON object: unknown or missing fields raise naming their path.

    Fields are checked in order, so the first bad one is reported, as field by field; a value
    that is not a plain one of its field's type goes through that field's decoder.
    """
    if type(value) is not dict:
        return _decode_dataclass_checked(value, cls, path)
    names, plan = _plan_of(cls)
    if not value.keys() <= names:
        return _decode_dataclass_checked(value, cls, path)  # names the unknown field
    kwargs: dict[str, Any] = {}
    for name, kind, nullable, decoder, has_default in plan:
        item = value.get(name, _MISSING)
        if item is _MISSING:
            if has_default:
                continue
            return _decode_dataclass_checked(value, cls, path)  # names the missing field
        if nullable and item is None:
            pass
        elif kind == _FLOAT:
            # x - x is 0.0 only for a finite float (json.loads accepts NaN and Infinity).
            if type(item) is not float or item - item != 0.0:
                item = decoder(item, f"{path}.{name}")
        elif kind == _INT:
            if type(item) is not int or not _INT_MIN <= item <= _INT_MAX:
                item = decoder(item, f"{path}.{name}")
        elif kind == _STR:
            if type(item) is not str or len(item) > MAX_TEXT_LENGTH or not item.isascii():
                item = decoder(item, f"{path}.{name}")
        elif kind != _BOOL or (item is not True and item is not False):
            item = decoder(item, f"{path}.{name}")
        kwargs[name] = item
    return _construct(cls, kwargs, path)


# Per dataclass: (field name, omitted while at this default?, the default) for encode().
_ENCODE_PLAN: dict[type, tuple[tuple[str, bool, Any], ...]] = {}
# Values encode() returns as they are, by exact type (a str Enum takes the general path).
_PLAIN: frozenset[type] = frozenset({str, int, float, bool, type(None)})


def _encode_plan(cls: type) -> tuple[tuple[str, bool, Any], ...]:
    """The fields encode() writes of dataclass `cls` (read once per class)."""
    plan = _ENCODE_PLAN.get(cls)
    if plan is None:
        plan = tuple(
            (f.name, bool(f.metadata.get(OMIT_DEFAULT)), f.default) for f in dataclasses.fields(cls)
        )
        _ENCODE_PLAN[cls] = plan
    return plan


def encode(value: Any) -> Any:
    """Turn dataclasses, tuples and dicts into plain JSON-ready values.

    Enums of the protocol are `str` subclasses (AgentState): json writes them as their value,
    so no per-value Enum check costs the telemetry hot path anything. Each dataclass's fields
    are looked up once per class: signing a desired state encodes it twice.
    """
    cls = type(value)
    if cls in _PLAIN:
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for name, omit, default in _encode_plan(cls):
            item = getattr(value, name)
            # Fields added to a message later are left out while they hold their default, so an
            # agent released before them still parses (and verifies the signature of) it.
            if omit and item == default:
                continue
            out[name] = encode(item)
        return out
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return value
