"""Launcher: a small process that starts scripts and waits for them, away from the engine's GIL.

The engine's worker threads prepare attempts (input copied in, directories ready) and
hand them here; this process runs at most `-parallel` of them at once and starts the
next queued one the moment a script ends. Starting a process from the engine meant
taking the engine's GIL several times per spawn, each time behind whatever Python work
another thread was doing: a tiny task's spawn took a millisecond there, and
sub-millisecond here, where nothing else runs.

It is also the scripts' child subreaper: a process a script left running outside its
process group (`setsid`) is handed to us when its parent ends, so it shows among our
children. An attempt whose script left nothing running, in its group or outside it,
is reported `clean`, and the engine may reuse its directories.

Protocol, over one SOCK_SEQPACKET socket per engine worker (marshal, trusted peer):
  engine -> launcher  ("run", task, executable, argv, env, cwd, timeout, grace)
                      with stdin, stdout, stderr; a request over 64 KiB is sent as ("memfd",)
                      with a fourth descriptor, an unnamed file holding it
  launcher -> engine  ("exited", returncode, timed_out, clean, received_at, started_at, spawned_at,
                       exited_at)
                      ("failed", errno, strerror)      the script could not be started
                      ("skipped",)                     not started: closing, or its lease was lost
and on a control socket, engine -> launcher, no reply:
  ("socket",)         with a descriptor: a new worker's socket, made on its first request
  ("signal", sig)     every running script's group    ("kill", [task, ...]) those tasks' groups
  ("close",)          start nothing more (queued requests are answered "skipped")
The launcher ends, killing what still runs, when the control socket closes (the engine
ended, or died). While every slot is taken, requests wait unread in their sockets.
"""

from __future__ import annotations

import array
import heapq
import marshal
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass

from task_pipeline.fsutil import libc_function

# Python ignores these; a script must get them as a shell would (`yes | head` ends on SIGPIPE)
_DEFAULT_SIGNALS = tuple(getattr(signal, n) for n in ("SIGPIPE", "SIGXFSZ", "SIGXFZ") if hasattr(signal, n))
MAX_MESSAGE = 64 * 1024  # larger requests (a huge environment or script) travel in a memfd
MAX_FDS = 4
_PR_SET_CHILD_SUBREAPER = 36


# -- the engine's side -----------------------------------------------------------------------------


class LauncherGone(Exception):
    """The launcher process ended or stopped answering: no script can be run or waited for."""


class Launcher:
    """The engine's handle: starts the launcher process, gives each worker thread its own socket."""

    def __init__(self, parallel: int | None) -> None:
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._sockets: list[socket.socket] = []   # every worker's, closed with the launcher
        env = dict(os.environ)
        # the engine's own package must be importable however it was started (a checkout, PYTHONPATH)
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        # a session of its own: Ctrl-C on the terminal is the engine's to handle, which then tells us
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "task_pipeline.launcher", str(parallel or 0), str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        theirs.close()
        self.pid = self.proc.pid

    def _socket(self) -> socket.socket:
        """This thread's socket to the launcher, made on first use (its other end goes over the control socket)."""
        s = getattr(self._local, "sock", None)
        if s is None:
            s, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                self._send(("socket",), [theirs.fileno()])
            finally:
                theirs.close()
            self._local.sock = s
            with self._lock:
                self._sockets.append(s)
        return s

    def _send(self, msg: tuple, fds: list[int] = ()) -> None:
        with self._lock:
            try:
                socket.send_fds(self.control, [marshal.dumps(msg)], list(fds))
            except OSError as e:
                raise LauncherGone(f"the launcher process is gone ({e.strerror})") from None

    def run(self, task: int, executable: str, argv: list[str], env: dict[str, str], cwd: str,
            timeout: float | None, grace: float, stdio: tuple[int, int, int]) -> tuple:
        """Run one script to its end (waiting for a free slot first); returns the launcher's answer."""
        s = self._socket()
        data = marshal.dumps(("run", task, executable, argv, env, cwd, timeout, grace))
        fds = list(stdio)
        memfd = None
        if len(data) > MAX_MESSAGE:
            try:
                memfd = os.memfd_create("request", os.MFD_CLOEXEC)
            except OSError:  # (a system call filter may refuse it) an unnamed file in the temporary directory
                f = tempfile.TemporaryFile()
                memfd = os.dup(f.fileno())
                f.close()
            os.write(memfd, data)
            data, fds = marshal.dumps(("memfd",)), fds + [memfd]
        try:
            socket.send_fds(s, [data], fds)
            reply = s.recv(MAX_MESSAGE)
        except OSError as e:
            raise LauncherGone(f"the launcher process is gone ({e.strerror})") from None
        finally:
            if memfd is not None:
                os.close(memfd)
        if not reply:
            raise LauncherGone("the launcher process ended while a script was running")
        return marshal.loads(reply)

    def signal_all(self, sig: int) -> None:
        self._send(("signal", int(sig)))

    def kill(self, tasks: set[int]) -> None:
        self._send(("kill", sorted(tasks)))

    def close_gate(self) -> None:
        self._send(("close",))

    def stop(self) -> None:
        """End the launcher (it kills whatever still runs) and wait for it."""
        for s in [self.control, *self._sockets]:
            try:
                s.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the launcher process ------------------------------------------------------------------------------


@dataclass
class _Job:
    sock: socket.socket
    task: int
    executable: str
    argv: list
    env: dict
    cwd: str
    timeout: float | None
    grace: float
    fds: list[int]
    received_at: float = 0.0
    started_at: float = 0.0        # taken off the queue, to be spawned
    pid: int = 0
    spawned_at: float = 0.0
    deadline: float = 0.0          # monotonic; 0: none
    timed_out: bool = False
    tainted: bool = False          # an orphan appeared while it ran: it may have left it


class _Server:
    def __init__(self, parallel: int, control: socket.socket) -> None:
        self.parallel = parallel or 1 << 30
        self.control = control
        self.sel = selectors.DefaultSelector()
        self.queue: deque[_Job] = deque()
        self.running: dict[int, _Job] = {}     # pid -> job
        self.timers: list[tuple[float, int]] = []
        self.closed = False
        self.workers: list[socket.socket] = []
        self.listening = True                  # the workers' sockets are in the selector
        self.children = f"/proc/{os.getpid()}/task/{os.getpid()}/children"
        prctl = libc_function("prctl")
        self.subreaper = (prctl is not None and prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
                          and os.access(self.children, os.R_OK))
        self.known: frozenset[int] = self.orphans() or frozenset()   # orphans seen so far, still running
        self.cwd = os.getcwd()
        r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)   # the wakeup fd is what matters
        self.sel.register(r, selectors.EVENT_READ, "sigchld")
        self.sel.register(control, selectors.EVENT_READ, "control")

    # a process that left its script's group but still runs, and the orphans it could be among
    def orphans(self) -> frozenset[int] | None:
        if not self.subreaper:
            return None
        try:
            fd = os.open(self.children, os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.read(fd, 1 << 16)
            finally:
                os.close(fd)
        except OSError:
            return None
        alive = set()
        for pid in map(int, data.split()):
            if pid in self.running:
                continue
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    alive.add(pid)
            except ChildProcessError:
                pass
        return frozenset(alive)

    def serve(self) -> None:
        while True:
            timeout = None
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - time.monotonic())
            for key, _ in self.sel.select(timeout):
                what = key.data
                if what == "sigchld":
                    try:
                        while os.read(key.fd, 512):
                            pass
                    except BlockingIOError:
                        pass
                    self.reap()
                elif what == "control":
                    if not self.on_control():
                        return
                elif key.fileobj in self.workers:  # (a drain above may have found it closed)
                    self.on_request(key.fileobj)
            self.expire()
            self.reap()
            self.fill()
            self.listen(self.closed or len(self.running) < self.parallel)

    def fill(self) -> None:
        """Start queued scripts while a slot is free, taking in first the requests that waited in
        their sockets while every slot was taken (without a trip through select)."""
        if not self.listening and not self.closed and len(self.running) < self.parallel:
            self.drain()
        self.start_queued()

    def listen(self, on: bool) -> None:
        """Watch the workers' sockets only while a request could be acted on. With every slot taken,
        a request waits in its socket, not in our queue: reading it at once cost a wake-up of this
        process per task (two context switches, on a machine whose cores the scripts keep busy)."""
        if on == self.listening:
            return
        for w in self.workers:
            if on:
                self.sel.register(w, selectors.EVENT_READ, "worker")
            else:
                self.sel.unregister(w)
        self.listening = on

    def drain(self) -> None:
        """Every request waiting in a socket into the queue (for a free slot, or a kill to look at)."""
        for w in list(self.workers):
            while self.on_request(w, socket.MSG_DONTWAIT):
                pass

    def on_control(self) -> bool:
        try:
            data, fds = _recv(self.control)
        except OSError:
            data, fds = b"", []
        if not data:
            self.shutdown()
            return False
        for fd in fds:  # SCM_RIGHTS gives them without close-on-exec: no script may inherit them
            os.set_inheritable(fd, False)
        msg = marshal.loads(data)
        if msg[0] == "socket":
            s = socket.socket(fileno=fds[0])
            self.workers.append(s)
            if self.listening:
                self.sel.register(s, selectors.EVENT_READ, "worker")
        elif msg[0] == "signal":
            for job in self.running.values():
                _killpg(job.pid, msg[1])
        elif msg[0] == "kill":
            self.drain()
            doomed = set(msg[1])
            for job in self.running.values():
                if job.task in doomed:
                    _killpg(job.pid, signal.SIGKILL)
            for job in [j for j in self.queue if j.task in doomed]:
                self.queue.remove(job)
                self.answer(job, ("skipped",))
        elif msg[0] == "close":
            self.closed = True   # (requests still in their sockets are read, and skipped, next: see serve)
            while self.queue:
                self.answer(self.queue.popleft(), ("skipped",))
        return True

    def on_request(self, sock: socket.socket, flags: int = 0) -> bool:
        """Read one request into the queue; False if there was none waiting (or the worker is gone)."""
        try:
            data, fds = _recv(sock, flags)
        except BlockingIOError:
            return False
        except OSError:
            data, fds = b"", []
        if not data:
            if self.listening:
                self.sel.unregister(sock)
            self.workers.remove(sock)
            sock.close()
            return False
        for fd in fds:
            os.set_inheritable(fd, False)
        msg = marshal.loads(data)
        if msg[0] == "memfd":
            memfd = fds.pop()
            try:
                size = os.fstat(memfd).st_size
                msg = marshal.loads(os.pread(memfd, size, 0))
            finally:
                os.close(memfd)
        _, task, executable, argv, env, cwd, timeout, grace = msg
        job = _Job(sock, task, executable, argv, env, cwd, timeout, grace, fds, time.monotonic())
        if self.closed:
            self.answer(job, ("skipped",))
        else:
            self.queue.append(job)
        return True

    def start_queued(self) -> None:
        while self.queue and len(self.running) < self.parallel:
            job = self.queue.popleft()
            job.started_at = time.monotonic()
            try:
                # posix_spawn, not subprocess: a third of the CPU per spawn. It has no working directory
                # of its own, so this process (one thread, no relative paths) moves there.
                if job.cwd != self.cwd:
                    os.chdir(job.cwd)
                    self.cwd = job.cwd
                pid = os.posix_spawn(job.executable, job.argv, job.env, setsid=True, setsigdef=_DEFAULT_SIGNALS,
                                     file_actions=[(os.POSIX_SPAWN_DUP2, fd, n) for n, fd in enumerate(job.fds[:3])])
            except OSError as e:
                self.answer(job, ("failed", e.errno or 0, e.strerror or str(e)))
                continue
            job.pid, job.spawned_at = pid, time.monotonic()
            self.running[pid] = job
            for fd in job.fds:
                os.close(fd)
            job.fds = []
            if job.timeout is not None:
                job.deadline = job.spawned_at + job.timeout
                heapq.heappush(self.timers, (job.deadline, pid))

    def expire(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            deadline, pid = heapq.heappop(self.timers)
            job = self.running.get(pid)
            if job is None or job.deadline != deadline:
                continue
            if not job.timed_out:
                job.timed_out = True
                _killpg(pid, signal.SIGTERM)
                job.deadline = now + job.grace
                heapq.heappush(self.timers, (job.deadline, pid))
            else:
                _killpg(pid, signal.SIGKILL)

    def reap(self) -> None:
        ended = []
        for pid in list(self.running):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                job = self.running.pop(pid)
                # Background children must not outlive the attempt (or write into OUTPUT_DIR while it
                # is read). If the kill finds nobody, every member of the group has ended and handed
                # its children on. (Killed before anything new starts, which could reuse the pid.)
                ended.append((job, status, time.monotonic(), _killpg(pid, signal.SIGKILL)))
        if not ended:
            return
        # The next scripts start first: the checks below are not theirs to wait for.
        self.fill()
        for job, status, exited_at, left in ended:
            # A process that left the group shows among our children, as an orphan not seen
            # before: it may be any running attempt's, so none of them counts as clean.
            clean = not left and not job.tainted
            now = self.orphans()
            if now is None or now - self.known:
                clean = False
                for other in self.running.values():
                    other.tainted = True
            self.known = now or frozenset()
            self.answer(job, ("exited", os.waitstatus_to_exitcode(status), job.timed_out, clean,
                              job.received_at, job.started_at, job.spawned_at, exited_at))

    def answer(self, job: _Job, reply: tuple) -> None:
        for fd in job.fds:
            os.close(fd)
        job.fds = []
        try:
            job.sock.send(marshal.dumps(reply))
        except OSError:
            pass  # that worker is gone; the engine is ending

    def shutdown(self) -> None:
        for job in self.running.values():
            _killpg(job.pid, signal.SIGKILL)
        for pid in list(self.running):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _recv(sock: socket.socket, flags: int = 0) -> tuple[bytes, list[int]]:
    """One message and the descriptors that came with it. Not socket.recv_fds: it drops its
    `flags` argument (CPython 3.11 and 3.12), and MSG_DONTWAIT is what drain() needs."""
    fds = array.array("i")
    data, ancdata, _, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_LEN(MAX_FDS * fds.itemsize), flags)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def _killpg(pgid: int, sig: int) -> bool:
    """Signal a process group; False if it had no process left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def main() -> None:
    parallel, fd = int(sys.argv[1]), int(sys.argv[2])
    os.set_inheritable(fd, False)
    # Stopping is the engine's to decide (systemd may signal the whole service): it tells us, or closes
    # the control socket. A handler, not SIG_IGN, which scripts would inherit through exec.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    _Server(parallel, socket.socket(fileno=fd)).serve()
    timeline = os.environ.get("TASK_PIPELINE_TIMELINE")
    if timeline:  # the launcher's own CPU, for bench/timeline.py (its scripts are not in RUSAGE_SELF)
        import json
        import resource
        r = resource.getrusage(resource.RUSAGE_SELF)
        with open(timeline, "a") as f:
            f.write(json.dumps({"task": -2, "stage": "launcher-cpu", "t": r.ru_utime, "thread": r.ru_stime}) + "\n")


if __name__ == "__main__":
    main()
