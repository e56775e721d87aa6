"""Trust: every flag does what it says, every exit code tells the truth.

Each test drives the real CLI against a real store in tmp_path (through conftest's `cli`),
except the worker-death test, which patches the engine inside a `task-pipeline` process of
its own. Tests marked xfail(strict=True) show behaviour the issue asks for that the code
does not have yet; their reason says what happens instead.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import backends
from conftest import ROOT, CLI, run_cli

QUICKSTART = ROOT / "manifests" / "quickstart.toml"
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")   # UTC ISO 8601 with milliseconds
PLAIN_LOG = re.compile(r"^(\S+) (DEBUG|INFO|WARNING|ERROR)\s")   # a plain log line: timestamp, level


# -- helpers --------------------------------------------------------------------------------------


def status(cli: CLI, db: Path | None = None) -> dict:
    return json.loads(cli.ok("status", "-db", db or cli.db, "--json").out)


def try_status(cli: CLI) -> dict:
    """status --json, or {} while the store is not there yet."""
    r = cli("status", "-db", cli.db, "--json")
    return json.loads(r.out) if r.returncode == 0 else {}


def steps(cli: CLI, db: Path | None = None) -> dict[str, dict]:
    return {s["step"]: s for s in status(cli, db)["steps"]}


def dump(db: Path) -> list[str]:
    """Every row of the store's database, as SQL: what 'nothing changed' is compared on."""
    conn = sqlite3.connect(f"file:{db / 'db'}?mode=ro", uri=True)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def env() -> dict:
    e = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    e.pop("TASK_PIPELINE_DB", None)
    return e


def popen(cli: CLI, *args, stderr_to: Path) -> subprocess.Popen:
    """A `task-pipeline` process in the background, its stderr in a file."""
    f = open(stderr_to, "wb")
    try:
        return subprocess.Popen([sys.executable, "-m", "task_pipeline", *map(str, args)], cwd=cli.tmp, env=env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=f)
    finally:
        f.close()


def wait_for(pred, timeout: float = 15, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def one_line_error(r) -> str:
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{r.err}"
    assert "Traceback" not in r.err
    return lines[0]


def log_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if PLAIN_LOG.match(ln)]


TWO_ITEMS = """
    [[step]]
    name = "fetch"
    start = true
    script = '''
    touch "$MARKS/fetch"
    for i in 1 2; do echo "item $i" > "$OUTPUT_DIR/process_$i.txt"; done
    '''
    env = {{ MARKS = "{marks}" }}

    [[step]]
    name = "process"
    script = 'touch "$MARKS/process-$INPUT_NAME"; tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"'
    env = {{ MARKS = "{marks}" }}
    """


def two_items(cli: CLI) -> tuple[Path, Path]:
    """A two-step pipeline whose scripts leave a marker file per run in MARKS."""
    marks = cli.tmp / "marks"
    marks.mkdir(exist_ok=True)
    return cli.manifest(TWO_ITEMS.format(marks=marks)), marks


ONE_OK_ONE_FAILING = """
    [[step]]
    name = "good"
    start = true
    script = 'echo ok > "$OUTPUT_DIR/done_good.txt"'

    [[step]]
    name = "bad"
    start = true
    retries = 1
    retry_delay = 0.01
    script = 'echo "fatal: nope" >&2; exit 1'
    """


# -- 1. an option a command does not implement is a usage error ------------------------------------


UNIMPLEMENTED = [
    (["submit", "process", "extra_1.txt", "--dry-run"], "--dry-run", "submit"),
    (["status", "--force"], "--force", "status"),
    (["status", "--route"], "--route", "status"),
    (["status", "--format", "dot"], "--format", "status"),
    (["cat", "--dry-run", "{hash}"], "--dry-run", "cat"),
]


def test_an_option_the_command_does_not_implement_is_a_usage_error_and_changes_nothing(cli):
    m, _ = two_items(cli)
    cli.run(m)
    (cli.tmp / "extra_1.txt").write_text("extra\n")
    h = json.loads(cli.ok("-db", cli.db, "export", "process", "--json").out)[0]["hash"]
    before = dump(cli.db)
    for args, option, command in UNIMPLEMENTED:
        r = cli(*[a.format(hash=h) for a in args], "-db", cli.db)
        assert r.returncode == 2, f"{args}: exit {r.returncode}\n{r.out}{r.err}"
        line = one_line_error(r)
        assert option in line and f"'{command}'" in line, (args, line)
        assert r.out == "", (args, r.out)
    assert dump(cli.db) == before


def _plant_unreferenced_object(cli: CLI, content: bytes = b"nobody refers to me\n") -> Path:
    import hashlib

    h = hashlib.sha256(content).hexdigest()
    p = cli.db / "objects" / h[:2] / h[2:4] / h[4:]
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content)
    p.chmod(0o444)
    return p


def _old_enough(p: Path) -> None:
    """gc keeps objects changed less than a second (GC_SLACK) before it started."""
    time.sleep(max(0.0, p.stat().st_ctime + 1.2 - time.time()))


def test_gc_dry_run_removes_nothing_and_says_what_it_would_free(cli):
    m, _ = two_items(cli)
    cli.run(m)
    orphan = _plant_unreferenced_object(cli)
    _old_enough(orphan)
    before = dump(cli.db)
    r = cli.ok("gc", "-db", cli.db, "--dry-run")
    assert orphan.exists(), "gc --dry-run deleted an object"
    assert re.search(r"would free \d+ bytes[^;]*: 1 unreferenced object", r.out + r.err), r.out + r.err
    j = json.loads(cli.ok("gc", "-db", cli.db, "--dry-run", "--json").out)
    assert j["dry_run"] is True and j["objects_removed"] == 1 and j["bytes_freed"] >= orphan.stat().st_size, j
    assert orphan.exists() and dump(cli.db) == before
    # the object was collectable: a real gc removes it
    cli.ok("gc", "-db", cli.db)
    assert not orphan.exists()


def test_invalidate_dry_run_requeues_nothing(cli):
    m, _ = two_items(cli)
    cli.run(m)
    before = dump(cli.db)
    r = cli.ok("invalidate", "process", "-db", cli.db, "--dry-run")
    assert "would" in r.err and "2 task(s)" in r.err, r.err
    j = json.loads(cli.ok("invalidate", "process", "-db", cli.db, "--dry-run", "--json").out)
    assert j == {"dry_run": True, "step": "process", "tasks": 2}
    assert dump(cli.db) == before and steps(cli)["process"]["pending"] == 0
    cli.ok("invalidate", "process", "-db", cli.db)
    assert steps(cli)["process"]["pending"] == 2


def test_retry_dry_run_requeues_nothing(cli):
    m = cli.manifest(ONE_OK_ONE_FAILING)
    assert cli.run(m).returncode == 1
    before = dump(cli.db)
    r = cli.ok("retry", "-db", cli.db, "--dry-run")
    assert "would re-queue 1 failed task(s)" in r.err, r.err
    j = json.loads(cli.ok("retry", "-db", cli.db, "--dry-run", "--json").out)
    assert j["dry_run"] is True and j["tasks"] == 1
    assert dump(cli.db) == before and steps(cli)["bad"]["failed"] == 1
    cli.ok("retry", "-db", cli.db)
    assert steps(cli)["bad"]["pending"] == 1


def test_run_dry_run_on_a_new_store_creates_nothing(cli):
    m, marks = two_items(cli)
    for args in (["run", m, "-db", cli.db, "--dry-run"], ["-manifest", m, "-db", cli.db, "-run", "--dry-run"]):
        r = cli.ok(*args)
        assert re.search(r"fetch\s+1\s+(1 )?start\b", r.out), r.out
        assert not cli.db.exists(), f"{args} created the store"
        assert not any(marks.iterdir()), f"{args} ran a script"


def test_run_dry_run_changes_nothing_and_says_why_each_step_would_run(cli):
    m, marks = two_items(cli)
    cli.run(m)
    for p in marks.iterdir():
        p.unlink()
    (cli.tmp / "process_9.txt").write_text("nine\n")
    cli.ok("submit", "-db", cli.db, "process", cli.tmp / "process_9.txt")   # a new input
    cli.ok("invalidate", "-db", cli.db, "fetch")                           # a re-run
    before, before_status = dump(cli.db), status(cli)
    for args in (["run", m, "-db", cli.db, "--dry-run"], ["-manifest", m, "-db", cli.db, "-run", "--dry-run"],
                 ["run", m, "-db", cli.db, "-n", "-runset", "again"]):
        r = cli.ok(*args)
        assert not any(marks.iterdir()), f"{args} ran a script: {sorted(p.name for p in marks.iterdir())}"
        assert dump(cli.db) == before, f"{args} changed the database"
        assert status(cli)["steps"] == before_status["steps"]
        assert re.search(r"process\s+1\s+1 new input", r.out), r.out
        if "again" in args:   # a new runset seeds the start step again
            assert re.search(r"fetch\s+2\s+1 start, 1 re-run", r.out), r.out
        else:
            assert re.search(r"fetch\s+1\s+1 re-run", r.out), r.out


def test_run_dry_run_names_a_retry_waiting_for_its_backoff(cli):
    m = cli.manifest("""
        [[step]]
        name = "flaky"
        start = true
        retries = 2
        retry_delay = 600
        script = 'echo "try" >&2; exit 1'
        """)
    p = popen(cli, "-manifest", m, "-db", cli.db, "-run", "--grace", "0", stderr_to=cli.tmp / "err")
    try:
        wait_for(lambda: "retrying" in (cli.tmp / "err").read_text(), what="the first attempt to fail")
        p.send_signal(signal.SIGINT)
        p.wait(15)
    finally:
        p.kill()
        p.wait()
    before = dump(cli.db)
    r = cli.ok("run", m, "-db", cli.db, "--dry-run")
    assert re.search(r"flaky\s+1\s+1 retry", r.out), r.out
    assert dump(cli.db) == before


def test_migrate_dry_runs_change_nothing(cli):
    m, marks = two_items(cli)
    cli.run(m)
    for p in marks.iterdir():
        p.unlink()
    m.write_text(m.read_text().replace('tr a-z A-Z < "$INPUT_FILE"', 'tr a-z A-Z <"$INPUT_FILE"'))  # a new version
    before = dump(cli.db)
    r = cli.ok("-manifest", m, "-db", cli.db, "-migrate-tainted", "--dry-run")
    assert "would re-queue 2 task(s)" in r.err, r.err
    r = cli.ok("-manifest", m, "-db", cli.db, "-migrate-tainted", "-run", "--dry-run")
    assert re.search(r"process\s+2\s+2 re-run", r.out), r.out
    assert not any(marks.iterdir()) and dump(cli.db) == before
    # without --dry-run the same command does it
    cli.ok("-manifest", m, "-db", cli.db, "-migrate-tainted", "-run")
    assert sorted(p.name for p in marks.iterdir()) == ["process-process_1.txt", "process-process_2.txt"]


# -- 2. an interrupted run says so in its exit code --------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_exits_128_plus_the_signal_and_says_what_is_left(cli, sig):
    marks = cli.tmp / "marks"
    marks.mkdir()
    m = cli.manifest(f"""
        [[step]]
        name = "fetch"
        start = true
        script = 'for i in 1 2 3 4; do echo $i > "$OUTPUT_DIR/process_$i.txt"; done'

        [[step]]
        name = "process"
        script = 'touch "{marks}/$INPUT_NAME"; sleep 30; cp "$INPUT_FILE" "$OUTPUT_DIR/done_$INPUT_NAME"'
        """)
    p = popen(cli, "-manifest", m, "-db", cli.db, "-run", "-parallel", "2", "--grace", "0", stderr_to=cli.tmp / "err")
    try:
        wait_for(lambda: any(marks.iterdir()), what="a script to start")
        p.send_signal(sig)
        rc = p.wait(20)
    finally:
        p.kill()
        p.wait()
    err = (cli.tmp / "err").read_text()
    assert rc == 128 + sig, f"exit {rc}\n{err}"
    name = signal.Signals(sig).name
    found = re.search(rf"interrupted by {name}: (\d+) task\(s\) not finished", err)
    assert found, err
    t = status(cli)["totals"]
    assert int(found.group(1)) == t["pending"] + t["running"] + t["leased"] == 4
    assert t["done"] == 1


def test_serve_stopped_with_sigterm_still_exits_0(cli):
    m, _ = two_items(cli)
    p = popen(cli, "serve", "-manifest", m, "-db", cli.db, "--grace", "1", stderr_to=cli.tmp / "err")
    try:
        wait_for(lambda: "serving" in (cli.tmp / "err").read_text(), what="serve to start")
        wait_for(lambda: cli.db.exists() and steps(cli)["process"]["done"] == 2, what="the items to be done")
        p.send_signal(signal.SIGTERM)
        rc = p.wait(20)
    finally:
        p.kill()
        p.wait()
    assert rc == 0, (cli.tmp / "err").read_text()


# -- 3. two runs creating one new store at the same moment -------------------------------------------


def test_concurrent_runs_creating_the_same_new_store_both_succeed(cli):
    m = cli.manifest("""
        [[step]]
        name = "fetch"
        start = true
        script = 'echo hi > "$OUTPUT_DIR/done_x.txt"'
        """)
    go, ready = cli.tmp / "go", cli.tmp / "ready"
    ready.mkdir()
    # each child imports everything first, then waits for `go`, so that both of a pair open the store together
    child = textwrap.dedent(f"""
        import os, sys, time
        import task_pipeline.cli, task_pipeline.state, anyio, rich.console
        open(os.path.join({str(ready)!r}, str(os.getpid())), "w").close()
        while not os.path.exists({str(go)!r}):
            time.sleep(0.001)
        sys.exit(task_pipeline.cli.main(sys.argv[1:]))
        """)
    procs = []
    for i in range(10):
        for _ in range(2):
            procs.append((i, subprocess.Popen(
                [sys.executable, "-c", child, "-manifest", str(m), "-db", str(cli.tmp / f"store{i}"), "-run"],
                cwd=cli.tmp, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
    wait_for(lambda: len(list(ready.iterdir())) == len(procs) or any(p.poll() is not None for _, p in procs),
             timeout=60, what="every run to be ready")
    go.touch()
    failures = []
    for i, p in procs:
        _, err = p.communicate(timeout=120)
        if p.returncode != 0:
            failures.append(f"store{i}: exit {p.returncode}: {err.decode(errors='replace').strip()}")
    assert not failures, "\n".join(failures)
    for i in range(10):
        assert steps(cli, cli.tmp / f"store{i}")["fetch"]["done"] == 1


# -- 4. two actions at once ----------------------------------------------------------------------------


TWO_ACTIONS = [
    (["-manifest", "{m}", "-run", "-export", "process"], ("-run", "export")),
    (["-run", "status"], ("-run", "status")),
    (["gc", "-run"], ("-run", "gc")),
    (["-export-hash", "abcdef", "-export", "process"], ("-export", "cat")),
]


def test_two_actions_at_once_are_a_usage_error_naming_both(cli):
    m, marks = two_items(cli)
    cli.run(m)
    for p in marks.iterdir():
        p.unlink()
    before = dump(cli.db)
    for args, names in TWO_ACTIONS:
        r = cli(*[a.format(m=m) for a in args], "-db", cli.db)
        assert r.returncode == 2, f"{args}: exit {r.returncode}\n{r.out}{r.err}"
        line = one_line_error(r)
        for n in names:
            assert n in line, (args, n, line)
        assert r.out == "", (args, r.out)
    assert dump(cli.db) == before and not any(marks.iterdir())


def test_migrate_tainted_with_run_stays_valid(cli):
    m, marks = two_items(cli)
    r = cli.ok("-manifest", m, "-db", cli.db, "-migrate-tainted", "-run")
    assert steps(cli)["process"]["done"] == 2, r.err


@pytest.mark.parametrize("spelling", [("-manifest", "{m}", "-migrate-tainted", "-run"), ("migrate", "{m}", "-run"),
                                      ("migrate", "-manifest", "{m}", "--run")])
def test_every_spelling_of_migrate_and_run_migrates_then_runs(cli, spelling):
    text = """
        [[step]]
        name = "gen"
        start = true
        script = 'for i in 1 2; do echo $i > "$OUTPUT_DIR/work_$i"; done'

        [[step]]
        name = "work"
        script = 'cat "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"'
        """
    m = cli.manifest(text)
    cli.ok("run", m, "-db", cli.db)
    cli.manifest(text.replace('cat "$INPUT_FILE"', 'tr 12 ab < "$INPUT_FILE"'))
    cli.ok(*[a.format(m=m) for a in spelling], "-db", cli.db)
    assert steps(cli)["work"]["tainted"] == 0 and steps(cli)["work"]["done"] == 2
    done = json.loads(cli.ok("export", "done", "-db", cli.db, "--json").out)
    assert sorted(Path(r["path"]).read_text() for r in done) == ["a\n", "b\n"]


# -- 5. status counts running scripts, not leases -------------------------------------------------------


LIMITED = """
    [[step]]
    name = "fetch"
    start = true
    script = 'for i in 1 2 3 4 5 6; do echo $i > "$OUTPUT_DIR/process_$i.txt"; done'

    [[step]]
    name = "process"
    parallel = 1
    script = 'touch "{marks}/$INPUT_NAME"; sleep {sleep}; cp "$INPUT_FILE" "$OUTPUT_DIR/done_$INPUT_NAME"'
    """


def test_status_during_a_run_never_counts_more_running_than_the_step_limit(cli):
    marks = cli.tmp / "marks"
    marks.mkdir()
    m = cli.manifest(LIMITED.format(marks=marks, sleep=0.5))
    p = popen(cli, "-manifest", m, "-db", cli.db, "-run", "-parallel", "4", stderr_to=cli.tmp / "err")
    samples = []
    try:
        wait_for(lambda: any(marks.iterdir()), what="the first process script")
        while p.poll() is None:
            s = status(cli)
            samples.append(({x["step"]: x for x in s["steps"]}, s["totals"], s["runners"]))
            time.sleep(0.05)
        rc = p.wait()
    finally:
        p.kill()
        p.wait()
    err = (cli.tmp / "err").read_text()
    assert rc == 0, err
    during = [x for x in samples if x[2]]  # taken while the runner was registered
    assert len(during) >= 2, f"too few samples during the run: {samples}"
    assert any(x[0]["process"]["pending"] > 0 for x in during), "no sample saw queued work"
    for by_step, totals, _ in samples:
        p_ = by_step["process"]
        assert "leased" in p_, "status --json has no separate 'leased' count"
        assert 0 <= p_["running"] <= 1, p_
        assert 0 <= p_["leased"] and p_["running"] + p_["leased"] <= 1, p_
        assert all(v >= 0 for v in totals.values()), totals
    # the summary never shows a negative count
    assert not re.search(r"(?<![\w.:-])-\d", err.replace("-parallel", "")), err
    assert steps(cli)["process"]["done"] == 6


def test_status_shows_a_started_script_as_running(cli):
    marks = cli.tmp / "marks"
    marks.mkdir()
    m = cli.manifest(LIMITED.format(marks=marks, sleep=2.5).replace("1 2 3 4 5 6", "1"))
    p = popen(cli, "-manifest", m, "-db", cli.db, "-run", stderr_to=cli.tmp / "err")
    seen = []
    try:
        wait_for(lambda: any(marks.iterdir()), what="the script to start")
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline and p.poll() is None:
            seen.append(steps(cli)["process"]["running"])
            if seen[-1] == 1:
                break
        p.wait(20)
    finally:
        p.kill()
        p.wait()
    assert 1 in seen, f"running counts seen while the script ran: {seen}"


# -- 6. export -----------------------------------------------------------------------------------------


EXPORTS = """
    [[step]]
    name = "fetch"
    start = true
    script = '''
    for i in 1 2; do echo "item $i" > "$OUTPUT_DIR/process_$i.txt"; done
    echo "nobody wants me" > "$OUTPUT_DIR/stray_1.txt"
    '''

    [[step]]
    name = "process"
    script = 'tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"'
    """


@pytest.fixture
def exported(cli) -> CLI:
    r = cli.run(cli.manifest(EXPORTS))
    assert r.returncode == 0, r.err
    return cli


def listed(cli: CLI, *args) -> dict[str, bytes]:
    """What `export ARGS` lists: file content by content (the paths are object paths)."""
    paths = cli.ok("-db", cli.db, "export", *args).out.split()
    return sorted(Path(cli.tmp, p).read_bytes() for p in paths)


def test_export_lists_a_start_steps_outputs_final_and_unrouted_outputs(exported):
    cli = exported
    assert listed(cli, "--outputs", "fetch") == [b"item 1\n", b"item 2\n", b"nobody wants me\n"]
    assert listed(cli, "done") == [b"ITEM 1\n", b"ITEM 2\n"]
    assert listed(cli, "--unrouted") == [b"nobody wants me\n"]
    names = {r["name"] for r in json.loads(cli.ok("-db", cli.db, "export", "done", "--json").out)}
    assert names == {"done_process_1.txt", "done_process_2.txt"}


def _objects_by_name(cli: CLI, *args) -> dict[str, bytes]:
    return {r["name"]: Path(cli.tmp, r["path"]).read_bytes()
            for r in json.loads(cli.ok("-db", cli.db, "export", *args, "--json").out)}


def test_export_done_to_a_directory_writes_read_only_copies_under_their_names(exported):
    cli = exported
    out = cli.tmp / "results"
    cli.ok("-db", cli.db, "export", "done", "--to", out)
    want = _objects_by_name(cli, "done")
    assert sorted(p.name for p in out.iterdir()) == sorted(want)
    for name, content in want.items():
        f = out / name
        assert f.read_bytes() == content
        assert stat.S_IMODE(f.stat().st_mode) == 0o444
        assert f.stat().st_nlink == 1  # a copy, not the store's inode
    # again into the same directory: the same files are fine
    cli.ok("-db", cli.db, "export", "done", "--to", out)


def test_export_everything_to_a_directory_is_step_slash_name(exported):
    cli = exported
    snap = cli.tmp / "snap"
    cli.ok("-db", cli.db, "export", "--to", snap)
    files = sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file())
    assert files == ["fetch/process_1.txt", "fetch/process_2.txt", "fetch/stray_1.txt",
                     "process/done_process_1.txt", "process/done_process_2.txt"]
    assert (snap / "process" / "done_process_2.txt").read_text() == "ITEM 2\n"
    assert (snap / "fetch" / "stray_1.txt").read_text() == "nobody wants me\n"


def test_export_refuses_to_overwrite_a_file_with_other_content_and_writes_nothing(exported):
    cli = exported
    out = cli.tmp / "results"
    out.mkdir()
    (out / "done_process_2.txt").write_text("mine\n")
    r = cli("-db", cli.db, "export", "done", "--to", out)
    assert r.returncode == 2, r.err
    assert "done_process_2.txt" in one_line_error(r)
    assert sorted(p.name for p in out.iterdir()) == ["done_process_2.txt"]
    assert (out / "done_process_2.txt").read_text() == "mine\n"


def test_export_flat_refuses_two_results_with_one_name_and_hints_at_layout_task(cli):
    m = cli.manifest("""
        [[step]]
        name = "a"
        start = true
        script = 'echo A > "$OUTPUT_DIR/done_x.txt"'

        [[step]]
        name = "b"
        start = true
        script = 'echo B > "$OUTPUT_DIR/done_x.txt"'
        """)
    cli.run(m)
    out = cli.tmp / "results"
    r = cli("-db", cli.db, "export", "done", "--to", out)
    assert r.returncode == 2, r.err
    line = one_line_error(r)
    assert "done_x.txt" in line and "--layout task" in line
    assert not out.exists() or not any(out.iterdir())
    cli.ok("-db", cli.db, "export", "done", "--to", out, "--layout", "task")
    assert sorted(p.read_text() for p in out.rglob("done_x.txt")) == ["A\n", "B\n"]


def test_export_link_makes_hard_links_to_the_objects(exported):
    cli = exported
    out = cli.tmp / "linked"
    cli.ok("-db", cli.db, "export", "done", "--to", out, "--link")
    rows = json.loads(cli.ok("-db", cli.db, "export", "done", "--json").out)
    assert len(rows) == 2
    for r in rows:
        assert os.path.samefile(out / r["name"], Path(cli.tmp, r["path"]))


# -- 7. why: every producer -----------------------------------------------------------------------------


def test_why_shows_every_task_that_produced_the_same_object(cli):
    cli.ok("-manifest", QUICKSTART, "-db", cli.db, "-run")
    paths = cli.ok("-db", cli.db, "export", "done").out.split()
    assert len(paths) == 3 and len(set(paths)) == 1, paths     # three counts of 2 words: one object
    assert Path(cli.tmp, paths[0]).read_text().strip() == "2"
    h = "".join(Path(paths[0]).parts[-3:])
    chains = json.loads(cli.ok("-db", cli.db, "why", h, "--json").out)
    assert isinstance(chains, list) and len(chains) == 3
    assert all(c[0]["step"] == "fetch" and c[-1]["step"] == "count" and c[-1]["object"] == h for c in chains)
    assert len({c[-1]["task"] for c in chains}) == 3
    assert sorted(c[1]["name"] for c in chains) == ["count_shout_nix.txt", "count_shout_pipeline.txt",
                                                      "count_shout_world.txt"]
    # plain text, given the object path `export` printed
    text = cli.ok("-db", cli.db, "why", paths[0]).out
    assert len(re.findall(r"count v1 \(task \d+\)", text)) == 3, text


# -- 8. per-command help, did-you-mean, positional manifests -------------------------------------------


def _option_lines(text: str) -> set[str]:
    """The long option names listed in a help text ("  -j, --parallel N   ..." gives "parallel")."""
    names = set()
    for m in re.finditer(r"(?m)^\s+(-[^ ].*?)(?:\s{2,}|$)", text):
        for spelling in m.group(1).split(", "):
            name = spelling.split()[0].lstrip("-")
            if len(name) > 1:
                names.add(name)
    return names


def test_per_command_help_shows_only_that_commands_options_and_an_example(cli):
    run_help = cli.ok("run", "--help").out
    assert cli.ok("help", "run").out == run_help
    assert run_help.startswith("usage: task-pipeline run")
    opts = _option_lines(run_help)
    assert {"parallel", "db", "dry-run", "manifest"} <= opts and "route" not in opts and "force" not in opts, opts
    assert "example" in run_help.lower() and re.search(r"(?m)^\s+task-pipeline .*run", run_help)
    submit_help = cli.ok("submit", "--help").out
    opts = _option_lines(submit_help)
    assert "route" in opts and "parallel" not in opts, opts
    assert submit_help.startswith("usage: task-pipeline submit")


def test_a_misspelt_option_gets_a_did_you_mean(cli):
    m, _ = two_items(cli)
    r = cli("run", m, "-db", cli.db, "--paralel", "2")
    assert r.returncode == 2
    line = one_line_error(r)
    assert "--paralel" in line and "did you mean" in line and "parallel" in line
    assert not cli.db.exists()


def test_manifest_spellings_positional_go_style_and_equals(cli):
    m, marks = two_items(cli)
    r = cli.ok("validate", m.name)
    assert m.name in r.out and "valid" in r.out
    cli.ok("run", m.name, "-db", "s1")
    cli.ok("-manifest", m.name, "-db", "s2", "-run")
    cli.ok(f"--manifest={m.name}", "-db", "s3", "-run")
    for s in ("s1", "s2", "s3"):
        assert steps(cli, cli.tmp / s)["process"]["done"] == 2


def test_init_with_manifest_writes_that_file(cli):
    cli.ok("init", "-manifest", "mine.toml")
    assert (cli.tmp / "mine.toml").is_file() and not (cli.tmp / "pipeline.toml").exists()
    cli.ok("validate", "mine.toml")


# -- 9. --json where there is none; JSON logs; timestamps ------------------------------------------------


def test_json_on_a_command_without_a_json_form_is_a_usage_error(cli):
    for args in (["cat", "abcdef", "--json"], ["init", "--json"]):
        r = cli(*args, "-db", cli.db) if args[0] == "cat" else cli(*args)
        assert r.returncode == 2, f"{args}: exit {r.returncode}\n{r.err}"
        line = one_line_error(r)
        assert "--json" in line and f"'{args[0]}'" in line
    assert not (cli.tmp / "pipeline.toml").exists()


def test_log_format_json_makes_every_line_json_with_summary_and_failures(cli):
    m = cli.manifest(ONE_OK_ONE_FAILING)
    r = cli.run(m, "--log-format", "json")
    assert r.returncode == 1
    records = [json.loads(ln) for ln in r.err.splitlines()]   # every line parses
    assert records
    for rec in records:
        assert TS.match(rec["ts"]), rec
    summary = [x for x in records if x.get("kind") == "summary"]
    assert len(summary) == 1
    s = summary[0]
    assert (s["finished"], s["done"], s["failed"], s["attempts"], s["retried"]) == (2, 1, 1, 3, 1), s
    failures = [x for x in records if x.get("kind") == "failures"]
    assert len(failures) == 1 and [t["step"] for t in failures[0]["tasks"]] == ["bad"]
    assert failures[0]["tasks"][0]["stderr"] == "fatal: nope"
    task_id = failures[0]["tasks"][0]["task"]
    errors = [x for x in records if x.get("level") == "error" and x.get("step") == "bad"]
    assert errors and errors[0]["task"] == task_id and errors[0]["attempt"] == 2, records


def test_timestamps_are_utc_iso8601_with_milliseconds_everywhere(cli):
    go = cli.tmp / "go"
    m = cli.manifest(ONE_OK_ONE_FAILING + f"""
        [[step]]
        name = "slow"
        start = true
        script = 'for i in $(seq 600); do [ -e "{go}" ] && break; sleep 0.05; done; echo x > "$OUTPUT_DIR/done_slow.txt"'
        """)
    p = popen(cli, "-manifest", m, "-db", cli.db, "-run", "--log-format", "plain", stderr_to=cli.tmp / "err")
    try:
        runners = wait_for(lambda: try_status(cli).get("runners"), what="the runner in status")
        go.touch()   # the slow step waits for this: the run lasts until status has seen its runner
        p.wait(30)
    finally:
        p.kill()
        p.wait()
    for r in runners:
        assert TS.match(r["started_at"]) and TS.match(r["heartbeat"]), r
    lines = log_lines((cli.tmp / "err").read_text())
    assert len(lines) >= 3
    for ln in lines:
        assert TS.match(PLAIN_LOG.match(ln).group(1)), ln
    s = status(cli)
    assert s["last_failures"] and all(TS.match(f["finished_at"]) for f in s["last_failures"])
    task = s["last_failures"][0]["task"]
    attempts = json.loads(cli.ok("logs", str(task), "-db", cli.db, "--json").out)["attempts"]
    assert len(attempts) == 2
    for a in attempts:
        assert TS.match(a["started_at"]) and TS.match(a["finished_at"]), a


# -- 10. counts say what they count -----------------------------------------------------------------------


def test_the_summary_counts_tasks_and_attempts_separately(cli):
    m = cli.manifest(ONE_OK_ONE_FAILING)
    r = cli.run(m)
    assert r.returncode == 1
    assert re.search(r"\b2 task\(s\) finished in [\d.]+s \([^)]*\): 1 done, 1 failed; "
                     r"3 attempts, 1 of them failed and retried", r.err), r.err
    assert not re.search(r"\b3 task", r.err), r.err


# -- 11. smaller ones -----------------------------------------------------------------------------------


def test_retry_hint_works_when_pasted(cli):
    sub = cli.tmp / "sub"
    sub.mkdir()
    m = cli.manifest("""
        [[step]]
        name = "fetch"
        start = true
        script = 'test -e "$FLAG" || exit 1; echo ok > "$OUTPUT_DIR/done_x.txt"'
        env = { FLAG = "%s" }
        """ % (cli.tmp / "flag"), name="sub/p.toml")
    db = cli.tmp / "store"
    assert cli("-manifest", "sub/p.toml", "-db", db, "-run").returncode == 1
    (cli.tmp / "flag").touch()
    r = cli.ok("retry", "-db", db)
    found = re.search(r"run them with:? '?(task-pipeline [^,']+)", r.err)
    assert found, r.err
    words = shlex.split(found.group(1))
    assert words[0] == "task-pipeline" and str(m.resolve()) in words, words   # the registered manifest
    elsewhere = cli.tmp / "elsewhere"   # pasted in another directory, it still works
    elsewhere.mkdir()
    pasted = run_cli(*words[1:], cwd=elsewhere)
    assert pasted.returncode == 0, pasted.stderr.decode()
    assert steps(cli, db)["fetch"]["done"] == 1


def test_fixing_a_failed_start_step_does_not_warn_about_taint(cli):
    m = cli.manifest("""
        [[step]]
        name = "fetch"
        start = true
        script = 'exit 1'

        [[step]]
        name = "process"
        script = 'cp "$INPUT_FILE" "$OUTPUT_DIR/done_$INPUT_NAME"'
        """)
    assert cli.run(m).returncode == 1
    m.write_text(m.read_text().replace("'exit 1'", "'echo x > \"$OUTPUT_DIR/process_1.txt\"'"))
    r = cli.run(m)
    assert r.returncode == 0, r.err
    assert "taint" not in r.err, r.err
    s = steps(cli)
    assert s["fetch"]["done"] == 1 and s["process"]["done"] == 1 and s["fetch"]["tainted"] == 0


def test_an_unclosed_array_is_one_line_naming_the_file(cli):
    m = cli.manifest('[[step]]\nname = "x"\nbogus = [\n', name="bogus.toml")
    r = cli("validate", "-manifest", m)
    assert r.returncode == 2
    line = one_line_error(r)
    assert "bogus.toml" in line and "invalid TOML" in line


def test_an_unclosed_array_gets_a_hint_about_the_array(cli):
    m = cli.manifest('[[step]]\nname = "x"\nbogus = [\n', name="bogus.toml")
    line = one_line_error(cli("validate", "-manifest", m))
    assert "missing its quotes" not in line and re.search(r"close|unclosed|\]", line), line


def test_the_failure_table_shows_what_a_redrawn_line_ended_with_and_does_not_wrap(cli):
    long = "E" * 150
    m = cli.manifest(f"""
        [[step]]
        name = "curl"
        start = true
        script = '''printf 'progress 10%%\\rprogress 100%%\\nfatal: boom\\n' >&2; exit 1'''

        [[step]]
        name = "redraw"
        start = true
        script = '''printf 'a\\rb\\r final words' >&2; exit 1'''

        [[step]]
        name = "wide"
        start = true
        script = 'echo {long} >&2; exit 1'
        """)
    r = cli.run(m)
    assert r.returncode == 1
    for text in (r.err, cli.ok("status", "-db", cli.db).out):
        rows = {ln.split()[0]: ln for ln in text.splitlines()
                if re.match(r"\s*(curl|redraw|wide)\s+\d+\s+\(start\)", ln)}   # the failure table's rows
        assert len(rows) == 3, text
        assert rows["curl"].rstrip().endswith("fatal: boom"), text
        assert rows["redraw"].rstrip().endswith("final words") and "\\r" not in rows["redraw"], text
        assert rows["wide"].rstrip().endswith(long), text   # on one line, not wrapped at 80 columns
    fails = {f["step"]: f["stderr"] for f in status(cli)["last_failures"]}
    assert fails == {"curl": "fatal: boom", "redraw": "final words", "wide": long}


def test_init_template_says_a_name_starting_with_done_is_not_necessarily_final(cli):
    cli.ok("init", "p.toml")
    text = (cli.tmp / "p.toml").read_text()
    assert "donefoo.txt" in text


def test_db_pointing_at_a_regular_file_says_so(cli):
    f = cli.tmp / "notastore"
    f.write_text("hello\n")
    m, _ = two_items(cli)
    for args in (["status", "-db", f], ["-manifest", m, "-db", f, "-run"]):
        r = cli(*args)
        assert r.returncode in (2, 3)
        assert "is a file, not a store directory" in one_line_error(r)
    assert f.read_text() == "hello\n"


def test_hash_blake3_on_an_existing_sha256_store_is_a_usage_error(cli):
    m, marks = two_items(cli)
    cli.run(m)
    before = dump(cli.db)
    r = cli.run(m, "--hash", "blake3")
    assert r.returncode == 2, r.err
    line = one_line_error(r)
    assert "blake3" in line and "sha256" in line
    assert dump(cli.db) == before


def test_readme_mentions_hash():
    text = (ROOT / "README.md").read_text()
    assert re.search(r"(?<![\w-])--?hash\b", text)


# -- 12. README: coming from the Go tool -------------------------------------------------------------------


def test_readme_has_a_section_for_go_tool_users():
    text = (ROOT / "README.md").read_text()
    assert re.search(r"(?mi)^#+ .*coming from the go tool", text)


# -- 13. inputs naming a step -------------------------------------------------------------------------------


def test_inputs_naming_a_start_step_get_a_warning_about_route_keys(cli):
    m = cli.manifest("""
        [[step]]
        name = "fetch"
        start = true
        script = 'echo a > "$OUTPUT_DIR/result_1.txt"'

        [[step]]
        name = "process"
        inputs = ["fetch"]
        script = 'cp "$INPUT_FILE" "$OUTPUT_DIR/done_$INPUT_NAME"'
        """)
    for r in (cli.ok("validate", "-manifest", m), cli.ok("-manifest", m, "-db", cli.db, "-run")):
        warning = [ln for ln in r.err.splitlines() if "route keys" in ln]
        assert len(warning) == 1, r.err
        assert "'process'" in warning[0] and "'fetch'" in warning[0]
    # a manifest whose inputs do name route keys written by a script gets no such warning
    ok = cli.manifest("""
        [[step]]
        name = "fetch"
        start = true
        script = 'echo a > "$OUTPUT_DIR/fetch_1.txt"'

        [[step]]
        name = "process"
        inputs = ["fetch"]
        script = 'cp "$INPUT_FILE" "$OUTPUT_DIR/done_$INPUT_NAME"'
        """, name="ok.toml")
    assert "route keys" not in cli.ok("validate", "-manifest", ok).err


# -- 14. a second manifest on the same store ------------------------------------------------------------------


A_TOML = """
    [[step]]
    name = "fetch"
    start = true
    script = 'echo a > "$OUTPUT_DIR/process_1.txt"'

    [[step]]
    name = "process"
    script = 'cp "$INPUT_FILE" "$OUTPUT_DIR/done_$INPUT_NAME"'
    """

B_TOML = """
    [[step]]
    name = "fetch"
    start = true
    script = 'echo b > "$OUTPUT_DIR/done_1.txt"'
    """


def test_another_manifest_on_a_store_is_refused_until_asked_for(cli):
    a = cli.manifest(A_TOML, name="a.toml")
    b = cli.manifest(B_TOML, name="b.toml")
    cli.run(a)
    before, before_status = dump(cli.db), status(cli)
    r = cli.run(b)
    assert r.returncode == 2, r.err
    line = one_line_error(r)
    assert str(a.resolve()) in line and "--replace-manifest" in line
    assert dump(cli.db) == before and status(cli)["steps"] == before_status["steps"]
    r = cli.run(b, "--replace-manifest")
    assert r.returncode == 0, r.err
    s = steps(cli)
    assert s["fetch"]["version"] == 2 and s["fetch"]["done"] == 1


def test_the_same_manifest_moved_elsewhere_is_accepted(cli):
    a = cli.manifest(A_TOML, name="a.toml")
    cli.run(a)
    (cli.tmp / "moved").mkdir()
    moved = cli.manifest(A_TOML, name="moved/renamed.toml")
    r = cli.run(moved)
    assert r.returncode == 0, r.err
    assert "nothing to do" in r.err


# -- 15. a worker that dies does not hang the run --------------------------------------------------------------


DRIVER = """
import sys, threading
sys.path.insert(0, {root!r})
import task_pipeline.scheduler as scheduler
real, calls, lock = scheduler.execute, [0], threading.Lock()

def execute(*args, **kwargs):
    with lock:
        calls[0] += 1
        n = calls[0]
    if n == 3:
        raise RuntimeError("injected: the third task's worker blew up")
    return real(*args, **kwargs)

scheduler.execute = execute
from task_pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_worker_that_dies_ends_the_run_with_exit_3_and_gives_its_work_back(cli):
    """In a process of its own (a hang must not hang the tests), `execute` is patched where the
    scheduler calls it, then the real `main` runs; the third task's worker raises."""
    m = cli.manifest("""
        [[step]]
        name = "fetch"
        start = true
        script = 'for i in 1 2 3 4 5 6; do echo $i > "$OUTPUT_DIR/process_$i.txt"; done'

        [[step]]
        name = "process"
        script = 'sleep 0.1; cp "$INPUT_FILE" "$OUTPUT_DIR/done_$INPUT_NAME"'
        """)
    try:
        r = subprocess.run([sys.executable, "-c", DRIVER.format(root=str(ROOT)), "-manifest", str(m), "-db",
                            str(cli.db), "-run", "-parallel", "2"], cwd=cli.tmp, env=env(), capture_output=True,
                           timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("the run hung after a worker died")
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 3, err
    assert "a worker failed" in err and "injected" in err and "Traceback" not in err
    s = status(cli)
    assert s["runners"] == [], s   # the run unregistered itself
    # what it leased went back to the queue, except at most the task whose worker died (the next run takes it back)
    assert s["totals"]["running"] + s["totals"]["leased"] <= 1, s["totals"]
    again = cli.run(m)
    assert again.returncode == 0, again.err
    assert steps(cli)["process"]["done"] == 6


# -- extra: regressions found while writing these tests -----------------------------------------------------


def test_version(cli):
    r = cli.ok("--version")
    assert r.out.startswith("task-pipeline ")


def test_a_second_manifest_argument_is_a_usage_error(cli):
    a = cli.manifest(A_TOML, name="a.toml")
    b = cli.manifest(B_TOML, name="b.toml")
    r = cli("run", a, b, "-db", cli.db)
    assert r.returncode == 2 and "b.toml" in one_line_error(r)


def test_the_manifest_switch_message_gives_the_time_in_utc(cli):
    a = cli.manifest(A_TOML, name="a.toml")
    b = cli.manifest(B_TOML, name="b.toml")
    cli.run(a)
    r = cli.run(b, env={"TZ": "Asia/Tokyo"})
    assert r.returncode == 2
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", one_line_error(r)), r.err


# -- the command line under hostile input ---------------------------------------------------------------------


FUZZ = [
    ["submit", "process", b"bad\xff.txt"],
    ["run", "p.toml", "-runset", b"r\xff"],
    ["export", "process", "-input-path", b"\xff"],
    ["-export", b"\xff"],
    ["run", b"\xff.toml"],
    ["status", "-db", b"d\xff"],
    ["run", "p.toml", "-step", b"\xff"],
    ["logs", "9223372036854775808"],
    ["logs", "-1"],
    ["logs", "abc"],
    ["init", b"my\x01pipe.toml"],
    ["run", "p.toml", "-parallel", "100000000"],
    ["run", "p.toml", "-parallel", "0"],
    ["run", "p.toml", "--grace", "nan"],
    ["run", "p.toml", "--grace", "inf"],
    ["run", "p.toml", "--lease", "1"],
    ["status", "-db", ""],
    ["status", "-db", "/dev/null"],
    ["status", "-db", "p.toml/x"],
    ["cat", "zzzz"],
    ["cat", "db/objects/../../p.toml"],
    ["why", "../../etc/passwd"],
    ["why", "/etc/passwd"],
    ["run", "nosuch.toml"],
    ["validate", "/etc/passwd"],
    ["validate", "/dev/zero"],
    [""],
    ["-"],
    ["--"],
    ["export"],
    ["export", "done", "--link"],
    ["export", "done", "--to", "/dev/null"],
    ["submit", "--route", "-"],
    ["submit", "nosuchstep", "p.toml"],
    ["submit", "process", "/dev/null"],
    ["run", "p.toml", "--hash", "md5"],
    ["init", "/nonexistent/dir/x.toml"],
    ["retry", "nosuch"],
    ["invalidate"],
    ["help", "nosuch"],
]


def _argv(args: list) -> list[bytes]:
    return [os.fsencode(sys.executable), b"-m", b"task_pipeline"] + [os.fsencode(a) if isinstance(a, str) else a
                                                                    for a in args]


def _case(p) -> list:
    return p.values[0] if hasattr(p, "values") else p


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory) -> tuple[Path, dict]:
    """Every hostile command line, run (4 at a time) against one store with a finished two-step
    pipeline in the current directory (./db, the default); none of them may change it."""
    from concurrent.futures import ThreadPoolExecutor

    home = tmp_path_factory.mktemp("fuzz")
    cli = CLI(home)
    m = cli.manifest(TWO_ITEMS.format(marks=home), name="p.toml")
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    (home / os.fsdecode(b"bad\xff.txt")).write_text("x")
    before = dump(cli.db)

    def one(args: list) -> subprocess.CompletedProcess:
        return subprocess.run(_argv(args), cwd=home, env=env(), capture_output=True, stdin=subprocess.DEVNULL,
                              timeout=60)

    cases = [_case(p) for p in FUZZ]
    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(map(repr, cases), pool.map(one, cases)))
    assert dump(cli.db) == before, "a hostile command line changed the store"
    return home, results


@pytest.mark.parametrize("args", FUZZ, ids=lambda a: " ".join(x if isinstance(x, str) else repr(x) for x in a)
                         or "''")
def test_hostile_command_line_gives_one_line_never_a_traceback(fuzz_results, args):
    home, results = fuzz_results
    r = results[repr(args)]
    err = r.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    assert r.returncode in (0, 1, 2, 3), f"exit {r.returncode}: {err}"
    if r.returncode:
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("task-pipeline: "), err
    if args[0] == "init" and r.returncode == 0:
        written = home / os.fsdecode(args[1])
        assert written.is_file()
        v = subprocess.run(_argv(["validate", written]), cwd=home, env=env(), capture_output=True, timeout=60)
        assert v.returncode == 0, v.stderr.decode()


# -- found while documenting ---------------------------------------------------------------------------------


def test_a_store_directory_can_be_moved_but_its_objects_cannot_be_renamed_by_mistake(cli):
    m, _ = two_items(cli)
    cli.ok("run", m, "-db", cli.db)
    moved = cli.tmp / "moved"
    cli.db.rename(moved)
    assert status(cli, moved)["totals"]["done"] == 3  # a moved store keeps working
    elsewhere = cli.tmp / "objects-elsewhere"
    r = cli("status", "-db", moved, "--objects", elsewhere)
    assert r.returncode == 2 and "keeps its objects in" in one_line_error(r), r.err
    # a store made with its objects elsewhere must be named with them
    other = cli.tmp / "other"
    cli.ok("run", m, "-db", other, "--objects", elsewhere)
    r = cli("export", "done", "-db", other)
    assert r.returncode == 2 and str(elsewhere) in one_line_error(r)
    assert cli.ok("export", "done", "-db", other, "--objects", elsewhere).out.startswith(str(elsewhere))
    # nor with a bucket in their place: the recorded location wins until the user says otherwise
    r = cli("status", "-db", other, "--objects", "s3://bucket/prefix")
    assert r.returncode == 2 and "keeps its objects in" in one_line_error(r) and str(elsewhere) in one_line_error(r)


def test_a_runner_with_the_same_host_name_elsewhere_is_judged_by_its_lease_not_a_pid(cli):
    """Cloned machines share a host name; a pid of theirs means nothing here."""
    import socket

    from task_pipeline.host import this_host

    m, _ = two_items(cli)
    cli.ok("run", m, "-db", cli.db, "-step", "fetch")
    dead = subprocess.Popen(["true"])
    dead.wait()
    twin = f"{socket.gethostname()}~ffffff"  # same name, another boot or pid namespace
    assert twin != this_host()
    backends.execute(cli.db, """UPDATE task SET state='running', token=token+1, lease_owner=?, lease_expires=?
                                WHERE input_name='process_1.txt'""", f"{twin}:{dead.pid}:abcdef", time.time() + 3)
    t0 = time.monotonic()
    cli.ok("run", m, "-db", cli.db)
    assert time.monotonic() - t0 > 2.0  # waited for the lease, did not trust the pid
    assert status(cli)["totals"]["done"] == 3


def test_gc_dry_run_counts_leftover_scratch_too(cli):
    m, _ = two_items(cli)
    cli.ok("run", m, "-db", cli.db)
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = cli.db / "tmp" / f"task-slot1-abcdef-{dead.pid}"
    left.mkdir()
    (left / "junk").write_bytes(b"x" * 5000)
    out = json.loads(cli.ok("gc", "-db", cli.db, "--dry-run", "--json").out)
    assert out["scratch_removed"] == 1 and out["bytes_freed"] >= 5000, out
    assert left.exists()
    cli.ok("gc", "-db", cli.db)
    assert not left.exists()


def test_a_dry_run_calls_tasks_requeued_by_retry_retries(cli):
    m = cli.manifest("""
        [[step]]
        name = "gen"
        start = true
        script = 'echo 1 > "$OUTPUT_DIR/flaky_1"'

        [[step]]
        name = "flaky"
        script = 'exit 1'
        """)
    assert cli("run", m, "-db", cli.db).returncode == 1
    cli.ok("retry", "-db", cli.db)
    plan = cli.ok("run", m, "-db", cli.db, "--dry-run").out
    assert re.search(r"flaky\s+1\s+1 retry", plan), plan


def test_why_all_includes_superseded_producers(cli):
    m = cli.manifest("""
        [[step]]
        name = "gen"
        start = true
        script = 'echo same > "$OUTPUT_DIR/done_x"'
        """)
    cli.ok("run", m, "-db", cli.db)
    cli.ok("invalidate", "gen", "-db", cli.db)
    cli.ok("run", m, "-db", cli.db)
    h = json.loads(cli.ok("export", "done", "-db", cli.db, "--json").out)[0]["hash"]
    assert len(json.loads(cli.ok("why", h, "-db", cli.db, "--json").out)) == 1
    assert len(json.loads(cli.ok("why", h, "-db", cli.db, "--json", "--all").out)) >= 1
