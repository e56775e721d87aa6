#!/usr/bin/env python3
"""Where a tiny task's wall time goes: a per-task timeline of one run, and a picture of it.

Runs bench/throughput.py's pipeline (a start step fanning out to N tiny files, then
`tr a-z A-Z` on each) once with TASK_PIPELINE_TIMELINE set, so that the engine records
when each task was leased, taken by a worker, had its input ready, had its script
spawned by the launcher (once one of the `-parallel` script slots was free),
saw it exit, finished storing its outputs, and was committed. Prints the median time of
each stage, how many scripts ran at once on average (xargs -P2 keeps close to 2), and
the CPU our own process used per task (user and system). With matplotlib installed
(`pip install matplotlib`), draws the slot occupancy over time into a PNG:

    python bench/timeline.py --tasks 2000 --parallel 2 --png docs/timeline.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402 - the same pipeline as the throughput figures

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("leased", "taken", "ready", "received", "slot", "spawned", "exited", "finished", "committed")
SPANS = (("taken", "ready", "prepare: directories, input copy", "#9ecae1"),
         ("ready", "received", "wait for a script slot (the request waits in its socket)", "#f0f0f0"),
         ("received", "slot", "read, in the launcher's queue", "#fee391"),
         ("slot", "spawned", "spawn", "#fdae6b"),
         ("spawned", "exited", "script", "#31a354"),
         ("exited", "finished", "collect: outputs, logs, clean up", "#de2d26"))




def record(work: Path, n: int, parallel: int, extra: list[str]) -> tuple[dict, float, tuple[float, float]]:
    (work / "bench.toml").write_text(throughput.MANIFEST.format(n=n, script=throughput.SCRIPT))
    log = work / "timeline.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TASK_PIPELINE_TIMELINE": str(log)}
    t0 = time.perf_counter()
    # the CPU of our process alone (RUSAGE_CHILDREN here would count its scripts too): it reports its own
    out = subprocess.run([sys.executable, "-c", throughput.SELF_CPU, "-manifest", str(work / "bench.toml"), "-db",
                          str(work / "db"), "-run", "-parallel", str(parallel), "-quiet", *extra],
                         env=env, cwd=work, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    self_cpu = (0.0, 0.0)
    for line in out.stderr.splitlines():
        if line.startswith("SELF "):
            u, s = line.split()[1:]
            self_cpu = (float(u), float(s))
    if out.returncode not in (0, None):
        sys.exit(f"the run failed: {out.stderr.strip()}")
    tasks: dict[int, dict] = defaultdict(dict)
    engine: dict[str, list] = defaultdict(list)   # "sync" -> [(start, end)], from the +/- pairs of task -1
    opened: dict[str, float] = {}
    for line in log.read_text().splitlines():
        m = json.loads(line)
        if m["task"] == -2:  # the launcher process's own CPU (user, system)
            engine["launcher-cpu"] = [(m["t"], m["thread"])]
        elif m["task"] == -1:
            name, sign = m["stage"][:-1], m["stage"][-1]
            if sign == "+":
                opened[name] = m["t"]
            elif name in opened:
                engine[name].append((opened.pop(name), m["t"]))
        else:
            tasks[m["task"]].setdefault(m["stage"], (m["t"], m["thread"]))
    tasks[-1] = engine
    return tasks, wall, self_cpu


ENGINE = (("claim", "engine: claim", "#3182bd"), ("sync", "engine: store flush", "#756bb1"),
          ("commit", "engine: commit", "#636363"))


def summarise(tasks: dict, wall: float, self_cpu: tuple[float, float], n: int) -> dict:
    tasks = dict(tasks)
    engine = tasks.pop(-1, {})
    print(f"wall {wall:.2f} s for {n + 1} tasks: {(n + 1) / wall:.0f} tasks/s")
    print(f"our process: {self_cpu[0] / (n + 1) * 1e3:.3f} ms user + {self_cpu[1] / (n + 1) * 1e3:.3f} ms system "
          f"of CPU per task")
    if engine.get("launcher-cpu"):
        u, s = engine["launcher-cpu"][0]
        print(f"the launcher process: {u / (n + 1) * 1e3:.3f} ms user + {s / (n + 1) * 1e3:.3f} ms system per task")
    full = [t for t in tasks.values() if all(s in t for s in STAGES)]
    print(f"{'stage':<36} {'median ms':>9} {'mean ms':>8}")
    for a, b, label, _ in (("leased", "taken", "queued on the board", None), *SPANS,
                           ("finished", "committed", "waiting for its commit", None)):
        d = [(t[b][0] - t[a][0]) * 1e3 for t in full]
        if d:
            print(f"{label:<36} {statistics.median(d):>9.3f} {statistics.fmean(d):>8.3f}")
    # scripts running at once, averaged over the time from the first spawn to the last exit
    spans = sorted((t["spawned"][0], t["exited"][0]) for t in tasks.values() if "spawned" in t and "exited" in t)
    if spans:
        t0, t1 = spans[0][0], max(e for _, e in spans)
        busy = sum(e - s for s, e in spans)
        print(f"scripts running at once: {busy / (t1 - t0):.2f} on average over {t1 - t0:.2f} s")
    for name, label, _ in ENGINE:
        d = [(b - a) * 1e3 for a, b in engine.get(name, [])]
        if d:
            print(f"{label + ' (x' + str(len(d)) + ')':<36} {statistics.median(d):>9.3f} {statistics.fmean(d):>8.3f}"
                  f"   {sum(d) / 1e3:.2f} s in all")
    return {"wall": wall}


def draw(tasks: dict, png: Path, title: str, parallel: int, window: tuple[float, float] | None = None) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no picture: pip install matplotlib)")
        return
    tasks = dict(tasks)
    engine = tasks.pop(-1, {})
    t0 = min(v[0] for t in tasks.values() for v in t.values())
    threads = sorted({t["taken"][1] for t in tasks.values() if "taken" in t})
    row = {th: i + 1 for i, th in enumerate(threads)}
    fig, (ax, occ) = plt.subplots(2, 1, figsize=(11, 3.2 + 0.45 * len(threads)), sharex=True,
                                  gridspec_kw={"height_ratios": [max(2, len(threads) + 1), 2]})
    for name, label, colour in ENGINE:
        xs = [((a - t0) * 1e3, (b - a) * 1e3) for a, b in engine.get(name, [])]
        ax.broken_barh(xs, (-0.4, 0.8), facecolors=colour, label=label, linewidth=0)
    for a, b, label, colour in SPANS:
        bars: dict[int, list] = defaultdict(list)
        for t in tasks.values():
            if a in t and b in t:
                bars[row[t["taken"][1]]].append(((t[a][0] - t0) * 1e3, (t[b][0] - t[a][0]) * 1e3))
        for r, xs in bars.items():
            ax.broken_barh(xs, (r - 0.4, 0.8), facecolors=colour, label=label if r == 1 else None, linewidth=0)
    ax.set_yticks(range(len(threads) + 1), ["engine"] + [f"worker {i + 1}" for i in range(len(threads))])
    ax.set_title(title, fontsize=10)
    if window:
        ax.set_xlim(*window)
    # scripts running over time, sampled every 0.5 ms
    events = sorted([((t["spawned"][0] - t0) * 1e3, 1) for t in tasks.values() if "spawned" in t and "exited" in t]
                    + [((t["exited"][0] - t0) * 1e3, -1) for t in tasks.values() if "spawned" in t and "exited" in t])
    xs, ys, level = [0.0], [0], 0
    for x, d in events:
        xs.append(x)
        ys.append(level)
        level += d
        xs.append(x)
        ys.append(level)
    occ.plot(xs, ys, color="#31a354", linewidth=0.6)
    occ.fill_between(xs, ys, color="#31a354", alpha=0.3, linewidth=0)
    occ.set_ylabel("scripts\nrunning", fontsize=8)
    occ.set_xlabel("ms since the first task was leased")
    occ.set_ylim(0, parallel + 0.5)
    occ.axhline(parallel, color="#999999", linewidth=0.6, linestyle="--")  # the script slots
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"picture: {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--png", type=Path, help="draw the timeline here (needs matplotlib)")
    ap.add_argument("--window", type=float, nargs=2, metavar=("FROM_MS", "TO_MS"),
                    help="draw only the tasks taken in this window (a close-up)")
    ap.add_argument("--work", type=Path, help="run in this new directory and keep it (default: a temporary "
                                               "one, deleted afterwards)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more task-pipeline flags")
    a = ap.parse_args()
    throughput.compile_package()
    print(f"# {os.cpu_count()} CPUs, python {sys.version.split()[0]}, -parallel {a.parallel}, {a.tasks} tiny tasks")
    if a.work:
        a.work.mkdir(parents=True)
        tasks, wall, self_cpu = record(a.work, a.tasks, a.parallel, a.extra)
    else:
        with tempfile.TemporaryDirectory(prefix="tp-timeline-") as d:
            tasks, wall, self_cpu = record(Path(d), a.tasks, a.parallel, a.extra)
    summarise(tasks, wall, self_cpu, a.tasks)
    if a.png:
        draw(tasks, a.png, f"{a.tasks} tiny tasks, -parallel {a.parallel}: what each worker thread does",
             a.parallel, tuple(a.window) if a.window else None)


if __name__ == "__main__":
    main()
