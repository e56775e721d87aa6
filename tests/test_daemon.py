"""The daemon (`serve`) and `submit`, tested as a user runs them: a real `serve` process,
fed and inspected only through the CLI and the store, stopped with real signals."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CLI


pytestmark = pytest.mark.backends


class Serve:
    """A running `task-pipeline serve`; its stderr goes to a file we can read while it runs."""

    def __init__(self, cli: CLI, manifest: Path, *extra: str, name: str = "serve") -> None:
        self.cli = cli
        self.log_path = cli.tmp / f"{name}.log"
        env = cli.environ()
        env.pop("TASK_PIPELINE_DB", None)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "task_pipeline", *cli.argv("serve", "-manifest", manifest, "-db", cli.db, *extra)],
            cwd=cli.tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log)
        self.wait_log("serving")

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, pattern: str, timeout: float = 10, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log
            if len(re.findall(pattern, text)) >= count:
                return text
            assert self.proc.poll() is None, f"serve exited {self.proc.returncode}:\n{text}"
            time.sleep(0.02)
        raise AssertionError(f"no {count}x /{pattern}/ in the daemon's log after {timeout}s:\n{self.log}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        finally:
            self._log.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def serve(cli):
    started: list[Serve] = []

    def start(manifest: Path, *extra: str, name: str = "serve") -> Serve:
        s = Serve(cli, manifest, *extra, name=name)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


def wait_until(pred, timeout: float = 10, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s")


def status(cli: CLI) -> dict:
    r = cli.ok("status", "-db", cli.db, "--json")
    data = json.loads(r.out)
    data["by_step"] = {s["step"]: s for s in data["steps"]}
    return data


def object_path(cli: CLI, data: bytes) -> Path:
    h = hashlib.sha256(data).hexdigest()
    return cli.db / "objects" / h[:2] / h[2:4] / h[4:]


UPPER = """
[[step]]
name = "up"
script = 'tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done.txt"'
"""


def register(cli: CLI, text: str) -> Path:
    m = cli.manifest(text)
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    return m


# -- serve ------------------------------------------------------------------------------


def test_idle_daemon_picks_up_a_submitted_input_within_a_second_and_exits_0_on_sigterm(cli, serve):
    m = cli.manifest(UPPER)
    d = serve(m)
    time.sleep(1.2)  # let it settle into waiting
    (cli.tmp / "a.txt").write_bytes(b"hello daemon\n")
    want = object_path(cli, b"HELLO DAEMON\n")
    r = cli.ok("submit", "-db", cli.db, "up", "a.txt")
    t0 = time.monotonic()
    assert "a.txt: queued for up" in r.out
    wait_until(want.exists, timeout=5, step=0.005)
    latency = time.monotonic() - t0
    print(f"pick-up latency {latency:.3f}s")
    assert latency < 1.0, f"picked up after {latency:.2f}s"
    wait_until(lambda: status(cli)["by_step"]["up"]["done"] == 1, timeout=5)
    assert d.stop(signal.SIGTERM) == 0
    assert "stopped" in d.log and "Traceback" not in d.log
    for line in d.log.splitlines():
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING|ERROR|DEBUG)\s", line), line


SLOW = """
[[step]]
name = "slow"
script = '''
echo "start $INPUT_NAME" >> {log}
if [ -e {flag} ]; then sleep 30; else sleep 0.2; fi
echo "end $INPUT_NAME" >> {log}
cp "$INPUT_FILE" "$OUTPUT_DIR/done_$INPUT_NAME"
'''
"""


def test_drain_kills_after_grace_requeues_and_a_restart_finishes_each_input_exactly_once(cli, serve):
    log, flag = cli.tmp / "starts.log", cli.tmp / "slow.flag"
    flag.touch()
    m = cli.manifest(SLOW.format(log=log, flag=flag))
    d = serve(m, "-parallel", "2", "--grace", "0.5")
    names = [f"in{i}.txt" for i in range(4)]
    for n in names:
        (cli.tmp / n).write_text(n)
    cli.ok("submit", "-db", cli.db, "slow", *names)
    wait_until(lambda: log.exists() and log.read_text().count("start") == 2)
    t0 = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 5, "the grace period was not applied"
    assert "grace period over" in d.log
    first = log.read_text()
    assert first.count("start") == 2 and "end" not in first
    st = status(cli)["by_step"]["slow"]
    assert (st["pending"], st["running"], st["done"]) == (4, 0, 0), st

    flag.unlink()
    d2 = serve(m, "-parallel", "2", name="serve2")
    wait_until(lambda: status(cli)["by_step"]["slow"]["done"] == 4, timeout=10)
    assert d2.stop(signal.SIGINT) == 0
    text = log.read_text()
    for n in names:
        assert text.count(f"end {n}\n") == 1, text          # committed exactly once
    interrupted = [n for n in names if f"start {n}\n" in first]
    for n in names:
        assert text.count(f"start {n}\n") == (2 if n in interrupted else 1), text
    st = status(cli)["by_step"]["slow"]
    assert (st["pending"], st["running"], st["done"], st["failed"]) == (0, 0, 4, 0)
    exported = cli.ok("export", "-db", cli.db, "slow", "--json")
    assert sorted(r["name"] for r in json.loads(exported.out)) == names


def test_drain_lets_a_running_script_finish_within_the_grace_period(cli, serve):
    log = cli.tmp / "starts.log"
    m = cli.manifest(f"""
        [[step]]
        name = "slow"
        script = 'echo start >> {log}; sleep 1; echo end >> {log}; cp "$INPUT_FILE" "$OUTPUT_DIR/done.txt"'
        """)
    d = serve(m, "--grace", "10")
    (cli.tmp / "x.txt").write_text("x")
    cli.ok("submit", "-db", cli.db, "slow", "x.txt")
    wait_until(lambda: log.exists() and "start" in log.read_text())
    assert d.stop(signal.SIGTERM) == 0
    assert log.read_text() == "start\nend\n"
    st = status(cli)["by_step"]["slow"]
    assert (st["done"], st["pending"]) == (1, 0)
    assert "grace period over" not in d.log


def _set_script(m: Path, old: str, new: str, *, keep_stat: bool = False) -> None:
    st = m.stat()
    text = m.read_text()
    assert old in text and len(old) == len(new)
    m.write_text(text.replace(old, new))
    if keep_stat:  # an edit the mtime/size poller cannot see: only SIGHUP finds it
        os.utime(m, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_sighup_reloads_the_manifest(cli, serve):
    m = cli.manifest(UPPER)
    d = serve(m)
    assert status(cli)["by_step"]["up"]["version"] == 1
    _set_script(m, "tr a-z A-Z", "tr A-Z a-z", keep_stat=True)
    time.sleep(1.3)
    assert status(cli)["by_step"]["up"]["version"] == 1, "reloaded without SIGHUP: the test cannot tell them apart"
    d.proc.send_signal(signal.SIGHUP)
    d.wait_log("manifest reloaded \\(SIGHUP\\)")
    assert status(cli)["by_step"]["up"]["version"] == 2
    (cli.tmp / "a.txt").write_bytes(b"MiXed\n")
    cli.ok("submit", "-db", cli.db, "up", "a.txt")
    wait_until(object_path(cli, b"mixed\n").exists, timeout=5)
    assert d.stop() == 0


def test_an_edited_manifest_file_is_reloaded_and_a_broken_edit_keeps_the_old_one(cli, serve):
    m = cli.manifest(UPPER)
    d = serve(m)
    good = m.read_text()
    m.write_text(good + "\n[[step]]\nnmae = 'oops'\n")
    d.wait_log("ERROR", timeout=5)
    time.sleep(1.5)  # the broken file is reported once, not at every poll
    errors = [ln for ln in d.log.splitlines() if "ERROR" in ln]
    assert len(errors) == 1 and "nmae" in errors[0] and "previous" in errors[0], errors
    assert d.proc.poll() is None
    (cli.tmp / "a.txt").write_bytes(b"old\n")
    cli.ok("submit", "-db", cli.db, "up", "a.txt")
    wait_until(object_path(cli, b"OLD\n").exists, timeout=5)   # the old script still runs

    m.write_text(good.replace("tr a-z A-Z", "rev        "))
    d.wait_log("manifest reloaded \\(file changed\\)", timeout=5)
    assert status(cli)["by_step"]["up"]["version"] == 2
    (cli.tmp / "b.txt").write_bytes(b"abc\n")
    cli.ok("submit", "-db", cli.db, "up", "b.txt")
    wait_until(object_path(cli, b"cba\n").exists, timeout=5)
    assert d.stop() == 0


def test_schedule_ticks_under_time_named_runsets_and_identical_outputs_run_downstream_once(cli, serve):
    ticks, downs = cli.tmp / "ticks.log", cli.tmp / "down.log"
    m = cli.manifest(f"""
        [[step]]
        name = "tick"
        start = true
        schedule = "1s"
        script = 'echo "$RUNSET" >> {ticks}; echo same > "$OUTPUT_DIR/down_item.txt"'

        [[step]]
        name = "down"
        script = 'echo ran >> {downs}; cp "$INPUT_FILE" "$OUTPUT_DIR/done.txt"'
        """)
    d = serve(m)
    wait_until(lambda: ticks.exists() and len(ticks.read_text().split()) >= 2, timeout=5)
    assert d.stop(signal.SIGINT) == 0
    runsets = ticks.read_text().split()
    assert len(set(runsets)) == len(runsets) >= 2
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r) for r in runsets), runsets
    assert downs.read_text() == "ran\n"
    st = status(cli)["by_step"]
    assert st["tick"]["done"] == len(runsets) and st["down"]["done"] == 1


def test_log_format_json_gives_one_json_object_per_line(cli, serve):
    m = cli.manifest(UPPER)
    d = serve(m, "--log-format", "json")
    (cli.tmp / "a.txt").write_text("a")
    cli.ok("submit", "-db", cli.db, "up", "a.txt")
    d.wait_log("done in")
    assert d.stop() == 0
    lines = d.log.splitlines()
    assert len(lines) >= 3
    records = [json.loads(ln) for ln in lines]
    assert all({"ts", "level", "msg"} <= set(r) for r in records)
    assert any("a.txt done" in r["msg"] for r in records)


def test_operator_commands_work_against_a_running_daemon(cli, serve):
    flag, runs = cli.tmp / "fail.flag", cli.tmp / "runs.log"
    flag.touch()
    m = cli.manifest(f"""
        [[step]]
        name = "first"
        script = 'cp "$INPUT_FILE" "$OUTPUT_DIR/second_x.txt"'

        [[step]]
        name = "second"
        script = '''
        echo run >> {runs}
        if [ -e {flag} ]; then echo "flag is set" >&2; exit 3; fi
        tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done.txt"
        '''
        """)
    d = serve(m)
    (cli.tmp / "a.txt").write_bytes(b"abc\n")
    cli.ok("submit", "-db", cli.db, "first", "a.txt")
    wait_until(lambda: status(cli)["by_step"]["second"]["failed"] == 1, timeout=5)
    st = status(cli)
    assert st["totals"]["failed"] == 1 and st["totals"]["done"] == 1
    failure = st["last_failures"][0]
    assert failure["step"] == "second" and failure["exit"] == 3
    text = cli.ok("status", "-db", cli.db).out
    assert "second" in text and "exit code 3" in text

    logs = cli.ok("logs", "-db", cli.db, str(failure["task"]))
    assert "flag is set" in logs.out and "exit 3" in logs.out

    flag.unlink()
    assert "re-queued 1" in cli.ok("retry", "-db", cli.db, "second").err
    want = object_path(cli, b"ABC\n")
    wait_until(want.exists, timeout=5)
    wait_until(lambda: status(cli)["by_step"]["second"]["done"] == 1, timeout=5)

    why = cli.ok("why", "-db", cli.db, "--json", want.parent.parent.name + want.parent.name + want.name)
    (chain,) = json.loads(why.out)  # one chain per producing task
    assert [hop["step"] for hop in chain] == ["(submitted)", "first", "second"]

    assert "1 task(s) will run again" in cli.ok("invalidate", "-db", cli.db, "second").err
    wait_until(lambda: runs.read_text().count("run") == 3, timeout=5)
    wait_until(lambda: status(cli)["by_step"]["second"]["done"] == 1, timeout=5)
    assert d.stop() == 0


# -- submit -------------------------------------------------------------------------------


def test_submit_routes_reads_stdin_and_reports_known_inputs(cli):
    register(cli, """
        [[step]]
        name = "alpha"
        script = 'cp "$INPUT_FILE" "$OUTPUT_DIR/done.txt"'

        [[step]]
        name = "beta"
        inputs = ["alpha", "b*.csv"]
        script = 'cp "$INPUT_FILE" "$OUTPUT_DIR/done.txt"'
        """)
    (cli.tmp / "alpha_1.txt").write_text("one")
    (cli.tmp / "b.csv").write_text("two")
    r = cli.ok("submit", "-db", cli.db, "--route", "alpha_1.txt", "b.csv")
    assert "alpha_1.txt: queued for alpha, beta" in r.out
    assert "b.csv: queued for beta" in r.out
    r = cli.ok("submit", "-db", cli.db, "--route", "alpha_1.txt")
    assert "already known" in r.out
    r = cli.ok("submit", "-db", cli.db, "alpha", "-", input=b"from stdin")
    assert r.out.startswith("stdin: queued for alpha")
    r = cli.ok("submit", "-db", cli.db, "alpha", "-", "--json", input=b"from stdin")
    (row,) = json.loads(r.out)
    assert row["name"] == "stdin" and row["new_tasks"] == [] and row["hash"] == hashlib.sha256(b"from stdin").hexdigest()
    cli.ok("-db", cli.db, "-manifest", cli.tmp / "pipeline.toml", "-run")
    names = sorted(x["name"] for x in json.loads(cli.ok("export", "-db", cli.db, "alpha", "--json").out))
    assert names == ["alpha_1.txt", "stdin"]


SUBMIT_ERRORS = [
    (["alpha", "missing.txt"], "missing.txt: no such file"),
    (["nosuch", "in.txt"], "no step named 'nosuch'"),
    (["--route", "zeta_1.txt"], "route key 'zeta' is consumed by no step"),
    (["--route", "-"], "name the step"),
    (["in.txt"], "name the step, or pass --route"),
    (["alpha", "."], ".: not a regular file"),
    (["alpha", "-", "-"], "only once"),
]


def test_submit_errors_are_one_line_and_exit_2(cli):
    register(cli, """
        [[step]]
        name = "alpha"
        script = 'true'
        """)
    (cli.tmp / "in.txt").write_text("x")
    (cli.tmp / "zeta_1.txt").write_text("x")
    for args, message in SUBMIT_ERRORS:
        r = cli("submit", "-db", cli.db, *args)
        assert r.returncode == 2, (args, r.err)
        assert message in r.err and len(r.err.strip().splitlines()) == 1, (args, r.err)
    assert status(cli)["totals"]["pending"] == 0


def test_submit_without_a_store_is_a_store_error(cli):
    (cli.tmp / "in.txt").write_text("x")
    r = cli("submit", "-db", cli.tmp / "nowhere", "alpha", "in.txt")
    assert r.returncode == 3
    assert "no store here" in r.err and len(r.err.strip().splitlines()) == 1
