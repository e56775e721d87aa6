"""Store safety: no script, no concurrent command and no local user can destroy or poison results (issue 15).

Each test here reproduces a way a probe found to lose or poison data, and failed before the fix.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from test_hostile import errors_by_step, query


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def obj(db: Path, h: str) -> Path:
    return db / "objects" / h[:2] / h[2:4] / h[4:]


def victim_dir(tmp_path: Path) -> Path:
    """A directory outside the store with files a runner must never touch."""
    v = tmp_path / "victim"
    v.mkdir()
    for name in ("passwd", "hosts", "done_x"):
        (v / name).write_text(f"precious {name}\n")
    (v / "sub").mkdir()
    (v / "sub" / "deep").write_text("deep\n")
    return v


def assert_untouched(v: Path) -> None:
    for name in ("passwd", "hosts", "done_x"):
        assert (v / name).read_text() == f"precious {name}\n", name
        assert stat.S_IMODE((v / name).stat().st_mode) & 0o200, f"{name} was made read-only"
    assert (v / "sub" / "deep").read_text() == "deep\n"


# -- 1. a script that replaces its scratch directories with symlinks -----------------------------------


@pytest.mark.parametrize("tail", ["exit 0", "exit 1"])
def test_output_dir_replaced_by_a_symlink_moves_and_deletes_nothing_outside(cli, tmp_path, tail):
    v = victim_dir(tmp_path)
    m = cli.manifest(f"""
        [[step]]
        name = "evil"
        start = true
        script = '''
        rmdir "$OUTPUT_DIR"; ln -s {v} "$OUTPUT_DIR"
        {tail}
        '''
        """)
    r = cli.run(m)
    assert r.returncode == 1, r.err
    assert_untouched(v)
    if tail == "exit 0":
        assert "OUTPUT_DIR was removed or replaced" in errors_by_step(cli.db)["evil"]
    # nothing from the victim reached the store
    for name in ("passwd", "hosts", "done_x"):
        assert not obj(cli.db, sha(f"precious {name}\n".encode())).exists()


def test_scratch_symlinks_to_outside_are_removed_not_followed(cli, tmp_path):
    """TMPDIR, in/ and the log files replaced by symlinks: the cleanup removes the links only."""
    v = victim_dir(tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("keep me\n")
    secret.chmod(0o600)
    m = cli.manifest(f"""
        [[step]]
        name = "evil"
        start = true
        script = '''
        a=$(dirname "$OUTPUT_DIR")
        rm -rf "$TMPDIR"; ln -s {v} "$TMPDIR"
        rm -rf "$a/in"; ln -s {v}/sub "$a/in"
        rm -f "$a/stdout" "$a/stderr"; ln -s {secret} "$a/stdout"; ln -s {secret} "$a/stderr"
        echo "written to my own stdout"; echo "and stderr" >&2
        echo ok > "$OUTPUT_DIR/done_ok"
        '''
        """)
    r = cli.run(m)
    assert r.returncode == 0, r.err
    assert_untouched(v)
    assert secret.read_text() == "keep me\n" and stat.S_IMODE(secret.stat().st_mode) == 0o600
    # the logs were kept from the files the script was given, not from where the names pointed later
    log = cli.ok("-db", cli.db, "logs", "1").out
    assert "written to my own stdout" in log and "and stderr" in log
    assert list((cli.db / "tmp").iterdir()) == []


# -- 7. a hard-linked output ---------------------------------------------------------------------------


def test_a_hard_linked_output_is_copied_so_the_outside_file_stays_writable_and_the_object_sound(cli, tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("original\n")
    m = cli.manifest(f"""
        [[step]]
        name = "link"
        start = true
        script = 'ln {src} "$OUTPUT_DIR/done_hl"'
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    assert stat.S_IMODE(src.stat().st_mode) & 0o200, "the outside file was made read-only"
    assert src.stat().st_nlink == 1, "the store shares the outside file's inode"
    src.write_text("edited later\n")
    assert obj(cli.db, sha(b"original\n")).read_bytes() == b"original\n"
    assert cli("-db", cli.db, "fsck").returncode == 0


# -- 8. a straggler of an earlier attempt writing into a reused OUTPUT_DIR ------------------------------


def test_a_setsid_straggler_cannot_write_into_a_later_attempts_output_dir(cli):
    m = cli.manifest("""
        [[step]]
        name = "first"
        start = true
        script = '''
        # escapes the process group and writes into "its" OUTPUT_DIR a second later
        setsid sh -c 'sleep 1; echo planted > "$0/done_planted"' "$OUTPUT_DIR" </dev/null >/dev/null 2>&1 &
        echo go > "$OUTPUT_DIR/second_1"
        sleep 0.5  # let the straggler leave the process group before the attempt ends
        '''

        [[step]]
        name = "second"
        script = 'sleep 2; echo worked > "$OUTPUT_DIR/done_ok"'
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run", "-parallel", "1")
    time.sleep(0.5)
    names = {n for (n,) in query(cli.db, "SELECT name FROM output")}
    assert "done_planted" not in names
    assert {"second_1", "done_ok"} <= names


# -- 4 and 9. a missing or damaged input object ------------------------------------------------------------


FIVE = """
    [[step]]
    name = "process"
    script = 'tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"'
    """


def _five_submitted(cli, tmp_path) -> tuple[Path, list[str]]:
    m = cli.manifest(FIVE)
    files = []
    for i in range(5):
        f = tmp_path / f"in{i}.txt"
        f.write_text(f"input {i}\n")
        files.append(str(f))
    cli.ok("-manifest", m, "-db", cli.db, "validate")
    cli.ok("-manifest", m, "-db", cli.db, "-run")  # registers the store (nothing to do yet)
    cli.ok("-db", cli.db, "submit", "process", *files)
    return m, [sha(f"input {i}\n".encode()) for i in range(5)]


def test_a_missing_input_object_fails_that_task_and_the_others_finish(cli, tmp_path):
    m, hashes = _five_submitted(cli, tmp_path)
    obj(cli.db, hashes[2]).unlink()
    t0 = time.monotonic()
    r = cli.run(m, timeout=60)
    assert time.monotonic() - t0 < 30
    assert r.returncode == 1, r.err
    assert "Traceback" not in r.err
    done = query(cli.db, "SELECT count(*) FROM task WHERE state='done'")[0][0]
    assert done == 4
    err = errors_by_step(cli.db)["process"]
    assert hashes[2] in err and "missing" in err
    # it stays failed, without hanging, until it is dealt with
    r = cli.run(m, timeout=60)
    assert r.returncode == 1 and hashes[2][:12] in r.err + r.out
    assert cli("-db", cli.db, "fsck").returncode == 1


def test_a_tampered_input_object_is_caught_before_the_script_sees_it(cli, tmp_path):
    m, hashes = _five_submitted(cli, tmp_path)
    p = obj(cli.db, hashes[1])
    p.chmod(0o644)
    p.write_text("input 1 tampered\n")
    p.chmod(0o444)
    r = cli.run(m)
    assert r.returncode == 1, r.err
    err = errors_by_step(cli.db)["process"]
    assert hashes[1] in err and "damaged" in err
    # the script never saw the tampered bytes
    assert not obj(cli.db, sha(b"INPUT 1 TAMPERED\n")).exists()
    assert query(cli.db, "SELECT count(*) FROM task WHERE state='done'")[0][0] == 4
    # one attempt only: retrying cannot mend an input
    assert query(cli.db, "SELECT attempts FROM task WHERE state='failed'") == [(1,)]


# -- 5. disk full is never the script's fault ---------------------------------------------------------------


def test_a_script_that_fails_on_a_full_disk_and_cleans_up_goes_back_to_the_queue(cli, small_disk, tmp_path):
    """The script fails with ENOSPC and removes its partial output, so space is back when we look."""
    flag = tmp_path / "fill"
    m = cli.manifest(f"""
        [[step]]
        name = "make"
        start = true
        script = 'echo x > "$OUTPUT_DIR/work_1"'

        [[step]]
        name = "work"
        script = '''
        if [ -e {flag} ]; then
          head -c 50000000 /dev/zero > "$OUTPUT_DIR/done_big" || {{ rm -f "$OUTPUT_DIR/done_big"; exit 1; }}
        fi
        echo ok > "$OUTPUT_DIR/done_small"
        '''
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run", "-step", "make")
    flag.touch()
    r = cli.run(m)
    assert r.returncode == 3, r.err
    assert "full" in r.err and "Traceback" not in r.err
    assert query(cli.db, "SELECT count(*) FROM task WHERE state='failed'") == [(0,)]
    flag.unlink()
    r = cli.run(m)
    assert r.returncode == 0, r.err
    assert query(cli.db, "SELECT count(*) FROM task WHERE state='done'") == [(2,)]


# -- 2. gc while a submit is storing files ---------------------------------------------------------------


def test_gc_during_a_submit_keeps_what_the_submit_stored_and_has_not_committed(cli, tmp_path):
    m = cli.manifest(FIVE)
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    early = tmp_path / "early.txt"
    early.write_text("stored first, referenced last\n")
    # the submit stores early.txt at once, then waits on stdin before it commits both references
    p = subprocess.Popen(
        [sys.executable, "-m", "task_pipeline", "submit", "-db", str(cli.db), "process", str(early), "-"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cli.tmp,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        h = sha(early.read_bytes())
        for _ in range(100):
            if obj(cli.db, h).exists():
                break
            time.sleep(0.05)
        assert obj(cli.db, h).exists()
        time.sleep(2.5)  # older than gc's slack by now
        r = cli("-db", cli.db, "gc")
        assert r.returncode == 2 and "submit" in r.err and "active on this store" in r.err, r.err
        r = cli.ok("-db", cli.db, "gc", "--force", "--json")
        assert obj(cli.db, h).exists(), r.out
    finally:
        out, err = p.communicate(b"late stdin\n", timeout=30)
    assert p.returncode == 0, err
    assert cli("-db", cli.db, "fsck").returncode == 0
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    assert query(cli.db, "SELECT count(*) FROM task WHERE state='done'") == [(2,)]


# -- 3. a database file that lost its contents ---------------------------------------------------------------


def test_a_zero_length_database_next_to_objects_is_refused_and_nothing_is_deleted(cli):
    m = cli.manifest(FIVE + """
        [[step]]
        name = "gen"
        start = true
        script = 'for i in 1 2 3; do echo $i > "$OUTPUT_DIR/process_$i"; done'
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    objects = sorted(p for p in (cli.db / "objects").rglob("*") if p.is_file())
    assert len(objects) >= 4
    for extra in ("db-wal", "db-shm"):
        (cli.db / extra).unlink(missing_ok=True)
    (cli.db / "db").write_bytes(b"")
    for args in (["status"], ["fsck"], ["gc"], ["gc", "--force"], ["export", "done"]):
        r = cli("-db", cli.db, *args)
        assert r.returncode == 3 and "empty" in r.err and "Traceback" not in r.err, (args, r.err)
        assert len(r.err.strip().splitlines()) == 1
    r = cli("-manifest", m, "-db", cli.db, "-run")
    assert r.returncode == 3 and "holds objects" in r.err, r.err
    assert sorted(p for p in (cli.db / "objects").rglob("*") if p.is_file()) == objects
    assert (cli.db / "db").stat().st_size == 0


# -- 6. permissions, ownership, planted symlinks ---------------------------------------------------------------


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]}


def test_a_store_made_under_umask_000_is_not_writable_by_others(cli, tmp_path):
    m = cli.manifest(FIVE + """
        [[step]]
        name = "gen"
        start = true
        script = 'echo 1 > "$OUTPUT_DIR/process_1"'
        """)
    r = subprocess.run(["sh", "-c", 'umask 000; exec "$0" -m task_pipeline run "$1" -db "$2"', sys.executable,
                        str(m), str(cli.db)], cwd=cli.tmp, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    modes = _modes(cli.db)
    assert modes["."] == 0o750 and modes["objects"] == 0o750 and modes["tmp"] == 0o700
    assert modes["db"] == 0o600
    for path, mode in modes.items():
        assert not mode & 0o002, f"{path} is writable by others ({mode:o})"
        if path.startswith("objects/") and path.count("/") == 3:
            assert mode == 0o444, (path, oct(mode))
        elif path.startswith("objects/"):
            assert mode == 0o750, (path, oct(mode))


def test_a_world_writable_or_foreign_store_is_refused(cli):
    m = cli.manifest(FIVE)
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    os.chmod(cli.db / "tmp", 0o777)
    r = cli("-db", cli.db, "status")
    assert r.returncode == 3 and "writable by every user" in r.err and "chmod o-w" in r.err, r.err
    os.chmod(cli.db / "tmp", 0o700)
    cli.ok("-db", cli.db, "status")
    if os.geteuid() != 0:
        pytest.skip("changing a store's owner needs root")
    os.chown(cli.db, 65534, -1)
    try:
        r = cli("-db", cli.db, "status")
        assert r.returncode == 3 and "belongs to" in r.err, r.err
    finally:
        os.chown(cli.db, 0, -1)


def test_a_symlink_planted_in_objects_is_never_followed(cli, tmp_path):
    m, hashes = _five_submitted(cli, tmp_path)
    attacker = tmp_path / "attacker.txt"
    attacker.write_text("attacker's content\n")
    p = obj(cli.db, hashes[0])
    p.unlink()
    p.symlink_to(attacker)
    r = cli("-db", cli.db, "cat", hashes[0])
    assert r.returncode == 3 and b"attacker" not in r.stdout and "symlink" in r.err, r.err
    r = cli.run(m)
    assert r.returncode == 1
    assert "symlink" in errors_by_step(cli.db)["process"]
    assert not obj(cli.db, sha(b"ATTACKER'S CONTENT\n")).exists()
    r = cli("-db", cli.db, "fsck")
    assert r.returncode == 1 and "not a regular file" in r.err


def test_another_user_cannot_plant_anything_in_a_store(cli, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to act as a second user")
    import pwd

    try:
        other = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    m = cli.manifest(FIVE + """
        [[step]]
        name = "gen"
        start = true
        script = 'sleep 3; echo 1 > "$OUTPUT_DIR/process_1"'
        """)
    os.chmod(tmp_path, 0o755)
    run = subprocess.Popen([sys.executable, "-m", "task_pipeline", "run", str(m), "-db", str(cli.db)], cwd=cli.tmp,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            if (cli.db / "tmp").exists() and any((cli.db / "tmp").iterdir()):
                break
            time.sleep(0.05)
        victim = tmp_path / "root-only"
        victim.write_text("root's secret\n")
        victim.chmod(0o600)
        for target in ("tmp/planted", "objects/planted", "planted"):
            r = subprocess.run(["runuser", "-u", other.pw_name, "--", "ln", "-s", str(victim), str(cli.db / target)],
                               capture_output=True, text=True)
            assert r.returncode != 0, f"nobody could plant {target}"
    finally:
        out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert victim.read_text() == "root's secret\n"


# -- 11. a heartbeat kept from the database ---------------------------------------------------------------


def test_a_runner_that_cannot_renew_stops_its_scripts_so_no_task_runs_twice(cli, tmp_path):
    """Another connection holds the write lock longer than a lease: the runner stops its own scripts
    before its leases expire, and the second runner's copies never overlap them."""
    log = tmp_path / "runs.log"
    m = cli.manifest(f"""
        [[step]]
        name = "gen"
        start = true
        script = 'for i in 1 2 3 4; do echo $i > "$OUTPUT_DIR/work_$i"; done'

        [[step]]
        name = "work"
        script = '''
        # a watcher outside the process group logs when the script is gone (killed, or a zombie)
        setsid sh -c 'while kill -0 "$1" 2>/dev/null && [ "$(cut -d" " -f3 /proc/$1/stat)" != Z ]; do
          sleep 0.01; done; echo "end $2 $1 $(date +%s.%N)" >> "$3"' sh $$ "$INPUT_NAME" {log} \\
          </dev/null >/dev/null 2>&1 &
        echo "start $INPUT_NAME $$ $(date +%s.%N)" >> {log}
        sleep 8
        echo ok > "$OUTPUT_DIR/done_$INPUT_NAME"
        '''
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run", "-step", "gen")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "task_pipeline", "run", str(m), "-db", str(cli.db), "--lease", "6",
                              "-parallel", "4"], cwd=cli.tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(200):
        if log.exists() and log.read_text().count("start") == 4:
            break
        time.sleep(0.05)
    # hold the write lock for 9 s: longer than the lease, like a long gc or a backup
    holder = sqlite3.connect(cli.db / "db", timeout=30, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    second = subprocess.Popen([sys.executable, "-m", "task_pipeline", "run", str(m), "-db", str(cli.db), "--lease", "6",
                               "-parallel", "4"], cwd=cli.tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(9)
    holder.execute("COMMIT")
    holder.close()
    _, err1 = first.communicate(timeout=120)
    _, err2 = second.communicate(timeout=120)
    err1, err2 = err1.decode(), err2.decode()
    assert "could not renew leases" in err1, err1
    assert "Traceback" not in err1 + err2
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    assert query(cli.db, "SELECT count(*) FROM task WHERE state='done'") == [(5,)]
    # no input ran in two places at once
    spans: dict[str, list[tuple[float, float]]] = {}
    starts: dict[str, float] = {}
    for line in log.read_text().splitlines():
        what, name, pid, t = line.split()
        if what == "start":
            starts[pid] = float(t)
        elif pid in starts:  # (a script killed between starting its watcher and logging its start did nothing)
            spans.setdefault(name, []).append((starts.pop(pid), float(t)))
    assert not starts, f"scripts whose end was not seen: {starts}"
    for name, s in spans.items():
        s.sort()
        for (a0, a1), (b0, b1) in zip(s, s[1:]):
            assert b0 >= a1 - 0.2, f"{name} ran twice at once: {s}"


# -- 12. a huge sparse output does not hold up a stop ---------------------------------------------------------


def test_sigterm_stops_a_run_that_is_hashing_a_huge_sparse_output(cli):
    m = cli.manifest("""
        [[step]]
        name = "big"
        start = true
        script = 'truncate -s 1T "$OUTPUT_DIR/done_sparse"'
        """)
    p = subprocess.Popen([sys.executable, "-m", "task_pipeline", "run", str(m), "-db", str(cli.db), "--grace", "1"],
                         cwd=cli.tmp, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    time.sleep(2)
    p.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    _, err = p.communicate(timeout=60)
    assert time.monotonic() - t0 < 15, "the stop waited for the hash"
    assert p.returncode == 143, err
    assert query(cli.db, "SELECT state FROM task") == [("pending",)]


# -- 12. a database damaged in ways SQLite's own checks do not see ---------------------------------------------


def test_a_bit_flipped_database_gives_one_line_never_a_traceback(cli):
    """Flipped bits land in states, JSON columns, names and the schema itself: every command either
    works or says in one line that the database is damaged (exit 3); none shows a traceback."""
    import random
    import shutil

    m = cli.manifest(FIVE + """
        [[step]]
        name = "gen"
        start = true
        script = 'for i in $(seq 1 60); do echo $i > "$OUTPUT_DIR/process_$i"; done'
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run", "-q")
    conn = sqlite3.connect(cli.db / "db")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    pristine = (cli.db / "db").read_bytes()
    damaged = 0
    for seed in range(12):
        rnd = random.Random(seed)
        data = bytearray(pristine)
        for _ in range(rnd.choice([1, 4, 30, 100])):
            i = rnd.randrange(100, len(data))
            data[i] ^= 1 << rnd.randrange(8)
        copy = cli.tmp / f"damaged{seed}"
        shutil.copytree(cli.db, copy)
        for extra in ("db-wal", "db-shm"):
            (copy / extra).unlink(missing_ok=True)
        (copy / "db").write_bytes(bytes(data))
        for args in (["status", "--json"], ["fsck"], ["gc", "--dry-run"], ["export", "done"]):
            r = cli(*args, "-db", copy)
            assert "Traceback" not in r.err, (seed, args, r.err[-2000:])
            assert r.returncode in (0, 1, 3), (seed, args, r.returncode, r.err)
            if r.returncode == 3:
                damaged += 1
                assert len(r.err.strip().splitlines()) == 1, (seed, args, r.err)
        shutil.rmtree(copy)
    assert damaged > 0  # the flips did hit something


# -- 10. escape sequences from scripts never reach a terminal raw -----------------------------------------------


OSC52 = "\x1b]52;c;ZXZpbA==\x07"      # write "evil" to the clipboard
TITLE = "\x1b]0;pwned\x07"            # change the window title


def _on_a_terminal(cli, *args) -> str:
    """Run the CLI with its stdout and stderr on a pseudo-terminal; return what the terminal got."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(cli.tmp)
        os.execve(sys.executable, [sys.executable, "-m", "task_pipeline", *cli.argv(*args)],
                  cli.environ({"COLUMNS": "200", "TERM": "xterm"}))
    data = b""
    while True:
        r, _, _ = select.select([fd], [], [], 30)
        if not r:
            break
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    os.waitpid(pid, 0)
    os.close(fd)
    return data.decode("utf-8", "replace")


EVIL_SCRIPT = r"""
    [[step]]
    name = "process"
    script = '''
    printf 'out \033]52;c;ZXZpbA==\007\n'
    printf 'err \033]0;pwned\007 \033]52;c;ZXZpbA==\007\n' >&2
    exit 3
    '''
    """


def test_escape_sequences_from_scripts_and_names_are_shown_not_obeyed(cli, tmp_path):
    m = cli.manifest(EVIL_SCRIPT)
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    f = tmp_path / f"evil{TITLE}.txt"
    f.write_text("x\n")
    seen = {
        "submit": _on_a_terminal(cli, "submit", "process", f, "-db", cli.db),
        "run": _on_a_terminal(cli, "run", m, "-db", cli.db),
        "status": _on_a_terminal(cli, "status", "-db", cli.db),
    }
    (task,) = [t for t, in query(cli.db, "SELECT id FROM task")]
    seen["logs"] = _on_a_terminal(cli, "logs", str(task), "-db", cli.db)
    for what, text in seen.items():
        assert "\x1b]" not in text and "\x07" not in text, (what, text)
    assert "\\x1b]52" in seen["logs"] and "\\x1b]0;pwned" in seen["run"] + seen["status"] + seen["submit"]
    # piped (not a terminal), logs are the script's bytes as they were written
    raw = cli.ok("logs", str(task), "-db", cli.db).out
    assert OSC52 in raw


def test_a_read_only_store_is_called_read_only_not_damaged(cli, small_disk):
    m = cli.manifest(FIVE + """
        [[step]]
        name = "gen"
        start = true
        script = 'echo 1 > "$OUTPUT_DIR/process_1"'
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    r = subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
    try:
        for args in (["-manifest", m, "-db", cli.db, "-run"], ["-db", cli.db, "retry"], ["-db", cli.db, "status"]):
            r = cli(*args)
            assert "Traceback" not in r.err and "backup" not in r.err and "damaged" not in r.err, (args, r.err)
            if r.returncode != 0:
                assert r.returncode == 3 and "read-only" in r.err, (args, r.err)
                assert len(r.err.strip().splitlines()) == 1
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=False)
