"""Scheduler: the async engine that `run` and `serve` share.

One loop leases tasks in batches, a dispatcher starts them while a worker is
free and their step is under its `parallel` limit, each runs on a worker thread
(`executor.execute`), and one committer records finished attempts in batches
(`state.commit`) after one flush of the store. Concurrency is anyio's: one task
group, a CapacityLimiter of `-parallel` threads, memory streams and events.
The database is reached only through `Db`, one call at a time on a thread.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Protocol

import anyio
import anyio.to_thread

from task_pipeline import housekeeping, state
from task_pipeline.errors import StoreError
from task_pipeline.executor import KILL_GRACE, Job, ProcessTable, Slots, execute
from task_pipeline.report import Summary
from task_pipeline.state import Claimed, CommitReport, Result
from task_pipeline.store import Store


MAX_WAITING = 4096     # finished results awaiting their commit before claiming pauses (bounds memory)
LOOKAHEAD = 16         # tasks leased beyond the running ones, so that a finishing worker finds the next
MAX_BATCH = 512        # results per commit transaction
COMMIT_WINDOW = 0.02   # seconds a commit waits for more results while workers are busy


class Db:
    """The store's one SQLite connection, used from one thread at a time."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self._limiter = anyio.CapacityLimiter(1)

    async def __call__(self, fn: Callable, *args, **kwargs):
        return await anyio.to_thread.run_sync(partial(fn, self.conn, *args, **kwargs), limiter=self._limiter)


class Reporter(Protocol):
    def task_started(self, c: Claimed) -> None: ...
    def committed(self, rep: CommitReport) -> None: ...
    def log(self, level: str, text: str) -> None: ...


@dataclass
class EngineOptions:
    parallel: int
    steps: frozenset[str] | None = None   # only these steps (None: all)
    fail_fast: bool = False
    until_idle: bool = True                # run: stop when the pipeline is drained; serve: wait for more
    lease: float = 30.0                    # seconds; renewed every lease/3 while alive
    poll: float = 0.25                     # serve: how often to look for work made by other processes
    grace: float = 30.0                    # on stop: how long running scripts may take to finish
    kind: str = "run"


async def run_engine(db: Db, store: Store, opts: EngineOptions, reporter: Reporter,
                     stop: anyio.Event | None = None, wake_source: Callable[[object], object] | None = None) -> Summary:
    """Process tasks until the pipeline is drained (`until_idle`) or `stop` is set.

    `wake_source(conn)`, if given, is polled every `opts.poll` seconds on the database
    thread while the engine waits (the daemon passes the database's data_version), so
    that work submitted by other processes is seen quickly without claiming in a loop.
    """
    owner = state.runner_id()
    # Every task allocates coroutines, frames and results, which sets off the cyclic garbage
    # collector thousands of times a run, each time walking every object in the heap (a
    # fifth of the CPU in a profile of tiny tasks). Nothing here makes long-lived cycles:
    # freeze what exists and collect young objects far less often.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    await db(state.register_runner, owner, opts.kind)
    await reclaim(db, store)
    procs = ProcessTable()
    slots = Slots(store.tmp)
    await anyio.to_thread.run_sync(lambda: store.empty)
    base_env = dict(os.environ)
    threads = anyio.CapacityLimiter(opts.parallel)
    send, recv = anyio.create_memory_object_stream[Result](math.inf)
    summary = Summary()
    queued: dict[str, deque[Claimed]] = {}  # leased, waiting for a worker, per step
    running: Counter = Counter()            # executing now, per step
    waiting = [0]                           # finished, not yet committed
    flags = {"stopping": False, "reclaimed": time.monotonic()}
    wake = [anyio.Event()]

    def poke() -> None:
        wake[0].set()

    def dispatch(tg) -> None:
        """Start leased tasks while a worker is free and their step is under its `parallel` limit.
        Doing the bookkeeping here, rather than with a limiter per step that every task would
        wait on, keeps a task's cost on the event loop to one thread hand-off."""
        free = opts.parallel - sum(running.values())
        for name, q in queued.items():
            if free <= 0:
                break
            limit = q[0].step.policy.parallel or opts.parallel if q else 0
            while q and free > 0 and running[name] < limit:
                c = q.popleft()
                running[name] += 1
                free -= 1
                tg.start_soon(worker, c)

    def give_back() -> None:
        """Stopping: tasks leased but not started go back to the queue (as interrupted attempts)."""
        now = time.time()
        for q in queued.values():
            while q:
                c = q.popleft()
                waiting[0] += 1
                send.send_nowait(Result(c.task_id, c.token, c.step.name, c.attempt, c.input_name, ok=False,
                                        started_at=now, finished_at=now, interrupted=True,
                                        error="not started: shutting down"))

    async def worker(c: Claimed) -> None:
        reporter.task_started(c)
        job = Job(c, store, Path(c.workdir or Path.cwd()), base_env)
        res = await anyio.to_thread.run_sync(execute, job, procs, slots, limiter=threads)
        # The worker is free now, not when the commit lands: claiming must not wait on the disk flush.
        running[c.step.name] -= 1
        waiting[0] += 1
        send.send_nowait(res)
        poke()

    async def committer() -> None:
        async with recv:
            async for first in recv:
                batch = [first]
                # Group commit: gather what finishes within a short window (or until the workers
                # go idle), so that one flush and one transaction serve many tasks.
                with anyio.move_on_after(COMMIT_WINDOW):
                    while len(batch) < MAX_BATCH and sum(running.values()) > 0:
                        batch.append(await recv.receive())
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(recv.receive_nowait())
                    except anyio.WouldBlock:
                        break
                try:
                    # Objects reach the disk before the rows that refer to them. The flush runs
                    # outside the database thread so that claiming goes on meanwhile.
                    await anyio.to_thread.run_sync(_sync, store)
                    rep = await db(state.commit, batch, owner)
                except StoreError as e:
                    summary.store_error = str(e)
                    flags["stopping"] = True
                    rep = CommitReport(requeued=batch)
                waiting[0] -= len(batch)
                for r in batch:
                    if r.interrupted and r.error and r.error.startswith("cannot"):
                        summary.store_error = summary.store_error or r.error
                        flags["stopping"] = True
                summary.absorb(rep)
                reporter.committed(rep)
                if rep.failed and opts.fail_fast:
                    flags["stopping"] = True
                poke()

    async def heartbeat() -> None:
        while True:
            await anyio.sleep(opts.lease / 3)
            await db(state.renew, owner, opts.lease)
            if await reclaim(db, store, exclude=owner):
                poke()

    async def drain_on_stop() -> None:
        assert stop is not None
        await stop.wait()
        flags["stopping"] = True
        poke()
        began = time.monotonic()
        # opts.grace is read on every turn: a second signal sets it to 0 to stop at once
        while sum(running.values()) > 0 and time.monotonic() - began < opts.grace:
            await anyio.sleep(0.05)
        if sum(running.values()) > 0:
            n = procs.signal_all(signal.SIGTERM)
            reporter.log("warning", f"grace period over: stopping {n} running script(s); their tasks go back to the queue")
            await anyio.sleep(KILL_GRACE)
            procs.signal_all(signal.SIGKILL)

    last_seen = await db(wake_source) if wake_source else None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(committer)
            tg.start_soon(heartbeat)
            if stop is not None:
                tg.start_soon(drain_on_stop)
            while True:
                if not flags["stopping"]:
                    # Lease enough to keep every worker busy plus a batch ahead, and only once half of
                    # that batch is used up, so that one claim transaction serves many tasks.
                    lookahead = max(opts.parallel, LOOKAHEAD)
                    n_queued = sum(len(q) for q in queued.values())
                    room = opts.parallel + lookahead - sum(running.values()) - n_queued
                    if waiting[0] >= MAX_WAITING or (n_queued > lookahead // 2):
                        room = 0
                    if room > 0:
                        caps = partial(_caps, opts=opts, running=running, queued=queued)
                        for c in await db(state.claim, owner, caps, room, opts.lease):
                            queued.setdefault(c.step.name, deque()).append(c)
                    dispatch(tg)
                else:
                    give_back()
                total = sum(running.values()) + sum(len(q) for q in queued.values()) + waiting[0]
                timeout: float | None = None  # None: until poked (a worker or commit finished) or new work appears
                if total == 0:
                    if flags["stopping"]:
                        break
                    ol = await db(state.outlook, opts.steps)
                    if opts.until_idle and ol.runnable == 0 and ol.next_due is None and ol.running == 0:
                        break
                    if ol.runnable == 0 and ol.running > 0 and time.monotonic() - flags["reclaimed"] > 1:
                        # only others' tasks are left: take back at once those of runners that died
                        flags["reclaimed"] = time.monotonic()
                        if await reclaim(db, store, exclude=owner):
                            continue
                    if ol.runnable:
                        timeout = 0.05  # someone else got there first; look again shortly
                    elif ol.next_due is not None:
                        timeout = max(0.01, ol.next_due - time.time())  # a retry's backoff ends
                    elif opts.until_idle:
                        timeout = 0.5  # others are running the rest: their commits may make more
                if wake_source is not None and not flags["stopping"]:
                    # Other processes make work too (submit): watch a cheap read-only value for it.
                    deadline = math.inf if timeout is None else time.monotonic() + timeout
                    while not wake[0].is_set() and time.monotonic() < deadline:
                        with anyio.move_on_after(min(opts.poll, deadline - time.monotonic())):
                            await wake[0].wait()
                        seen = await db(wake_source)
                        if seen != last_seen:
                            last_seen = seen
                            break
                else:
                    with anyio.move_on_after(math.inf if timeout is None else timeout):
                        await wake[0].wait()
                wake[0] = anyio.Event()
            send.close()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await db(state.unregister_runner, owner)
            await anyio.to_thread.run_sync(slots.close)
    summary.elapsed = time.monotonic() - summary.started
    return summary


async def reclaim(db: Db, store: Store, exclude: str | None = None) -> int:
    """Re-queue the tasks of dead runners, after killing the scripts they left running and removing
    their scratch (so that a re-queued task never runs in two places at once)."""
    await db(housekeeping.reap_dead_scratch, store)
    return await db(state.recover, exclude=exclude)


def _sync(store: Store) -> None:
    try:
        store.sync()
    except OSError as e:
        raise StoreError(f"cannot flush the store to disk: {e.strerror}") from None


def _caps(pipe: state.Pipeline, *, opts: EngineOptions, running: Counter,
          queued: dict[str, deque]) -> dict[str, int]:
    """How many more tasks each step may lease now: its limit plus a look-ahead batch waiting, so that
    a finishing worker finds the next task ready. Downstream steps come first, so that items flow to
    the end rather than piling up at the start."""
    caps: dict[str, int] = {}
    for step in reversed(pipe.active):
        if opts.steps is not None and step.name not in opts.steps:
            continue
        have = running[step.name] + len(queued.get(step.name, ()))
        n = min(step.policy.parallel or opts.parallel, opts.parallel) + max(opts.parallel, LOOKAHEAD) - have
        if n > 0:
            caps[step.name] = n
    return caps
