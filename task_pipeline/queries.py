"""Read-only views of a store for the operator commands: status, export, cat, logs, why.

Every function takes a connection and returns plain data (dicts and lists), so the
CLI can print it as a table or as JSON. "Current" means live tasks of the current
version of each step; `history=True` widens a query to superseded tasks and old versions.
"""

from __future__ import annotations

import sqlite3
import time

from task_pipeline.errors import UsageError
from task_pipeline import state
from task_pipeline.state import load_pipeline


def step_counts(conn: sqlite3.Connection) -> list[dict]:
    pipe = load_pipeline(conn)
    by_id = {s.step_id: s for s in pipe.steps.values()}
    names = {r[0]: r[1] for r in conn.execute("SELECT id, name FROM step")}
    rows = {s.name: {"step": s.name, "version": s.version, "pending": 0, "running": 0, "done": 0, "failed": 0,
                     "tainted": 0, "history": 0, "in_manifest": s.in_manifest, "last_error": None}
            for s in pipe.steps.values()}
    for step_id, st, live, n in conn.execute("SELECT step_id, state, live, count(*) FROM task GROUP BY step_id, state, live"):
        name = names[step_id]
        row = rows.get(name)
        if row is None:
            continue
        current = step_id in by_id
        if not live:
            row["history"] += n
        elif current or st in ("pending", "running"):
            row[st] += n
        else:
            row["tainted"] += n
    for name, row in rows.items():
        if row["failed"]:
            err = conn.execute(
                """SELECT error FROM task WHERE step_id=? AND state='failed' AND live=1
                   ORDER BY finished_at DESC LIMIT 1""", (pipe.steps[name].step_id,)).fetchone()
            row["last_error"] = err[0] if err else None
    return list(rows.values())


def oldest_pending_age(conn: sqlite3.Connection, now: float | None = None) -> float | None:
    row = conn.execute("SELECT min(created_at) FROM task WHERE state='pending' AND live=1").fetchone()
    return None if row[0] is None else (now or time.time()) - row[0]


def failed_tasks(conn: sqlite3.Connection, steps: frozenset[str] | None = None, limit: int = 50) -> list[dict]:
    """The most recent failed tasks of current versions (through the index, per step)."""
    out = []
    for s in load_pipeline(conn).steps.values():
        if steps is not None and s.name not in steps:
            continue
        rows = conn.execute(
            """SELECT t.id, t.input_name, t.exit_code, t.error, t.finished_at,
                      (SELECT stderr_hash FROM attempt a WHERE a.task_id = t.id ORDER BY a.id DESC LIMIT 1) AS stderr_hash
               FROM task t WHERE t.step_id=? AND t.state='failed' AND t.live=1
               ORDER BY t.finished_at DESC, t.id DESC LIMIT ?""", (s.step_id, limit)).fetchall()
        out += [{"task": r["id"], "step": s.name, "input": r["input_name"], "exit": r["exit_code"], "error": r["error"],
                 "finished_at": r["finished_at"], "stderr_hash": r["stderr_hash"], "stderr": None} for r in rows]
    out.sort(key=lambda f: (-(f["finished_at"] or 0), -f["task"]))
    return out[:limit]


def count_failed(conn: sqlite3.Connection, steps: frozenset[str] | None = None) -> int:
    return sum(c["failed"] for name, c in state.counts(conn, ("failed",)).items() if steps is None or name in steps)


def _step_ids(conn, step: str, history: bool) -> list[int]:
    pipe = load_pipeline(conn)
    s = pipe.steps.get(step)
    if s is None:
        raise UsageError(f"no step named '{step}' in this store (steps: {', '.join(pipe.steps) or 'none'})")
    if history:
        return [r[0] for r in conn.execute("SELECT id FROM step WHERE name=?", (step,))]
    return [s.step_id]


def export_inputs(conn: sqlite3.Connection, step: str, history: bool = False) -> list[dict]:
    ids = _step_ids(conn, step, history)
    marks = ",".join("?" * len(ids))
    live = "" if history else "AND live = 1"
    rows = conn.execute(
        f"""SELECT id, input_name, input_hash, state FROM task
            WHERE step_id IN ({marks}) {live} AND input_hash != '' ORDER BY input_name, id""", ids).fetchall()
    return [{"task": r[0], "name": r[1], "hash": r[2], "state": r[3]} for r in rows]


def export_outputs(conn: sqlite3.Connection, step: str, input_ref: str, history: bool = False) -> list[dict]:
    """Outputs of the task(s) of `step` whose input is `input_ref`: a hash, or an input file name."""
    ids = _step_ids(conn, step, history)
    marks = ",".join("?" * len(ids))
    live = "" if history else "AND t.live = 1"
    rows = conn.execute(
        f"""SELECT t.id, o.name, o.hash FROM task t JOIN output o ON o.task_id = t.id
            WHERE t.step_id IN ({marks}) {live} AND (t.input_hash = ? OR t.input_name = ?)
            ORDER BY t.id, o.name""", (*ids, input_ref, input_ref)).fetchall()
    if not rows:
        known = conn.execute(
            f"SELECT 1 FROM task t WHERE t.step_id IN ({marks}) {live} AND (t.input_hash = ? OR t.input_name = ?) LIMIT 1",
            (*ids, input_ref, input_ref)).fetchone()
        if not known:
            raise UsageError(f"no task of step '{step}' has the input '{input_ref}'; list them with -export {step}")
    return [{"task": r[0], "name": r[1], "hash": r[2]} for r in rows]


def resolve_hash(conn: sqlite3.Connection, ref: str) -> str:
    """A full object hash from a hash or a unique prefix of at least 6 characters."""
    ref = ref.strip().lower()
    if len(ref) < 6 or any(c not in "0123456789abcdef" for c in ref):
        raise UsageError(f"'{ref}' is not an object hash; give the hash (or at least its first 6 hex digits)")
    rows = conn.execute("SELECT hash FROM object WHERE hash >= ? AND hash < ? ORDER BY hash LIMIT 2",
                        (ref, ref + "g")).fetchall()
    if not rows:
        raise UsageError(f"no object {ref} in this store")
    if len(rows) > 1:
        raise UsageError(f"'{ref}' matches several objects; give more of the hash")
    return rows[0][0]


def task_attempts(conn: sqlite3.Connection, task_id: int) -> dict:
    t = conn.execute(
        """SELECT t.*, s.name, s.version FROM task t JOIN step s ON s.id = t.step_id WHERE t.id=?""",
        (task_id,)).fetchone()
    if t is None:
        raise UsageError(f"no task {task_id} in this store; 'task-pipeline status' lists the failed ones")
    attempts = [dict(r) for r in conn.execute(
        "SELECT * FROM attempt WHERE task_id=? ORDER BY id", (task_id,))]
    return {"task": task_id, "step": t["name"], "version": t["version"], "input": t["input_name"],
            "input_hash": t["input_hash"], "state": t["state"], "live": bool(t["live"]), "attempts": attempts}


def lineage(conn: sqlite3.Connection, h: str) -> list[dict]:
    """The chain from a start (or submitted) task to object `h`: each hop is a task and the object it made."""
    chain: list[dict] = []
    row = conn.execute(
        """SELECT o.task_id, o.name FROM output o JOIN task t ON t.id = o.task_id
           WHERE o.hash = ? ORDER BY t.live DESC, t.id LIMIT 1""", (h,)).fetchone()
    if row is None:
        sub = conn.execute(
            "SELECT input_name FROM task WHERE input_hash=? AND parent_id IS NULL LIMIT 1", (h,)).fetchone()
        if sub is None:
            raise UsageError(f"no task produced or consumed object {h}")
        return [{"object": h, "name": sub[0], "task": None, "step": "(submitted)", "version": None, "input": None}]
    task_id, name = row
    seen = set()
    while task_id is not None and task_id not in seen:
        seen.add(task_id)
        t = conn.execute(
            """SELECT t.id, t.parent_id, t.input_name, t.input_hash, t.runset, s.name, s.version
               FROM task t JOIN step s ON s.id = t.step_id WHERE t.id=?""", (task_id,)).fetchone()
        chain.append({"object": h, "name": name, "task": t["id"], "step": t["name"], "version": t["version"],
                      "input": t["input_name"] or None, "runset": t["runset"]})
        h, name, task_id = t["input_hash"], t["input_name"], t["parent_id"]
        if h and task_id is None:
            chain.append({"object": h, "name": name, "task": None, "step": "(submitted)", "version": None, "input": None})
    chain.reverse()
    return chain
