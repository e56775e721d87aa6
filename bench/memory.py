#!/usr/bin/env python3
"""Peak memory of `run` (issue 6, target 4): with 1,000,000 pending tasks, and with one 10 GiB output.

Peak RSS is the kernel's high-water mark (VmHWM in /proc/PID/status), sampled until the
process exits. The bare interpreter's figure is measured in the same run for comparison.

  pending  a store holding N pending tasks (bulk-inserted); `run` works on them for
           --seconds, then gets SIGTERM and drains
  big      a start step writes a sparse file of --big GiB (no disk used); `run` hashes it
           and moves it into the store

    python bench/memory.py --pending 1000000 --big 10
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from task_pipeline import state  # noqa: E402
from task_pipeline.db import open_database  # noqa: E402
from task_pipeline.manifest import parse_manifest  # noqa: E402
from task_pipeline.store import Store  # noqa: E402

PENDING = """
[[step]]
name = "process"
script = 'tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"'
"""

BIG = """
[[step]]
name = "start"
start = true
script = 'truncate -s {mib}M "$OUTPUT_DIR/done_big"'
"""


def peak_rss(cmd: list[str], stop_after: float | None = None) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of a command."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        if stop_after is not None and time.perf_counter() - t0 > stop_after:
            p.send_signal(signal.SIGTERM)
            stop_after = None
        time.sleep(0.02)
    err = p.stderr.read().decode()
    # a run stopped by SIGTERM exits 143 and says how much is left: that is the expected end here
    if p.returncode not in (0, 143) or (p.returncode == 143 and "interrupted by SIGTERM" not in err):
        sys.exit(f"failed ({p.returncode}): {err}")
    return peak / 1024, time.perf_counter() - t0


def build_pending(db: Path, manifest: Path, n: int) -> None:
    conn = open_database(str(db), create=True)
    state.register(conn, parse_manifest(manifest.read_text(), file=str(manifest), base_dir=manifest.parent))
    sid = state.load_pipeline(conn).steps["process"].step_id
    # the one input object all pending tasks share, stored as a run would store it
    (db / "tmp").mkdir(exist_ok=True)  # the scratch a run would make
    digest, size = Store.at(db).ingest_bytes(b"tiny input number 1\n")
    now = time.time()
    with conn.transaction():
        conn.execute("INSERT INTO object(hash, size) VALUES (?, ?) ON CONFLICT DO NOTHING", (digest, size))
    for lo in range(0, n, 100_000):
        with conn.transaction():
            conn.executemany("INSERT INTO task(step_id, input_name, input_hash, created_at) VALUES (?,?,?,?)",
                             [(sid, f"process_{i}", digest, now) for i in range(lo, min(lo + 100_000, n))])
    conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pending", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--big", type=float, default=10.0, help="GiB")
    a = ap.parse_args()
    base, _ = peak_rss([sys.executable, "-c", "import time; time.sleep(0.3)"])
    print(f"# bare python: {base:.0f} MB peak RSS")
    with tempfile.TemporaryDirectory(prefix="tp-mem-") as d:
        db, m = Path(d) / "db", Path(d) / "m.toml"
        m.write_text(PENDING)
        t0 = time.perf_counter()
        build_pending(db, m, a.pending)
        built = time.perf_counter() - t0
        rss, secs = peak_rss([sys.executable, "-m", "task_pipeline", "-manifest", str(m), "-db", str(db), "-run",
                              "-quiet", "-parallel", "2"], stop_after=a.seconds)
        print(f"{a.pending} pending tasks (built in {built:.0f}s): run for {secs:.1f}s then SIGTERM, "
              f"peak RSS {rss:.0f} MB")
    with tempfile.TemporaryDirectory(prefix="tp-mem-") as d:
        db, m = Path(d) / "db", Path(d) / "m.toml"
        m.write_text(BIG.format(mib=int(a.big * 1024)))
        rss, secs = peak_rss([sys.executable, "-m", "task_pipeline", "-manifest", str(m), "-db", str(db), "-run",
                              "-quiet"])
        print(f"one {a.big:g} GiB output: run took {secs:.1f}s ({a.big * (1 << 30) / secs / 1e9:.2f} GB/s), "
              f"peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
