"""Objects in an S3 bucket (issue 11), against a real S3 server (SeaweedFS, tests/servers.py):
a pipeline end to end with PostgreSQL state, two hosts storing the same bytes at once, the server
killed mid-run, a big output in flat memory, gc's grace period, damaged objects, the host cache.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import threading

import pytest

import backends
from conftest import CLI

PG = pytest.mark.parametrize("cli", ["postgres"], indirect=True)

GEN = """
    [[step]]
    name = "gen"
    start = true
    script = 'for i in $(seq 1 {n}); do echo "item $((i % {distinct}))" > "$OUTPUT_DIR/work_$i"; done'

    [[step]]
    name = "work"
    script = '''
    sleep {nap}
    tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"
    '''
    """


def on_s3(cli: CLI, s3_server, bucket: str, prefix: str = "store") -> tuple[list[str], dict]:
    """Store arguments and environment: this test's database (SQLite or PostgreSQL), objects in the bucket."""
    db = ["-db", cli.url or cli.db, "--objects", f"s3://{bucket}/{prefix}", "--scratch", cli.db / "tmp"]
    return db, {**cli.env, **s3_server.env()}


@pytest.mark.backends
def test_a_pipeline_end_to_end_with_objects_in_a_bucket(cli, s3_server, s3_bucket, tmp_path):
    db, env = on_s3(cli, s3_server, s3_bucket)
    m = cli.manifest(GEN.format(n=12, distinct=12, nap=0))
    r = cli("run", m, *db, env=env)
    assert r.returncode == 0, r.err
    rows = json.loads(cli("export", "done", *db, "--json", env=env).out)
    assert len(rows) == 12 and all(r["path"].startswith(f"s3://{s3_bucket}/store/objects/") for r in rows)
    # the same bytes, read back from the bucket and checked against their hash
    h = rows[0]["hash"]
    assert cli("cat", h, *db, env=env).stdout == b"ITEM " + rows[0]["name"].split("_")[-1].encode() + b"\n" or \
        hashlib.sha256(cli("cat", h, *db, env=env).stdout).hexdigest() == h
    assert json.loads(cli("fsck", *db, "--json", env=env).out)["ok"]
    r = cli("export", "done", "--to", tmp_path / "out", *db, env=env)
    assert r.returncode == 0 and len(list((tmp_path / "out").iterdir())) == 12
    assert cli("why", rows[0]["path"], *db, env=env).returncode == 0
    # a re-run does nothing; a store directory names its bucket from now on
    assert "nothing to do" in cli("run", m, *db, env=env).err
    if cli.backend == "sqlite":
        r = cli("status", "-db", cli.db, env=env)
        assert r.returncode == 2 and f"s3://{s3_bucket}/store" in r.err


@PG
def test_two_hosts_storing_the_same_outputs_at_once(cli, s3_server, s3_bucket):
    """Two runners (each with scratch of its own) share a PostgreSQL store and a bucket; most outputs
    are identical, so they race to store the same bytes: create-only puts, no conflict, nothing lost."""
    db, env = on_s3(cli, s3_server, s3_bucket)
    m = cli.manifest(GEN.format(n=60, distinct=3, nap=0.05))
    cli.ok("run", m, *db, "-step", "gen", env=env)
    procs = [subprocess.Popen([sys.executable, "-m", "task_pipeline", "run", str(m), *db, "--scratch",
                               str(cli.tmp / f"scratch{i}"), "-parallel", "3"], cwd=cli.tmp,
                              env=cli.environ(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    st = json.loads(cli.ok("status", *db, "--json", env=env).out)
    assert st["totals"]["done"] == 61
    assert json.loads(cli.ok("fsck", *db, "--json", env=env).out)["ok"]


def test_concurrent_create_only_puts_of_the_same_bytes_never_conflict(s3_server, s3_bucket, tmp_path,
                                                                      monkeypatch):
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    from task_pipeline.s3store import S3Store

    stores = [S3Store(f"s3://{s3_bucket}/race", "sha256") for _ in range(4)]
    data = b"the very same bytes\n" * 1000
    results, errors = [], []

    def put(store):
        try:
            results.append(store.ingest_bytes(data))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=put, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert stores[0].rehash(results[0][0]) == hashlib.sha256(data).hexdigest()


def test_the_bucket_going_away_mid_run_loses_nothing_and_commits_nothing_it_lacks(cli, s3_server, s3_bucket):
    db, env = on_s3(cli, s3_server, s3_bucket)
    m = cli.manifest(GEN.format(n=30, distinct=30, nap=0.1))
    p = subprocess.Popen([sys.executable, "-m", "task_pipeline", "run", str(m), *db, "-parallel", "2"],
                         cwd=cli.tmp, env=cli.environ(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def some_done() -> bool:
        try:
            return backends.query(cli.db, "SELECT count(*) FROM task WHERE state='done'")[0][0] >= 5
        except Exception:  # noqa: BLE001 - not created yet
            return False

    deadline = time.monotonic() + 60
    while not some_done() and time.monotonic() < deadline:
        time.sleep(0.05)
    s3_server.stop()
    try:
        _, err = p.communicate(timeout=120)
        err = err.decode()
        assert p.returncode == 3, err
        assert "bucket" in err and "Traceback" not in err
    finally:
        s3_server.start()
    # nothing failed for good, and every object the database refers to is in the bucket
    assert backends.query(cli.db, "SELECT count(*) FROM task WHERE state='failed'") == [(0,)]
    assert json.loads(cli.ok("fsck", *db, "--json", env=env).out)["ok"]
    r = cli("run", m, *db, env=env)
    assert r.returncode == 0, r.err
    assert backends.query(cli.db, "SELECT count(*) FROM task WHERE state='done'") == [(31,)]
    assert json.loads(cli.ok("fsck", *db, "--json", env=env).out)["ok"]


def test_an_unreachable_bucket_is_one_line(cli, s3_server, s3_bucket):
    db, env = on_s3(cli, s3_server, s3_bucket)
    m = cli.manifest(GEN.format(n=1, distinct=1, nap=0))
    env = {**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # nothing listens there
    r = cli("run", m, *db, env=env, timeout=120)
    assert r.returncode == 3 and "cannot reach the bucket" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1


def _peak_rss_kb(pid: int, stop: threading.Event, out: list) -> None:
    peak = 0
    while not stop.is_set():
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            break
        time.sleep(0.05)
    out.append(peak)


@pytest.mark.parametrize("size_mb", [pytest.param(256, id="256MiB"),
                                     pytest.param(2048, id="2GiB", marks=pytest.mark.slow)])
def test_a_big_output_streams_to_and_from_the_bucket_in_flat_memory(cli, s3_server, s3_bucket, tmp_path, size_mb):
    db, env = on_s3(cli, s3_server, s3_bucket)
    m = cli.manifest(f"""
        [[step]]
        name = "big"
        start = true
        script = 'head -c {size_mb}M /dev/urandom > "$OUTPUT_DIR/copy_big"'

        [[step]]
        name = "copy"
        script = 'cmp -s "$INPUT_FILE" /dev/null || wc -c < "$INPUT_FILE" > "$OUTPUT_DIR/done_size"'
        """)
    p = subprocess.Popen([sys.executable, "-m", "task_pipeline", "run", str(m), *db], cwd=cli.tmp,
                         env=cli.environ(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stop, peak = threading.Event(), []
    watcher = threading.Thread(target=_peak_rss_kb, args=(p.pid, stop, peak))
    watcher.start()
    _, err = p.communicate(timeout=600)
    stop.set()
    watcher.join()
    assert p.returncode == 0, err.decode()
    (row,) = json.loads(cli.ok("export", "done", *db, "--json", env=env).out)
    assert cli.ok("cat", row["hash"], *db, env=env).out.strip() == str(size_mb << 20)
    print(f"peak RSS of run with a {size_mb} MiB output in the bucket: {peak[0] // 1024} MiB")
    assert peak[0] < 200 * 1024, f"{peak[0] // 1024} MiB"


def test_gc_on_a_bucket_keeps_young_unreferenced_objects(cli, s3_server, s3_bucket, monkeypatch):
    db, env = on_s3(cli, s3_server, s3_bucket)
    m = cli.manifest(GEN.format(n=3, distinct=3, nap=0))
    cli.ok("run", m, *db, env=env)
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    from task_pipeline.s3store import S3Store

    store = S3Store(f"s3://{s3_bucket}/store", "sha256")
    orphan, _ = store.ingest_bytes(b"stored by a runner that has not committed yet\n")
    out = json.loads(cli.ok("gc", *db, "--json", env=env).out)
    assert out["objects_removed"] == 0 and out["kept_recent"] == 1 and store.has(orphan)
    time.sleep(1.1)  # older than gc's slack
    out = json.loads(cli.ok("gc", *db, "--json", "--min-age", "0", env=env).out)
    assert out["objects_removed"] == 1 and not store.has(orphan)
    assert json.loads(cli.ok("fsck", *db, "--json", env=env).out)["ok"]


def test_gather_and_check_with_objects_in_a_bucket(cli, s3_server, s3_bucket):
    """A gather task's listing is stored in the bucket and its members are downloaded (through the
    host cache) into INPUT_DIR; check reads the recorded bytes of what differs from the bucket."""
    db, env = on_s3(cli, s3_server, s3_bucket)
    m = cli.manifest("""
        [[step]]
        name = "gen"
        start = true
        script = 'for i in 1 2 3; do echo "item $i" > "$OUTPUT_DIR/stamp_$i"; done'

        [[step]]
        name = "stamp"
        script = '{ cat "$INPUT_FILE"; date +%s%N; } > "$OUTPUT_DIR/part_${INPUT_NAME#stamp_}"'

        [[step]]
        name = "all"
        gather = true
        inputs = ["part"]
        script = 'head -qn1 "$INPUT_DIR"/* > "$OUTPUT_DIR/done_all"'
        """)
    cli.ok("run", m, *db, "--cache-size", "1M", env=env)
    (row,) = json.loads(cli.ok("export", "done", *db, "--json", env=env).out)
    assert cli.ok("cat", row["hash"], *db, env=env).out == "item 1\nitem 2\nitem 3\n"
    assert "every one byte-identical" in cli.ok("check", "all", *db, "--cache-size", "1M", env=env).out
    r = cli("check", "stamp", *db, "--json", env=env)
    assert r.returncode == 1, r.err
    tasks = json.loads(r.out)["tasks"]
    assert len(tasks) == 3 and all(" item " in t["files"][0]["diff"] for t in tasks)
    assert json.loads(cli.ok("fsck", *db, "--json", env=env).out)["ok"]


@pytest.mark.backends
def test_a_damaged_object_in_the_bucket_fails_its_task_by_name_and_the_cache_is_checked_too(
        cli, s3_server, s3_bucket, tmp_path, monkeypatch):
    db, env = on_s3(cli, s3_server, s3_bucket)
    m = cli.manifest("""
        [[step]]
        name = "up"
        script = 'tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"'
        """)
    cli.ok("run", m, *db, env=env)
    files = []
    for i in range(3):
        f = tmp_path / f"in{i}.txt"
        f.write_text(f"input {i}\n")
        files.append(f)
    cli.ok("submit", "up", *files, *db, env=env)
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    from task_pipeline.s3store import S3Store

    store = S3Store(f"s3://{s3_bucket}/store", "sha256")
    bad = hashlib.sha256(b"input 1\n").hexdigest()
    store.obstore.put(store.s3, store.key(bad), b"tampered\n")  # overwrite, as only an outsider could
    r = cli("run", m, *db, "--cache-size", "1M", env=env)
    assert r.returncode == 1, r.err
    (err,) = [e for (e,) in backends.query(cli.db, "SELECT error FROM task WHERE state='failed'")]
    assert bad in err and "damaged" in err
    assert backends.query(cli.db, "SELECT count(*) FROM task WHERE state='done'") == [(2,)]
    cache = cli.db / "tmp" / "cache"
    cached = sorted(p.name for p in cache.iterdir())
    assert len(cached) == 2 and bad not in cached  # what was verified, and not what failed
    # a cache entry damaged on this host is noticed and fetched again
    (cache / cached[0]).write_text("rotten\n")
    cli.ok("invalidate", "up", *db, env=env)
    r = cli("run", m, *db, "--cache-size", "1M", env=env)
    assert r.returncode == 1 and backends.query(cli.db, "SELECT count(*) FROM task WHERE state='done'") == [(2,)]
    outputs = json.loads(cli.ok("export", "done", *db, "--json", env=env).out)
    assert sorted(cli.ok("cat", o["hash"], *db, env=env).out for o in outputs) == ["INPUT 0\n", "INPUT 2\n"]
