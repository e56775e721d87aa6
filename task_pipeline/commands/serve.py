"""`serve`: register the manifest and hand over to the daemon (task_pipeline.daemon) until stopped."""

from __future__ import annotations

import os
from argparse import Namespace
from pathlib import Path

from task_pipeline import lint, state
from task_pipeline.commands.common import need_manifest, open_store, step_filter
from task_pipeline.commands.run import DEFAULT_LEASE, check_manifest_switch, report_registration, report_tainted
from task_pipeline.location import SECRET_ENV
from task_pipeline.report import DaemonReporter, Output


def cmd_serve(a: Namespace, out: Output) -> int:
    import anyio

    from task_pipeline.daemon import Daemon
    from task_pipeline.scheduler import Db, EngineOptions

    if out.log_format == "auto":
        out.log_format = "plain"   # a daemon's log wants timestamps even on a terminal
    manifest = need_manifest(a)
    steps = step_filter(a, manifest)
    for w in lint.warnings(manifest):
        out.log("warning", w)
    opened = open_store(a, create=True)
    check_manifest_switch(opened.db, manifest, a)
    reg = state.register(opened.db, manifest)
    report_registration(reg, out)
    report_tainted(reg.tainted, a, out)
    opts = EngineOptions(parallel=a.parallel or os.cpu_count() or 1, scratch=opened.loc.scratch, until_idle=False,
                         kind="serve", grace=30.0 if a.grace is None else a.grace, steps=steps,
                         lease=a.lease or DEFAULT_LEASE, persist=True, env_drop=SECRET_ENV,
                         scratch_shared=not opened.loc.shared)

    def registered(r: state.Registration) -> None:
        report_registration(r, out)
        report_tainted(r.tainted, a, out)

    daemon = Daemon(Db(opened.db, persist=True, log=out.log), opened.store, opts, manifest, Path(a.manifest),
                    a.runset, DaemonReporter(out), registered, where=opened.loc.describe())
    summary = anyio.run(daemon.main)
    if summary.store_error:
        out.log("error", summary.store_error)
    out.log("info", f"stopped: {summary.finished} task(s) finished in {summary.elapsed:.0f}s: "
                    f"{sum(summary.done.values())} done, {len(summary.failed)} failed"
                    + (f", {summary.requeued} given back to the queue" if summary.requeued else ""))
    return 3 if summary.store_error else 0
