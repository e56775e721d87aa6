"""Real servers for tests: a PostgreSQL cluster, started at most once per session on a free port,
and stopped and deleted at its end, also after failed or interrupted tests.

Owns: finding the server binaries, the unprivileged OS user PostgreSQL runs as (initdb and postgres
refuse root), the servers' throwaway directories (including those a killed earlier run left behind),
and the rule for a server that cannot be had: skip with a one-line install hint, or fail when
TASK_PIPELINE_REQUIRE_SERVERS=1 (CI sets it, so that a missing server never passes as a skip).

Fixtures: pg_server (session) with pg_url and pg_env (per test: a fresh database, the environment a
CLI subprocess needs). conftest.py registers this module for the whole suite (pytest_plugins).
"""

from __future__ import annotations

import itertools
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

REQUIRE_ENV = "TASK_PIPELINE_REQUIRE_SERVERS"
PG_BIN_ENV = "TASK_PIPELINE_PG_BIN"
PG_BIN_DEFAULT = "/usr/lib/postgresql/15/bin"
PG_OS_USER = "tp-test"
OWNER_FILE = "owner.pid"


def unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it under TASK_PIPELINE_REQUIRE_SERVERS=1."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def free_ports(n: int, host: str = "") -> list[int]:
    """n distinct ports free right now. All are held open together so that none is handed out twice;
    another process may still take one before the server binds it (servers retry with new ports)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _make_base(prefix: str) -> Path:
    """A new server directory marked with our pid, after reaping those of runs that died without
    their teardown (SIGKILL, a lost machine): their servers would otherwise run forever."""
    tmp = Path(tempfile.gettempdir())
    for old in tmp.glob(prefix + "*"):
        try:
            owner = int((old / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not marked (yet): not ours to judge
        if not pid_alive(owner):
            _reap(old)
    base = Path(tempfile.mkdtemp(prefix=prefix))
    (base / OWNER_FILE).write_text(str(os.getpid()))
    return base


def _reap(base: Path) -> None:
    # SIGQUIT is PostgreSQL's immediate shutdown, which takes its children along.
    for pidfile, kill in ((base / "data" / "postmaster.pid", lambda pid: os.kill(pid, signal.SIGQUIT)),):
        try:
            pid = int(pidfile.read_text().split()[0])
            # A recycled pid may now be someone else's process: kill it only if it runs in base.
            if str(base).encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            kill(pid)
        except (OSError, ValueError, IndexError):
            continue
        deadline = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    shutil.rmtree(base, ignore_errors=True)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


# ---------------------------------------------------------------- PostgreSQL


class PsqlError(RuntimeError):
    pass


def _pg_os_user() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as; None when we are not root and so can run it ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(PG_OS_USER)
    except KeyError:
        try:
            r = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
                                "/nonexistent", "--shell", "/usr/sbin/nologin", PG_OS_USER],
                               capture_output=True, text=True)
            err = r.stderr.strip()
        except OSError as e:
            err = str(e)
        try:
            # Also when useradd failed: a parallel session may have created the user first.
            pw = pwd.getpwnam(PG_OS_USER)
        except KeyError:
            unavailable(f"PostgreSQL must run as an unprivileged user and `useradd {PG_OS_USER}` failed "
                        f"({err}); run the tests as a non-root user, or make useradd work")
    return pw.pw_uid, pw.pw_gid


class PgServer:
    """A PostgreSQL cluster in a temporary directory, reached over TCP with a password (the way
    runners on other hosts reach it); the unix socket is left to pg_ctl."""

    host = "127.0.0.1"
    user = "postgres"

    def __init__(self, bin_dir: Path, base: Path, os_user: tuple[int, int] | None) -> None:
        self.bin_dir = bin_dir
        self.base = base
        self.data = base / "data"
        self.socket_dir = base / "sock"
        self.logfile = base / "postgres.log"
        self.password = secrets.token_hex(16)
        self.port = 0
        self._os_user = os_user
        self._db_numbers = itertools.count(1)

    # -- life cycle

    def _as_server_user(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        kw = {}
        if self._os_user is not None:
            kw = {"user": self._os_user[0], "group": self._os_user[1], "extra_groups": []}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(HOME=str(self.base), LC_ALL="C")
        return subprocess.run([str(self.bin_dir / argv[0]), *argv[1:]], cwd=self.base, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, **kw)

    def _chown(self, *paths: Path) -> None:
        if self._os_user is not None:
            for p in paths:
                os.chown(p, *self._os_user)

    def init(self) -> None:
        self.socket_dir.mkdir()
        pwfile = self.base / "initdb-password"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        self._chown(self.base, self.socket_dir, pwfile)
        r = self._as_server_user("initdb", "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}",
                                 "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                                 "--locale=C", "--no-sync", "--no-instructions")
        pwfile.unlink()
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        # Runners in network namespaces come from their veth address (tests/netns.py uses 10.231.N.2).
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
            "host all all 10.0.0.0/8 scram-sha-256\n")
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\ninclude 'task_pipeline_tests.conf'\n")

    def _configure(self, port: int) -> None:
        self.port = port
        conf = self.data / "task_pipeline_tests.conf"
        # Durability is worth nothing in a throwaway cluster; fsync alone costs seconds per test.
        conf.write_text(
            f"port = {port}\n"
            "listen_addresses = '*'\n"
            f"unix_socket_directories = {_quote_literal(str(self.socket_dir))}\n"
            "fsync = off\n"
            "synchronous_commit = off\n"
            "full_page_writes = off\n"
            "max_connections = 200\n"
            "shared_buffers = 16MB\n"
            "max_wal_size = 256MB\n"
            "log_min_messages = warning\n"
            "log_connections = off\n")
        self._chown(conf)

    def _pg_ctl_start(self) -> str:
        """Start the server and wait until it accepts connections; returns what it logged meanwhile."""
        offset = self.logfile.stat().st_size if self.logfile.exists() else 0
        r = self._as_server_user("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60", "start")
        with open(self.logfile, errors="replace") as f:
            f.seek(offset)
            logged = f.read()
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed ({r.returncode}): {r.stdout}{r.stderr}\n"
                               f"{self.logfile}:\n{logged[-3000:]}")
        return logged

    def start(self) -> None:
        self._pg_ctl_start()
        self.psql("SELECT 1")  # pg_ctl waited on the socket; this proves TCP and the password too

    def start_on_free_port(self, attempts: int = 3) -> None:
        for attempt in range(attempts):
            last = attempt + 1 == attempts
            # Another process may take the port between our probe and postgres' bind: then retry.
            self._configure(free_ports(1)[0])
            try:
                logged = self._pg_ctl_start()
            except RuntimeError as e:
                if last or "could not bind" not in str(e):
                    raise
                continue
            if "could not bind" not in logged:
                self.psql("SELECT 1")
                return
            # listen_addresses='*' comes up if any one address could be bound; with 127.0.0.1 taken,
            # our clients would reach whatever holds it.
            self.stop("immediate")
            if last:
                raise RuntimeError(f"postgres could not bind port {self.port}:\n{logged[-3000:]}")

    def stop(self, mode: str = "fast") -> None:
        r = self._as_server_user("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl stop -m {mode} failed ({r.returncode}): {r.stdout}{r.stderr}")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def running(self) -> bool:
        return self._as_server_user("pg_ctl", "-D", str(self.data), "status").returncode == 0

    def ensure_running(self) -> None:
        """For teardowns: a test that stopped the server and then failed must not take it down for
        the rest of the session."""
        if not self.running():
            self.start()

    def close(self) -> None:
        try:
            if self.data.is_dir() and self.running():
                self.stop("immediate")
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            pid = self.postmaster_pid()
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        shutil.rmtree(self.base, ignore_errors=True)

    # -- clients

    def url(self, dbname: str = "postgres", with_password: bool = False, host: str | None = None) -> str:
        """postgresql://postgres@127.0.0.1:PORT/DBNAME. The password goes in only for fixtures'
        own use: the product is meant to read it from TASK_PIPELINE_DB_PASSWORD_FILE. `host`: the
        address to reach the server at (a NetHost's gateway)."""
        auth = self.user
        if with_password:
            auth += ":" + urllib.parse.quote(self.password, safe="")
        return f"postgresql://{auth}@{host or self.host}:{self.port}/{urllib.parse.quote(dbname, safe='')}"

    def password_file(self, directory: Path) -> Path:
        """A file holding just the password, for TASK_PIPELINE_DB_PASSWORD_FILE."""
        path = Path(directory) / "pg-password"
        path.write_text(self.password + "\n")
        path.chmod(0o600)
        return path

    def psql(self, sql: str, db: str = "postgres") -> str:
        """Run SQL (statements one by one, as psql does with a script) and return the unaligned,
        tuples-only output; raise PsqlError on any error."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGPASSWORD=self.password, PGCONNECT_TIMEOUT="10")
        r = subprocess.run([str(self.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                            "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", db, "-f", "-"],
                           input=sql, env=env, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise PsqlError(f"psql -d {db} failed ({r.returncode}): {r.stderr.strip()}\nSQL: {sql}")
        return r.stdout.rstrip("\n")

    def create_database(self, name: str | None = None) -> str:
        # template0: nothing a test left in template1 leaks into the next database. FILE_COPY: no
        # WAL for the copy, and its checkpoint is cheap with fsync off.
        name = name or f"tp_test_{next(self._db_numbers)}"
        self.psql(f"CREATE DATABASE {_quote_ident(name)} TEMPLATE template0 STRATEGY FILE_COPY")
        return name

    def drop_database(self, name: str) -> None:
        self.psql(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def pids(self, dbname: str | None = None) -> list[int]:
        """Backend pids of client sessions (of one database, or all), this query's own excluded."""
        where = "backend_type = 'client backend' AND pid <> pg_backend_pid()"
        if dbname is not None:
            where += f" AND datname = {_quote_literal(dbname)}"
        out = self.psql(f"SELECT pid FROM pg_stat_activity WHERE {where} ORDER BY pid")
        return [int(x) for x in out.split()]

    def kill_backends(self, dbname: str, timeout: float = 10) -> list[int]:
        """Terminate every session of a database, as a lost connection would, and wait until they
        are gone, so that a client's next use fails rather than racing the signal."""
        # MATERIALIZED: the planner may otherwise call pg_terminate_backend before it filters rows,
        # on every session, this one included.
        out = self.psql("WITH victims AS MATERIALIZED (SELECT pid FROM pg_stat_activity "
                        f"WHERE datname = {_quote_literal(dbname)} AND pid <> pg_backend_pid()) "
                        "SELECT pid FROM victims WHERE pg_terminate_backend(pid) ORDER BY pid")
        killed = [int(x) for x in out.split()]
        deadline = time.monotonic() + timeout
        while set(killed) & set(self.pids(dbname)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"backends {killed} of {dbname} still there after {timeout}s")
            time.sleep(0.05)
        return killed


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    bin_dir = Path(os.environ.get(PG_BIN_ENV, PG_BIN_DEFAULT))
    missing = [n for n in ("initdb", "pg_ctl", "postgres", "psql") if not os.access(bin_dir / n, os.X_OK)]
    if missing:
        unavailable(f"PostgreSQL binaries missing in {bin_dir} ({', '.join(missing)}): "
                    f"apt-get install postgresql-15, or point {PG_BIN_ENV} at another bin directory")
    os_user = _pg_os_user()
    server = PgServer(bin_dir, _make_base("task-pipeline-pg-"), os_user)
    try:
        server.init()
        server.start_on_free_port()
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """URL (no password in it) of a fresh database, dropped after the test."""
    name = pg_server.create_database()
    yield pg_server.url(name)
    pg_server.ensure_running()
    pg_server.drop_database(name)


@pytest.fixture
def pg_env(pg_server: PgServer, tmp_path: Path) -> dict[str, str]:
    """Environment for a CLI subprocess talking to pg_server. PGPASSWORD is deliberately absent:
    the product must find the password through this file (or the URL)."""
    return {"TASK_PIPELINE_DB_PASSWORD_FILE": str(pg_server.password_file(tmp_path))}
