"""Store safety: no script, no concurrent command and no local user can destroy or poison results (issue 15).

Each test here reproduces a way a probe found to lose or poison data, and failed before the fix.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest

from test_hostile import errors_by_step, fill, query, small_disk  # noqa: F401  (small_disk is a fixture)


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
        name = "make"
        start = true
        script = 'for i in 1 2; do echo $i > "$OUTPUT_DIR/work_$i"; done'

        [[step]]
        name = "work"
        parallel = 1
        script = '''
        if [ "$(cat "$INPUT_FILE")" = 1 ]; then
          # escapes the process group and writes into "its" OUTPUT_DIR a second later
          setsid sh -c 'sleep 1; echo planted > "$0/done_planted"' "$OUTPUT_DIR" </dev/null >/dev/null 2>&1 &
        else
          sleep 2
        fi
        echo "worked on $(cat "$INPUT_FILE")" > "$OUTPUT_DIR/done_$INPUT_NAME"
        '''
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run", "-parallel", "1")
    time.sleep(0.5)
    names = {n for (n,) in query(cli.db, "SELECT name FROM output")}
    assert "done_planted" not in names
    assert {"done_work_1", "done_work_2"} <= names


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
