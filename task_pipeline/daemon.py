"""The daemon (`serve`) and the way work reaches it from outside (`submit`) (SPEC section 7).

`serve` registers the manifest and then runs the same engine as `run`
(scheduler.run_engine) with `until_idle=False`, next to three small watchers:

- signals: SIGTERM/SIGINT set the engine's `stop` event (drain: no new claims,
  running scripts get --grace seconds, then their process groups are killed and
  their tasks re-queued); SIGHUP re-reads the manifest;
- the manifest file: its (mtime, size, inode) is checked every second and a
  change re-registers it; a manifest that no longer parses is one error line and
  the pipeline registered before keeps running;
- schedules: a start step with `schedule` is seeded at once and then every
  interval, each tick under a runset named by its UTC time, so identical outputs
  land on existing tasks and nothing unchanged runs twice downstream.

Work from other processes (`submit`, `retry`, `invalidate`) is a commit on
another SQLite connection, which changes `PRAGMA data_version` on ours; the
engine polls that (cheaply, every 0.25 s) through `wake_source`. Our own seeds
and reloads bump a counter that is part of the same value.

`submit STEP FILE...` / `submit --route FILE...`: each file becomes an object
named by its base name; `-` reads standard input into one object named `stdin`
(only with a STEP: that name routes nowhere).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from argparse import Namespace
from pathlib import Path

import anyio
import anyio.to_thread

from task_pipeline import state
from task_pipeline.commands import need_manifest, open_store, report_registration, report_tainted
from task_pipeline.errors import ManifestError, UsageError
from task_pipeline.manifest import Manifest, load_manifest
from task_pipeline.report import Output
from task_pipeline.routing import route_key
from task_pipeline.scheduler import Db, EngineOptions, run_engine
from task_pipeline.state import CommitReport
from task_pipeline.store import Store

MANIFEST_POLL = 1.0   # seconds between checks of the manifest file
STDIN_NAME = "stdin"  # the input name of `submit STEP -`


# -- serve ---------------------------------------------------------------------------


class DaemonReporter:
    """One log line per finished task (plain or JSON lines); no progress display."""

    def __init__(self, out: Output) -> None:
        self.o = out
        self.unrouted_seen: set[str] = set()

    def task_started(self, c: state.Claimed) -> None:
        self.o.log("debug", f"[{c.step.name}#{c.task_id}] start {c.input_name or '(start)'} attempt {c.attempt}")

    def committed(self, rep: CommitReport) -> None:
        for r in rep.done:
            self.o.log("info", f"[{r.step}#{r.task_id}] {r.input_name or '(start)'} done in "
                               f"{r.finished_at - r.started_at:.2f}s, {len(r.outputs)} output(s)")
        for r in rep.retrying:
            self.o.log("warning", f"[{r.step}#{r.task_id}] {r.input_name or '(start)'} attempt {r.attempt} failed "
                                  f"({r.error}); retrying")
        for r in rep.failed:
            self.o.log("error", f"[{r.step}#{r.task_id}] {r.input_name or '(start)'} failed: {r.error}"
                                + (f": {r.stderr_tail}" if r.stderr_tail else ""))
        for r in rep.requeued:
            self.o.log("info", f"[{r.step}#{r.task_id}] {r.input_name or '(start)'} re-queued ({r.error})")
        for key in sorted(rep.unrouted):
            if key not in self.unrouted_seen:
                self.unrouted_seen.add(key)
                self.o.log("warning", f"unrouted: outputs with route key '{key}' went nowhere: no step consumes it; "
                                      f"they are kept as terminal outputs")

    def log(self, level: str, text: str) -> None:
        self.o.log(level, text)


def tick_name(t: float, interval: float) -> str:
    """The runset of a schedule tick: its UTC time, with milliseconds only for sub-second schedules."""
    name = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
    if interval < 1:
        name += f".{int((t % 1) * 1000):03d}"
    return name + "Z"


def _file_id(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class Daemon:
    def __init__(self, a: Namespace, out: Output, manifest: Manifest, conn, store: Store) -> None:
        self.a, self.out, self.manifest, self.store = a, out, manifest, store
        self.db = Db(conn)
        self.path = Path(a.manifest)
        self.file_id = _file_id(self.path)
        self.ticks = [0]              # bumped after our own seeds and reloads: part of the engine's wake value
        self.reload_now = anyio.Event()
        self.stop = anyio.Event()
        self.next_tick: dict[str, tuple[float, float]] = {}   # step -> (interval, next due, monotonic)
        self.opts = EngineOptions(parallel=a.parallel or os.cpu_count() or 1, until_idle=False, kind="serve",
                                  grace=a.grace, steps=frozenset(a.step) if a.step else None)

    def wake_value(self, conn):
        # data_version changes when another connection commits (a submit, a retry); ticks when we seed or reload
        return conn.execute("PRAGMA data_version").fetchone()[0], self.ticks[0]

    def selected(self, name: str) -> bool:
        return self.opts.steps is None or name in self.opts.steps

    # -- the manifest --------------------------------------------------------------

    async def seed_unscheduled(self) -> None:
        """Start steps without a schedule run once per version, under -runset (default: none)."""
        names = [s.name for s in self.manifest.start_steps if s.schedule is None and self.selected(s.name)]
        if names and await self.db(state.seed_start, names, self.a.runset):
            self.ticks[0] += 1

    async def reload(self, why: str) -> None:
        self.file_id = _file_id(self.path)
        try:
            manifest = await anyio.to_thread.run_sync(load_manifest, self.path)
        except ManifestError as e:
            self.out.log("error", f"manifest not reloaded ({why}): {e}; still running the previous one")
            return
        reg = await self.db(state.register, manifest)
        self.manifest = manifest
        changed = [f"{name} v{new}" for name, _, new in reg.new_versions]
        self.out.log("info", f"manifest reloaded ({why})" + (f": {', '.join(changed)}" if changed else ": no new versions"))
        report_registration(reg, self.out)
        report_tainted(reg.tainted, self.a, self.out)
        await self.seed_unscheduled()
        self.ticks[0] += 1

    async def watch_manifest(self) -> None:
        while not self.stop.is_set():
            with anyio.move_on_after(MANIFEST_POLL):
                await self.reload_now.wait()
            if self.stop.is_set():
                return
            if self.reload_now.is_set():
                self.reload_now = anyio.Event()
                await self.reload("SIGHUP")
            elif _file_id(self.path) != self.file_id:
                await self.reload("file changed")

    # -- schedules -----------------------------------------------------------------

    async def run_schedules(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            want = {s.name: s.schedule for s in self.manifest.start_steps
                    if s.schedule is not None and self.selected(s.name)}
            for name in list(self.next_tick):
                if name not in want or self.next_tick[name][0] != want[name]:
                    del self.next_tick[name]     # gone, or a new interval: tick now and restart the clock
            due = []
            for name, interval in want.items():
                if name not in self.next_tick:
                    self.next_tick[name] = (interval, now)
                if self.next_tick[name][1] <= now:
                    due.append(name)
            if due:
                wall = time.time()
                for name in due:
                    interval, at = self.next_tick[name]
                    runset = tick_name(wall, interval)
                    made = await self.db(state.seed_start, [name], runset)
                    self.out.log("info" if made else "debug", f"schedule: {name} runs under runset {runset}")
                    # the next tick keeps to the grid; ticks missed while busy are skipped, not made up
                    nxt = at + interval
                    while nxt <= now:
                        nxt += interval
                    self.next_tick[name] = (interval, nxt)
                self.ticks[0] += 1
            nearest = min((t for _, t in self.next_tick.values()), default=now + MANIFEST_POLL)
            # wake at least every second so that a reloaded manifest's schedules take effect
            with anyio.move_on_after(max(0.0, min(nearest - time.monotonic(), MANIFEST_POLL))):
                await self.stop.wait()

    # -- signals and the whole ----------------------------------------------------------

    async def watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            self.signals_ready.set()
            async for sig in signals:
                if sig == signal.SIGHUP:
                    self.reload_now.set()
                elif self.stop.is_set():
                    self.out.log("warning", f"{signal.Signals(sig).name} again: running scripts get no more time")
                    self.opts.grace = 0
                else:
                    self.out.log("info", f"{signal.Signals(sig).name}: stopping; no new tasks, running ones get "
                                         f"{self.opts.grace:g}s (signal again to stop them now)")
                    self.stop.set()

    async def main(self):
        self.signals_ready = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.watch_signals)
            await self.signals_ready.wait()
            await self.seed_unscheduled()
            tg.start_soon(self.watch_manifest)
            tg.start_soon(self.run_schedules)
            self.out.log("info", f"serving {self.path} on {self.a.db} (pid {os.getpid()}, parallel {self.opts.parallel}); "
                                 f"SIGHUP reloads, SIGTERM stops")
            summary = await run_engine(self.db, self.store, self.opts, DaemonReporter(self.out),
                                       stop=self.stop, wake_source=self.wake_value)
            tg.cancel_scope.cancel()
        return summary


def cmd_serve(a: Namespace, out: Output) -> int:
    if a.args:
        raise UsageError("usage: task-pipeline serve -manifest M -db D [-parallel N] [--grace S] [--log-format F]")
    if a.grace < 0:
        raise UsageError(f"--grace must be 0 or more seconds (got {a.grace:g})")
    if out.log_format == "auto":
        out.log_format = "plain"   # a daemon's log wants timestamps even on a terminal
    manifest = need_manifest(a)
    if a.step:
        unknown = [s for s in a.step if s not in manifest.names]
        if unknown:
            raise UsageError(f"-step {unknown[0]}: no such step in {manifest.path} (steps: {', '.join(manifest.names)})")
    conn, store = open_store(a, create=True)
    reg = state.register(conn, manifest)
    report_registration(reg, out)
    report_tainted(reg.tainted, a, out)
    summary = anyio.run(Daemon(a, out, manifest, conn, store).main)
    if summary.store_error:
        out.log("error", summary.store_error)
    out.log("info", f"stopped: ran {summary.ran} task(s) in {summary.elapsed:.0f}s: {sum(summary.done.values())} done, "
                    f"{len(summary.failed)} failed" + (f", {summary.requeued} re-queued" if summary.requeued else ""))
    return 3 if summary.store_error else 0


# -- submit --------------------------------------------------------------------------


def cmd_submit(a: Namespace, out: Output) -> int:
    usage = "usage: task-pipeline submit STEP FILE... | submit --route FILE...  (FILE '-' reads stdin)"
    if a.route:
        step, files = None, list(a.args)
    else:
        if len(a.args) < 2:
            raise UsageError(usage + "; name the step, or pass --route to route by file name" if a.args else usage)
        step, files = a.args[0], a.args[1:]
    if not files:
        raise UsageError(usage)
    if files.count("-") > 1:
        raise UsageError("'-' (stdin) can be given only once")
    if "-" in files and step is None:
        raise UsageError("'-' (stdin) has no file name to route by; name the step: submit STEP -")
    for f in files:
        if f != "-" and not os.path.isfile(f):
            why = "no such file" if not os.path.exists(f) else "not a regular file"
            raise UsageError(f"{f}: {why}")

    conn, store = open_store(a)
    pipe = state.load_pipeline(conn)
    if step is not None:
        pipe.require(step)
    names = [STDIN_NAME if f == "-" else os.path.basename(os.path.abspath(f)) for f in files]
    if step is None:
        for f, name in zip(files, names):
            if not pipe.router.consumers(name):
                raise UsageError(f"{f}: its route key '{route_key(name)}' is consumed by no step; "
                                 f"name the step: submit STEP FILE")

    items = []
    for f, name in zip(files, names):
        h, size = store.ingest_stream(sys.stdin.buffer) if f == "-" else store.ingest_path(Path(f))
        items.append((name, h, size, step))
    report = state.submit(conn, items, a.runset)
    rows = []
    for f, (name, h, size, _), (_, made) in zip(files, items, report):
        rows.append({"file": f, "name": name, "hash": h, "size": size, "new_tasks": made})
        if not a.json:
            label = "stdin" if f == "-" else f
            if made:
                print(f"{label}: queued for {', '.join(made)} ({h[:12]})")
            else:
                print(f"{label}: already known ({h[:12]}); no new task")
    if a.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    return 0
