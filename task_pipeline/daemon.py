"""The daemon (`serve`): the engine of `run`, kept going, with what a long-lived process needs (SPEC section 7).

`Daemon.main` runs the same engine as `run` (scheduler.run_engine) with
`until_idle=False`, next to three small watchers:

- signals: SIGTERM/SIGINT set the engine's `stop` event (drain: no new claims,
  running scripts get --grace seconds, then their process groups are killed and
  their tasks re-queued); SIGHUP re-reads the manifest;
- the manifest file: its (mtime, size, inode) is checked every second and a
  change re-registers it; a manifest that no longer parses is one error line and
  the pipeline registered before keeps running;
- schedules: a start step with `schedule` is seeded at once and then every
  interval, each tick under a runset named by its UTC time, so identical outputs
  land on existing tasks and nothing unchanged runs twice downstream.

Work from other processes (`submit`, `retry`, `invalidate`, commits of runners on
other hosts) reaches an idle engine through the database's watcher (SQLite's
data_version, PostgreSQL's LISTEN/NOTIFY), with polling as the fallback. A lost
database connection is one line and a retry with backoff, not an exit.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import anyio
import anyio.to_thread

from task_pipeline import state
from task_pipeline.errors import ManifestError, UsageError
from task_pipeline.manifest import Manifest, load_manifest
from task_pipeline.scheduler import Db, EngineOptions, Reporter, run_engine
from task_pipeline.state import Summary
from task_pipeline.store import ObjectStore

MANIFEST_POLL = 1.0   # seconds between checks of the manifest file


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


@dataclass
class Daemon:
    db: Db
    store: ObjectStore
    opts: EngineOptions
    manifest: Manifest
    path: Path
    runset: str
    reporter: Reporter
    on_registered: Callable[[state.Registration], None]   # says what a reload changed
    where: str = ""                                         # the store, for the first log line
    http: Callable[[anyio.Event], Awaitable[None]] | None = None   # serve --http: runs until stop is set

    def __post_init__(self) -> None:
        self.file_id = _file_id(self.path)
        self.reload_now = anyio.Event()
        self.stop = anyio.Event()
        self.next_tick: dict[str, tuple[float, float]] = {}   # step -> (interval, next due, monotonic)
        self.signal: int | None = None

    def selected(self, name: str) -> bool:
        return self.opts.steps is None or name in self.opts.steps

    # -- the manifest --------------------------------------------------------------

    async def seed_unscheduled(self) -> None:
        """Start steps without a schedule run once per version, under -runset (default: none)."""
        names = [s.name for s in self.manifest.start_steps if s.schedule is None and self.selected(s.name)]
        if names:
            await self.db(state.seed_start, names, self.runset)

    async def reload(self, why: str) -> None:
        self.file_id = _file_id(self.path)
        try:
            manifest = await anyio.to_thread.run_sync(load_manifest, self.path)
        except ManifestError as e:
            self.reporter.log("error", f"manifest not reloaded ({why}): {e}; still running the previous one")
            return
        try:
            reg = await self.db(state.register, manifest)
        except UsageError as e:
            self.reporter.log("error", f"manifest not reloaded ({why}): {e}; still running the previous one")
            return
        self.manifest = manifest
        changed = [f"{name} v{new}" for name, _, new in reg.new_versions]
        self.reporter.log("info", f"manifest reloaded ({why})" + (f": {', '.join(changed)}" if changed else ": no new versions"))
        self.on_registered(reg)
        await self.seed_unscheduled()

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
                    self.reporter.log("info" if made else "debug", f"schedule: {name} runs under runset {runset}")
                    # the next tick keeps to the grid; ticks missed while busy are skipped, not made up
                    nxt = at + interval
                    while nxt <= now:
                        nxt += interval
                    self.next_tick[name] = (interval, nxt)
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
                    self.reporter.log("warning", f"{signal.Signals(sig).name} again: running scripts get no more time")
                    self.opts.grace = 0
                else:
                    self.signal = sig
                    self.reporter.log("info", f"{signal.Signals(sig).name}: stopping; no new tasks, running ones get "
                                              f"{self.opts.grace:g}s (signal again to stop them now)")
                    self.stop.set()

    async def main(self) -> Summary:
        self.signals_ready = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.watch_signals)
            await self.signals_ready.wait()
            await self.seed_unscheduled()
            tg.start_soon(self.watch_manifest)
            tg.start_soon(self.run_schedules)
            if self.http is not None:
                tg.start_soon(self.http, self.stop)
            self.reporter.log("info", f"serving {self.path} on {self.where} (pid {os.getpid()}, parallel "
                                      f"{self.opts.parallel}); SIGHUP reloads, SIGTERM stops")
            summary = await run_engine(self.db, self.store, self.opts, self.reporter, stop=self.stop, watch=True)
            tg.cancel_scope.cancel()
        return summary
