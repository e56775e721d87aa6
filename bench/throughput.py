#!/usr/bin/env python3
"""End-to-end throughput of tiny tasks against the process-spawn floor (issues 6 and 13).

A start step fans out to N files of 21 bytes (written with the shell's printf builtin,
so making them costs little); `process` runs `tr a-z A-Z` on each, from an empty store.
The baseline is `xargs -P2` running the same script over the same N files (made before
its clock starts), measured in the same run. Prints tasks/s for both, the ratio, and
the CPU our own process used per task (user + system), as medians of --repeat runs,
alternated; with several --parallel values, a row for each.

    python bench/throughput.py --tasks 2000 20000 --parallel 2 4
"""

from __future__ import annotations

import argparse
import compileall
import os
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


def compile_package() -> None:
    """Bytecode for the package, as an installed one has: with PYTHONDONTWRITEBYTECODE set (as on this
    project's machines), every run would compile the sources again, 90 ms of each run's start."""
    compileall.compile_dir(str(ROOT / "task_pipeline"), quiet=1)


# runs the CLI and reports the CPU of its own process (RUSAGE_CHILDREN here would count its scripts too)
SELF_CPU = """
import resource, runpy, sys
sys.argv[0] = "task_pipeline"
try:
    runpy.run_module("task_pipeline", run_name="__main__")
finally:
    r = resource.getrusage(resource.RUSAGE_SELF)
    print(f"SELF {r.ru_utime} {r.ru_stime}", file=sys.stderr)
"""


def tp_run(work: Path, n: int, parallel: int, extra: list[str], env: dict | None = None) -> tuple[float, float, float]:
    """Seconds of wall time, and the user and system CPU seconds of the run's own process."""
    db = work / "db"
    m = work / "bench.toml"
    m.write_text(MANIFEST.format(n=n, script=SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", SELF_CPU, "-manifest", str(m), "-db", str(db), "-run",
                          "-parallel", str(parallel), "-quiet", *extra], env=env, cwd=work, stderr=subprocess.PIPE,
                         text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"the run failed: {out.stderr.strip()}")
    user, system = (float(x) for x in out.stderr.split("SELF ")[-1].split())
    return wall, user, system


def xargs_run(work: Path, n: int, parallel: int) -> float:
    src, out = work / "in", work / "out"
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
    ap.add_argument("--parallel", type=int, nargs="+", default=[2],
                    help="task-pipeline's -parallel values (xargs runs with the first)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more task-pipeline flags")
    a = ap.parse_args()
    compile_package()
    base = a.parallel[0]
    print(f"# {os.cpu_count()} CPUs, python {sys.version.split()[0]}, xargs -P{base}, median of {a.repeat} "
          f"alternated runs")
    print(f"{'tasks':>7} {'xargs/s':>9} {'-parallel':>9} {'task-pipeline/s':>16} {'ratio':>6} {'us/task':>8} "
          f"{'CPU us/task (user+sys)':>23}")
    for n in a.tasks:
        # Nothing is deleted until the end: on a filesystem that skips recently freed inodes one by
        # one (ext4 without a journal), a run right after a deletion of thousands of files makes
        # every file and directory slower, and the earlier repetitions would slow the later ones.
        with tempfile.TemporaryDirectory(prefix="tp-bench-") as d:
            xs: list[float] = []
            ts: dict[int, list[tuple[float, float, float]]] = {p: [] for p in a.parallel}
            for r in range(a.repeat):
                work = Path(d) / f"x{r}"
                work.mkdir()
                xs.append(xargs_run(work, n, base))
                for p in a.parallel:
                    work = Path(d) / f"t{r}-{p}"
                    work.mkdir()
                    ts[p].append(tp_run(work, n, p, a.extra))
            x_rate = n / statistics.median(xs)
            for p in a.parallel:
                t = statistics.median(w for w, _, _ in ts[p])
                user = statistics.median(u for _, u, _ in ts[p]) / (n + 1) * 1e6
                system = statistics.median(s for _, _, s in ts[p]) / (n + 1) * 1e6
                t_rate = (n + 1) / t
                print(f"{n:>7} {x_rate:>9.0f} {p:>9} {t_rate:>16.0f} {t_rate / x_rate:>6.2f} {t / (n + 1) * 1e6:>8.0f} "
                      f"{user:>11.0f} + {system:<9.0f}")


if __name__ == "__main__":
    main()
