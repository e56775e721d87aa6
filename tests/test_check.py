"""`check STEP` (issue 14): re-runs done tasks in scratch and says whether their outputs came out
byte-identical, changing nothing in the store. Real scripts, real stores (on PostgreSQL: in
test_postgres.py's tour of every command)."""

from __future__ import annotations

import json
import os

import backends
from task_pipeline.commands.check import FileDiff, compare, text_diff

PIPELINE = """
[[step]]
name = "gen"
start = true
script = 'for i in 1 2 3; do printf "line one\\nitem %s\\nline three\\n" $i > "$OUTPUT_DIR/steady_$i.txt"; done'

[[step]]
name = "steady"
script = '''
if [ -n "$BREAK" ]; then echo "broken on purpose" >&2; exit 4; fi
tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/shaky_${INPUT_NAME#steady_}"
cp "$INPUT_FILE" "$OUTPUT_DIR/copy_${INPUT_NAME#steady_}"
'''

[[step]]
name = "shaky"
script = '''
{ head -1 "$INPUT_FILE"; date +%s%N; tail -1 "$INPUT_FILE"; } > "$OUTPUT_DIR/done_stamped_$INPUT_NAME"
cp "$INPUT_FILE" "$OUTPUT_DIR/done_plain_$INPUT_NAME"
'''

[[step]]
name = "all"
gather = true
inputs = ["copy"]
script = 'cat "$INPUT_DIR"/* > "$OUTPUT_DIR/done_everything"'
"""


def store_snapshot(cli) -> tuple:
    """What check must leave alone: the database's rows and the objects on disk."""
    rows = tuple(backends.query(cli.db, f"SELECT count(*) FROM {t}")[0][0]
                 for t in ("task", "attempt", "output", "object", "runner", "gather_member"))
    files = sorted(str(p) for p in (cli.db / "objects").rglob("*") if p.is_file())
    return rows, files


def test_check_finds_a_step_deterministic_and_another_not_and_changes_nothing(cli):
    m = cli.manifest(PIPELINE)
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    before = store_snapshot(cli)

    r = cli("check", "steady", "-db", cli.db)
    assert r.returncode == 0, r.err
    assert r.out.count(": identical (2 output(s))") == 3
    assert "steady v1: 3 task(s) re-run, every one byte-identical" in r.out

    r = cli("check", "shaky", "-db", cli.db)
    assert r.returncode == 1, r.err
    assert r.out.count("differs: done_stamped_shaky_") == 3 and "done_plain" not in r.out
    # a short unified diff of the text, the line that changed and its neighbours
    assert "--- done_stamped_shaky_1.txt (recorded)" in r.out and "+++ done_stamped_shaky_1.txt (re-run)" in r.out
    assert " LINE ONE" in r.out and r.out.count("\n    -1") >= 3 and r.out.count("\n    +1") >= 3
    assert "shaky v1: of 3 task(s) re-run, 3 gave other bytes; early cutoff" in r.out

    data = json.loads(cli("check", "shaky", "-db", cli.db, "--json", "--sample", "2").out)
    assert (data["step"], data["done"], data["checked"], data["differ"], data["identical"]) == ("shaky", 3, 2, 2, 0)
    files = data["tasks"][0]["files"]
    assert [(f["name"][:19], f["status"]) for f in files] == [("done_stamped_shaky_", "changed")]
    assert files[0]["recorded"] != files[0]["rerun"] and files[0]["diff"].startswith("--- ")

    # a re-run that fails says how, and counts against the step
    r = cli("check", "steady", "-db", cli.db, "--sample", "1", env={"BREAK": "1"})
    assert r.returncode == 1 and "failed on re-run: exit code 4: broken on purpose" in r.out, r.out
    assert "steady v1: of 1 task(s) re-run (a sample of 3 done), 1 failed\n" in r.out

    # a gather step is checked with its members laid out as in a run
    r = cli("check", "all", "-db", cli.db)
    assert r.returncode == 0 and "all#" in r.out and "gather: identical (1 output(s))" in r.out

    assert store_snapshot(cli) == before, "check stored or recorded something"
    assert os.listdir(cli.db / "tmp") == []


def test_check_refuses_what_it_cannot_do_in_one_line(cli):
    m = cli.manifest(PIPELINE)
    cli.ok("-manifest", m, "-db", cli.db, "-run", "-step", "gen")
    r = cli("check", "nope", "-db", cli.db)
    assert r.returncode == 2 and r.err.count("\n") == 1 and "no step named 'nope'" in r.err
    r = cli("check", "steady", "-db", cli.db, "--sample", "0")
    assert r.returncode == 2 and "--sample must be at least 1" in r.err
    r = cli("check", "-db", cli.db)
    assert r.returncode == 2 and "usage: task-pipeline check STEP" in r.err
    r = cli.ok("check", "steady", "-db", cli.db)  # its tasks are queued, none done yet
    assert "steady v1 has no done tasks to check" in r.out


def test_compare_names_changed_missing_and_extra_outputs():
    assert compare({"a": "1", "b": "2"}, {"a": "1", "b": "2"}) == []
    assert compare({"a": "1", "b": "2", "c": "3"}, {"a": "9", "b": "2", "d": "4"}) == [
        FileDiff("a", "changed", "1", "9"), FileDiff("c", "missing", "3", None), FileDiff("d", "extra", None, "4")]


def test_text_diff_is_short_and_only_for_text():
    old = "".join(f"line {i}\n" for i in range(100)).encode()
    new = old.replace(b"line 50\n", b"line fifty\n")
    d = text_diff("f.txt", old, new)
    assert d.splitlines()[:2] == ["--- f.txt (recorded)", "+++ f.txt (re-run)"]
    assert "-line 50" in d and "+line fifty" in d and "line 10\n" not in d
    many = text_diff("f.txt", old, b"".join(f"other {i}\n".encode() for i in range(100)), limit=10)
    assert len(many.splitlines()) == 11 and many.endswith("more diff lines)")
    assert text_diff("f.bin", b"\x00\x01", b"\x00\x02") is None
    assert text_diff("f.bin", b"\xff", b"\xfe") is None
