#!/usr/bin/env python3
"""End-to-end throughput of tiny tasks against the process-spawn floor (issue 6, target 1).

A start step fans out to N files of 21 bytes (written with the shell's printf builtin,
so making them costs little); `process` runs `tr a-z A-Z` on each.
The baseline is `xargs -P2` running the same script over the same N files, measured in
the same run. Prints tasks/s for both and the ratio, as the median of --repeat runs.

    python bench/throughput.py --tasks 2000 20000 --parallel 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = 'tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"'

MANIFEST = """
[[step]]
name = "start"
start = true
script = '''
i=1
while [ $i -le {n} ]; do
  printf 'tiny input nr %07d' $i > "$OUTPUT_DIR/process_$i"
  i=$((i + 1))
done
'''

[[step]]
name = "process"
script = '{script}'
"""


def tp_run(work: Path, n: int, parallel: int, extra: list[str]) -> float:
    db = work / "db"
    shutil.rmtree(db, ignore_errors=True)
    m = work / "bench.toml"
    m.write_text(MANIFEST.format(n=n, script=SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "task_pipeline", "-manifest", str(m), "-db", str(db), "-run",
                    "-parallel", str(parallel), "-quiet", *extra], check=True, env=env)
    return time.perf_counter() - t0


def xargs_run(work: Path, n: int, parallel: int) -> float:
    src, out = work / "in", work / "out"
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    src.mkdir()
    out.mkdir()
    for i in range(1, n + 1):
        (src / f"process_{i}").write_bytes(f"tiny input nr {i:07d}".encode())
    names = "\n".join(f"process_{i}" for i in range(1, n + 1)).encode()
    cmd = ["xargs", f"-P{parallel}", "-I{}", "sh", "-c", 'tr a-z A-Z < "in/$1" > "out/done_$1"', "sh", "{}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, input=names, check=True, cwd=work)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, nargs="+", default=[2000])
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more task-pipeline flags")
    a = ap.parse_args()
    print(f"# {os.cpu_count()} CPUs, python {sys.version.split()[0]}, -parallel {a.parallel}, median of {a.repeat}")
    print(f"{'tasks':>7} {'xargs/s':>9} {'task-pipeline/s':>16} {'ratio':>6} {'us/task':>8}")
    for n in a.tasks:
        with tempfile.TemporaryDirectory(prefix="tp-bench-") as d:
            work = Path(d)
            xs, ts = [], []
            for _ in range(a.repeat):
                xs.append(xargs_run(work, n, a.parallel))
                ts.append(tp_run(work, n, a.parallel, a.extra))
            x, t = statistics.median(xs), statistics.median(ts)
            x_rate, t_rate = n / x, (n + 1) / t
            print(f"{n:>7} {x_rate:>9.0f} {t_rate:>16.0f} {t_rate / x_rate:>6.2f} {t / (n + 1) * 1e6:>8.0f}")


if __name__ == "__main__":
    main()
