"""The security folder's JSON files read back through their pydantic models: revoked.json and
broker_copies.json load as the current writers write them, and a bad file is one line naming
the file, the key and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.security.revocation import (
    RevocationError,
    RevokedSet,
    read_revoked,
    revoked_path,
    write_revoked,
)

# ----------------------------------------------------------------------- revoked.json


def test_revoked_file_written_by_write_revoked_loads(tmp_path: Path) -> None:
    path = revoked_path(tmp_path)
    write_revoked(path, {"pi-2", "pi-1", "cam.door_3"})
    assert path.read_text() == '["cam.door_3", "pi-1", "pi-2"]\n'
    assert read_revoked(path) == {"pi-1", "pi-2", "cam.door_3"}
    write_revoked(path, set())
    assert read_revoked(path) == set()


def test_missing_revoked_file_is_an_empty_set(tmp_path: Path) -> None:
    assert read_revoked(revoked_path(tmp_path)) == set()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "revoked.json: not valid JSON (Expecting property name"),
        ('{"pi-1": true}', "revoked.json: the top level must be an array, got {'pi-1': True}"),
        ('["pi-1", 7]', "revoked.json: '[1]' must be a non-empty string, got 7"),
        ('["pi 1"]', "revoked.json: '[0]' must match ^[A-Za-z0-9._-]{1,64}$, got 'pi 1'"),
        ('["ok", "a/b", ""]', "'[1]' must match ^[A-Za-z0-9._-]{1,64}$, got 'a/b' (and 1 more"),
    ],
)
def test_bad_revoked_file_is_one_line_naming_file_key_and_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    path = revoked_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(RevocationError) as caught:
        read_revoked(path)
    assert message in str(caught.value)
    assert str(caught.value).startswith(str(path))
    assert "\n" not in str(caught.value)


def test_revoked_set_keeps_the_last_good_set_when_the_file_turns_bad(tmp_path: Path) -> None:
    path = revoked_path(tmp_path)
    write_revoked(path, {"pi-1"})
    revoked = RevokedSet(tmp_path)
    assert "pi-1" in revoked
    path.write_text('["pi-1", "pi-2", 3]')  # a hand edit gone wrong: keep refusing pi-1
    assert "pi-1" in revoked and "pi-2" not in revoked
    write_revoked(path, {"pi-2"})
    assert "pi-2" in revoked and "pi-1" not in revoked


# ----------------------------------------------------------------- broker_copies.json


def test_broker_copies_written_by_broker_config_load(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    from controller.security.broker_config import BROKER_COPIES, _copies, _record_copy
    from controller.security.identity import FleetSecurity

    security = FleetSecurity(tmp_path / "home")
    _record_copy(security, tmp_path / "out-a", "edgefleet/v1")
    _record_copy(security, tmp_path / "out-b", "site-2/edgefleet/v1")
    written = json.loads((security.directory / BROKER_COPIES).read_text())
    assert written == {
        str(tmp_path / "out-a"): "edgefleet/v1",
        str(tmp_path / "out-b"): "site-2/edgefleet/v1",
    }
    assert _copies(security) == written


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2", "broker_copies.json: not valid JSON"),
        ('["/srv/broker"]', "the top level must be a table, got ['/srv/broker']"),
        ('{"/srv/broker": 5}', "'/srv/broker' must be a non-empty string, got 5"),
        ('{"": "edgefleet/v1"}', "broker_copies.json: '' must not be empty"),
    ],
)
def test_bad_broker_copies_file_is_one_line_naming_file_key_and_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    pytest.importorskip("cryptography")
    from controller.security.broker_config import BROKER_COPIES, refresh_broker_copies
    from controller.security.identity import FleetSecurity, IdentityError

    security = FleetSecurity(tmp_path / "home")
    security.directory.mkdir(parents=True)
    (security.directory / BROKER_COPIES).write_text(text)
    with pytest.raises(IdentityError) as caught:
        refresh_broker_copies(security)
    assert message in str(caught.value)
    assert str(caught.value).startswith(str(security.directory / BROKER_COPIES))
    assert "\n" not in str(caught.value)
