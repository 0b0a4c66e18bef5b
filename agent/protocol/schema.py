"""Strict decoding of JSON values into frozen dataclasses, naming the path of any bad field."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from agent.protocol.errors import ProtocolError
from agent.protocol.limits import MAX_TEXT_LENGTH

T = TypeVar("T")

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass, cached (they are strings under postponed evaluation)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _type_name(tp: Any) -> str:
    """Readable name of a type for error messages."""
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _decode(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against type `tp` and build nested dataclasses; raise naming `path`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ProtocolError(f"{path}: must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _decode(value, arg, path)
            except ProtocolError as exc:
                errors.append(str(exc))
        raise ProtocolError(errors[0] if len(errors) == 1 else f"{path}: no variant matched")
    if origin is Literal:
        if value not in get_args(tp):
            raise ProtocolError(f"{path}: must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin is list or origin is tuple:
        if not isinstance(value, list):
            raise ProtocolError(f"{path}: expected a list, got {type(value).__name__}")
        (item_tp, *_rest) = get_args(tp)
        return tuple(_decode(item, item_tp, f"{path}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{path}: expected an object, got {type(value).__name__}")
        _key_tp, val_tp = get_args(tp)
        return {k: _decode(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return decode_dataclass(value, tp, path)  # type: ignore[arg-type]
    if tp is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{path}: expected a boolean, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ProtocolError(f"{path}: must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ProtocolError(f"{path}: expected a string, got {type(value).__name__}")
        if len(value) > MAX_TEXT_LENGTH:
            raise ProtocolError(f"{path}: longer than {MAX_TEXT_LENGTH} characters")
        return value
    raise ProtocolError(f"{path}: unsupported schema type {_type_name(tp)}")  # pragma: no cover


def decode_dataclass(value: Any, cls: type[T], path: str = "$") -> T:
    """Build `cls` from a JSON object: unknown or missing fields raise naming their path."""
    if not isinstance(value, dict):
        raise ProtocolError(f"{path}: expected an object, got {type(value).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in value:
        if key not in fields:
            raise ProtocolError(f"{path}.{key}: unknown field")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in value:
            has_default = (
                field.default is not dataclasses.MISSING
                or field.default_factory is not dataclasses.MISSING
            )
            if has_default:
                continue
            raise ProtocolError(f"{path}.{name}: missing field")
        kwargs[name] = _decode(value[name], hints[name], f"{path}.{name}")
    try:
        return cls(**kwargs)
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{path}: {exc}") from exc


def encode(value: Any) -> Any:
    """Turn dataclasses, tuples and dicts into plain JSON-ready values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return value
