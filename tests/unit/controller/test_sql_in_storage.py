"""SQL lives in controller/storage/ only: no string literal elsewhere in controller/ reads like
a SQL statement (docs/storage.md). The last files waiting for their port (the rollout's wave
steps and candidate selection) are ported, so there is no list of exceptions any more."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.paths import REPO_ROOT

ROOT = REPO_ROOT
CONTROLLER = ROOT / "controller"

# A statement's shape, not a keyword: "SELECT … FROM", "INSERT INTO", "UPDATE t SET",
# "DELETE FROM", "WITH … SELECT", keywords in capitals as the house writes SQL (so prose like
# "select a model from the list" does not match).
SQL = re.compile(
    r"^\s*(SELECT\b[\s\S]*\bFROM\b|INSERT\s+(OR\s+\w+\s+)?INTO\s|UPDATE\s+\w+\s+SET\s"
    r"|DELETE\s+FROM\s|WITH\s[\s\S]*\bSELECT\b)"
)

def _literal_text(node: ast.AST) -> str | None:
    """The text of a string literal, or the constant parts of an f-string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)
        )
    return None


def sql_literals(path: Path) -> list[int]:
    """Line numbers of the string literals in `path` that look like SQL statements."""
    tree = ast.parse(path.read_text(), str(path))
    parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    lines = []
    for node in ast.walk(tree):
        if id(node) in parts:  # a piece of an f-string: the f-string is judged whole
            continue
        text = _literal_text(node)
        if text is not None and SQL.match(text):
            lines.append(node.lineno)
    return sorted(lines)


def test_no_sql_outside_storage() -> None:
    found: dict[str, list[int]] = {}
    for path in sorted(CONTROLLER.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("controller/storage/"):
            continue
        lines = sql_literals(path)
        if lines:
            found[rel] = lines
    offenders = [f"{rel}:{line}" for rel, lines in found.items() for line in lines]
    assert offenders == [], (
        "SQL outside controller/storage/ (write it as a query in controller/storage/queries/): "
        + ", ".join(offenders)
    )


def test_the_scan_sees_sql_and_not_prose(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        'a = "SELECT id FROM devices WHERE x = ?"\n'
        'b = f"UPDATE devices SET state = {1}"\n'
        'c = "select a model to deploy from the list"\n'
        'd = "INSERT OR IGNORE INTO t (a) VALUES (?)"\n'
        'e = "Delete the device"\n'
    )
    assert sql_literals(sample) == [1, 2, 4]
