"""Actions on a store from outside a run: `submit` inputs, `retry` failed tasks, `invalidate` a step.

`submit STEP FILE...` / `submit --route FILE...`: each file becomes an object
named by its base name; `-` reads standard input into one object named `stdin`
(only with a STEP: that name routes nowhere). While it stores files, submit is
registered as a writer on the store, so that a concurrent `gc` keeps what it
stored before the references are committed.
"""

from __future__ import annotations

import os
import sys
import time
from argparse import Namespace
from pathlib import Path

from task_pipeline import state
from task_pipeline.commands.common import open_store, print_json, store_args
from task_pipeline.errors import UsageError
from task_pipeline.report import Output
from task_pipeline.routing import route_key
from task_pipeline.textsafe import one_line

STDIN_NAME = "stdin"  # the input name of `submit STEP -`
BEAT_EVERY = 10.0     # seconds between a long submit's heartbeats (gc counts it as active meanwhile)


def run_hint(db, a: Namespace) -> str:
    """How to run what was just queued: with the manifest the store was registered from."""
    manifest = state.meta(db, "manifest")
    m = f" {_q(manifest)}" if manifest else " -manifest M"
    return " ".join(x for x in (f"task-pipeline run{m}", store_args(a)) if x) + ", or let 'serve' pick them up"


def _q(s: str) -> str:
    import shlex

    return shlex.quote(one_line(s))


def cmd_submit(a: Namespace, out: Output) -> int:
    usage = "usage: task-pipeline submit STEP FILE... | submit --route FILE...  (FILE '-' reads stdin)"
    if a.route:
        step, files = None, list(a.args)
    else:
        if len(a.args) < 2:
            raise UsageError(usage + "; name the step, or pass --route to route by file name" if a.args else usage)
        step, files = a.args[0], a.args[1:]
    if not files:
        raise UsageError(usage)
    if files.count("-") > 1:
        raise UsageError("'-' (stdin) can be given only once")
    if "-" in files and step is None:
        raise UsageError("'-' (stdin) has no file name to route by; name the step: submit STEP -")
    for f in files:
        if f != "-" and not os.path.isfile(f):
            why = "no such file" if not os.path.exists(f) else "not a regular file"
            raise UsageError(f"{one_line(f)}: {why}")

    opened = open_store(a)
    db, store = opened.db, opened.store
    pipe = state.load_pipeline(db)
    if step is not None:
        pipe.require(step)
    names = [STDIN_NAME if f == "-" else os.path.basename(os.path.abspath(f)) for f in files]
    if step is None:
        for f, name in zip(files, names):
            if not pipe.router.consumers(name):
                raise UsageError(f"{one_line(f)}: its route key '{one_line(route_key(name))}' is consumed by no step; "
                                 f"name the step: submit STEP FILE")

    items = []
    with state.writing(db, "submit") as me:
        beat = time.monotonic()
        for f, name in zip(files, names):
            h, size = store.ingest_stream(sys.stdin.buffer) if f == "-" else store.ingest_path(Path(f))
            items.append((name, h, size, step))
            if time.monotonic() - beat > BEAT_EVERY:
                state.beat(db, me)
                beat = time.monotonic()
        report = state.submit(db, items, a.runset)
    rows = []
    for f, (name, h, size, _), (_, made) in zip(files, items, report):
        rows.append({"file": f, "name": name, "hash": h, "size": size, "new_tasks": made})
        if not a.json:
            label = "stdin" if f == "-" else f
            if made:
                out.print(f"{label}: queued for {', '.join(made)} ({h[:12]})")
            else:
                out.print(f"{label}: already known ({h[:12]}); no new task")
    if a.json:
        print_json(rows)
    return 0


def cmd_retry(a: Namespace, out: Output) -> int:
    opened = open_store(a)
    db = opened.db
    step = a.args[0] if a.args else None
    if a.dry_run:
        found = state.dry_run(db, state.retry_failed, step)
    else:
        with state.writing(db, "retry"):
            found = state.retry_failed(db, step)
    total = sum(found.values())
    if a.json:
        print_json({"dry_run": a.dry_run, "tasks": total, "steps": dict(found)})
        return 0
    verb = "would re-queue" if a.dry_run else "re-queued"
    detail = f" ({', '.join(f'{n} of {s}' for s, n in found.items())})" if found else ""
    out.log("info", f"{verb} {total} failed task(s){detail}"
                    + (f"; run them with: {run_hint(db, a)}" if total and not a.dry_run else ""))
    return 0


def cmd_invalidate(a: Namespace, out: Output) -> int:
    (step,) = a.args
    opened = open_store(a)
    db = opened.db
    if a.dry_run:
        n = state.dry_run(db, state.invalidate, step)
    else:
        with state.writing(db, "invalidate"):
            n = state.invalidate(db, step)
    if a.json:
        print_json({"dry_run": a.dry_run, "step": step, "tasks": n})
        return 0
    if a.dry_run:
        out.log("info", f"{step}: {n} task(s) would run again; downstream re-runs only where outputs change")
    else:
        out.log("info", f"{step}: {n} task(s) will run again; downstream re-runs only where outputs change"
                        + (f"; run them with: {run_hint(db, a)}" if n else ""))
    return 0
