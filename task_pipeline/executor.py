"""Executor: one attempt of one task, start to finish, synchronously (SPEC section 3).

Runs in a worker thread: take a scratch slot, run the script in its own
process group, collect and store what it left in OUTPUT_DIR, empty the slot. Nothing here touches the database; the result goes back to the
engine, which commits it. Blocking work (spawning, waiting, hashing) happens
here so that the event loop never waits on a file.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from task_pipeline.state import Claimed, Result
from task_pipeline.store import Store

KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL on timeout or shutdown


class StoreWriteError(Exception):
    """The store could not take an output (disk full, permissions): not the script's fault."""


class ProcessTable:
    """The process groups of running scripts, so that shutdown can stop them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: dict[int, subprocess.Popen] = {}
        self.stopping = False

    def add(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._groups[proc.pid] = proc

    def remove(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._groups.pop(proc.pid, None)

    def signal_all(self, sig: int) -> int:
        """Signal every running script's process group; their attempts will be re-queued, not failed."""
        with self._lock:
            self.stopping = True
            groups = list(self._groups)
        for pgid in groups:
            _killpg(pgid, sig)
        return len(groups)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Slots:
    """Scratch directories, reused: one per task running at once.

    Making and removing a fresh directory tree per task costs more than the tiny
    scripts it serves (several mkdirs and an rmtree: about a third of a millisecond
    each under load), so a slot is emptied after each attempt instead: OUTPUT_DIR is
    empty once outputs are moved into the store, the input copy is unlinked, and
    TMPDIR is only rebuilt when the script left something in it. A slot that cannot
    be emptied is dropped. Names are `task-slotN-<nonce>-<pid>`, so housekeeping can
    tell a dead runner's scratch by its pid.
    """

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp.absolute()
        self._lock = threading.Lock()
        self._free: list[Path] = []
        self._made = 0
        self._nonce = os.urandom(3).hex()

    def acquire(self) -> Path:
        with self._lock:
            if self._free:
                return self._free.pop()
            self._made += 1
            n = self._made
        slot = self.tmp / f"task-slot{n}-{self._nonce}-{os.getpid()}"
        for sub in ("", "in", "out", "tmp"):
            (slot / sub).mkdir(exist_ok=True)
        return slot

    def release(self, slot: Path, out_empty: bool = False) -> None:
        # The log files need no removal: the next attempt truncates them. OUTPUT_DIR needs no
        # look when every output was moved into the store.
        try:
            for sub in ("in", "tmp") if out_empty else ("in", "out", "tmp"):
                _empty_dir(slot / sub)
        except OSError:
            shutil.rmtree(slot, onerror=_force_remove)
            return
        with self._lock:
            self._free.append(slot)

    def close(self) -> None:
        with self._lock:
            slots, self._free = self._free, []
        for slot in slots:
            shutil.rmtree(slot, onerror=_force_remove)


@dataclass(frozen=True)
class Job:
    claimed: Claimed
    store: Store
    workdir: Path
    base_env: dict[str, str]


def execute(job: Job, procs: ProcessTable, slots: Slots) -> Result:
    c = job.claimed
    step = c.step
    started = time.time()
    res = Result(task_id=c.task_id, token=c.token, step=step.name, attempt=c.attempt, input_name=c.input_name,
                 ok=False, started_at=started, finished_at=started,
                 retries=step.policy.retries, retry_delay=step.policy.retry_delay)
    try:
        # absolute: the script runs in the pipeline's workdir, so a relative -db must not leak into its paths
        slot = slots.acquire()
    except OSError as e:
        res.interrupted, res.error = True, f"cannot prepare scratch space in {slots.tmp}: {e.strerror}"
        return res
    try:
        _run(job, procs, slot, res)
    except StoreWriteError as e:
        res.ok, res.interrupted, res.error = False, True, str(e)
    finally:
        res.finished_at = time.time()
        slots.release(slot, out_empty=res.ok)
    return res


def _run(job: Job, procs: ProcessTable, slot: Path, res: Result) -> None:
    c = job.claimed
    step = c.step
    out_dir, tmp_dir = slot / "out", slot / "tmp"
    input_file = slot / "in" / (c.input_name or "empty")
    try:
        if c.input_hash:
            job.store.copy_to(c.input_hash, input_file)
        else:
            os.close(os.open(input_file, os.O_CREAT | os.O_WRONLY, 0o444))
    except OSError as e:
        raise StoreWriteError(f"cannot prepare the input in {slot}: {e.strerror}") from None

    env = dict(job.base_env)
    env.update(
        INPUT_FILE=str(input_file), OUTPUT_DIR=str(out_dir), TMPDIR=str(tmp_dir),
        INPUT_NAME=c.input_name, INPUT_HASH=c.input_hash, STEP_NAME=step.name, STEP_VERSION=str(step.version),
        TASK_ID=str(c.task_id), TASK_ATTEMPT=str(c.attempt), RUNSET=c.runset,
    )
    env.update(step.env)
    stdout_path, stderr_path = slot / "stdout", slot / "stderr"
    timed_out = False
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    so, se = os.open(stdout_path, flags, 0o644), os.open(stderr_path, flags, 0o644)
    try:
        try:
            proc = subprocess.Popen(
                [step.shell, "-c", step.script], cwd=job.workdir, env=env, stdin=subprocess.DEVNULL,
                stdout=so, stderr=se, start_new_session=True,
            )
        except OSError as e:
            missing = job.workdir if not os.path.isdir(job.workdir) else step.shell
            res.error = f"cannot start '{step.shell}' in {job.workdir}: {missing}: {e.strerror}"
            res.exit_code = 127
            return
        procs.add(proc)
        try:
            try:
                rc = proc.wait(timeout=step.policy.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _killpg(proc.pid, signal.SIGTERM)
                try:
                    rc = proc.wait(timeout=KILL_GRACE)
                except subprocess.TimeoutExpired:
                    _killpg(proc.pid, signal.SIGKILL)
                    rc = proc.wait()
        finally:
            # Background children must not outlive the attempt (or write into OUTPUT_DIR while we read it).
            _killpg(proc.pid, signal.SIGKILL)
            procs.remove(proc)
        stdout_size, stderr_size = os.fstat(so).st_size, os.fstat(se).st_size
    finally:
        os.close(so)
        os.close(se)

    res.exit_code = rc
    res.stderr_tail = _tail(stderr_path) if stderr_size else ""
    free = _free_space(out_dir)
    if free is not None and not timed_out:
        # The script ran out of space (a failed write, or a truncated output if it ignored the error):
        # not its fault and not trustworthy either way. The task goes back to the queue and the run stops.
        raise StoreWriteError(f"cannot run {step.name}#{c.task_id}: the disk holding {job.store.tmp} is full "
                              f"({free}); free some space and run again")
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
        res.outputs, problem = collect_outputs(out_dir, job.store)
        if problem:
            res.error = problem
        else:
            res.ok = True
    res.stdout = _store_log(job.store, stdout_path, stdout_size)
    res.stderr = _store_log(job.store, stderr_path, stderr_size)


DISK_FULL_BELOW = 256 * 1024  # bytes free on the store's filesystem after an attempt that count as "full"


def _free_space(path: Path) -> str | None:
    """None if there is room; otherwise what is left, for the message."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    if st.f_files > 0 and st.f_favail == 0:
        return "no inodes left"
    free = st.f_bavail * st.f_frsize
    return f"{free} bytes free" if free < DISK_FULL_BELOW else None


def collect_outputs(out_dir: Path, store: Store) -> tuple[list[tuple[str, str, int]], str | None]:
    """Store every regular file directly in `out_dir`. Anything else fails the attempt, naming the file.

    Names are read as bytes so that a name that is not UTF-8 is reported, not mangled.
    Files are opened with O_NOFOLLOW | O_NONBLOCK and checked with fstat, so neither a
    symlink nor a FIFO swapped in after the listing makes us read outside OUTPUT_DIR or hang.
    """
    entries = sorted(os.scandir(os.fsencode(out_dir)), key=lambda e: e.name)
    for e in entries:
        try:
            name = e.name.decode("utf-8")
        except UnicodeDecodeError:
            return [], f"output {e.name!r} has a name that is not UTF-8; rename it"
        if name.startswith("."):
            return [], f"output '{name}' starts with '.'; hidden files are not outputs, remove or rename it"
        if e.is_symlink():
            return [], f"output '{name}' is a symlink; write a regular file into OUTPUT_DIR instead"
        if e.is_dir(follow_symlinks=False):
            return [], f"output '{name}' is a directory; only regular files directly in OUTPUT_DIR are outputs"
        if not e.is_file(follow_symlinks=False):
            return [], f"output '{name}' is not a regular file (a FIFO, socket or device)"
    outputs = []
    base = str(out_dir)
    for e in entries:
        name = e.name.decode()
        path = f"{base}/{name}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as err:
            return [], f"output '{name}' cannot be opened: {err.strerror}"
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return [], f"output '{name}' is not a regular file"
            try:
                # no fsync here: the committer syncs the store once per batch, before the commit
                h, size = store.ingest_fd(fd, path, fsync=False, size=st.st_size)
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
                    raise StoreWriteError(f"cannot store output '{name}': {err.strerror}") from None
                raise
        finally:
            os.close(fd)
        outputs.append((name, h, size))
    return outputs, None


def _store_log(store: Store, path: Path, size: int) -> tuple[str, int] | None:
    try:
        if size == 0:
            return store.empty  # most logs are empty: no need to hash and move a file for them
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            return store.ingest_fd(fd, path, fsync=False)
        finally:
            os.close(fd)
    except OSError:
        return None  # losing a log must not lose the result


def _tail(path: Path, limit: int = 2048) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(size - limit, 0))
            data = f.read()
    except OSError:
        return ""
    lines = [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return str(n)


def _empty_dir(d: Path) -> None:
    with os.scandir(d) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, onerror=_force_remove)
            else:
                os.unlink(e.path)


def _force_remove(func, path, exc_info) -> None:
    # A script may leave read-only directories in TMPDIR; make them writable and retry.
    try:
        parent = os.path.dirname(path)
        os.chmod(parent, 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass
