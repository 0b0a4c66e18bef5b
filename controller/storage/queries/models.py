"""Models, artifacts and their links (controller/fleet/models.py, candidates.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, func, literal_column, select

from controller.storage.db import Connection
from controller.storage.queries import Prepared, dialect_insert, dicts, first
from controller.storage.tables import artifacts, model_artifacts, models

m, a, link = models.c, artifacts.c, model_artifacts.c

_MODEL = Prepared(
    lambda dialect: dialect_insert(dialect, models)
    .values(name=bindparam("name"), version=bindparam("version"), source=bindparam("source"),
            created=bindparam("created"))
    .on_conflict_do_nothing(index_elements=["name", "version"]),
)  # fmt: skip
_ARTIFACT_COLUMNS = ("sha256", "model_id", "recipe", "profile", "size", "chunk_size", "manifest",
                     "created", "kind", "golden_sha256")  # fmt: skip


def _artifact(dialect: str) -> Any:
    """Insert an artifact; a known one takes the new manifest only when it names a golden."""
    stmt = dialect_insert(dialect, artifacts).values(
        {c: bindparam(c) for c in _ARTIFACT_COLUMNS}
    )
    return stmt.on_conflict_do_update(
        index_elements=["sha256"],
        set_={"manifest": stmt.excluded.manifest, "golden_sha256": stmt.excluded.golden_sha256},
        where=stmt.excluded.golden_sha256.is_not(None),
    )


_ARTIFACT = Prepared(_artifact, _ARTIFACT_COLUMNS)
_LINK_COLUMNS = ("model_id", "sha256", "profile", "recipe", "created")
_LINK = Prepared(
    lambda dialect: dialect_insert(dialect, model_artifacts)
    .values({c: bindparam(c) for c in _LINK_COLUMNS})
    .on_conflict_do_nothing(),
    _LINK_COLUMNS,
)


def add_model(conn: Connection, name: str, version: str, source: str, created: float) -> int:
    """The id of model `name:version`, added if new."""
    _MODEL.execute(conn, {"name": name, "version": version, "source": source, "created": created})
    return int(
        conn.sa.execute(select(m.id).where(m.name == name, m.version == version)).scalar_one()
    )


def add_artifact(conn: Connection, row: dict[str, Any]) -> None:
    """Store an artifact (see _artifact for a known one)."""
    _ARTIFACT.execute(conn, row)


def link_artifact(conn: Connection, row: dict[str, Any]) -> None:
    """Link an artifact to a model version for a profile (None: every profile), once."""
    _LINK.execute(conn, row)


def linked_sha(conn: Connection, name: str, version: str, profile: str | None) -> str | None:
    """The artifact linked to `name:version` for this profile (None: the profile-less one)."""
    row = conn.sa.execute(
        select(link.sha256)
        .join(models, m.id == link.model_id)
        .where(
            m.name == name,
            m.version == version,
            func.coalesce(link.profile, literal_column("''")) == (profile or ""),
        )
    ).first()
    return None if row is None else str(row[0])


def model(conn: Connection, name: str, version: str | None) -> dict[str, Any] | None:
    """A model version's row; without a version, the newest of that name."""
    if version:
        return first(conn, select(models).where(m.name == name, m.version == version))
    return first(
        conn, select(models).where(m.name == name).order_by(m.created.desc(), m.id.desc()).limit(1)
    )


def model_artifact_rows(conn: Connection, model_id: int) -> list[dict[str, Any]]:
    """sha256, recipe, profile, size, golden_sha256, created of a model's linked artifacts."""
    return dicts(
        conn,
        select(a.sha256, link.recipe, link.profile, a.size, a.golden_sha256, link.created)
        .select_from(model_artifacts)
        .join(artifacts, a.sha256 == link.sha256)
        .where(link.model_id == model_id)
        .order_by(link.profile, link.created),
    )


def all_models(conn: Connection) -> list[dict[str, Any]]:
    """Every model row, by name and creation."""
    return dicts(conn, select(models).order_by(m.name, m.created))


def linked_profiles(conn: Connection, model_id: int) -> list[str | None]:
    """The profiles a model has artifacts for (None: every profile), sorted."""
    rows = conn.sa.execute(
        select(link.profile).where(link.model_id == model_id).order_by(link.profile)
    )
    return [r[0] for r in rows]


def manifest_text(conn: Connection, sha256: str) -> str | None:
    """The stored manifest (JSON text) of an artifact, or None."""
    found = conn.sa.execute(select(a.manifest).where(a.sha256 == sha256)).scalar()
    return None if found is None else str(found)
