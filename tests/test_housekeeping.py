"""fsck and gc (issue 3): re-hash and cross-check the store; remove what nothing references, safely."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

import backends
from task_pipeline import housekeeping
from task_pipeline.db import open_database
from task_pipeline.host import this_host
from task_pipeline.store import Store

pytestmark = pytest.mark.backends

PIPELINE = """
    [[step]]
    name = "gen"
    start = true
    script = 'for i in 1 2 3; do echo "item $i" > "$OUTPUT_DIR/work_$i"; done; echo "gen says hi" >&2'

    [[step]]
    name = "work"
    script = '{ cat "$INPUT_FILE"; echo "${SUFFIX:-worked}"; } > "$OUTPUT_DIR/done_$INPUT_NAME"'
    """


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def obj(db: Path, h: str) -> Path:
    return db / "objects" / h[:2] / h[2:4] / h[4:]


def query(db: Path, sql: str, *args) -> list[tuple]:
    return backends.query(db, sql, *args)


def built(cli) -> Path:
    m = cli.manifest(PIPELINE)
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    return m


def fsck_json(cli) -> tuple[int, dict]:
    r = cli("-db", cli.db, "fsck", "--json")
    return r.returncode, json.loads(r.out)


def age_past_gc_slack() -> None:
    time.sleep(housekeeping.GC_SLACK + 0.1)


# -- fsck ----------------------------------------------------------------------------------------------------


def test_fsck_of_a_sound_store(cli):
    built(cli)
    r = cli("-db", cli.db, "fsck")
    assert r.returncode == 0, r.err
    assert "no problems" in r.err
    rc, rep = fsck_json(cli)
    assert rc == 0 and rep["ok"] and rep["problems"] == []
    # 3 inputs of work, 3 outputs of work, gen's stderr log (+ the empty log object)
    assert rep["objects"] >= 7 and rep["references"] >= 7


def test_fsck_finds_a_flipped_byte_and_names_the_tasks_that_used_it(cli):
    built(cli)
    h = sha(b"item 2\n")
    path = obj(cli.db, h)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[3] ^= 0x01
    path.write_bytes(bytes(data))
    r = cli("-db", cli.db, "fsck")
    assert r.returncode == 1, r.err
    line = next(ln for ln in r.err.splitlines() if "corrupt" in ln)
    assert h in line and sha(bytes(data)) in line
    assert "output 'work_2' of gen#1" in line
    work2 = query(cli.db, "SELECT id FROM task WHERE input_name='work_2'")[0][0]
    assert f"input 'work_2' of work#{work2}" in line
    rc, rep = fsck_json(cli)
    assert rc == 1
    assert [(p["kind"], p["hash"]) for p in rep["problems"]] == [("corrupt", h)]
    assert len(rep["problems"][0]["used_by"]) == 2


def test_fsck_finds_missing_objects_and_damaged_logs(cli):
    built(cli)
    out3 = sha(b"item 3\nworked\n")
    obj(cli.db, out3).unlink()
    log = sha(b"gen says hi\n")
    os.chmod(obj(cli.db, log), 0o644)
    obj(cli.db, log).write_bytes(b"gen says bye\n")
    rc, rep = fsck_json(cli)
    assert rc == 1
    problems = {p["hash"]: p for p in rep["problems"]}
    assert problems[out3]["kind"] == "missing"
    assert any("done_work_3" in u for u in problems[out3]["used_by"])
    assert problems[log]["kind"] == "corrupt"
    assert problems[log]["used_by"] == ["stderr of gen#1 attempt 1"]


def test_fsck_reports_strays_leftovers_and_tasks_held_by_dead_runners(cli):
    built(cli)
    (cli.db / "objects" / "zz").mkdir()
    (cli.db / "objects" / "zz" / "notes.txt").write_text("not an object")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (cli.db / "tmp" / f"task-slot1-abcdef-{dead.pid}").mkdir()
    backends.execute(cli.db, "UPDATE task SET state='running', lease_owner=?, lease_expires=? WHERE input_name='work_1'",
                     f"{this_host()}:{dead.pid}:abcdef", time.time() + 100)
    rc, rep = fsck_json(cli)
    assert rc == 0, rep  # harmless: warnings, not problems
    text = "\n".join(rep["warnings"])
    assert "notes.txt" in text and "leftover scratch" in text and "held by runners that are gone" in text


def test_fsck_and_gc_refuse_a_missing_store(cli):
    for cmd in ("fsck", "gc"):
        r = cli("-db", cli.tmp / "nowhere", cmd)
        assert r.returncode == 3 and "no store here" in r.err and len(r.err.strip().splitlines()) == 1


# -- gc ---------------------------------------------------------------------------------------------------------


def test_gc_removes_unreferenced_objects_and_says_how_much_it_freed(cli):
    m = built(cli)
    old = {sha(f"item {i}\nworked\n".encode()) for i in (1, 2, 3)}
    # re-running `work` with a different result retires its old outputs: nothing refers to them any more
    cli.ok("-db", cli.db, "invalidate", "work")
    cli.ok("-manifest", m, "-db", cli.db, "-run", env={"SUFFIX": "again"})
    assert all(obj(cli.db, h).exists() for h in old)
    _, rep = fsck_json(cli)
    assert rep["unreferenced"]["objects"] == 3
    age_past_gc_slack()
    r = cli.ok("-db", cli.db, "gc", "--json")
    out = json.loads(r.out)
    assert out["objects_removed"] == 3 and out["object_bytes"] == sum(len(f"item {i}\nworked\n") for i in (1, 2, 3))
    assert out["bytes_freed"] == out["object_bytes"]
    assert not any(obj(cli.db, h).exists() for h in old)
    r = cli.ok("-db", cli.db, "gc")
    assert "freed 0 bytes" in r.out
    rc, rep = fsck_json(cli)
    assert rc == 0 and rep["unreferenced"]["objects"] == 0
    # everything current is still there
    for i in (1, 2, 3):
        h = sha(f"item {i}\nagain\n".encode())
        assert cli.ok("-db", cli.db, "cat", h).stdout == f"item {i}\nagain\n".encode()


def test_gc_keeps_an_object_stored_but_not_committed_yet(cli):
    built(cli)
    store = Store.at(cli.db)
    orphan, _ = store.ingest_bytes(b"an old orphan\n")
    # an old orphan, which a runner then produces again (deduplicated against it, not committed yet)
    reused, _ = store.ingest_bytes(b"produced again\n")
    age_past_gc_slack()
    # the runner (this process) starts; gc keeps what it stores from now on, however long gc takes to start
    backends.execute(cli.db, "INSERT INTO runner(id, host, pid, kind, started_at, heartbeat) VALUES (?,?,?,?,?,?)",
                     f"{this_host()}:{os.getpid()}:abcdef", this_host(), os.getpid(), "run", time.time(), time.time())
    # an output the runner has just moved into the store; its commit is still to come
    fresh, _ = store.ingest_bytes(b"just stored\n")
    assert store.ingest_bytes(b"produced again\n")[0] == reused
    out = json.loads(cli.ok("-db", cli.db, "gc", "--force", "--json").out)
    assert out["objects_removed"] == 1 and out["kept_recent"] == 2, out
    assert not obj(cli.db, orphan).exists()
    assert obj(cli.db, fresh).exists() and obj(cli.db, reused).exists()


def _runner_row(db: Path, host: str, pid: int, heartbeat: float) -> None:
    backends.execute(db, "INSERT INTO runner(id, host, pid, kind, started_at, heartbeat) VALUES (?,?,?,?,?,?)",
                     f"{host}:{pid}:abcdef", host, pid, "run", heartbeat - 5, heartbeat)


def test_gc_refuses_while_a_runner_is_active_unless_forced(cli, tmp_path):
    built(cli)
    # a runner elsewhere with a fresh heartbeat: active
    _runner_row(cli.db, "elsewhere.example", 4242, time.time())
    r = cli("-db", cli.db, "gc")
    assert r.returncode == 2 and "active on this store" in r.err and "elsewhere.example:4242" in r.err
    assert "--force" in r.err
    assert cli("-db", cli.db, "gc", "--force").returncode == 0
    # a local runner that was SIGKILLed (pid gone) does not count, whatever its heartbeat says
    backends.execute(cli.db, "DELETE FROM runner")
    dead = subprocess.Popen(["true"])
    dead.wait()
    _runner_row(cli.db, this_host(), dead.pid, time.time())
    _runner_row(cli.db, "elsewhere.example", 4343, time.time() - 3600)  # long silent: gone
    cli.ok("-db", cli.db, "gc")


def test_gc_force_during_a_run_loses_nothing(cli, tmp_path):
    """gc --force, again and again, while a run stores and commits outputs (many of them identical
    to objects that nothing references yet): the run's results are all there afterwards."""
    m = cli.manifest("""
        [[step]]
        name = "gen"
        start = true
        script = 'i=0; while [ $i -lt 150 ]; do echo $i > "$OUTPUT_DIR/work_$i"; i=$((i+1)); done'

        [[step]]
        name = "work"
        script = 'sleep 0.05; echo "shared $(( ${INPUT_NAME#work_} % 7 ))" > "$OUTPUT_DIR/done_$INPUT_NAME"'
        """)
    store_dir = cli.db
    cli.ok("-manifest", m, "-db", cli.db, "-run", "-step", "gen")
    store = Store.at(store_dir)
    for k in range(7):  # orphans identical to what the run is about to produce
        store.ingest_bytes(f"shared {k}\n".encode())
    age_past_gc_slack()
    p = subprocess.Popen([sys.executable, "-m", "task_pipeline",
                          *cli.argv("-manifest", m, "-db", cli.db, "-run", "-q", "-parallel", "4")],
                         cwd=cli.tmp, env=cli.environ(), stderr=subprocess.PIPE)
    refused = forced = 0
    while p.poll() is None:
        r = cli("-db", cli.db, "gc")
        refused += r.returncode == 2
        forced += cli("-db", cli.db, "gc", "--force").returncode == 0
    assert p.wait() == 0, p.stderr.read().decode()
    p.stderr.close()
    assert forced >= 1 and refused >= 1
    rc, rep = fsck_json(cli)
    assert rc == 0, rep["problems"][:3]
    assert query(cli.db, "SELECT count(*) FROM task WHERE state='done'") == [(151,)]
    for k in range(7):
        assert obj(cli.db, sha(f"shared {k}\n".encode())).exists()


def test_gc_and_fsck_show_progress_on_a_terminal(cli):
    built(cli)
    env = cli.environ({"COLUMNS": "100", "TERM": "xterm"})
    for cmd in ("fsck", "gc"):
        pid, fd = pty.fork()
        if pid == 0:
            os.chdir(cli.tmp)
            os.execve(sys.executable, [sys.executable, "-m", "task_pipeline", *cli.argv("-db", cli.db, cmd)], env)
        data = b""
        while True:
            r, _, _ = select.select([fd], [], [], 30)
            if not r:
                break
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        _, status = os.waitpid(pid, 0)
        os.close(fd)
        assert os.waitstatus_to_exitcode(status) == 0, data.decode(errors="replace")
        assert b"Traceback" not in data
        assert (b"no problems" if cmd == "fsck" else b"freed") in data


def test_the_dedup_touch_protects_an_object_in_process():
    """Unit level: without the touch on deduplication, gc's age rule could not see the object in use."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        conn = open_database(d, create=True)
        store = Store.at(Path(d))
        store.create_dirs()
        h, _ = store.ingest_bytes(b"same\n")
        first = obj(Path(d), h).stat()
        age_past_gc_slack()
        # another runner's store (its shard directories not seen yet) must find and touch it too,
        # not store its copy over it
        Store.at(Path(d)).ingest_bytes(b"same\n")
        now = obj(Path(d), h).stat()
        assert now.st_ctime > first.st_ctime and now.st_ino == first.st_ino
        rep = housekeeping.gc(conn, store, store.tmp, cutoff=time.time() - housekeeping.GC_SLACK)
        assert rep.removed == 0 and rep.kept_recent == 1
        rep = housekeeping.gc(conn, store, store.tmp, cutoff=time.time() + 10)
        assert rep.removed == 1
