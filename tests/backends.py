"""Running the behavioural tests against both databases: a store directory (SQLite) and PostgreSQL.

A test module opts in with `pytestmark = pytest.mark.backends`; its `cli` fixture is then
parametrized as [sqlite] and [postgres]. On PostgreSQL the store keeps the directory layout
the tests know (objects in DB/objects, scratch in DB/tmp) and only the database moves: the
CLI wrapper rewrites `-db DB` into `-db URL --objects DB/objects --scratch DB/tmp`, and the
password reaches the CLI the way a user's would, through TASK_PIPELINE_DB_PASSWORD_FILE.

`query(db, sql, *args)` reads the store's database whichever it is, with SQLite's `?`
placeholders, so that assertions stay one line.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

# store directory -> (URL with password, for the tests' own queries)
_PG: dict[str, str] = {}


def register_pg(db: Path, url_with_password: str) -> None:
    _PG[str(Path(db))] = url_with_password


def forget(db: Path) -> None:
    _PG.pop(str(Path(db)), None)


def backend_of(db: Path) -> str:
    return "postgres" if str(Path(db)) in _PG else "sqlite"


def query(db: Path, sql: str, *args) -> list[tuple]:
    url = _PG.get(str(Path(db)))
    if url is None:
        conn = sqlite3.connect(Path(db) / "db", timeout=30)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql.replace("%", "%%").replace("?", "%s"), args or None)
        return [tuple(r) for r in cur.fetchall()] if cur.description else []


def execute(db: Path, sql: str, *args) -> None:
    """A write from outside task-pipeline (a test playing an operator, or damage)."""
    url = _PG.get(str(Path(db)))
    if url is None:
        conn = sqlite3.connect(Path(db) / "db", timeout=30)
        try:
            with conn:
                conn.execute(sql, args)
        finally:
            conn.close()
        return
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.replace("%", "%%").replace("?", "%s"), args or None)


def rewrite(args: list[str], db: Path, url: str) -> list[str]:
    """`-db DB` (any spelling) -> the PostgreSQL store with the same objects and scratch directories."""
    extra = ["--objects", str(db / "objects"), "--scratch", str(db / "tmp")]
    out: list[str] = []
    it = iter(args)
    for a in it:
        if a in ("-db", "--db"):
            value = next(it, None)
            if value is not None and str(value) == str(db):
                out += ["-db", url, *extra]
                continue
            out += [a] + ([value] if value is not None else [])
        elif a.startswith(("-db=", "--db=")) and a.split("=", 1)[1] == str(db):
            out += ["-db", url, *extra]
        else:
            out.append(a)
    return out
