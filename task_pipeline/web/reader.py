"""The web's way to the store's database: connections of its own, and the status document it serves.

The engine reaches the database through scheduler.Db, one call at a time on one connection. The
web never touches that connection nor queues behind the engine: a Reader opens its own
(`db.sibling()`) and runs queries on a thread under a limiter of its own, one at a time. serve
gives the web two: one for requests, one for what is rebuilt in the background, so that a rebuild
never holds up a request. A lost connection (PostgreSQL restarting) answers 503 and is opened
again by the next call.

The status document (overview.status: counts per step and state, the oldest pending task, the
last failures, runners) is the read whose cost grows with the store: at a million tasks its
queries take a few hundred milliseconds. The dashboard asks for it every two seconds, and
Prometheus at each scrape, so it is a shared snapshot. A request that finds it stale (older than
its refresh period, and the store changed since) starts a rebuild, one at a time, and waits for it
only when building is cheap (the last build took under WAIT_FOR); otherwise it answers from the
snapshot and the rebuild finishes in the background. The refresh period is MAX_AGE, or ten times
the last build's cost when that is longer: on a huge store the web spends at most about a tenth
of a core on it while someone watches. The web's own actions discard the snapshot, so that an
action's effect shows in the next answer.
"""

from __future__ import annotations

import time
from typing import Callable

import anyio
import anyio.to_thread

from task_pipeline import overview
from task_pipeline.db import Database, DatabaseUnavailable

MAX_AGE = 1.0    # seconds a snapshot is served before a rebuild is started (at least)
WAIT_FOR = 0.02  # a request waits for a rebuild that is expected to take less than this (seconds)
SHARE = 10       # the refresh period is at least this many times the last build's cost


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


class Snapshot:
    """The status document, shared by every request (see the module's doc)."""

    def __init__(self, reader: Reader, store, where: str) -> None:
        self.reader, self.store, self.where = reader, store, where
        self.value: dict | None = None
        self.at = 0.0            # time.time() of the build
        self._mono = 0.0
        self._token: object = None
        self._cost = 0.0         # seconds the last build took
        self._gen = 0            # bumped by discard: a build begun before it is not stored
        self._rebuild: anyio.Event | None = None   # set when the rebuild under way ends
        self.tg = None           # the task group rebuilds run in (server.serve's)

    def _build(self, db: Database) -> tuple[dict, object, float]:
        token = _change_token(db)
        began = time.monotonic()
        doc = overview.status(db, self.store, self.where)
        return doc, token, time.monotonic() - began

    async def get(self) -> dict:
        for tries in range(3):  # an action while we built may have changed the store: build again
            if self.value is not None:
                break
            gen = self._gen
            built = await self.reader(self._build)
            if gen == self._gen or tries == 2:
                self._store(built)
        period = max(MAX_AGE, SHARE * self._cost)
        if time.monotonic() - self._mono > period and self._rebuild is None and self.tg is not None:
            self._rebuild = anyio.Event()
            self.tg.start_soon(self._refresh_if_changed, self._rebuild)
        if self._rebuild is not None and self._cost < WAIT_FOR:
            await self._rebuild.wait()
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
                built = await self.reader(self._build)
                if gen == self._gen:
                    self._store(built)
            elif gen == self._gen:
                self._mono = time.monotonic()
        except Exception:  # noqa: BLE001 - the next request tries again, and reports what fails
            pass
        finally:
            self._rebuild = None
            done.set()

    def _store(self, built: tuple[dict, object, float]) -> None:
        self.value, self._token, self._cost = built
        self.at, self._mono = time.time(), time.monotonic()
