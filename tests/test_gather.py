"""Gather steps (issue 14): one task over every current output routed to a step, fired in `run` once
nothing upstream can still change the set (the barrier), in `serve` once the set has also settled;
the set's identity; failed upstream tasks; gc; crash safety. Real scripts, real stores, the real CLI;
the tests whose SQL differs by backend on PostgreSQL too."""

from __future__ import annotations

import json
import re
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import backends
from conftest import CLI, ROOT

# The tests marked `backends` run on SQLite and on PostgreSQL: between them they take every path of
# gather_states and create_gather (queued, restored, retired) and the queries of status, graph and
# why. The others add no SQL of their own and run once, to keep the suite fast.


def query(cli: CLI, sql: str, *args) -> list[tuple]:
    return backends.query(cli.db, sql, *args)


def events(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def gather_tasks(cli: CLI, step: str = "report") -> list[tuple]:
    """(task id, live, state, member count) of every task of `step`, oldest first."""
    return query(cli, """SELECT t.id, t.live, t.state, (SELECT count(*) FROM gather_member m WHERE m.task_id = t.id)
                         FROM task t JOIN step s ON s.id = t.step_id WHERE s.name = ? ORDER BY t.id""", step)


def final(cli: CLI) -> dict[str, str]:
    rows = json.loads(cli.ok("export", "done", "-db", cli.db, "--json").out)
    return {r["name"]: Path(r["path"]).read_text() for r in rows}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def assert_clean(cli: CLI) -> None:
    report = json.loads(cli.ok("fsck", "-db", cli.db, "--json").out)
    assert report["problems"] == [], report
    assert os.listdir(cli.db / "tmp") == [], "scratch left behind"


# -- the barrier -----------------------------------------------------------------------------

BARRIER = """
[[step]]
name = "gen"
start = true
script = 'for i in 1 2 3 4 5 6; do echo "item $i" > "$OUTPUT_DIR/slow_$i"; done'

[[step]]
name = "slow"
retries = 1
retry_delay = 0.4
script = '''
n=${INPUT_NAME#slow_}
if [ "$n" = 3 ] && [ "$TASK_ATTEMPT" = 1 ]; then exit 1; fi   # fails once: its retry waits 0.4 s, pending
sleep "0.$n"
tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/mid_$n"
echo "end slow_$n $(date +%s%N)" >> "$EVENTS"
'''

[[step]]
name = "mid"
script = '''
sleep 0.1
cp "$INPUT_FILE" "$OUTPUT_DIR/words_${INPUT_NAME#mid_}.txt"
echo "end mid_${INPUT_NAME#mid_} $(date +%s%N)" >> "$EVENTS"
'''

[[step]]
name = "report"
gather = true
inputs = ["words"]
script = '''
echo "gather $(date +%s%N) $(wc -l < "$INPUT_FILE") $INPUT_NAME" >> "$EVENTS"
echo "mode $(stat -c %a "$INPUT_DIR") $(stat -c %a "$INPUT_DIR/words_1.txt")" >> "$EVENTS"
cat "$INPUT_DIR"/* > "$OUTPUT_DIR/all.txt"
cut -f1 "$INPUT_FILE" | tr '\\n' ' ' > "$OUTPUT_DIR/done_names"
'''

[[step]]
name = "all"
script = 'wc -l < "$INPUT_FILE" > "$OUTPUT_DIR/done_lines"'
"""


@pytest.mark.backends
def test_the_barrier_waits_for_slow_and_retried_upstream_work_then_fires_once(cli):
    log = cli.tmp / "events"
    m = cli.manifest(BARRIER)
    r = cli.run(m, "-parallel", "2", env={"EVENTS": str(log)})
    assert r.returncode == 0, r.err
    ev = events(log)
    gathers = [e for e in ev if e[0] == "gather"]
    assert len(gathers) == 1, ev
    upstream_ends = [int(e[2]) for e in ev if e[0] == "end"]
    assert len(upstream_ends) == 12
    assert int(gathers[0][1]) > max(upstream_ends), "the gather step fired before its upstream was done"
    assert gathers[0][2:] == ["6", "gather"]           # INPUT_FILE lists all six members; INPUT_NAME is 'gather'
    assert ["mode", "500", "444"] in ev                 # read-only (root could write anyway: modes, not a touch)
    assert final(cli) == {"done_names": " ".join(f"words_{i}.txt" for i in range(1, 7)) + " ", "done_lines": "6\n"}
    assert "report: gathering 6 member(s)" in r.err
    # the same set again: nothing runs
    again = cli.run(m, env={"EVENTS": str(log)})
    assert again.returncode == 0 and "nothing to do" in again.err
    assert len([e for e in events(log) if e[0] == "gather"]) == 1
    assert [(live, st, n) for _, live, st, n in gather_tasks(cli)] == [(1, "done", 6)]
    assert_clean(cli)
    # status, graph and why know the gather step
    st = json.loads(cli.ok("status", "-db", cli.db, "--json").out)
    task = gather_tasks(cli)[0][0]
    assert st["gathers"] == [{"step": "report", "members": 6, "gathered": 6, "task": task, "due": False,
                              "waiting": None, "summary": f"gather step 'report': 6 member(s), gathered by task {task}"}]
    assert "gather step 'report': 6 member(s), gathered by task" in cli.ok("status", "-db", cli.db).out
    graph = json.loads(cli.ok("graph", "-db", cli.db, "--json").out)
    assert {n["id"]: n["gather"] for n in graph["nodes"]}["report"] is True
    assert {(e["from"], e["to"]): e["observed"] for e in graph["edges"]}[("mid", "report")] == 6
    h = json.loads(cli.ok("export", "done", "-db", cli.db, "--json").out)
    lines = next(x["hash"] for x in h if x["name"] == "done_lines")
    why = cli.ok("why", "-db", cli.db, lines).out
    assert "6 member(s) gathered:" in why
    for i in range(1, 7):
        assert f"gen v1 (task 1) -> slow v1 (task {i + 1}) -> mid v1" in why and f"-> words_{i}.txt" in why
    chain = json.loads(cli.ok("why", "-db", cli.db, lines, "--json").out)[0]
    hop = next(x for x in chain if x["step"] == "report")
    assert [x["name"] for x in hop["members"]] == [f"words_{i}.txt" for i in range(1, 7)]
    assert [x["step"] for x in hop["members"][0]["lineage"]] == ["gen", "slow", "mid"]


# -- identity ------------------------------------------------------------------------------

IDENTITY = """
[[step]]
name = "gen"
start = true
script = 'for f in "$SRC"/*; do cp "$f" "$OUTPUT_DIR/count_$(basename "$f")"; done'

[[step]]
name = "count"
script = '''
echo "count $INPUT_NAME" >> "$EVENTS"
wc -w < "$INPUT_FILE" | tr -d ' ' > "$OUTPUT_DIR/words_${INPUT_NAME#count_}"
'''

[[step]]
name = "report"
gather = true
inputs = ["words"]
script = '''
echo "report $(wc -l < "$INPUT_FILE")" >> "$EVENTS"
cat "$INPUT_DIR"/* | awk '{ s += $1 } END { print s }' > "$OUTPUT_DIR/total.txt"
'''

[[step]]
name = "publish"
inputs = ["total"]
script = '''
echo "publish" >> "$EVENTS"
cp "$INPUT_FILE" "$OUTPUT_DIR/done_total"
'''
"""


@pytest.mark.backends
def test_a_changed_member_makes_one_new_gather_task_and_only_changed_work_downstream(cli):
    src = cli.tmp / "src"
    src.mkdir()
    for name, text in (("a", "one two three"), ("b", "four five"), ("c", "six")):
        (src / name).write_text(text + "\n")
    log = cli.tmp / "events"
    env = {"EVENTS": str(log), "SRC": str(src)}
    m = cli.manifest(IDENTITY)

    def step(words: dict[str, str] | None = None) -> list[str]:
        before = len(events(log))
        for name, text in (words or {}).items():
            (src / name).write_text(text + "\n")
        if words:
            cli.ok("invalidate", "gen", "-db", cli.db)
        r = cli.run(m, env=env)
        assert r.returncode == 0, r.err
        return [" ".join(e) for e in events(log)[before:]]

    assert sorted(step()) == ["count count_a", "count count_b", "count count_c", "publish", "report 3"]
    assert final(cli) == {"done_total": "6\n"}
    # other words, the same count: count runs for c, its output is the same bytes, so the set is too
    assert step({"c": "seven"}) == ["count count_c"]
    # one member changed: one new gather task, one publish
    assert step({"c": "seven eight"}) == ["count count_c", "report 3", "publish"]
    assert final(cli) == {"done_total": "7\n"}
    # two members changed, the total is not: a new gather task whose output is the same bytes, so
    # publish does not run again (early cutoff after the gather step)
    assert sorted(step({"a": "one two", "b": "four five six"})) == ["count count_a", "count count_b", "report 3"]
    # back to inputs seen before: their count tasks, and the gather task of that set, count again; nothing runs
    assert step({"a": "one two three", "b": "four five"}) == []
    tasks = gather_tasks(cli)
    assert [(live, st, n) for _, live, st, n in tasks] == [(0, "done", 3), (1, "done", 3), (0, "done", 3)]
    assert final(cli) == {"done_total": "7\n"}
    assert_clean(cli)


def test_a_gather_task_that_failed_passes_on_the_result_it_was_to_replace(cli):
    src = cli.tmp / "src"
    src.mkdir()
    for name, text in (("a", "one two three"), ("b", "four five")):
        (src / name).write_text(text + "\n")
    m = cli.manifest(IDENTITY.replace('echo "report', 'test -z "$FAIL" || exit 3; echo "report'))
    env = {"EVENTS": str(cli.tmp / "events"), "SRC": str(src)}
    cli.ok("-manifest", m, "-db", cli.db, "-run", env=env)
    (src / "b").write_text("four\n")
    cli.ok("invalidate", "gen", "-db", cli.db)
    assert cli.run(m, env={**env, "FAIL": "1"}).returncode == 1
    assert final(cli) == {"done_total": "5\n"}      # the last good result stays until one replaces it
    (src / "b").write_text("four five six seven\n")
    cli.ok("invalidate", "gen", "-db", cli.db)
    cli.ok("-manifest", m, "-db", cli.db, "-run", env=env)
    done = json.loads(cli.ok("export", "done", "-db", cli.db, "--json").out)
    assert [Path(r["path"]).read_text() for r in done] == ["7\n"], "the first result was never retired"


def test_a_gather_step_cannot_be_submitted_to(cli):
    m = cli.manifest(IDENTITY)
    cli.ok("-manifest", m, "-db", cli.db, "-run", "-step", "count")  # registers; gen is not run
    (cli.tmp / "words_x").write_text("3\n")
    r = cli("submit", "-db", cli.db, "report", "words_x")
    assert r.returncode == 2 and r.err.count("\n") == 1
    assert "'report' is a gather step: it takes every current output routed to it" in r.err
    r = cli("submit", "-db", cli.db, "--route", "words_x")
    assert r.returncode == 2 and "gather step" in r.err


# -- failed upstream tasks -------------------------------------------------------------------

FAILING = """
[[step]]
name = "gen"
start = true
script = 'for i in 1 2 3; do echo $i > "$OUTPUT_DIR/item_$i"; done'

[[step]]
name = "item"
script = '''
if [ "$INPUT_NAME" = item_2 ] && [ ! -e "$FIXED" ]; then echo "item 2 is broken" >&2; exit 3; fi
cp "$INPUT_FILE" "$OUTPUT_DIR/part_${INPUT_NAME#item_}"
'''

[[step]]
name = "strict"
gather = true
inputs = ["part"]
script = 'cut -f1 "$INPUT_FILE" | tr "\\n" " " > "$OUTPUT_DIR/done_strict"'

[[step]]
name = "lenient"
gather = true
inputs = ["part"]
on_failure = "gather"
script = 'cut -f1 "$INPUT_FILE" | tr "\\n" " " > "$OUTPUT_DIR/done_lenient"'
"""


def test_failed_upstream_tasks_hold_a_waiting_gather_step_and_are_left_out_by_a_gathering_one(cli):
    fixed = cli.tmp / "fixed"
    m = cli.manifest(FAILING)
    r = cli.run(m, env={"FIXED": str(fixed)})
    assert r.returncode == 1
    assert "gather step 'strict' did not run: 1 upstream task(s) failed (on_failure = \"wait\")" in r.err
    assert "lenient: gathering 2 member(s)" in r.err and "1 upstream task(s) failed and are left out" in r.err
    assert final(cli) == {"done_lenient": "part_1 part_3 "}
    st = cli.ok("status", "-db", cli.db).out
    assert "gather step 'strict': 2 member(s); waits: 1 upstream task(s) failed" in st
    fixed.touch()
    cli.ok("retry", "-db", cli.db)
    r = cli.run(m, env={"FIXED": str(fixed)})
    assert r.returncode == 0, r.err
    assert final(cli) == {"done_strict": "part_1 part_2 part_3 ", "done_lenient": "part_1 part_2 part_3 "}
    assert [(live, n) for _, live, _, n in gather_tasks(cli, "lenient")] == [(0, 2), (1, 3)]
    assert [(live, n) for _, live, _, n in gather_tasks(cli, "strict")] == [(1, 3)]


# -- what INPUT_DIR holds ----------------------------------------------------------------------


def test_members_with_one_name_and_different_content_fail_the_task_naming_them(cli):
    m = cli.manifest("""
        [[step]]
        name = "gen"
        start = true
        script = 'echo "$RUNSET" > "$OUTPUT_DIR/part_x"; echo same > "$OUTPUT_DIR/part_y"'

        [[step]]
        name = "all"
        gather = true
        inputs = ["part"]
        retries = 2
        script = 'cat "$INPUT_DIR"/* > "$OUTPUT_DIR/done_all"'
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run", "-runset", "one")
    r = cli.run(m, "-runset", "two")  # part_x again, with other content: both are current outputs
    assert r.returncode == 1
    assert "2 different members are named 'part_x'" in r.err and "INPUT_DIR holds one file per name" in r.err
    assert query(cli, "SELECT attempts FROM task WHERE input_name = 'gather' AND state = 'failed'") == [(1,)]
    assert os.listdir(cli.db / "tmp") == []


# -- gc --------------------------------------------------------------------------------------------


def test_members_of_a_gather_task_stay_referenced_after_their_producer_reran(cli):
    extra = cli.tmp / "extra"
    extra.write_text("first\n")
    m = cli.manifest(f"""
        [[step]]
        name = "gen"
        start = true
        script = 'for i in 1 2; do echo $i > "$OUTPUT_DIR/item_$i"; done'

        [[step]]
        name = "item"
        script = 'cat "$INPUT_FILE" {extra} > "$OUTPUT_DIR/part_${{INPUT_NAME#item_}}"'

        [[step]]
        name = "all"
        gather = true
        inputs = ["part"]
        script = 'cat "$INPUT_DIR"/* > "$OUTPUT_DIR/done_all"'
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    old = [h for (h,) in query(cli, "SELECT hash FROM gather_member")]
    assert len(old) == 2
    extra.write_text("second\n")
    cli.ok("invalidate", "item", "-db", cli.db)   # re-run in place: the old outputs' rows go
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    assert not query(cli, "SELECT 1 FROM output WHERE hash IN (?, ?)", *old)
    cli.ok("gc", "-db", cli.db, "--force")
    for h in old:  # still the members of the superseded gather task
        assert (cli.db / "objects" / h[:2] / h[2:4] / h[4:]).exists()
    fsck = json.loads(cli.ok("fsck", "-db", cli.db, "--json").out)
    assert fsck["problems"] == []
    assert final(cli) == {"done_all": "1\nsecond\n2\nsecond\n"}


# -- a step that starts gathering -------------------------------------------------------------------


def test_a_step_that_starts_gathering_is_a_new_version_and_migration_retires_its_per_input_results(cli):
    text = """
        [[step]]
        name = "gen"
        start = true
        script = 'for i in 1 2 3; do echo $i > "$OUTPUT_DIR/part_$i"; done'

        [[step]]
        name = "part"
        {gather}
        script = 'cat "$INPUT_FILE" > "$OUTPUT_DIR/done_part_$INPUT_NAME"; test -z "$INPUT_DIR" || cat "$INPUT_DIR"/* > "$OUTPUT_DIR/done_all"'
        """
    m = cli.manifest(text.format(gather=""))
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    assert len(final(cli)) == 3
    m = cli.manifest(text.format(gather="gather = true"))
    r = cli.ok("-manifest", m, "-db", cli.db, "-run")
    assert "part: version 2 is current (was 1)" in r.err and "3 tasks of part are tainted" in r.err
    assert "part: gathering 3 member(s)" in r.err
    cli.ok("-manifest", m, "-db", cli.db, "-migrate-tainted", "-run")
    results = final(cli)
    assert sorted(results) == ["done_all", "done_part_gather"] and results["done_all"] == "1\n2\n3\n"
    assert query(cli, "SELECT count(*) FROM task t JOIN step s ON s.id = t.step_id "
                      "WHERE s.name = 'part' AND t.live = 1") == [(1,)]


# -- a gather step whose script changes ----------------------------------------------------------

TAINT = """
[[step]]
name = "gen"
start = true
script = 'for i in 1 2 3; do echo "$i" > "$OUTPUT_DIR/words_$i"; done'

[[step]]
name = "report"
gather = true
inputs = ["words"]
script = '''
echo "report v$STEP_VERSION $(wc -l < "$INPUT_FILE")" >> "$EVENTS"
cat "$INPUT_DIR"/* | awk '{ s += $1 } END { print SUM }' > "$OUTPUT_DIR/total"
'''

[[step]]
name = "total"
script = 'echo publish >> "$EVENTS"; cp "$INPUT_FILE" "$OUTPUT_DIR/done_total"'
"""


def test_a_gather_step_whose_script_changes_is_tainted_migrated_and_restored_like_any_step(cli):
    log = cli.tmp / "events"
    env = {"EVENTS": str(log)}

    def run(sum_expr: str, *extra) -> tuple[str, list[str]]:
        before = len(events(log))
        r = cli.run(cli.manifest(TAINT.replace("SUM", sum_expr)), *extra, env=env)
        assert r.returncode == 0, r.err
        return r.err, [" ".join(e) for e in events(log)[before:]]

    assert run("s")[1] == ["report v1 3", "publish"]
    err, ran = run("s + 0")   # another script, the same bytes out
    assert ran == [] and "report: version 2 is current (was 1)" in err and "1 tasks of report are tainted" in err
    err, ran = run("s + 0", "-migrate-tainted")
    assert ran == ["report v2 3"], err          # the same three members, on the new version; total is the
    assert final(cli) == {"done_total": "6\n"}  # same bytes, so nothing downstream runs again
    err, ran = run("s")                           # back to the first script: its result counts again
    assert ran == [] and "report: version 1 is current (was 2)" in err
    assert [(live, st, n) for _, live, st, n in gather_tasks(cli)] == [(1, "done", 3), (0, "done", 3)]
    cli.ok("invalidate", "report", "-db", cli.db)
    assert run("s")[1] == ["report v1 3"]
    assert_clean(cli)


# -- serve: a burst settles into one task -------------------------------------------------------

BURST = """
[[step]]
name = "count"
script = 'wc -c < "$INPUT_FILE" | tr -d " " > "$OUTPUT_DIR/size_$INPUT_NAME"'

[[step]]
name = "sizes"
gather = true
inputs = ["size"]
settle = "1s"
script = 'wc -l < "$INPUT_FILE" > "$OUTPUT_DIR/done_count"; cat "$INPUT_DIR"/* | sort -n | tail -1 > "$OUTPUT_DIR/done_max"'
"""

# 100 submits, each its own CLI invocation and commit, from one process (a hundred interpreters
# starting at once would cost this 2-core machine half a minute), in ten bursts of ten with a pause
# between them long enough for the daemon to drain a burst: without the settle time, every pause
# would let the gather step fire
SUBMITTER = """
import sys, time
from task_pipeline.cli import main
head, files = sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]
for i, f in enumerate(files):
    if i and i % 10 == 0:
        time.sleep(0.15)
    rc = main([*head, f])
    if rc:
        sys.exit(rc)
"""


def test_a_burst_of_submits_to_serve_makes_one_gather_task_once_settled(cli):
    m = cli.manifest(BURST)
    files = []
    for i in range(100):
        f = cli.tmp / f"in_{i:03d}"
        f.write_text("x" * (i + 1))
        files.append(f.name)
    log = open(cli.tmp / "serve.log", "wb")
    serve = subprocess.Popen([sys.executable, "-m", "task_pipeline", *cli.argv("serve", m, "-db", cli.db,
                                                                               "-parallel", "2")],
                             cwd=cli.tmp, env=cli.environ(), stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while b"serving" not in (cli.tmp / "serve.log").read_bytes():
            assert time.monotonic() < deadline and serve.poll() is None
            time.sleep(0.05)
        subprocess.run([sys.executable, "-c", SUBMITTER, *cli.argv("submit", "-db", cli.db, "-q", "count"), "--",
                        *files], cwd=cli.tmp, env=cli.environ(), stdout=subprocess.DEVNULL, check=True, timeout=60)
        while not query(cli, "SELECT 1 FROM task WHERE input_name = 'gather' AND state = 'done'"):
            assert time.monotonic() < deadline + 20, (cli.tmp / "serve.log").read_text()
            time.sleep(0.1)
        time.sleep(0.5)  # nothing more comes of it
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(20) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        log.close()
    text = (cli.tmp / "serve.log").read_text()
    assert [(live, st, n) for _, live, st, n in gather_tasks(cli, "sizes")] == [(1, "done", 100)], text
    assert text.count("sizes: gathering") == 1 and "sizes: gathering 100 member(s)" in text
    assert final(cli) == {"done_count": "100\n", "done_max": "100\n"}


# -- crash safety ------------------------------------------------------------------------------------

CRASH = """
[[step]]
name = "gen"
start = true
script = 'for i in 1 2 3 4 5 6; do echo "item $i" > "$OUTPUT_DIR/work_$i"; done'

[[step]]
name = "work"
script = 'sleep 0.2; tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/part_${INPUT_NAME#work_}"'

[[step]]
name = "all"
gather = true
inputs = ["part"]
script = '''
echo "start $$" >> "$EVENTS"
sleep "${NAP:-0}"
cat "$INPUT_DIR"/* > "$OUTPUT_DIR/done_all"
echo "end $$" >> "$EVENTS"
'''
"""


def test_a_gather_task_survives_sigkill_of_its_runner_and_of_runs_at_random_moments(cli):
    log = cli.tmp / "events"
    log.touch()
    m = cli.manifest(CRASH)
    rng = random.Random(int(os.environ.get("CRASH_SEED", random.randrange(1 << 30))))

    def spawn(**env) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "task_pipeline", *cli.argv("run", m, "-db", cli.db,
                                                                                  "-parallel", "3", "-q")],
                                cwd=cli.tmp, env=cli.environ({"EVENTS": str(log), **env}),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    for _ in range(2):  # kills anywhere: start-up, upstream work, the gather's creation or its script
        p = spawn(NAP="2")  # (a gather script never finishes before the kill)
        time.sleep(rng.uniform(0.1, 1.5))
        p.kill()
        p.wait()
    # and one while the gather script runs, for certain
    seen = len(events(log))
    p = spawn(NAP="30")
    deadline = time.monotonic() + 30
    while not [e for e in events(log)[seen:] if e[0] == "start"]:
        assert time.monotonic() < deadline and p.poll() is None, "the gather script never started"
        time.sleep(0.02)
    orphan = int(next(e for e in events(log)[seen:] if e[0] == "start")[1])
    # runner and launcher killed together, so that the script outlives them both
    launcher = int(Path(f"/proc/{orphan}/stat").read_text().rsplit(")", 1)[1].split()[1])
    os.kill(launcher, signal.SIGKILL)
    p.kill()
    p.wait()
    os.kill(orphan, 0)  # the killed runner's gather script lives on, in its own process group
    r = cli.run(m, env={"EVENTS": str(log), "NAP": "0"})
    assert r.returncode == 0, r.err
    assert not alive(orphan), "the next run should have killed the orphaned gather script"
    assert final(cli) == {"done_all": "".join(f"ITEM {i}\n" for i in range(1, 7))}
    tasks = gather_tasks(cli, "all")
    assert [(live, st, n) for _, live, st, n in tasks if live] == [(1, "done", 6)]
    outcomes = [o for (o,) in query(cli, "SELECT outcome FROM attempt a JOIN task t ON t.id = a.task_id "
                                         "WHERE t.input_name = 'gather' ORDER BY a.id")]
    assert outcomes.count("ok") == 1 and "lost" in outcomes, outcomes
    assert query(cli, "SELECT count(*) FROM attempt WHERE outcome = 'ok' GROUP BY task_id HAVING count(*) > 1") == []
    assert_clean(cli)


# -- the example in manifests/ ------------------------------------------------------------------------


def test_the_word_count_example_counts_each_document_once_and_reports_on_all_of_them(cli):
    m = ROOT / "manifests" / "wordcount.toml"
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    assert final(cli)["done_report.txt"].startswith("documents: 5\nwords: 123\nmost frequent:\n     9 of\n")
    notes = cli.tmp / "my-notes.txt"
    notes.write_text("The quick brown fox jumps over the lazy dog, the end.\n")
    cli.ok("submit", "-db", cli.db, "count", notes)
    r = cli.ok("-manifest", m, "-db", cli.db, "-run")
    assert "report: gathering 6 member(s)" in r.err and "2 task(s) finished" in r.err  # the new count, the report
    assert final(cli)["done_report.txt"].startswith("documents: 6\nwords: 134\nmost frequent:\n    10 the\n")
    assert "every one byte-identical" in cli.ok("check", "report", "-db", cli.db).out


def test_why_shows_where_each_member_began_also_a_submitted_file(cli):
    m = cli.manifest("""
        [[step]]
        name = "count"
        script = 'wc -c < "$INPUT_FILE" > "$OUTPUT_DIR/report_$INPUT_NAME"'

        [[step]]
        name = "report"
        gather = true
        script = 'cat "$INPUT_DIR"/* > "$OUTPUT_DIR/done_total"'
        """)
    cli.ok("run", m, "-db", cli.db)
    for name, text in (("a.txt", "a\n"), ("b.txt", "bb\n")):
        (cli.tmp / name).write_text(text)
        cli.ok("submit", "count", cli.tmp / name, "-db", cli.db)
    cli.ok("run", m, "-db", cli.db)
    (total,) = [r for r in json.loads(cli.ok("export", "done", "-db", cli.db, "--json").out) if r["name"] == "done_total"]
    why = cli.ok("why", total["hash"], "-db", cli.db).out
    assert "2 member(s) gathered:" in why
    assert re.search(r"a\.txt \(submitted\) -> count v1 \(task \d+\) -> report_a\.txt [0-9a-f]{12}", why), why
    assert re.search(r"b\.txt \(submitted\) -> count v1 \(task \d+\) -> report_b\.txt [0-9a-f]{12}", why), why
