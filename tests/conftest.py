"""Shared fixtures: run the real CLI in a subprocess against a real store in tmp_path.

Modules marked `pytest.mark.backends` run every test that uses `cli` twice: on a store
directory (SQLite) and on PostgreSQL (see backends.py).
"""

from __future__ import annotations

import compileall
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import backends

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["servers", "netns"]  # real PostgreSQL and S3 servers, network-namespace hosts


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 120,
            input: bytes | None = None) -> subprocess.CompletedProcess:
    """`task-pipeline ARGS...` as a user would type it; output captured as text."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    full_env.pop("TASK_PIPELINE_DB", None)  # a store named in the caller's environment is not the test's
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "task_pipeline", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, timeout=timeout, input=input)


class CLI:
    def __init__(self, tmp: Path, backend: str = "sqlite", url: str | None = None,
                 env: dict | None = None) -> None:
        self.tmp = tmp
        self.db = tmp / "db"
        self.backend = backend
        self.url = url            # the PostgreSQL store's URL (no password in it)
        self.env = env or {}      # what the CLI needs to reach it (the password file)

    def argv(self, *args) -> list[str]:
        """The arguments as the CLI gets them: `-db DB` becomes the PostgreSQL store on that backend."""
        args = [str(a) for a in args]
        return backends.rewrite(args, self.db, self.url) if self.url else args

    def environ(self, env: dict | None = None) -> dict:
        return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **self.env, **(env or {})}

    def manifest(self, text: str, name: str = "pipeline.toml") -> Path:
        p = self.tmp / name
        p.write_text(textwrap.dedent(text))
        return p

    def __call__(self, *args, **kw) -> subprocess.CompletedProcess:
        kw["env"] = {**self.env, **(kw.get("env") or {})}
        r = run_cli(*self.argv(*args), cwd=self.tmp, **kw)
        r.out = r.stdout.decode("utf-8", "replace")
        r.err = r.stderr.decode("utf-8", "replace")
        return r

    def run(self, manifest: Path, *extra, **kw) -> subprocess.CompletedProcess:
        return self("-manifest", manifest, "-db", self.db, "-run", *extra, **kw)

    def ok(self, *args, **kw) -> subprocess.CompletedProcess:
        r = self(*args, **kw)
        assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.out}\nstderr: {r.err}"
        return r


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "backends: run each test on SQLite and on PostgreSQL")
    # The tests run the CLI a thousand times from the source tree; where PYTHONDONTWRITEBYTECODE is set
    # (as on this project's machines) each run would compile every module again (90 ms each time).
    compileall.compile_dir(str(ROOT / "task_pipeline"), quiet=1)


def pytest_generate_tests(metafunc) -> None:
    if "cli" in metafunc.fixturenames and metafunc.definition.get_closest_marker("backends"):
        metafunc.parametrize("cli", ["sqlite", "postgres"], indirect=True)


@pytest.fixture
def cli(request, tmp_path: Path):
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        yield CLI(tmp_path)
        return
    server = request.getfixturevalue("pg_server")
    name = server.create_database()
    c = CLI(tmp_path, "postgres", server.url(name),
            {"TASK_PIPELINE_DB_PASSWORD_FILE": str(server.password_file(tmp_path))})
    backends.register_pg(c.db, server.url(name, with_password=True))
    try:
        yield c
    finally:
        backends.forget(c.db)
        server.ensure_running()
        server.drop_database(name)


@pytest.fixture
def small_disk(cli):
    """The store on a 16 MiB tmpfs with 400 inodes (root only; skipped elsewhere)."""
    cli.db.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,nr_inodes=400,mode=0700", "tmpfs", str(cli.db)],
                       capture_output=True)
    if r.returncode != 0:
        cli.db.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield cli.db
    subprocess.run(["umount", "-l", str(cli.db)], check=False)


def fill(db: Path, leave: int) -> Path:
    filler = db / "filler"
    free = os.statvfs(db).f_bavail * os.statvfs(db).f_frsize
    with open(filler, "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        todo = free - leave
        while todo > 0:
            todo -= f.write(chunk[:min(len(chunk), todo)])
    return filler
