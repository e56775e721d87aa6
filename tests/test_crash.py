"""Crash safety and concurrency (issue 3): SIGKILL `run` at random moments, several runners on one
store, dead runners' scratch and orphaned scripts. Nothing lost, nothing committed twice, no task
running in two places at once."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

import backends
from conftest import CLI, ROOT

pytestmark = pytest.mark.backends

# Every script appends "start|end TASK_ID SHELL_PID TIME" to $STARTS_LOG (outside the store, O_APPEND),
# so that the test can see every execution, including those of killed runners.
START = 'echo "start $TASK_ID $$ $(date +%s.%N)" >> "$STARTS_LOG"'
END = 'echo "end $TASK_ID $$ $(date +%s.%N)" >> "$STARTS_LOG"'

PIPELINE = f"""
[[step]]
name = "gen"
start = true
script = '''
{START}
i=0; while [ $i -lt ${{ITEMS:-100}} ]; do echo "item $i" > "$OUTPUT_DIR/mid_$i"; i=$((i+1)); done
{END}
'''

[[step]]
name = "mid"
script = '''
{START}
sleep ${{NAP:-0}}
n=${{INPUT_NAME#mid_}}
{{ cat "$INPUT_FILE"; echo "through mid"; }} > "$OUTPUT_DIR/last_$n"
echo "side of $n" > "$OUTPUT_DIR/side_$n"
{END}
'''

[[step]]
name = "last"
script = '''
{START}
sleep ${{NAP:-0}}
tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done_${{INPUT_NAME#last_}}"
{END}
'''

[[step]]
name = "side"
script = '''
{START}
sleep ${{NAP:-0}}
wc -c < "$INPUT_FILE" > "$OUTPUT_DIR/done_side_${{INPUT_NAME#side_}}"
{END}
'''
"""


def env_for(log: Path, **extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "STARTS_LOG": str(log), **{k: str(v) for k, v in extra.items()}}


def spawn_run(cli: CLI, manifest: Path, env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "task_pipeline",
                             *cli.argv("-manifest", manifest, "-db", cli.db, "-run", "-q", *extra)],
                            cwd=cli.tmp, env={**env, **cli.env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def query(db: Path, sql: str, *args) -> list[tuple]:
    return backends.query(db, sql, *args)


def current_outputs(db: Path) -> set[tuple]:
    return set(query(db, """SELECT s.name, t.input_name, o.name, o.hash FROM output o
                           JOIN task t ON t.id = o.task_id JOIN step s ON s.id = t.step_id
                           JOIN step_current c ON c.step_id = t.step_id
                           WHERE t.live = 1 AND t.state = 'done'"""))


def executions(log: Path) -> dict[int, list[dict]]:
    """Per task: its executions in start order, each {pid, start, end or None}."""
    runs: dict[tuple[int, int], dict] = {}
    for line in log.read_text().splitlines():
        kind, task, pid, t = line.split()
        key = (int(task), int(pid))
        if kind == "start":
            runs[key] = {"pid": int(pid), "start": float(t), "end": None}
        else:
            runs[key]["end"] = float(t)
    out: dict[int, list[dict]] = defaultdict(list)
    for (task, _), r in runs.items():
        out[task].append(r)
    for rs in out.values():
        rs.sort(key=lambda r: r["start"])
    return out


def assert_never_twice_at_once(db: Path, log: Path) -> None:
    """No task runs in two places at once; every re-run follows a recorded failure, loss or interruption."""
    attempts = defaultdict(list)
    for task, outcome in query(db, "SELECT task_id, outcome FROM attempt ORDER BY id"):
        attempts[task].append(outcome)
    for task, runs in executions(log).items():
        for a, b in zip(runs, runs[1:]):
            assert a["end"] is None or a["end"] <= b["start"], f"task {task} ran twice at once: {runs}"
        # every execution ends as one attempt row: ok, failed, interrupted, or lost (its runner died)
        assert len(runs) <= len(attempts[task]), f"task {task}: {len(runs)} starts, attempts {attempts[task]}"
        assert attempts[task].count("ok") <= 1, f"task {task} committed twice: {attempts[task]}"
        unfinished = sum(1 for r in runs if r["end"] is None)
        assert unfinished <= attempts[task].count("lost") + attempts[task].count("interrupted"), (task, runs)


def scripts_still_running(db: Path) -> list[int]:
    needle = b"OUTPUT_DIR=" + os.fsencode(str(db))
    found = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if needle in Path(f"/proc/{p}/environ").read_bytes():
                    st = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
                    if st not in ("Z", "X"):
                        found.append(int(p))
            except OSError:
                pass
    return found


def assert_clean_store(cli: CLI) -> None:
    fsck = cli("-db", cli.db, "fsck", "--json")
    report = json.loads(fsck.out)
    assert fsck.returncode == 0 and report["problems"] == [], fsck.out + fsck.err
    assert not [w for w in report["warnings"] if "scratch" in w or "held by" in w], report["warnings"]
    assert sorted(os.listdir(cli.db / "tmp")) == [], "scratch left behind"
    assert query(cli.db, "SELECT count(*) FROM task WHERE state = 'running'") == [(0,)]


def reference_outputs(tmp_path: Path, manifest_text: str) -> set[tuple]:
    ref = CLI(tmp_path / "reference")
    ref.tmp.mkdir()
    m = ref.manifest(manifest_text)
    r = ref.run(m, "-parallel", "4", env={"STARTS_LOG": str(ref.tmp / "log")})
    assert r.returncode == 0, r.err
    out = current_outputs(ref.db)
    assert len(out) == 1 * 100 + 100 * 2 + 100 + 100
    return out


def crash_many_times(cli: CLI, tmp_path: Path, kills_wanted: int, seed: int, runners: int = 1) -> None:
    rng = random.Random(seed)
    m = cli.manifest(PIPELINE)
    log = tmp_path / "starts.log"
    log.touch()
    # Scripts sleep long enough that the kills, not the work, run out: about half the tasks are done
    # when the last kill lands (the sleep costs no test time: the kill phase lasts as long as its delays).
    env = env_for(log, NAP=0.3 * runners)
    kills = progressed = 0
    while kills < kills_wanted:
        before = log.stat().st_size
        procs = [spawn_run(cli, m, env, "-parallel", "4") for _ in range(runners)]
        # a random moment: sometimes in start-up (registration, recovery), mostly while scripts and commits
        # run; counted from the first script's start, since a loaded machine can take a second to get there
        if rng.random() < 0.3:
            deadline = time.monotonic() + rng.uniform(0.05, 0.6)
        else:
            started = time.monotonic() + 30
            while time.monotonic() < started and log.stat().st_size == before and all(p.poll() is None for p in procs):
                time.sleep(0.01)
            deadline = time.monotonic() + rng.uniform(0.0, 0.8)
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.01)
        victims = [p for p in procs if p.poll() is None]
        finished = [p for p in procs if p.poll() is not None]
        for p in finished:
            assert p.returncode == 0, p.stderr.read().decode()
        assert victims, f"the pipeline finished after only {kills} kills (seed {seed}); make it longer"
        for p in victims:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()
            p.stderr.close()
        kills += len(victims)
        progressed += log.stat().st_size > before
    assert progressed >= kills_wanted // (3 * runners), "too few kills landed while scripts were running"
    # then run to the end, undisturbed
    r = cli.run(m, "-parallel", "4", env={"STARTS_LOG": str(log), "NAP": "0"})
    assert r.returncode == 0, r.err
    assert scripts_still_running(cli.db) == []
    assert_never_twice_at_once(cli.db, log)


def check_against_reference(cli: CLI, tmp_path: Path) -> None:
    expected = reference_outputs(tmp_path, PIPELINE)
    assert current_outputs(cli.db) == expected
    # exactly one task per (step, input), each done once
    assert query(cli.db, "SELECT count(*), count(DISTINCT step_id || '/' || input_name) FROM task") == [(301, 301)]
    assert query(cli.db, "SELECT state, count(*) FROM task GROUP BY state") == [("done", 301)]
    assert query(cli.db, "SELECT count(*) FROM attempt WHERE outcome = 'ok'") == [(301,)]
    assert_clean_store(cli)
    # orphaned objects of killed attempts are harmless; gc removes them and the store stays sound
    cli.ok("-db", cli.db, "gc")
    report = json.loads(cli.ok("-db", cli.db, "fsck", "--json").out)
    assert report["problems"] == [] and report["unreferenced"]["objects"] == 0
    assert current_outputs(cli.db) == expected


def test_sigkill_run_20_times_then_finish(cli, tmp_path):
    seed = int(os.environ.get("CRASH_SEED", random.randrange(1 << 30)))
    print("seed", seed)
    crash_many_times(cli, tmp_path, kills_wanted=20, seed=seed)
    check_against_reference(cli, tmp_path)


@pytest.mark.slow
def test_sigkill_two_runners_60_times_then_finish(cli, tmp_path):
    seed = int(os.environ.get("CRASH_SEED", random.randrange(1 << 30)))
    print("seed", seed)
    crash_many_times(cli, tmp_path, kills_wanted=60, seed=seed, runners=2)
    check_against_reference(cli, tmp_path)


def test_runners_share_the_work_and_never_run_a_task_twice(cli, tmp_path):
    m = cli.manifest(PIPELINE)
    log = tmp_path / "starts.log"
    env = env_for(log, NAP=0.02, ITEMS=40)
    procs = [spawn_run(cli, m, env, "-parallel", "2") for _ in range(3)]
    for p in procs:
        assert p.wait(timeout=60) == 0, p.stderr.read().decode()
        p.stderr.close()
    runs = executions(log)
    assert len(runs) == 1 + 40 * 3
    assert all(len(r) == 1 and r[0]["end"] is not None for r in runs.values()), "a task started twice"
    assert_never_twice_at_once(cli.db, log)
    by_runner = query(cli.db, "SELECT runner, count(*) FROM attempt GROUP BY runner")
    assert len(by_runner) >= 2, f"one runner did everything: {by_runner}"
    assert query(cli.db, "SELECT count(*) FROM attempt WHERE outcome != 'ok'") == [(0,)]
    assert_clean_store(cli)


def test_a_killed_runners_tasks_are_taken_over_at_once(cli, tmp_path):
    """Three runners; one is SIGKILLed while its scripts run. The others kill its orphaned scripts,
    re-queue its tasks right away (same host, pid gone) rather than after the lease, and finish."""
    m = cli.manifest(PIPELINE)
    log = tmp_path / "starts.log"
    log.touch()
    env = env_for(log, NAP=0.3, ITEMS=12)
    procs = [spawn_run(cli, m, env, "-parallel", "2") for _ in range(3)]
    deadline = time.monotonic() + 30
    victim = None
    while victim is None and time.monotonic() < deadline:
        # wait until some runner has a mid/last/side script running, then kill that runner
        if len(log.read_text().splitlines()) < 3:  # the store exists and the gen task is done
            time.sleep(0.02)
            continue
        for r in query(cli.db, "SELECT lease_owner FROM task WHERE state='running' AND input_name != ''"):
            pid = int(r[0].rsplit(":", 2)[1])
            victim = next((p for p in procs if p.pid == pid), None)
            if victim:
                break
        time.sleep(0.02)
    assert victim is not None
    time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    t0 = time.monotonic()
    for p in procs:
        if p is not victim:
            assert p.wait(timeout=60) == 0, p.stderr.read().decode()
        p.stderr.close()
    # the survivors have about 3 s of work left; the heartbeat (every 10 s) must not be what finds the dead runner
    assert time.monotonic() - t0 < 8, "the dead runner's tasks waited for the heartbeat or their lease"
    assert query(cli.db, "SELECT count(*) FROM attempt WHERE outcome = 'lost'")[0][0] >= 1
    assert query(cli.db, "SELECT state, count(*) FROM task GROUP BY state") == [("done", 1 + 12 * 3)]
    assert scripts_still_running(cli.db) == []
    assert_never_twice_at_once(cli.db, log)
    assert_clean_store(cli)


def test_next_run_kills_orphaned_scripts_and_requeues_at_once(cli, tmp_path):
    pidfile = tmp_path / "pid"
    second = tmp_path / "second"
    m = cli.manifest(f"""
        [[step]]
        name = "slow"
        start = true
        script = '''
        if [ ! -e {pidfile} ]; then echo $$ > {pidfile}; sleep 60; fi
        echo "attempt $TASK_ATTEMPT" > {second}
        echo ok > "$OUTPUT_DIR/done"
        '''
        """)
    p = spawn_run(cli, m, env_for(tmp_path / "log"))
    deadline = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    orphan = int(pidfile.read_text())
    # The runner and its launcher die together (the OOM killer, a kill -9 of the service): the
    # launcher, which would otherwise kill the script as the runner goes, is gone first.
    os.kill(parent_of(orphan), signal.SIGKILL)
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stderr.close()
    os.kill(orphan, 0)  # the script outlived its runner: it is in its own process group
    assert os.listdir(cli.db / "tmp"), "the killed runner's scratch should still be there"
    t0 = time.monotonic()
    r = cli.run(m)
    assert r.returncode == 0, r.err
    assert time.monotonic() - t0 < 10
    with pytest.raises(ProcessLookupError):
        for _ in range(100):  # killed; may linger a moment as a zombie nobody reaps
            st = Path(f"/proc/{orphan}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if st in ("Z", "X"):
                raise ProcessLookupError
            time.sleep(0.01)
    assert second.read_text() == "attempt 1\n"  # a lost attempt does not count against retries
    logs = cli.ok("-db", cli.db, "logs", "1")
    assert "lost" in logs.out and "runner died" in logs.out
    assert_clean_store(cli)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_a_runner_killed_alone_takes_its_scripts_with_it(cli, tmp_path):
    """SIGKILL of the runner alone: its launcher sees it go and kills the running script at once,
    and the next run runs the task again, as its first attempt (a lost attempt does not count)."""
    pidfile = tmp_path / "pid"
    second = tmp_path / "second"
    m = cli.manifest(f"""
        [[step]]
        name = "slow"
        start = true
        script = '''
        if [ ! -e {pidfile} ]; then echo $$ > {pidfile}; sleep 60; fi
        echo "attempt $TASK_ATTEMPT" > {second}
        echo ok > "$OUTPUT_DIR/done"
        '''
        """)
    p = spawn_run(cli, m, env_for(tmp_path / "log"))
    deadline = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    script = int(pidfile.read_text())
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stderr.close()
    deadline = time.monotonic() + 5
    while not _gone(script):
        assert time.monotonic() < deadline, "the dead runner's script is still running"
        time.sleep(0.02)
    r = cli.run(m)
    assert r.returncode == 0, r.err
    assert second.read_text() == "attempt 1\n"
    assert_clean_store(cli)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_dead_processes_scratch_is_removed_by_the_next_run_and_by_gc(cli, tmp_path):
    m = cli.manifest("""
        [[step]]
        name = "one"
        start = true
        script = 'echo 1 > "$OUTPUT_DIR/done"'
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    tmp = cli.db / "tmp"

    def litter(pid: int, nonce: str) -> list[Path]:
        slot = tmp / f"task-slot1-{nonce}-{pid}"
        (slot / "out").mkdir(parents=True)
        (slot / "tmp" / "deep").mkdir(parents=True)
        (slot / "out" / "result").write_bytes(b"x" * 5000)
        (slot / "tmp" / "deep" / "f").write_bytes(b"y" * 3000)
        os.chmod(slot / "tmp" / "deep", 0o500)  # a script may leave read-only directories
        os.chmod(slot / "tmp", 0o500)
        loose = tmp / f"ingest-{pid}-{nonce}"
        loose.write_bytes(b"z" * 2000)
        return [slot, loose]

    dead, alive = _dead_pid(), os.getpid()
    gone = litter(dead, "aaaaaa")
    kept = litter(alive, "bbbbbb")
    (tmp / "not-ours").write_text("left alone")
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    assert not any(p.exists() for p in gone)
    assert all(p.exists() for p in kept)
    assert (tmp / "not-ours").exists()
    # gc does the same, and counts what it freed
    gone = litter(_dead_pid(), "cccccc")
    r = cli.ok("-db", cli.db, "gc", "--json")
    rep = json.loads(r.out)
    assert rep["scratch_removed"] == 2 and rep["scratch_bytes"] == 5000 + 3000 + 2000
    assert not any(p.exists() for p in gone) and all(p.exists() for p in kept)


def test_an_expired_lease_of_a_runner_elsewhere_is_taken_over(cli, tmp_path):
    """A runner on another host cannot be checked by pid: its tasks wait for the lease to expire."""
    m = cli.manifest("""
        [[step]]
        name = "gen"
        start = true
        script = 'for i in 1 2; do echo $i > "$OUTPUT_DIR/work_$i"; done'

        [[step]]
        name = "work"
        script = 'cat "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"'
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run", "-step", "gen")
    backends.execute(cli.db, """UPDATE task SET state='running', token=token+1,
                                lease_owner='elsewhere.example:4242:abcdef', lease_expires=?
                                WHERE input_name='work_1'""", time.time() + 2.5)
    t0 = time.monotonic()
    r = cli.run(m)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.err
    assert 2.0 < took < 7, took  # not before the lease expired, and not much after (not at the 10 s heartbeat)
    assert query(cli.db, "SELECT outcome FROM attempt a JOIN task t ON t.id=a.task_id WHERE t.input_name='work_1'") \
        == [("lost",), ("ok",)]
