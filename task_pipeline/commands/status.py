"""`status` and `logs`: what the store holds, per step and per task.

Gather steps get a line each under the table: how many members their set has, and
whether their task is up to date with it or why it waits (state.gather_states).

`running` counts scripts that have started; `leased` counts tasks a runner has
claimed whose script has not started yet (a runner claims a little ahead, so
that a finishing worker finds its next task ready).
"""

from __future__ import annotations

import sys
from argparse import Namespace

from task_pipeline import overview, queries
from task_pipeline.commands.common import iso, open_store, print_json
from task_pipeline.errors import StoreError, UsageError
from task_pipeline.report import Output, failures_table, table
from task_pipeline.textsafe import block, one_line

LOG_TAIL = 64 * 1024  # bytes of each log `logs` shows (the end is where the error is)

COLUMNS = overview.COLUMNS


def cmd_status(a: Namespace, out: Output) -> int:
    opened = open_store(a)
    db, store = opened.db, opened.store
    doc = overview.status(db, store, opened.loc.describe())
    if a.json:
        print_json(doc)
        return 0
    counts, totals, age, failed = doc["steps"], doc["totals"], doc["oldest_pending_age"], doc["last_failures"]
    gathers = doc["gathers"]
    show = [c for c in counts if c["in_manifest"] or any(c[k] for k in COLUMNS) or a.history]
    leased = totals["leased"] > 0
    cols = [k for k in COLUMNS if k != "leased" or leased]
    rows = [[c["step"] + ("" if c["in_manifest"] else " (removed)"), f"v{c['version']}", *[c[k] for k in cols],
             c["last_error"] or ""] for c in show]
    rows.append(["total", "", *[totals[k] for k in cols], ""])
    out.print(table(None, ["step", "version", *cols, "last error"], rows, right=cols))
    for g in gathers:
        out.print(g["summary"])
    if age is not None:
        out.print(f"oldest pending task: {age:.0f}s old")
    if failed:
        out.print(failures_table(failed))
    return 0


def cmd_logs(a: Namespace, out: Output) -> int:
    ref = a.args[0]
    if not ref.isdigit() or len(ref) > 19:
        raise UsageError(f"'{one_line(ref[:40])}' is not a task id; 'task-pipeline status' lists failed tasks with "
                         f"their ids")
    opened = open_store(a)
    store = opened.store
    info = queries.task_attempts(opened.db, int(ref))
    if a.json:
        for at in info["attempts"]:
            at["started_at"], at["finished_at"] = iso(at["started_at"]), iso(at["finished_at"])
        print_json(info)
        return 0
    tty = sys.stdout.isatty()
    out.print(f"task {info['task']}: {info['step']} v{info['version']} on {info['input'] or '(start)'}, "
              f"{info['state']}" + ("" if info["live"] else " (superseded)"))
    for at in info["attempts"]:
        dur = (at["finished_at"] - at["started_at"]) if at["started_at"] and at["finished_at"] else None
        code = "" if at["exit_code"] is None else f", exit {at['exit_code']}"
        out.print(f"-- attempt {at['attempt']}: {at['outcome']}{code}"
                  + (f", {dur:.2f}s" if dur is not None else "") + (f": {at['error']}" if at["error"] else ""))
        for label in ("stdout", "stderr"):
            h = at[f"{label}_hash"]
            if h:
                try:
                    data, size = store.read_tail(h, LOG_TAIL)
                except StoreError as e:
                    sys.stdout.write(f"   [{label}] cannot be read: {one_line(str(e))}\n")
                    continue
                if data:
                    if size > len(data):
                        data = data.split(b"\n", 1)[-1]
                    text = data.decode("utf-8", "replace").rstrip("\n")
                    sys.stdout.write(f"   [{label}]" + (f" (last {len(data)} of {size} bytes)" if size > len(data) else "")
                                     + "\n")
                    # on a terminal, a script's escape sequences are shown, not obeyed
                    sys.stdout.write((block(text) if tty else text) + "\n")
    sys.stdout.flush()
    return 0
