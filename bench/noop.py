#!/usr/bin/env python3
"""A no-op `-run` on a big store: the cost must not grow with the store (issue 6, target 2).

Builds stores holding N done tasks (rows inserted in bulk, as a long history of runs
would leave them), then times `task-pipeline -manifest M -db D -run` that finds
nothing to do, end to end as a user sees it, next to the bare interpreter start-up
measured in the same run.

    python bench/noop.py --tasks 100000 1000000
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from task_pipeline import state  # noqa: E402
from task_pipeline.manifest import parse_manifest  # noqa: E402

MANIFEST = """
[[step]]
name = "start"
start = true
script = 'echo hi > "$OUTPUT_DIR/process_1"'

[[step]]
name = "process"
script = 'tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"'
"""


def build(db: Path, manifest: Path, n: int) -> None:
    conn = state.connect(db, create=True)
    state.register(conn, parse_manifest(manifest.read_text(), file=str(manifest), base_dir=manifest.parent))
    state.seed_start(conn, ["start"], "")
    pipe = state.load_pipeline(conn)
    start_id, proc_id = pipe.steps["start"].step_id, pipe.steps["process"].step_id
    now = time.time()
    conn.execute("UPDATE task SET state='done', attempts=1, finished_at=? WHERE step_id=?", (now, start_id))
    parent = conn.execute("SELECT id FROM task WHERE step_id=?", (start_id,)).fetchone()[0]
    batch = 50_000
    for lo in range(0, n, batch):
        with state.transaction(conn):
            rows = [(proc_id, f"process_{i}", f"{i:064x}", parent, now) for i in range(lo, min(lo + batch, n))]
            conn.executemany(
                """INSERT INTO task(step_id, input_name, input_hash, parent_id, state, attempts, created_at, finished_at)
                   VALUES (?,?,?,?,'done',1,?,?)""", [(*r, now) for r in rows])
            conn.executemany("INSERT OR IGNORE INTO object(hash, size) VALUES (?, 21)", [(r[2],) for r in rows])
            conn.execute(
                """INSERT INTO output(task_id, name, hash, key)
                   SELECT id, 'done_' || input_name, input_hash, 'done' FROM task WHERE step_id=? AND id > ?""",
                (proc_id, conn.execute("SELECT coalesce(max(task_id), 0) FROM output").fetchone()[0]))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def timed(cmd: list[str], repeat: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            sys.exit(f"command failed: {' '.join(cmd)}\n{r.stderr.decode()}")
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, nargs="+", default=[100_000])
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    py = timed([sys.executable, "-c", "pass"], a.repeat)
    imp = timed([sys.executable, "-c", "import task_pipeline.commands"], a.repeat)
    print(f"# median of {a.repeat}; python start-up {py * 1000:.0f} ms, importing task-pipeline {imp * 1000:.0f} ms")
    print(f"{'done tasks':>11} {'build s':>8} {'no-op run ms':>13} {'of which not start-up':>22}")
    for n in a.tasks:
        with tempfile.TemporaryDirectory(prefix="tp-noop-") as d:
            db, m = Path(d) / "db", Path(d) / "m.toml"
            m.write_text(MANIFEST)
            t0 = time.perf_counter()
            build(db, m, n)
            built = time.perf_counter() - t0
            run = timed([sys.executable, "-m", "task_pipeline", "-manifest", str(m), "-db", str(db), "-run", "-quiet"],
                        a.repeat)
            print(f"{n:>11} {built:>8.1f} {run * 1000:>13.0f} {(run - imp) * 1000:>22.0f}")


if __name__ == "__main__":
    main()
