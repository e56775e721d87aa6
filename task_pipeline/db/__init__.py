"""The database behind a store: one small interface, two drivers.

Everything above this package (state, queries, housekeeping, the engine) talks to
a `Database` and writes its SQL once: `?` placeholders, `ON CONFLICT`, `RETURNING`,
and rows read by name or position. A driver owns what differs between engines:
connecting, transactions and how writers are serialised, the clock that leases are
measured by, how an idle daemon learns that work arrived, the integrity check and
the types in the schema. Nothing above asks which engine it talks to.

- `sqlite.py`: a store directory, DB_DIR/db (the default; one machine).
- `postgres.py`: a `postgresql://` URL (runners on many machines share one queue).

`open_database` picks the driver from the location and brings the schema up to
date (schema.py holds the numbered migrations both drivers apply).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import Any, Iterable, Iterator, Protocol

from task_pipeline.errors import DatabaseUnavailable as DatabaseUnavailable  # part of the interface
from task_pipeline.errors import StoreError
from task_pipeline.schema import MIGRATIONS, SCHEMA_VERSION, statements
from task_pipeline.store import has_objects


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list: ...
    def __iter__(self) -> Iterator: ...


class Watcher(Protocol):
    def wait(self, timeout: float) -> bool:
        """Block until another process may have changed the store (True) or `timeout` passes (False)."""
    def reconnect(self) -> None: ...
    def close(self) -> None: ...


class Database(Protocol):
    """What state, queries, housekeeping and the engine need from a database connection.

    One connection, used by one thread at a time. Every mutation runs inside
    `transaction()`; reads may run outside one.
    """

    kind: str     # "sqlite" or "postgresql", for messages and docs; never for branching
    name: str     # what the user named (a path, or a URL without its password)
    skip_locked: str  # appended to the claim's row selection: lets concurrent claimers pass each other

    def execute(self, sql: str, params: Iterable = ()) -> Cursor: ...
    def executemany(self, sql: str, rows: Iterable[Iterable]) -> None: ...

    def transaction(self, *, shared: bool = False) -> AbstractContextManager:
        """A write transaction. Writers are serialised; `shared=True` (claims) may overlap other
        shared transactions but never a serialised one."""

    def lock(self, key: str) -> None:
        """Inside a transaction: hold an exclusive lock on `key` until it ends (a step's claim limit)."""

    def clock(self) -> float:
        """Now, by the clock leases are measured with (the database server's, where there is one)."""

    def notify(self) -> None:
        """Inside a transaction: when it commits, wake idle daemons watching this store."""

    def watcher(self) -> Watcher: ...
    def sibling(self) -> "Database":
        """Another connection to the same database (the heartbeat's, so that it never queues behind work)."""
    def integrity(self) -> list[str]:
        """Problems the engine's own integrity check finds (empty when sound)."""
    def has_table(self, name: str) -> bool: ...
    def retryable(self, e: BaseException) -> bool:
        """A transaction that failed only because of a concurrent one (a deadlock): run it again."""
    def reconnect(self) -> None: ...
    def close(self) -> None: ...

    @property
    def in_transaction(self) -> bool: ...
    @property
    def types(self) -> dict[str, str]: ...


def is_url(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def open_database(location: str, *, create: bool = False, hash_algo: str = "sha256",
                  objects_hint: str | None = None, password_file: str | None = None) -> Database:
    """Connect to the store's database and bring its schema up to date.

    `create` allows a new store to be made; `objects_hint` is where objects live (a new
    database next to objects that exist already is refused: its state was lost).
    """
    if is_url(location):
        from task_pipeline.db import postgres

        db = postgres.connect(location, password_file=password_file)
    else:
        from task_pipeline.db import sqlite

        db = sqlite.connect(location, create=create, objects_hint=objects_hint)
    try:
        db.created = migrate(db, hash_algo, create=create, objects_hint=objects_hint)
    except UnicodeDecodeError:
        db.close()
        raise StoreError(f"{db.name}: the database holds text that is not UTF-8, so it is damaged; restore it "
                         f"from a backup") from None
    except BaseException:
        db.close()
        raise
    return db


def migrate(db: Database, hash_algo: str, *, create: bool, objects_hint: str | None) -> bool:
    """Apply the migrations the database lacks; True if it was empty (a new store)."""
    version = _version(db)
    if version is None and not create:
        raise StoreError(f"{db.name}: no task-pipeline store here (the database has no tables yet); create one "
                         f"with 'task-pipeline run -manifest M -db {db.name}' or pass the right -db")
    if version is None and objects_hint and has_objects(objects_hint):
        raise StoreError(f"{db.name}: the database is empty, but {objects_hint} holds objects: the store's "
                         f"state is lost or was never here; restore the database from a backup, or point -db "
                         f"at the right one (nothing was changed)")
    _check_version(version or 0)
    if version == SCHEMA_VERSION:
        return False
    with db.transaction():
        # read again under the lock: another process may have created or migrated the store meanwhile
        again = _version(db)
        created = again is None
        version = again or 0
        _check_version(version)
        for i in range(version, SCHEMA_VERSION):
            for stmt in statements(MIGRATIONS[i], db.types):
                db.execute(stmt)
            if i == 0:
                db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", [
                    ("hash_algo", hash_algo), ("created_at", repr(time.time())), ("schema_version", "0"),
                ])
        db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
    return created


def _version(db: Database) -> int | None:
    if not db.has_table("meta"):
        # meta and the other tables are created in one transaction: if they are there now, meta is too
        # (another process created the store between our two looks)
        if (db.has_table("task") or db.has_table("step")) and not db.has_table("meta"):
            raise StoreError(f"{db.name}: the database has tables but is not a task-pipeline store; "
                             f"point -db elsewhere")
        if not db.has_table("meta"):
            return None
    row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    try:
        return int(row[0]) if row else 0
    except (TypeError, ValueError):
        raise StoreError(f"{db.name}: the database's schema version is unreadable ({row[0]!r}): it is damaged; "
                         f"restore it from a backup") from None


def _check_version(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise StoreError(f"this store was written by a newer task-pipeline (schema {version}, this one knows "
                         f"{SCHEMA_VERSION}); upgrade task-pipeline")


def explain(exc: BaseException) -> str | None:
    """A one-line explanation of a database driver's error, or None if it is not one."""
    from task_pipeline.db import sqlite

    text = sqlite.explain(exc)
    if text is None:
        import sys

        if "psycopg" in sys.modules:
            from task_pipeline.db import postgres

            text = postgres.explain(exc)
    return text
