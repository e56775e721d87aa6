"""What PostgreSQL adds (issue 10): waking across hosts, limits across runners, lost connections,
bounded connections, concurrent registrations, and a password that stays out of sight.

The behavioural tests of tests/test_pipeline.py, test_failures.py, test_crash.py, test_daemon.py and
test_housekeeping.py run on PostgreSQL too (tests/backends.py); this file holds what only a shared
database server makes possible or necessary.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import backends
from conftest import CLI

PG = pytest.mark.parametrize("cli", ["postgres"], indirect=True)


def spawn(cli: CLI, *args, host=None, log: Path | None = None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "task_pipeline", *cli.argv(*args)]
    kw = dict(cwd=cli.tmp, env=cli.environ(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
              stderr=open(log, "wb") if log else subprocess.PIPE)
    return host.popen(argv, **kw) if host else subprocess.Popen(argv, **kw)


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def on_host(cli: CLI, pg_server, host) -> list[str]:
    """The store's arguments as a process inside `host` gives them (PostgreSQL at the host's gateway)."""
    dbname = cli.url.rsplit("/", 1)[1]
    return ["-db", pg_server.url(dbname, host=host.gateway), "--objects", str(cli.db / "objects")]


# -- waking -----------------------------------------------------------------------------------------------


@PG
def test_an_idle_daemon_on_one_host_wakes_within_100ms_of_a_submit_on_another(cli, pg_server, net_hosts):
    a, b = net_hosts(), net_hosts()
    starts = cli.tmp / "starts.log"
    m = cli.manifest(f"""
        [[step]]
        name = "up"
        script = 'date +%s.%N >> {starts}; tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done"'
        """)
    log = cli.tmp / "serve.log"
    d = spawn(cli, "serve", m, *on_host(cli, pg_server, a), "--scratch", cli.tmp / "scratch-a", host=a, log=log)
    try:
        wait_for(lambda: "serving" in log.read_text(), 20, "serve to start")
        time.sleep(1.5)  # idle: waiting on LISTEN, not busy polling
        latencies = []
        for i in range(3):
            f = cli.tmp / f"in{i}.txt"
            f.write_text(f"input {i}\n")
            p = b.popen([sys.executable, "-m", "task_pipeline", "submit", "up", str(f), *on_host(cli, pg_server, b)],
                        cwd=cli.tmp, env=cli.environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            line = p.stdout.readline()   # printed right after the commit (and its NOTIFY)
            submitted = time.time()
            assert "queued for up" in line, (line, p.stderr.read())
            p.communicate(timeout=30)
            wait_for(lambda: starts.exists() and len(starts.read_text().split()) == i + 1, 10, "the script to start")
            latencies.append(float(starts.read_text().split()[-1]) - submitted)
            time.sleep(0.5)
        print(f"wake latencies (script start after submit committed): {[f'{x * 1000:.0f} ms' for x in latencies]}")
        assert min(latencies) < 0.1, latencies
        assert max(latencies) < 0.5, latencies
    finally:
        d.send_signal(signal.SIGTERM)
        assert d.wait(timeout=30) == 0, log.read_text()


# -- a step's limit holds across runners ------------------------------------------------------------------


@pytest.mark.backends
def test_a_steps_parallel_limit_holds_across_runners(cli, tmp_path):
    log = tmp_path / "spans.log"
    m = cli.manifest(f"""
        [[step]]
        name = "gen"
        start = true
        script = 'for i in $(seq 1 12); do echo $i > "$OUTPUT_DIR/slow_$i"; done'

        [[step]]
        name = "slow"
        parallel = 2
        script = '''
        echo "start $$ $(date +%s.%N)" >> {log}
        sleep 0.3
        echo "end $$ $(date +%s.%N)" >> {log}
        echo ok > "$OUTPUT_DIR/done_$INPUT_NAME"
        '''
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run", "-step", "gen")
    procs = [spawn(cli, "run", m, "-db", cli.db, "-parallel", "4") for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    events = []
    for line in log.read_text().splitlines():
        what, _, t = line.split()
        events.append((float(t), 1 if what == "start" else -1))
    running = peak = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        running += d
        peak = max(peak, running)
    assert len(events) == 24 and peak == 2, (peak, len(events))


# -- lost connections -----------------------------------------------------------------------------------------


@PG
def test_run_exits_3_when_the_database_goes_away_and_nothing_is_half_committed(cli, pg_server):
    m = cli.manifest("""
        [[step]]
        name = "gen"
        start = true
        script = 'for i in $(seq 1 20); do echo $i > "$OUTPUT_DIR/work_$i"; done'

        [[step]]
        name = "work"
        script = 'sleep 0.4; cp "$INPUT_FILE" "$OUTPUT_DIR/done_$INPUT_NAME"'
        """)
    p = spawn(cli, "run", m, "-db", cli.db, "-parallel", "2")
    dbname = cli.url.rsplit("/", 1)[1]
    def some_done() -> bool:
        try:
            return backends.query(cli.db, "SELECT count(*) FROM task WHERE state='done'")[0][0] >= 3
        except Exception:  # noqa: BLE001 - the store is not created yet
            return False

    wait_for(some_done, 30, "some work to be done")
    pg_server.kill_backends(dbname)
    t0 = time.monotonic()
    _, err = p.communicate(timeout=60)
    err = err.decode()
    assert p.returncode == 3, err
    assert time.monotonic() - t0 < 10, "the run waited for its scripts instead of stopping them"
    assert "lost the connection to the database" in err and "Traceback" not in err
    assert "***" not in err and pg_server.password not in err
    # every task recorded as done has all of its outputs: nothing was committed half-way
    rows = backends.query(cli.db, """SELECT t.id, count(o.name) FROM task t JOIN step s ON s.id = t.step_id
                                     LEFT JOIN output o ON o.task_id = t.id WHERE s.name='work' AND t.state='done'
                                     GROUP BY t.id""")
    assert rows and all(n == 1 for _, n in rows), rows
    cli.ok("run", m, "-db", cli.db)
    assert backends.query(cli.db, "SELECT count(*) FROM task WHERE state='done'") == [(21,)]
    assert cli("fsck", "-db", cli.db).returncode == 0


@PG
def test_serve_outlives_a_lost_connection_and_a_database_restart(cli, pg_server):
    m = cli.manifest("""
        [[step]]
        name = "up"
        script = 'tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"'
        """)
    log = cli.tmp / "serve.log"
    d = spawn(cli, "serve", m, "-db", cli.db, log=log)
    try:
        wait_for(lambda: "serving" in log.read_text(), 20, "serve to start")
        pg_server.kill_backends(cli.url.rsplit("/", 1)[1])
        pg_server.restart()
        for i in range(3):
            f = cli.tmp / f"x{i}.txt"
            f.write_text(f"item {i}\n")
            cli.ok("submit", "up", f, "-db", cli.db)
        wait_for(lambda: backends.query(cli.db, "SELECT count(*) FROM task WHERE state='done'") == [(3,)], 60,
                 "the submitted work to be done")
        text = log.read_text()
        assert "lost the connection" in text and "reconnected to the database" in text, text
    finally:
        d.send_signal(signal.SIGTERM)
        assert d.wait(timeout=30) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


@PG
def test_a_runner_uses_at_most_three_connections(cli, pg_server):
    m = cli.manifest("""
        [[step]]
        name = "up"
        script = 'sleep 1; cp "$INPUT_FILE" "$OUTPUT_DIR/done_$INPUT_NAME"'
        """)
    log = cli.tmp / "serve.log"
    d = spawn(cli, "serve", m, "-db", cli.db, "-parallel", "8", log=log)
    dbname = cli.url.rsplit("/", 1)[1]
    try:
        wait_for(lambda: "serving" in log.read_text(), 20, "serve to start")
        for i in range(8):
            (cli.tmp / f"y{i}").write_text(str(i))
        cli.ok("submit", "up", *[cli.tmp / f"y{i}" for i in range(8)], "-db", cli.db)
        time.sleep(0.5)  # eight scripts running
        sessions = pg_server.pids(dbname)
        assert len(sessions) == 3, sessions  # engine, heartbeat, LISTEN: however many scripts run
    finally:
        d.send_signal(signal.SIGTERM)
        d.wait(timeout=30)


# -- registrations at the same moment ---------------------------------------------------------------------------


def _manifest(tag: str) -> str:
    return f"""
        [[step]]
        name = "gen"
        start = true
        script = 'echo {tag} > "$OUTPUT_DIR/work_1"'

        [[step]]
        name = "work"
        script = 'echo "{tag}: $(cat "$INPUT_FILE")" > "$OUTPUT_DIR/done_1"'
        """


@PG
def test_hosts_registering_at_the_same_moment_end_with_one_consistent_pipeline(cli):
    a = cli.manifest(_manifest("a"), "a.toml")
    b = cli.manifest(_manifest("b"), "b.toml")
    cli.ok("migrate", a, "-db", cli.db)
    procs = [spawn(cli, "migrate", (a, b)[i % 2], "-db", cli.db, "--replace-manifest") for i in range(8)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    rows = backends.query(cli.db, """SELECT c.name, s.name, s.script FROM step_current c JOIN step s ON s.id = c.step_id
                                    ORDER BY c.name""")
    assert [r[0] for r in rows] == ["gen", "work"] and all(r[0] == r[1] for r in rows)
    tags = {("a" if "echo a" in r[2] or "a: " in r[2] else "b") for r in rows}
    assert len(tags) == 1, rows  # every step from the same manifest: the last registration, whole
    versions = backends.query(cli.db, "SELECT name, version, count(*) FROM step GROUP BY name, version HAVING count(*) > 1")
    assert versions == []
    assert backends.query(cli.db, "SELECT name, count(*) FROM step GROUP BY name ORDER BY name") == [("gen", 2), ("work", 2)]
    cli.ok("run", a if tags == {"a"} else b, "-db", cli.db)


# -- naming a store -------------------------------------------------------------------------------------------


@PG
def test_a_postgresql_store_needs_its_objects_and_keeps_its_password_out_of_sight(cli, pg_server):
    m = cli.manifest(_manifest("a"))
    r = cli("run", m, "-db", cli.url)  # no --objects
    assert r.returncode == 2 and "--objects" in r.err, r.err
    wrong = cli.url.replace("postgres@", "postgres:not-the-password@")
    r = cli("status", "-db", wrong, "--objects", cli.db / "objects", env={"TASK_PIPELINE_DB_PASSWORD_FILE": ""})
    assert r.returncode == 3 and "not-the-password" not in r.err and "***" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1
    # scripts never see where the password is
    m2 = cli.manifest("""
        [[step]]
        name = "env"
        start = true
        script = 'env > "$OUTPUT_DIR/done_env"'
        """, "env.toml")
    cli.ok("run", m2, "-db", cli.db)
    (row,) = backends.query(cli.db, "SELECT hash FROM output WHERE name='done_env'")
    env = cli.ok("cat", row[0], "-db", cli.db).out
    assert "TASK_PIPELINE_DB_PASSWORD_FILE" not in env and "PGPASSWORD" not in env
    # the same store through the environment variables
    r = cli("status", "--json", env={"TASK_PIPELINE_DB": cli.url, "TASK_PIPELINE_OBJECTS": str(cli.db / "objects")})
    assert r.returncode == 0 and json.loads(r.out)["totals"]["done"] == 1, r.err


@PG
def test_every_command_works_on_a_postgresql_store(cli, tmp_path):
    m = cli.manifest("""
        [[step]]
        name = "fetch"
        start = true
        script = 'for i in 1 2 3; do echo "item $i" > "$OUTPUT_DIR/shout_$i.txt"; done'

        [[step]]
        name = "shout"
        script = 'tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"'
        """)
    db = ["-db", cli.db]
    assert "3 step" not in cli.ok("validate", m, *db).out  # against the store: there is none yet
    cli.ok("run", m, *db)
    st = json.loads(cli.ok("status", *db, "--json").out)
    assert st["totals"]["done"] == 4 and st["store"].startswith("postgresql://")
    done = json.loads(cli.ok("export", "done", *db, "--json").out)
    assert len(done) == 3 and all(Path(r["path"]).exists() for r in done)
    assert cli.ok("cat", done[0]["hash"], *db).out.startswith("ITEM")
    assert len(json.loads(cli.ok("why", done[0]["path"], *db, "--json").out)) == 1
    assert len(json.loads(cli.ok("export", "--outputs", "fetch", *db, "--json").out)) == 3
    assert len(json.loads(cli.ok("export", "shout", *db, "--json").out)) == 3
    cli.ok("export", "done", *db, "--to", tmp_path / "results")
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [f"done_shout_{i}.txt" for i in (1, 2, 3)]
    task = json.loads(cli.ok("export", "shout", *db, "--json").out)[0]["task"]
    assert "attempt 1: ok" in cli.ok("logs", str(task), *db).out
    assert "flowchart" in cli.ok("graph", *db).out
    f = tmp_path / "shout_extra.txt"
    f.write_text("extra\n")
    assert "queued for shout" in cli.ok("submit", "--route", f, *db).out
    cli.ok("invalidate", "shout", *db)
    cli.ok("run", m, *db)
    changed = m.read_text().replace("tr a-z A-Z", "tr a-z A-Z | rev")
    m.write_text(changed)
    assert "would be tainted" in cli.ok("validate", m, *db).out
    cli.ok("run", m, *db)
    assert json.loads(cli.ok("migrate", m, *db, "--json").out)["shout"]["tasks"] == 4
    cli.ok("run", m, *db)
    assert json.loads(cli.ok("check", "shout", *db, "--json").out)["identical"] == 4
    assert cli("retry", *db).returncode == 0
    assert json.loads(cli.ok("fsck", *db, "--json").out)["ok"]
    assert json.loads(cli.ok("gc", *db, "--json").out)["errors"] == []
    assert json.loads(cli.ok("fsck", *db, "--json").out)["ok"]


# -- a frozen runner -------------------------------------------------------------------------------------------

FROZEN_WRITER = r"""
import sys
from task_pipeline.db import postgres
postgres.IDLE_IN_TRANSACTION_MS = 1000  # the product's 10 s, shortened so that the test takes seconds
db = postgres.PostgresDatabase(sys.argv[1], sys.argv[2])
db.execute("CREATE TABLE IF NOT EXISTS filler(a BIGINT, b TEXT)")
rows = [(i, "x" * 40) for i in range(3000)]
print("writing", flush=True)
while True:
    with db.transaction():
        db.executemany("INSERT INTO filler(a, b) VALUES (?, ?)", rows)
        db.execute("DELETE FROM filler")
"""


def test_a_runner_frozen_in_the_middle_of_a_batch_loses_the_writers_lock_within_the_idle_timeout(pg_server, pg_url):
    """SIGSTOP (a paused VM, a stopped container) can catch a runner while it sends a batch of rows
    under the writers' lock. The server must end that session as it ends any idle one: a runner frozen
    between the statements of a pipeline would hold the lock, and stop every host, until it thaws."""
    from task_pipeline.db.postgres import LOCK_ALL, LOCK_CLASS, PostgresDatabase

    me = PostgresDatabase(pg_url, pg_server.password)
    me.execute("SET lock_timeout = '6s'")
    for trial in range(3):
        child = subprocess.Popen([sys.executable, "-c", FROZEN_WRITER, pg_url, pg_server.password],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert child.stdout.readline() == b"writing\n", child.stderr.read().decode()
            time.sleep(0.3 + 0.2 * trial)  # somewhere inside a batch, most of the time
            child.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            # raises LockNotAvailable after 6 s if the frozen session still holds the lock
            me.execute("BEGIN")
            me.execute("SELECT pg_advisory_xact_lock(?, ?)", (LOCK_CLASS, LOCK_ALL))
            me.execute("COMMIT")
            assert time.monotonic() - t0 < 5
        finally:
            child.kill()
            child.wait()
