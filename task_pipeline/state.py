"""State: what the SQLite database knows, and every transaction that changes it.

All functions here are synchronous and take a `sqlite3.Connection`; each public
mutation is one transaction. The async engine runs them on one database thread
(see `Db` in scheduler.py), which is what makes "one writer that batches commits"
cheap: a whole batch of task commits is one call and one transaction, not one
awaited round trip per statement.

The central ideas:
- `register` turns a manifest into step versions and `step_current` rows.
- A task's identity is (step version, input name, input hash, seed); inserting
  it twice is a no-op, which gives early cutoff for free.
- `commit` records a batch of finished attempts; a result counts only if the
  task's fencing token is still the one it was claimed with.
- A task that is superseded (`live = 0`) is kept as history. When a task takes
  over from another (migrate, invalidate), outputs the old one had and the new
  one does not are retired, and so are the tasks fed only by them.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from task_pipeline.errors import StoreError, UsageError
from task_pipeline.manifest import Manifest
from task_pipeline.routing import Router, is_glob, matches, route_key
from task_pipeline.schema import MIGRATIONS, SCHEMA_VERSION

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
MAX_RETRY_DELAY = 3600.0


# -- opening ---------------------------------------------------------------


def db_path(db_dir: Path) -> Path:
    return Path(db_dir) / "db"


def connect(db_dir: Path, *, create: bool = False, hash_algo: str = "sha256") -> sqlite3.Connection:
    path = db_path(db_dir)
    if not path.exists():
        if not create:
            raise StoreError(f"{db_dir}: no store here; create one with 'task-pipeline -manifest M -db {db_dir} -run' or pass the right -db")
        try:
            Path(db_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{db_dir}: cannot create the store directory: {e.strerror}") from None
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 60000")
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode: a process crash loses nothing; a power cut may roll back
        # the last commits, whose tasks then run again (at-least-once still holds).
        conn.execute("PRAGMA synchronous = NORMAL")
        _migrate(conn, hash_algo)
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path}: not a usable task-pipeline database ({e}); restore it from a backup or point -db elsewhere") from None
    except OSError as e:
        raise StoreError(f"{path}: cannot open: {e.strerror}") from None
    return conn


def _migrate(conn: sqlite3.Connection, hash_algo: str) -> None:
    have_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
    version = 0
    if have_meta:
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = int(row[0]) if row else 0
    elif conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
        raise StoreError("the database has tables but is not a task-pipeline store; point -db elsewhere")
    if version > SCHEMA_VERSION:
        raise StoreError(f"this store was written by a newer task-pipeline (schema {version}, this one knows {SCHEMA_VERSION}); upgrade task-pipeline")
    if version == SCHEMA_VERSION:
        return
    with transaction(conn):
        # re-read inside the write lock: another process may have created or migrated the store meanwhile
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone():
            version = int(conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StoreError(f"this store was written by a newer task-pipeline (schema {version}, this one knows {SCHEMA_VERSION}); upgrade task-pipeline")
        for i in range(version, SCHEMA_VERSION):
            for stmt in MIGRATIONS[i].split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            if i == 0:
                conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", [
                    ("hash_algo", hash_algo), ("created_at", repr(time.time())), ("schema_version", "0"),
                ])
        conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    _begin(conn)
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    try:
        conn.execute("COMMIT")
    except sqlite3.OperationalError as e:
        # a failed COMMIT (disk full, I/O error) leaves the transaction open: end it, and say what happened
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if "full" in str(e) or "disk I/O" in str(e):
            raise StoreError(f"cannot write the database: {e}; nothing of this transaction was recorded") from None
        raise


def _begin(conn: sqlite3.Connection) -> None:
    # busy_timeout already waits; this loop covers the rare busy error SQLite
    # returns without waiting (a deadlock between a reader upgrading and a writer).
    for delay in (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30):
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            time.sleep(delay)
    raise StoreError("the database stayed locked for minutes; is another process stuck holding it?")


def meta(conn: sqlite3.Connection, key: str, default: str | None = None) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return row[0] if row else default


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))


# -- the registered pipeline -------------------------------------------------


@dataclass(frozen=True)
class Policy:
    parallel: int | None = None
    retries: int = 0
    retry_delay: float = 1.0
    timeout: float | None = None
    schedule: float | None = None


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

    def require(self, name: str) -> CurrentStep:
        s = self.steps.get(name)
        if s is None or not s.in_manifest:
            known = ", ".join(x.name for x in self.active) or "none"
            raise UsageError(f"no step named '{name}' in this store's manifest (steps: {known})")
        return s


_pipelines: dict[int, tuple[sqlite3.Connection, str | None, Pipeline]] = {}


def load_pipeline(conn: sqlite3.Connection) -> Pipeline:
    """The registered pipeline. Every claim and commit needs it, so it is cached per connection
    and rebuilt only when `register` has bumped the generation (from any process)."""
    gen = meta(conn, "generation")
    hit = _pipelines.get(id(conn))
    if hit is not None and hit[0] is conn and hit[1] == gen and gen is not None:
        return hit[2]
    pipe = _load_pipeline(conn)
    _pipelines[id(conn)] = (conn, gen, pipe)
    return pipe


def _load_pipeline(conn: sqlite3.Connection) -> Pipeline:
    rows = conn.execute(
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
    wd = meta(conn, "workdir")
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
    tainted: dict[str, Taint] = field(default_factory=dict)


def register(conn: sqlite3.Connection, manifest: Manifest, now: float | None = None) -> Registration:
    """Make the database's pipeline match the manifest. Idempotent; cheap when nothing changed."""
    now = now or time.time()
    reg = Registration()
    with transaction(conn):
        prev = {r["name"]: r for r in conn.execute("SELECT * FROM step_current")}
        switched: list[tuple[str, int]] = []
        backfill: list[str] = []
        for pos, step in enumerate(manifest.steps):
            row = conn.execute("SELECT id, version FROM step WHERE name=? AND identity=?", (step.name, step.identity)).fetchone()
            if row is None:
                version = conn.execute("SELECT coalesce(max(version), 0) + 1 FROM step WHERE name=?", (step.name,)).fetchone()[0]
                step_id = conn.execute(
                    "INSERT INTO step(name, version, identity, script, shell, env, created_at) VALUES (?,?,?,?,?,?,?)",
                    (step.name, version, step.identity, step.script, step.shell, json.dumps(step.env, sort_keys=True), now),
                ).lastrowid
            else:
                step_id, version = row["id"], row["version"]
            consumes = json.dumps(list(step.consumes))
            policy = json.dumps(Policy(step.parallel, step.retries, step.retry_delay, step.timeout, step.schedule).__dict__)
            p = prev.get(step.name)
            conn.execute(
                """INSERT INTO step_current(name, step_id, consumes, policy, is_start, in_manifest, position)
                   VALUES (?,?,?,?,?,1,?)
                   ON CONFLICT(name) DO UPDATE SET step_id=excluded.step_id, consumes=excluded.consumes,
                     policy=excluded.policy, is_start=excluded.is_start, in_manifest=1, position=excluded.position""",
                (step.name, step_id, consumes, policy, int(step.start), pos),
            )
            if p is None or p["step_id"] != step_id:
                old_version = None
                if p is not None:
                    old_version = conn.execute("SELECT version FROM step WHERE id=?", (p["step_id"],)).fetchone()[0]
                if p is not None or row is None:
                    reg.new_versions.append((step.name, old_version, version))
                if p is not None:
                    switched.append((step.name, step_id))
            if p is None or p["consumes"] != consumes or not p["in_manifest"]:
                backfill.append(step.name)
        gone = set(prev) - set(manifest.names)
        conn.executemany("UPDATE step_current SET in_manifest=0 WHERE name=?", [(n,) for n in gone])
        set_meta(conn, "workdir", str(manifest.workdir))
        set_meta(conn, "generation", os.urandom(8).hex())
        set_meta(conn, "manifest", str(Path(manifest.path).resolve()))

        pipe = load_pipeline(conn)
        for name, step_id in switched:
            _follow_version(conn, pipe, name, step_id, reg, now)
        for name in backfill:
            reg.backfilled[name] += _backfill(conn, pipe, pipe.steps[name], now)
    reg.tainted = tainted(conn)
    return reg


def _follow_version(conn, pipe: Pipeline, name: str, step_id: int, reg: Registration, now: float) -> None:
    """The current version of `name` changed: pending work follows it, and results it already has count again."""
    old = conn.execute(
        """SELECT t.* FROM task t JOIN step s ON s.id = t.step_id
           WHERE s.name = ? AND t.step_id != ? AND t.live = 1 AND t.state IN ('pending', 'done', 'failed')""",
        (name, step_id),
    ).fetchall()
    for t in old:
        if t["state"] == PENDING:
            _take_over(conn, pipe, t, step_id, now)
            reg.requeued[name] += 1
            continue
        twin = conn.execute(
            "SELECT id, state FROM task WHERE step_id=? AND input_name=? AND input_hash=? AND seed=?",
            (step_id, t["input_name"], t["input_hash"], t["seed"]),
        ).fetchone()
        if twin is not None and twin["state"] == DONE:
            _take_over(conn, pipe, t, step_id, now)
            reg.restored[name] += 1


def _take_over(conn, pipe: Pipeline, old: sqlite3.Row, step_id: int, now: float) -> str:
    """Supersede task `old` by its counterpart on `step_id` (created if needed). Returns 'queued' or 'restored'."""
    conn.execute("UPDATE task SET live=0 WHERE id=?", (old["id"],))
    new_id = conn.execute(
        """INSERT INTO task(step_id, input_name, input_hash, seed, runset, parent_id, replaces, created_at)
           VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING RETURNING id""",
        (step_id, old["input_name"], old["input_hash"], old["seed"], old["runset"], old["parent_id"],
         old["id"] if old["state"] == DONE else None, now),
    ).fetchone()
    if new_id is not None:
        return "queued"
    twin = conn.execute(
        "SELECT id, state FROM task WHERE step_id=? AND input_name=? AND input_hash=? AND seed=?",
        (step_id, old["input_name"], old["input_hash"], old["seed"]),
    ).fetchone()
    replaces = old["id"] if old["state"] == DONE else None
    if twin["state"] == DONE:
        conn.execute("UPDATE task SET live=1, replaces=NULL WHERE id=?", (twin["id"],))
        new_outputs = _outputs(conn, twin["id"])
        gone = [o for o in _outputs(conn, old["id"])] if replaces else []
        _activate(conn, pipe, twin["id"], new_outputs, _runset(conn, twin["id"]), Counter(), Counter(), now)
        _retire(conn, [o for o in gone if o not in set(new_outputs)])
        return "restored"
    if twin["state"] == RUNNING:
        conn.execute("UPDATE task SET live=1, replaces=? WHERE id=?", (replaces, twin["id"]))
    else:
        conn.execute(
            "UPDATE task SET live=1, state='pending', attempts=0, not_before=0, error=NULL, replaces=? WHERE id=?",
            (replaces, twin["id"]),
        )
    return "queued"


def _backfill(conn, pipe: Pipeline, step: CurrentStep, now: float) -> int:
    """Create tasks for current outputs that `step` consumes and has never seen (a new step or new inputs)."""
    if step.is_start:
        return 0
    exact = [p for p in step.consumes if not is_glob(p)]
    globs = [p for p in step.consumes if is_glob(p)]
    found: list[sqlite3.Row] = []
    sql = """SELECT o.task_id, o.name, o.hash, t.runset FROM output o JOIN task t ON t.id = o.task_id
             WHERE t.live = 1 AND t.state = 'done'"""
    for key in exact:
        found += conn.execute(sql + " AND o.key = ?", (key,)).fetchall()
    if globs:
        found += [r for r in conn.execute(sql) if matches(globs, r["name"])]
    made = 0
    seen = set()
    for r in found:
        if (r["name"], r["hash"]) in seen:
            continue
        seen.add((r["name"], r["hash"]))
        cur = conn.execute(
            """INSERT INTO task(step_id, input_name, input_hash, runset, parent_id, created_at)
               VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING""",
            (step.step_id, r["name"], r["hash"], r["runset"], r["task_id"], now),
        )
        made += cur.rowcount
    return made


def tainted(conn: sqlite3.Connection) -> dict[str, Taint]:
    """Finished tasks (done or failed) of a version that is no longer current, per step.

    Counted per old version through the (step_id, state, live) index, so the cost
    follows the number of tainted tasks, not the size of the store.
    """
    out: dict[str, Taint] = {}
    old_versions = conn.execute(
        """SELECT c.name, s.id, s.version, cs.version AS current FROM step s
           JOIN step_current c ON c.name = s.name JOIN step cs ON cs.id = c.step_id
           WHERE s.id != c.step_id ORDER BY c.position, s.version""").fetchall()
    for r in old_versions:
        n = conn.execute(
            "SELECT count(*) FROM task WHERE step_id=? AND state IN ('done', 'failed') AND live=1",
            (r["id"],)).fetchone()[0]
        if n:
            t = out.setdefault(r["name"], Taint(0, (), r["current"]))
            t.count += n
            t.from_versions = (*t.from_versions, r["version"])
    return out


def counts(conn: sqlite3.Connection, states: Iterable[str] = ("pending", "running")) -> dict[str, Counter]:
    """Live tasks per current step and state, through the index: cheap for the states asked for."""
    out: dict[str, Counter] = {}
    for s in load_pipeline(conn).steps.values():
        c = out[s.name] = Counter()
        for st in states:
            c[st] = conn.execute("SELECT count(*) FROM task WHERE step_id=? AND state=? AND live=1",
                                 (s.step_id, st)).fetchone()[0]
    return out


def migrate_tainted(conn: sqlite3.Connection, *, dry_run: bool = False, now: float | None = None) -> dict[str, Taint]:
    """Re-queue every tainted task on its step's current version; the old task becomes history."""
    now = now or time.time()
    with transaction(conn):
        found = tainted(conn)
        if dry_run or not found:
            return found
        pipe = load_pipeline(conn)
        for name in found:
            step_id = pipe.steps[name].step_id
            rows = conn.execute(
                """SELECT t.* FROM task t JOIN step s ON s.id = t.step_id
                   WHERE s.name = ? AND t.step_id != ? AND t.live = 1 AND t.state IN ('done', 'failed')""",
                (name, step_id),
            ).fetchall()
            for t in rows:
                _take_over(conn, pipe, t, step_id, now)
    return found


# -- seeding and submitting ------------------------------------------------------


def seed_start(conn: sqlite3.Connection, names: Iterable[str], runset: str, now: float | None = None) -> int:
    """A start task per step and runset; one that exists already is not made again."""
    now = now or time.time()
    made = 0
    with transaction(conn):
        pipe = load_pipeline(conn)
        for name in names:
            step = pipe.require(name)
            made += conn.execute(
                """INSERT INTO task(step_id, input_name, input_hash, seed, runset, created_at)
                   VALUES (?, '', '', ?, ?, ?) ON CONFLICT DO NOTHING""",
                (step.step_id, runset, runset, now),
            ).rowcount
    return made


def submit(conn: sqlite3.Connection, items: list[tuple[str, str, int, str | None]], runset: str = "",
           now: float | None = None) -> list[tuple[str, list[str]]]:
    """Add external inputs: (file name, hash, size, step or None to route by name).

    Returns, per item, the steps that got a new task (empty when every one existed).
    """
    now = now or time.time()
    report = []
    with transaction(conn):
        pipe = load_pipeline(conn)
        for name, h, size, step_name in items:
            conn.execute("INSERT OR IGNORE INTO object(hash, size) VALUES (?, ?)", (h, size))
            targets = [pipe.require(step_name).name] if step_name else list(pipe.router.consumers(name))
            if not targets:
                raise UsageError(f"'{name}' routes to key '{route_key(name)}', which no step consumes; name the step: submit STEP FILE")
            made = []
            for t in targets:
                cur = conn.execute(
                    """INSERT INTO task(step_id, input_name, input_hash, runset, created_at)
                       VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING""",
                    (pipe.steps[t].step_id, name, h, runset, now),
                )
                if cur.rowcount:
                    made.append(t)
            report.append((name, made))
    return report


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


def runner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


def register_runner(conn: sqlite3.Connection, owner: str, kind: str, now: float | None = None) -> None:
    now = now or time.time()
    host, pid, _ = owner.rsplit(":", 2)
    with transaction(conn):
        conn.execute(
            "INSERT OR REPLACE INTO runner(id, host, pid, kind, started_at, heartbeat) VALUES (?,?,?,?,?,?)",
            (owner, host, int(pid), kind, now, now),
        )


def unregister_runner(conn: sqlite3.Connection, owner: str) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM runner WHERE id=?", (owner,))


def claim(conn: sqlite3.Connection, owner: str, caps: Callable[[Pipeline], dict[str, int]], room: int,
          lease: float, now: float | None = None) -> list[Claimed]:
    """Lease up to `room` runnable tasks, at most `caps(pipeline)[step]` per step, visiting steps
    in the order `caps` gives and oldest tasks first, in one transaction."""
    now = now or time.time()
    out: list[Claimed] = []
    with transaction(conn):
        pipe = load_pipeline(conn)
        for name, cap in caps(pipe).items():
            step = pipe.steps.get(name)
            n = min(cap, room - len(out))
            if n <= 0 or step is None or not step.in_manifest:
                continue
            rows = conn.execute(
                """UPDATE task SET state='running', token=token+1, lease_owner=?, lease_expires=?
                   WHERE id IN (SELECT id FROM task WHERE step_id=? AND state='pending' AND live=1
                                AND not_before <= ? ORDER BY id LIMIT ?)
                   RETURNING id, token, attempts, input_name, input_hash, runset""",
                (owner, now + lease, step.step_id, now, n),
            ).fetchall()
            rows.sort(key=lambda r: r["id"])
            out += [Claimed(r["id"], r["token"], r["attempts"] + 1, step, r["input_name"], r["input_hash"],
                            r["runset"], pipe.workdir) for r in rows]
    return out


def renew(conn: sqlite3.Connection, owner: str, lease: float, now: float | None = None) -> None:
    now = now or time.time()
    with transaction(conn):
        conn.execute("UPDATE task SET lease_expires=? WHERE state='running' AND lease_owner=?", (now + lease, owner))
        conn.execute("UPDATE runner SET heartbeat=? WHERE id=?", (now, owner))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(conn: sqlite3.Connection, now: float | None = None, *, exclude: str | None = None) -> int:
    """Return tasks of dead runners to the queue: at once if the runner was on this host and its
    process is gone, otherwise when the lease has expired. The lost attempt does not count."""
    now = now or time.time()
    host = socket.gethostname()
    rows = conn.execute("SELECT id, token, attempts, lease_owner, lease_expires FROM task WHERE state='running'").fetchall()
    lost = []
    for r in rows:
        owner = r["lease_owner"] or "?:0:?"
        if owner == exclude:
            continue
        o_host, o_pid, _ = (owner.rsplit(":", 2) + ["", ""])[:3]
        dead = o_host == host and o_pid.isdigit() and not _pid_alive(int(o_pid))
        if dead or (r["lease_expires"] or 0) < now:
            lost.append(r)
    if not lost:
        return 0
    n = 0
    with transaction(conn):
        for r in lost:
            cur = conn.execute(
                """UPDATE task SET state='pending', lease_owner=NULL, lease_expires=NULL
                   WHERE id=? AND token=? AND state='running'""", (r["id"], r["token"]))
            if cur.rowcount:
                n += 1
                conn.execute(
                    "INSERT INTO attempt(task_id, attempt, runner, finished_at, outcome, error) VALUES (?,?,?,?,?,?)",
                    (r["id"], r["attempts"] + 1, r["lease_owner"] or "?", now, "lost", "runner died or lost its lease; re-queued"),
                )
        live_owners = {r["lease_owner"] for r in lost}
        conn.executemany("DELETE FROM runner WHERE id=?", [(o,) for o in live_owners if o])
    return n


@dataclass(frozen=True)
class Outlook:
    runnable: int        # pending and due now
    next_due: float | None  # earliest not_before among pending tasks not yet due
    running: int         # leased by anyone


def outlook(conn: sqlite3.Connection, step_names: Iterable[str] | None = None, now: float | None = None) -> Outlook:
    now = now or time.time()
    pipe = load_pipeline(conn)
    ids = [s.step_id for s in pipe.active if step_names is None or s.name in step_names]
    if not ids:
        return Outlook(0, None, 0)
    marks = ",".join("?" * len(ids))
    runnable = conn.execute(
        f"SELECT count(*) FROM task WHERE state='pending' AND live=1 AND step_id IN ({marks}) AND not_before <= ?",
        (*ids, now)).fetchone()[0]
    next_due = conn.execute(
        f"SELECT min(not_before) FROM task WHERE state='pending' AND live=1 AND step_id IN ({marks}) AND not_before > ?",
        (*ids, now)).fetchone()[0]
    running = conn.execute(
        f"SELECT count(*) FROM task WHERE state='running' AND step_id IN ({marks})", ids).fetchone()[0]
    return Outlook(runnable, next_due, running)


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


def retry_delay(base: float, attempt: int) -> float:
    return min(base * 2 ** max(attempt - 1, 0), MAX_RETRY_DELAY)


def commit(conn: sqlite3.Connection, results: list[Result], runner: str, now: float | None = None) -> CommitReport:
    """Record a batch of attempts in one transaction. Each result is all-or-nothing on its own:
    a result whose token is no longer current (its lease was lost) changes nothing."""
    now = now or time.time()
    rep = CommitReport()
    with transaction(conn):
        pipe = load_pipeline(conn)
        objects = []
        for r in results:
            objects += [(h, s) for _, h, s in r.outputs]
            objects += [x for x in (r.stdout, r.stderr) if x]
        conn.executemany("INSERT OR IGNORE INTO object(hash, size) VALUES (?, ?)", objects)
        for r in results:
            if r.interrupted:
                cur = conn.execute(
                    """UPDATE task SET state='pending', lease_owner=NULL, lease_expires=NULL
                       WHERE id=? AND token=? AND state='running'""", (r.task_id, r.token))
                if cur.rowcount:
                    _attempt(conn, r, runner, "interrupted")
                    rep.requeued.append(r)
                else:
                    rep.stale.append(r)
            elif r.ok:
                row = conn.execute(
                    """UPDATE task SET state='done', attempts=attempts+1, exit_code=0, error=NULL, finished_at=?,
                         lease_owner=NULL, lease_expires=NULL
                       WHERE id=? AND token=? AND state='running' RETURNING live, runset, replaces""",
                    (now, r.task_id, r.token)).fetchone()
                if row is None:
                    rep.stale.append(r)
                    continue
                gone: list[tuple[str, str]] = []
                if row["replaces"] is not None:
                    conn.execute("UPDATE task SET replaces=NULL WHERE id=?", (r.task_id,))
                    gone = _outputs(conn, row["replaces"])
                    if row["replaces"] == r.task_id:
                        conn.execute("DELETE FROM output WHERE task_id=?", (r.task_id,))
                conn.executemany(
                    "INSERT INTO output(task_id, name, hash, key) VALUES (?,?,?,?)",
                    [(r.task_id, name, h, route_key(name)) for name, h, _ in r.outputs])
                _attempt(conn, r, runner, "ok")
                rep.done.append(r)
                if row["live"]:
                    produced = [(name, h) for name, h, _ in r.outputs]
                    _activate(conn, pipe, r.task_id, produced, row["runset"], rep.created, rep.unrouted, now)
                    if gone:
                        keep = set(produced)
                        _retire(conn, [o for o in gone if o not in keep])
            else:
                final = r.final or r.attempt > r.retries
                row = conn.execute(
                    """UPDATE task SET state=?, attempts=attempts+1, exit_code=?, error=?, finished_at=?, not_before=?,
                         lease_owner=NULL, lease_expires=NULL
                       WHERE id=? AND token=? AND state='running' RETURNING id""",
                    (FAILED if final else PENDING, r.exit_code, r.error, now,
                     0 if final else now + retry_delay(r.retry_delay, r.attempt), r.task_id, r.token)).fetchone()
                if row is None:
                    rep.stale.append(r)
                    continue
                _attempt(conn, r, runner, "failed")
                (rep.failed if final else rep.retrying).append(r)
    return rep


def _attempt(conn, r: Result, runner: str, outcome: str) -> None:
    conn.execute(
        """INSERT INTO attempt(task_id, attempt, runner, started_at, finished_at, outcome, exit_code, error,
                               stdout_hash, stderr_hash) VALUES (?,?,?,?,?,?,?,?,?,?)""",
        (r.task_id, r.attempt, runner, r.started_at, r.finished_at, outcome, r.exit_code, r.error,
         r.stdout[0] if r.stdout else None, r.stderr[0] if r.stderr else None))


def _outputs(conn, task_id: int) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in conn.execute("SELECT name, hash FROM output WHERE task_id=?", (task_id,))]


def _runset(conn, task_id: int) -> str:
    return conn.execute("SELECT runset FROM task WHERE id=?", (task_id,)).fetchone()[0]


def _activate(conn, pipe: Pipeline, parent: int, produced: list[tuple[str, str]], runset: str,
              created: Counter, unrouted: Counter, now: float) -> None:
    """Route a live task's outputs: a task per consumer, or revive one that was retired."""
    stack = [(parent, name, h, runset) for name, h in produced]
    while stack:
        parent, name, h, runset = stack.pop()
        consumers = pipe.router.consumers(name)
        if not consumers:
            if route_key(name) != "done":
                unrouted[route_key(name)] += 1
            continue
        for c in consumers:
            step_id = pipe.steps[c].step_id
            cur = conn.execute(
                """INSERT INTO task(step_id, input_name, input_hash, runset, parent_id, created_at)
                   VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING""",
                (step_id, name, h, runset, parent, now))
            if cur.rowcount:
                created[c] += 1
                continue
            row = conn.execute(
                """UPDATE task SET live=1 WHERE step_id=? AND input_name=? AND input_hash=? AND seed='' AND live=0
                   RETURNING id, state, runset""", (step_id, name, h)).fetchone()
            if row is not None and row["state"] == DONE:
                stack += [(row["id"], n2, h2, row["runset"]) for n2, h2 in _outputs(conn, row["id"])]


def _retire(conn, gone: list[tuple[str, str]]) -> None:
    """Outputs that stopped being produced: retire the tasks they alone fed, transitively."""
    stack = list(gone)
    while stack:
        name, h = stack.pop()
        still = conn.execute(
            """SELECT 1 FROM output o JOIN task t ON t.id = o.task_id
               WHERE o.hash=? AND o.name=? AND t.live=1 AND t.state='done' LIMIT 1""", (h, name)).fetchone()
        if still:
            continue
        for row in conn.execute(
                """UPDATE task SET live=0 WHERE input_hash=? AND input_name=? AND live=1 AND parent_id IS NOT NULL
                   RETURNING id, state""", (h, name)).fetchall():
            if row["state"] == DONE:
                stack += _outputs(conn, row["id"])


# -- operator actions -------------------------------------------------------------


def retry_failed(conn: sqlite3.Connection, step: str | None = None) -> int:
    with transaction(conn):
        pipe = load_pipeline(conn)
        ids = [pipe.require(step).step_id] if step else [s.step_id for s in pipe.steps.values()]
        marks = ",".join("?" * len(ids))
        return conn.execute(
            f"""UPDATE task SET state='pending', attempts=0, not_before=0
                WHERE state='failed' AND live=1 AND step_id IN ({marks})""", ids).rowcount


def invalidate(conn: sqlite3.Connection, step: str) -> int:
    """Re-run a step's current finished tasks in place; their old outputs stay current until the new ones commit."""
    with transaction(conn):
        s = load_pipeline(conn).require(step)
        return conn.execute(
            """UPDATE task SET state='pending', attempts=0, not_before=0,
                 replaces=CASE WHEN state='done' THEN id ELSE replaces END
               WHERE step_id=? AND live=1 AND state IN ('done', 'failed')""", (s.step_id,)).rowcount
