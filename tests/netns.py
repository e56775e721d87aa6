"""Several "hosts" on one machine, for multi-host tests: each NetHost is a network namespace joined
to the root namespace by a veth pair on a private /24 of its own (10.231.N.1 on the root side, the
gateway where PostgreSQL is reached; 10.231.N.2 inside). The file system is shared, so hosts share
an objects directory simply by path.

Owns: unique names and subnets (also across parallel runs: the pid is in every name, and subnets are
handed out under a lock), running processes inside a host, cutting and restoring its link without
killing its processes, and leaving nothing behind: processes, namespace and veth go at close, and a
later run removes what a killed run left. Needs root and `ip netns`: otherwise tests skip, or fail
under TASK_PIPELINE_REQUIRE_SERVERS=1 (servers.unavailable).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from servers import pid_alive, unavailable

SUBNET = "10.231"  # 10.231.N.0/24 for N in 1..254; pg_hba in servers.py admits 10.0.0.0/8
_NS_RE = re.compile(r"^task-pipeline-(\d+)-(\d+)$")
_usable: str | None = None  # None: not probed yet; "": usable; else why not


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def require_netns() -> None:
    """Skip (or fail) unless network namespaces can be made here; probed once per session."""
    global _usable
    if _usable is None:
        if os.geteuid() != 0:
            _usable = "network namespaces need root (ip netns add); run the multi-host tests as root"
        elif shutil.which("ip") is None:
            _usable = "the `ip` command is missing: apt-get install iproute2"
        else:
            probe = f"task-pipeline-probe-{os.getpid()}"
            r = _ip("netns", "add", probe, check=False)
            _usable = "" if r.returncode == 0 else f"`ip netns add` does not work here: {r.stderr.strip()}"
            _ip("netns", "delete", probe, check=False)
    if _usable:
        unavailable(_usable)


def _veth_names(n: int, pid: int) -> tuple[str, str]:
    # Interface names are limited to 15 characters: "tp254h4194304" is 13.
    return f"tp{n}h{pid}", f"tp{n}p{pid}"


def _kill_inside(ns: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        r = _ip("netns", "pids", ns, check=False)
        pids = [int(p) for p in r.stdout.split()] if r.returncode == 0 else []
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in network namespace {ns} survive SIGKILL")
        time.sleep(0.05)  # killed ones leave the list once reaped; forked children show up next round


def _remove(ns: str, veth: str) -> None:
    _kill_inside(ns)
    # Deleting one end takes the pair down; the namespace itself goes once nothing holds it.
    _ip("link", "delete", veth, check=False)
    _ip("netns", "delete", ns, check=False)


def _sweep_dead_runs() -> None:
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        m = _NS_RE.match(line.split()[0]) if line.strip() else None
        if m and not pid_alive(int(m.group(1))):
            _remove(m.group(0), _veth_names(int(m.group(2)), int(m.group(1)))[0])


def _subnets_in_use() -> set[int]:
    out = _ip("-o", "-4", "addr", "show", check=False).stdout
    return {int(n) for n in re.findall(rf"inet {re.escape(SUBNET)}\.(\d+)\.", out)}


class NetHost:
    """A "host": a network namespace with one veth link to the root namespace.

    `ip` is its address, `gateway` the root side's (connect to servers listening on '*' there).
    Use as a context manager, or through the `net_hosts` fixture."""

    def __init__(self) -> None:
        self.n = 0
        self.name = self.veth = self.peer = self.ip = self.gateway = ""

    def __enter__(self) -> NetHost:
        require_netns()
        pid = os.getpid()
        lock_path = Path(tempfile.gettempdir()) / "task-pipeline-netns.lock"
        with open(lock_path, "a") as lock:
            # Serialises subnet choice with other test runs on this machine.
            fcntl.flock(lock, fcntl.LOCK_EX)
            _sweep_dead_runs()
            used = _subnets_in_use()
            free = [n for n in range(1, 255) if n not in used]
            if not free:
                raise RuntimeError(f"no free {SUBNET}.N.0/24 subnet left for a test host")
            self.n = free[0]
            self.name = f"task-pipeline-{pid}-{self.n}"
            self.veth, self.peer = _veth_names(self.n, pid)
            self.gateway, self.ip = f"{SUBNET}.{self.n}.1", f"{SUBNET}.{self.n}.2"
            try:
                _ip("netns", "add", self.name)
                _ip("link", "add", self.veth, "type", "veth", "peer", "name", self.peer, "netns", self.name)
                _ip("addr", "add", f"{self.gateway}/24", "dev", self.veth)
                _ip("link", "set", self.veth, "up")
                _ip("-n", self.name, "addr", "add", f"{self.ip}/24", "dev", self.peer)
                _ip("-n", self.name, "link", "set", "lo", "up")
                _ip("-n", self.name, "link", "set", self.peer, "up")
                # No default route: the host reaches its gateway (on-link) and nothing beyond it.
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.name:
            _remove(self.name, self.veth)
            self.name = ""

    def _argv(self, argv: list[str]) -> list[str]:
        if not self.name:
            raise RuntimeError("NetHost is not open")
        return ["ip", "netns", "exec", self.name, *map(str, argv)]

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """subprocess.Popen inside this host (same file system, user and environment as ours)."""
        return subprocess.Popen(self._argv(argv), **kw)

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        """subprocess.run inside this host."""
        return subprocess.run(self._argv(argv), **kw)

    def pids(self) -> list[int]:
        return [int(p) for p in _ip("netns", "pids", self.name).stdout.split()]

    def link_down(self) -> None:
        """Cut the host off, as a pulled cable would: its processes live on, packets are dropped
        rather than refused (no RST), so open connections stall and new ones time out."""
        _ip("link", "set", self.veth, "down")

    def link_up(self) -> None:
        # Packets sent while the link was down wait in the host's neighbour queue (its ARP for the
        # gateway went unanswered) and would go out now, long after their sockets gave up, and
        # break the first new connection; a real cut would have lost them: drop them. The addresses
        # survive a down/up, and the kernel puts their routes back.
        _ip("-n", self.name, "neigh", "flush", "dev", self.peer)
        _ip("neigh", "flush", "dev", self.veth)
        _ip("link", "set", self.veth, "up")


@pytest.fixture
def net_hosts() -> Iterator[Callable[[], NetHost]]:
    """A factory of NetHosts, all removed after the test however it ended."""
    hosts: list[NetHost] = []

    def make() -> NetHost:
        host = NetHost()
        hosts.append(host)
        return host.__enter__()

    yield make
    for host in reversed(hosts):
        host.close()
