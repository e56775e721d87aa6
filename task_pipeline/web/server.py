"""Hypercorn, serving the app as one more task in the daemon's anyio task group.

Hypercorn's `serve` is a coroutine that runs in the caller's event loop and stops when a trigger
it awaits returns: here the daemon's stop event, so that the listener closes when serve starts to
drain. It installs no signal handlers of its own when given a trigger (the daemon's signal
receiver keeps them) and keeps no timer running while idle.

The socket is bound here, before the engine starts, so that an address in use or not allowed is
one line and exit 2; Hypercorn is handed its descriptor. Sockets are not inherited by the scripts
the engine runs (Python's descriptors are close-on-exec).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from typing import Callable

import anyio

from task_pipeline.errors import UsageError
from task_pipeline.web.listen import Listen

BACKLOG = 128
GRACE = 2.0      # seconds open requests get once the daemon stops


def bind(listen: Listen, flag: str) -> socket.socket:
    try:
        return _bind_unix(listen.path) if listen.path is not None else _bind_tcp(listen)
    except OSError as e:
        why = {errno.EADDRINUSE: "the address is in use (another serve, or another program); pick another port",
               errno.EACCES: "not allowed (ports below 1024 need privileges; a socket path needs a writable "
                             "directory); pick another",
               errno.EADDRNOTAVAIL: "this machine has no such address; use 127.0.0.1 or one of its own addresses",
               errno.ENOENT: "its directory does not exist; create it first"}.get(e.errno, e.strerror)
        raise UsageError(f"--http {flag}: cannot listen: {why}") from None


def _bind_tcp(listen: Listen) -> socket.socket:
    try:
        infos = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--http {listen.host}:{listen.port}: unknown host ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    s = socket.socket(family, kind, proto)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
        s.listen(BACKLOG)
    except BaseException:
        s.close()
        raise
    return s


def _bind_unix(path: str) -> socket.socket:
    """A stale socket file (a daemon that died) is replaced; a live one, or any other file, is not."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise UsageError(f"--http {path}: exists and is not a socket; remove it or pick another path")
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
            raise UsageError(f"--http {path}: another process is listening on it; stop it or pick another path")
        except OSError:
            os.unlink(path)
        finally:
            probe.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)   # its mode follows the umask: connecting needs write permission on it
        s.listen(BACKLOG)
    except BaseException:
        s.close()
        raise
    return s


class _ToLog(logging.Handler):
    def __init__(self, log: Callable[[str, str], None]) -> None:
        super().__init__(logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log("warning" if record.levelno < logging.ERROR else "error", f"http: {record.getMessage()}")


async def serve(app, sock: socket.socket, listen: Listen, stop: anyio.Event, log: Callable[[str, str], None],
                on_ready: Callable[[anyio.abc.TaskGroup], None]) -> None:
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    logger = logging.getLogger("task_pipeline.http")
    logger.propagate = False
    logger.handlers = [_ToLog(log)]
    cfg = Config()
    cfg.bind = [f"fd://{sock.detach()}"]
    cfg.accesslog = None
    cfg.errorlog = logger
    cfg.graceful_timeout = GRACE
    cfg.include_server_header = False
    ident = None if listen.path is None else os.lstat(listen.path).st_ino
    try:
        async with anyio.create_task_group() as tg:
            on_ready(tg)   # background work of the app (recounts) runs here, and ends with it
            await hypercorn_serve(app, cfg, shutdown_trigger=stop.wait, mode="asgi")
            tg.cancel_scope.cancel()
    finally:
        if listen.path is not None:
            try:
                if os.lstat(listen.path).st_ino == ident:
                    os.unlink(listen.path)
            except OSError:
                pass
