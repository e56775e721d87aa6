"""`run` and `migrate`: register the manifest, re-queue tainted work, process until nothing is left.

`--dry-run` runs the same registration, migration and seeding inside a
transaction that is rolled back, and shows per step what would run and why
(like `make -n`: tasks further downstream appear only as outputs do, so they
cannot be listed in advance). An interrupted run exits 130 (SIGINT) or 143
(SIGTERM), saying how much is left, so that `run && publish` never publishes
half a result.
"""

from __future__ import annotations

import difflib
import os
import signal
from argparse import Namespace
from pathlib import Path

from task_pipeline import lint, queries, state
from task_pipeline.commands.common import (Opened, command_hint, iso, need_manifest, open_store, print_json,
                                           step_filter, store_args)
from task_pipeline.errors import UsageError
from task_pipeline.location import SECRET_ENV
from task_pipeline.manifest import Manifest
from task_pipeline.overview import last_stderr_line
from task_pipeline.report import Output, RunReporter, failures_table, fmt_rate, table
from task_pipeline.state import Summary
from task_pipeline.store import Store

EXIT_OK, EXIT_FAILED = 0, 1
DEFAULT_LEASE = 60.0


def cmd_run(a: Namespace, out: Output) -> int:
    manifest = need_manifest(a)
    steps = step_filter(a, manifest)
    if a.start and a.start not in manifest.names:
        raise UsageError(f"-start {a.start}: no such step in {manifest.path} (steps: {', '.join(manifest.names)})")
    for w in lint.warnings(manifest):
        out.log("warning", w)
    if a.dry_run:
        return dry_run(a, out, manifest, steps)
    opened = open_store(a, create=True)
    db = opened.db
    check_manifest_switch(db, manifest, a)
    reg = state.register(db, manifest)
    report_registration(reg, out)
    if a.migrate_tainted:
        report_migration(state.migrate_tainted(db), a, out, dry=False)
    seeds = [a.start] if a.start else [s.name for s in manifest.start_steps]
    if steps is not None:
        seeds = [s for s in seeds if s in steps]
    state.seed_start(db, seeds, a.runset)
    report_tainted(state.tainted(db), a, out)

    from task_pipeline.housekeeping import reap_dead_scratch

    # dead runners' scratch goes even when there is nothing to run (cheap: one scandir)
    reap_dead_scratch(db, opened.loc.scratch, shared=not opened.loc.shared)
    ol = state.outlook(db, steps)
    if ol.runnable == 0 and ol.next_due is None and ol.running == 0 \
            and not any(g.ready for g in state.gather_states(db, steps)):
        # Nothing to do: skip starting the engine (the common case of a re-run, kept fast).
        return finish_run(opened, Summary(), a, out, steps, manifest)
    import anyio

    from task_pipeline.scheduler import Db, EngineOptions

    pending = {name: c["pending"] + c["running"] for name, c in state.counts(db).items()}
    opts = EngineOptions(parallel=a.parallel or os.cpu_count() or 1, scratch=opened.loc.scratch, steps=steps,
                         fail_fast=a.fail_fast, grace=30.0 if a.grace is None else a.grace,
                         lease=a.lease or DEFAULT_LEASE, env_drop=SECRET_ENV, scratch_shared=not opened.loc.shared)
    with RunReporter(out, pending, [s.name for s in manifest.steps]) as reporter:
        summary = anyio.run(_engine_with_signals, Db(db), opened.store, opts, reporter)
    return finish_run(opened, summary, a, out, steps, manifest)


async def _engine_with_signals(db, store: Store, opts, reporter) -> Summary:
    """Run the engine; the first SIGINT/SIGTERM drains (running scripts get --grace seconds), a second kills."""
    import anyio

    from task_pipeline.scheduler import run_engine

    stop = anyio.Event()
    got: list[int] = []
    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for sig in signals:
                    if stop.is_set():
                        reporter.log("warning", "second signal: stopping scripts now")
                        opts.grace = 0
                    else:
                        got.append(sig)
                        reporter.log("warning", f"stopping: no new tasks; running ones get {opts.grace:g}s "
                                                f"(signal again to stop them now)")
                    stop.set()

        tg.start_soon(watch)
        summary = await run_engine(db, store, opts, reporter, stop=stop)
        tg.cancel_scope.cancel()
    if got:
        summary.interrupted = int(got[0])
    return summary


def finish_run(opened: Opened, summary: Summary, a: Namespace, out: Output, steps, manifest: Manifest) -> int:
    db, store = opened.db, opened.store
    for key, n in sorted(summary.unrouted.items()):
        close = [s for s in manifest.names if s.lower() == key.lower() or _near(s, key)]
        hint = f" (did you mean '{close[0]}'?)" if close and close[0] != key else ""
        if key in manifest.names and manifest.step(key).start:
            hint = f" ('{key}' is a start step, and start steps consume nothing)"
        out.log("warning", f"unrouted: {n} output(s) with route key '{key}' went nowhere: no step consumes it{hint}; "
                           f"they are kept as terminal outputs (list them with 'export --unrouted')")
    if summary.store_error:
        out.log("error", summary.store_error)
    report_gathers(db, steps, out)
    counts = state.counts(db, ("pending", "running", "done", "failed"))
    left = {k: sum(c[k] for name, c in counts.items() if steps is None or name in steps)
            for k in ("pending", "running", "done", "failed")}
    failed = queries.failed_tasks(db, steps)
    for f in failed:
        f["stderr"] = last_stderr_line(store, f["stderr_hash"])
    json_log = out.log_format == "json"
    if summary.finished == 0 and not summary.requeued and not summary.interrupted:
        if not manifest.start_steps and not a.start and left["done"] == 0 and not left["failed"]:
            out.log("info", "nothing to do: no start step and no pending tasks; add inputs with "
                            f"'{command_hint(a, 'submit', manifest=False)} STEP FILE'")
        elif not failed:
            tainted = sum(t.count for t in state.tainted(db).values())
            out.log("info", f"nothing to do: {left['done']} task(s) already done, none pending"
                            + (f"; {tainted} finished task(s) are tainted (see above)" if tainted else ""))
    else:
        rows = []
        for name in manifest.names:
            d, f = summary.done[name], sum(1 for r in summary.failed if r.step == name)
            if d or f:
                rows.append([name, d, f])
        if json_log:
            out.emit_json("summary", {
                "finished": summary.finished, "done": sum(summary.done.values()), "failed": len(summary.failed),
                "attempts": summary.attempts, "retried": summary.retried, "requeued": summary.requeued,
                "seconds": round(summary.elapsed, 3), "steps": {r[0]: {"done": r[1], "failed": r[2]} for r in rows},
                "left": left, "interrupted": signal.Signals(summary.interrupted).name if summary.interrupted else None})
        elif not out.quiet and rows:
            out.err.print(table(None, ["step", "done", "failed"], rows, right=["done", "failed"]))
        text = (f"{summary.finished} task(s) finished in {summary.elapsed:.2f}s "
                f"({fmt_rate(summary.finished, summary.elapsed)}): {sum(summary.done.values())} done, "
                f"{len(summary.failed)} failed")
        if summary.retried:
            text += f"; {summary.attempts} attempts, {summary.retried} of them failed and retried"
        if summary.requeued:
            text += f"; {summary.requeued} given back to the queue"
        out.log("info", text)
    if failed:
        if json_log:
            out.emit_json("failures", {"tasks": [{k: (iso(v) if k == "finished_at" else v) for k, v in f.items()}
                                                  for f in failed]})
        else:
            out.err.print(failures_table(failed))
        total = queries.count_failed(db, steps)
        out.log("error", f"{total} task(s) failed; see '{command_hint(a, 'logs', manifest=False)} TASK', fix, then "
                         f"'{command_hint(a, 'retry', manifest=False)}' and run again")
    if summary.interrupted:
        name = signal.Signals(summary.interrupted).name
        out.log("error", f"interrupted by {name}: {left['pending'] + left['running']} task(s) not finished "
                         f"({left['pending']} pending); run the same command again to go on")
        return 128 + summary.interrupted
    if summary.store_error:
        return 3
    return EXIT_FAILED if failed else EXIT_OK


def report_gathers(db, steps, out: Output) -> None:
    """Gather steps that did not fire in this run although their set has changed, and why."""
    for g in state.gather_states(db, steps):
        why = g.waiting
        if why is None or not (g.due or g.members is None):
            continue
        if g.failed and g.on_failure == "wait" and not g.busy:
            hint = "; retry them once fixed, or set on_failure = \"gather\" to gather what succeeded"
        elif g.busy and steps is not None:
            hint = f" (steps upstream: {', '.join(g.upstream)}; this run was limited with -step)"
        else:
            hint = ""
        out.log("warning", f"gather step '{g.step}' did not run: {why}{hint}")


def _near(a: str, b: str) -> bool:
    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.75


# -- what registration did ---------------------------------------------------------------------


def check_manifest_switch(db, manifest: Manifest, a: Namespace) -> None:
    """A store registered from one manifest, now given another with other steps: say so before anything
    changes (a user who mixed up two -db paths would otherwise taint or remove the first pipeline)."""
    prev = state.registered(db)
    path = str(Path(manifest.path).resolve())
    if not prev.manifest or prev.manifest == path or not prev.steps or a.replace_manifest:
        return
    old, new = set(prev.steps), set(manifest.names)
    current = {r[0]: r[1] for r in db.execute(
        "SELECT c.name, s.identity FROM step_current c JOIN step s ON s.id = c.step_id WHERE c.in_manifest=1")}
    changed = sorted(s.name for s in manifest.steps if s.name in current and current[s.name] != s.identity)
    if old == new and not changed:
        return  # the same pipeline from another path (a moved or copied manifest)
    when = iso(prev.at) if prev.at else "an unknown time"
    what = []
    if old - new:
        what.append(f"remove {', '.join(sorted(old - new))}")
    if changed:
        what.append(f"make new versions of {', '.join(changed)} (tainting their results)")
    if new - old:
        what.append(f"add {', '.join(sorted(new - old))}")
    raise UsageError(
        f"this store ({store_args(a)}) was last registered from {prev.manifest} on {prev.host or 'an unknown host'} at "
        f"{when}, with steps {', '.join(prev.steps)}; registering {manifest.path} would {'; '.join(what)}. Nothing was "
        f"changed. If you meant another store, check -db; to switch this store to {manifest.path} on purpose, "
        f"add --replace-manifest")


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
    if reg.removed:
        out.log("info", f"no longer in the manifest: {', '.join(reg.removed)} (kept as history)")


def report_tainted(tainted: dict[str, state.Taint], a: Namespace, out: Output) -> None:
    for name, t in tainted.items():
        frm = ",".join(f"v{v}" for v in t.from_versions)
        out.log("warning", f"{t.count} tasks of {name} are tainted ({frm} -> v{t.to_version}); re-run them with: "
                           f"{command_hint(a, '-migrate-tainted')} (add --dry-run to preview)")


def report_migration(found: dict[str, state.Taint], a: Namespace, out: Output, *, dry: bool) -> None:
    if not found:
        out.log("info", "nothing tainted: every finished task is on its step's current version")
    for name, t in found.items():
        frm = ",".join(f"v{v}" for v in t.from_versions)
        out.log("info", f"{name}: {'would re-queue' if dry else 're-queued'} {t.count} task(s) ({frm} -> v{t.to_version})")


# -- migrate --------------------------------------------------------------------------------------


def cmd_migrate(a: Namespace, out: Output) -> int:
    a.migrate_tainted = True  # `migrate M -run` is `-migrate-tainted -run` spelled as a command
    if a.run:
        return cmd_run(a, out) if not a.dry_run else dry_run(a, out, need_manifest(a), step_filter(a, need_manifest(a)))
    manifest = need_manifest(a) if a.manifest else None
    if a.dry_run:
        opened = open_store(a)
        db = opened.db

        def simulate(db):
            if manifest is not None:
                check_manifest_switch(db, manifest, a)
                state.register(db, manifest)
            return state.migrate_tainted(db)

        found = state.dry_run(db, simulate)
    else:
        opened = open_store(a, create=manifest is not None)
        db = opened.db
        if manifest is not None:
            check_manifest_switch(db, manifest, a)
            report_registration(state.register(db, manifest), out)
        found = state.migrate_tainted(db)
    if a.json:
        print_json({name: {"tasks": t.count, "from": list(t.from_versions), "to": t.to_version}
                    for name, t in found.items()})
    report_migration(found, a, out, dry=a.dry_run)
    if found and not a.dry_run:
        out.log("info", f"run them with: {command_hint(a, 'run')}")
    return EXIT_OK


# -- dry runs --------------------------------------------------------------------------------------


def dry_run(a: Namespace, out: Output, manifest: Manifest, steps) -> int:
    """What `run` would do, per step and why; nothing is claimed, created or changed."""
    try:
        opened = open_store(a)
    except Exception as e:  # noqa: BLE001 - no store yet: everything would be new
        from task_pipeline.errors import StoreError

        if not isinstance(e, StoreError) or "no store here" not in str(e) and "no tables" not in str(e):
            raise
        seeds = [a.start] if a.start else [s.name for s in manifest.start_steps]
        out.log("info", f"no store at {a.db or './db'} yet: the run would create it")
        rows = [[name, 1, "1 start"] for name in seeds if steps is None or name in steps]
        if rows:
            out.print(table("Would run", ["step", "tasks", "why"], rows, right=["tasks"]))
            out.print("steps further down run as outputs appear (a dry run cannot know them in advance)")
        else:
            out.print("nothing would run: no start step, and a new store has no inputs (add them with submit)")
        return EXIT_OK
    db = opened.db

    def simulate(db):
        check_manifest_switch(db, manifest, a)
        reg = state.register(db, manifest)
        migrated = state.migrate_tainted(db) if a.migrate_tainted else {}
        seeds = [a.start] if a.start else [s.name for s in manifest.start_steps]
        if steps is not None:
            seeds = [s for s in seeds if s in steps]
        state.seed_start(db, seeds, a.runset)
        return reg, migrated, state.plan(db, steps), state.tainted(db), state.counts(db, ("running",))

    reg, migrated, plan, tainted, running = state.dry_run(db, simulate)
    for name, old, new in reg.new_versions:
        if old is not None:
            out.log("info", f"{name}: version {new} would become current (was {old})")
    for name, n in reg.backfilled.items():
        if n:
            out.log("info", f"{name}: {n} existing output(s) would be queued for this step")
    if a.migrate_tainted:
        report_migration(migrated, a, out, dry=True)
    rows = []
    for name, reasons in plan.items():
        why = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda kv: state.PLAN_REASONS.index(kv[0])))
        rows.append([name, sum(reasons.values()), why])
    if rows:
        out.print(table("Would run", ["step", "tasks", "why"], rows, right=["tasks"]))
        out.print("steps further down run as outputs appear (a dry run cannot know them in advance)")
    else:
        out.print("nothing would run: no pending tasks")
    busy = sum(c["running"] for c in running.values())
    if busy:
        out.print(f"{busy} task(s) are being run by other runners now")
    if tainted and not a.migrate_tainted:
        report_tainted(tainted, a, out)
    return EXIT_OK
