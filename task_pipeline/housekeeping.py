"""Housekeeping: `fsck`, `gc`, and the sweeping of dead runners' scratch (SPEC sections 4 and 8).

fsck
    Re-hashes every object file and checks every reference the database holds (task
    inputs, outputs, attempt logs, gather members): a reference to a missing object, or an object whose
    bytes no longer hash to its name, is a problem, reported by hash together with the
    tasks that used it. Unreferenced objects and leftover scratch are harmless and only
    mentioned (gc removes them). Exit 0 when clean, 1 when problems were found, 3 when
    the store cannot be read at all.

gc
    Removes objects that nothing references (orphans of crashed, failed or superseded
    attempts) and scratch left in tmp/ by processes that are gone, and says how many
    bytes that freed. It refuses while a runner is active on the store (a runner row
    whose process is alive on this host, or whose heartbeat is recent on another host)
    unless --force. Either way, an unreferenced object whose inode changed after the
    oldest active runner started (or after gc itself started) is kept: it may be an
    output that a runner has stored but not committed yet. The store touches an object
    when a new output turns out to be identical to it, so deduplicated outputs are
    protected the same way.

Scratch sweeping (`reap_dead_scratch`)
    Every entry in tmp/ carries the pid of the process that made it:
    `task-<task>-<token>-<pid>` for a running task, `<label>-<pid>-<random>` for a file
    being stored. An entry whose process is gone is garbage. A runner calls this when it
    starts and on every heartbeat, before it re-queues the tasks of dead runners: scripts
    that a killed runner left behind (they run in their own process group, so they
    survive it) are killed first, so that a re-queued task never runs twice at once.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from task_pipeline import fsutil
from task_pipeline.host import this_host
from task_pipeline.db import Database
from task_pipeline.store import ObjectStore

HEARTBEAT_FRESH = 90.0  # seconds: a runner on another host counts as active while its heartbeat is this recent
FOREIGN_SCRATCH_AGE = 3600.0  # with a runner active on another host, only older scratch is swept
CLOCK_SLACK = 2.0  # seconds of tolerance when comparing times taken by different clocks (ctime, /proc, time())
GC_SLACK = 1.0  # gc keeps objects whose inode changed less than this before the cutoff (coarse file timestamps)
FOREIGN_CLOCK_SKEW = 300.0  # gc's allowance for another host's clock, for runners elsewhere
HEX = frozenset("0123456789abcdef")


# -- processes -----------------------------------------------------------------------------


def _boot_time() -> float | None:
    """When this machine booted, as a Unix time. From the boot clock, not /proc/stat, which a
    systemd unit with ProcSubset=pid cannot read."""
    try:
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        return None


_BTIME = _boot_time()
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: int) -> tuple[str, float | None] | None:
    """(state letter, start time as a Unix time) from /proc, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return ("?", None)
    fields = data[data.rfind(b")") + 2:].split()
    start = None
    if _BTIME is not None and len(fields) > 19:
        start = _BTIME + int(fields[19]) / _TICKS
    return (fields[0].decode(), start)


def process_alive(pid: int, since: float | None = None) -> bool:
    """Is `pid` a live process (not a zombie) that existed at time `since`?

    `since` guards against pid reuse: a process that started after `since` is a newcomer
    that happens to have the number, not the one that wrote the record.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    info = _proc_stat(pid)
    if info is None:  # gone meanwhile, or no /proc on this system (then trust kill(0))
        return not os.path.isdir("/proc/self")
    st, start = info
    if st in ("Z", "X"):
        return False
    if since is not None and start is not None and start > since + CLOCK_SLACK:
        return False
    return True


# -- runners ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runner:
    id: str
    host: str
    pid: int
    kind: str
    started_at: float
    heartbeat: float


def active_runners(db: Database) -> list[Runner]:
    """Runners that may be working on the store right now.

    On this host: those whose process is alive (the heartbeat of a SIGKILLed runner may
    still be fresh). Elsewhere: those whose heartbeat is recent.
    """
    clock = db.clock()  # heartbeats are by the database's clock
    offset = clock - time.time()
    host = this_host()
    out = []
    for r in db.execute("SELECT id, host, pid, kind, started_at, heartbeat FROM runner"):
        runner = Runner(*r)
        if runner.host == host:
            if process_alive(runner.pid, since=runner.started_at - offset):
                out.append(runner)
        elif clock - runner.heartbeat < HEARTBEAT_FRESH:
            out.append(runner)
    return out


# -- scratch ---------------------------------------------------------------------------------


def tmp_owner(name: str) -> int | None:
    """The pid recorded in a tmp/ entry's name, or None if the name is not one of ours."""
    parts = name.split("-")
    if name.startswith("task-") and len(parts) == 4 and parts[3].isdigit():
        return int(parts[3])
    if len(parts) == 3 and parts[1].isdigit():
        return int(parts[1])
    return None


@dataclass
class Sweep:
    removed: int = 0
    bytes: int = 0
    killed: int = 0  # process groups of orphaned scripts
    kept: int = 0    # entries of live processes
    unknown: list[str] = field(default_factory=list)  # names we did not make; left alone
    errors: list[str] = field(default_factory=list)


def _tree_size(parent: str, name: str) -> int:
    try:
        fd = fsutil.open_dir(parent)
    except OSError:
        return 0
    try:
        return fsutil.tree_size_at(fd, name)
    finally:
        os.close(fd)


def _remove_tree(parent: str, name: str) -> str | None:
    """Remove `name` in `parent` (a file or a directory tree), never following a symlink a script left there."""
    try:
        fd = fsutil.open_dir(parent)
    except OSError as e:
        return f"{parent}: {e.strerror}"
    try:
        fsutil.remove_tree_at(fd, name)
    except OSError as e:
        return f"{parent}/{name}: {e.strerror}"
    finally:
        os.close(fd)
    return None


def kill_orphans(scratch_dirs: Iterable[str]) -> int:
    """Kill the process groups of scripts still running in these scratch directories.

    A script is recognised by its environment: OUTPUT_DIR lies in its scratch slot (every
    process a script starts inherits it). Returns the number of process groups killed.
    Linux only (/proc); elsewhere nothing is killed.
    """
    needles = [b"\0OUTPUT_DIR=" + os.fsencode(d) + b"/" for d in scratch_dirs]
    if not needles or not os.path.isdir("/proc/self"):
        return 0
    me = os.getpid()
    groups: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = b"\0" + f.read() + b"\0"
        except OSError:
            continue
        if any(n in env for n in needles):
            try:
                groups.add(os.getpgid(int(entry)))
            except OSError:
                pass
    groups.discard(os.getpgid(0))
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except OSError:
            pass
    return len(groups)


def reap_dead_scratch(db: Database, scratch: Path, now: float | None = None, *, shared: bool = True,
                      dry_run: bool = False) -> Sweep:
    """Remove scratch entries whose process is gone, after killing scripts still running in them.

    Pids are only meaningful on this host. When a runner on another host is active and
    this scratch directory is the store's own (a store directory on a shared filesystem),
    entries younger than an hour are left alone: their pid may be that runner's. Scratch
    that is not `shared` (every host has its own, as with PostgreSQL) needs no such care.
    """
    now = now or time.time()
    sweep = Sweep()
    try:
        entries = list(os.scandir(scratch))
    except (FileNotFoundError, NotADirectoryError):
        return sweep
    if not entries:
        return sweep
    host = this_host()
    foreign = shared and any(r.host != host for r in active_runners(db))
    dead: list[tuple[str, int]] = []
    for e in entries:
        pid = tmp_owner(e.name)
        if pid is None:
            sweep.unknown.append(e.name)
            continue
        try:
            mtime = e.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if process_alive(pid, since=mtime):
            sweep.kept += 1
            continue
        if foreign and now - mtime < FOREIGN_SCRATCH_AGE:
            sweep.kept += 1
            continue
        dead.append((e.path, pid))
    if not dead:
        return sweep
    if dry_run:
        sweep.removed = len(dead)
        sweep.bytes = sum(_tree_size(str(scratch), os.path.basename(p)) for p, _ in dead)
        return sweep
    sweep.killed = kill_orphans([p for p, _ in dead if os.path.basename(p).startswith("task-")])
    for path, _ in dead:
        size = _tree_size(str(scratch), os.path.basename(path))
        err = _remove_tree(str(scratch), os.path.basename(path))
        if err:
            sweep.errors.append(err)
        else:
            sweep.removed += 1
            sweep.bytes += size
    return sweep


# -- references --------------------------------------------------------------------------------


REFERENCES_SQL = """
    SELECT hash FROM output
    UNION SELECT input_hash FROM task WHERE input_hash != ''
    UNION SELECT stdout_hash FROM attempt WHERE stdout_hash IS NOT NULL
    UNION SELECT stderr_hash FROM attempt WHERE stderr_hash IS NOT NULL
    UNION SELECT hash FROM gather_member
"""


def referenced(db: Database) -> set[str]:
    return {r[0] for r in db.execute(REFERENCES_SQL)}


def users(db: Database, h: str, limit: int = 10) -> list[str]:
    """Who uses object `h`, for people: 'output NAME of STEP#TASK', 'input of STEP#TASK', logs."""
    found: list[str] = []
    for r in db.execute(
            """SELECT o.name, t.id, s.name, t.live FROM output o JOIN task t ON t.id = o.task_id
               JOIN step s ON s.id = t.step_id WHERE o.hash = ? ORDER BY t.id LIMIT ?""", (h, limit + 1)):
        found.append(f"output '{r[0]}' of {r[2]}#{r[1]}" + ("" if r[3] else " (history)"))
    for r in db.execute(
            """SELECT t.id, s.name, t.input_name, t.live FROM task t JOIN step s ON s.id = t.step_id
               WHERE t.input_hash = ? ORDER BY t.id LIMIT ?""", (h, limit + 1)):
        found.append(f"input '{r[2]}' of {r[1]}#{r[0]}" + ("" if r[3] else " (history)"))
    for r in db.execute(
            """SELECT m.name, t.id, s.name, t.live FROM gather_member m JOIN task t ON t.id = m.task_id
               JOIN step s ON s.id = t.step_id WHERE m.hash = ? ORDER BY t.id LIMIT ?""", (h, limit + 1)):
        found.append(f"member '{r[0]}' of {r[2]}#{r[1]}" + ("" if r[3] else " (history)"))
    for r in db.execute(
            """SELECT a.task_id, a.attempt, s.name, a.stdout_hash = ? FROM attempt a JOIN task t ON t.id = a.task_id
               JOIN step s ON s.id = t.step_id WHERE a.stdout_hash = ? OR a.stderr_hash = ?
               ORDER BY a.id LIMIT ?""", (h, h, h, limit + 1)):
        found.append(f"{'stdout' if r[3] else 'stderr'} of {r[2]}#{r[0]} attempt {r[1]}")
    if len(found) > limit:
        found = found[:limit] + ["..."]
    return found


def _valid_hash(name: str) -> bool:
    return len(name) == 64 and set(name) <= HEX


Progress = Callable[[int], None]  # told how many bytes more were looked at


def fmt_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# -- the database's content -----------------------------------------------------------------------


STATES = ("pending", "running", "done", "failed")


def content_problems(db: Database, limit: int = 5) -> list[str]:
    """Values no task-pipeline writes: a damaged file that SQLite's own page checks still find sound
    (a flipped bit in a state, in a JSON column). Found by a few scans; fsck runs it, and a command that
    stumbles over such data runs it to say so instead of showing a traceback."""
    import json

    out: list[str] = []
    marks = ",".join("?" * len(STATES))
    for tid, st in db.execute(f"SELECT id, state FROM task WHERE state NOT IN ({marks}) LIMIT ?", (*STATES, limit)):
        out.append(f"task {tid} has the state {st!r}")
    for tid, live in db.execute("SELECT id, live FROM task WHERE live NOT IN (0, 1) LIMIT ?", (limit,)):
        out.append(f"task {tid} has live = {live!r}")
    steps = {r[0] for r in db.execute("SELECT id FROM step")}
    for name, step_id, consumes, policy in db.execute("SELECT name, step_id, consumes, policy FROM step_current"):
        if step_id not in steps:
            out.append(f"the current version of step {name!r} refers to a step row that does not exist")
        for what, text in (("consumes", consumes), ("policy", policy)):
            try:
                value = json.loads(text)
                if what == "policy":
                    from task_pipeline.state import Policy

                    Policy(**value)
            except (ValueError, TypeError):
                out.append(f"step {name!r} has an unreadable {what} ({text[:40]!r})")
    for sid, env in db.execute("SELECT id, env FROM step"):
        try:
            if not isinstance(json.loads(env), dict):
                raise ValueError
        except (ValueError, TypeError):
            out.append(f"step row {sid} has an unreadable env")
    for tid, sid in db.execute("SELECT id, step_id FROM task WHERE step_id NOT IN (SELECT id FROM step) LIMIT ?",
                               (limit,)):
        out.append(f"task {tid} refers to step row {sid}, which does not exist")
    for key in ("schema_version", "hash_algo"):
        row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        if row is None:
            out.append(f"meta has no {key}")
    return out[:limit * 4]


# -- fsck ------------------------------------------------------------------------------------------


@dataclass
class Problem:
    kind: str      # corrupt | missing | not-a-file | unreadable | database
    hash: str | None
    detail: str
    used_by: list[str] = field(default_factory=list)

    def line(self) -> str:
        text = f"{self.kind}: {self.detail}"
        if self.used_by:
            text += "; used by " + ", ".join(self.used_by)
        return text


@dataclass
class FsckReport:
    objects: int = 0
    bytes: int = 0
    references: int = 0
    unreferenced: int = 0
    unreferenced_bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def fsck(db: Database, store: ObjectStore, scratch: Path, progress: Progress | None = None) -> FsckReport:
    rep = FsckReport()
    damage = db.integrity() or content_problems(db)
    if damage:
        rep.problems.append(Problem("database", None, "the database is damaged: " + "; ".join(damage[:5])))
    refs = referenced(db)
    rep.references = len(refs)
    sizes = {r[0]: r[1] for r in db.execute("SELECT hash, size FROM object")}
    seen: set[str] = set()
    for e in store.scan():
        name, path = e.name, e.where
        if not _valid_hash(name):
            rep.warnings.append(f"{path}: not an object (its name is not a hash); remove it")
            continue
        if not e.regular:
            rep.problems.append(Problem("not-a-file", name, f"{path} is not a regular file (a symlink or something "
                                        f"else that someone put there)", users(db, name) if name in refs else []))
            seen.add(name)
            continue
        seen.add(name)
        rep.objects += 1
        rep.bytes += e.size
        actual = store.rehash(name)
        if progress:
            progress(e.size)
        if actual is None:
            rep.problems.append(Problem("unreadable", name, f"object {name} cannot be read ({path})",
                                        users(db, name) if name in refs else []))
        elif actual != name:
            rep.problems.append(Problem(
                "corrupt", name, f"object {name} is corrupt: its content hashes to {actual}"
                + (f" ({e.size} bytes, {sizes[name]} recorded)" if name in sizes and sizes[name] != e.size else ""),
                users(db, name)))
        elif name not in refs:
            rep.unreferenced += 1
            rep.unreferenced_bytes += e.size
        if store.local:
            mode = os.lstat(path).st_mode
            if mode & 0o222:
                rep.warnings.append(f"object {name} is writable (mode {stat.S_IMODE(mode):o}); it should be 0444")
    for h in sorted(refs - seen):
        rep.problems.append(Problem("missing", h, f"object {h} is missing", users(db, h)))
    now = time.time()
    leftovers = 0
    try:
        for e in os.scandir(scratch):
            pid = tmp_owner(e.name)
            if pid is not None and not process_alive(pid, since=e.stat(follow_symlinks=False).st_mtime):
                leftovers += 1
    except OSError:
        pass
    if leftovers:
        rep.warnings.append(f"{leftovers} leftover scratch entr{'y' if leftovers == 1 else 'ies'} of dead processes in "
                            f"{scratch}; 'gc' (or the next run) removes them")
    stuck = 0
    host = this_host()
    clock = db.clock()
    for r in db.execute("SELECT lease_owner, lease_expires FROM task WHERE state='running'"):
        o_host, o_pid, _ = ((r[0] or "?:0:?").rsplit(":", 2) + ["", ""])[:3]
        if (r[1] or 0) < clock or (o_host == host and o_pid.isdigit() and not process_alive(int(o_pid))):
            stuck += 1
    if stuck:
        rep.warnings.append(f"{stuck} task(s) are held by runners that are gone; the next run re-queues them")
    del now
    return rep


# -- gc ----------------------------------------------------------------------------------------------


@dataclass
class GcReport:
    removed: int = 0
    bytes: int = 0
    kept_recent: int = 0
    rows: int = 0
    scratch: Sweep = field(default_factory=Sweep)
    dirs: int = 0
    incoming: int = 0


def gc_cutoff(db: Database, started: float) -> tuple[float, list[Runner]]:
    """The age an unreferenced object must have to be removed: older than gc itself and than every
    writer that could still commit a reference to it (runners, daemons, submits, on any host)."""
    active = active_runners(db)
    host = this_host()
    offset = db.clock() - time.time()  # runners' times are by the database's clock; file times by ours
    cutoff = min([started] + [r.started_at - offset - (0 if r.host == host else FOREIGN_CLOCK_SKEW)
                              for r in active]) - GC_SLACK
    return cutoff, active


def gc(db: Database, store: ObjectStore, scratch: Path, *, cutoff: float, progress: Progress | None = None,
       prune_dirs: bool = True, dry_run: bool = False, scratch_shared: bool = True) -> GcReport:
    """Remove leftover scratch, then unreferenced objects whose inode changed before `cutoff`, then their rows.
    With `dry_run`, count what would go and change nothing."""
    rep = GcReport()
    damage = db.integrity() or content_problems(db)
    if damage:
        from task_pipeline.errors import StoreError

        raise StoreError(f"gc: the database is damaged ({'; '.join(damage[:3])}), so it cannot say which objects are "
                         f"in use; nothing was removed. Restore it from a backup ('task-pipeline fsck' says more)")
    rep.scratch = reap_dead_scratch(db, scratch, shared=scratch_shared, dry_run=dry_run)
    refs = referenced(db)
    for e in store.scan():
        if progress:
            progress(e.size)
        if not _valid_hash(e.name) or e.name in refs or not e.regular:
            continue
        if e.changed >= cutoff:
            rep.kept_recent += 1
            continue
        if dry_run:
            rep.removed += 1
            rep.bytes += e.size
            continue
        try:
            if not store.remove(e.name, cutoff):
                rep.kept_recent += 1
                continue
        except OSError as err:
            rep.scratch.errors.append(f"{e.where}: {err.strerror or err}")
            continue
        rep.removed += 1
        rep.bytes += e.size
    # uploads a runner began and never finished, on any host: only old ones are litter
    rep.incoming, leftover = store.tidy(cutoff - FOREIGN_SCRATCH_AGE, dry_run=dry_run, prune=prune_dirs)
    rep.bytes += leftover
    if dry_run:
        return rep
    with db.transaction():
        # recomputed under the writers' lock, so a reference committed meanwhile keeps its row
        refs = referenced(db)
        stale = [h for (h,) in db.execute("SELECT hash FROM object") if h not in refs and not store.has(h)]
        db.executemany("DELETE FROM object WHERE hash=?", [(h,) for h in stale])
        rep.rows = len(stale)
    return rep
