"""SQLite driver: a store directory on one machine, DB_DIR/db in WAL mode.

SQLite serialises writers itself (BEGIN IMMEDIATE takes the write lock), so
`shared` transactions and `lock()` need nothing more. Its clock is this
machine's. A daemon learns of other processes' commits from `PRAGMA
data_version`, a cheap read polled on a connection of its own. "database is
locked" never reaches a user: opening and beginning a transaction wait, retry,
and finally say who is in the way.
"""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from task_pipeline import fsutil
from task_pipeline.errors import StoreError
from task_pipeline.store import has_objects

BUSY_TIMEOUT = 60.0    # seconds a statement waits for another process's lock
WATCH_POLL = 0.05      # seconds between looks at data_version while a daemon is idle

TYPES = {"id": "INTEGER PRIMARY KEY", "ref": "INTEGER", "int": "INTEGER", "real": "REAL",
         "without_rowid": "WITHOUT ROWID"}


def db_file(db_dir: Path | str) -> Path:
    return Path(db_dir) / "db"


def _busy(e: Exception) -> bool:
    text = str(e)
    return isinstance(e, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def _retry_busy(fn, what: str):
    """Run fn, retrying while SQLite says the database is locked (it sometimes does so without
    waiting, e.g. while another process switches a new database to WAL mode)."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    delay = 0.01
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if not _busy(e):
                raise
            if time.monotonic() > deadline:
                raise StoreError(f"{what}: another process has kept the database busy for {BUSY_TIMEOUT:.0f}s; "
                                 f"is a task-pipeline or sqlite3 process stuck holding it? (try again once it is done)") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


class SQLiteDatabase:
    kind = "sqlite"
    skip_locked = ""
    types = TYPES

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.name = str(path.parent)
        self.conn = conn
        self.execute = conn.execute          # the hot path: no wrapper between state.py and sqlite3
        self.executemany = conn.executemany
        self._depth = 0

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    @contextmanager
    def transaction(self, *, shared: bool = False) -> Iterator["SQLiteDatabase"]:
        if self._depth:  # inside another transaction (a dry run): part of it
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        _retry_busy(lambda: self.conn.execute("BEGIN IMMEDIATE"), str(self.path))
        self._depth = 1
        try:
            yield self
        except BaseException:
            self._depth = 0
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        self._depth = 0
        try:
            self.conn.execute("COMMIT")
        except sqlite3.OperationalError as e:
            # a failed COMMIT (disk full, I/O error) leaves the transaction open: end it, and say what happened
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            if "full" in str(e) or "disk I/O" in str(e):
                raise StoreError(f"cannot write the database: {e}; nothing of this transaction was recorded") from None
            raise

    def lock(self, key: str) -> None:
        pass  # BEGIN IMMEDIATE already made us the only writer

    def clock(self) -> float:
        return time.time()

    def notify(self) -> None:
        pass  # other connections see data_version change on their own

    def watcher(self) -> "DataVersionWatcher":
        return DataVersionWatcher(_open(self.path))

    def sibling(self) -> "SQLiteDatabase":
        return SQLiteDatabase(self.path, _open(self.path))

    def integrity(self) -> list[str]:
        rows = [r[0] for r in self.conn.execute("PRAGMA quick_check")]
        return [] if rows == ["ok"] else rows

    def has_table(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None

    def retryable(self, e: BaseException) -> bool:
        return False  # writers are serialised before they read anything: nothing to retry

    def reconnect(self) -> None:
        pass

    def data_version(self) -> int:
        return self.conn.execute("PRAGMA data_version").fetchone()[0]

    def close(self) -> None:
        self.conn.close()


class DataVersionWatcher:
    """Polls data_version, which changes whenever any other connection commits."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.seen = self._now()

    def _now(self) -> int:
        return self.conn.execute("PRAGMA data_version").fetchone()[0]

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            now = self._now()
            if now != self.seen:
                self.seen = now
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(WATCH_POLL, left))

    def reconnect(self) -> None:
        pass

    def close(self) -> None:
        self.conn.close()


def _open(path: Path) -> sqlite3.Connection:
    def attempt() -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode: a process crash loses nothing; a power cut may roll back
            # the last commits, whose tasks then run again (at-least-once still holds).
            conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            conn.close()
            raise
        return conn

    try:
        return _retry_busy(attempt, str(path))
    except sqlite3.DatabaseError as e:
        raise StoreError(explain(e, path) or f"{path}: {e}") from None
    except UnicodeDecodeError:  # its schema text is not UTF-8: damaged bytes
        raise StoreError(f"{path}: the database is damaged (its schema is not readable text); restore it from a "
                         f"backup") from None


def connect(db_dir: str, *, create: bool = False, objects_hint: str | None = None) -> SQLiteDatabase:
    d = Path(db_dir)
    path = db_file(d)
    if d.exists() and not d.is_dir():
        raise StoreError(f"{d}: is a file, not a store directory; -db names the directory that holds the store")
    fsutil.check_private(str(d), "store directory")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise StoreError(f"{path}: cannot read: {e.strerror}") from None
    if st is None:
        if not create:
            raise StoreError(f"{d}: no store here; create one with 'task-pipeline run -manifest M -db {d}', "
                             f"or pass the right -db")
        try:
            fsutil.make_dirs(str(d), 0o750)
        except OSError as e:
            raise StoreError(f"{d}: cannot create the store directory: {e.strerror}") from None
    else:
        import stat

        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{path}: is not a regular file (a symlink or something else), so it is not a "
                             f"task-pipeline database; point -db elsewhere")
        if st.st_uid != os.geteuid() or st.st_mode & stat.S_IWOTH:
            fsutil.check_private(str(d), "store directory")  # the directory is fine; say what is wrong with the file
            raise StoreError(f"{path}: the database file belongs to another user or is writable by everyone "
                             f"(mode {stat.S_IMODE(st.st_mode):o}); fix with: chown $(id -un) {path}; chmod 600 {path}")
        if st.st_size == 0 and not create:
            raise StoreError(f"{path}: the database file is empty (0 bytes), so this store's state is lost; "
                             f"restore it from a backup (nothing was changed)")
    if create and (st is None or st.st_size == 0) and objects_hint:
        if has_objects(objects_hint):
            what = "is empty (0 bytes)" if st is not None else "is missing"
            raise StoreError(f"{path}: the database {what}, but {objects_hint} holds objects: this store's state is "
                             f"lost; restore the database from a backup, or point -db elsewhere (nothing was changed)")
    db = SQLiteDatabase(path, _open(path))
    if st is None:
        try:
            os.chmod(path, 0o600)
        except OSError:
            pass
    return db


def explain(exc: BaseException, path: Path | str | None = None) -> str | None:
    """One line for a sqlite3 error, saying what to do; None for anything else."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return None
    text = str(exc)
    where = f"{path}: " if path else ""
    if _busy(exc):
        return (f"{where}the database is busy (another process holds its lock); try again once it is done "
                f"({text})")
    if "readonly" in text or "read-only" in text:
        return (f"{where}cannot write the database: the store is read-only here (file permissions or a "
                f"read-only filesystem); run as the store's owner or make it writable")
    if "unable to open" in text:
        return f"{where}cannot open the database ({text}); check the path and its permissions"
    if "full" in text:
        return f"{where}cannot write the database: the disk is full; free some space and run again"
    if isinstance(exc, sqlite3.OperationalError) and "no such" in text:
        return (f"{where}the database lacks part of its schema ({text}): it is damaged or not a task-pipeline "
                f"store; run 'task-pipeline fsck', or restore it from a backup")
    return (f"{where}the database is damaged ({text}); run 'task-pipeline fsck', and restore it from a backup "
            f"if that confirms it")
