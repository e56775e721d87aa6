#!/usr/bin/env python3
"""What making a new store's shard directories costs, by one thread and by two at once.

A new store needs a shard directory (`objects/AB/CD/`) for nearly every new object. This
makes N of them for N random hashes, the way the store does (the directory first, its
parent only when that is missing), with one thread and then with two taking every other
hash, each in a new directory tree that is kept until the end (on ext4 without a journal,
freed inodes make later allocations slower for minutes). Prints wall time and CPU per
directory.

    python bench/shards.py --dirs 4000 --dir /var/tmp
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from task_pipeline import fsutil  # noqa: E402


def make(base: str, hashes: list[str], threads: int) -> tuple[float, float]:
    """Microseconds per directory: wall, and CPU of this process (every thread)."""
    def work(part: list[str]) -> None:
        for h in part:
            fsutil.make_dirs(f"{base}/{h[:2]}/{h[2:4]}", 0o750)

    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    workers = [threading.Thread(target=work, args=(hashes[k::threads],)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    return (t1 - t0) / len(hashes) * 1e6, cpu / len(hashes) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dirs", type=int, default=4000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to make the trees (default: the temporary directory)")
    a = ap.parse_args()
    print(f"# {os.cpu_count()} CPUs, {a.dirs} shard directories for random hashes, in {a.dir or tempfile.gettempdir()}")
    print(f"{'threads':>8} {'wall us/dir':>12} {'CPU us/dir':>11}")
    with tempfile.TemporaryDirectory(prefix="tp-shards-", dir=a.dir) as d:
        for r in range(a.repeat):
            for threads in (1, 2):
                hashes = [hashlib.sha256(os.urandom(16)).hexdigest() for _ in range(a.dirs)]
                base = f"{d}/{r}-{threads}"
                os.mkdir(base)
                wall, cpu = make(base, hashes, threads)
                print(f"{threads:>8} {wall:>12.0f} {cpu:>11.0f}")


if __name__ == "__main__":
    main()
