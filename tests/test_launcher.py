"""The launcher process and reused attempt directories (issue 13): faster, and no less safe.

Scripts are started by a launcher process with posix_spawn, and an attempt's directories
are emptied and reused when nothing of the attempt is left running. These tests check what
a script sees (signals, file descriptors, large requests) and that reuse never lets one
attempt's leftovers reach another.
"""

from __future__ import annotations

import json

from test_hostile import query


def outputs(cli) -> dict[str, str]:
    """name -> content of every final output"""
    rows = query(cli.db, "SELECT name, hash FROM output WHERE name LIKE 'done%'")
    return {n: cli.ok("-db", cli.db, "cat", h).out for n, h in rows}


def test_a_script_sees_only_its_own_descriptors_and_default_signals(cli):
    """Nothing of the runner or launcher leaks into a script: no inherited sockets or files,
    and SIGPIPE is not ignored (Python ignores it; a shell pipeline must end on it)."""
    m = cli.manifest("""
        [[step]]
        name = "look"
        start = true
        script = '''
        # tested one by one, without opening anything: a listing would show its own descriptor, and a
        # pipeline or redirection the shell's
        open=""
        n=3; while [ $n -lt 64 ]; do [ -e /proc/$$/fd/$n ] && open="$open $n"; n=$((n + 1)); done
        echo "0 1 2$open" > "$OUTPUT_DIR/done_fds"
        grep SigIgn /proc/$$/status > "$OUTPUT_DIR/done_ignored"
        yes | head -n 3 > "$OUTPUT_DIR/done_pipe"
        '''
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    out = outputs(cli)
    assert sorted(out["done_fds"].split(), key=int) == ["0", "1", "2"], out["done_fds"]
    ignored = int(out["done_ignored"].split()[1], 16)
    assert not ignored & (1 << (13 - 1)), f"SIGPIPE is ignored in scripts: {out['done_ignored']}"
    assert out["done_pipe"] == "y\ny\ny\n"


def test_a_request_larger_than_a_message_reaches_the_script_whole(cli):
    """A step whose environment and script exceed one socket message (64 KiB) travels in a memfd."""
    big = "x" * 100_000  # over one message; under the kernel's 128 KiB limit for one variable
    m = cli.manifest(f"""
        [[step]]
        name = "big"
        start = true
        env = {{ BIG = "{big}" }}
        script = 'printf %s "$BIG" | wc -c > "$OUTPUT_DIR/done_size"'
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    assert outputs(cli)["done_size"].strip() == str(len(big))


def test_attempt_directories_are_reused_under_new_names(cli):
    """Eight tasks on one script slot: every attempt has an OUTPUT_DIR of its own name, and the
    directories themselves are reused (a slot's inode comes back), so a task makes none."""
    m = cli.manifest("""
        [[step]]
        name = "fan"
        start = true
        script = 'for i in 1 2 3 4 5 6 7 8; do echo $i > "$OUTPUT_DIR/probe_$i"; done'

        [[step]]
        name = "probe"
        script = 'printf "%s %s" "$OUTPUT_DIR" "$(stat -c %i "$OUTPUT_DIR")" > "$OUTPUT_DIR/done_$INPUT_NAME"'
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run", "-parallel", "1")
    seen = [v.split() for v in outputs(cli).values()]
    assert len(seen) == 8
    names = {name for name, _ in seen}
    inodes = {ino for _, ino in seen}
    assert len(names) == 8, "two attempts were given the same OUTPUT_DIR name"
    assert len(inodes) <= 2, f"the directories were made anew each time: {sorted(inodes)}"


def test_a_straggler_holding_its_output_dir_open_never_writes_into_a_later_attempt(cli):
    """A process that left its script's process group and keeps OUTPUT_DIR as its working
    directory (so renaming the directory would not shake it off): its attempt's directories
    are not reused, and what it writes later lands nowhere that is collected."""
    m = cli.manifest("""
        [[step]]
        name = "first"
        start = true
        script = '''
        cd "$OUTPUT_DIR"
        setsid sh -c 'sleep 1; echo planted > done_planted; echo planted > second_planted' </dev/null >/dev/null 2>&1 &
        echo go > second_1
        echo go > second_2
        sleep 0.3
        '''

        [[step]]
        name = "second"
        script = 'sleep 1.5; cat "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"'
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run", "-parallel", "1")
    names = {n for (n,) in query(cli.db, "SELECT name FROM output")}
    assert not any("planted" in n for n in names), names
    assert {"done_second_1", "done_second_2"} <= names


def test_timeline_records_every_stage_of_a_task(cli, tmp_path):
    """TASK_PIPELINE_TIMELINE: each task passes the stages in order, the launcher's among them."""
    log = tmp_path / "timeline.jsonl"
    m = cli.manifest("""
        [[step]]
        name = "one"
        start = true
        script = 'echo hi > "$OUTPUT_DIR/done"'
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run", env={"TASK_PIPELINE_TIMELINE": str(log)})
    marks = [json.loads(line) for line in log.read_text().splitlines()]
    task = [m for m in marks if m["task"] == 1]
    order = ["leased", "taken", "ready", "received", "slot", "spawned", "exited", "finished", "committed"]
    assert [m["stage"] for m in task] == order
    times = [m["t"] for m in task]
    assert times == sorted(times), task
    assert any(m["task"] == -2 and m["stage"] == "launcher-cpu" for m in marks)


def test_files_a_script_linked_outside_its_slot_are_never_written_by_later_attempts(cli, tmp_path):
    """A script hard-links its input copy and its stdout file to a directory outside the slot.
    Reusing those files for the next attempts would write into the outside names too: they are
    replaced instead, and the outside files keep what they had."""
    outside = tmp_path / "outside"
    outside.mkdir()
    m = cli.manifest(f"""
        [[step]]
        name = "fan"
        start = true
        script = 'for i in 1 2 3 4 5 6; do echo "input $i" > "$OUTPUT_DIR/work_$i"; done'

        [[step]]
        name = "work"
        script = '''
        if [ "$INPUT_NAME" = work_1 ]; then
          ln "$INPUT_FILE" {outside}/input
          ln "$(dirname "$OUTPUT_DIR")/stdout" {outside}/stdout
        fi
        echo "said by $INPUT_NAME"
        cat "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"
        '''
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run", "-parallel", "1")
    assert (outside / "input").read_text() == "input 1\n"
    assert (outside / "stdout").read_text() == "said by work_1\n"
    assert len([n for n in outputs(cli) if n.startswith("done_work_")]) == 6


def test_a_large_fan_out_is_stored_whole_by_two_threads(cli):
    """300 outputs of one attempt (half of them repeating others' bytes) are stored by two threads:
    every one is recorded under its name with the hash of its bytes, and the store checks out."""
    import hashlib

    m = cli.manifest("""
        [[step]]
        name = "fan"
        start = true
        script = 'i=0; while [ $i -lt 300 ]; do echo "item $((i % 150))" > "$OUTPUT_DIR/done_$i"; i=$((i + 1)); done'
        """)
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    rows = dict(query(cli.db, "SELECT name, hash FROM output"))
    assert len(rows) == 300
    for i in range(300):
        assert rows[f"done_{i}"] == hashlib.sha256(f"item {i % 150}\n".encode()).hexdigest(), i
    assert len(set(rows.values())) == 150
    cli.ok("-db", cli.db, "fsck")


def test_requests_waiting_in_their_sockets_are_answered_by_kill_and_close(tmp_path):
    """While every script slot is taken, the launcher leaves new requests in their sockets (reading
    them cost a wake-up per task). A kill or a close must still find them: a worker waiting for an
    answer that never comes would hang the run (it did, with --fail-fast, before drain())."""
    import os
    import threading
    import time

    from task_pipeline.launcher import Launcher

    launcher = Launcher(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    replies: dict[int, tuple] = {}

    def run(task: int, script: str) -> None:
        replies[task] = launcher.run(task, "/bin/sh", ["sh", "-c", script], {"PATH": os.defpath}, str(tmp_path),
                                     None, 1.0, (devnull, devnull, devnull))

    try:
        slot = threading.Thread(target=run, args=(1, "sleep 5"))
        slot.start()
        time.sleep(0.5)  # the first script holds the only slot
        waiting = [threading.Thread(target=run, args=(t, f"touch {tmp_path}/ran-{t}")) for t in (2, 3)]
        for w in waiting:
            w.start()
        time.sleep(0.3)  # both requests are in their sockets now, unread
        began = time.monotonic()
        launcher.kill({2})
        waiting[0].join(timeout=3)
        assert replies.get(2) == ("skipped",), replies
        launcher.close_gate()
        waiting[1].join(timeout=3)
        assert replies.get(3) == ("skipped",), replies
        assert time.monotonic() - began < 3, "the answers waited for the running script"
        assert not list(tmp_path.glob("ran-*")), "a killed or closed request ran anyway"
        launcher.kill({1})
        slot.join(timeout=5)
        assert replies[1][0] == "exited" and replies[1][1] == -9, replies
    finally:
        launcher.stop()
        os.close(devnull)
