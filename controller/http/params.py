"""Query parameters parsed by hand, so that a bad one is a 400 naming it (not FastAPI's 422)."""

from __future__ import annotations

from controller.errors import FleetError


def query_int(name: str, value: str) -> int:
    """An integer query parameter, or FleetError (400) naming it."""
    try:
        return int(value.strip())
    except ValueError:
        raise FleetError(f"{name}: expected an integer, got {value!r}") from None


def query_bool(name: str, value: str | None) -> bool | None:
    """true/false (1/0, yes/no) query parameter, None when absent, or FleetError naming it."""
    if value is None:
        return None
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise FleetError(f"{name}: expected true or false, got {value!r}")
