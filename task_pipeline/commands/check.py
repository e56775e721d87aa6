"""`check STEP [--sample N]`: does a step give the same bytes for the same input?

Early cutoff and caching trust that it does. `check` re-runs done tasks of the step's
current version, one at a time, each in fresh scratch exactly as a real attempt runs
(executor.execute, same environment, input and INPUT_DIR), but with a dry Job: outputs
are hashed with the store's algorithm and never stored, logs are not kept, and nothing
is written to the database. The hashes are compared with the recorded outputs; for a
text file that differs, a short unified diff of the recorded and the re-run bytes is
shown. Exit 0 when every task came out byte-identical, 1 when any differed or failed
on the re-run.
"""

from __future__ import annotations

import difflib
import os
import random
from argparse import Namespace
from dataclasses import asdict, dataclass, field
from pathlib import Path

from task_pipeline import state
from task_pipeline.commands.common import open_store, print_json
from task_pipeline.errors import StoreError
from task_pipeline.executor import Job, ProcessTable, Slots, execute
from task_pipeline.location import SECRET_ENV
from task_pipeline.report import Output
from task_pipeline.store import ObjectStore
from task_pipeline.textsafe import block, one_line

DIFF_BYTES = 256 * 1024   # files larger than this get no diff (the hashes say enough)
DIFF_LINES = 24           # lines of each diff shown


@dataclass
class FileDiff:
    name: str
    status: str                  # changed | missing (recorded, not made again) | extra (made, not recorded)
    recorded: str | None
    rerun: str | None
    diff: str | None = None      # a unified diff, for text files small enough


@dataclass
class TaskCheck:
    task: int
    input: str | None
    identical: bool
    outputs: int
    error: str | None = None     # the re-run failed
    files: list[FileDiff] = field(default_factory=list)


def compare(recorded: dict[str, str], produced: dict[str, str]) -> list[FileDiff]:
    """The outputs whose bytes differ, by name: changed, missing from the re-run, or new in it."""
    out = []
    for name in sorted(set(recorded) | set(produced)):
        old, new = recorded.get(name), produced.get(name)
        if old != new:
            status = "changed" if old and new else "missing" if old else "extra"
            out.append(FileDiff(name, status, old, new))
    return out


def text_diff(name: str, old: bytes, new: bytes, limit: int = DIFF_LINES) -> str | None:
    """A unified diff of two versions of a text file (None when either is not UTF-8 text)."""
    try:
        a, b = old.decode("utf-8"), new.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\0" in a or "\0" in b:
        return None
    lines = list(difflib.unified_diff(a.splitlines(), b.splitlines(), f"{name} (recorded)", f"{name} (re-run)",
                                      n=1, lineterm=""))
    if len(lines) > limit:
        lines = lines[:limit] + [f"... ({len(lines) - limit} more diff lines)"]
    return "\n".join(lines)


def _read_fd(fd: int, limit: int) -> bytes | None:
    data = os.read(fd, limit + 1)
    return None if len(data) > limit else data


def _recorded_bytes(store: ObjectStore, h: str) -> bytes | None:
    try:
        data, size = store.read_tail(h, DIFF_BYTES)
    except (OSError, StoreError):
        return None   # no diff, then: the hashes already say that it differs
    return data if size <= DIFF_BYTES else None


def check_task(job_for, store: ObjectStore, procs: ProcessTable, slots: Slots, row, recorded: dict[str, str],
               step: state.CurrentStep, workdir: Path) -> TaskCheck:
    rerun_bytes: dict[str, bytes | None] = {}

    def inspect(out_fd: int, outputs: list[tuple[str, str, int]]) -> None:
        # runs before the attempt's directories are removed: keep the re-run's bytes of what differs
        for name, h, size in outputs:
            if recorded.get(name) not in (None, h) and size <= DIFF_BYTES:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=out_fd)
                try:
                    rerun_bytes[name] = _read_fd(fd, DIFF_BYTES)
                finally:
                    os.close(fd)

    claimed = state.Claimed(row["id"], 0, row["attempts"] or 1, step, row["input_name"], row["input_hash"],
                            row["runset"], workdir)
    res = execute(job_for(claimed, inspect), procs, slots)
    if res.store_trouble or res.interrupted:
        raise StoreError(f"check {step.name}#{row['id']}: {res.error}")
    result = TaskCheck(row["id"], row["input_name"] or None, False, len(res.outputs))
    if not res.ok:
        result.error = (res.error or "failed") + (f": {res.stderr_tail}" if res.stderr_tail else "")
        return result
    result.files = compare(recorded, {name: h for name, h, _ in res.outputs})
    for f in result.files:
        if f.status == "changed" and rerun_bytes.get(f.name) is not None:
            old = _recorded_bytes(store, f.recorded)
            if old is not None:
                f.diff = text_diff(f.name, old, rerun_bytes[f.name])
    result.identical = not result.files
    return result


def cmd_check(a: Namespace, out: Output) -> int:
    opened = open_store(a)
    db, store = opened.db, opened.store
    pipe = state.load_pipeline(db)
    step = pipe.require(a.args[0])
    rows = db.execute("""SELECT id, input_name, input_hash, runset, attempts FROM task
                         WHERE step_id=? AND live=1 AND state='done' ORDER BY id""", (step.step_id,)).fetchall()
    total = len(rows)
    if a.sample is not None and total > a.sample:
        rows = sorted(random.sample(rows, a.sample), key=lambda r: r["id"])
    workdir = Path(pipe.workdir or Path.cwd())
    base_env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    procs, slots = ProcessTable(), Slots(opened.loc.scratch)

    def job_for(claimed, inspect) -> Job:
        return Job(claimed, store, workdir, base_env, dry=True, inspect=inspect)

    results: list[TaskCheck] = []
    try:
        for row in rows:
            recorded = {n: h for n, h in db.execute("SELECT name, hash FROM output WHERE task_id=?", (row["id"],))}
            r = check_task(job_for, store, procs, slots, row, recorded, step, workdir)
            results.append(r)
            if not a.json:
                _show(r, step, out)
    finally:
        slots.close()
        procs.close()
    differ = sum(1 for r in results if not r.identical and r.error is None)
    failed = sum(1 for r in results if r.error is not None)
    if a.json:
        print_json({"step": step.name, "version": step.version, "done": total, "checked": len(results),
                    "identical": len(results) - differ - failed, "differ": differ, "failed": failed,
                    "tasks": [asdict(r) for r in results]})
    elif not results:
        out.print(f"{step.name} v{step.version} has no done tasks to check")
    else:
        scope = f"{len(results)} task(s) re-run" + (f" (a sample of {total} done)" if len(results) < total else "")
        if differ or failed:
            what = [f"{differ} gave other bytes"] if differ else []
            what += [f"{failed} failed"] if failed else []
            out.print(f"{step.name} v{step.version}: of {scope}, {' and '.join(what)}"
                      + ("; early cutoff cannot stop a cascade at this step while it does that (see the README, 'check')"
                         if differ else ""))
        else:
            out.print(f"{step.name} v{step.version}: {scope}, every one byte-identical")
    return 1 if differ or failed else 0


def _show(r: TaskCheck, step: state.CurrentStep, out: Output) -> None:
    label = one_line(f"{step.name}#{r.task} {r.input or '(start)'}")
    if r.error is not None:
        out.print(f"{label}: failed on re-run: {one_line(r.error)}")
    elif r.identical:
        out.print(f"{label}: identical ({r.outputs} output(s))")
    else:
        out.print(f"{label}: differs: " + ", ".join(one_line(f"{f.name} ({f.status})") for f in r.files))
        for f in r.files:
            if f.diff:
                out.print(block("\n".join("    " + line for line in f.diff.splitlines())))
