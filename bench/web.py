#!/usr/bin/env python3
"""What `serve --http` costs and how fast it answers (issue 12), each against a baseline measured
in the same run:

  engine   tiny-task throughput of `serve` without --http (the baseline), with --http and nobody
           looking, with one dashboard open (the page's poll: /api/status every 2 s) and with
           five dashboards plus a Prometheus scrape every 5 s. Runs alternate between the setups
           and the median of --repeat is printed; tasks/s is taken from the tasks' own finishing
           times (the daemon's start-up, longer with the web's imports, is not counted), and so
           is the daemon's own CPU time per task (its scripts' not included), which other load on
           the machine disturbs far less than it does tasks/s.
  api      requests/s of one keep-alive client, one request at a time, per endpoint, on the
           store the engine runs left; a static file (no database) for comparison.
  million  a store of --million tasks (bulk-inserted: mostly done, some failed, some pending of a
           step this serve does not run): /api/status latency quantiles while the store is quiet,
           and while another connection commits every 0.5 s (so that the snapshot goes stale and
           is rebuilt), with the snapshot's largest age seen; then the other reads.

    python bench/web.py --tasks 3000 --repeat 3 --million 1000000
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent

TINY = """
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
script = 'tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"'
"""

# `process` holds the million tasks; this serve runs only `idle`
MILLION = """
[[step]]
name = "process"
script = 'exit 0'

[[step]]
name = "idle"
start = true
script = 'true'
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    def __init__(self, work: Path, manifest: Path, db: Path, *extra: str) -> None:
        self.log = work / "serve.log"
        self.port = None
        args = list(extra)
        if "--http" in args:
            self.port = free_port()
            args[args.index("--http") + 1] = f"127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "task_pipeline", "serve", str(manifest), "-db", str(db),
                                          "-parallel", "2", "-quiet", *args], stderr=log, env=env,
                                         stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        if self.port is not None:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    break
                except OSError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        sys.exit(f"serve did not listen:\n{self.log.read_text()}")
                    time.sleep(0.02)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def finished(db: Path) -> tuple[int, float | None, float | None]:
    try:
        conn = sqlite3.connect(f"file:{db / 'db'}?mode=ro", uri=True, timeout=30)
    except sqlite3.OperationalError:
        return 0, None, None   # not created yet
    try:
        return conn.execute("SELECT count(*), min(finished_at), max(finished_at) FROM task t JOIN step s "
                            "ON s.id = t.step_id WHERE s.name = 'process' AND t.state = 'done'").fetchone()
    except sqlite3.OperationalError:
        return 0, None, None   # not created yet
    finally:
        conn.close()


class Viewers:
    """Dashboards polling /api/status (and loading the page once), and a Prometheus scrape."""

    def __init__(self, base: str, dashboards: int, scrape: float | None) -> None:
        self.stop = threading.Event()
        self.requests = 0
        self.threads = [threading.Thread(target=self._dashboard, args=(base, i, dashboards), daemon=True)
                        for i in range(dashboards)]
        if scrape:
            self.threads.append(threading.Thread(target=self._loop, args=(base, "/metrics", scrape, 0.0), daemon=True))
        for t in self.threads:
            t.start()

    def _dashboard(self, base: str, i: int, n: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            c.get("/")
            self.requests += 1
        self._loop(base, "/api/status", 2.0, 2.0 * i / n)

    def _loop(self, base: str, path: str, every: float, offset: float) -> None:
        if self.stop.wait(offset):
            return
        with httpx.Client(base_url=base, timeout=30) as c:
            while not self.stop.is_set():
                c.get(path).raise_for_status()
                self.requests += 1
                self.stop.wait(every)

    def close(self) -> int:
        self.stop.set()
        for t in self.threads:
            t.join()
        return self.requests


SETUPS = {
    "no --http (baseline)": ([], 0, None),
    "--http, nobody looking": (["--http", "ADDR"], 0, None),
    "--http, 1 dashboard": (["--http", "ADDR"], 1, None),
    "--http, 5 dashboards + scrape": (["--http", "ADDR"], 5, 5.0),
}


def cpu_seconds(pid: int) -> float:
    """The process's own user and system time (not its children's)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_run(work: Path, n: int, extra: list[str], dashboards: int,
               scrape: float | None) -> tuple[float, float, int]:
    db = work / "db"
    shutil.rmtree(db, ignore_errors=True)
    m = work / "tiny.toml"
    m.write_text(TINY.format(n=n))
    s = Serve(work, m, db, *extra)
    viewers = Viewers(s.base, dashboards, scrape) if s.port is not None and (dashboards or scrape) else None
    try:
        deadline = time.monotonic() + 600
        mark = None   # (tasks done, daemon CPU) once work is under way
        while True:
            done, first, last = finished(db)
            if mark is None and done >= n // 10:
                mark = (done, cpu_seconds(s.proc.pid))
            if done >= n:
                cpu = (cpu_seconds(s.proc.pid) - mark[1]) / (done - mark[0])
                break
            if s.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"serve stopped or stalled at {done}/{n}:\n{s.log.read_text()[-2000:]}")
            time.sleep(0.1)
    finally:
        requests = viewers.close() if viewers else 0
        s.stop()
    return (n - 1) / (last - first), cpu, requests


def bench_engine(work: Path, n: int, repeat: int) -> None:
    print(f"# engine: {n} tiny tasks, -parallel 2, median of {repeat}")
    rates: dict[str, list[float]] = {k: [] for k in SETUPS}
    cpus: dict[str, list[float]] = {k: [] for k in SETUPS}
    polls: dict[str, int] = {k: 0 for k in SETUPS}
    for _ in range(repeat):
        for name, (extra, dashboards, scrape) in SETUPS.items():
            rate, cpu, requests = engine_run(work, n, extra, dashboards, scrape)
            rates[name].append(rate)
            cpus[name].append(cpu)
            polls[name] += requests
    base = statistics.median(rates["no --http (baseline)"])
    base_cpu = statistics.median(cpus["no --http (baseline)"])
    for name in SETUPS:
        r, c = statistics.median(rates[name]), statistics.median(cpus[name])
        runs = ", ".join(f"{x:.0f}" for x in rates[name])
        print(f"{name:32} {r:5.0f} tasks/s {100 * (r / base - 1):+6.1f}%   daemon CPU {1000 * c:5.2f} ms/task "
              f"{100 * (c / base_cpu - 1):+6.1f}%   (tasks/s runs: {runs}; {polls[name] // repeat} web requests/run)")


def per_second(c: httpx.Client, path: str, seconds: float) -> tuple[float, float, float]:
    """(requests/s, median ms, p95 ms) of one client, one request at a time."""
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        r = c.get(path)
        lat.append(time.perf_counter() - t0)
        if r.status_code != 200:
            sys.exit(f"{path}: {r.status_code} {r.text[:200]}")
    lat.sort()
    return len(lat) / sum(lat), 1000 * lat[len(lat) // 2], 1000 * lat[int(len(lat) * 0.95)]


def bench_api(work: Path, seconds: float) -> None:
    db = work / "db"
    s = Serve(work, work / "tiny.toml", db, "--http", "ADDR")
    try:
        with httpx.Client(base_url=s.base, timeout=30) as c:
            task = c.get("/api/tasks", params={"limit": 1}).json()["tasks"][0]["task"]
            n = sum(x["done"] for x in c.get("/api/status").json()["steps"])
            print(f"# api: one keep-alive client, one request at a time, {seconds:g} s each, a store of {n} tasks")
            paths = ["/static/style.css", "/api/status", "/api/tasks?limit=50", f"/api/tasks/{task}", "/api/graph",
                     "/metrics", "/"]
            for path in paths:
                per_second(c, path, 0.3)   # warm
                rate, med, p95 = per_second(c, path, seconds)
                print(f"{path:24} {rate:7.0f} req/s  median {med:5.2f} ms  p95 {p95:5.2f} ms")
    finally:
        s.stop()


def build_million(work: Path, n: int) -> tuple[Path, Path]:
    db, m = work / "million", work / "million.toml"
    shutil.rmtree(db, ignore_errors=True)
    m.write_text(MILLION)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "task_pipeline", "run", str(m), "-db", str(db), "-step", "idle", "-quiet"],
                   check=True, env=env)
    conn = sqlite3.connect(db / "db")
    sid = conn.execute("SELECT id FROM step WHERE name='process' ORDER BY version DESC").fetchone()[0]
    conn.execute("INSERT OR IGNORE INTO object(hash, size) VALUES (?, 21)", ("0" * 64,))
    now = time.time()

    def rows(lo: int, hi: int):
        for i in range(lo, hi):
            st = "pending" if i % 20 == 0 else "failed" if i % 20 == 1 else "done"
            fin = None if st == "pending" else now - n + i
            yield (sid, f"process_{i}", "0" * 64, st, fin, now - n + i, 4 if st == "failed" else None)

    for lo in range(0, n, 100_000):
        with conn:
            conn.executemany("INSERT INTO task(step_id, input_name, input_hash, state, finished_at, created_at, "
                             "exit_code) VALUES (?,?,?,?,?,?,?)", rows(lo, min(lo + 100_000, n)))
    conn.execute("ANALYZE")
    conn.close()
    return db, m


def quantiles(c: httpx.Client, path: str, count: int, gap: float) -> str:
    lat, age = [], 0.0
    for _ in range(count):
        t0 = time.perf_counter()
        r = c.get(path)
        lat.append(1000 * (time.perf_counter() - t0))
        r.raise_for_status()
        if "x-counted-at" in r.headers:
            at = r.headers["x-counted-at"].replace("Z", "+00:00")
            from datetime import datetime

            age = max(age, time.time() - datetime.fromisoformat(at).timestamp())
        time.sleep(gap)
    lat.sort()
    return (f"median {lat[len(lat) // 2]:6.1f} ms  p95 {lat[int(len(lat) * 0.95)]:6.1f} ms  "
            f"max {lat[-1]:6.1f} ms  ({count} requests" + (f"; snapshot at most {age:.1f} s old)" if age else ")"))


def bench_million(work: Path, n: int) -> None:
    t0 = time.perf_counter()
    db, m = build_million(work, n)
    print(f"# million: /api/status on a store of {n} tasks (built in {time.perf_counter() - t0:.0f} s)")
    s = Serve(work, m, db, "--http", "ADDR", "-step", "idle")
    stop = threading.Event()

    def commits() -> None:
        conn = sqlite3.connect(db / "db", timeout=30)
        conn.execute("CREATE TABLE IF NOT EXISTS bench_tick(t REAL)")
        while not stop.wait(0.5):
            with conn:
                conn.execute("INSERT INTO bench_tick VALUES (?)", (time.time(),))
        conn.close()

    try:
        with httpx.Client(base_url=s.base, timeout=60) as c:
            c.get("/api/status").raise_for_status()   # the first count
            print(f"{'quiet store':32} {quantiles(c, '/api/status', 100, 0.05)}")
            t = threading.Thread(target=commits, daemon=True)
            t.start()
            print(f"{'a commit every 0.5 s':32} {quantiles(c, '/api/status', 100, 0.05)}")
            t0 = time.perf_counter()
            c.get("/").raise_for_status()
            print(f"{'/ (the first load: the graph)':32} {1000 * (time.perf_counter() - t0):6.1f} ms")
            for path in ("/", "/metrics", "/api/tasks?limit=50", "/api/tasks?step=process&state=failed"):
                print(f"{path:32} {quantiles(c, path, 20, 0.05)}")
            stop.set()
            t.join()
    finally:
        s.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0, help="per API endpoint")
    ap.add_argument("--million", type=int, default=1_000_000, help="tasks in the big store (0: skip)")
    ap.add_argument("--only", choices=("engine", "api", "million"), action="append",
                    help="run only these parts (repeatable)")
    a = ap.parse_args()
    parts = a.only or ["engine", "api", "million"]
    print(f"# load average before: {os.getloadavg()[0]:.1f} (2 cores here; other work on the machine is noise)")
    with tempfile.TemporaryDirectory(prefix="tp-web-") as d:
        work = Path(d)
        if "engine" in parts or "api" in parts:
            bench_engine(work, a.tasks, a.repeat if "engine" in parts else 1)
        if "api" in parts:
            bench_api(work, a.seconds)
        if "million" in parts:
            bench_million(work, a.million)


if __name__ == "__main__":
    main()
