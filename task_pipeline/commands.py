"""The commands: what each one does, from parsed arguments to output and exit code.

Thin on purpose: each command opens the store, calls state/queries/scheduler,
and hands the result to report.py. `serve` and `submit` live in daemon.py,
`gc` and `fsck` in housekeeping.py, `graph` in graph.py, `init` in starter.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from argparse import Namespace
from pathlib import Path

from task_pipeline import queries, state
from task_pipeline.errors import ManifestError, UsageError
from task_pipeline.manifest import Manifest, load_manifest
from task_pipeline.report import Output, RunReporter, Summary, failures_table, fmt_rate, table
from task_pipeline.store import Store

EXIT_OK, EXIT_FAILED = 0, 1


def dispatch(a: Namespace) -> int:
    out = Output(verbose=a.verbose, quiet=a.quiet, log_format=a.log_format)
    handler = HANDLERS[a.command]
    try:
        return handler(a, out) or EXIT_OK
    except BaseExceptionGroup as eg:
        # anyio task groups wrap what a task raised; one error is reported as itself (one line, its exit code)
        leaves = _leaves(eg)
        if len(leaves) == 1:
            raise leaves[0] from eg
        raise


def _leaves(eg: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in eg.exceptions:
        out += _leaves(e) if isinstance(e, BaseExceptionGroup) else [e]
    return out


# -- helpers -----------------------------------------------------------------


def need_manifest(a: Namespace, *, runs: bool = True) -> Manifest:
    """The manifest named by -manifest; for commands that run scripts, its workdir must exist."""
    if not a.manifest:
        raise UsageError(f"'{a.command}' needs a manifest: add -manifest PATH")
    m = load_manifest(a.manifest)
    if runs and not m.workdir.is_dir():
        raise ManifestError(f"the workdir {m.workdir} is not a directory; create it or fix [pipeline] workdir",
                            file=m.path, key="pipeline.workdir")
    return m


def open_store(a: Namespace, *, create: bool = False):
    conn = state.connect(Path(a.db), create=create, hash_algo=getattr(a, "hash", None) or "sha256")
    store = Store.at(Path(a.db), state.meta(conn, "hash_algo") or "sha256")
    if create:
        store.create_dirs()
    return conn, store


def args_exactly(a: Namespace, n: int, usage: str) -> list[str]:
    if len(a.args) != n:
        raise UsageError(f"usage: task-pipeline {usage}")
    return a.args


def command_hint(a: Namespace, flag: str) -> str:
    parts = ["task-pipeline"]
    if a.manifest:
        parts += ["-manifest", a.manifest]
    parts += ["-db", a.db, flag]
    return " ".join(parts)


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


# -- run and migrate ---------------------------------------------------------------


def cmd_run(a: Namespace, out: Output) -> int:
    manifest = need_manifest(a)
    conn, store = open_store(a, create=True)
    reg = state.register(conn, manifest)
    report_registration(reg, out)
    steps = None
    if a.step:
        unknown = [s for s in a.step if s not in manifest.names]
        if unknown:
            raise UsageError(f"-step {unknown[0]}: no such step in {manifest.path} (steps: {', '.join(manifest.names)})")
        steps = frozenset(a.step)
    if a.migrate_tainted:
        do_migrate(conn, a, out)
    seeds = [a.start] if a.start else [s.name for s in manifest.start_steps]
    if a.start and a.start not in manifest.names:
        raise UsageError(f"-start {a.start}: no such step in {manifest.path} (steps: {', '.join(manifest.names)})")
    if steps is not None:
        seeds = [s for s in seeds if s in steps]
    state.seed_start(conn, seeds, a.runset)
    report_tainted(state.tainted(conn), a, out)

    from task_pipeline.housekeeping import reap_dead_scratch

    reap_dead_scratch(conn, store)  # dead runners' scratch goes even when there is nothing to run (cheap: one scandir)
    ol = state.outlook(conn, steps)
    if ol.runnable == 0 and ol.next_due is None and ol.running == 0:
        # Nothing to do: skip starting the engine (the common case of a re-run, kept fast).
        return finish_run(conn, store, Summary(), a, out, steps, manifest)
    import anyio

    from task_pipeline.scheduler import Db, EngineOptions

    pending = {name: c["pending"] + c["running"] for name, c in state.counts(conn).items()}
    parallel = a.parallel or os.cpu_count() or 1
    opts = EngineOptions(parallel=parallel, steps=steps, fail_fast=a.fail_fast, grace=a.grace)
    with RunReporter(out, pending, [s.name for s in manifest.steps]) as reporter:
        summary = anyio.run(_engine_with_signals, Db(conn), store, opts, reporter)
    return finish_run(conn, store, summary, a, out, steps, manifest)


async def _engine_with_signals(db, store: Store, opts, reporter) -> Summary:
    """Run the engine; the first SIGINT/SIGTERM drains (running scripts get --grace seconds), a second kills."""
    import anyio

    from task_pipeline.scheduler import run_engine

    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    if stop.is_set():
                        reporter.log("warning", "second signal: stopping scripts now")
                        opts.grace = 0
                    else:
                        reporter.log("warning", f"stopping: no new tasks; running ones get {opts.grace:g}s (signal again to stop them now)")
                    stop.set()

        tg.start_soon(watch)
        summary = await run_engine(db, store, opts, reporter, stop=stop)
        tg.cancel_scope.cancel()
    return summary


def finish_run(conn, store: Store, summary: Summary, a: Namespace, out: Output, steps, manifest: Manifest) -> int:
    for key, n in sorted(summary.unrouted.items()):
        close = [s for s in manifest.names if s.lower() == key.lower() or _near(s, key)]
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        out.log("warning", f"unrouted: {n} output(s) with route key '{key}' went nowhere: no step consumes it{hint}; "
                           f"they are kept as terminal outputs")
    if summary.store_error:
        out.log("error", summary.store_error)
    if summary.ran == 0 and not summary.requeued:
        counts = state.counts(conn, ("done",))
        done = sum(c["done"] for name, c in counts.items() if steps is None or name in steps)
        if not manifest.start_steps and not a.start and done == 0:
            out.log("info", "nothing to do: no start step and no pending tasks; add inputs with "
                            "'task-pipeline submit STEP FILE'")
        else:
            out.log("info", f"nothing to do: {done} task(s) already done, none pending")
    else:
        rows = []
        for name in manifest.names:
            d, f = summary.done[name], sum(1 for r in summary.failed if r.step == name)
            if d or f:
                rows.append([name, d, f])
        if not out.quiet:
            out.err.print(table(None, ["step", "done", "failed"], rows, right=["done", "failed"]))
        out.log("info", f"ran {summary.ran} task(s) in {summary.elapsed:.2f}s ({fmt_rate(summary.ran, summary.elapsed)}): "
                        f"{sum(summary.done.values())} done, {len(summary.failed)} failed"
                        + (f", {summary.retried} retried" if summary.retried else "")
                        + (f", {summary.requeued} re-queued" if summary.requeued else ""))
    failed = queries.failed_tasks(conn, steps)
    if failed:
        for f in failed:
            f["stderr"] = last_stderr_line(store, f["stderr_hash"])
        out.err.print(failures_table(failed))
        total = queries.count_failed(conn, steps)
        out.log("error", f"{total} task(s) failed; see 'task-pipeline -db {a.db} logs TASK', fix, then "
                         f"'task-pipeline -db {a.db} retry'")
    if summary.store_error:
        return 3
    return EXIT_FAILED if failed else EXIT_OK


def _near(a: str, b: str) -> bool:
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.75


def last_stderr_line(store: Store, h: str | None) -> str | None:
    if not h or not store.has(h):
        return None
    with store.open(h) as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(f.tell() - 2048, 0))
        lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1] if lines else None


def report_registration(reg: state.Registration, out: Output) -> None:
    for name, old, new in reg.new_versions:
        if old is not None:
            out.log("info", f"{name}: version {new} is current (was {old})")
    for name, n in reg.restored.items():
        out.log("info", f"{name}: {n} result(s) of the current version count again; nothing to re-run for them")
    for name, n in reg.requeued.items():
        out.log("info", f"{name}: {n} pending task(s) moved to the current version")
    for name, n in reg.backfilled.items():
        if n:
            out.log("info", f"{name}: {n} existing output(s) queued for this step")


def report_tainted(tainted: dict[str, state.Taint], a: Namespace, out: Output) -> None:
    for name, t in tainted.items():
        frm = ",".join(f"v{v}" for v in t.from_versions)
        out.log("warning", f"{t.count} tasks of {name} are tainted ({frm} -> v{t.to_version}); re-run them with: "
                           f"{command_hint(a, '-migrate-tainted')} (add --dry-run to preview)")


def do_migrate(conn, a: Namespace, out: Output) -> dict:
    found = state.migrate_tainted(conn, dry_run=a.dry_run)
    if not found:
        out.log("info", "nothing tainted: every finished task is on its step's current version")
    for name, t in found.items():
        frm = ",".join(f"v{v}" for v in t.from_versions)
        verb = "would re-queue" if a.dry_run else "re-queued"
        out.log("info", f"{name}: {verb} {t.count} task(s) ({frm} -> v{t.to_version})")
    return found


def cmd_migrate(a: Namespace, out: Output) -> int:
    conn, _ = open_store(a, create=bool(a.manifest))
    if a.manifest:
        reg = state.register(conn, need_manifest(a))
        report_registration(reg, out)
    found = do_migrate(conn, a, out)
    if a.json:
        print_json({name: {"tasks": t.count, "from": list(t.from_versions), "to": t.to_version}
                    for name, t in found.items()})
    if found and not a.dry_run and not a.run:
        out.log("info", f"run them with: {command_hint(a, '-run')}")
    if a.run and not a.dry_run:
        return cmd_run(a, out)
    return EXIT_OK


# -- looking at results ------------------------------------------------------------


def cmd_export(a: Namespace, out: Output) -> int:
    (step,) = args_exactly(a, 1, "export STEP [-input-path P] [--all] [--json]")
    conn, store = open_store(a)
    if a.input_path:
        ref = _input_ref(a.input_path, store)
        rows = queries.export_outputs(conn, step, ref, history=a.history)
    else:
        rows = queries.export_inputs(conn, step, history=a.history)
    for r in rows:
        r["path"] = str(store.path(r["hash"]))
    if a.json:
        print_json(rows)
    else:
        sys.stdout.write("".join(r["path"] + "\n" for r in rows))
    return EXIT_OK


def _input_ref(p: str, store: Store) -> str:
    """-input-path accepts an object path (as -export prints them), a hash, or an input file name."""
    path = Path(p)
    try:
        rel = path.resolve().relative_to(store.objects.resolve())
        return "".join(rel.parts)
    except ValueError:
        return p


def cmd_cat(a: Namespace, out: Output) -> int:
    (ref,) = args_exactly(a, 1, "cat HASH")
    conn, store = open_store(a)
    h = queries.resolve_hash(conn, ref)
    store.stream(h, sys.stdout.buffer)
    sys.stdout.buffer.flush()
    return EXIT_OK


def cmd_status(a: Namespace, out: Output) -> int:
    args_exactly(a, 0, "status [--json]")
    conn, store = open_store(a)
    counts = queries.step_counts(conn)
    age = queries.oldest_pending_age(conn)
    failed = queries.failed_tasks(conn, limit=5)
    totals = {k: sum(c[k] for c in counts) for k in ("pending", "running", "done", "failed", "tainted")}
    if a.json:
        print_json({"steps": counts, "totals": totals, "oldest_pending_age": age, "last_failures": failed})
        return EXIT_OK
    rows = [[c["step"] + ("" if c["in_manifest"] else " (removed)"), f"v{c['version']}", c["pending"], c["running"],
             c["done"], c["failed"], c["tainted"], c["last_error"] or ""] for c in counts]
    rows.append(["total", "", *totals.values(), ""])
    out.print(table(None, ["step", "version", "pending", "running", "done", "failed", "tainted", "last error"], rows,
                    right=["pending", "running", "done", "failed", "tainted"]))
    if age is not None:
        out.print(f"oldest pending task: {age:.0f}s old")
    if failed:
        for f in failed:
            f["stderr"] = last_stderr_line(store, f["stderr_hash"])
        out.print(failures_table(failed))
    return EXIT_OK


def cmd_logs(a: Namespace, out: Output) -> int:
    (ref,) = args_exactly(a, 1, "logs TASK")
    if not ref.isdigit():
        raise UsageError(f"'{ref}' is not a task id; 'task-pipeline status' lists failed tasks with their ids")
    conn, store = open_store(a)
    info = queries.task_attempts(conn, int(ref))
    if a.json:
        print_json(info)
        return EXIT_OK
    from rich.markup import escape  # names and errors come from scripts: "[x]" is text, not markup

    out.print(escape(f"task {info['task']}: {info['step']} v{info['version']} on {info['input'] or '(start)'}, "
                     f"{info['state']}" + ("" if info["live"] else " (superseded)")))
    for at in info["attempts"]:
        dur = (at["finished_at"] - at["started_at"]) if at["started_at"] and at["finished_at"] else None
        out.print(escape(f"-- attempt {at['attempt']}: {at['outcome']}, exit {at['exit_code']}"
                         + (f", {dur:.2f}s" if dur is not None else "") + (f": {at['error']}" if at["error"] else "")))
        for label in ("stdout", "stderr"):
            h = at[f"{label}_hash"]
            if h and store.has(h):
                with store.open(h) as f:  # the tail: the end of a log is where the error is
                    size = os.fstat(f.fileno()).st_size
                    f.seek(max(size - 64 * 1024, 0))
                    data = f.read()
                if data:
                    if size > len(data):
                        data = data.split(b"\n", 1)[-1]
                    sys.stdout.write(f"   [{label}]" + (f" (last {len(data)} of {size} bytes)" if size > len(data) else "") + "\n")
                    sys.stdout.write(data.decode("utf-8", "replace").rstrip("\n") + "\n")
    return EXIT_OK


def cmd_validate(a: Namespace, out: Output) -> int:
    m = need_manifest(a, runs=False)
    if not m.workdir.is_dir():
        out.log("warning", f"{m.path}: the workdir {m.workdir} does not exist here; create it before running")
    starts = ", ".join(s.name for s in m.start_steps) or "none (fed by submit)"
    out.print(f"{m.path}: {len(m.steps)} step(s) valid; start: {starts}")
    return EXIT_OK


def cmd_retry(a: Namespace, out: Output) -> int:
    if len(a.args) > 1:
        raise UsageError("usage: task-pipeline retry [STEP]")
    conn, _ = open_store(a)
    n = state.retry_failed(conn, a.args[0] if a.args else None)
    out.log("info", f"re-queued {n} failed task(s)" + ("; run them with 'task-pipeline run' or let 'serve' pick them up" if n else ""))
    return EXIT_OK


def cmd_invalidate(a: Namespace, out: Output) -> int:
    (step,) = args_exactly(a, 1, "invalidate STEP")
    conn, _ = open_store(a)
    n = state.invalidate(conn, step)
    out.log("info", f"{step}: {n} task(s) will run again; downstream re-runs only where outputs change")
    return EXIT_OK


def cmd_why(a: Namespace, out: Output) -> int:
    (ref,) = args_exactly(a, 1, "why HASH")
    conn, _ = open_store(a)
    chain = queries.lineage(conn, queries.resolve_hash(conn, ref))
    if a.json:
        print_json(chain)
        return EXIT_OK
    for i, hop in enumerate(chain):
        step = hop["step"] + (f" v{hop['version']}" if hop["version"] else "")
        task = f"task {hop['task']}" if hop["task"] else "submitted"
        out.print(f"{'  ' * i}{step} ({task}) -> {hop['name']} {hop['object'][:12]}")
    return EXIT_OK


def _lazy(module: str, name: str):
    def call(a: Namespace, out: Output) -> int:
        import importlib

        return getattr(importlib.import_module(f"task_pipeline.{module}"), name)(a, out)
    return call


HANDLERS = {
    "run": cmd_run,
    "migrate": cmd_migrate,
    "export": cmd_export,
    "cat": cmd_cat,
    "status": cmd_status,
    "logs": cmd_logs,
    "retry": cmd_retry,
    "invalidate": cmd_invalidate,
    "why": cmd_why,
    "validate": cmd_validate,
    "serve": _lazy("daemon", "cmd_serve"),
    "submit": _lazy("daemon", "cmd_submit"),
    "gc": _lazy("housekeeping", "cmd_gc"),
    "fsck": _lazy("housekeeping", "cmd_fsck"),
    "graph": _lazy("graph", "cmd_graph"),
    "init": _lazy("starter", "cmd_init"),
}
