"""The test servers themselves (tests/servers.py): what later PostgreSQL tests will rely on, checked
against the real server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import psycopg
import pytest

from servers import PgServer, PsqlError

ROOT = Path(__file__).resolve().parent.parent


def dbname(url: str) -> str:
    return urllib.parse.urlsplit(url).path.lstrip("/")


def connect(url: str, password: str, **kw) -> psycopg.Connection:
    return psycopg.connect(url, password=password, connect_timeout=5, autocommit=True, **kw)


# ---------------------------------------------------------------- PostgreSQL


def test_connect_with_url_and_password_file(pg_server: PgServer, pg_url: str, pg_env: dict,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing in our own environment may supply the password behind the URL's back.
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent")
    assert "PGPASSWORD" not in pg_env
    split = urllib.parse.urlsplit(pg_url)
    assert (split.scheme, split.hostname, split.port, split.username, split.password) == (
        "postgresql", "127.0.0.1", pg_server.port, "postgres", None)

    password = Path(pg_env["TASK_PIPELINE_DB_PASSWORD_FILE"]).read_text().strip()
    with connect(pg_url, password) as conn:
        row = conn.execute("SELECT current_database(), current_user, inet_server_port()").fetchone()
    assert row == (dbname(pg_url), "postgres", pg_server.port)

    # TCP needs the password (scram-sha-256), and the right one.
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(pg_url, connect_timeout=5).close()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(pg_url, "wrong" + password).close()
    with psycopg.connect(pg_server.url(dbname(pg_url), with_password=True), connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_create_and_drop_database(pg_server: PgServer) -> None:
    t = time.monotonic()
    a = pg_server.create_database()
    created_in = time.monotonic() - t
    b = pg_server.create_database()
    assert a != b
    listed = f"SELECT datname FROM pg_database WHERE datname IN ('{a}', '{b}') ORDER BY datname"
    assert pg_server.psql(listed).split() == sorted([a, b])
    pg_server.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (41), (1)", db=a)
    assert pg_server.psql("SELECT sum(x) FROM t", db=a) == "42"
    assert pg_server.psql("SELECT count(*) FROM pg_tables WHERE tablename = 't'", db=b) == "0"

    # Dropped even with a session still open in it.
    with connect(pg_server.url(a), pg_server.password) as conn:
        conn.execute("SELECT 1")
        pg_server.drop_database(a)
    pg_server.drop_database(b)
    assert pg_server.psql(listed) == ""
    with pytest.raises(PsqlError, match="does not exist"):
        pg_server.psql("SELECT 1", db=a)
    print(f"create_database: {created_in * 1000:.0f} ms")


def test_restart_keeps_data_and_new_connections_work(pg_server: PgServer, pg_url: str) -> None:
    conn = connect(pg_url, pg_server.password)
    conn.execute("CREATE TABLE t (x int)")
    conn.execute("INSERT INTO t SELECT generate_series(1, 100)")
    before = pg_server.postmaster_pid()

    t = time.monotonic()
    pg_server.restart()
    restarted_in = time.monotonic() - t
    assert pg_server.postmaster_pid() not in (None, before)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    with connect(pg_url, pg_server.password) as conn:
        assert conn.execute("SELECT sum(x) FROM t").fetchone() == (5050,)

    # A crash (immediate stop: no checkpoint) loses nothing committed either.
    pg_server.stop("immediate")
    assert not pg_server.running()
    with pytest.raises(psycopg.OperationalError):
        connect(pg_url, pg_server.password)
    pg_server.start()
    assert pg_server.psql("SELECT count(*) FROM t", db=dbname(pg_url)) == "100"
    print(f"restart: {restarted_in * 1000:.0f} ms")


def test_kill_backends_breaks_open_connections_of_that_database_only(pg_server: PgServer, pg_url: str) -> None:
    db = dbname(pg_url)
    victim = connect(pg_url, pg_server.password)
    bystander = connect(pg_server.url("postgres"), pg_server.password)
    assert victim.info.backend_pid in pg_server.pids(db)
    assert bystander.info.backend_pid not in pg_server.pids(db)
    assert bystander.info.backend_pid in pg_server.pids()

    assert pg_server.kill_backends(db) == [victim.info.backend_pid]
    with pytest.raises(psycopg.OperationalError):
        victim.execute("SELECT 1")
    assert victim.closed
    assert bystander.execute("SELECT 1").fetchone() == (1,)
    bystander.close()
    with connect(pg_url, pg_server.password) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (db,)
    assert pg_server.kill_backends(db) == []


# ---------------------------------------------------------------- no server: skip, or fail in CI


def test_missing_servers_skip_or_fail_under_require_servers(tmp_path: Path) -> None:
    (tmp_path / "test_needs_servers.py").write_text("def test_pg(pg_server): pass\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "TASK_PIPELINE_PG_BIN": str(tmp_path / "nope")}
    env.pop("TASK_PIPELINE_REQUIRE_SERVERS", None)
    # Without hypothesis's plugin, whose import alone takes a second.
    argv = [sys.executable, "-m", "pytest", "-q", "-rsE", "-p", "servers", "-p", "no:cacheprovider",
            "-p", "no:hypothesispytest", str(tmp_path / "test_needs_servers.py")]

    skipped = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert skipped.returncode == 0, skipped.stdout
    assert "1 skipped" in skipped.stdout
    assert "apt-get install postgresql-15" in skipped.stdout

    failed = subprocess.run(argv, cwd=tmp_path, env={**env, "TASK_PIPELINE_REQUIRE_SERVERS": "1"},
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1, failed.stdout
    assert "1 error" in failed.stdout and "skipped" not in failed.stdout
    assert "apt-get install postgresql-15" in failed.stdout
