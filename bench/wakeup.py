#!/usr/bin/env python3
"""What one request and its answer between two processes cost, across cores and on one core.

The engine's worker threads and the launcher talk like this once per task (a request with
three file descriptors and a marshalled environment, a short answer). On a VM, waking a
process that sleeps on the other core is dear; this measures how dear, by running the same
exchange with both processes free to use any core, then with both pinned to core 0.
Prints wall time per round trip and the CPU of each side (user + system).

    python bench/wakeup.py --rounds 5000
"""

from __future__ import annotations

import argparse
import marshal
import os
import resource
import socket
import sys
import time


def peer(sock: socket.socket) -> None:
    while True:
        data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
        if not data:
            os._exit(0)
        for fd in fds:
            os.close(fd)
        sock.send(b"x" * 60)


def measure(rounds: int, cpus: set[int] | None) -> tuple[float, float, float]:
    """Microseconds per round trip: wall, our CPU, the peer's CPU."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    pid = os.fork()
    if pid == 0:
        ours.close()
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        peer(theirs)
    theirs.close()
    mask = os.sched_getaffinity(0)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    msg = marshal.dumps(("run", 1, "/bin/sh", ["sh", "-c", "true"], dict(os.environ), "/tmp", None, 3.0))
    null = os.open(os.devnull, os.O_RDONLY)
    fds = [null, null, null]
    try:
        for _ in range(100):  # warm up
            socket.send_fds(ours, [msg], fds)
            ours.recv(1 << 16)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(rounds):
            socket.send_fds(ours, [msg], fds)
            ours.recv(1 << 16)
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    finally:
        ours.close()
        os.close(null)
        os.waitpid(pid, 0)
        os.sched_setaffinity(0, mask)
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = lambda a, b: (b.ru_utime - a.ru_utime + b.ru_stime - a.ru_stime) / rounds * 1e6  # noqa: E731
    # the peer's figure includes its 100 warm-up rounds: a rounding error at thousands of rounds
    return (t1 - t0) / rounds * 1e6, cpu(r0, r1), cpu(before_children, after_children)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5000)
    a = ap.parse_args()
    print(f"# {os.cpu_count()} CPUs, python {sys.version.split()[0]}, {a.rounds} round trips, "
          f"a {len(marshal.dumps(dict(os.environ)))}-byte environment")
    print(f"{'where':>12} {'wall us':>8} {'our CPU us':>11} {'peer CPU us':>12}")
    for label, cpus in (("any core", None), ("one core", {0})):
        wall, mine, peer_cpu = measure(a.rounds, cpus)
        print(f"{label:>12} {wall:>8.1f} {mine:>11.1f} {peer_cpu:>12.1f}")


if __name__ == "__main__":
    main()
