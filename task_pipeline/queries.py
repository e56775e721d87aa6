"""Read-only views of a store for the operator commands: status, export, cat, logs, why.

Every function takes a database and returns plain data (dicts and lists), so the
CLI can print it as a table or as JSON. "Current" means live tasks of the current
version of each step; `history=True` widens a query to superseded tasks and old versions.
"""

from __future__ import annotations

from task_pipeline import state
from task_pipeline.db import Database
from task_pipeline.errors import UsageError
from task_pipeline.routing import TERMINAL
from task_pipeline.state import load_pipeline

HEX = frozenset("0123456789abcdef")


def step_counts(db: Database) -> list[dict]:
    """Per step: pending, running (scripts started), leased (claimed, script not started yet),
    done, failed, tainted (finished on an old version) and history (superseded).

    Counted per step version and state through the (step_id, state, live) index, one tight range
    each: a GROUP BY over the whole table, and a scan for started scripts, took three times as long
    on a store of a million tasks. All in one statement, so that the counts are of one moment: a
    task claimed and started between two separate counts would show as leased -1."""
    pipe = load_pipeline(db)
    by_id = {s.step_id: s for s in pipe.steps.values()}
    rows = {s.name: {"step": s.name, "version": s.version, "pending": 0, "running": 0, "leased": 0, "done": 0,
                     "failed": 0, "tainted": 0, "history": 0, "in_manifest": s.in_manifest, "last_error": None,
                     "parallel": s.policy.parallel, "gather": s.policy.gather}
            for s in pipe.steps.values()}
    live = ", ".join(f"(SELECT count(*) FROM task t WHERE t.step_id=s.id AND t.state='{st}' AND t.live=1)"
                     for st in _STATES)
    gone = ", ".join(f"(SELECT count(*) FROM task t WHERE t.step_id=s.id AND t.state='{st}' AND t.live=0)"
                     for st in _STATES)
    started = ("(SELECT count(*) FROM task t WHERE t.step_id=s.id AND t.state='running' AND t.live=1 "
               "AND t.started_at IS NOT NULL)")
    for r in db.execute(f"SELECT s.id, s.name, {live}, {gone}, {started} FROM step s").fetchall():
        step_id, name, counts = r[0], r[1], dict(zip(_STATES, r[2:2 + len(_STATES)]))
        row = rows.get(name)
        if row is None:
            continue
        current = step_id in by_id
        row["history"] += sum(r[2 + len(_STATES):2 + 2 * len(_STATES)])
        for st, n in counts.items():
            if st == "running":
                row["running"] += r[-1]
                row["leased"] += n - r[-1]
            elif current or st == "pending":
                row[st] += n
            else:
                row["tainted"] += n
    for name, row in rows.items():
        if row["failed"]:
            err = db.execute(
                """SELECT error FROM task WHERE step_id=? AND state='failed' AND live=1
                   ORDER BY finished_at DESC LIMIT 1""", (pipe.steps[name].step_id,)).fetchone()
            row["last_error"] = err[0] if err else None
    return list(rows.values())


_STATES = ("pending", "running", "done", "failed")


def oldest_pending_age(db: Database) -> float | None:
    row = db.execute("SELECT min(created_at) FROM task WHERE state='pending' AND live=1").fetchone()
    return None if row[0] is None else max(db.clock() - row[0], 0.0)


def runners(db: Database) -> list[dict]:
    return [{"id": r[0], "host": r[1], "pid": r[2], "kind": r[3], "started_at": r[4], "heartbeat": r[5]}
            for r in db.execute("SELECT id, host, pid, kind, started_at, heartbeat FROM runner ORDER BY started_at")]


def failed_tasks(db: Database, steps: frozenset[str] | None = None, limit: int = 50) -> list[dict]:
    """The most recent failed tasks of current versions (through the index, per step)."""
    out = []
    for s in load_pipeline(db).steps.values():
        if steps is not None and s.name not in steps:
            continue
        rows = db.execute(
            """SELECT t.id, t.input_name, t.exit_code, t.error, t.finished_at,
                      (SELECT stderr_hash FROM attempt a WHERE a.task_id = t.id ORDER BY a.id DESC LIMIT 1) AS stderr_hash
               FROM task t WHERE t.step_id=? AND t.state='failed' AND t.live=1
               ORDER BY t.finished_at DESC, t.id DESC LIMIT ?""", (s.step_id, limit)).fetchall()
        out += [{"task": r["id"], "step": s.name, "input": r["input_name"], "exit": r["exit_code"], "error": r["error"],
                 "finished_at": r["finished_at"], "stderr_hash": r["stderr_hash"], "stderr": None} for r in rows]
    out.sort(key=lambda f: (-(f["finished_at"] or 0), -f["task"]))
    return out[:limit]


def count_failed(db: Database, steps: frozenset[str] | None = None) -> int:
    return sum(c["failed"] for name, c in state.counts(db, ("failed",)).items() if steps is None or name in steps)


def _step_ids(db: Database, step: str, history: bool) -> list[int]:
    pipe = load_pipeline(db)
    s = pipe.steps.get(step)
    if s is None:
        hint = " ('done' is not a step: use 'export done' for the final outputs)" if step == TERMINAL else ""
        raise UsageError(f"no step named '{step}' in this store (steps: {', '.join(pipe.steps) or 'none'}){hint}")
    if history:
        return [r[0] for r in db.execute("SELECT id FROM step WHERE name=?", (step,))]
    return [s.step_id]


def export_inputs(db: Database, step: str, history: bool = False) -> list[dict]:
    ids = _step_ids(db, step, history)
    marks = ",".join("?" * len(ids))
    live = "" if history else "AND live = 1"
    rows = db.execute(
        f"""SELECT id, input_name, input_hash, state FROM task
            WHERE step_id IN ({marks}) {live} AND input_hash != '' ORDER BY input_name, id""", ids).fetchall()
    return [{"task": r[0], "name": r[1], "hash": r[2], "state": r[3]} for r in rows]


def export_outputs(db: Database, step: str, input_ref: str, history: bool = False) -> list[dict]:
    """Outputs of the task(s) of `step` whose input is `input_ref`: a hash, or an input file name."""
    ids = _step_ids(db, step, history)
    marks = ",".join("?" * len(ids))
    live = "" if history else "AND t.live = 1"
    rows = db.execute(
        f"""SELECT t.id, o.name, o.hash FROM task t JOIN output o ON o.task_id = t.id
            WHERE t.step_id IN ({marks}) {live} AND (t.input_hash = ? OR t.input_name = ?)
            ORDER BY t.id, o.name""", (*ids, input_ref, input_ref)).fetchall()
    if not rows:
        known = db.execute(
            f"SELECT 1 FROM task t WHERE t.step_id IN ({marks}) {live} AND (t.input_hash = ? OR t.input_name = ?) LIMIT 1",
            (*ids, input_ref, input_ref)).fetchone()
        if not known:
            raise UsageError(f"no task of step '{step}' has the input '{input_ref}'; list them with -export {step}"
                             + (f", or list what it produced with 'export --outputs {step}'" if _is_start(db, step) else ""))
    return [{"task": r[0], "step": step, "name": r[1], "hash": r[2]} for r in rows]


def _is_start(db: Database, step: str) -> bool:
    s = load_pipeline(db).steps.get(step)
    return s is not None and s.is_start


_OUTPUTS_SQL = """SELECT t.id, s.name, o.name, o.hash, o.key FROM output o JOIN task t ON t.id = o.task_id
                  JOIN step s ON s.id = t.step_id
                  WHERE t.state = 'done' {live} {where} ORDER BY s.name, o.name, t.id"""


def step_outputs(db: Database, step: str, history: bool = False) -> list[dict]:
    """Every output of `step`'s (current) tasks: what a start step produced, say."""
    ids = _step_ids(db, step, history)
    marks = ",".join("?" * len(ids))
    sql = _OUTPUTS_SQL.format(live="" if history else "AND t.live = 1", where=f"AND t.step_id IN ({marks})")
    return [_out_row(r) for r in db.execute(sql, ids)]


def final_outputs(db: Database, history: bool = False) -> list[dict]:
    """Current outputs routed to `done`: the pipeline's results."""
    sql = _OUTPUTS_SQL.format(live="" if history else "AND t.live = 1", where="AND o.key = ?")
    return [_out_row(r) for r in db.execute(sql, (TERMINAL,))]


def current_outputs(db: Database, history: bool = False) -> list[dict]:
    """Every current output of every step."""
    pipe = load_pipeline(db)
    current = {s.step_id for s in pipe.steps.values()}
    sql = _OUTPUTS_SQL.format(live="" if history else "AND t.live = 1", where="")
    sql = sql.replace("SELECT t.id,", "SELECT t.step_id, t.id,")
    return [_out_row(r[1:]) for r in db.execute(sql) if history or r[0] in current]


def unrouted_outputs(db: Database) -> list[dict]:
    """Current outputs that no step of the current manifest consumes and that are not final."""
    pipe = load_pipeline(db)
    return [r for r in current_outputs(db) if r["key"] != TERMINAL and not pipe.router.consumers(r["name"])]


def _out_row(r) -> dict:
    return {"task": r[0], "step": r[1], "name": r[2], "hash": r[3], "key": r[4]}


def resolve_hash(db: Database, ref: str) -> str:
    """A full object hash from a hash or a unique prefix of at least 6 characters."""
    ref = ref.strip().lower()
    if len(ref) < 6 or any(c not in HEX for c in ref):
        raise UsageError(f"'{ref[:80]}' is not an object hash; give the hash (or at least its first 6 hex digits), "
                         f"or an object path as 'export' prints them")
    rows = db.execute("SELECT hash FROM object WHERE hash >= ? AND hash < ? ORDER BY hash LIMIT 2",
                      (ref, ref + "g")).fetchall()
    if not rows:
        raise UsageError(f"no object {ref} in this store")
    if len(rows) > 1:
        raise UsageError(f"'{ref}' matches several objects; give more of the hash")
    return rows[0][0]


def task_attempts(db: Database, task_id: int) -> dict:
    if not 0 < task_id < 2 ** 63:
        raise UsageError(f"no task {task_id} in this store; 'task-pipeline status' lists the failed ones")
    t = db.execute(
        """SELECT t.*, s.name, s.version FROM task t JOIN step s ON s.id = t.step_id WHERE t.id=?""",
        (task_id,)).fetchone()
    if t is None:
        raise UsageError(f"no task {task_id} in this store; 'task-pipeline status' lists the failed ones")
    attempts = [{k: r[k] for k in r.keys()} for r in db.execute(
        "SELECT * FROM attempt WHERE task_id=? ORDER BY id", (task_id,))]
    return {"task": task_id, "step": t["name"], "version": t["version"], "input": t["input_name"],
            "input_hash": t["input_hash"], "state": t["state"], "live": bool(t["live"]), "attempts": attempts}


def _chain(db: Database, task_id: int, h: str, name: str, seen: set[int] | None = None) -> list[dict]:
    """From task `task_id` (which produced `name` = object `h`) back to its start or submitted input.
    A gather task's hop fans in: it lists its members, each with the chain that produced it."""
    chain: list[dict] = []
    seen = set() if seen is None else seen
    while task_id is not None and task_id not in seen:
        seen.add(task_id)
        t = db.execute(
            """SELECT t.id, t.parent_id, t.input_name, t.input_hash, t.runset, t.live, s.name, s.version
               FROM task t JOIN step s ON s.id = t.step_id WHERE t.id=?""", (task_id,)).fetchone()
        hop = {"object": h, "name": name, "task": t["id"], "step": t["name"], "version": t["version"],
               "input": t["input_name"] or None, "runset": t["runset"], "live": bool(t["live"])}
        chain.append(hop)
        members = db.execute("SELECT name, hash FROM gather_member WHERE task_id=?", (task_id,)).fetchall()
        if members:
            hop["members"] = [{"name": n, "object": mh, "lineage": _member_chain(db, mh, n, seen)}
                              for n, mh in sorted((r[0], r[1]) for r in members)]
            break
        h, name, task_id = t["input_hash"], t["input_name"], t["parent_id"]
        if h and task_id is None:
            chain.append({"object": h, "name": name, "task": None, "step": "(submitted)", "version": None,
                          "input": None, "runset": None, "live": True})
    chain.reverse()
    return chain


def _member_chain(db: Database, h: str, name: str, seen: set[int]) -> list[dict]:
    """The chain of one gather member: through its current producer (any producer, failing that)."""
    row = db.execute(
        """SELECT o.task_id FROM output o JOIN task t ON t.id = o.task_id WHERE o.hash = ? AND o.name = ?
           ORDER BY t.live DESC, t.id DESC LIMIT 1""", (h, name)).fetchone()
    if row is None:
        return [{"object": h, "name": name, "task": None, "step": "(unknown)", "version": None, "input": None,
                 "runset": None, "live": False}]
    return _chain(db, row[0], h, name, set(seen))


def lineages(db: Database, h: str, history: bool = False, limit: int = 100) -> list[list[dict]]:
    """Every chain that produced object `h` (several tasks may have made the same bytes), current ones
    first; with `history`, superseded producers too. A submitted object with no producer is one hop."""
    live = "" if history else "AND t.live = 1"
    rows = db.execute(
        f"""SELECT o.task_id, o.name FROM output o JOIN task t ON t.id = o.task_id
            WHERE o.hash = ? {live} ORDER BY t.live DESC, t.id LIMIT ?""", (h, limit)).fetchall()
    if not rows and not history:
        rows = db.execute(
            """SELECT o.task_id, o.name FROM output o JOIN task t ON t.id = o.task_id
               WHERE o.hash = ? ORDER BY t.id LIMIT ?""", (h, limit)).fetchall()
    if rows:
        return [_chain(db, task_id, h, name) for task_id, name in rows]
    sub = db.execute("SELECT input_name FROM task WHERE input_hash=? AND parent_id IS NULL LIMIT 1", (h,)).fetchone()
    if sub is None:
        raise UsageError(f"no task produced or consumed object {h}")
    return [[{"object": h, "name": sub[0], "task": None, "step": "(submitted)", "version": None, "input": None,
              "runset": None, "live": True}]]


# -- for the web API: pages of tasks, one task's story, objects known to the store --------------------

TASK_STATES = ("pending", "running", "done", "failed")


def task_page(db: Database, *, step: str | None = None, state: str | None = None, before: int | None = None,
              limit: int = 50, history: bool = False) -> tuple[list[dict], int | None]:
    """Tasks newest first, `limit` at a time: those with an id below `before` (the cursor the
    previous page returned). Returns the page and the next cursor (None on the last page).
    A step's tasks are those of every version of it that are live (tainted ones included);
    `history` adds superseded ones. Each page is a range of an index, whatever the store's size."""
    where, args = [], []
    if step is not None:
        ids = _step_ids(db, step, history=True)
        where.append(f"t.step_id IN ({','.join('?' * len(ids))})")
        args += ids
    if state is not None:
        if state not in TASK_STATES:
            raise UsageError(f"no task state '{state}'; use one of: {', '.join(TASK_STATES)}")
        where.append("t.state = ?")
        args.append(state)
    if not history:
        where.append("t.live = 1")
    if before is not None:
        where.append("t.id < ?")
        args.append(before)
    sql = f"""SELECT t.id, s.name, s.version, t.input_name, t.input_hash, t.state, t.live, t.attempts, t.exit_code,
                     t.error, t.runset, t.created_at, t.finished_at, t.started_at
              FROM task t JOIN step s ON s.id = t.step_id
              {"WHERE " + " AND ".join(where) if where else ""} ORDER BY t.id DESC LIMIT ?"""
    rows = db.execute(sql, (*args, limit + 1)).fetchall()
    current_versions = {s.name: s.version for s in load_pipeline(db).steps.values()}
    page = [{"task": r[0], "step": r[1], "version": r[2], "current": current_versions.get(r[1]) == r[2],
             "input": r[3] or None, "input_hash": r[4] or None, "state": r[5], "live": bool(r[6]),
             "attempts": r[7], "exit": r[8], "error": r[9], "runset": r[10], "created_at": r[11],
             "finished_at": r[12], "started_at": r[13]} for r in rows[:limit]]
    return page, (page[-1]["task"] if len(rows) > limit else None)


def task_outputs(db: Database, task_id: int) -> list[dict]:
    return [{"name": r[0], "hash": r[1], "key": r[2]}
            for r in db.execute("SELECT name, hash, key FROM output WHERE task_id=? ORDER BY name", (task_id,))]


def task_origin(db: Database, task_id: int) -> list[dict]:
    """Where a task's input came from: the chain of tasks from a start step (or a submitted file) to
    the task that produced it; empty for a start task."""
    t = db.execute("SELECT parent_id, input_hash, input_name FROM task WHERE id=?", (task_id,)).fetchone()
    if t is None or not t[1]:
        return []
    if t[0] is None:
        return [{"object": t[1], "name": t[2], "task": None, "step": "(submitted)", "version": None, "input": None,
                 "runset": None, "live": True}]
    return _chain(db, t[0], t[1], t[2])


def object_size(db: Database, h: str) -> int | None:
    """The size of object `h` if the store's database knows it (a full hash), else None."""
    row = db.execute("SELECT size FROM object WHERE hash=?", (h,)).fetchone()
    return None if row is None else int(row[0])
