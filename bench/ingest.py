#!/usr/bin/env python3
"""Ingest speed of one big output against hashing it alone (issue 6, target 3).

Writes a file of --size GiB into the store's scratch space (then flushes it, so the
timed part reads from page cache and fsync has nothing left to write), and compares:

  baseline   hashlib.file_digest(f, "sha256")        -- hashing alone, no store
  sha256     Store.ingest_fd: hash once, fchmod, rename into objects/ (no copy)
  baseline   blake3, all threads, over the same file
  blake3     the same ingest into a store created with --hash blake3

    python bench/ingest.py --size 1
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from task_pipeline.store import Store  # noqa: E402

GiB = 1 << 30


def make(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
    os.sync()


def rate(seconds: float, size: int) -> str:
    return f"{size / seconds / 1e9:6.2f} GB/s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=1.0, help="GiB")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    size = int(a.size * GiB)
    import blake3

    with tempfile.TemporaryDirectory(prefix="tp-ingest-", dir=os.environ.get("TMPDIR", "/tmp")) as d:
        results: dict[str, list[float]] = {}
        for algo in ("sha256", "blake3"):
            store = Store.at(Path(d) / algo, algo)
            store.create_dirs()
            for _ in range(a.repeat):
                src = store.tmp / "big"
                make(src, size)
                t0 = time.perf_counter()
                if algo == "sha256":
                    with open(src, "rb") as f:
                        hashlib.file_digest(f, "sha256")
                else:
                    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
                    with open(src, "rb") as f:
                        while chunk := f.read(16 << 20):
                            h.update(chunk)
                results.setdefault(f"{algo} hash alone", []).append(time.perf_counter() - t0)
                fd = os.open(src, os.O_RDONLY)
                t0 = time.perf_counter()
                digest, n = store.ingest_fd(fd, src)
                results.setdefault(f"{algo} ingest", []).append(time.perf_counter() - t0)
                os.close(fd)
                assert n == size and not src.exists() and store.path(digest).exists()
                os.unlink(store.path(digest))
        print(f"# {a.size:g} GiB, in page cache, median of {a.repeat}, {os.cpu_count()} CPUs")
        med = {k: statistics.median(v) for k, v in results.items()}
        for k, v in med.items():
            print(f"{k:20} {rate(v, size)}")
        print(f"sha256 ingest / hashlib   {med['sha256 hash alone'] / med['sha256 ingest']:.2f}x")
        print(f"blake3 ingest / blake3    {med['blake3 hash alone'] / med['blake3 ingest']:.2f}x")


if __name__ == "__main__":
    main()
