"""Scheduler: the async engine that `run` and `serve` share.

The event loop leases tasks in batches and commits results in batches; in
between, `-parallel` worker threads take leased tasks from a shared `Board`
(respecting each step's `parallel` limit), run them (`executor.execute`) and
post the results, without a trip through the event loop per task. The
committer flushes the store once per batch, then records the batch in one
transaction (`state.commit`). The database is reached only through `Db`, one
call at a time on a thread. Structured concurrency is anyio's: one task group
holds the leasing loop, the committer, the heartbeat, the drain and the workers.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Protocol

import anyio
import anyio.from_thread
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


class Board:
    """Leased tasks and finished results, shared by the worker threads and the event loop.

    Workers are threads that loop here: take the next task whose step is under its
    `parallel` limit, run it, post the result, take the next. Keeping that loop off the
    event loop matters for tiny tasks: a trip through asyncio and anyio per task (a thread
    hand-off, limiters, cancel scopes) cost more CPU than the rest of the engine. The event
    loop only hears about it when it has something to do: leasing more (the queue ran low)
    or committing (the first result of a batch).
    """

    def __init__(self, parallel: int, lookahead: int) -> None:
        self.parallel, self.lookahead = parallel, lookahead
        self.cond = threading.Condition()
        self.queued: dict[str, deque[Claimed]] = {}
        self.running: Counter = Counter()
        self.results: list[Result] = []
        self.closed = False

    def add(self, claimed: list[Claimed]) -> None:
        with self.cond:
            for c in claimed:
                self.queued.setdefault(c.step.name, deque()).append(c)
            self.cond.notify_all()

    def take(self) -> Claimed | None:
        """The next task to run (downstream steps first), waiting for one; None once closed."""
        with self.cond:
            while not self.closed:
                for name, q in self.queued.items():
                    if q and self.running[name] < (q[0].step.policy.parallel or self.parallel):
                        self.running[name] += 1
                        return q.popleft()
                self.cond.wait()
            return None

    def finish(self, c: Claimed, res: Result) -> bool:
        """Post a result; True if the event loop should hear of it now."""
        with self.cond:
            self.running[c.step.name] -= 1
            self.results.append(res)
            self.cond.notify_all()  # a step slot is free: a worker waiting for it may go on
            return len(self.results) == 1 or self.n_queued <= self.lookahead // 2

    def collect(self) -> list[Result]:
        with self.cond:
            out, self.results = self.results, []
            return out

    def close(self) -> list[Claimed]:
        """No more tasks are handed out; returns the ones leased but not started."""
        with self.cond:
            self.closed = True
            left = [c for q in self.queued.values() for c in q]
            self.queued.clear()
            self.cond.notify_all()
            return left

    @property
    def n_queued(self) -> int:
        return sum(len(q) for q in self.queued.values())

    @property
    def busy(self) -> int:
        """Tasks leased, running or with results not yet collected."""
        with self.cond:
            return self.n_queued + sum(self.running.values()) + len(self.results)

    def snapshot(self) -> tuple[Counter, dict[str, int]]:
        with self.cond:
            return Counter(self.running), {k: len(q) for k, q in self.queued.items()}


async def run_engine(db: Db, store: Store, opts: EngineOptions, reporter: Reporter,
                     stop: anyio.Event | None = None, wake_source: Callable[[object], object] | None = None) -> Summary:
    """Process tasks until the pipeline is drained (`until_idle`) or `stop` is set.

    `wake_source(conn)`, if given, is polled every `opts.poll` seconds on the database
    thread while the engine waits (the daemon passes the database's data_version), so
    that work submitted by other processes is seen quickly without claiming in a loop.
    """
    owner = state.runner_id()
    # Every task allocates frames and results, which sets off the cyclic garbage collector
    # thousands of times a run, each time walking every object in the heap (a fifth of the
    # CPU in a profile of tiny tasks). Nothing here makes long-lived cycles: freeze what
    # exists and collect young objects far less often.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    await db(state.register_runner, owner, opts.kind)
    await reclaim(db, store)
    procs = ProcessTable()
    slots = Slots(store.tmp)
    await anyio.to_thread.run_sync(lambda: store.empty)
    base_env = dict(os.environ)
    lookahead = max(opts.parallel, LOOKAHEAD)
    board = Board(opts.parallel, lookahead)
    threads = anyio.CapacityLimiter(opts.parallel)
    summary = Summary()
    committing = [0]   # results collected from the board, being committed
    flags = {"stopping": False, "reclaimed": time.monotonic()}
    wake = [anyio.Event()]      # the main loop: lease more, or decide we are done
    results = [anyio.Event()]   # the committer: results are waiting

    def poke() -> None:
        wake[0].set()
        results[0].set()

    def work() -> None:
        """A worker thread's life: run tasks until the board closes."""
        while (c := board.take()) is not None:
            reporter.task_started(c)
            res = execute(Job(c, store, Path(c.workdir or Path.cwd()), base_env), procs, slots)
            if board.finish(c, res):
                anyio.from_thread.run_sync(poke)

    async def worker() -> None:
        await anyio.to_thread.run_sync(work, limiter=threads)

    def give_back(claimed: list[Claimed]) -> list[Result]:
        """Stopping: tasks leased but not started go back to the queue (as interrupted attempts)."""
        now = time.time()
        return [Result(c.task_id, c.token, c.step.name, c.attempt, c.input_name, ok=False, started_at=now,
                       finished_at=now, interrupted=True, error="not started: shutting down") for c in claimed]

    async def commit(batch: list[Result]) -> None:
        committing[0] += len(batch)
        try:
            # Objects reach the disk before the rows that refer to them. The flush runs
            # outside the database thread so that claiming goes on meanwhile.
            await anyio.to_thread.run_sync(_sync, store)
            rep = await db(state.commit, batch, owner)
        except StoreError as e:
            summary.store_error = str(e)
            flags["stopping"] = True
            rep = CommitReport(requeued=batch)
        finally:
            committing[0] -= len(batch)
        for r in batch:
            if r.store_trouble:
                summary.store_error = summary.store_error or r.error
                flags["stopping"] = True
        summary.absorb(rep)
        reporter.committed(rep)
        if rep.failed and opts.fail_fast:
            flags["stopping"] = True
        wake[0].set()

    async def committer() -> None:
        while True:
            await results[0].wait()
            results[0] = anyio.Event()
            # Group commit: let a batch gather while workers are busy, so that one flush and
            # one transaction serve many tasks.
            if sum(board.snapshot()[0].values()) > 0:
                await anyio.sleep(COMMIT_WINDOW)
            batch = board.collect()
            if batch:
                await commit(batch)

    async def heartbeat() -> None:
        while True:
            await anyio.sleep(opts.lease / 3)
            await db(state.renew, owner, opts.lease)
            if await reclaim(db, store, exclude=owner):
                wake[0].set()

    async def drain_on_stop() -> None:
        assert stop is not None
        await stop.wait()
        flags["stopping"] = True
        wake[0].set()
        began = time.monotonic()
        # opts.grace is read on every turn: a second signal sets it to 0 to stop at once
        while sum(board.snapshot()[0].values()) > 0 and time.monotonic() - began < opts.grace:
            await anyio.sleep(0.05)
        if sum(board.snapshot()[0].values()) > 0:
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
            for _ in range(opts.parallel):
                tg.start_soon(worker)
            while True:
                if not flags["stopping"]:
                    # Lease enough to keep every worker busy plus a batch ahead, and only once half of
                    # that batch is used up, so that one claim transaction serves many tasks.
                    running, queued = board.snapshot()
                    n_queued = sum(queued.values())
                    room = opts.parallel + lookahead - sum(running.values()) - n_queued
                    if committing[0] + len(board.results) >= MAX_WAITING or n_queued > lookahead // 2:
                        room = 0
                    if room > 0:
                        caps = partial(_caps, opts=opts, running=running, queued=queued)
                        board.add(await db(state.claim, owner, caps, room, opts.lease))
                else:
                    left = board.close()
                    if left:
                        await commit(give_back(left))
                total = board.busy + committing[0]
                timeout: float | None = None  # None: until poked (a result, a commit) or new work appears
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
            board.close()
            tg.cancel_scope.cancel()
    finally:
        board.close()
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
          queued: dict[str, int]) -> dict[str, int]:
    """How many more tasks each step may lease now: its limit plus a look-ahead batch waiting, so that
    a finishing worker finds the next task ready. Downstream steps come first, so that items flow to
    the end rather than piling up at the start."""
    caps: dict[str, int] = {}
    for step in reversed(pipe.active):
        if opts.steps is not None and step.name not in opts.steps:
            continue
        have = running[step.name] + queued.get(step.name, 0)
        n = min(step.policy.parallel or opts.parallel, opts.parallel) + max(opts.parallel, LOOKAHEAD) - have
        if n > 0:
            caps[step.name] = n
    return caps
