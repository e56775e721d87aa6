"""The web's way to the store's database: a connection of its own, and the step counts it serves.

The engine reaches the database through scheduler.Db, one call at a time on one connection. The
web never touches that connection nor queues behind the engine: it opens its own (`db.sibling()`)
and runs its queries on a thread under a limiter of its own, one at a time. A lost connection
(PostgreSQL restarting) answers 503 and is opened again by the next request.

Counting every task by step and state is the only read whose cost grows with the store (tens of
milliseconds at a million tasks, on SQLite as on PostgreSQL). The dashboard asks every two
seconds, and Prometheus at each scrape, so the counts are a shared snapshot: a request that finds
it older than MAX_AGE, with the store changed since, starts a recount (one at a time). It waits for
it when counting is cheap (the last count took under WAIT_FOR: a store of up to some hundred
thousand tasks), so that the page shows what is; otherwise it answers from the snapshot and the
recount finishes in the background. The web's own actions discard the snapshot, so that an
action's effect shows in the next answer.
"""

from __future__ import annotations

import time
from typing import Callable

import anyio
import anyio.to_thread

from task_pipeline import queries
from task_pipeline.db import Database, DatabaseUnavailable

MAX_AGE = 1.0    # seconds a counts snapshot is served before a recount is started
WAIT_FOR = 0.02  # a request waits for a recount that is expected to take less than this (seconds)


class Reader:
    def __init__(self, open_db: Callable[[], Database]) -> None:
        self._open = open_db
        self.db: Database | None = None
        self.limiter = anyio.CapacityLimiter(1)

    def _call(self, fn: Callable, args, kwargs):
        if self.db is None:
            self.db = self._open()
        try:
            return fn(self.db, *args, **kwargs)
        except DatabaseUnavailable:
            db, self.db = self.db, None
            db.close()
            raise

    async def __call__(self, fn: Callable, *args, **kwargs):
        return await anyio.to_thread.run_sync(self._call, fn, args, kwargs, limiter=self.limiter)

    async def close(self) -> None:
        if self.db is not None:
            db, self.db = self.db, None
            await anyio.to_thread.run_sync(db.close, limiter=self.limiter)


def _change_token(db: Database):
    """Something that changes when another connection commits (SQLite's data_version), or None
    where the driver has no such thing: then every snapshot older than MAX_AGE is recounted."""
    version = getattr(db, "data_version", None)
    return version() if version is not None else None


def _count(db: Database) -> tuple[list[dict], object, float]:
    token = _change_token(db)
    began = time.monotonic()
    counts = queries.step_counts(db)
    return counts, token, time.monotonic() - began


class Counts:
    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.value: list[dict] | None = None
        self.at = 0.0            # time.time() of the count
        self._mono = 0.0
        self._token: object = None
        self._cost = 0.0         # seconds the last count took
        self._gen = 0            # bumped by discard: a count begun before it is not stored
        self._recount: anyio.Event | None = None   # set when the recount under way ends
        self.tg = None           # set by the app's lifespan: the task group recounts run in

    async def get(self) -> list[dict]:
        for tries in range(3):  # an action while we counted may have changed the counts: count again
            if self.value is not None:
                break
            gen = self._gen
            counted = await self.reader(_count)
            if gen == self._gen or tries == 2:
                self._store(counted)
        if time.monotonic() - self._mono > MAX_AGE and self._recount is None and self.tg is not None:
            self._recount = anyio.Event()
            self.tg.start_soon(self._refresh_if_changed, self._recount)
        if self._recount is not None and self._cost < WAIT_FOR:
            await self._recount.wait()
        assert self.value is not None
        return self.value

    def discard(self) -> None:
        self.value = None
        self._gen += 1

    async def _refresh_if_changed(self, done: anyio.Event) -> None:
        gen = self._gen
        try:
            token = await self.reader(_change_token)
            if token is None or token != self._token:
                counted = await self.reader(_count)
                if gen == self._gen:
                    self._store(counted)
            elif gen == self._gen:
                self._mono = time.monotonic()
        except Exception:  # noqa: BLE001 - the next request tries again, and reports what fails
            pass
        finally:
            self._recount = None
            done.set()

    def _store(self, counted: tuple[list[dict], object, float]) -> None:
        self.value, self._token, self._cost = counted
        self.at, self._mono = time.time(), time.monotonic()
