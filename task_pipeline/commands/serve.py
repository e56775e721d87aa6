"""`serve`: register the manifest and hand over to the daemon (task_pipeline.daemon) until stopped.

With --http ADDR, the web window (task_pipeline.web) runs in the daemon's task group: its address
is checked and bound here, before anything else happens, so that a mistake is one line and exit 2.
"""

from __future__ import annotations

import os
from argparse import Namespace
from pathlib import Path

from task_pipeline import lint, state
from task_pipeline.commands.common import Opened, need_manifest, open_store, step_filter
from task_pipeline.commands.run import DEFAULT_LEASE, check_manifest_switch, report_registration, report_tainted
from task_pipeline.location import SECRET_ENV
from task_pipeline.report import DaemonReporter, Output


def cmd_serve(a: Namespace, out: Output) -> int:
    import anyio

    from task_pipeline.daemon import Daemon
    from task_pipeline.scheduler import Db, EngineOptions

    if out.log_format == "auto":
        out.log_format = "plain"   # a daemon's log wants timestamps even on a terminal
    http = _http_listener(a) if a.http else None
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

    reporter = DaemonReporter(out)
    web = None
    if http is not None:
        web, reporter = _web(http, opened, reporter, out)
    daemon = Daemon(Db(opened.db, persist=True, log=out.log), opened.store, opts, manifest, Path(a.manifest),
                    a.runset, reporter, registered, where=opened.loc.describe(), http=web)
    summary = anyio.run(daemon.main)
    if summary.store_error:
        out.log("error", summary.store_error)
    out.log("info", f"stopped: {summary.finished} task(s) finished in {summary.elapsed:.0f}s: "
                    f"{sum(summary.done.values())} done, {len(summary.failed)} failed"
                    + (f", {summary.requeued} given back to the queue" if summary.requeued else ""))
    return 3 if summary.store_error else 0


def _http_listener(a: Namespace):
    """--http and its token, checked, and the socket bound: (listen, socket, token)."""
    from task_pipeline import web
    from task_pipeline.web import listen, security

    web.require()
    where = listen.parse(a.http)
    token = security.read_token(a.http_token_file) if a.http_token_file else None
    listen.check(where, token is not None, a.http)
    from task_pipeline.web import server

    return where, server.bind(where, a.http), token


def _web(http, opened: Opened, reporter, out: Output):
    """The web app, on a database connection of its own, and the reporter that feeds its metrics."""
    import anyio

    from task_pipeline.web import app, server
    from task_pipeline.web.context import Web
    from task_pipeline.web.metrics import Metrics, Recorder
    from task_pipeline.web.reader import Reader, Snapshot
    from task_pipeline.web.security import Guard
    from task_pipeline.web.stepgraph import StepGraph

    where, sock, token = http
    # two connections of the web's own: requests' reads, and what is rebuilt in the background
    # (the status snapshot, the step graph), which must not hold up the requests
    reader, background = Reader(opened.db.sibling), Reader(opened.db.sibling)
    metrics = Metrics()
    where_store = opened.loc.describe()
    ctx = Web(reader, Snapshot(background, opened.store, where_store), opened.store, where_store, opened.loc.scratch,
              Guard(token, where.hosts()), metrics, app.templates(), StepGraph(reader, background))
    asgi = app.build(ctx, out.log)

    def ready(tg) -> None:
        ctx.snapshot.tg = ctx.graph.tg = tg

    async def run(stop: anyio.Event) -> None:
        out.log("info", f"http: dashboard and API on {where.url()}/" + (" (actions need the token)" if token else ""))
        try:
            await server.serve(asgi, sock, where, stop, out.log, ready)
        finally:
            with anyio.CancelScope(shield=True):
                await reader.close()
                await background.close()

    return run, Recorder(reporter, metrics)
