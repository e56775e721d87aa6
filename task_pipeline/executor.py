"""Executor: one attempt of one task, start to finish, synchronously (SPEC section 3).

Runs in a worker thread: take a scratch slot, get the attempt's directories,
copy in the input (checking its hash), have the launcher process run the script
in its own process group (launcher.py), store what it left in OUTPUT_DIR, empty
or remove the attempt's directories.
Nothing here touches the database; the result goes back to the engine, which
commits it.

The script can change anything in its slot while it runs, and a process it
started with `setsid` can go on changing it afterwards. So every file operation
on the slot goes through directory file descriptors opened with O_NOFOLLOW
(fsutil), OUTPUT_DIR is checked to be the directory that was created, and each
attempt gets directories under a new name: a straggler of an earlier attempt
cannot write into a later one's OUTPUT_DIR, and nothing outside the slot is
ever read, moved or deleted, whatever the script put in it.

Directories are reused, renamed, when nothing of the attempt can still be
running: making a directory costs ext4 a tenth to a fifth of a millisecond of
CPU (its allocator searches block groups), four of them per attempt were the
largest cost of a tiny task, and removing them was the next. The launcher knows
that nothing is left: it is the child subreaper of its scripts, so a process
that left a script's process group is handed to it when its parent ends.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import signal
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from task_pipeline import fsutil, members, timeline
from task_pipeline.launcher import Launcher
from task_pipeline.state import Claimed, Result
from task_pipeline.store import Cancelled, ObjectError, ObjectStore, OutputChanged, StoreUnavailable, hash_fd

KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL on timeout or shutdown
DISK_FULL_BELOW = 256 * 1024  # bytes free on the scratch filesystem after an attempt that count as "full"
_DISK_FULL_WORDS = (b"No space left on device", b"Disk quota exceeded")


PARALLEL_STORE_FROM = 64  # outputs of one attempt from which two threads store them
AHEAD_MAX = 256 * 1024  # bytes: an input up to this size is copied in while the attempt waits for a script slot
STDERR_RESERVE = 64 * 1024  # bytes of disk held for each script's stderr, so a full disk cannot silence it

_FALLOC_FL_KEEP_SIZE = 1


RESERVE_BELOW = 1 << 30  # free bytes under which each script's stderr gets its reserve


def _low_on_space(fd: int) -> bool:
    """Reserving costs block allocations on every attempt, so only where a full disk is in sight."""
    try:
        st = os.fstatvfs(fd)
    except OSError:
        return True
    return st.f_bavail * st.f_frsize < max(RESERVE_BELOW, st.f_blocks * st.f_frsize // 20)


def _reserve(fd: int, size: int) -> None:
    """Allocate disk blocks for a file without changing its size. When the disk fills up, the
    script's complaint ("No space left on device") still reaches its stderr, which is how we
    tell a full disk from a script's own failure."""
    import ctypes  # here, not at import: most runs never get near a full disk

    fallocate = fsutil.libc_function("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
    if fallocate is not None:
        fallocate(fd, _FALLOC_FL_KEEP_SIZE, 0, size)  # best effort: unsupported filesystems just don't reserve


class StoreWriteError(Exception):
    """The store or scratch space could not take the attempt (disk full, permissions): not the script's fault."""


class ProcessTable:
    """The scripts of this engine: they run in the launcher process (launcher.py), at most
    `scripts` at once; this is how the engine stops them all, or some."""

    def __init__(self, scripts: int | None = None) -> None:
        self._lock = threading.Lock()
        self._tasks: set[int] = set()      # tasks with a script at the launcher (queued or running)
        self.stopping = False
        self.closed = False                # no new script may start (the engine stopped claiming)
        self.abandon = threading.Event()   # set when storing outputs must stop too (grace is over)
        self.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.launcher = Launcher(scripts)

    def run(self, task_id: int, *args) -> tuple:
        with self._lock:
            self._tasks.add(task_id)
        try:
            return self.launcher.run(task_id, *args)
        finally:
            with self._lock:
                self._tasks.discard(task_id)

    def signal_all(self, sig: int) -> int:
        """Signal every running script's process group; their attempts will be re-queued, not failed."""
        with self._lock:
            self.stopping = True
            n = len(self._tasks)
        self.launcher.signal_all(sig)
        return n

    def kill_tasks(self, task_ids: set[int]) -> int:
        """Stop the scripts of tasks whose lease this runner lost (another runner may have them now)."""
        with self._lock:
            n = len(task_ids & self._tasks)
        self.launcher.kill(task_ids)
        return n

    def close_gate(self) -> None:
        """Start no more scripts: those waiting for a slot come back not started. Once is enough."""
        if not self.closed:
            self.closed = True
            self.launcher.close_gate()

    def close(self) -> None:
        self.launcher.stop()
        os.close(self.devnull)


# -- scratch -----------------------------------------------------------------------------------


@dataclass
class AttemptDirs:
    """One attempt's directories: <slot>/a<N>/{in,out,tmp}, plus its stdout and stderr files.

    When they are reused, the files are too (the input copy renamed for the next input):
    on a filesystem where freeing an inode makes later allocations slower (ext4 without a
    journal skips inodes freed in the last minutes, one by one), a tiny task frees none."""

    path: str
    fd: int
    in_fd: int
    out_fd: int
    tmp_fd: int
    stats: tuple[os.stat_result, ...]  # of a<N>, in, out and tmp as they were made
    input_name: str | None = None      # the input copy in in/
    input_fd: int | None = None        # open for writing (the file itself is read-only)
    logs: tuple[int, int] | None = None  # stdout and stderr, open
    reusable: bool = False             # nothing the attempt started can still be running

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def out_stat(self) -> os.stat_result:
        return self.stats[2]

    def close(self) -> None:
        for fd in (self.input_fd, *(self.logs or ()), self.in_fd, self.out_fd, self.tmp_fd, self.fd):
            try:
                if fd is not None:
                    os.close(fd)
            except OSError:
                pass
        self.input_fd = self.logs = None


@dataclass
class Slot:
    """A runner's scratch directory, used by its attempts one after another."""

    path: str
    fd: int
    made: int = 0                      # attempt directory names given out (a<N>: N is never reused)
    spare: AttemptDirs | None = None   # the last attempt's directories, emptied, to be renamed for the next
    large: bool = False                # holds one of Slots.large (its attempt's input is over AHEAD_MAX)

    def next_name(self) -> str:
        self.made += 1
        return f"a{self.made}"


class Slots:
    """Scratch slots: one per task running at once, each a directory `task-slotN-<nonce>-<pid>`
    (housekeeping tells a dead runner's scratch by the pid), opened once and reused.

    Every attempt works in a subdirectory `a<N>` of its slot, a name never used again. When the
    attempt left nothing running and its directories are still the ones made (no script
    replaced or re-moded one), they are emptied and renamed for the slot's next attempt: a
    rename costs a tenth of the mkdirs and rmdirs it saves. Otherwise they are removed, and
    the next attempt gets new ones. (A janitor thread doing that work ahead was measured: the
    GIL it takes between syscalls made every worker's Popen half a millisecond slower.) What
    cannot be removed (a straggler still writing there) goes with the slot when the runner
    closes it, or with the next sweep.
    """

    def __init__(self, scratch: Path, large_at_once: int | None = None) -> None:
        self.scratch = Path(scratch).absolute()
        # Attempts are prepared ahead of a free script slot (executor workers outnumber script slots
        # twice), which would double the scratch that large inputs take: at most this many attempts
        # with an input over AHEAD_MAX are under way at once, as many as scripts may run.
        self.large = threading.BoundedSemaphore(large_at_once) if large_at_once else None
        self._lock = threading.Lock()
        self._free: list[Slot] = []
        self._all: list[Slot] = []
        self._made = 0
        self._nonce = os.urandom(3).hex()

    def acquire(self, input_size: int = 0) -> Slot:
        """A free slot, for an attempt whose input has `input_size` bytes."""
        large = self.large is not None and input_size > AHEAD_MAX
        if large:
            self.large.acquire()
        try:
            slot = self._take()
        except BaseException:
            if large:
                self.large.release()
            raise
        slot.large = large
        return slot

    def _take(self) -> Slot:
        with self._lock:
            if self._free:
                return self._free.pop()
            self._made += 1
            n = self._made
        name = f"task-slot{n}-{self._nonce}-{os.getpid()}"
        base = fsutil.open_dir(str(self.scratch))
        try:
            fsutil.make_dir(name, 0o700, dir_fd=base)
            fd = fsutil.open_dir(name, base)
        finally:
            os.close(base)
        slot = Slot(f"{self.scratch}/{name}", fd)
        with self._lock:
            self._all.append(slot)
        return slot

    def begin(self, slot: Slot) -> AttemptDirs:
        name = slot.next_name()
        spare, slot.spare = slot.spare, None
        if spare is not None:
            try:
                os.rename(spare.name, name, src_dir_fd=slot.fd, dst_dir_fd=slot.fd)
            except OSError:
                self._discard(slot, spare)
            else:
                spare.path, spare.reusable = f"{slot.path}/{name}", False
                return spare
        _make_attempt_dirs(slot.fd, name)
        fds: list[int] = []
        try:
            fds.append(fsutil.open_dir(name, slot.fd))
            for sub in ("in", "out", "tmp"):
                fds.append(fsutil.open_dir(sub, fds[0]))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return AttemptDirs(f"{slot.path}/{name}", *fds, stats=tuple(os.fstat(fd) for fd in fds))

    def release(self, slot: Slot, dirs: AttemptDirs | None) -> None:
        if dirs is not None:
            if dirs.reusable and _empty_for_reuse(slot.fd, dirs):
                slot.spare = dirs
            else:
                self._discard(slot, dirs)
        if slot.large:
            slot.large = False
            self.large.release()
        with self._lock:
            self._free.append(slot)

    @staticmethod
    def _discard(slot: Slot, dirs: AttemptDirs) -> None:
        dirs.close()
        try:
            _remove_attempt(slot.fd, dirs.name, dirs.input_name)
        except OSError:
            pass  # removed with the whole slot at close

    def close(self) -> None:
        with self._lock:
            slots, self._free, self._all = self._all, [], []
        for slot in slots:
            name = os.path.basename(slot.path)
            if slot.spare is not None:
                slot.spare.close()
            os.close(slot.fd)
            try:
                base = fsutil.open_dir(str(self.scratch))
            except OSError:
                continue
            try:
                fsutil.remove_tree_at(base, name)
            except OSError:
                pass
            finally:
                os.close(base)


def _remove_attempt(slot_fd: int, name: str, input_name: str | None) -> None:
    """Remove an attempt's directory. The usual case (the files we made, outputs moved away, an
    empty TMPDIR) takes a few unlinks and rmdirs, each relative to a directory opened without
    following symlinks; anything else, whatever a script left behind, goes through the careful
    walk (fsutil.remove_tree_at)."""
    try:
        fd = fsutil.open_dir(name, slot_fd)
    except FileNotFoundError:
        return
    try:
        try:
            os.unlink("stdout", dir_fd=fd)
            os.unlink("stderr", dir_fd=fd)
            if input_name is not None:
                in_fd = fsutil.open_dir("in", fd)
                try:
                    os.unlink(input_name, dir_fd=in_fd)
                finally:
                    os.close(in_fd)
            for sub in ("in", "out", "tmp"):
                os.rmdir(sub, dir_fd=fd)
        except OSError:
            fsutil.empty_dir_fd(fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=slot_fd)


def _empty_for_reuse(slot_fd: int, dirs: AttemptDirs) -> bool:
    """Empty an attempt's directories and files for the slot's next attempt. Only when each is
    still the one that was made, with its mode, and nothing else is there but what the script
    left in out/ and tmp/: otherwise False, and they are removed instead. Nothing of the attempt
    is running (AttemptDirs.reusable), so nothing changes them while we look."""
    try:
        found = [os.stat(dirs.name, dir_fd=slot_fd, follow_symlinks=False)]
        found += [os.stat(sub, dir_fd=dirs.fd, follow_symlinks=False) for sub in ("in", "out", "tmp")]
        for now, made in zip(found, dirs.stats):
            if not fsutil.same_inode(now, made) or now.st_mode != made.st_mode:
                return False
        names = ["in", "out", "tmp"]
        logs = []
        if dirs.logs is not None:
            names += ["stderr", "stdout"]
            for name, fd in zip(("stdout", "stderr"), dirs.logs):
                log = os.fstat(fd)
                # a hard link elsewhere (the script made one) would see the next attempt's writes
                if log.st_nlink != 1 or not fsutil.same_inode(os.stat(name, dir_fd=dirs.fd, follow_symlinks=False),
                                                              log):
                    return False
                logs.append((fd, log))
        if sorted(os.listdir(dirs.fd)) != sorted(names):
            return False
        if dirs.input_fd is not None:
            copy = os.fstat(dirs.input_fd)
            try:
                there = os.stat(dirs.input_name, dir_fd=dirs.in_fd, follow_symlinks=False)
            except FileNotFoundError:
                there = None
            if (there is None or not fsutil.same_inode(there, copy) or os.listdir(dirs.in_fd) != [dirs.input_name]
                    or copy.st_nlink != 1):
                os.close(dirs.input_fd)  # a gather task's members, or something the script did: start afresh
                dirs.input_fd = None
        if dirs.input_fd is None and os.listdir(dirs.in_fd):
            fsutil.empty_dir_fd(dirs.in_fd)
        for fd in (dirs.out_fd, dirs.tmp_fd):
            if os.listdir(fd):
                fsutil.empty_dir_fd(fd)
        # Emptying a file frees its blocks, which on a filesystem mounted with `discard` waits for the
        # disk to trim them: the input copy is overwritten instead (and cut to size), and logs are
        # usually empty already.
        for fd, log in logs:
            if log.st_size:
                os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
        if dirs.input_fd is not None:
            os.lseek(dirs.input_fd, 0, os.SEEK_SET)
            if copy.st_size > AHEAD_MAX:
                os.ftruncate(dirs.input_fd, 0)  # an idle slot keeps no large copy
            if stat.S_IMODE(copy.st_mode) != 0o444:
                os.fchmod(dirs.input_fd, 0o444)
    except OSError:
        return False
    return True


def _make_attempt_dirs(slot_fd: int, name: str) -> None:
    fsutil.make_dir(name, 0o700, dir_fd=slot_fd)
    fd = fsutil.open_dir(name, slot_fd)
    try:
        for sub in ("in", "out", "tmp"):
            fsutil.make_dir(sub, 0o700, dir_fd=fd)
    finally:
        os.close(fd)


# -- an attempt ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    claimed: Claimed
    store: ObjectStore
    workdir: Path
    base_env: dict[str, str]
    # `check` (commands/check.py): outputs are hashed, not stored, and logs are not kept; `inspect` is
    # shown OUTPUT_DIR (its descriptor, and the outputs found) before the attempt's directories go
    dry: bool = False
    inspect: Callable[[int, list[tuple[str, str, int]]], None] | None = None


def execute(job: Job, procs: ProcessTable, slots: Slots) -> Result:
    c = job.claimed
    step = c.step
    started = time.time()
    res = Result(task_id=c.task_id, token=c.token, step=step.name, attempt=c.attempt, input_name=c.input_name,
                 ok=False, started_at=started, finished_at=started,
                 retries=step.policy.retries, retry_delay=step.policy.retry_delay)
    dirs = None
    try:
        slot = slots.acquire(c.input_size)
    except OSError as e:
        res.interrupted, res.store_trouble = True, True
        res.error = f"cannot prepare scratch space in {slots.scratch}: {e.strerror}"
        return res
    try:
        try:
            dirs = slots.begin(slot)
        except OSError as e:
            raise StoreWriteError(f"cannot prepare scratch space in {slot.path}: {e.strerror}") from None
        _run(job, procs, dirs, res)
    except StoreWriteError as e:
        res.ok, res.interrupted, res.store_trouble, res.error = False, True, True, str(e)
        res.outputs = []
    except Cancelled:
        res.ok, res.interrupted, res.error, res.outputs = False, True, "stopped by shutdown while storing outputs", []
    finally:
        res.finished_at = time.time()
        slots.release(slot, dirs)
        timeline.mark(c.task_id, "finished")
    return res


def _input_file(dirs: AttemptDirs, name: str) -> int:
    """The input copy `name` in in/, open for writing at its start: the last attempt's, renamed (its old
    bytes are overwritten, then cut off), or a new one."""
    if dirs.input_fd is not None:
        if dirs.input_name != name:
            os.rename(dirs.input_name, name, src_dir_fd=dirs.in_fd, dst_dir_fd=dirs.in_fd)
            dirs.input_name = name
        return dirs.input_fd
    # read and write: a gather task's listing is read back (members.py)
    dirs.input_fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444,
                            dir_fd=dirs.in_fd)
    dirs.input_name = name
    return dirs.input_fd


@functools.lru_cache(maxsize=64)
def _which(shell: str, path: str | None) -> str:
    """The shell's path, looked up once: left to subprocess, the search runs in the forked child on
    every spawn, one failed exec per PATH entry before the right one, while the spawning thread waits."""
    if "/" in shell:
        return shell
    return shutil.which(shell, path=path if path is not None else os.defpath) or shell


def input_file_name(name: str) -> str:
    """The input copy's name: the input's own name where that is a plain file name."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        return "input" if name else "empty"
    return name


def _run(job: Job, procs: ProcessTable, dirs: AttemptDirs, res: Result) -> None:
    c = job.claimed
    step = c.step
    in_name = input_file_name(c.input_name)
    members_dir = None
    try:
        fd = _input_file(dirs, in_name)
        size = job.store.copy_to_fd(c.input_hash, fd) if c.input_hash else 0
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)  # a reused copy: cut off what is left of the last input
        if step.policy.gather:
            # a gather task's input is the listing of its members, read back to lay them out
            members_dir = members.lay_out(job.store, dirs.in_fd, fd, size)
    except (ObjectError, members.MembersError) as e:
        # Missing or damaged: running the script cannot help, and retrying cannot either.
        res.error, res.final = f"input {c.input_name!r}: {e}", True
        dirs.reusable = True
        return
    except StoreUnavailable as e:
        raise StoreWriteError(str(e)) from None
    except OSError as e:
        raise StoreWriteError(f"cannot prepare the input in {dirs.path}: {e.strerror}") from None

    out_dir, tmp_dir = f"{dirs.path}/out", f"{dirs.path}/tmp"
    env = dict(job.base_env)
    env.update(
        INPUT_FILE=f"{dirs.path}/in/{in_name}", OUTPUT_DIR=out_dir, TMPDIR=tmp_dir,
        INPUT_NAME=c.input_name, INPUT_HASH=c.input_hash, STEP_NAME=step.name, STEP_VERSION=str(step.version),
        TASK_ID=str(c.task_id), TASK_ATTEMPT=str(c.attempt), RUNSET=c.runset,
    )
    if members_dir is not None:
        env["INPUT_DIR"] = f"{dirs.path}/in/{members_dir}"
    env.update(step.env)
    timed_out = False
    if dirs.logs is None:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        so = os.open("stdout", flags, 0o600, dir_fd=dirs.fd)
        try:
            dirs.logs = (so, os.open("stderr", flags, 0o600, dir_fd=dirs.fd))
        except BaseException:
            os.close(so)
            raise
    so, se = dirs.logs
    if _low_on_space(dirs.fd):
        _reserve(se, STDERR_RESERVE)
    timeline.mark(c.task_id, "ready")
    reply = procs.run(c.task_id, _which(step.shell, env.get("PATH")), [step.shell, "-c", step.script], env,
                      str(job.workdir), step.policy.timeout, KILL_GRACE, (procs.devnull, so, se))
    if reply[0] == "skipped":
        # stopped (or its lease lost) while it waited for a script slot: it never ran
        res.interrupted, res.started, res.error = True, False, "not started: shutting down"
        dirs.reusable = True
        return
    if reply[0] == "failed":
        missing = job.workdir if not os.path.isdir(job.workdir) else step.shell
        res.error = f"cannot start '{step.shell}' in {job.workdir}: {missing}: {reply[2]}"
        res.exit_code = 127
        dirs.reusable = True
        return
    _, rc, timed_out, dirs.reusable, received_at, started_at, spawned_at, exited_at = reply
    timeline.mark(c.task_id, "received", received_at)
    timeline.mark(c.task_id, "slot", started_at)
    timeline.mark(c.task_id, "spawned", spawned_at)
    timeline.mark(c.task_id, "exited", exited_at)

    res.exit_code = rc
    stderr_size = os.fstat(se).st_size
    res.stderr_tail = _tail(se, stderr_size) if stderr_size else ""
    full = _disk_full(dirs.path, rc, res.stderr_tail)
    if full and not timed_out:
        # The script ran out of space (a failed write, or a truncated output if it ignored the error):
        # not its fault and not trustworthy either way. The task goes back to the queue and the run stops.
        raise StoreWriteError(f"cannot run {step.name}#{c.task_id}: the disk holding "
                              f"{os.path.dirname(os.path.dirname(dirs.path))} is full ({full}); free some space "
                              f"and run again")
    if timed_out:
        res.error = f"timed out after {step.policy.timeout:g}s"
    elif procs.stopping and rc != 0:
        res.interrupted = True
        res.error = "stopped by shutdown"
    elif rc < 0:
        res.error = f"killed by signal {_signame(-rc)}"
    elif rc != 0:
        res.error = f"exit code {rc}"
    else:
        res.outputs, problem = collect_outputs(dirs, job.store, procs.abandon.is_set, keep=not job.dry)
        if problem:
            res.error = problem
        else:
            res.ok = True
            if job.inspect is not None:
                job.inspect(dirs.out_fd, res.outputs)
    if job.dry:
        return  # nothing of a check is kept, not even its logs
    res.stdout = _store_log(job.store, so)
    res.stderr = _store_log(job.store, se)
    if res.stderr is None and stderr_size and not res.ok:
        # the log of a failure is what the user needs most: losing it means the store is in trouble
        raise StoreWriteError(f"cannot keep the stderr of {step.name}#{c.task_id}: the store cannot take it "
                              f"(disk full?); free some space and run again")


def _disk_full(path: str, rc: int, stderr_tail: str) -> str | None:
    """Why the attempt's filesystem counts as full, or None. A script that failed saying so counts too:
    space may have come back (another attempt's scratch removed) by the time we look."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    if st.f_files > 0 and st.f_favail == 0:
        return "no inodes left"
    free = st.f_bavail * st.f_frsize
    if free < DISK_FULL_BELOW:
        return f"{free} bytes free"
    if rc != 0 and any(w.decode() in stderr_tail for w in _DISK_FULL_WORDS):
        return f"the script failed with '{stderr_tail[-120:]}'"
    return None


def collect_outputs(dirs: AttemptDirs, store: ObjectStore, cancel=None, *,
                    keep: bool = True) -> tuple[list[tuple[str, str, int]], str | None]:
    """Store every regular file directly in OUTPUT_DIR (without `keep`: only hash it, with the store's
    algorithm). Anything else fails the attempt, naming the file.

    OUTPUT_DIR must still be the directory that was made for the attempt (a script that
    replaced it, with a symlink to /etc say, gets a failure, not a copy of /etc). Names are
    read as bytes so that a name that is not UTF-8 is reported, not mangled. Files are
    opened relative to the directory with O_NOFOLLOW | O_NONBLOCK and checked with fstat,
    so neither a symlink nor a FIFO swapped in after the listing makes us read elsewhere or hang.
    """
    try:
        now = os.stat("out", dir_fd=dirs.fd, follow_symlinks=False)
    except FileNotFoundError:
        now = None
    if now is None or not fsutil.same_inode(now, dirs.out_stat) or not stat.S_ISDIR(now.st_mode):
        return [], ("OUTPUT_DIR was removed or replaced (by a symlink or another directory) during the attempt; "
                    "write files into it, do not replace it")
    # Stored in the directory's own order, then sorted: each name is looked up twice (open, rename),
    # and ext4 without dir_index searches a directory linearly from where its last lookup hit, so
    # in name order a script's 2,000 outputs took quadratic time, in directory order linear.
    with os.scandir(dirs.out_fd) as it:
        entries = list(it)
    for e in sorted(entries, key=lambda e: e.name):
        if not isinstance(e.name, str):
            continue
        name = e.name
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            return [], f"output {os.fsencode(name)!r} has a name that is not UTF-8; rename it"
        if name.startswith("."):
            return [], f"output '{name}' starts with '.'; hidden files are not outputs, remove or rename it"
        if e.is_symlink():
            return [], f"output '{name}' is a symlink; write a regular file into OUTPUT_DIR instead"
        if e.is_dir(follow_symlinks=False):
            return [], f"output '{name}' is a directory; only regular files directly in OUTPUT_DIR are outputs"
        if not e.is_file(follow_symlinks=False):
            return [], f"output '{name}' is not a regular file (a FIFO, socket or device)"

    def store_each(names: list[str]) -> list[tuple[str, str, int] | str]:
        """Each output stored (name, hash, size), up to the first that cannot be: its problem, a string."""
        done: list[tuple[str, str, int] | str] = []
        for name in names:
            done.append(_store_output(dirs, store, name, cancel, keep))
            if isinstance(done[-1], str):
                break
        return done

    names = [e.name for e in entries]
    if len(names) >= PARALLEL_STORE_FROM and keep and store.local:
        # A fan-out's outputs are stored by two threads (the other workers wait for them anyway), taking
        # every other name so that both look up names near each other in the directory.
        with ThreadPoolExecutor(2) as pool:
            stored = [x for part in pool.map(store_each, (names[0::2], names[1::2])) for x in part]
    else:
        stored = store_each(names)
    problems = sorted(x for x in stored if isinstance(x, str))
    if problems:
        return [], problems[0]
    outputs = sorted(x for x in stored if not isinstance(x, str))
    return outputs, None


def _store_output(dirs: AttemptDirs, store: ObjectStore, name: str, cancel: Callable[[], bool] | None,
                  keep: bool) -> tuple[str, str, int] | str:
    """Store (or with `keep` false, only hash) one output; returns it, or why it cannot be an output."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirs.out_fd)
    except OSError as err:
        return f"output '{name}' cannot be opened: {err.strerror}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return f"output '{name}' is not a regular file"
        try:
            if keep:
                h, size = store.ingest_output(dirs.out_fd, name, fd, st, cancel=cancel, settled=dirs.reusable)
            else:
                h, size = hash_fd(fd, store.algo, st.st_size, cancel)
        except OutputChanged:
            return (f"output '{name}' was replaced while it was being stored (by a process the script "
                    f"left running?); nothing of this attempt is kept")
        except StoreUnavailable as err:
            raise StoreWriteError(f"cannot store output '{name}': {err}") from None
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
                raise StoreWriteError(f"cannot store output '{name}': {err.strerror}") from None
            raise
    finally:
        os.close(fd)
    return name, h, size


def _store_log(store: ObjectStore, fd: int) -> tuple[str, int] | None:
    """Store a log from the descriptor we gave the script (its name in the slot is not trusted)."""
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return store.empty  # most logs are empty: no need to hash and move a file for them
        return store.ingest_log(fd, size)
    except StoreUnavailable as e:
        raise StoreWriteError(f"cannot keep a log: {e}") from None
    except OSError:
        return None  # losing a log must not lose the result


def _tail(fd: int, size: int, limit: int = 2048) -> str:
    try:
        data = os.pread(fd, limit, max(size - limit, 0))
    except OSError:
        return ""
    lines = [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return str(n)
