"""The store at a glance, as data: what `status --json` prints and what the web status endpoint
returns, built by one function so that the two cannot drift apart.

Also owns the two things that document needs from elsewhere: the one time format of every JSON
output (`iso`), and the line of a failed task's stderr that a person wants to see first.
"""

from __future__ import annotations

import datetime

from task_pipeline import queries, state
from task_pipeline.db import Database
from task_pipeline.store import ObjectStore
from task_pipeline.textsafe import last_line

COLUMNS = ("pending", "running", "leased", "done", "failed", "tainted")
LAST_FAILURES = 5


def iso(t: float | None) -> str | None:
    """The one time format of every JSON output and log line: UTC ISO 8601 with milliseconds."""
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def last_stderr_line(store: ObjectStore, h: str | None) -> str | None:
    if not h:
        return None
    try:
        data, _ = store.read_tail(h, 2048)
        text = data.decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - a missing or damaged log must not hide the failure table
        return None
    return last_line(text) or None


def gather_summary(g: dict) -> str:
    """A gather step's state in a sentence (status prints it; the dashboard shows it)."""
    text = f"gather step '{g['step']}': {g['members']} member(s)"
    if not g["due"]:
        return text + (f", gathered by task {g['task']}" if g["task"] else "")
    if g["gathered"] is not None:
        text += f" now, {g['gathered']} when task {g['task']} gathered them"
    if g["waiting"]:
        return text + f"; waits: {g['waiting']}"
    return text + "; fires at the next run (under serve, once the set has settled)"


def totals(counts: list[dict]) -> dict[str, int]:
    return {k: sum(c[k] for c in counts) for k in COLUMNS}


def status(db: Database, store: ObjectStore, where: str) -> dict:
    """The `status --json` document."""
    counts = queries.step_counts(db)
    failed = queries.failed_tasks(db, limit=LAST_FAILURES)
    for f in failed:
        f["stderr"] = last_stderr_line(store, f["stderr_hash"])
    gathers = [{"step": g.step, "members": len(g.members or []), "gathered": None if g.fired is None else len(g.fired),
                "task": g.fired_task, "due": g.due, "waiting": g.waiting if g.due else None}
               for g in state.gather_states(db, full=True)]
    for g in gathers:
        g["summary"] = gather_summary(g)
    return {"store": where, "steps": counts, "totals": totals(counts), "gathers": gathers,
            "oldest_pending_age": queries.oldest_pending_age(db),
            "runners": [{**r, "started_at": iso(r["started_at"]), "heartbeat": iso(r["heartbeat"])}
                        for r in queries.runners(db)],
            "last_failures": [{**f, "finished_at": iso(f["finished_at"])} for f in failed]}
