"""Scheduler: the async engine that `run` and `serve` share.

The event loop leases tasks in batches and commits results in batches; in
between, `-parallel` worker threads take leased tasks from a shared `Board`
(respecting each step's `parallel` limit), run them (`executor.execute`) and
post the results, without a trip through the event loop per task. The
committer flushes the store once per batch, then records the batch in one
transaction (`state.commit`), together with which scripts have started (so
that `status` counts running scripts, not leases). The database is reached
only through `Db`, one call at a time on a thread. Structured concurrency is
anyio's: one task group holds the leasing loop, the committer, the heartbeat,
the drain and the workers.

Leases. The heartbeat renews this runner's leases on a connection of its own
(it must never queue behind a long commit) every lease/6 seconds. If it cannot
renew for 4/5 of a lease (the database locked or unreachable), this runner
stops its scripts and gives their tasks up: by the time their leases expire
and another runner takes them, nothing of ours is running them. A renewal that
finds a task taken by someone else stops that task's script at once.

Gather steps get their tasks from the main loop, through a `Gatherer`
(gatherer.py): when the engine is idle, and now and then while results commit.

Failure inside the engine (a worker thread that dies, a heartbeat that
raises) never leaves it waiting: it stops claiming, gives back what it holds,
and the run ends with the error.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import signal
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Protocol

import anyio
import anyio.from_thread
import anyio.to_thread

from task_pipeline import housekeeping, state, timeline
from task_pipeline.db import Database, DatabaseUnavailable
from task_pipeline.errors import StoreError
from task_pipeline.executor import KILL_GRACE, Job, ProcessTable, Slots, execute
from task_pipeline.gatherer import Gatherer
from task_pipeline.state import Claimed, CommitReport, Result, Summary
from task_pipeline.store import ObjectStore

MAX_WAITING = 4096     # finished results awaiting their commit before claiming pauses (bounds memory)
WORKERS_PER_SCRIPT = 2  # workers per script slot: the others prepare inputs and store outputs meanwhile
LOOKAHEAD = 16         # tasks leased beyond the running ones, so that a finishing worker finds the next...
LEASE_AHEAD = 0.25     # ...or, once tasks are seen to be short, this many seconds of work (at most MAX_AHEAD)
MAX_AHEAD = 256
MAX_BATCH = 512        # results per commit transaction
COMMIT_WINDOW = 0.02   # seconds a commit waits for more results while workers are busy
STARTED_FLUSH = 0.5    # seconds within which started scripts are recorded when nothing finishes
IDLE_POLL = 1.0        # serve: look for work at least this often even if no notification came
RECONNECT_MAX = 30.0   # serve: longest wait between attempts to reach a lost database
STORE_PAUSE = 30.0     # serve: how long a full store stops new claims before it is tried again


class Db:
    """The store's database connection, used from one thread at a time.

    With `persist` (serve), a lost connection is one warning line and a reconnection with
    backoff, after which the call is made again: every state function is one transaction,
    and a commit replayed after its reply was lost changes nothing (its tokens are spent).
    """

    def __init__(self, db: Database, *, persist: bool = False, log: Callable[[str, str], None] | None = None) -> None:
        self.db = db
        self.persist = persist
        self.log = log or (lambda level, text: None)
        self._limiter = anyio.CapacityLimiter(1)

    async def __call__(self, fn: Callable, *args, **kwargs):
        delay = 1.0
        while True:
            try:
                return await anyio.to_thread.run_sync(partial(fn, self.db, *args, **kwargs), limiter=self._limiter)
            except DatabaseUnavailable as e:
                if not self.persist:
                    raise
                self.log("warning", f"{e}; trying again in {delay:.0f}s")
            await anyio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)
            try:
                await anyio.to_thread.run_sync(self.db.reconnect, limiter=self._limiter)
                self.log("info", f"reconnected to the database {self.db.name}")
                delay = 1.0
            except DatabaseUnavailable:
                pass


class Reporter(Protocol):
    def task_started(self, c: Claimed) -> None: ...
    def committed(self, rep: CommitReport) -> None: ...
    def log(self, level: str, text: str) -> None: ...


@dataclass
class EngineOptions:
    parallel: int
    scratch: Path
    steps: frozenset[str] | None = None   # only these steps (None: all)
    fail_fast: bool = False
    until_idle: bool = True                # run: stop when the pipeline is drained; serve: wait for more
    lease: float = 60.0                    # seconds; renewed every lease/6 while alive
    grace: float = 30.0                    # on stop: how long running scripts may take to finish
    kind: str = "run"
    persist: bool = False                  # serve: outlive a lost database connection
    env_drop: tuple[str, ...] = ()         # variables of ours that scripts must not see (secrets)
    scratch_shared: bool = True            # scratch inside a store directory other hosts might mount too


class Board:
    """Leased tasks and finished results, shared by the worker threads and the event loop.

    Workers are threads that loop here: take the next task whose step is under its
    `parallel` limit, run it, post the result, take the next. Keeping that loop off the
    event loop matters for tiny tasks: a trip through asyncio and anyio per task (a thread
    hand-off, limiters, cancel scopes) cost more CPU than the rest of the engine. The event
    loop only hears about it when it has something to do: leasing more (the queue ran low)
    or committing (the first result of a batch).
    """

    def __init__(self, parallel: int, lookahead: int, scripts: int | None = None) -> None:
        self.parallel, self.lookahead = parallel, lookahead
        self.scripts = scripts or parallel
        self.took = 0.0                       # seconds a task takes, a moving average
        self.cond = threading.Condition()
        self.queued: dict[str, deque[Claimed]] = {}
        self.running: Counter = Counter()
        self.results: list[Result] = []
        self.held: dict[int, int] = {}        # every task leased and not yet committed: id -> token
        self.started: dict[int, int] = {}     # scripts started since the last commit: id -> token
        self.lost: set[int] = set()           # tasks whose lease went to another runner
        self.dropped: list[Claimed] = []      # leased, never started, taken off the queue: to give back
        self.closed = False
        self.fatal: BaseException | None = None

    def add(self, claimed: list[Claimed]) -> None:
        with self.cond:
            for c in claimed:
                self.queued.setdefault(c.step.name, deque()).append(c)
                self.held[c.task_id] = c.token
                timeline.mark(c.task_id, "leased")
            self.cond.notify_all()

    def take(self) -> Claimed | None:
        """The next task to run (downstream steps first), waiting for one; None once closed."""
        with self.cond:
            while not self.closed:
                for name, q in self.queued.items():
                    if q and self.running[name] < (q[0].step.policy.parallel or self.parallel):
                        self.running[name] += 1
                        c = q.popleft()
                        self.started[c.task_id] = c.token
                        timeline.mark(c.task_id, "taken")
                        return c
                self.cond.wait()
            return None

    def finish(self, c: Claimed, res: Result) -> bool:
        """Post a result; True if the event loop should hear of it now."""
        with self.cond:
            self.running[c.step.name] -= 1
            self.results.append(res)
            took = res.finished_at - res.started_at
            self.took = took if not self.took else 0.9 * self.took + 0.1 * took
            self.cond.notify_all()  # a step slot is free: a worker waiting for it may go on
            return len(self.results) == 1 or self.n_queued <= self.ahead // 2

    @property
    def ahead(self) -> int:
        """How many tasks to keep leased beyond the running ones. Tiny tasks get a longer queue, so that
        one claim serves many of them; long ones the minimum, so that several runners on one store
        share them out rather than one runner holding what it cannot start for a while."""
        if not self.took:
            return self.lookahead
        return max(self.lookahead, min(MAX_AHEAD, int(self.scripts * LEASE_AHEAD / max(self.took, 1e-4))))

    def collect(self, limit: int = MAX_BATCH) -> tuple[list[Result], dict[int, int]]:
        with self.cond:
            out, self.results = self.results[:limit], self.results[limit:]
            started, self.started = self.started, {}
            return out, started

    def committed(self, results: list[Result]) -> None:
        with self.cond:
            for r in results:
                self.held.pop(r.task_id, None)

    def drop_lost(self, still: set[int]) -> set[int]:
        """Forget the tasks whose leases we may no longer hold (all but `still`); returns their ids.

        Queued ones come off the queue and stop being renewed; the event loop gives them back
        (a give-back whose lease did pass on changes nothing). Running ones are the caller's to stop."""
        with self.cond:
            lost = {t for t in self.held if t not in still}
            if lost:
                for q in self.queued.values():
                    for c in [c for c in q if c.task_id in lost]:
                        q.remove(c)
                        self.held.pop(c.task_id, None)
                        self.dropped.append(c)
                self.lost |= lost
            return lost

    def take_dropped(self) -> list[Claimed]:
        with self.cond:
            out, self.dropped = self.dropped, []
            return out

    def fail(self, e: BaseException) -> None:
        with self.cond:
            if self.fatal is None:
                self.fatal = e
            self.cond.notify_all()

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


def _boot_clock() -> float:
    """Seconds that keep counting while the machine is suspended (monotonic() stops then): a
    lease expires during a suspend too."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass
class _Flags:
    stopping: bool = False
    reclaimed: float = field(default_factory=time.monotonic)
    renewed: float = field(default_factory=_boot_clock)
    paused_until: float = 0.0   # serve: no new claims until then (the store was full)


async def run_engine(db: Db, store: ObjectStore, opts: EngineOptions, reporter: Reporter,
                     stop: anyio.Event | None = None, watch: bool = False) -> Summary:
    """Process tasks until the pipeline is drained (`until_idle`) or `stop` is set.

    With `watch`, an idle engine waits for other processes to make work (a submit, a
    retry, a commit on another host) through the database's watcher, and looks at least
    every IDLE_POLL seconds anyway.
    """
    owner = state.runner_id()
    # Every task allocates frames and results, which sets off the cyclic garbage collector
    # thousands of times a run, each time walking every object in the heap (a fifth of the
    # CPU in a profile of tiny tasks). Nothing here makes long-lived cycles: freeze what
    # exists and collect young objects far less often.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    await db(state.register_runner, owner, opts.kind)
    await reclaim(db, store, opts.scratch, shared=opts.scratch_shared)
    procs = ProcessTable(scripts=opts.parallel)
    slots = Slots(opts.scratch, large_at_once=opts.parallel)
    await anyio.to_thread.run_sync(lambda: store.empty)
    base_env = {k: v for k, v in os.environ.items() if k not in opts.env_drop}
    cwd = Path.cwd()
    lookahead = max(opts.parallel, LOOKAHEAD)
    # More workers than scripts may run: while `parallel` of them wait for their scripts, the others
    # prepare the next attempts and store the last ones' outputs (the launcher holds the line).
    workers = WORKERS_PER_SCRIPT * opts.parallel
    board = Board(workers, lookahead, scripts=opts.parallel)
    threads = anyio.CapacityLimiter(workers)
    summary = Summary()
    committing = [0]   # results collected from the board, being committed
    flags = _Flags()
    wake = [anyio.Event()]      # the main loop: lease more, or decide we are done
    results = [anyio.Event()]   # the committer: results are waiting
    # through `db`, so that serve outlives a database going away while it opens these as well
    heart = await db(lambda d: d.sibling()) if opts.lease else None
    watcher = await db(lambda d: d.watcher()) if watch else None

    def close_board() -> list[Claimed]:
        """No more tasks handed out, and no more scripts started; returns the tasks leased but not taken."""
        procs.close_gate()
        return board.close()

    def poke() -> None:
        poked.clear()
        wake[0].set()
        results[0].set()

    # Workers tell the event loop without waiting for it: a blocking anyio.from_thread.run_sync per
    # result cost a round trip through the loop thread (and its GIL hand-offs) on every tiny task.
    poked = threading.Event()   # a poke is on its way: no need for another
    call_soon = asyncio.get_running_loop().call_soon_threadsafe  # (anyio.run's backend is asyncio)

    def poke_from_thread() -> None:
        if not poked.is_set():
            poked.set()
            call_soon(poke)

    def work() -> None:
        """A worker thread's life: run tasks until the board closes. If anything escapes
        `execute` (a bug, a MemoryError), its task goes back to the queue, the engine hears of
        it and stops claiming, and this worker ends."""
        while (c := board.take()) is not None:
            try:
                reporter.task_started(c)
                res = execute(Job(c, store, c.workdir or cwd, base_env), procs, slots)
            except BaseException as e:  # noqa: BLE001 - reported as the run's error
                now = time.time()
                board.finish(c, Result(c.task_id, c.token, c.step.name, c.attempt, c.input_name, ok=False,
                                       started_at=now, finished_at=now, interrupted=True,
                                       error=f"the worker running it failed: {type(e).__name__}"))
                board.fail(e)
                try:
                    poke_from_thread()
                except Exception:  # noqa: BLE001 - the loop is gone already
                    pass
                return
            if c.task_id in board.lost and not res.ok:
                res.interrupted, res.error = True, "lost its lease (the database could not be reached to renew it)"
            if board.finish(c, res):
                poke_from_thread()

    async def worker() -> None:
        try:
            await anyio.to_thread.run_sync(work, limiter=threads)
        except BaseException as e:  # the board knows; the main loop reports it
            if isinstance(e, anyio.get_cancelled_exc_class()):
                raise

    def give_back(claimed: list[Claimed], why: str) -> list[Result]:
        """Tasks leased but not started go back to the queue (no attempt is recorded)."""
        now = time.time()
        return [Result(c.task_id, c.token, c.step.name, c.attempt, c.input_name, ok=False, started_at=now,
                       finished_at=now, interrupted=True, started=False, error=why) for c in claimed]

    def store_trouble(text: str) -> None:
        """The store cannot take work (disk full): `run` stops (exit 3); `serve` waits and tries again,
        since space usually comes back and a daemon that exits needs someone to start it."""
        if not opts.persist:
            summary.store_error = summary.store_error or text
            flags.stopping = True
            return
        if time.monotonic() >= flags.paused_until:
            reporter.log("error", f"{text}; no new tasks for {STORE_PAUSE:.0f}s, then trying again")
        flags.paused_until = time.monotonic() + STORE_PAUSE

    async def commit(batch: list[Result], started: dict[int, int]) -> None:
        committing[0] += len(batch)
        try:
            # Objects reach the disk before the rows that refer to them. The flush runs
            # outside the database thread so that claiming goes on meanwhile.
            if any(r.ok for r in batch):
                timeline.engine("sync+")
                await anyio.to_thread.run_sync(_sync, store)
                timeline.engine("sync-")
            timeline.engine("commit+")
            rep = await db(state.commit, batch, owner, started)
            timeline.engine("commit-")
            for r in batch:
                timeline.mark(r.task_id, "committed")
        except StoreError as e:
            store_trouble(str(e))
            rep = CommitReport(requeued=batch)
        finally:
            committing[0] -= len(batch)
        board.committed(batch)
        for r in batch:
            if r.store_trouble:
                store_trouble(r.error or "the store cannot take the attempt")
        summary.absorb(rep)
        if rep.done or rep.failed:
            gatherer.committed()
        late = [r for r in rep.stale if r.started]
        if late:
            # the fencing token at work: another runner holds these tasks now, and its results count
            reporter.log("warning", f"{len(late)} late result(s) refused: their leases had passed to another runner "
                                    f"({', '.join(f'{r.step}#{r.task_id}' for r in late[:5])}"
                                    f"{', ...' if len(late) > 5 else ''})")
        reporter.committed(rep)
        if rep.failed and opts.fail_fast:
            flags.stopping = True
        wake[0].set()

    async def committer() -> None:
        while True:
            # wake now and then to record which scripts have started (status counts them)
            with anyio.move_on_after(STARTED_FLUSH):
                await results[0].wait()
            results[0] = anyio.Event()
            # Group commit: let a batch gather while workers are busy, so that one flush and
            # one transaction serve many tasks.
            if board.results and sum(board.snapshot()[0].values()) > 0:
                await anyio.sleep(COMMIT_WINDOW)
            batch, started = board.collect()
            if batch:
                await commit(batch, started)
            elif started:
                await db(state.mark_started, started)
            if board.results:
                results[0].set()

    async def heartbeat() -> None:
        """Renew leases on the heartbeat's own connection; see the module's docstring."""
        assert heart is not None
        limiter = anyio.CapacityLimiter(1)
        every = opts.lease / 6
        while True:
            await anyio.sleep(every)
            with board.cond:
                held = dict(board.held)
            try:
                still = await anyio.to_thread.run_sync(state.renew, heart, owner, held, opts.lease, limiter=limiter)
            except Exception as e:  # noqa: BLE001 - the watchdog acts if this goes on
                # with nothing leased there is nothing at stake: a detail for -verbose
                reporter.log("warning" if held else "debug", f"cannot renew leases: {_first_line(e)}")
                if isinstance(e, DatabaseUnavailable):
                    try:
                        await anyio.to_thread.run_sync(heart.reconnect, limiter=limiter)
                    except Exception:
                        pass
                continue
            flags.renewed = _boot_clock()
            lost = board.drop_lost(still)
            if board.dropped:
                wake[0].set()
            if lost:
                n = procs.kill_tasks(lost)
                reporter.log("warning", f"{len(lost)} task lease(s) were taken over by another runner; "
                                        f"stopped {n} script(s) of ours")
            if opts.lease and await reclaim(db, store, opts.scratch, exclude=owner, shared=opts.scratch_shared):
                wake[0].set()

    async def watchdog() -> None:
        """No renewal for 4/5 of a lease: our leases may be expiring; stop our scripts."""
        while True:
            await anyio.sleep(min(1.0, opts.lease / 20))
            if _boot_clock() - flags.renewed > opts.lease * 0.8:
                with board.cond:
                    mine = set(board.held)
                if mine:
                    # lost first, then killed: a worker whose script dies must already see why
                    board.drop_lost(set())
                    n = procs.kill_tasks(mine)
                    wake[0].set()
                    reporter.log("error", f"could not renew leases for {_boot_clock() - flags.renewed:.0f}s; "
                                          f"stopped {n} script(s) so that no task runs twice; their tasks go back "
                                          f"to the queue")
                flags.renewed = _boot_clock()

    async def drain_on_stop() -> None:
        assert stop is not None
        await stop.wait()
        flags.stopping = True
        wake[0].set()
        began = time.monotonic()
        # opts.grace is read on every turn: a second signal sets it to 0 to stop at once
        while sum(board.snapshot()[0].values()) > 0 and time.monotonic() - began < opts.grace:
            await anyio.sleep(0.05)
        if sum(board.snapshot()[0].values()) > 0:
            procs.abandon.set()
            n = procs.signal_all(signal.SIGTERM)
            reporter.log("warning", f"grace period over: stopping {n} running script(s); their tasks go back to the queue")
            await anyio.sleep(KILL_GRACE)
            procs.signal_all(signal.SIGKILL)

    async def wait_for_work(timeout: float | None) -> None:
        """Idle: until poked, `timeout` passes, or (watching) another process may have made work."""
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        if watcher is None or flags.stopping:
            with anyio.move_on_after(deadline - time.monotonic()):
                await wake[0].wait()
            return
        while not wake[0].is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            step = min(left, IDLE_POLL, 0.25)
            try:
                changed = await anyio.to_thread.run_sync(watcher.wait, step, abandon_on_cancel=True)
            except Exception:  # noqa: BLE001 - a lost listener: poll instead until it is back
                changed = True
                await anyio.sleep(step)
                try:
                    await anyio.to_thread.run_sync(watcher.reconnect)
                except Exception:  # noqa: BLE001 - still down; the next wait tries again
                    pass
            if changed:
                return

    gatherer = Gatherer(db, store, opts.steps, settle=not opts.until_idle, reporter=reporter,
                        trouble=store_trouble)

    async def main_loop() -> None:
        while True:
            if board.fatal is not None:
                flags.stopping = True
            dropped = board.take_dropped()
            if dropped:
                await commit(give_back(dropped, "not started: its lease could not be renewed"), {})
            if not flags.stopping:
                # Lease enough to keep every worker busy plus a batch ahead, and only once half of
                # that batch is used up, so that one claim transaction serves many tasks.
                running, queued = board.snapshot()
                n_queued = sum(queued.values())
                ahead = board.ahead
                room = workers + ahead - sum(running.values()) - n_queued
                if committing[0] + len(board.results) >= MAX_WAITING or n_queued > ahead // 2:
                    room = 0
                if time.monotonic() < flags.paused_until:
                    room = 0
                if room > 0:
                    caps = partial(_caps, opts=opts, running=running, queued=queued, ahead=ahead)
                    timeline.engine("claim+")
                    claimed = await db(state.claim, owner, caps, room, opts.lease)
                    timeline.engine("claim-")
                    board.add(claimed)
            else:
                left = close_board()
                if left:
                    await commit(give_back(left, "not started: shutting down"), {})
            total = board.busy + committing[0]
            timeout: float | None = None  # None: until poked (a result, a commit) or new work appears
            if not flags.stopping and time.monotonic() >= flags.paused_until and gatherer.wants(total == 0):
                if await gatherer.fire():
                    continue  # a gather task to claim
            if total == 0:
                if flags.stopping:
                    break
                ol = await db(state.outlook, opts.steps)
                if opts.until_idle and ol.runnable == 0 and ol.next_due is None and ol.running == 0:
                    break
                if ol.runnable == 0 and ol.running > 0 and time.monotonic() - flags.reclaimed > 1:
                    # only others' tasks are left: take back at once those of runners that died
                    flags.reclaimed = time.monotonic()
                    if await reclaim(db, store, opts.scratch, exclude=owner, shared=opts.scratch_shared):
                        continue
                if ol.runnable:
                    timeout = 0.05  # someone else got there first; look again shortly
                elif ol.next_due is not None:
                    timeout = max(0.01, ol.next_due - ol.now)  # a retry's backoff ends
                elif opts.until_idle:
                    timeout = 0.5  # others are running the rest: their commits may make more
                elif watcher is not None:
                    timeout = IDLE_POLL * 30  # the watcher wakes us; poll now and then regardless
                if time.monotonic() < flags.paused_until:
                    timeout = max(0.05, flags.paused_until - time.monotonic())
            hint = gatherer.wait_hint()
            if hint is not None and not flags.stopping:
                timeout = hint if timeout is None else min(timeout, hint)
            await wait_for_work(timeout)
            wake[0] = anyio.Event()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(committer)
            if heart is not None:
                tg.start_soon(heartbeat)
                tg.start_soon(watchdog)
            if stop is not None:
                tg.start_soon(drain_on_stop)
            for _ in range(workers):
                tg.start_soon(worker)
            try:
                await main_loop()
            except BaseException:
                # the database is gone or something broke: running scripts cannot be committed, so stop
                # them now rather than let the task group wait for them to end by themselves
                close_board()
                procs.abandon.set()
                procs.signal_all(signal.SIGKILL)
                raise
            close_board()
            tg.cancel_scope.cancel()
    finally:
        close_board()
        timeline.write()
        with anyio.CancelScope(shield=True):
            try:
                await db(state.unregister_runner, owner)
            except Exception:  # noqa: BLE001 - the row goes stale; gc and others treat it as dead
                pass
            await anyio.to_thread.run_sync(slots.close)
            await anyio.to_thread.run_sync(procs.close)
            for extra in (heart, watcher):
                if extra is not None:
                    await anyio.to_thread.run_sync(extra.close)
    if board.fatal is not None:
        raise EngineFailure(f"a worker failed: {type(board.fatal).__name__}: {_first_line(board.fatal)}; "
                            f"its tasks went back to the queue") from board.fatal
    summary.elapsed = time.monotonic() - summary.started
    return summary


class EngineFailure(StoreError):
    """Something inside the engine failed; leased work was given back."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


async def reclaim(db: Db, store: ObjectStore, scratch: Path, exclude: str | None = None, shared: bool = True) -> int:
    """Re-queue the tasks of dead runners, after killing the scripts they left running and removing
    their scratch (so that a re-queued task never runs in two places at once)."""
    await db(housekeeping.reap_dead_scratch, scratch, shared=shared)
    return await db(state.recover, exclude=exclude)


def _sync(store: ObjectStore) -> None:
    try:
        store.sync()
    except OSError as e:
        raise StoreError(f"cannot flush the store to disk: {e.strerror}") from None


def _caps(pipe: state.Pipeline, *, opts: EngineOptions, running: Counter,
          queued: dict[str, int], ahead: int) -> dict[str, int]:
    """How many more tasks each step may lease now: its limit plus a look-ahead batch waiting, so that
    a finishing worker finds the next task ready. A step with its own `parallel` limit leases no more
    than that limit (which holds across every runner on the store: see state.claim), so that a
    leased task of it is a running one. Downstream steps come first, so that items flow to the end
    rather than piling up at the start."""
    caps: dict[str, int] = {}
    for step in reversed(pipe.active):
        if opts.steps is not None and step.name not in opts.steps:
            continue
        have = running[step.name] + queued.get(step.name, 0)
        if step.policy.parallel is not None:
            n = min(step.policy.parallel, opts.parallel) - have
        else:
            n = WORKERS_PER_SCRIPT * opts.parallel + ahead - have
        if n > 0:
            caps[step.name] = n
    return caps
