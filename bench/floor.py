#!/usr/bin/env python3
"""The floor under tiny tasks: the least a Python runner can do per task, and what each guarantee adds.

`bench/throughput.py` compares task-pipeline with `xargs -P2`. This script asks how close any
Python runner could come on the same machine, with the same inputs and script. Its minimal
runner has one thread, no engine and no launcher. Inside the clock, it first stores the inputs,
as task-pipeline stores its start step's outputs in its run (xargs' inputs are made before its
clock). Then it keeps `--parallel` scripts running with `os.posix_spawn` and `os.wait`, stores
each output under its SHA-256 in `objects/AB/CD/`, and records it in SQLite, committed every
64 tasks. Python's start is outside the clock. Each level adds one thing task-pipeline
guarantees:

  0 spawn+store   the above; the script reads its input straight from the store
  1 +input copy   the input is copied into the slot's in/, so a script cannot change the store
  2 +logs         stdout and stderr go to files in the slot, looked at after each run
  3 +empty check  the slot's directories are listed after each run, as before their reuse
  4 +durability   syncfs before each commit, so a committed output is on disk
  5 +next ready   the same work, in another order: the next attempt is prepared in a spare slot
                  while scripts run, and started the moment one ends, before that one's outputs
                  are stored (task-pipeline's launcher does this, across two processes)

Every level runs alternated with xargs and with task-pipeline itself in one run. Prints
tasks/s, the ratio against xargs, and the runner's own CPU per task (user + system).

    python bench/floor.py --tasks 2000 --repeat 3
    python bench/floor.py --tasks 2000 --runner-parallel 4    # against xargs -P2
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (the same inputs, script and xargs baseline)

LEVELS = ("spawn+store", "+input copy", "+logs", "+empty check", "+durability", "+next ready")
SHELL = "/bin/sh"
SCRIPT = 'tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"'
BATCH = 64

sys.path.insert(0, str(throughput.ROOT))
from task_pipeline.fsutil import libc_function  # noqa: E402

_syncfs = libc_function("syncfs")  # None where there is none: level 4 then flushes nothing


class Objects:
    """A sharded store: objects/AB/CD/<sha256>, made by rename; an object already there is kept (and
    touched, as task-pipeline does for gc). Shard directories are made on first use, without a stat."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.made: set[str] = set()
        root.mkdir()

    def put(self, path: str) -> str:
        with open(path, "rb") as f:
            h = hashlib.sha256(f.read()).hexdigest()
        shard = f"{self.root}/{h[:2]}/{h[2:4]}"
        try:
            os.utime(f"{shard}/{h}")
        except FileNotFoundError:
            pass
        else:
            os.unlink(path)
            return h
        if shard not in self.made:
            try:
                os.mkdir(shard)
            except FileNotFoundError:
                os.makedirs(shard, exist_ok=True)
            except FileExistsError:
                pass
            self.made.add(shard)
        os.rename(path, f"{shard}/{h}")
        return h

    def path(self, h: str) -> str:
        return f"{self.root}/{h[:2]}/{h[2:4]}/{h}"


def floor_run(work: Path, n: int, parallel: int, level: int) -> tuple[float, float]:
    """Seconds of wall time and of this process's CPU for n tasks at `level`."""
    src = work / "src"
    src.mkdir()
    for i in range(1, n + 1):
        (src / f"process_{i}").write_bytes(f"tiny input nr {i:07d}".encode())
    store = Objects(work / "objects")
    db = sqlite3.connect(work / "db", isolation_level=None)
    db.execute("pragma journal_mode=wal")
    db.execute("pragma synchronous=normal")  # as task-pipeline: WAL, no fsync at commit
    db.execute("create table task (id integer primary key, input text, output text)")
    slots = []
    for s in range(parallel + (level >= 5)):
        d = work / f"slot{s}"
        for sub in ("in", "out", "tmp"):
            (d / sub).mkdir(parents=True)
        slot = {"path": str(d), "in_name": None, "in_fd": None, "logs": None}
        if level >= 2:
            slot["logs"] = tuple(os.open(d / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                                 for name in ("stdout", "stderr"))
        slots.append(slot)
    devnull = os.open(os.devnull, os.O_RDWR)
    store_fd = os.open(store.root, os.O_RDONLY | os.O_DIRECTORY)
    base_env = dict(os.environ)

    def prepare(i: int, slot: dict) -> tuple:
        name, d = f"process_{i}", slot["path"]
        if level >= 1:
            if slot["in_fd"] is None:
                slot["in_fd"] = os.open(f"{d}/in/{name}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o444)
            else:
                os.rename(f"{d}/in/{slot['in_name']}", f"{d}/in/{name}")
            slot["in_name"] = name
            with open(store.path(inputs[i - 1]), "rb") as f:
                data = f.read()
            os.pwrite(slot["in_fd"], data, 0)
            os.ftruncate(slot["in_fd"], len(data))
            input_file = f"{d}/in/{name}"
        else:
            input_file = store.path(inputs[i - 1])
        env = {**base_env, "INPUT_FILE": input_file, "OUTPUT_DIR": f"{d}/out", "TMPDIR": f"{d}/tmp",
               "INPUT_NAME": name}
        so, se = slot["logs"] or (devnull, devnull)
        actions = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, so, 1), (os.POSIX_SPAWN_DUP2, se, 2)]
        return i, slot, env, actions

    def spawn(ready: tuple) -> None:
        i, slot, env, actions = ready
        running[os.posix_spawn(SHELL, [SHELL, "-c", SCRIPT], env, setsid=True, file_actions=actions)] = (i, slot)

    def finish(i: int, slot: dict, status: int) -> tuple:
        d = slot["path"]
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"a script failed at level {level}")
        if level >= 2:
            for fd in slot["logs"]:
                if os.fstat(fd).st_size:
                    os.ftruncate(fd, 0)
        outputs = os.listdir(f"{d}/out")
        hashes = [store.put(f"{d}/out/{name}") for name in outputs]
        if level >= 3:
            listed = (sorted(os.listdir(d)), os.listdir(f"{d}/in"), os.listdir(f"{d}/out"), os.listdir(f"{d}/tmp"))
            expected = (sorted(["in", "out", "tmp", "stdout", "stderr"]), [slot["in_name"]], [], [])
            if listed != expected:
                sys.exit(f"the slot was not left empty: {listed}")
        return (i, f"process_{i}", hashes[0])

    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    # the inputs are stored inside the clock, as task-pipeline stores its start step's outputs in its run
    inputs = [store.put(str(src / f"process_{i}")) for i in range(1, n + 1)]
    todo, free, running, rows, ready = list(range(n, 0, -1)), slots[:], {}, [], None
    while todo or running:
        while todo and len(running) < parallel:
            spawn(prepare(todo.pop(), free.pop()))
        if level >= 5 and ready is None and todo:
            ready = prepare(todo.pop(), free.pop())
        pid, status = os.wait()
        i, slot = running.pop(pid)
        if ready is not None:
            spawn(ready)
            ready = None
        rows.append(finish(i, slot, status))
        free.append(slot)
        if len(rows) >= BATCH or not (todo or running):
            if level >= 4 and _syncfs is not None:
                _syncfs(store_fd)
            db.execute("begin")
            db.executemany("insert into task values (?, ?, ?)", rows)
            db.execute("commit")
            rows = []
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    done = db.execute("select count(*) from task").fetchone()[0]
    db.close()
    if done != n:
        sys.exit(f"level {level} recorded {done} of {n} tasks")
    return wall, r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--parallel", type=int, default=2, help="scripts at once, for all three")
    ap.add_argument("--runner-parallel", type=int, help="scripts at once for the floor and task-pipeline only "
                    "(xargs keeps --parallel)")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    throughput.compile_package()
    n, p = a.tasks, a.parallel
    q = a.runner_parallel or p
    xs: list[float] = []
    fl: dict[int, list[tuple[float, float]]] = {k: [] for k in range(len(LEVELS))}
    tp: list[tuple[float, float, float]] = []
    # Nothing is deleted until the end (see throughput.py: freed inodes slow later file creation here)
    with tempfile.TemporaryDirectory(prefix="tp-floor-") as d:
        for r in range(a.repeat):
            work = Path(d) / f"x{r}"
            work.mkdir()
            xs.append(throughput.xargs_run(work, n, p))
            for k in fl:
                work = Path(d) / f"f{r}-{k}"
                work.mkdir()
                fl[k].append(floor_run(work, n, q, k))
            work = Path(d) / f"t{r}"
            work.mkdir()
            tp.append(throughput.tp_run(work, n, q, []))
    x = statistics.median(xs)
    print(f"# {os.cpu_count()} CPUs, python {sys.version.split()[0]}, {n} tiny tasks, {q} at once "
          f"(xargs: {p}), "
          f"median of {a.repeat} alternated runs")
    print(f"{'runner':>30} {'tasks/s':>8} {'vs xargs':>8} {'CPU us/task':>12}")
    print(f"{'xargs -P' + str(p):>30} {n / x:>8.0f} {1:>8.2f} {'':>12}")
    for k, runs in fl.items():
        w, c = statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)
        print(f"{f'floor {k} {LEVELS[k]}':>30} {n / w:>8.0f} {x / w:>8.2f} {c / n * 1e6:>12.0f}")
    w = statistics.median(w for w, _, _ in tp)
    c = statistics.median(u + s for _, u, s in tp)
    print(f"{f'task-pipeline -parallel {q}':>30} {(n + 1) / w:>8.0f} {x / w * (n + 1) / n:>8.2f} "
          f"{c / (n + 1) * 1e6:>12.0f}")


if __name__ == "__main__":
    main()
