"""Shared fixtures: run the real CLI in a subprocess against a real store in tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["servers", "netns"]  # real PostgreSQL and S3 servers, network-namespace hosts


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 120,
            input: bytes | None = None) -> subprocess.CompletedProcess:
    """`task-pipeline ARGS...` as a user would type it; output captured as text."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    full_env.pop("TASK_PIPELINE_DB", None)
    return subprocess.run([sys.executable, "-m", "task_pipeline", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, timeout=timeout, input=input)


class CLI:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.db = tmp / "db"

    def manifest(self, text: str, name: str = "pipeline.toml") -> Path:
        p = self.tmp / name
        p.write_text(textwrap.dedent(text))
        return p

    def __call__(self, *args, **kw) -> subprocess.CompletedProcess:
        r = run_cli(*args, cwd=self.tmp, **kw)
        r.out = r.stdout.decode("utf-8", "replace")
        r.err = r.stderr.decode("utf-8", "replace")
        return r

    def run(self, manifest: Path, *extra, **kw) -> subprocess.CompletedProcess:
        return self("-manifest", manifest, "-db", self.db, "-run", *extra, **kw)

    def ok(self, *args, **kw) -> subprocess.CompletedProcess:
        r = self(*args, **kw)
        assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.out}\nstderr: {r.err}"
        return r


@pytest.fixture
def cli(tmp_path: Path) -> CLI:
    return CLI(tmp_path)
