"""Housekeeping: `fsck`, `gc`, and the sweeping of dead runners' scratch (SPEC sections 4 and 8).

fsck
    Re-hashes every object file and checks every reference the database holds (task
    inputs, outputs, attempt logs): a reference to a missing object, or an object whose
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
import socket
import sqlite3
import stat
import time
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from task_pipeline import fsutil
from task_pipeline.store import Store

HEARTBEAT_FRESH = 90.0  # seconds: a runner on another host counts as active while its heartbeat is this recent
FOREIGN_SCRATCH_AGE = 3600.0  # with a runner active on another host, only older scratch is swept
CLOCK_SLACK = 2.0  # seconds of tolerance when comparing times taken by different clocks (ctime, /proc, time())
GC_SLACK = 1.0  # gc keeps objects whose inode changed less than this before the cutoff (coarse file timestamps)
FOREIGN_CLOCK_SKEW = 300.0  # gc's allowance for another host's clock, for runners elsewhere
HEX = frozenset("0123456789abcdef")


# -- processes -----------------------------------------------------------------------------


def _boot_time() -> float | None:
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except OSError:
        pass
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


def active_runners(conn: sqlite3.Connection, now: float | None = None) -> list[Runner]:
    """Runners that may be working on the store right now.

    On this host: those whose process is alive (the heartbeat of a SIGKILLed runner may
    still be fresh). Elsewhere: those whose heartbeat is recent.
    """
    now = now or time.time()
    host = socket.gethostname()
    out = []
    for r in conn.execute("SELECT id, host, pid, kind, started_at, heartbeat FROM runner"):
        runner = Runner(*r)
        if runner.host == host:
            if process_alive(runner.pid, since=runner.started_at):
                out.append(runner)
        elif now - runner.heartbeat < HEARTBEAT_FRESH:
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


def reap_dead_scratch(conn: sqlite3.Connection, store: Store, now: float | None = None) -> Sweep:
    """Remove tmp/ entries whose process is gone, after killing scripts still running in them.

    Pids are only meaningful on this host. When a runner on another host is active (a
    store on a shared filesystem), entries younger than an hour are left alone: their
    pid may be that runner's.
    """
    now = now or time.time()
    sweep = Sweep()
    try:
        entries = list(os.scandir(store.tmp))
    except FileNotFoundError:
        return sweep
    if not entries:
        return sweep
    host = socket.gethostname()
    foreign = any(r.host != host for r in active_runners(conn, now))
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
    sweep.killed = kill_orphans([p for p, _ in dead if os.path.basename(p).startswith("task-")])
    for path, _ in dead:
        size = _tree_size(str(store.tmp), os.path.basename(path))
        err = _remove_tree(str(store.tmp), os.path.basename(path))
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
"""


def referenced(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute(REFERENCES_SQL)}


def users(conn: sqlite3.Connection, h: str, limit: int = 10) -> list[str]:
    """Who uses object `h`, for people: 'output NAME of STEP#TASK', 'input of STEP#TASK', logs."""
    found: list[str] = []
    for r in conn.execute(
            """SELECT o.name, t.id, s.name, t.live FROM output o JOIN task t ON t.id = o.task_id
               JOIN step s ON s.id = t.step_id WHERE o.hash = ? ORDER BY t.id LIMIT ?""", (h, limit + 1)):
        found.append(f"output '{r[0]}' of {r[2]}#{r[1]}" + ("" if r[3] else " (history)"))
    for r in conn.execute(
            """SELECT t.id, s.name, t.input_name, t.live FROM task t JOIN step s ON s.id = t.step_id
               WHERE t.input_hash = ? ORDER BY t.id LIMIT ?""", (h, limit + 1)):
        found.append(f"input '{r[2]}' of {r[1]}#{r[0]}" + ("" if r[3] else " (history)"))
    for r in conn.execute(
            """SELECT a.task_id, a.attempt, s.name, a.stdout_hash = ? FROM attempt a JOIN task t ON t.id = a.task_id
               JOIN step s ON s.id = t.step_id WHERE a.stdout_hash = ? OR a.stderr_hash = ?
               ORDER BY a.id LIMIT ?""", (h, h, h, limit + 1)):
        found.append(f"{'stdout' if r[3] else 'stderr'} of {r[2]}#{r[0]} attempt {r[1]}")
    if len(found) > limit:
        found = found[:limit] + ["..."]
    return found


def _valid_hash(name: str) -> bool:
    return len(name) == 64 and set(name) <= HEX


def _iter_files(store: Store) -> Iterator[tuple[str, str, os.stat_result]]:
    """(name as a hash, path, lstat) for everything under objects/, whatever it is."""
    root = str(store.objects)
    if not os.path.isdir(root):
        return
    for a in sorted(os.scandir(root), key=lambda e: e.name):
        if not a.is_dir(follow_symlinks=False):
            yield a.name, a.path, a.stat(follow_symlinks=False)
            continue
        for b in sorted(os.scandir(a.path), key=lambda e: e.name):
            if not b.is_dir(follow_symlinks=False):
                yield a.name + b.name, b.path, b.stat(follow_symlinks=False)
                continue
            for f in os.scandir(b.path):
                try:
                    st = f.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield a.name + b.name + f.name, f.path, st


# -- progress ------------------------------------------------------------------------------------


class _Progress:
    """A rich progress bar on a terminal, nothing otherwise."""

    def __init__(self, out, label: str, total: int) -> None:
        self._p = None
        if out.live:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

            self._p = Progress(TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                               console=out.err, transient=True)
            self._p.__enter__()
            self._id = self._p.add_task(label, total=total or None)

    def advance(self, n: int) -> None:
        if self._p is not None:
            self._p.advance(self._id, n)

    def close(self) -> None:
        if self._p is not None:
            self._p.__exit__(None, None, None)


def _fmt_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# -- fsck ------------------------------------------------------------------------------------------


@dataclass
class Problem:
    kind: str      # corrupt | missing | not-a-file | stray | database
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


def fsck(conn: sqlite3.Connection, store: Store, out=None) -> FsckReport:
    rep = FsckReport()
    check = [r[0] for r in conn.execute("PRAGMA quick_check")]
    if check != ["ok"]:
        rep.problems.append(Problem("database", None, "the database is damaged: " + "; ".join(check[:5])))
    refs = referenced(conn)
    rep.references = len(refs)
    sizes = {r[0]: r[1] for r in conn.execute("SELECT hash, size FROM object")}
    total = sum(sizes.values())
    bar = _Progress(out, "fsck", total) if out is not None else None
    seen: set[str] = set()
    try:
        for name, path, st in _iter_files(store):
            if not _valid_hash(name):
                rep.warnings.append(f"{path}: not an object (its name is not a hash); remove it")
                continue
            if not stat.S_ISREG(st.st_mode):
                rep.problems.append(Problem("not-a-file", name, f"{path} is not a regular file",
                                            users(conn, name) if name in refs else []))
                seen.add(name)
                continue
            seen.add(name)
            rep.objects += 1
            rep.bytes += st.st_size
            actual = store.rehash(name)
            if bar:
                bar.advance(st.st_size)
            if actual is None:
                rep.problems.append(Problem("unreadable", name, f"object {name} cannot be read ({path})",
                                            users(conn, name) if name in refs else []))
            elif actual != name:
                rep.problems.append(Problem(
                    "corrupt", name, f"object {name} is corrupt: its content hashes to {actual}"
                    + (f" ({st.st_size} bytes, {sizes[name]} recorded)" if name in sizes and sizes[name] != st.st_size else ""),
                    users(conn, name)))
            elif name not in refs:
                rep.unreferenced += 1
                rep.unreferenced_bytes += st.st_size
            if st.st_mode & 0o222:
                rep.warnings.append(f"object {name} is writable (mode {stat.S_IMODE(st.st_mode):o}); it should be 0444")
    finally:
        if bar:
            bar.close()
    for h in sorted(refs - seen):
        rep.problems.append(Problem("missing", h, f"object {h} is missing", users(conn, h)))
    now = time.time()
    leftovers = 0
    try:
        for e in os.scandir(store.tmp):
            pid = tmp_owner(e.name)
            if pid is not None and not process_alive(pid, since=e.stat(follow_symlinks=False).st_mtime):
                leftovers += 1
    except OSError:
        pass
    if leftovers:
        rep.warnings.append(f"{leftovers} leftover scratch entr{'y' if leftovers == 1 else 'ies'} of dead processes in "
                            f"{store.tmp}; 'gc' (or the next run) removes them")
    stuck = 0
    host = socket.gethostname()
    for r in conn.execute("SELECT lease_owner, lease_expires FROM task WHERE state='running'"):
        o_host, o_pid, _ = ((r[0] or "?:0:?").rsplit(":", 2) + ["", ""])[:3]
        if (r[1] or 0) < now or (o_host == host and o_pid.isdigit() and not process_alive(int(o_pid))):
            stuck += 1
    if stuck:
        rep.warnings.append(f"{stuck} task(s) are held by runners that are gone; the next run re-queues them")
    return rep


def cmd_fsck(a: Namespace, out) -> int:
    from task_pipeline.commands import args_exactly, open_store, print_json

    args_exactly(a, 0, "fsck [--json]")
    conn, store = open_store(a)
    rep = fsck(conn, store, out)
    if a.json:
        print_json({"ok": not rep.problems, "objects": rep.objects, "bytes": rep.bytes, "references": rep.references,
                    "unreferenced": {"objects": rep.unreferenced, "bytes": rep.unreferenced_bytes},
                    "problems": [p.__dict__ for p in rep.problems], "warnings": rep.warnings})
    else:
        for w in rep.warnings:
            out.log("warning", w)
        for p in rep.problems:
            out.log("error", p.line())
        summary = (f"checked {rep.objects} object(s), {_fmt_bytes(rep.bytes)}, and {rep.references} reference(s): "
                   + (f"{len(rep.problems)} problem(s)" if rep.problems else "no problems"))
        if rep.unreferenced:
            summary += f"; {rep.unreferenced} unreferenced object(s) ({_fmt_bytes(rep.unreferenced_bytes)}) that 'gc' would remove"
        out.log("error" if rep.problems else "info", summary)
        if any(p.kind in ("corrupt", "missing") for p in rep.problems):
            out.log("info", "to rebuild a damaged output: delete its object file, then 'invalidate' the step that "
                            "made it and 'run'; a damaged submitted input must be submitted again")
    return 1 if rep.problems else 0


# -- gc ----------------------------------------------------------------------------------------------


@dataclass
class GcReport:
    removed: int = 0
    bytes: int = 0
    kept_recent: int = 0
    rows: int = 0
    scratch: Sweep = field(default_factory=Sweep)
    dirs: int = 0


def gc(conn: sqlite3.Connection, store: Store, *, cutoff: float, out=None, prune_dirs: bool = True) -> GcReport:
    """Remove leftover scratch, then unreferenced objects whose inode changed before `cutoff`, then their rows."""
    rep = GcReport()
    rep.scratch = reap_dead_scratch(conn, store)
    refs = referenced(conn)
    total = conn.execute("SELECT coalesce(sum(size), 0) FROM object").fetchone()[0]
    bar = _Progress(out, "gc", total) if out is not None else None
    try:
        for name, path, st in _iter_files(store):
            if bar:
                bar.advance(st.st_size)
            if not _valid_hash(name) or name in refs or not stat.S_ISREG(st.st_mode):
                continue
            if st.st_ctime >= cutoff:
                rep.kept_recent += 1
                continue
            try:
                # look again right before: a runner may have just stored an identical output (which touches it)
                if os.lstat(path).st_ctime >= cutoff:
                    rep.kept_recent += 1
                    continue
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as e:
                rep.scratch.errors.append(f"{path}: {e.strerror}")
                continue
            rep.removed += 1
            rep.bytes += st.st_size
    finally:
        if bar:
            bar.close()
    from task_pipeline.state import transaction

    with transaction(conn):
        # recomputed under the write lock, so a reference committed meanwhile keeps its row
        refs = referenced(conn)
        stale = [h for (h,) in conn.execute("SELECT hash FROM object") if h not in refs and not store.has(h)]
        conn.executemany("DELETE FROM object WHERE hash=?", [(h,) for h in stale])
        rep.rows = len(stale)
    if prune_dirs and store.objects.is_dir():
        for a in os.scandir(store.objects):
            if not a.is_dir(follow_symlinks=False):
                continue
            for b in os.scandir(a.path):
                if b.is_dir(follow_symlinks=False):
                    try:
                        os.rmdir(b.path)
                        rep.dirs += 1
                    except OSError:
                        pass
            try:
                os.rmdir(a.path)
                rep.dirs += 1
            except OSError:
                pass
    return rep


def cmd_gc(a: Namespace, out) -> int:
    from task_pipeline.commands import args_exactly, open_store, print_json
    from task_pipeline.errors import UsageError

    args_exactly(a, 0, "gc [--force] [--json]")
    conn, store = open_store(a)
    started = time.time()
    active = active_runners(conn, started)
    if active and not a.force:
        who = ", ".join(f"{r.kind} {r.host}:{r.pid} (heartbeat {max(started - r.heartbeat, 0):.0f}s ago)" for r in active)
        raise UsageError(f"gc: {len(active)} runner(s) active on this store: {who}; wait for them to finish, "
                         f"or pass --force (what they stored since they started is kept)")
    host = socket.gethostname()
    cutoff = min([started] + [r.started_at - (0 if r.host == host else FOREIGN_CLOCK_SKEW) for r in active]) - GC_SLACK
    rep = gc(conn, store, cutoff=cutoff, out=out, prune_dirs=not active)
    if a.json:
        print_json({"objects_removed": rep.removed, "bytes_freed": rep.bytes + rep.scratch.bytes,
                    "object_bytes": rep.bytes, "kept_recent": rep.kept_recent, "rows_removed": rep.rows,
                    "scratch_removed": rep.scratch.removed, "scratch_bytes": rep.scratch.bytes,
                    "orphans_killed": rep.scratch.killed, "errors": rep.scratch.errors})
    else:
        for e in rep.scratch.errors:
            out.log("warning", f"could not remove {e}")
        freed = rep.bytes + rep.scratch.bytes
        msg = (f"gc: freed {freed} bytes" + (f" ({_fmt_bytes(freed)})" if freed >= 1024 else "") + ": "
               f"{rep.removed} unreferenced object(s), {rep.scratch.removed} leftover scratch entr"
               f"{'y' if rep.scratch.removed == 1 else 'ies'}")
        if rep.scratch.killed:
            msg += f"; killed {rep.scratch.killed} orphaned script(s)"
        if rep.kept_recent:
            msg += f"; kept {rep.kept_recent} unreferenced object(s) written since {'the oldest active runner started' if active else 'gc started'}"
        out.print(msg)
    return 0 if not rep.scratch.errors else 1
