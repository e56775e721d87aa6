#!/usr/bin/env python3
"""task-pipeline on a real PostgreSQL server against SQLite, each measured in the same run.

1. throughput: the tiny-task pipeline of bench/throughput.py (a start step writing N files
   of 21 bytes, `tr a-z A-Z` on each), one `run -parallel P` from an empty store, on
   SQLite and on PostgreSQL: tasks/s each and PostgreSQL/SQLite.
2. runners: R `run` processes started at once on one PostgreSQL store against one, with
   the tiny tasks (CPU-bound: R runners on this machine's cores compete for CPU) and with
   sleep-bound tasks (`sleep S`, where more runners should help: this is the case that
   shows the queue distributing work). tasks/s, the ratio, and how the tasks were shared.
3. no-op: `run` on a store holding --noop-tasks done tasks that finds nothing to do, end to
   end (median of --noop-repeat), on both, next to the interpreter start-up and the import
   of task-pipeline. The store is built in bulk (bench/noop.py's build).
4. latency: an idle `serve -parallel P` daemon; one input at a time is submitted
   (`task-pipeline submit`), and the script records `date +%s.%N` as its first command.
   Median and p95 of --submits, to the script's start: from the submit's commit (the claim
   path: the submit process says on stderr when state.submit has returned), from its
   "queued for" line (read line by line from its stdout), and from starting `submit` (the
   whole path a user feels); and how long the submit command takes.

PostgreSQL is tests/servers.py's throwaway cluster, reached over TCP on 127.0.0.1 with a
password, and runs with fsync=off, synchronous_commit=off and full_page_writes=off unless
--durable, which measures 1, 2 and 4 once more after restarting it with all three on.
SQLite stores run as task-pipeline makes them (WAL, synchronous=NORMAL). Every figure is
the median of --repeat runs unless it says otherwise; runs of the two backends alternate.

    python bench/postgres.py
    python bench/postgres.py --tasks 2000 --repeat 3 --durable
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import noop  # noqa: E402
import throughput  # noqa: E402
from stores import (POSTGRES, SQLITE, BenchStore, cli_env, drop, durable, postgres_store, settings,  # noqa: E402
                    sqlite_store, start_postgres)

NAMES = {SQLITE: "SQLite", POSTGRES: "PostgreSQL"}

SLEEP_MANIFEST = """
[[step]]
name = "start"
start = true
script = '''
i=1
while [ $i -le {n} ]; do
  printf 'sleepy input nr %07d' $i > "$OUTPUT_DIR/process_$i"
  i=$((i + 1))
done
'''

[[step]]
name = "process"
script = 'sleep {sleep}; tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"'
"""

# The script's first command records when it started; the bench waits for the file.
LATENCY_MANIFEST = """
[[step]]
name = "lat"
script = 'date +%s.%N > "{starts}/$INPUT_NAME.tmp" && mv "{starts}/$INPUT_NAME.tmp" "{starts}/$INPUT_NAME"'
"""


# `task-pipeline submit ...`, which also says on stderr when its transaction has committed:
# state.submit returns right after the commit (its `with db.transaction()`), before the
# submit process unregisters itself and prints "queued for".
COMMITTED = "bench: committed at"
SUBMIT_TIMED = f"""
import sys, time
from task_pipeline import cli, state
_submit = state.submit
def submit(*a, **k):
    r = _submit(*a, **k)
    sys.stderr.write(f"{COMMITTED} {{time.time():.6f}}\\n")
    return r
state.submit = submit
sys.exit(cli.main(sys.argv[1:]))
"""


def tp(*args: str) -> list[str]:
    return [sys.executable, "-m", "task_pipeline", *args]


def p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20, method="inclusive")[18] if len(xs) > 1 else xs[0]


def new_store(kind: str, server, work: Path) -> BenchStore:
    return sqlite_store(work / "sqlite") if kind == SQLITE else postgres_store(server, work / "pg")


def runners(store: BenchStore, manifest: Path, count: int, parallel: int) -> float:
    """Start `count` `run` processes on one store at once; seconds until the last one has exited."""
    cmd = tp("run", str(manifest), *store.args, "-parallel", str(parallel), "-quiet")
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=store.cli_env(), stderr=subprocess.PIPE) for _ in range(count)]
    errs = [p.communicate()[1] for p in procs]
    took = time.perf_counter() - t0
    for p, err in zip(procs, errs):
        if p.returncode != 0:
            sys.exit(f"run failed ({p.returncode}) on {store.kind}:\n{err.decode(errors='replace')}")
    return took


def shares(store: BenchStore, n: int) -> list[int]:
    """Tasks of `process` each runner committed (largest first); checks that every task is done once."""
    db = store.open()
    try:
        done = db.execute("SELECT count(*) FROM task WHERE state='done' AND live=1").fetchone()[0]
        ok = db.execute("SELECT count(*) FROM attempt WHERE outcome='ok'").fetchone()[0]
        per = [r[0] for r in db.execute("SELECT count(*) FROM attempt a JOIN task t ON t.id = a.task_id "
                                        "JOIN step s ON s.id = t.step_id WHERE a.outcome='ok' AND s.name='process' "
                                        "GROUP BY a.runner ORDER BY count(*) DESC")]
    finally:
        db.close()
    if done != n + 1 or ok != n + 1:
        sys.exit(f"{store.kind}: {done} tasks done and {ok} successful attempts, expected {n + 1} of each")
    return per


# -- 1 and 2. throughput, one runner and several ------------------------------------------


def bench_tiny(server, work: Path, n: int, count: int, parallel: int, repeat: int) -> dict[str, float]:
    """Tiny tasks: one runner on SQLite, one on PostgreSQL, `count` at once on PostgreSQL, in turn, `repeat` times."""
    m = work / "tiny.toml"
    m.write_text(throughput.MANIFEST.format(n=n, script=throughput.SCRIPT))
    cases = ((SQLITE, 1), (POSTGRES, 1), (POSTGRES, count))
    times: dict[tuple[str, int], list[float]] = {c: [] for c in cases}
    split: list[int] = []
    for _ in range(repeat):
        for kind, c in cases:
            store = new_store(kind, server, work)
            times[kind, c].append(runners(store, m, c, parallel))
            per = shares(store, n)
            if c > 1:
                split = per
            drop(server, store)
    rate = {c: (n + 1) / statistics.median(times[c]) for c in cases}
    print(f"\n# 1. throughput: {n + 1} tiny tasks, one run -parallel {parallel}, from an empty store")
    for kind in (SQLITE, POSTGRES):
        print(f"  {NAMES[kind]:<11} {rate[kind, 1]:>7.0f} tasks/s  ({statistics.median(times[kind, 1]):.2f} s; "
              f"runs {', '.join(f'{t:.2f}' for t in times[kind, 1])})")
    print(f"  PostgreSQL/SQLite {rate[POSTGRES, 1] / rate[SQLITE, 1]:.2f}")
    print(f"\n# 2a. {count} runners against 1 on PostgreSQL, tiny tasks (CPU-bound: this machine has "
          f"{os.cpu_count()} cores, and {count} runners x -parallel {parallel} compete for them)")
    _runners_lines(rate[POSTGRES, 1], rate[POSTGRES, count], times[POSTGRES, 1], times[POSTGRES, count], count,
                   split)
    return {"sqlite": rate[SQLITE, 1], "pg": rate[POSTGRES, 1], "pg_many": rate[POSTGRES, count]}


def bench_sleepy(server, work: Path, n: int, sleep: float, count: int, parallel: int,
                 repeat: int) -> dict[str, float]:
    """Sleep-bound tasks: one runner against `count` at once, on PostgreSQL."""
    m = work / "sleepy.toml"
    m.write_text(SLEEP_MANIFEST.format(n=n, sleep=sleep))
    times: dict[int, list[float]] = {1: [], count: []}
    split: list[int] = []
    for _ in range(repeat):
        for c in (1, count):
            store = postgres_store(server, work / "pg")
            times[c].append(runners(store, m, c, parallel))
            per = shares(store, n)
            if c > 1:
                split = per
            drop(server, store)
    one, many = ((n + 1) / statistics.median(times[c]) for c in (1, count))
    print(f"\n# 2b. {count} runners against 1 on PostgreSQL, {n + 1} tasks that `sleep {sleep}` (sleep-bound: "
          f"the queue spreads them over {count * parallel} slots instead of {parallel}; median of {repeat})")
    _runners_lines(one, many, times[1], times[count], count, split)
    print(f"  (sleeping alone caps 1 runner at {parallel / sleep:.0f} tasks/s and {count} at {count * parallel / sleep:.0f})")
    return {"one": one, "many": many}


def _runners_lines(one: float, many: float, t_one: list[float], t_many: list[float], count: int,
                   split: list[int]) -> None:
    print(f"  1 runner    {one:>7.0f} tasks/s  ({statistics.median(t_one):.2f} s)")
    print(f"  {count} runners  {many:>7.0f} tasks/s  ({statistics.median(t_many):.2f} s, until the last exits); "
          f"{count}/1 {many / one:.2f}")
    print(f"  tasks done by each runner, last run: {' / '.join(map(str, split))}")


# -- 3. no-op run --------------------------------------------------------------------------


def bench_noop(server, work: Path, n: int, repeat: int) -> dict[str, float]:
    env = cli_env()
    py = noop.timed([sys.executable, "-c", "pass"], repeat, env)
    imp = {SQLITE: noop.timed([sys.executable, "-c", "import task_pipeline.commands"], repeat, env),
           POSTGRES: noop.timed([sys.executable, "-c", "import task_pipeline.commands, psycopg"], repeat, env)}
    m = work / "noop.toml"
    m.write_text(noop.MANIFEST)
    out = {}
    print(f"median of {repeat}; python start-up {py * 1000:.0f} ms, importing "
          f"task-pipeline {imp[SQLITE] * 1000:.0f} ms (with psycopg {imp[POSTGRES] * 1000:.0f} ms):")
    for kind in (SQLITE, POSTGRES):
        store = new_store(kind, server, work)
        t0 = time.perf_counter()
        noop.build(store, m, n)
        built = time.perf_counter() - t0
        out[kind] = noop.noop_run(store, m, repeat)
        print(f"  {NAMES[kind]:<11} {out[kind] * 1000:>5.0f} ms, of which {(out[kind] - imp[kind]) * 1000:.0f} ms "
              f"after the imports  (store built in {built:.1f} s)")
        drop(server, store)
    return out


# -- 4. claim-to-start latency -------------------------------------------------------------


def wait_for(path: Path, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return float(path.read_text())
        except (FileNotFoundError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.001)


def bench_latency(server, work: Path, kind: str, submits: int, parallel: int) -> dict[str, list[float]]:
    store = new_store(kind, server, work)
    starts, inputs = work / "starts", work / "inputs"
    for d in (starts, inputs):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    m = work / "latency.toml"
    m.write_text(LATENCY_MANIFEST.format(starts=starts))
    env = {**store.cli_env(), "PYTHONUNBUFFERED": "1"}
    logfile = work / f"serve-{kind}.log"
    got: dict[str, list[float]] = {"commit": [], "line": [], "user": [], "submit": []}
    with open(logfile, "wb") as log:
        daemon = subprocess.Popen(tp("serve", str(m), *store.args, "-parallel", str(parallel), "--log-format", "plain"),
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            # the daemon creates the store; submit needs one
            deadline = time.monotonic() + 60
            while b"serving" not in logfile.read_bytes():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"serve did not start on {kind}:\n{logfile.read_text(errors='replace')}")
                time.sleep(0.02)
            for i in range(submits + 2):  # the first two warm up, uncounted
                t = submit_one(store, env, inputs, starts, f"lat_{i:04d}")
                if i >= 2:
                    for k, v in t.items():
                        got[k].append(v)
        finally:
            daemon.terminate()
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
            drop(server, store)
    return got


def submit_one(store: BenchStore, env: dict[str, str], inputs: Path, starts: Path, name: str) -> dict[str, float]:
    """Submit one new input to an idle daemon; seconds from each moment of the submit to its script's start."""
    (inputs / name).write_text(f"input {name} {random.random()}\n")
    time.sleep(random.uniform(0.2, 0.4))  # idle, and at a random phase of any polling
    t_spawn = time.time()
    sub = subprocess.Popen([sys.executable, "-c", SUBMIT_TIMED, "submit", "lat", str(inputs / name), *store.args],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t_line = None
    for line in sub.stdout:
        if b"queued for" in line:
            t_line = time.time()
            break
    _, err = sub.communicate()
    t_exit = time.time()
    committed = [float(x.split()[-1]) for x in err.decode().splitlines() if x.startswith(COMMITTED)]
    if sub.returncode != 0 or t_line is None or len(committed) != 1:
        sys.exit(f"submit failed ({sub.returncode}) on {store.kind}: {err.decode(errors='replace')}")
    t_start = wait_for(starts / name, 30)
    return {"commit": t_start - committed[0], "line": t_start - t_line, "user": t_start - t_spawn,
            "submit": t_exit - t_spawn}


LATENCY_COLUMNS = (("commit", "commit -> script"), ("line", "'queued for' line -> script"),
                   ("user", "submit started -> script"), ("submit", "submit command"))


def report_latency(lat: dict[str, dict[str, list[float]]], parallel: int, submits: int) -> None:
    print(f"one submit at a time to an idle serve -parallel {parallel}, {submits} submits; ms, median / p95:")
    print(f"  {'':<11}" + "".join(f" {title:>28}" for _, title in LATENCY_COLUMNS))
    for kind, got in lat.items():
        print(f"  {NAMES[kind]:<11}" + "".join(
            f" {f'{statistics.median(got[k]) * 1000:6.1f} / {p95(got[k]) * 1000:6.1f}':>28}" for k, _ in LATENCY_COLUMNS))
    print("  commit: when state.submit returned in the submit process (its transaction committed); the "
          "'queued for' line comes later (negative: after the script had started)")


# -- all of it -----------------------------------------------------------------------------


def measure(server, work: Path, a, label: str, noop_too: bool) -> list[list[str]]:
    """Every figure once, with the server as it is now; returns summary rows [what, SQLite, PostgreSQL, ratio]."""
    rows: list[list[str]] = []
    print(f"\n## PostgreSQL with {label}: {settings(server)}; load average {load()}")
    tiny = bench_tiny(server, work, a.tasks, a.runners, a.parallel, a.repeat)
    rows.append([f"{a.tasks + 1} tiny tasks, 1 runner", f"{tiny['sqlite']:.0f}/s", f"{tiny['pg']:.0f}/s",
                 f"PG/SQLite {tiny['pg'] / tiny['sqlite']:.2f}"])
    rows.append([f"{a.tasks + 1} tiny tasks, {a.runners} runners at once", "", f"{tiny['pg_many']:.0f}/s",
                 f"{a.runners}/1 {tiny['pg_many'] / tiny['pg']:.2f}"])
    sleepy = bench_sleepy(server, work, a.sleep_tasks, a.sleep, a.runners, a.parallel, a.sleep_repeat)
    rows.append([f"{a.sleep_tasks + 1} `sleep {a.sleep}` tasks, 1 runner", "", f"{sleepy['one']:.0f}/s", ""])
    rows.append([f"{a.sleep_tasks + 1} `sleep {a.sleep}` tasks, {a.runners} runners at once", "", f"{sleepy['many']:.0f}/s",
                 f"{a.runners}/1 {sleepy['many'] / sleepy['one']:.2f}"])
    if noop_too:
        print(f"\n# 3. no-op run on {a.noop_tasks} done tasks")
        no = bench_noop(server, work, a.noop_tasks, a.noop_repeat)
        rows.append([f"no-op run, {a.noop_tasks} done tasks", f"{no[SQLITE] * 1000:.0f} ms",
                     f"{no[POSTGRES] * 1000:.0f} ms", f"PG/SQLite {no[POSTGRES] / no[SQLITE]:.2f}"])
    print("\n# 4. claim-to-start latency")
    lat = {k: bench_latency(server, work, k, a.submits, a.parallel) for k in (SQLITE, POSTGRES)}
    report_latency(lat, a.parallel, a.submits)
    for key, what in (("commit", "submit's commit -> script start"), ("user", "submit started -> script start")):
        s, p = lat[SQLITE][key], lat[POSTGRES][key]
        rows.append([what, f"{statistics.median(s) * 1000:.0f} / {p95(s) * 1000:.0f} ms",
                     f"{statistics.median(p) * 1000:.0f} / {p95(p) * 1000:.0f} ms", "median / p95"])
    return rows


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=2000, help="tiny tasks (1 and 2a)")
    ap.add_argument("--parallel", type=int, default=2, help="-parallel of every run and serve")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure of 1 and 2a (tiny tasks)")
    ap.add_argument("--runners", type=int, default=3, help="runners at once in 2")
    ap.add_argument("--sleep-tasks", type=int, default=600, help="sleep-bound tasks in 2b")
    ap.add_argument("--sleep", type=float, default=0.05, help="seconds each sleep-bound task sleeps")
    ap.add_argument("--sleep-repeat", type=int, default=1, help="runs per figure of 2b")
    ap.add_argument("--noop-tasks", type=int, default=100_000, help="done tasks in the store of 3")
    ap.add_argument("--noop-repeat", type=int, default=5)
    ap.add_argument("--submits", type=int, default=20, help="submits per backend in 4")
    ap.add_argument("--durable", action="store_true",
                    help="then restart PostgreSQL with fsync, synchronous_commit and full_page_writes on, "
                         "and measure 1, 2 and 4 again")
    a = ap.parse_args()
    t_all = time.perf_counter()
    print(f"# {os.cpu_count()} CPUs, python {sys.version.split()[0]}, -parallel {a.parallel}, median of {a.repeat} "
          f"unless said; PostgreSQL on 127.0.0.1 over TCP with a password, on the same machine; SQLite as "
          f"task-pipeline sets it up (WAL, synchronous=NORMAL)")
    server = start_postgres()
    try:
        with tempfile.TemporaryDirectory(prefix="tp-bench-pg-") as d:
            fast = measure(server, Path(d), a, "fsync off", noop_too=True)
            safe = None
            if a.durable:
                durable(server, True)
                safe = measure(server, Path(d), a, "fsync on", noop_too=False)
    finally:
        server.close()
    print(f"\n# summary ({time.perf_counter() - t_all:.0f} s in all, load average now {load()}); PostgreSQL "
          f"'fsync off' has fsync, synchronous_commit and full_page_writes off"
          + ("; 'fsync on' all three on, its ratios against the SQLite runs of its own pass" if safe else ""))
    head = ["what", "SQLite", "PostgreSQL (fsync off)", ""]
    if safe is None:
        table([head] + fast)
        return
    by_what = {r[0]: r for r in safe}
    table([head + ["PostgreSQL (fsync on)", ""]]
          + [r + (by_what[r[0]][2:] if r[0] in by_what else ["", ""]) for r in fast])


if __name__ == "__main__":
    main()
