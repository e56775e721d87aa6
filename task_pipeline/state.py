"""State: what the database knows, and every transaction that changes it.

All functions here are synchronous and take a `Database` (task_pipeline.db): the
same code runs on SQLite and on PostgreSQL. Each public mutation is one
transaction. The async engine runs them on one database thread (see `Db` in
scheduler.py), which is what makes "one writer that batches commits" cheap: a
whole batch of task commits is one call and one transaction, not one awaited
round trip per statement.

The central ideas:
- `register` turns a manifest into step versions and `step_current` rows.
- A task's identity is (step version, input name, input hash, seed); inserting
  it twice is a no-op, which gives early cutoff for free.
- `claim` leases tasks (owner, expiry, a fencing token that changes at every
  claim); `commit` records a batch of finished attempts, and a result counts
  only if the task's token is still the one it was claimed with.
- A task that is superseded (`live = 0`) is kept as history. When a task takes
  over from another (migrate, invalidate), outputs the old one had and the new
  one does not are retired, and so are the tasks fed only by them.
- Times that leases are compared by come from `db.clock()`, the server's clock
  where there is a server, so that hosts with skewed clocks still agree.
- A gather step gets no task per input: routing passes it by, and `create_gather`
  makes one task over its whole member set when the engine asks (see the section
  "gather steps" below, and gathering.py for the pure part).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Iterator

from task_pipeline.db import Database
from task_pipeline.host import this_host
from task_pipeline.errors import UsageError
from task_pipeline import gathering
from task_pipeline.gathering import GATHER_INPUT
from task_pipeline.manifest import Manifest
from task_pipeline.routing import Router, is_glob, matches, route_key

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
MAX_RETRY_DELAY = 3600.0


def meta(db: Database, key: str, default: str | None = None) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return row[0] if row else default


def set_meta(db: Database, key: str, value: str) -> None:
    db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
               (key, value))


class _Rollback(Exception):
    pass


def dry_run(db: Database, fn: Callable, *args, **kwargs):
    """Run a mutation in a transaction that is rolled back: what it would do, with nothing changed."""
    box = []
    try:
        with db.transaction():
            box.append(fn(db, *args, **kwargs))
            raise _Rollback()
    except _Rollback:
        pass
    return box[0]


# -- the registered pipeline -------------------------------------------------


@dataclass(frozen=True)
class Policy:
    parallel: int | None = None
    retries: int = 0
    retry_delay: float = 1.0
    timeout: float | None = None
    schedule: float | None = None
    gather: bool = False        # part of the version identity too; kept here so that runners know the kind
    settle: float = gathering.DEFAULT_SETTLE
    on_failure: str = "wait"


@dataclass(frozen=True)
class CurrentStep:
    name: str
    step_id: int
    version: int
    script: str
    shell: str
    env: dict
    consumes: tuple[str, ...]
    is_start: bool
    in_manifest: bool
    policy: Policy


@dataclass(frozen=True)
class Pipeline:
    """The pipeline as registered in the database; what runners work from."""

    steps: dict[str, CurrentStep]
    router: Router
    workdir: Path | None

    @property
    def active(self) -> list[CurrentStep]:
        return [s for s in self.steps.values() if s.in_manifest]

    @cached_property
    def gather_upstream(self) -> dict[str, frozenset[str]]:
        """For each gather step of the manifest, the steps that can feed it (gathering.upstream)."""
        if not any(s.policy.gather for s in self.active):
            return {}
        return gathering.upstream([gathering.Shape(s.name, s.script, s.consumes, s.is_start, s.policy.gather)
                                   for s in self.active])

    def require(self, name: str) -> CurrentStep:
        s = self.steps.get(name)
        if s is None or not s.in_manifest:
            known = ", ".join(x.name for x in self.active) or "none"
            raise UsageError(f"no step named '{name}' in this store's manifest (steps: {known})")
        return s


_pipelines: dict[int, tuple[Database, str | None, Pipeline]] = {}


def load_pipeline(db: Database) -> Pipeline:
    """The registered pipeline. Every claim and commit needs it, so it is cached per connection
    and rebuilt only when `register` has bumped the generation (from any process)."""
    gen = meta(db, "generation")
    hit = _pipelines.get(id(db))
    if hit is not None and hit[0] is db and hit[1] == gen and gen is not None:
        return hit[2]
    pipe = _load_pipeline(db)
    _pipelines[id(db)] = (db, gen, pipe)
    return pipe


def _load_pipeline(db: Database) -> Pipeline:
    rows = db.execute(
        """SELECT c.name, c.step_id, s.version, s.script, s.shell, s.env, c.consumes, c.policy,
                  c.is_start, c.in_manifest
           FROM step_current c JOIN step s ON s.id = c.step_id ORDER BY c.position, c.name"""
    ).fetchall()
    steps = {}
    for r in rows:
        steps[r["name"]] = CurrentStep(
            name=r["name"], step_id=r["step_id"], version=r["version"], script=r["script"], shell=r["shell"],
            env=json.loads(r["env"]), consumes=tuple(json.loads(r["consumes"])), is_start=bool(r["is_start"]),
            in_manifest=bool(r["in_manifest"]), policy=Policy(**json.loads(r["policy"])),
        )
    # start steps take no inputs: a file named after one (fetch_1) is unrouted, not a task of it
    router = Router.build((s.name, s.consumes) for s in steps.values() if s.in_manifest and not s.is_start)
    wd = meta(db, "workdir")
    return Pipeline(steps=steps, router=router, workdir=Path(wd) if wd else None)


@dataclass
class Taint:
    count: int
    from_versions: tuple[int, ...]
    to_version: int


@dataclass
class Registration:
    new_versions: list[tuple[str, int | None, int]] = field(default_factory=list)
    restored: Counter = field(default_factory=Counter)
    requeued: Counter = field(default_factory=Counter)
    backfilled: Counter = field(default_factory=Counter)
    removed: list[str] = field(default_factory=list)
    tainted: dict[str, Taint] = field(default_factory=dict)


@dataclass(frozen=True)
class Registered:
    """Who registered the store's pipeline last: to tell a user who mixed up two stores before anything changes."""

    manifest: str | None
    host: str | None
    at: float | None
    steps: tuple[str, ...]


def registered(db: Database) -> Registered:
    at = meta(db, "registered_at")
    steps = tuple(r[0] for r in db.execute("SELECT name FROM step_current WHERE in_manifest=1 ORDER BY position, name"))
    return Registered(meta(db, "manifest"), meta(db, "registered_by"), float(at) if at else None, steps)


def register(db: Database, manifest: Manifest) -> Registration:
    """Make the database's pipeline match the manifest. Idempotent; cheap when nothing changed."""
    reg = Registration()
    with db.transaction():
        now = db.clock()
        prev = {r["name"]: r for r in db.execute("SELECT * FROM step_current")}
        switched: list[tuple[str, int]] = []
        backfill: list[str] = []
        for pos, step in enumerate(manifest.steps):
            row = db.execute("SELECT id, version FROM step WHERE name=? AND identity=?",
                             (step.name, step.identity)).fetchone()
            if row is None:
                version = db.execute("SELECT coalesce(max(version), 0) + 1 FROM step WHERE name=?",
                                     (step.name,)).fetchone()[0]
                step_id = db.execute(
                    """INSERT INTO step(name, version, identity, script, shell, env, created_at)
                       VALUES (?,?,?,?,?,?,?) RETURNING id""",
                    (step.name, version, step.identity, step.script, step.shell, json.dumps(step.env, sort_keys=True),
                     now)).fetchone()[0]
            else:
                step_id, version = row["id"], row["version"]
            consumes = json.dumps(list(step.consumes))
            policy = json.dumps(Policy(step.parallel, step.retries, step.retry_delay, step.timeout, step.schedule,
                                       step.gather, step.settle, step.on_failure).__dict__)
            p = prev.get(step.name)
            db.execute(
                """INSERT INTO step_current(name, step_id, consumes, policy, is_start, in_manifest, position)
                   VALUES (?,?,?,?,?,1,?)
                   ON CONFLICT(name) DO UPDATE SET step_id=excluded.step_id, consumes=excluded.consumes,
                     policy=excluded.policy, is_start=excluded.is_start, in_manifest=1, position=excluded.position""",
                (step.name, step_id, consumes, policy, int(step.start), pos),
            )
            if p is None or p["step_id"] != step_id:
                old_version = None
                if p is not None:
                    old_version = db.execute("SELECT version FROM step WHERE id=?", (p["step_id"],)).fetchone()[0]
                if p is not None or row is None:
                    reg.new_versions.append((step.name, old_version, version))
                if p is not None:
                    switched.append((step.name, step_id))
            if p is None or p["consumes"] != consumes or not p["in_manifest"] or _gathers(p) != step.gather:
                backfill.append(step.name)  # (a step that stops gathering takes its inputs one by one again)
        gone = sorted(n for n in set(prev) - set(manifest.names) if prev[n]["in_manifest"])
        reg.removed = gone
        db.executemany("UPDATE step_current SET in_manifest=0 WHERE name=?", [(n,) for n in gone])
        set_meta(db, "workdir", str(manifest.workdir))
        set_meta(db, "generation", os.urandom(8).hex())
        set_meta(db, "manifest", str(Path(manifest.path).resolve()))
        set_meta(db, "registered_by", socket.gethostname())
        set_meta(db, "registered_at", repr(now))

        pipe = load_pipeline(db)
        for name, step_id in switched:
            _follow_version(db, pipe, name, step_id, reg, now)
        for name in backfill:
            reg.backfilled[name] += _backfill(db, pipe, pipe.steps[name], now)
        if sum(reg.backfilled.values()) or sum(reg.requeued.values()):
            db.notify()
        reg.tainted = tainted(db)
    return reg


def _gathers(current_row) -> bool:
    try:
        return bool(json.loads(current_row["policy"]).get("gather", False))
    except (ValueError, AttributeError):
        return False


def _is_gather_task(db: Database, task_id: int) -> bool:
    return db.execute("SELECT 1 FROM gather_member WHERE task_id=? LIMIT 1", (task_id,)).fetchone() is not None


def _fits(db: Database, pipe: Pipeline, task, name: str) -> bool:
    """Can task `task` (of some version of step `name`) move to the current version? Not when one
    of them gathers and the other does not: a per-input task means nothing to a gather step."""
    return _is_gather_task(db, task["id"]) == pipe.steps[name].policy.gather


def _follow_version(db: Database, pipe: Pipeline, name: str, step_id: int, reg: Registration, now: float) -> None:
    """The current version of `name` changed: pending work follows it, and results it already has count again."""
    old = db.execute(
        """SELECT t.* FROM task t JOIN step s ON s.id = t.step_id
           WHERE s.name = ? AND t.step_id != ? AND t.live = 1 AND t.state IN ('pending', 'done', 'failed')""",
        (name, step_id),
    ).fetchall()
    for t in old:
        if t["state"] == PENDING and not _fits(db, pipe, t, name):
            db.execute("UPDATE task SET live=0 WHERE id=?", (t["id"],))  # never ran: nothing to retire
            continue
        if t["state"] == PENDING:
            _take_over(db, pipe, t, step_id, now)
            reg.requeued[name] += 1
            continue
        twin = db.execute(
            "SELECT id, state FROM task WHERE step_id=? AND input_name=? AND input_hash=? AND seed=?",
            (step_id, t["input_name"], t["input_hash"], t["seed"]),
        ).fetchone()
        if twin is not None and twin["state"] == DONE:
            _take_over(db, pipe, t, step_id, now)
            reg.restored[name] += 1


def _take_over(db: Database, pipe: Pipeline, old, step_id: int, now: float) -> str:
    """Supersede task `old` by its counterpart on `step_id` (created if needed). Returns 'queued' or 'restored'."""
    db.execute("UPDATE task SET live=0 WHERE id=?", (old["id"],))
    new_id = db.execute(
        """INSERT INTO task(step_id, input_name, input_hash, seed, runset, parent_id, replaces, created_at)
           VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING RETURNING id""",
        (step_id, old["input_name"], old["input_hash"], old["seed"], old["runset"], old["parent_id"],
         old["id"] if old["state"] == DONE else None, now),
    ).fetchone()
    if new_id is not None:
        # a gather task's members go with it (nothing is copied for any other task)
        db.execute("INSERT INTO gather_member(task_id, name, hash) SELECT ?, name, hash FROM gather_member "
                   "WHERE task_id=?", (new_id[0], old["id"]))
        return "queued"
    twin = db.execute(
        "SELECT id, state FROM task WHERE step_id=? AND input_name=? AND input_hash=? AND seed=?",
        (step_id, old["input_name"], old["input_hash"], old["seed"]),
    ).fetchone()
    replaces = old["id"] if old["state"] == DONE else None
    if twin["state"] == DONE:
        db.execute("UPDATE task SET live=1, replaces=NULL WHERE id=?", (twin["id"],))
        new_outputs = _outputs(db, twin["id"])
        gone = [o for o in _outputs(db, old["id"])] if replaces else []
        _activate(db, pipe, twin["id"], new_outputs, _runset(db, twin["id"]), Counter(), Counter(), now)
        _retire(db, [o for o in gone if o not in set(new_outputs)])
        return "restored"
    if twin["state"] == RUNNING:
        db.execute("UPDATE task SET live=1, replaces=? WHERE id=?", (replaces, twin["id"]))
    else:
        db.execute(
            "UPDATE task SET live=1, state='pending', attempts=0, not_before=0, error=NULL, replaces=? WHERE id=?",
            (replaces, twin["id"]),
        )
    return "queued"


def _backfill(db: Database, pipe: Pipeline, step: CurrentStep, now: float) -> int:
    """Create tasks for current outputs that `step` consumes and has never seen (a new step or new inputs)."""
    if step.is_start or step.policy.gather:
        return 0  # a gather step takes its inputs all at once (create_gather)
    exact = [p for p in step.consumes if not is_glob(p)]
    globs = [p for p in step.consumes if is_glob(p)]
    found: list = []
    sql = """SELECT o.task_id, o.name, o.hash, t.runset FROM output o JOIN task t ON t.id = o.task_id
             WHERE t.live = 1 AND t.state = 'done'"""
    for key in exact:
        found += db.execute(sql + " AND o.key = ?", (key,)).fetchall()
    if globs:
        found += [r for r in db.execute(sql) if matches(globs, r["name"])]
    made = 0
    seen = set()
    for r in found:
        if (r["name"], r["hash"]) in seen:
            continue
        seen.add((r["name"], r["hash"]))
        cur = db.execute(
            """INSERT INTO task(step_id, input_name, input_hash, runset, parent_id, created_at)
               VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING""",
            (step.step_id, r["name"], r["hash"], r["runset"], r["task_id"], now),
        )
        made += cur.rowcount
    return made


def tainted(db: Database) -> dict[str, Taint]:
    """Finished tasks (done or failed) of a version that is no longer current, per step.

    Counted per old version through the (step_id, state, live) index, so the cost
    follows the number of tainted tasks, not the size of the store.
    """
    out: dict[str, Taint] = {}
    old_versions = db.execute(
        """SELECT c.name, s.id, s.version, cs.version AS current FROM step s
           JOIN step_current c ON c.name = s.name JOIN step cs ON cs.id = c.step_id
           WHERE s.id != c.step_id AND c.in_manifest = 1 ORDER BY c.position, s.version""").fetchall()
    for r in old_versions:
        n = db.execute(
            "SELECT count(*) FROM task WHERE step_id=? AND state IN ('done', 'failed') AND live=1",
            (r["id"],)).fetchone()[0]
        if n:
            t = out.setdefault(r["name"], Taint(0, (), r["current"]))
            t.count += n
            t.from_versions = (*t.from_versions, r["version"])
    return out


def counts(db: Database, states: Iterable[str] = ("pending", "running")) -> dict[str, Counter]:
    """Live tasks per current step and state, through the index: cheap for the states asked for."""
    out: dict[str, Counter] = {}
    for s in load_pipeline(db).steps.values():
        c = out[s.name] = Counter()
        for st in states:
            c[st] = db.execute("SELECT count(*) FROM task WHERE step_id=? AND state=? AND live=1",
                               (s.step_id, st)).fetchone()[0]
    return out


def migrate_tainted(db: Database) -> dict[str, Taint]:
    """Re-queue every tainted task on its step's current version; the old task becomes history."""
    with db.transaction():
        now = db.clock()
        found = tainted(db)
        if not found:
            return found
        pipe = load_pipeline(db)
        for name in found:
            step_id = pipe.steps[name].step_id
            rows = db.execute(
                """SELECT t.* FROM task t JOIN step s ON s.id = t.step_id
                   WHERE s.name = ? AND t.step_id != ? AND t.live = 1 AND t.state IN ('done', 'failed')""",
                (name, step_id),
            ).fetchall()
            for t in rows:
                if _fits(db, pipe, t, name):
                    _take_over(db, pipe, t, step_id, now)
                else:
                    # the step started or stopped gathering: the old result gives way at once, and the
                    # new kind of task comes from the current outputs (create_gather, or a backfill)
                    db.execute("UPDATE task SET live=0 WHERE id=?", (t["id"],))
                    if t["state"] == DONE:
                        _retire(db, _outputs(db, t["id"]))
        db.notify()
    return found


# -- seeding and submitting ------------------------------------------------------


def seed_start(db: Database, names: Iterable[str], runset: str) -> int:
    """A start task per step and runset; one that exists already is not made again."""
    made = 0
    with db.transaction():
        now = db.clock()
        pipe = load_pipeline(db)
        for name in names:
            step = pipe.require(name)
            # The start task of an older version for this runset is replaced by this version's (a start
            # step runs once per version): its results give way to the new ones when they commit, and
            # it is not reported as tainted meanwhile.
            for old in db.execute(
                    """SELECT t.* FROM task t JOIN step s ON s.id = t.step_id
                       WHERE s.name=? AND t.step_id != ? AND t.seed=? AND t.input_hash='' AND t.live=1
                         AND t.state IN ('pending', 'done', 'failed')""", (name, step.step_id, runset)).fetchall():
                made += _take_over(db, pipe, old, step.step_id, now) == "queued"
            made += db.execute(
                """INSERT INTO task(step_id, input_name, input_hash, seed, runset, created_at)
                   VALUES (?, '', '', ?, ?, ?) ON CONFLICT DO NOTHING""",
                (step.step_id, runset, runset, now),
            ).rowcount
        if made:
            db.notify()
    return made


def submit(db: Database, items: list[tuple[str, str, int, str | None]], runset: str = "") -> list[tuple[str, list[str]]]:
    """Add external inputs: (file name, hash, size, step or None to route by name).

    Returns, per item, the steps that got a new task (empty when every one existed).
    """
    report = []
    with db.transaction():
        now = db.clock()
        pipe = load_pipeline(db)
        for name, h, size, step_name in items:
            db.execute("INSERT INTO object(hash, size) VALUES (?, ?) ON CONFLICT DO NOTHING", (h, size))
            targets = [pipe.require(step_name).name] if step_name else list(pipe.router.consumers(name))
            gathers = [t for t in targets if pipe.steps[t].policy.gather]
            if gathers and (step_name or len(gathers) == len(targets)):
                raise UsageError(f"'{gathers[0]}' is a gather step: it takes every current output routed to it, "
                                 f"not submitted files; submit to a step that feeds it")
            targets = [t for t in targets if t not in gathers]
            if not targets:
                raise UsageError(f"'{name}' routes to key '{route_key(name)}', which no step consumes; "
                                 f"name the step: submit STEP FILE")
            made = []
            for t in targets:
                cur = db.execute(
                    """INSERT INTO task(step_id, input_name, input_hash, runset, created_at)
                       VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING""",
                    (pipe.steps[t].step_id, name, h, runset, now),
                )
                if cur.rowcount:
                    made.append(t)
            report.append((name, made))
        if any(made for _, made in report):
            db.notify()
    return report


# -- runners and writers ------------------------------------------------------------


def runner_id() -> str:
    return f"{this_host()}:{os.getpid()}:{os.urandom(3).hex()}"


def register_runner(db: Database, owner: str, kind: str) -> None:
    host, pid, _ = owner.rsplit(":", 2)
    with db.transaction():
        now = db.clock()
        db.execute(
            """INSERT INTO runner(id, host, pid, kind, started_at, heartbeat) VALUES (?,?,?,?,?,?)
               ON CONFLICT(id) DO UPDATE SET heartbeat=excluded.heartbeat""",
            (owner, host, int(pid), kind, now, now),
        )


def unregister_runner(db: Database, owner: str) -> None:
    with db.transaction():
        db.execute("DELETE FROM runner WHERE id=?", (owner,))


def beat(db: Database, owner: str) -> None:
    """A writer that is not a runner (submit) says it is still alive."""
    with db.transaction(shared=True):
        db.execute("UPDATE runner SET heartbeat=? WHERE id=?", (db.clock(), owner))


@contextmanager
def writing(db: Database, kind: str) -> Iterator[str]:
    """Be visible to gc while this process may store objects that it has not committed yet."""
    owner = runner_id()
    register_runner(db, owner, kind)
    try:
        yield owner
    finally:
        try:
            unregister_runner(db, owner)
        except Exception:
            pass  # gone with the database; gc treats a stale row as a dead runner


# -- claiming and leases ------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    task_id: int
    token: int
    attempt: int
    step: CurrentStep
    input_name: str
    input_hash: str
    runset: str
    workdir: Path | None
    input_size: int = 0


def claim(db: Database, owner: str, caps: Callable[[Pipeline], dict[str, int]], room: int,
          lease: float) -> list[Claimed]:
    """Lease up to `room` runnable tasks, at most `caps(pipeline)[step]` per step, visiting steps
    in the order `caps` gives and oldest tasks first, in one transaction.

    A step's `parallel` limit counts the tasks leased by every runner on the store (on any
    host): the step's lock is held while they are counted and claimed.
    """
    got: list = []
    with db.transaction(shared=True):
        now = db.clock()
        pipe = load_pipeline(db)
        for name, cap in caps(pipe).items():
            step = pipe.steps.get(name)
            n = min(cap, room - len(got))
            if n <= 0 or step is None or not step.in_manifest:
                continue
            if step.policy.parallel is not None:
                db.lock(f"step:{step.name}")
                leased = db.execute("SELECT count(*) FROM task WHERE step_id=? AND state='running'",
                                    (step.step_id,)).fetchone()[0]
                n = min(n, step.policy.parallel - leased)
                if n <= 0:
                    continue
            rows = db.execute(
                f"""UPDATE task SET state='running', token=token+1, lease_owner=?, lease_expires=?, started_at=NULL
                   WHERE id IN (SELECT id FROM task WHERE step_id=? AND state='pending' AND live=1
                                AND not_before <= ? ORDER BY id LIMIT ? {db.skip_locked})
                   RETURNING id, token, attempts, input_name, input_hash, runset""",
                (owner, now + lease, step.step_id, now, n),
            ).fetchall()
            rows.sort(key=lambda r: r["id"])
            got += [(step, r) for r in rows]
        # the engine copies small inputs in ahead of a free script slot, large ones only as it frees
        hashes = sorted({r["input_hash"] for _, r in got if r["input_hash"]})
        sizes: dict[str, int] = {}
        for i in range(0, len(hashes), 500):
            part = hashes[i:i + 500]
            sizes.update((h, n) for h, n in db.execute(
                f"SELECT hash, size FROM object WHERE hash IN ({','.join('?' * len(part))})", part))
    return [Claimed(r["id"], r["token"], r["attempts"] + 1, step, r["input_name"], r["input_hash"], r["runset"],
                    pipe.workdir, sizes.get(r["input_hash"], 0)) for step, r in got]


def renew(db: Database, owner: str, held: dict[int, int], lease: float) -> set[int]:
    """Extend the leases of the tasks this runner holds (id -> token); returns the ids it still holds.

    Only the tasks named are renewed: a claim whose reply was lost with a connection is
    left to expire rather than kept alive by a runner that does not know it has it.
    """
    still: set[int] = set()
    with db.transaction(shared=True):
        now = db.clock()
        db.execute("UPDATE runner SET heartbeat=? WHERE id=?", (now, owner))
        ids = list(held)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for r in db.execute(
                    f"""UPDATE task SET lease_expires=? WHERE state='running' AND lease_owner=? AND id IN ({marks})
                        RETURNING id, token""", (now + lease, owner, *chunk)):
                if held.get(r[0]) == r[1]:
                    still.add(r[0])
    return still


def mark_started(db: Database, started: dict[int, int]) -> None:
    """Record that the scripts of these leased tasks (id -> token) have started, for status."""
    if not started:
        return
    with db.transaction(shared=True):
        now = db.clock()
        db.executemany("UPDATE task SET started_at=? WHERE id=? AND token=? AND state='running'",
                       [(now, t, tok) for t, tok in started.items()])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(db: Database, *, exclude: str | None = None) -> int:
    """Return tasks of dead runners to the queue: at once if the runner was on this host and its
    process is gone, otherwise when the lease has expired. The lost attempt does not count.

    Decided inside the writers' lock with the clock read there: a runner whose renewal was
    only waiting for the same lock keeps its tasks if it got there first.
    """
    host = this_host()
    n = 0
    with db.transaction():
        now = db.clock()
        rows = db.execute("SELECT id, token, attempts, lease_owner, lease_expires FROM task WHERE state='running'").fetchall()
        lost = []
        for r in rows:
            owner = r["lease_owner"] or "?:0:?"
            if owner == exclude:
                continue
            o_host, o_pid, _ = (owner.rsplit(":", 2) + ["", ""])[:3]
            dead = o_host == host and o_pid.isdigit() and not _pid_alive(int(o_pid))
            if dead or (r["lease_expires"] or 0) < now:
                lost.append(r)
        for r in lost:
            cur = db.execute(
                """UPDATE task SET state='pending', lease_owner=NULL, lease_expires=NULL, started_at=NULL
                   WHERE id=? AND token=? AND state='running'""", (r["id"], r["token"]))
            if cur.rowcount:
                n += 1
                db.execute(
                    "INSERT INTO attempt(task_id, attempt, runner, finished_at, outcome, error) VALUES (?,?,?,?,?,?)",
                    (r["id"], r["attempts"] + 1, r["lease_owner"] or "?", now, "lost",
                     "runner died or lost its lease; re-queued"),
                )
        owners = {r["lease_owner"] for r in lost}
        db.executemany("DELETE FROM runner WHERE id=?", [(o,) for o in owners if o])
        if n:
            db.notify()
    return n


@dataclass(frozen=True)
class Outlook:
    runnable: int        # pending and due now
    next_due: float | None  # earliest not_before among pending tasks not yet due, by the database's clock
    running: int         # leased by anyone
    now: float           # the database's clock when this was read


def outlook(db: Database, step_names: Iterable[str] | None = None) -> Outlook:
    now = db.clock()
    pipe = load_pipeline(db)
    ids = [s.step_id for s in pipe.active if step_names is None or s.name in step_names]
    if not ids:
        return Outlook(0, None, 0, now)
    marks = ",".join("?" * len(ids))
    runnable = db.execute(
        f"SELECT count(*) FROM task WHERE state='pending' AND live=1 AND step_id IN ({marks}) AND not_before <= ?",
        (*ids, now)).fetchone()[0]
    next_due = db.execute(
        f"SELECT min(not_before) FROM task WHERE state='pending' AND live=1 AND step_id IN ({marks}) AND not_before > ?",
        (*ids, now)).fetchone()[0]
    running = db.execute(
        f"SELECT count(*) FROM task WHERE state='running' AND step_id IN ({marks})", ids).fetchone()[0]
    return Outlook(runnable, next_due, running, now)


# -- committing ------------------------------------------------------------------


@dataclass
class Result:
    """What a worker reports about one attempt. Built by the executor, recorded by `commit`."""

    task_id: int
    token: int
    step: str
    attempt: int
    input_name: str
    ok: bool
    started_at: float
    finished_at: float
    exit_code: int | None = None
    error: str | None = None
    outputs: list[tuple[str, str, int]] = field(default_factory=list)  # (name, hash, size)
    stdout: tuple[str, int] | None = None
    stderr: tuple[str, int] | None = None
    stderr_tail: str = ""
    interrupted: bool = False  # killed because we are shutting down: re-queue, don't count
    store_trouble: bool = False  # interrupted because the store or scratch cannot take it (disk full): stop the run
    final: bool = False        # failed in a way a retry cannot mend (its input is missing or damaged)
    started: bool = True       # False for a leased task given back before its script ran
    retries: int = 0
    retry_delay: float = 1.0


@dataclass
class CommitReport:
    done: list[Result] = field(default_factory=list)
    failed: list[Result] = field(default_factory=list)      # out of attempts
    retrying: list[Result] = field(default_factory=list)
    stale: list[Result] = field(default_factory=list)       # lease lost meanwhile: not recorded
    requeued: list[Result] = field(default_factory=list)    # interrupted by shutdown
    created: Counter = field(default_factory=Counter)       # new tasks per step
    unrouted: Counter = field(default_factory=Counter)      # route key -> files
    seconds: float = 0.0                                     # how long the transaction took


@dataclass
class Summary:
    done: Counter = field(default_factory=Counter)
    failed: list[Result] = field(default_factory=list)
    retried: int = 0
    stale: int = 0
    requeued: int = 0
    created: Counter = field(default_factory=Counter)
    unrouted: Counter = field(default_factory=Counter)
    store_error: str | None = None
    started: float = field(default_factory=time.monotonic)
    elapsed: float = 0.0
    interrupted: int | None = None   # the signal that stopped a run early

    @property
    def finished(self) -> int:
        """Tasks that reached an end state (done, or failed for good) in this run."""
        return sum(self.done.values()) + len(self.failed)

    @property
    def attempts(self) -> int:
        """Scripts run to an outcome: every finished task's last attempt, plus the attempts retried."""
        return self.finished + self.retried

    def absorb(self, rep: CommitReport) -> None:
        for r in rep.done:
            self.done[r.step] += 1
        self.failed += rep.failed
        self.retried += len(rep.retrying)
        self.stale += len(rep.stale)
        self.requeued += len(rep.requeued)
        self.created.update(rep.created)
        self.unrouted.update(rep.unrouted)


def retry_delay(base: float, attempt: int) -> float:
    return min(base * 2 ** max(attempt - 1, 0), MAX_RETRY_DELAY)


def commit(db: Database, results: list[Result], runner: str, started: dict[int, int] | None = None) -> CommitReport:
    """Record a batch of attempts in one transaction. Each result is all-or-nothing on its own:
    a result whose token is no longer current (its lease was lost) changes nothing.
    `started` (id -> token) marks tasks whose scripts started since the last commit."""
    rep = CommitReport()
    with db.transaction():
        now = db.clock()
        pipe = load_pipeline(db)
        if started:
            db.executemany("UPDATE task SET started_at=? WHERE id=? AND token=? AND state='running'",
                           [(now, t, tok) for t, tok in started.items()])
        objects = []
        for r in results:
            objects += [(h, s) for _, h, s in r.outputs]
            objects += [x for x in (r.stdout, r.stderr) if x]
        db.executemany("INSERT INTO object(hash, size) VALUES (?, ?) ON CONFLICT DO NOTHING", sorted(set(objects)))
        for r in results:
            if r.interrupted:
                cur = db.execute(
                    """UPDATE task SET state='pending', lease_owner=NULL, lease_expires=NULL, started_at=NULL
                       WHERE id=? AND token=? AND state='running'""", (r.task_id, r.token))
                if cur.rowcount:
                    if r.started:
                        _attempt(db, r, runner, "interrupted")
                    rep.requeued.append(r)
                else:
                    rep.stale.append(r)
            elif r.ok:
                row = db.execute(
                    """UPDATE task SET state='done', attempts=attempts+1, exit_code=0, error=NULL, finished_at=?,
                         lease_owner=NULL, lease_expires=NULL
                       WHERE id=? AND token=? AND state='running' RETURNING live, runset, replaces""",
                    (now, r.task_id, r.token)).fetchone()
                if row is None:
                    rep.stale.append(r)
                    continue
                gone: list[tuple[str, str]] = []
                if row["replaces"] is not None:
                    db.execute("UPDATE task SET replaces=NULL WHERE id=?", (r.task_id,))
                    gone = _outputs(db, row["replaces"])
                    if row["replaces"] == r.task_id:
                        db.execute("DELETE FROM output WHERE task_id=?", (r.task_id,))
                db.executemany(
                    "INSERT INTO output(task_id, name, hash, key) VALUES (?,?,?,?)",
                    [(r.task_id, name, h, route_key(name)) for name, h, _ in r.outputs])
                _attempt(db, r, runner, "ok")
                rep.done.append(r)
                if row["live"]:
                    produced = [(name, h) for name, h, _ in r.outputs]
                    _activate(db, pipe, r.task_id, produced, row["runset"], rep.created, rep.unrouted, now)
                    if gone:
                        keep = set(produced)
                        _retire(db, [o for o in gone if o not in keep])
            else:
                final = r.final or r.attempt > r.retries
                row = db.execute(
                    """UPDATE task SET state=?, attempts=attempts+1, exit_code=?, error=?, finished_at=?, not_before=?,
                         lease_owner=NULL, lease_expires=NULL
                       WHERE id=? AND token=? AND state='running' RETURNING id""",
                    (FAILED if final else PENDING, r.exit_code, r.error, now,
                     0 if final else now + retry_delay(r.retry_delay, r.attempt), r.task_id, r.token)).fetchone()
                if row is None:
                    rep.stale.append(r)
                    continue
                _attempt(db, r, runner, "failed")
                (rep.failed if final else rep.retrying).append(r)
        if rep.created or rep.requeued:
            db.notify()
        rep.seconds = db.clock() - now
    return rep


def _attempt(db: Database, r: Result, runner: str, outcome: str) -> None:
    db.execute(
        """INSERT INTO attempt(task_id, attempt, runner, started_at, finished_at, outcome, exit_code, error,
                               stdout_hash, stderr_hash) VALUES (?,?,?,?,?,?,?,?,?,?)""",
        (r.task_id, r.attempt, runner, r.started_at, r.finished_at, outcome, r.exit_code, r.error,
         r.stdout[0] if r.stdout else None, r.stderr[0] if r.stderr else None))


def _outputs(db: Database, task_id: int) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in db.execute("SELECT name, hash FROM output WHERE task_id=? ORDER BY name", (task_id,))]


def _runset(db: Database, task_id: int) -> str:
    return db.execute("SELECT runset FROM task WHERE id=?", (task_id,)).fetchone()[0]


def _activate(db: Database, pipe: Pipeline, parent: int, produced: list[tuple[str, str]], runset: str,
              created: Counter, unrouted: Counter, now: float) -> None:
    """Route a live task's outputs: a task per consumer, or revive one that was retired.

    In rounds, each a few statements whatever the number of outputs: which of the wanted tasks
    exist already, one insert for the missing ones; a revived task's own outputs make the next
    round. (One statement per output kept a start task with thousands of outputs in its commit
    for most of a second, with the writers' lock held.)"""
    stack = [(parent, name, h, runset) for name, h in produced]
    while stack:
        batch, stack = stack, []
        wanted: dict[tuple[int, str, str], tuple[str, str, int]] = {}   # (step_id, name, hash) -> (step, runset, parent)
        for parent, name, h, runset in batch:
            consumers = pipe.router.consumers(name)
            if not consumers:
                if route_key(name) != "done":
                    unrouted[route_key(name)] += 1
                continue
            for c in consumers:
                if pipe.steps[c].policy.gather:
                    continue  # gathered all at once, by create_gather
                wanted.setdefault((pipe.steps[c].step_id, name, h), (c, runset, parent))
        if not wanted:
            continue
        existing = _existing_tasks(db, list(wanted))
        missing = [k for k in wanted if k not in existing]
        db.executemany(
            """INSERT INTO task(step_id, input_name, input_hash, runset, parent_id, created_at)
               VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING""",
            [(k[0], k[1], k[2], wanted[k][1], wanted[k][2], now) for k in missing])
        for k in missing:
            created[wanted[k][0]] += 1
        for k, (task_id, live) in existing.items():
            if live:
                continue
            row = db.execute("UPDATE task SET live=1 WHERE id=? AND live=0 RETURNING id, state, runset",
                             (task_id,)).fetchone()
            if row is not None and row["state"] == DONE:
                stack += [(row["id"], n2, h2, row["runset"]) for n2, h2 in _outputs(db, row["id"])]


def _existing_tasks(db: Database, keys: list[tuple[int, str, str]]) -> dict[tuple[int, str, str], tuple[int, int]]:
    """Which of these (step_id, input_name, input_hash) have a task already (seed ''): key -> (id, live)."""
    found: dict[tuple[int, str, str], tuple[int, int]] = {}
    for i in range(0, len(keys), 300):
        chunk = keys[i:i + 300]
        values = ",".join("(?,?,?)" for _ in chunk)
        for r in db.execute(
                f"""SELECT t.id, t.step_id, t.input_name, t.input_hash, t.live FROM task t
                    WHERE t.seed = '' AND (t.step_id, t.input_name, t.input_hash) IN (VALUES {values})""",
                [x for k in chunk for x in k]):
            found[(r[1], r[2], r[3])] = (r[0], r[4])
    return found


def _retire(db: Database, gone: list[tuple[str, str]]) -> None:
    """Outputs that stopped being produced: retire the tasks they alone fed, transitively."""
    stack = list(gone)
    while stack:
        name, h = stack.pop()
        still = db.execute(
            """SELECT 1 FROM output o JOIN task t ON t.id = o.task_id
               WHERE o.hash=? AND o.name=? AND t.live=1 AND t.state='done' LIMIT 1""", (h, name)).fetchone()
        if still:
            continue
        for row in db.execute(
                """UPDATE task SET live=0 WHERE input_hash=? AND input_name=? AND live=1 AND parent_id IS NOT NULL
                   RETURNING id, state""", (h, name)).fetchall():
            if row["state"] == DONE:
                stack += _outputs(db, row["id"])


# -- operator actions -------------------------------------------------------------


def retry_failed(db: Database, step: str | None = None) -> Counter:
    """Re-queue failed tasks (of one step, or all); returns how many per step."""
    out: Counter = Counter()
    with db.transaction():
        pipe = load_pipeline(db)
        steps = [pipe.require(step)] if step else list(pipe.steps.values())
        for s in steps:
            n = db.execute(
                """UPDATE task SET state='pending', attempts=0, not_before=0
                   WHERE state='failed' AND live=1 AND step_id=?""", (s.step_id,)).rowcount
            if n:
                out[s.name] = n
        if out:
            db.notify()
    return out


def invalidate(db: Database, step: str) -> int:
    """Re-run a step's current finished tasks in place; their old outputs stay current until the new ones commit."""
    with db.transaction():
        s = load_pipeline(db).require(step)
        n = db.execute(
            """UPDATE task SET state='pending', attempts=0, not_before=0,
                 replaces=CASE WHEN state='done' THEN id ELSE replaces END
               WHERE step_id=? AND live=1 AND state IN ('done', 'failed')""", (s.step_id,)).rowcount
        if n:
            db.notify()
    return n


# -- gather steps ------------------------------------------------------------------------
#
# A gather step's task is made here, not by routing: one task over the step's whole member set,
# the current outputs routed to it, once nothing upstream can still change that set (the barrier).
# The engine asks `gather_states` what is due, stores the listing object (gathering.listing), and
# calls `create_gather`, which checks everything again inside its transaction. `serve` also waits
# for a set to settle; that clock is the engine's (gatherer.py).


@dataclass
class GatherState:
    step: str
    on_failure: str
    settle: float                                   # seconds `serve` lets a set settle before it fires
    upstream: tuple[str, ...]                       # steps that can feed it (gathering.upstream)
    busy: int = 0                                   # live upstream tasks pending or running
    failed: int = 0                                 # live failed tasks of upstream steps' current versions
    members: list[tuple[str, str]] | None = None    # the current set, sorted (None: not read while busy)
    fired: list[tuple[str, str]] | None = None      # the set of its live gather task (None: it has none)
    fired_task: int | None = None
    waiting_for: str | None = None                  # a gather step upstream that has yet to fire

    @property
    def due(self) -> bool:
        """The current set is not the one its live task gathered (an empty set is due only to clear one)."""
        return self.members is not None and self.members != (self.fired or []) and bool(self.members or self.fired)

    @property
    def waiting(self) -> str | None:
        """Why it cannot fire now, for people; None when the barrier holds."""
        if self.busy:
            return f"{self.busy} upstream task(s) pending or running"
        if self.failed and self.on_failure == "wait":
            return f"{self.failed} upstream task(s) failed (on_failure = \"wait\")"
        if self.waiting_for:
            return f"gather step '{self.waiting_for}' upstream of it has yet to fire"
        return None

    @property
    def ready(self) -> bool:
        return self.waiting is None and self.due


def gather_states(db: Database, steps: Iterable[str] | None = None, *, full: bool = False) -> list[GatherState]:
    """Where each gather step of the manifest stands, upstream gather steps first. The member set is
    read only when the barrier holds (or with `full`, for status). Nothing when there are none."""
    pipe = load_pipeline(db)
    up = pipe.gather_upstream
    if not up:
        return []
    versions: dict[str, list[int]] = {}
    for step_id, name in db.execute("SELECT id, name FROM step"):
        versions.setdefault(name, []).append(step_id)
    wanted = None if steps is None else set(steps)
    out: dict[str, GatherState] = {}
    for g in gathering.firing_order(up):
        st = _gather_state(db, pipe, g, versions, out, full=full)
        out[g] = st
    return [st for g, st in out.items() if wanted is None or g in wanted]


def _gather_state(db: Database, pipe: Pipeline, g: str, versions: dict[str, list[int]],
                  before: dict[str, GatherState], *, full: bool = False) -> GatherState:
    """One gather step's state; `before` holds those of the gather steps ahead of it in firing order."""
    up = pipe.gather_upstream[g]
    step = pipe.steps[g]
    st = GatherState(g, step.policy.on_failure, step.policy.settle, tuple(sorted(up)))
    ids = [i for name in up for i in versions.get(name, ())]
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        marks = ",".join("?" * len(chunk))
        st.busy += db.execute(f"SELECT count(*) FROM task WHERE step_id IN ({marks}) AND live=1 "
                              f"AND state IN ('pending', 'running')", chunk).fetchone()[0]
    current = [pipe.steps[name].step_id for name in up if name in pipe.steps]
    if current:
        marks = ",".join("?" * len(current))
        st.failed = db.execute(f"SELECT count(*) FROM task WHERE step_id IN ({marks}) AND live=1 AND state='failed'",
                               current).fetchone()[0]
    for h, other in before.items():
        # an upstream gather step that is due and free to fire (settling, say) will change this set
        if h in up and g not in pipe.gather_upstream.get(h, ()) and other.due \
                and (other.waiting is None or other.waiting_for is not None):
            st.waiting_for = h
            break
    if st.busy and not full:
        return st
    mine = versions.get(g, [])
    marks = ",".join("?" * len(mine))
    live = db.execute(f"""SELECT t.id FROM task t WHERE t.step_id IN ({marks}) AND t.live=1
                          AND EXISTS (SELECT 1 FROM gather_member m WHERE m.task_id = t.id)
                          ORDER BY t.id DESC LIMIT 1""", mine).fetchone()
    if live is not None:
        st.fired_task = live[0]
        # sorted here, not by the database: PostgreSQL's collation need not be Python's (nor the listing's)
        st.fired = sorted((r[0], r[1]) for r in db.execute("SELECT name, hash FROM gather_member WHERE task_id=?",
                                                            (live[0],)))
    st.members = _member_set(db, step, mine)
    return st


def _member_set(db: Database, step: CurrentStep, own_ids: list[int]) -> list[tuple[str, str]]:
    """The current outputs a gather step consumes: of live done tasks, never its own (a gather step
    whose outputs route back to it would otherwise fire for ever)."""
    exact = [p for p in step.consumes if not is_glob(p)]
    globs = [p for p in step.consumes if is_glob(p)]
    own = set(own_ids)
    found: set[tuple[str, str]] = set()
    sql = """SELECT o.name, o.hash, t.step_id FROM output o JOIN task t ON t.id = o.task_id
             WHERE t.live = 1 AND t.state = 'done'"""
    for key in exact:
        found.update((r[0], r[1]) for r in db.execute(sql + " AND o.key = ?", (key,)) if r[2] not in own)
    if globs:
        found.update((r[0], r[1]) for r in db.execute(sql) if r[2] not in own and matches(globs, r[0]))
    return sorted(found)


@dataclass(frozen=True)
class Gathered:
    step: str
    task_id: int | None      # None: the set became empty and the previous result was retired
    members: int
    failed: int               # upstream tasks that failed and are left out (on_failure = "gather")
    how: str                  # "queued" (a new task), "restored" (this set was gathered before), "cleared"


def create_gather(db: Database, step: str, members: list[tuple[str, str]], listing: tuple[str, int] | None,
                  ) -> Gathered | None:
    """Make `step`'s task for this member set (`listing`: its listing object, stored already), if the
    barrier still holds and the set is still the current one; None otherwise. The step's previous
    gather task gives way: its outputs are retired when the new one commits, as after a migration.
    A set gathered before gets its old task back (done: its results count again, nothing runs)."""
    with db.transaction():
        now = db.clock()
        pipe = load_pipeline(db)
        st = next((x for x in gather_states(db) if x.step == step), None)
        if st is None or not st.ready or st.members != sorted(members):
            return None
        cur = pipe.steps[step]
        mine = [r[0] for r in db.execute("SELECT id FROM step WHERE name=?", (step,))]
        marks = ",".join("?" * len(mine))
        old = db.execute(
            f"""UPDATE task SET live=0 WHERE step_id IN ({marks}) AND live=1
                  AND EXISTS (SELECT 1 FROM gather_member m WHERE m.task_id = task.id) RETURNING id, state, replaces""",
            mine).fetchall()
        # The result this task gives way to: the live one, or, when the live task never finished (it
        # failed, or the set changed before it ran), the one that task was to replace, whose outputs
        # are still current downstream and would otherwise stay so for good.
        before = sorted({r["id"] for r in old if r["state"] == DONE}
                        | {r["replaces"] for r in old if r["state"] != DONE and r["replaces"] is not None})
        done_before = before[-1] if before else None
        gone = _outputs(db, done_before) if done_before else []
        if len(before) > 1:  # more than one result to replace (never made here): the others give way now
            keep = set(gone)
            _retire(db, [o for t in before[:-1] for o in _outputs(db, t) if o not in keep])
        failed = st.failed if st.on_failure == "gather" else 0
        if not members:
            _retire(db, gone)
            return Gathered(step, None, 0, failed, "cleared")
        assert listing is not None
        db.execute("INSERT INTO object(hash, size) VALUES (?, ?) ON CONFLICT DO NOTHING", listing)
        row = db.execute(
            """INSERT INTO task(step_id, input_name, input_hash, runset, replaces, created_at)
               VALUES (?,?,?,'',?,?) ON CONFLICT DO NOTHING RETURNING id""",
            (cur.step_id, GATHER_INPUT, listing[0], done_before, now)).fetchone()
        if row is not None:
            db.executemany("INSERT INTO gather_member(task_id, name, hash) VALUES (?,?,?)",
                           [(row[0], n, h) for n, h in members])
            db.notify()
            return Gathered(step, row[0], len(members), failed, "queued")
        twin = db.execute("SELECT id, state FROM task WHERE step_id=? AND input_name=? AND input_hash=? AND seed=''",
                          (cur.step_id, GATHER_INPUT, listing[0])).fetchone()
        if twin["state"] == DONE:
            db.execute("UPDATE task SET live=1, replaces=NULL WHERE id=?", (twin["id"],))
            outs = _outputs(db, twin["id"])
            _activate(db, pipe, twin["id"], outs, "", Counter(), Counter(), now)
            keep = set(outs)
            _retire(db, [o for o in gone if o not in keep])
            db.notify()
        elif twin["state"] == FAILED:
            # stays failed until `retry`; the previous result stays current until then, as it does
            # when a new set's task fails
            db.execute("UPDATE task SET live=1, replaces=? WHERE id=?", (done_before, twin["id"]))
        else:
            db.execute("UPDATE task SET live=1, replaces=? WHERE id=?", (done_before, twin["id"]))
            db.notify()
        return Gathered(step, twin["id"], len(members), failed, "restored" if twin["state"] == DONE else "queued")


# -- what a run would do --------------------------------------------------------------


PLAN_REASONS = ("start", "new input", "re-run", "retry")


def plan(db: Database, steps: frozenset[str] | None = None) -> dict[str, Counter]:
    """Pending work per step and why it is there: a start task, a new input, a re-run of a finished
    task (migrated or invalidated), or a retry of a failed attempt."""
    pipe = load_pipeline(db)
    out: dict[str, Counter] = {}
    for s in pipe.active:
        if steps is not None and s.name not in steps:
            continue
        c = Counter()
        for seed, replaces, tried, n in db.execute(
                """SELECT seed != '' OR (input_hash = '' AND parent_id IS NULL), replaces IS NOT NULL,
                          attempts > 0 OR finished_at IS NOT NULL, count(*)
                   FROM task WHERE step_id=? AND state='pending' AND live=1 GROUP BY 1, 2, 3""", (s.step_id,)):
            # a re-run replaces a finished result (migrate, invalidate); a retry follows a failure
            reason = "re-run" if replaces else "retry" if tried else "start" if seed else "new input"
            c[reason] += n
        if c:
            out[s.name] = c
    return out
