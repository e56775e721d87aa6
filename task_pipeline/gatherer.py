"""When gather steps fire: the engine's side of gathering (state.py holds the database side).

`run`: a gather step fires as soon as its barrier holds (state.GatherState.ready): no
task of a step upstream of it pending or running, no upstream failure while its
`on_failure` is "wait", no gather step upstream of it still to fire. `serve`: the same,
and its member set must also have stayed the same for the step's `settle` seconds, so
that a burst of submits makes one task rather than one per submit. That clock is kept
here, in memory, from the first look at which the barrier held with this set: a daemon
that restarts starts it again (a delay, never an early firing).

The engine asks `wants` on every turn of its loop: always when it is idle, otherwise at
most every POLL seconds after a commit (gather steps need not wait for unrelated steps
to finish). Firing stores the listing object first (fsynced before the database refers
to it), then calls `state.create_gather`, which checks the barrier and the set again
inside its transaction, since another runner may have moved on meanwhile. A listing
stored for a set that then did not fire is an unreferenced object that gc removes.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from typing import Callable

import anyio.to_thread

from task_pipeline import gathering, state
from task_pipeline.state import CommitReport
from task_pipeline.store import ObjectStore, StoreUnavailable

POLL = 0.25          # seconds: while tasks commit, look this often at most whether a gather step can fire
STORE_RETRY = 30.0   # seconds before a listing the store could not take is tried again


class Gatherer:
    def __init__(self, db, store: ObjectStore, steps: frozenset[str] | None, *, settle: bool, reporter,
                 trouble: Callable[[str], None]) -> None:
        self.db, self.store, self.steps, self.settle = db, store, steps, settle
        self.reporter, self.trouble = reporter, trouble
        self.seen: dict[str, tuple[bytes, float]] = {}   # step -> (its set's digest, since when, monotonic)
        self.owed = True            # something committed since the last look
        self.last = -math.inf
        self.next_due: float | None = None   # when a settling set may fire
        self.any = True             # the pipeline has gather steps (as of the last look)

    def committed(self) -> None:
        self.owed = True

    def wants(self, idle: bool) -> bool:
        now = time.monotonic()
        if self.next_due is not None and now >= self.next_due:
            return True
        if not self.any:
            return idle   # a pipeline without gather steps costs one look per idle turn
        return idle or (self.owed and now - self.last >= POLL)

    def wait_hint(self) -> float | None:
        """Seconds until the engine should look again, or None (when something commits)."""
        if not self.any:
            return None
        now = time.monotonic()
        hints = []
        if self.owed:
            hints.append(max(0.01, self.last + POLL - now))
        if self.next_due is not None:
            hints.append(max(0.01, self.next_due - now))
        return min(hints) if hints else None

    async def fire(self) -> int:
        """Make the tasks of the gather steps that are ready; returns how many were made."""
        self.owed, self.last, self.next_due = False, time.monotonic(), None
        states = await self.db(state.gather_states, self.steps)
        self.any = bool(states)
        made = 0
        for st in states:
            if not st.ready:
                self.seen.pop(st.step, None)
                continue
            assert st.members is not None
            data = gathering.listing(st.members)
            if self.settle and not self._settled(st.step, data, st.settle):
                continue
            listing = None
            if st.members:
                try:
                    listing = await anyio.to_thread.run_sync(self.store.ingest_bytes, data)
                except (OSError, StoreUnavailable) as e:
                    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                    self.trouble(f"cannot store the member listing of gather step '{st.step}': {why}")
                    self.next_due = time.monotonic() + STORE_RETRY
                    continue
            got = await self.db(state.create_gather, st.step, st.members, listing)
            self.seen.pop(st.step, None)
            if got is None:
                self.owed = True   # something moved meanwhile: look again soon
                continue
            made += got.how != "cleared"
            self._say(got)
        return made

    def _settled(self, step: str, data: bytes, settle: float) -> bool:
        now = time.monotonic()
        digest = hashlib.sha256(data).digest()
        seen = self.seen.get(step)
        if seen is None or seen[0] != digest:
            seen = self.seen[step] = (digest, now)
        due = seen[1] + settle
        if now >= due:
            return True
        self.next_due = due if self.next_due is None else min(self.next_due, due)
        return False

    def _say(self, got: state.Gathered) -> None:
        left_out = (f"; {got.failed} upstream task(s) failed and are left out (on_failure = \"gather\")"
                    if got.failed else "")
        if got.how == "cleared":
            self.reporter.log("info", f"{got.step}: nothing left to gather; its previous result is retired")
        elif got.how == "restored":
            self.reporter.log("info", f"{got.step}: this set of {got.members} member(s) was gathered before "
                                      f"(task {got.task_id}); its result counts again{left_out}")
        else:
            self.reporter.log("warning" if got.failed else "info",
                              f"{got.step}: gathering {got.members} member(s) (task {got.task_id}){left_out}")
            self.reporter.committed(CommitReport(created=Counter({got.step: 1})))
