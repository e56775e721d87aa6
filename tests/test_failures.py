"""Failure semantics (issue 3): failed attempts commit nothing, keep their logs, retry with backoff,
stay failed until `retry`; timeouts kill the whole process group; `run` ends with a table and exit 1."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

import backends
from task_pipeline.executor import KILL_GRACE

pytestmark = pytest.mark.backends


def db_rows(db: Path, sql: str, *args) -> list[tuple]:
    return backends.query(db, sql, *args)


def gone(pid: int) -> bool:
    """True if the process has exited (a zombie nobody reaps counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def five_items(script: str, **extra: str) -> str:
    keys = "".join(f"{k} = {v}\n" for k, v in extra.items())
    return f"""
        [[step]]
        name = "gen"
        start = true
        script = 'for i in 1 2 3 4 5; do echo "$i" > "$OUTPUT_DIR/work_$i"; done'

        [[step]]
        name = "work"
        {keys}
        script = '''
        {script}
        '''

        [[step]]
        name = "final"
        script = 'cat "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"'
        """


def test_failure_commits_nothing_others_carry_on_and_run_reports_a_table(cli):
    m = cli.manifest(five_items("""
        echo "partial" > "$OUTPUT_DIR/final_$INPUT_NAME"
        if [ "$(cat "$INPUT_FILE")" = 3 ]; then echo "noise"; echo "first line" >&2; echo "bad item three" >&2; exit 7; fi
        echo ok
        """))
    r = cli.run(m, "-parallel", "2")
    assert r.returncode == 1, r.err
    # the table: step, input name, exit code, last stderr line
    table = r.err[r.err.index("Failed tasks"):]
    row = [ln for ln in table.splitlines() if "work_3" in ln]
    assert row and re.search(r"\bwork\b.*\bwork_3\b.*\b7\b.*bad item three", row[0]), table
    assert "first line" not in table
    # the other four went all the way through; the failed one's output was never committed
    assert sorted(n for (n,) in db_rows(cli.db, "SELECT input_name FROM task t JOIN step s ON s.id=t.step_id "
                                                "WHERE s.name='final' AND state='done'")) == [
        "final_work_1", "final_work_2", "final_work_4", "final_work_5"]
    t = db_rows(cli.db, "SELECT t.id, t.state, t.exit_code FROM task t JOIN step s ON s.id=t.step_id "
                        "WHERE s.name='work' AND input_name='work_3'")
    assert [x[1:] for x in t] == [("failed", 7)]
    assert db_rows(cli.db, "SELECT count(*) FROM output WHERE task_id=?", t[0][0]) == [(0,)]
    assert cli.ok("-db", cli.db, "export", "final").out.count("\n") == 4
    # its stdout and stderr were kept
    logs = cli.ok("-db", cli.db, "logs", str(t[0][0]))
    assert "noise" in logs.out and "bad item three" in logs.out and "exit 7" in logs.out
    # a failed task stays failed: a second run does not re-run it, and still says so
    again = cli.run(m)
    assert again.returncode == 1
    assert "work_3" in again.err and db_rows(cli.db, "SELECT count(*) FROM attempt WHERE task_id=?", t[0][0]) == [(1,)]


def test_a_signal_is_a_failure(cli):
    m = cli.manifest(five_items("""
        if [ "$INPUT_NAME" = work_2 ]; then echo "about to die" >&2; kill -KILL $$; fi
        cp "$INPUT_FILE" "$OUTPUT_DIR/final_$INPUT_NAME"
        """))
    r = cli.run(m)
    assert r.returncode == 1
    assert "killed by signal SIGKILL" in r.err
    assert "about to die" in r.err
    assert db_rows(cli.db, "SELECT state, count(*) FROM task GROUP BY state ORDER BY state") == [("done", 9), ("failed", 1)]


def test_timeout_kills_the_whole_process_group(cli, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    m = cli.manifest(f"""
        [[step]]
        name = "stubborn"
        start = true
        timeout = 1
        script = '''
        trap '' TERM                      # the shell and everything it starts ignore SIGTERM
        sleep 60 & echo $! > {pids}/background
        (trap '' TERM; sleep 60) & echo $! > {pids}/subshell
        echo $$ > {pids}/shell
        echo "waiting" >&2
        sleep 60
        '''
        """)
    t0 = time.monotonic()
    r = cli.run(m)
    took = time.monotonic() - t0
    assert r.returncode == 1, r.err
    assert "timed out after 1s" in r.err
    # SIGTERM at 1 s is ignored; SIGKILL follows KILL_GRACE later, and nothing waits for the 60 s sleeps
    assert 1 + KILL_GRACE - 0.5 < took < 1 + KILL_GRACE + 6, took
    for name in ("background", "subshell", "shell"):
        pid = int((pids / name).read_text())
        assert gone(pid), f"{name} (pid {pid}) survived the timeout"
    logs = cli.ok("-db", cli.db, "logs", "1")
    m_ = re.search(r"attempt 1: failed, exit (-?\d+), ([\d.]+)s: timed out after 1s", logs.out)
    assert m_, logs.out
    assert float(m_.group(2)) >= 1 + KILL_GRACE - 0.5
    assert "waiting" in logs.out


def test_background_children_do_not_outlive_a_successful_attempt(cli, tmp_path):
    pidfile = tmp_path / "bg.pid"
    m = cli.manifest(f"""
        [[step]]
        name = "leaky"
        start = true
        script = '''
        (sleep 60; echo late > "$OUTPUT_DIR/late") & echo $! > {pidfile}
        echo hi > "$OUTPUT_DIR/done"
        '''
        """)
    t0 = time.monotonic()
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    assert time.monotonic() - t0 < 10
    assert gone(int(pidfile.read_text()))
    assert db_rows(cli.db, "SELECT name FROM output") == [("done",)]


def test_retries_back_off_exponentially_then_fail_until_retry(cli, tmp_path):
    starts = tmp_path / "starts.log"
    fixed = tmp_path / "fixed"
    m = cli.manifest(f"""
        [[step]]
        name = "flaky"
        start = true
        retries = 2
        retry_delay = 0.4
        script = '''
        echo "$TASK_ATTEMPT $(date +%s.%N)" >> {starts}
        if [ ! -e {fixed} ]; then
          i=0; while [ $i -lt 3000 ]; do echo "line $i of a long complaint"; i=$((i+1)); done >&2
          echo "attempt $TASK_ATTEMPT: still broken" >&2
          exit 3
        fi
        echo fine > "$OUTPUT_DIR/done"
        '''
        """)
    r = cli.run(m)
    assert r.returncode == 1
    assert "attempt 1 failed" in r.err and "attempt 2 failed" in r.err and "retrying" in r.err
    lines = [ln.split() for ln in starts.read_text().splitlines()]
    assert [a for a, _ in lines] == ["1", "2", "3"]
    t = [float(x) for _, x in lines]
    # doubling: the second wait is at least twice the base delay (a lower bound only: a loaded machine
    # adds to either wait, so their ratio says little)
    assert t[1] - t[0] >= 0.4 - 0.05 and t[2] - t[1] >= 0.8 - 0.05, t
    # logs: every attempt, with exit code, duration and the *tail* of a long stderr
    logs = cli.ok("-db", cli.db, "logs", "1")
    for n in (1, 2, 3):
        assert re.search(rf"attempt {n}: failed, exit 3, [\d.]+s", logs.out), logs.out
        assert f"attempt {n}: still broken" in logs.out, logs.out[-2000:]
    info = json.loads(cli.ok("-db", cli.db, "logs", "1", "--json").out)
    assert [a["outcome"] for a in info["attempts"]] == ["failed"] * 3
    # failed for good: a later run leaves it alone
    assert cli.run(m).returncode == 1
    assert len(starts.read_text().splitlines()) == 3
    # until `retry` re-queues it
    fixed.touch()
    cli.ok("-db", cli.db, "retry", "flaky")
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    assert len(starts.read_text().splitlines()) == 4
    assert db_rows(cli.db, "SELECT state FROM task") == [("done",)]


def test_fail_fast_stops_claiming_new_work(cli, tmp_path):
    starts = tmp_path / "starts.log"
    first = tmp_path / "first"
    # the first task to start fails
    script = f'echo "$INPUT_NAME" >> {starts}; sleep 0.1; if mkdir {first} 2>/dev/null; then exit 1; fi'
    gen = """
        [[step]]
        name = "gen"
        start = true
        script = 'for i in 1 2 3 4 5 6 7 8 9; do echo $i > "$OUTPUT_DIR/work_$i"; done'
        """
    m = cli.manifest(gen + f"""
        [[step]]
        name = "work"
        script = '{script}'
        """)
    r = cli.run(m, "-parallel", "1", "--fail-fast")
    assert r.returncode == 1
    ran = starts.read_text().split()
    assert 1 <= len(ran) <= 3, ran
    bad = ran[0]
    counts = dict(db_rows(cli.db, "SELECT state, count(*) FROM task t JOIN step s ON s.id=t.step_id "
                                  "WHERE s.name='work' GROUP BY state"))
    assert counts["failed"] == 1 and counts["pending"] >= 6, counts
    # without --fail-fast the rest runs (the failed one stays failed)
    r = cli.run(m, "-parallel", "1")
    assert r.returncode == 1
    assert sorted(set(starts.read_text().split())) == [f"work_{i}" for i in range(1, 10)]
    assert starts.read_text().split().count(bad) == 1


def test_relative_db_with_the_manifest_elsewhere(cli):
    """Regression: OUTPUT_DIR was relative to the caller's cwd while the script ran in the workdir."""
    sub = cli.tmp / "pipelines"
    sub.mkdir()
    m = cli.manifest("""
        [[step]]
        name = "gen"
        start = true
        script = 'cat "$INPUT_FILE" > "$OUTPUT_DIR/done"; echo x > "$TMPDIR/x"; pwd > "$OUTPUT_DIR/done_where"'
        """, name="pipelines/p.toml")
    r = cli("-manifest", m, "-db", "rel-db", "-run")
    assert r.returncode == 0, r.err
    assert (cli.tmp / "rel-db" / "objects").is_dir()
