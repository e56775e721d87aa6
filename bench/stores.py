"""Stores for the benchmarks: a SQLite store directory, or a database on a real PostgreSQL server.

Not a benchmark itself. The PostgreSQL server is the test suite's (tests/servers.py: a throwaway
cluster run as an unprivileged user, on a free port, reached over TCP with a password), started
once per benchmark run. It starts with fsync=off, synchronous_commit=off and full_page_writes=off,
as the tests want it; `durable(server, True)` restarts it with all three on (ALTER SYSTEM, which
postgresql.auto.conf applies over the tests' settings).

A `BenchStore` is what a benchmark needs to name one store: the CLI arguments and environment
for `task-pipeline` subprocesses (`cli_env`), and `open()` for building it in bulk through the
Database API.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SQLITE, POSTGRES = "sqlite", "postgresql"


@dataclass
class BenchStore:
    kind: str                 # SQLITE or POSTGRES
    db: str                   # the store directory, or a postgresql:// URL (no password in it)
    args: list[str]           # what follows `task-pipeline COMMAND` to name this store
    env: dict[str, str] = field(default_factory=dict)   # beside os.environ, for task-pipeline subprocesses
    objects: Path | None = None
    password_file: str | None = None
    dbname: str | None = None  # the PostgreSQL database, to drop it afterwards

    def open(self):
        """A `Database` on this store, creating it when new (as `task-pipeline run` would)."""
        from task_pipeline.db import open_database

        return open_database(self.db, create=True, objects_hint=str(self.objects) if self.objects else None,
                             password_file=self.password_file)

    def cli_env(self) -> dict[str, str]:
        return cli_env(self.env)


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of task-pipeline subprocesses: this checkout first on the path, and bytecode
    cached as an installed package has it (outside the work tree), even where the caller's
    environment says PYTHONDONTWRITEBYTECODE, which would make every start compile task-pipeline."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra or {})}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = os.path.join(tempfile.gettempdir(), f"task-pipeline-bench-pycache-{os.geteuid()}")
    return env


def sqlite_store(directory: Path) -> BenchStore:
    """A fresh SQLite store in `directory` (removed first if it exists)."""
    shutil.rmtree(directory, ignore_errors=True)
    return BenchStore(SQLITE, str(directory), ["-db", str(directory)])


def postgres_store(server, directory: Path) -> BenchStore:
    """A fresh database on `server`, with objects and scratch under `directory` (emptied first)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    name = server.create_database()
    url = server.url(name)
    pw = str(server.password_file(directory))
    objects, scratch = directory / "objects", directory / "scratch"
    return BenchStore(POSTGRES, url, ["-db", url, "--objects", str(objects), "--scratch", str(scratch)],
                      {"TASK_PIPELINE_DB_PASSWORD_FILE": pw}, objects, pw, name)


def drop(server, store: BenchStore) -> None:
    if store.dbname is not None:
        server.drop_database(store.dbname)


def start_postgres():
    """A running PostgreSQL server (tests/servers.py's PgServer); close() it when done."""
    sys.path.insert(0, str(ROOT / "tests"))
    from servers import PG_BIN_DEFAULT, PG_BIN_ENV, PgServer, _make_base, _pg_os_user  # noqa: E402

    bin_dir = Path(os.environ.get(PG_BIN_ENV, PG_BIN_DEFAULT))
    if not os.access(bin_dir / "postgres", os.X_OK):
        sys.exit(f"PostgreSQL binaries missing in {bin_dir}: apt-get install postgresql-15, "
                 f"or point {PG_BIN_ENV} at another bin directory")
    server = PgServer(bin_dir, _make_base("task-pipeline-bench-pg-"), _pg_os_user())
    try:
        server.init()
        server.start_on_free_port()
    except BaseException:
        server.close()
        raise
    return server


def durable(server, on: bool) -> None:
    """Restart the server with fsync, synchronous_commit and full_page_writes on (or back as the tests have them)."""
    if on:
        server.psql("ALTER SYSTEM SET fsync = on; ALTER SYSTEM SET synchronous_commit = on; "
                    "ALTER SYSTEM SET full_page_writes = on")
    else:
        server.psql("ALTER SYSTEM RESET fsync; ALTER SYSTEM RESET synchronous_commit; "
                    "ALTER SYSTEM RESET full_page_writes")
    server.restart()
    got = server.psql("SELECT current_setting('fsync') || ' ' || current_setting('synchronous_commit')")
    want = "on on" if on else "off off"
    if got.split() != want.split():
        raise RuntimeError(f"PostgreSQL did not take the settings: fsync, synchronous_commit = {got}")


def settings(server) -> str:
    """The settings that matter for speed, as the server has them now."""
    return server.psql("SELECT string_agg(name || '=' || setting, ', ' ORDER BY name) FROM pg_settings WHERE name IN "
                       "('fsync', 'synchronous_commit', 'full_page_writes', 'shared_buffers', 'server_version')")
