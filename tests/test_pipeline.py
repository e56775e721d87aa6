"""The core pipeline as a user drives it: real scripts, a real store, the real CLI (issue: core pipeline)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path

import pytest

from conftest import ROOT

FANOUT = ROOT / "manifests" / "fanout.toml"
pytestmark = pytest.mark.backends


def runs(log: Path) -> list[str]:
    """Lines the scripts appended to the run log: one per script start."""
    return log.read_text().splitlines() if log.exists() else []


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def status(cli) -> dict:
    return {s["step"]: s for s in json.loads(cli.ok("status", "-db", cli.db, "--json").out)["steps"]}


# -- 1. the quick start ------------------------------------------------------------


def test_quickstart_manifest_runs(cli):
    r = cli.ok("-manifest", ROOT / "manifests" / "quickstart.toml", "-db", cli.db, "-run")
    assert "7 task(s) finished" in r.err
    counts = status(cli)
    assert [counts[s]["done"] for s in ("fetch", "shout", "count")] == [1, 3, 3]
    outs = cli.ok("-db", cli.db, "-export", "count").out.split()
    assert sorted(Path(p).read_text() for p in outs) == ["HELLO, NIX\n", "HELLO, PIPELINE\n", "HELLO, WORLD\n"]


# -- 2. fan-out, parallel limits, idempotent re-run ---------------------------------------


def test_fanout_runs_201_tasks_and_second_run_does_nothing(cli):
    r = cli.run(FANOUT, "-parallel", "4")
    assert r.returncode == 0, r.err
    counts = status(cli)
    assert counts["start"]["done"] == 1 and counts["process"]["done"] == 200
    assert re.search(r"201 task\(s\) finished", r.err)
    again = cli.run(FANOUT)
    assert again.returncode == 0
    assert "nothing to do" in again.err and "finished" not in again.err
    # every done_NNN.txt is the upper-cased process_NNN.txt
    done = json.loads(cli.ok("-db", cli.db, "export", "process", "--json").out)
    assert len(done) == 200
    sample = done[17]
    outs = json.loads(cli.ok("-db", cli.db, "export", "process", "-input-path", sample["path"], "--json").out)
    assert [o["name"] for o in outs] == ["done_" + sample["name"].removeprefix("process_")]
    assert Path(outs[0]["path"]).read_text() == Path(sample["path"]).read_text().upper()


def overlap(log: Path, step: str | None = None) -> int:
    """Highest number of scripts running at once, from +/- lines with nanosecond stamps."""
    events = []
    for line in log.read_text().splitlines():
        sign, name, ts = line.split()
        if step is None or name == step:
            events.append((int(ts), 1 if sign == "+" else -1))
    events.sort(key=lambda e: (e[0], e[1]))  # an end at the same instant frees its slot first
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


LIMITS = """
[[step]]
name = "gen"
start = true
script = 'for i in $(seq 1 24); do echo $i > "$OUTPUT_DIR/slow_$i"; echo $i > "$OUTPUT_DIR/fast_$i"; done'

[[step]]
name = "slow"
parallel = 2
script = 'echo "+ slow $(date +%s%N)" >> "$EVENTS"; sleep 0.15; echo "- slow $(date +%s%N)" >> "$EVENTS"'

[[step]]
name = "fast"
script = 'echo "+ fast $(date +%s%N)" >> "$EVENTS"; sleep 0.05; echo "- fast $(date +%s%N)" >> "$EVENTS"'
"""


def test_parallel_limits_are_reached_and_never_exceeded(cli):
    events = cli.tmp / "events"
    cli.run(cli.manifest(LIMITS), "-parallel", "4", env={"EVENTS": str(events)})
    assert len(runs(events)) == 2 * 48
    assert overlap(events, "slow") == 2      # the step's limit, reached
    assert overlap(events) == 4              # -parallel, reached
    assert overlap(events, "fast") <= 4


def test_default_parallel_is_cpu_count(cli):
    events = cli.tmp / "events"
    cli.run(cli.manifest(LIMITS.replace("parallel = 2", "")), env={"EVENTS": str(events)})
    assert overlap(events) == (os.cpu_count() or 1)


# -- 3. the object store ---------------------------------------------------------------


def test_objects_are_named_by_their_hash_read_only_and_stored_once(cli):
    m = cli.manifest("""
        [[step]]
        name = "gen"
        start = true
        script = 'echo same > "$OUTPUT_DIR/done_a"; echo same > "$OUTPUT_DIR/done_b"; echo other > "$OUTPUT_DIR/done_c"'
    """)
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    objects = [p for p in (cli.db / "objects").rglob("*") if p.is_file()]
    for p in objects:
        rel = p.relative_to(cli.db / "objects").parts
        assert len(rel) == 3 and len(rel[0]) == 2 and len(rel[1]) == 2
        assert sha256(p) == "".join(rel)
        assert stat.S_IMODE(p.stat().st_mode) == 0o444
    h_same = hashlib.sha256(b"same\n").hexdigest()
    assert sum(1 for p in objects if sha256(p) == h_same) == 1
    # cat and -export-hash stream an object, by full hash or unique prefix
    assert cli.ok("-db", cli.db, "cat", h_same).stdout == b"same\n"
    assert cli.ok("-db", cli.db, "-export-hash", h_same[:10]).stdout == b"same\n"
    bad = cli("-db", cli.db, "cat", "0" * 64)
    assert bad.returncode == 2 and "no object" in bad.err and len(bad.err.splitlines()) == 1


def test_outputs_are_moved_not_copied(cli):
    # The file the script wrote becomes the object: same inode, no second copy.
    m = cli.manifest("""
        [[step]]
        name = "gen"
        start = true
        script = 'head -c 100000 /dev/urandom > "$OUTPUT_DIR/done_big"; stat -c %i "$OUTPUT_DIR/done_big" > "$INODE_LOG"'
    """)
    inode_log = cli.tmp / "inode"
    cli.ok("-manifest", m, "-db", cli.db, "-run", env={"INODE_LOG": str(inode_log)})
    big = [p for p in (cli.db / "objects").rglob("*") if p.is_file() and p.stat().st_size == 100000]
    assert len(big) == 1
    assert big[0].stat().st_ino == int(inode_log.read_text())
    assert not any((cli.db / "tmp").iterdir())


# -- 4. routing ------------------------------------------------------------------------


ROUTING = """
[[step]]
name = "src"
start = true
script = '''
echo a > "$OUTPUT_DIR/split_1.txt"
echo b > "$OUTPUT_DIR/split_2.txt"
echo c > "$OUTPUT_DIR/typo_3.txt"
echo d > "$OUTPUT_DIR/done.json"
echo e > "$OUTPUT_DIR/report-2026.csv"
'''

[[step]]
name = "left"
inputs = ["split"]
script = 'echo "$STEP_NAME $INPUT_NAME" >> "$RUNLOG"; cp "$INPUT_FILE" "$OUTPUT_DIR/done_l"'

[[step]]
name = "right"
inputs = ["split"]
script = 'echo "$STEP_NAME $INPUT_NAME" >> "$RUNLOG"; cp "$INPUT_FILE" "$OUTPUT_DIR/done_r"'

[[step]]
name = "reports"
inputs = ["report-*.csv"]
script = 'echo "$STEP_NAME $INPUT_NAME" >> "$RUNLOG"'
"""


def test_routing_fan_out_globs_done_and_unrouted(cli):
    log = cli.tmp / "runlog"
    r = cli.run(cli.manifest(ROUTING), env={"RUNLOG": str(log)})
    assert r.returncode == 0, r.err
    assert sorted(runs(log)) == ["left split_1.txt", "left split_2.txt", "reports report-2026.csv",
                                 "right split_1.txt", "right split_2.txt"]
    unrouted = [ln for ln in r.err.splitlines() if "unrouted" in ln]
    assert len(unrouted) == 1 and "'typo'" in unrouted[0]
    # the unrouted output is kept as a terminal output of src, and traceable
    typo = hashlib.sha256(b"c\n").hexdigest()
    assert cli.ok("-db", cli.db, "cat", typo).stdout == b"c\n"
    assert "src" in cli.ok("-db", cli.db, "why", typo).out


# -- 5. versions, taint, migrate, early cutoff -------------------------------------------


CHAIN = """
[[step]]
name = "gen"
start = true
script = 'for i in $(seq 1 {n}); do echo "item $i" > "$OUTPUT_DIR/process_$i.txt"; done'

[[step]]
name = "process"
script = '{process}'

[[step]]
name = "publish"
script = 'echo "publish $INPUT_NAME" >> "$RUNLOG"; cp "$INPUT_FILE" "$OUTPUT_DIR/done_$INPUT_NAME"'
"""
V1 = 'echo "process $INPUT_NAME" >> "$RUNLOG"; tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/publish_$INPUT_NAME"'
V2_SAME = V1 + "  # same result, new text"
V3_DIFF = 'echo "process $INPUT_NAME" >> "$RUNLOG"; tr a-z A-Z < "$INPUT_FILE" | rev > "$OUTPUT_DIR/publish_$INPUT_NAME"'


def test_script_change_taints_migrate_reruns_exactly_those_and_revert_restores(cli):
    log = cli.tmp / "runlog"
    env = {"RUNLOG": str(log)}
    m = cli.manifest(CHAIN.format(n=200, process=V1))
    assert cli.run(m, env=env).returncode == 0
    assert len(runs(log)) == 400

    # edit: version 2, nothing re-runs, the user is told what to type
    m.write_text(CHAIN.format(n=200, process=V2_SAME))
    log.unlink()
    r = cli.run(m, env=env)
    assert r.returncode == 0 and runs(log) == []
    assert "200 tasks of process are tainted (v1 -> v2)" in r.err
    assert "-migrate-tainted" in r.err
    assert status(cli)["process"]["tainted"] == 200

    dry = cli.ok("-manifest", m, "-db", cli.db, "-migrate-tainted", "--dry-run")
    assert "would re-queue 200" in dry.err
    assert status(cli)["process"]["tainted"] == 200

    cli.ok("-manifest", m, "-db", cli.db, "-migrate-tainted")
    assert status(cli)["process"]["pending"] == 200
    r = cli.run(m, env=env)
    assert r.returncode == 0
    # byte-identical outputs: process re-ran 200 times, publish not at all (early cutoff)
    assert sorted(runs(log)) == sorted(f"process process_{i}.txt" for i in range(1, 201))
    counts = status(cli)
    assert counts["process"]["version"] == 2 and counts["process"]["done"] == 200
    assert counts["process"]["tainted"] == 0 and counts["publish"]["done"] == 200

    # back to the v1 text: v1 is current again, its results count, nothing runs
    m.write_text(CHAIN.format(n=200, process=V1))
    log.unlink()
    r = cli.run(m, env=env)
    assert r.returncode == 0 and runs(log) == []
    counts = status(cli)
    assert counts["process"]["version"] == 1 and counts["process"]["done"] == 200
    assert counts["process"]["tainted"] == 0 and counts["process"]["pending"] == 0


def test_changed_outputs_rerun_downstream_and_retire_old_results(cli):
    log = cli.tmp / "runlog"
    env = {"RUNLOG": str(log)}
    m = cli.manifest(CHAIN.format(n=5, process=V1))
    cli.ok("-manifest", m, "-db", cli.db, "-run", env=env)
    m.write_text(CHAIN.format(n=5, process=V3_DIFF))
    log.unlink()
    r = cli.ok("-manifest", m, "-db", cli.db, "-migrate-tainted", "-run", env=env)
    assert sorted(runs(log)) == sorted([f"process process_{i}.txt" for i in range(1, 6)]
                                       + [f"publish publish_process_{i}.txt" for i in range(1, 6)])
    assert "10 task(s) finished" in r.err
    counts = status(cli)
    assert counts["publish"]["done"] == 5 and counts["publish"]["history"] == 5
    # export shows current results only; --all shows history too
    cur = json.loads(cli.ok("-db", cli.db, "export", "publish", "--json").out)
    assert len(cur) == 5 and all(Path(c["path"]).read_text() == Path(c["path"]).read_text() for c in cur)
    assert {Path(c["path"]).read_text() for c in cur} == {f"{i} METI\n" for i in range(1, 6)}
    assert len(json.loads(cli.ok("-db", cli.db, "export", "publish", "--all", "--json").out)) == 10


def test_pending_work_follows_the_current_version(cli):
    # a script change while tasks are still pending (here: a failed start) moves them; nothing is tainted
    m = cli.manifest(CHAIN.format(n=3, process=V1))
    log = cli.tmp / "runlog"
    cli.ok("-manifest", m, "-db", cli.db, "-run", "-step", "gen", env={"RUNLOG": str(log)})
    assert status(cli)["process"]["pending"] == 3
    m.write_text(CHAIN.format(n=3, process=V3_DIFF))
    r = cli.ok("-manifest", m, "-db", cli.db, "-run", env={"RUNLOG": str(log)})
    assert "3 pending task(s) moved" in r.err
    counts = status(cli)
    assert counts["process"]["version"] == 2 and counts["process"]["done"] == 3 and counts["process"]["tainted"] == 0


# -- 6. late consumers pick up existing outputs ---------------------------------------------


def test_new_step_and_new_inputs_pick_up_existing_outputs(cli):
    log = cli.tmp / "runlog"
    env = {"RUNLOG": str(log)}
    base = """
        [[step]]
        name = "gen"
        start = true
        script = 'echo 1 > "$OUTPUT_DIR/a_1"; echo 2 > "$OUTPUT_DIR/b_2"'
    """
    m = cli.manifest(base)
    r = cli.ok("-manifest", m, "-db", cli.db, "-run", env=env)
    assert "unrouted" in r.err
    m.write_text(base + """
        [[step]]
        name = "a"
        script = 'echo "a $INPUT_NAME" >> "$RUNLOG"'
    """)
    r = cli.ok("-manifest", m, "-db", cli.db, "-run", env=env)
    assert runs(log) == ["a a_1"] and "1 existing output(s) queued" in r.err
    m.write_text(base + """
        [[step]]
        name = "a"
        inputs = ["a", "b"]
        script = 'echo "a $INPUT_NAME" >> "$RUNLOG"'
    """)
    cli.ok("-manifest", m, "-db", cli.db, "-run", env=env)
    assert runs(log) == ["a a_1", "a b_2"]


# -- 7. status and output modes ------------------------------------------------------------------


def test_status_table_and_json_agree(cli):
    cli.ok("-manifest", FANOUT, "-db", cli.db, "-run", "-quiet")
    table = cli.ok("status", "-db", cli.db).out
    row = next(ln for ln in table.splitlines() if ln.strip().startswith("process"))
    assert row.split()[:7] == ["process", "v1", "0", "0", "200", "0", "0"]
    data = json.loads(cli.ok("status", "-db", cli.db, "--json").out)
    assert data["totals"] == {"pending": 0, "running": 0, "leased": 0, "done": 201, "failed": 0, "tainted": 0}


def test_quiet_prints_nothing_and_verbose_prints_tasks(cli):
    m = cli.manifest(CHAIN.format(n=2, process=V1))
    q = cli.ok("-manifest", m, "-db", cli.db, "-run", "-quiet", env={"RUNLOG": os.devnull})
    assert q.err == "" and q.out == ""
    v = cli.ok("-manifest", m, "-db", cli.tmp / "db2", "-run", "-verbose", env={"RUNLOG": os.devnull})
    assert re.search(r"\[process#\d+\] done", v.err)
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|DEBUG|WARNING) ", ln) or not ln[:1].isdigit()
               for ln in v.err.splitlines())


def test_live_progress_on_a_terminal(cli):
    pty = pytest.importorskip("pty")
    import subprocess
    import sys

    m = cli.manifest(CHAIN.format(n=3, process=V1))
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RUNLOG": os.devnull, "COLUMNS": "120"}
    p = subprocess.Popen([sys.executable, "-m", "task_pipeline", "-manifest", str(m), "-db", str(cli.db), "-run"],
                         stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cli.tmp)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert p.wait(timeout=60) == 0
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert "publish" in screen and "3/3" in screen      # a progress row per step, done/total
    assert "\x1b[" in screen                            # drawn with terminal control codes


# -- 8. command-line spellings and errors ----------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["-manifest", "{m}", "-db", "{db}", "-run"],
    ["--manifest", "{m}", "--db", "{db}", "--run"],
    ["--manifest={m}", "--db={db}", "--run"],
    ["run", "-m", "{m}", "-db", "{db}"],
    ["run", "--manifest", "{m}", "--db", "{db}", "--parallel", "2"],
])
def test_flag_spellings_and_subcommands(cli, argv):
    m = cli.manifest(CHAIN.format(n=2, process=V1))
    r = cli.ok(*[a.format(m=m, db=cli.db) for a in argv], env={"RUNLOG": os.devnull})
    assert "5 task(s) finished" in r.err
    assert status(cli)["publish"]["done"] == 2


@pytest.mark.parametrize("argv, needle", [
    (["-bogus"], "unknown option -bogus"),
    (["-run"], "needs a manifest"),
    (["-manifest", "missing.toml", "-run"], "missing.toml: file not found"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["rnu", "-m", "x.toml"], "did you mean 'run'"),
    (["-parallel", "0", "-run", "-m", "x.toml"], "-parallel must be between 1 and"),
    (["-parallel", "two", "-run"], "invalid int value"),
    ([], "nothing to do"),
    (["status", "-db", "nowhere"], "no store here"),
])
def test_bad_usage_is_one_line_and_exit_2(cli, argv, needle):
    r = cli(*argv)
    assert r.returncode == (3 if needle == "no store here" else 2), r.err
    assert len(r.err.strip().splitlines()) == 1, r.err
    assert needle in r.err and "Traceback" not in r.err


def test_run_without_start_step_and_no_work_says_so(cli):
    m = cli.manifest("""
        [[step]]
        name = "only"
        script = "true"
    """)
    r = cli.ok("-manifest", m, "-db", cli.db, "-run")
    assert "no start step and no pending tasks" in r.err
