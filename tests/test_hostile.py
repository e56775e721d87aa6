"""Hostile outputs, hostile scripts, hostile stores and a full disk (issue 3)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, fill

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def query(db: Path, sql: str, *args) -> list[tuple]:
    conn = sqlite3.connect(db / "db")
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def errors_by_step(db: Path) -> dict[str, str]:
    return dict(query(db, "SELECT s.name, t.error FROM task t JOIN step s ON s.id = t.step_id WHERE t.state='failed'"))


def all_objects(db: Path) -> set[str]:
    return {"".join(p.relative_to(db / "objects").parts) for p in (db / "objects").rglob("*") if p.is_file()}


# -- outputs that are not plain files ------------------------------------------------------------------


def test_hostile_outputs_fail_the_task_naming_the_file(cli, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("outside OUTPUT_DIR, never to be read\n")
    outside_dir = tmp_path / "somedir"
    outside_dir.mkdir()
    (outside_dir / "f").write_text("x")
    cases = {
        "symlinkfile": f'ln -s {secret} "$OUTPUT_DIR/done_link"',
        "symlinkdir": f'ln -s {outside_dir} "$OUTPUT_DIR/done_dirlink"',
        "subdir": 'mkdir "$OUTPUT_DIR/done_sub"; echo x > "$OUTPUT_DIR/done_sub/inner"',
        "fifo": 'mkfifo "$OUTPUT_DIR/done_pipe"',
        "socket": "cd \"$OUTPUT_DIR\" && python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"done_sock\")'",
        "notutf8": 'echo x > "$OUTPUT_DIR/$(printf "done_bad\\377name")"',
        "dotfile": 'echo x > "$OUTPUT_DIR/.done_hidden"',
        "brackets": f'ln -s {secret} "$OUTPUT_DIR/done_[bold]x[red]"',  # not markup for anyone
    }
    steps = "".join(f"""
        [[step]]
        name = "{name}"
        start = true
        script = '''
        echo "a good file" > "$OUTPUT_DIR/done_good_{name}"
        {script}
        '''
        """ for name, script in cases.items())
    m = cli.manifest(steps)
    t0 = time.monotonic()
    r = cli.run(m, "-parallel", "4")
    assert time.monotonic() - t0 < 20  # the FIFO did not hang anything
    assert r.returncode == 1, r.err
    errors = errors_by_step(cli.db)
    expect = {
        "symlinkfile": ("'done_link'", "symlink"),
        "symlinkdir": ("'done_dirlink'", "symlink"),
        "subdir": ("'done_sub'", "directory"),
        "fifo": ("'done_pipe'", "not a regular file"),
        "socket": ("'done_sock'", "not a regular file"),
        "notutf8": ("done_bad\\xffname", "not UTF-8"),
        "dotfile": ("'.done_hidden'", "starts with '.'"),
        "brackets": ("'done_[bold]x[red]'", "symlink"),
    }
    assert set(errors) == set(expect)
    for step, (name, what) in expect.items():
        assert name in errors[step] and what in errors[step], (step, errors[step])
        assert name in r.err, f"the run's report should name {name}"
    brackets = query(cli.db, "SELECT t.id FROM task t JOIN step s ON s.id=t.step_id WHERE s.name='brackets'")[0][0]
    assert "'done_[bold]x[red]' is a symlink" in cli.ok("-db", cli.db, "logs", str(brackets)).out
    # nothing was committed for them, not even their good files, and nothing outside was read
    assert query(cli.db, "SELECT count(*) FROM output") == [(0,)]
    assert hashlib.sha256(secret.read_bytes()).hexdigest() not in all_objects(cli.db)
    assert cli("-db", cli.db, "fsck").returncode == 0


def test_an_empty_output_is_a_valid_object(cli):
    m = cli.manifest("""
        [[step]]
        name = "gen"
        start = true
        script = ': > "$OUTPUT_DIR/next_empty"'

        [[step]]
        name = "next"
        script = 'test -f "$INPUT_FILE" && wc -c < "$INPUT_FILE" > "$OUTPUT_DIR/done_size"'
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    assert (EMPTY_SHA256,) in query(cli.db, "SELECT hash FROM output WHERE name='next_empty'")
    size = query(cli.db, "SELECT hash FROM output WHERE name='done_size'")[0][0]
    assert cli.ok("-db", cli.db, "cat", size).out.strip() == "0"
    assert (cli.db / "objects" / EMPTY_SHA256[:2] / EMPTY_SHA256[2:4] / EMPTY_SHA256[4:]).stat().st_size == 0


def test_ten_thousand_outputs_from_one_task(cli):
    m = cli.manifest("""
        [[step]]
        name = "many"
        start = true
        script = '''
        cd "$OUTPUT_DIR"
        i=0; while [ $i -lt 10000 ]; do echo "$i" > "done_$i"; i=$((i+1)); done
        '''
        """)
    t0 = time.monotonic()
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    took = time.monotonic() - t0
    assert query(cli.db, "SELECT count(*), count(DISTINCT hash) FROM output") == [(10000, 10000)]
    assert os.listdir(cli.db / "tmp") == []
    print(f"10,000 outputs: {took:.1f}s")


def _run_measuring_rss(args: list, cwd: Path) -> tuple[int, int, float]:
    """Exit code, peak RSS in bytes of the task-pipeline process itself (its VmHWM, sampled until it
    exits: wait4's figure also counts descendants, which are the scripts, not us), and wall time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "task_pipeline", *map(str, args)], cwd=cwd, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.01)
    return p.returncode, peak, time.monotonic() - t0


@pytest.mark.slow  # about 12 s: the run hashes 2 GiB, then fsck hashes it again
def test_a_2_gib_output_is_streamed_in_flat_memory(cli):
    m = cli.manifest("""
        [[step]]
        name = "huge"
        start = true
        script = 'truncate -s 2G "$OUTPUT_DIR/done_huge"; echo small > "$OUTPUT_DIR/done_small"'
        """)
    rc, rss, took = _run_measuring_rss(["-manifest", m, "-db", cli.db, "-run", "-q"], cli.tmp)
    assert rc == 0
    print(f"2 GiB output: run took {took:.1f}s, peak RSS {rss / 2**20:.0f} MiB")
    assert rss < 150 * 2**20, f"peak RSS {rss / 2**20:.0f} MiB"
    (h, size), = query(cli.db, "SELECT o.hash, b.size FROM output o JOIN object b ON b.hash=o.hash WHERE o.name='done_huge'")
    assert size == 2 << 30
    assert h == "a7c744c13cc101ed66c29f672f92455547889cc586ce6d44fe76ae824958ea51"  # sha256 of 2 GiB of zeros
    rc, rss, took = _run_measuring_rss(["-db", cli.db, "fsck"], cli.tmp)
    print(f"fsck of it: {took:.1f}s, peak RSS {rss / 2**20:.0f} MiB")
    assert rc == 0 and rss < 150 * 2**20


# -- scripts that attack their input ----------------------------------------------------------------------


def test_a_script_cannot_damage_the_store_through_its_input(cli):
    m = cli.manifest("""
        [[step]]
        name = "gen"
        start = true
        script = 'echo precious > "$OUTPUT_DIR/vandal_1"; echo precious > "$OUTPUT_DIR/reader_1"'

        [[step]]
        name = "vandal"
        script = '''
        chmod -R u+w "$(dirname "$INPUT_FILE")" "$INPUT_FILE"
        echo vandalised > "$INPUT_FILE"
        echo more >> "$INPUT_FILE"
        truncate -s 0 "$INPUT_FILE"
        rm -f "$INPUT_FILE"
        echo done > "$OUTPUT_DIR/done_vandal"
        '''

        [[step]]
        name = "reader"
        script = 'sleep 0.2; cat "$INPUT_FILE" > "$OUTPUT_DIR/done_read"'
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run", "-parallel", "2")
    h = hashlib.sha256(b"precious\n").hexdigest()
    assert cli.ok("-db", cli.db, "cat", h).stdout == b"precious\n"
    read = query(cli.db, "SELECT hash FROM output WHERE name='done_read'")[0][0]
    assert read == h
    assert cli("-db", cli.db, "fsck").returncode == 0


# -- stores we must not touch -------------------------------------------------------------------------------


def _make_store(cli) -> Path:
    m = cli.manifest("""
        [[step]]
        name = "one"
        start = true
        script = 'echo 1 > "$OUTPUT_DIR/done"'
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    return m


def _assert_one_line_exit_3(r, *words: str) -> None:
    assert r.returncode == 3, (r.returncode, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.err, r.err
    for w in words:
        assert w in lines[0], lines[0]


def test_a_store_from_a_newer_version_is_refused(cli):
    m = _make_store(cli)
    conn = sqlite3.connect(cli.db / "db")
    with conn:
        conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.close()
    before = (cli.db / "db").read_bytes()
    for args in (["-manifest", m, "-db", cli.db, "-run"], ["-db", cli.db, "status"], ["-db", cli.db, "fsck"],
                 ["-db", cli.db, "gc"]):
        _assert_one_line_exit_3(cli(*args), "newer", "99")
    assert query(cli.db, "SELECT value FROM meta WHERE key='schema_version'") == [("99",)]
    assert (cli.db / "db").read_bytes() == before


@pytest.mark.parametrize("damage", ["garbage", "truncated-header"])
def test_a_corrupt_database_file_is_a_clear_error(cli, damage):
    m = _make_store(cli)
    db = cli.db / "db"
    for extra in ("db-wal", "db-shm"):
        (cli.db / extra).unlink(missing_ok=True)
    if damage == "garbage":
        db.write_bytes(os.urandom(3000) + b"\0" * 5000)
    else:
        data = db.read_bytes()
        db.write_bytes(b"SQLite format 2\0" + data[16:])
    for args in (["-manifest", m, "-db", cli.db, "-run"], ["-db", cli.db, "status"], ["-db", cli.db, "fsck"],
                 ["-db", cli.db, "gc"]):
        _assert_one_line_exit_3(cli(*args), str(db))


# -- a full disk --------------------------------------------------------------------------------------------


DISK_PIPELINE = """
    [[step]]
    name = "make"
    start = true
    script = 'for i in 1 2 3; do head -c 1000000 /dev/urandom > "$OUTPUT_DIR/work_$i"; done'

    [[step]]
    name = "work"
    script = '''
    {{ cat "$INPUT_FILE"; echo worked; }} > "$OUTPUT_DIR/done_$INPUT_NAME"
    if [ -e {squeeze} ]; then      # leave one inode: the store cannot make its shard directories
      n=$(( $(stat -f -c %d "$OUTPUT_DIR") - 1 ))
      i=0; while [ $i -lt $n ]; do : > "$TMPDIR/f$i" || break; i=$((i+1)); done
    fi
    '''
    """


def _disk_full_then_recover(cli, small_disk, tmp_path, *, leave: int, squeeze: bool, expect: str | tuple):
    flag = tmp_path / "squeeze"
    m = cli.manifest(DISK_PIPELINE.format(squeeze=flag))
    cli.ok("-manifest", m, "-db", cli.db, "-run", "-step", "make")
    if squeeze:
        flag.touch()
    filler = fill(small_disk, leave)
    r = cli.run(m, "-parallel", "1")
    assert r.returncode == 3, r.err
    # which write hits the full disk first (the input copy or the database's WAL) depends on the
    # filesystem's block accounting; either must be one clear store error
    assert any(e in r.err for e in ((expect,) if isinstance(expect, str) else expect)), r.err
    assert "Traceback" not in r.err
    # nothing of the work step was committed, nothing was marked failed, and the database is sound
    # (a task whose re-queue could not be written either stays leased by the dead runner, and the
    # next run takes it back at once)
    states = dict(query(cli.db, "SELECT state, count(*) FROM task t JOIN step s ON s.id=t.step_id "
                                "WHERE s.name='work' GROUP BY state"))
    assert set(states) <= {"pending", "running"} and sum(states.values()) == 3, states
    assert query(cli.db, "PRAGMA integrity_check") == [("ok",)]
    assert cli("-db", cli.db, "fsck").returncode == 0
    # space comes back: a later run completes
    filler.unlink()
    flag.unlink(missing_ok=True)
    r = cli.run(m)
    assert r.returncode == 0, r.err
    assert query(cli.db, "SELECT count(*) FROM task WHERE state='done'") == [(4,)]
    assert cli("-db", cli.db, "fsck").returncode == 0
    return r


def test_disk_full_preparing_the_input(cli, small_disk, tmp_path):
    # 500 KB left: the 1 MB input copy cannot be made
    _disk_full_then_recover(cli, small_disk, tmp_path, leave=500_000, squeeze=False, expect=("cannot prepare the input", "cannot write the database"))


def test_disk_full_while_the_script_writes_its_output(cli, small_disk, tmp_path):
    # 1.5 MB left: the input copy fits, the script's 1 MB output does not (and the script ignores the error)
    _disk_full_then_recover(cli, small_disk, tmp_path, leave=1_500_000, squeeze=False, expect="is full")


def test_disk_full_while_storing_an_output(cli, small_disk, tmp_path):
    # plenty of bytes, but no inode left for the store's shard directories
    _disk_full_then_recover(cli, small_disk, tmp_path, leave=8_000_000, squeeze=True, expect="cannot store output")


def test_a_full_disk_under_the_database_is_a_store_error(cli, small_disk):
    """A COMMIT that fails for lack of space is rolled back and reported as a StoreError (exit 3)."""
    from task_pipeline import state
    from task_pipeline.db import open_database
    from task_pipeline.errors import StoreError

    conn = open_database(str(small_disk), create=True)
    filler = fill(small_disk, 0)
    with pytest.raises(StoreError, match="cannot write the database"):
        with conn.transaction():
            conn.execute("INSERT INTO meta(key, value) VALUES ('big', ?)", ("x" * 400_000,))
    assert not conn.in_transaction
    filler.unlink()
    with conn.transaction():
        conn.execute("INSERT INTO meta(key, value) VALUES ('small', 'ok')")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert state.meta(conn, "big") is None and state.meta(conn, "small") == "ok"


def test_an_error_inside_the_engine_is_one_line(cli, monkeypatch, capsys):
    """anyio wraps what a task raises in an exception group; the CLI still prints one line and exit 3."""
    from task_pipeline import cli as cli_module, commands
    from task_pipeline.errors import StoreError

    _make_store(cli)

    def boom(a, out):
        raise ExceptionGroup("unhandled errors in a TaskGroup", [StoreError("cannot write the database: full")])

    monkeypatch.setattr(commands, "handler", lambda command: boom)
    assert cli_module.main(["-db", str(cli.db), "status"]) == 3
    err = capsys.readouterr().err
    assert err.strip() == "task-pipeline: cannot write the database: full"
