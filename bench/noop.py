#!/usr/bin/env python3
"""A no-op `run` on a big store: the cost must not grow with the store (issue 6, target 2).

Builds stores holding N done tasks (rows inserted in bulk, as a long history of runs
would leave them), then times `task-pipeline run M -db D` that finds nothing to do,
end to end as a user sees it, next to the bare interpreter start-up and the import of
task-pipeline measured in the same run. On SQLite (a store directory) by default; with
`--backends sqlite postgresql` also on a real PostgreSQL server (the test suite's
throwaway cluster, run with fsync off; the store's tables are VACUUM ANALYZEd after the
bulk load, as autovacuum would have done to a store that grew over time).

    python bench/noop.py --tasks 100000 1000000
    python bench/noop.py --tasks 100000 --backends sqlite postgresql
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stores import POSTGRES, SQLITE, BenchStore, cli_env, drop, postgres_store, sqlite_store, start_postgres  # noqa: E402

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

BATCH = 50_000


def build(store: BenchStore, manifest: Path, n: int) -> None:
    """Register the manifest, mark its start task done, and add n done tasks of `process`, each with
    its object and output row, in transactions of BATCH tasks."""
    db = store.open()
    try:
        state.register(db, parse_manifest(manifest.read_text(), file=str(manifest), base_dir=manifest.parent))
        state.seed_start(db, ["start"], "")
        pipe = state.load_pipeline(db)
        start_id, proc_id = pipe.steps["start"].step_id, pipe.steps["process"].step_id
        now = time.time()
        with db.transaction():
            db.execute("UPDATE task SET state='done', attempts=1, finished_at=? WHERE step_id=?", (now, start_id))
        parent = db.execute("SELECT id FROM task WHERE step_id=?", (start_id,)).fetchone()[0]
        for lo in range(0, n, BATCH):
            rows = [(proc_id, f"process_{i}", f"{i:064x}", parent, now, now) for i in range(lo, min(lo + BATCH, n))]
            with db.transaction():
                last = db.execute("SELECT coalesce(max(task_id), 0) FROM output").fetchone()[0]
                if store.kind == POSTGRES:
                    _copy_pg(db, rows)
                else:
                    db.executemany(
                        """INSERT INTO task(step_id, input_name, input_hash, parent_id, state, attempts, created_at,
                                            finished_at) VALUES (?,?,?,?,'done',1,?,?)""", rows)
                    db.executemany("INSERT INTO object(hash, size) VALUES (?, 21) ON CONFLICT DO NOTHING",
                                   [(r[2],) for r in rows])
                db.execute(
                    """INSERT INTO output(task_id, name, hash, key)
                       SELECT id, 'done_' || input_name, input_hash, 'done' FROM task WHERE step_id=? AND id > ?""",
                    (proc_id, last))
        if store.kind == POSTGRES:
            for table in ("task", "output", "object", "attempt", "step", "step_current", "meta", "runner"):
                db.execute(f"VACUUM ANALYZE {table}")  # outside a transaction: the connection is in autocommit
        else:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


def _copy_pg(db, rows: list[tuple]) -> None:
    """COPY the rows in (the Database API has no bulk load; the driver's psycopg connection does)."""
    with db.conn.cursor() as cur:
        with cur.copy("COPY task(step_id, input_name, input_hash, parent_id, state, attempts, created_at, "
                      "finished_at) FROM STDIN") as cp:
            for step_id, name, h, parent, created, finished in rows:
                cp.write_row((step_id, name, h, parent, "done", 1, created, finished))
        with cur.copy("COPY object(hash, size) FROM STDIN") as cp:
            for r in rows:
                cp.write_row((r[2], 21))


def timed(cmd: list[str], repeat: int, env: dict[str, str] | None = None) -> float:
    """Median wall time of `repeat` runs of cmd, which must succeed."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            sys.exit(f"command failed: {' '.join(cmd)}\n{r.stderr.decode()}")
    return statistics.median(times)


def noop_run(store: BenchStore, manifest: Path, repeat: int) -> float:
    return timed([sys.executable, "-m", "task_pipeline", "run", str(manifest), *store.args, "-quiet"], repeat,
                 store.cli_env())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, nargs="+", default=[100_000])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--backends", nargs="+", choices=(SQLITE, POSTGRES), default=[SQLITE])
    a = ap.parse_args()
    env = cli_env()
    py = timed([sys.executable, "-c", "pass"], a.repeat, env)
    imp = {SQLITE: timed([sys.executable, "-c", "import task_pipeline.commands"], a.repeat, env)}
    if POSTGRES in a.backends:
        imp[POSTGRES] = timed([sys.executable, "-c", "import task_pipeline.commands, psycopg"], a.repeat, env)
    server = start_postgres() if POSTGRES in a.backends else None
    try:
        print(f"# median of {a.repeat}; python start-up {py * 1000:.0f} ms, importing task-pipeline "
              f"{imp[SQLITE] * 1000:.0f} ms"
              + (f" (with psycopg {imp[POSTGRES] * 1000:.0f} ms); PostgreSQL with fsync off" if server else ""))
        print(f"{'backend':>10} {'done tasks':>11} {'build s':>8} {'no-op run ms':>13} {'of which not start-up':>22}")
        for n in a.tasks:
            for kind in a.backends:
                with tempfile.TemporaryDirectory(prefix="tp-noop-") as d:
                    m = Path(d) / "m.toml"
                    m.write_text(MANIFEST)
                    store = sqlite_store(Path(d) / "db") if kind == SQLITE else postgres_store(server, Path(d) / "pg")
                    t0 = time.perf_counter()
                    build(store, m, n)
                    built = time.perf_counter() - t0
                    run = noop_run(store, m, a.repeat)
                    print(f"{kind:>10} {n:>11} {built:>8.1f} {run * 1000:>13.0f} {(run - imp[kind]) * 1000:>22.0f}")
                    if server:
                        drop(server, store)
    finally:
        if server:
            server.close()


if __name__ == "__main__":
    main()
