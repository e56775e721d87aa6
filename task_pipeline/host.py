"""Who "this host" is, for deciding whether a runner's pid can be checked here.

A pid names a process only within one kernel boot and one pid namespace. Two
machines with the same host name (cloned VMs), or two containers on one
kernel, must not judge each other's runners dead by looking up a pid. So a
runner's host is its name plus a short token of the boot and the pid namespace
it runs in; only a runner with exactly the same host is checked by pid. Every
other one is judged by its lease and heartbeat.
"""

from __future__ import annotations

import hashlib
import os
import socket
from functools import lru_cache


@lru_cache(maxsize=1)
def this_host() -> str:
    parts = []
    for path in ("/proc/sys/kernel/random/boot_id",):
        try:
            with open(path) as f:
                parts.append(f.read().strip())
        except OSError:
            pass
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        pass
    token = hashlib.sha256("|".join(parts).encode()).hexdigest()[:6] if parts else "0"
    # ':' separates the parts of a runner id; '~' separates name and token
    name = socket.gethostname().replace(":", "_").replace("~", "_") or "localhost"
    return f"{name}~{token}"


def display(host: str) -> str:
    """The host name people know, without the token."""
    return host.split("~", 1)[0]
