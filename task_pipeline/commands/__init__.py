"""The commands: from parsed arguments to output and an exit code.

Thin on purpose: each command opens the store, calls state, queries, housekeeping
or the engine, and prints the result through report.py. The modules:

- run.py: run and migrate (with --dry-run plans), and what a run says at the end;
- serve.py: the daemon;
- results.py: export, cat, why (getting results out);
- status.py: status, logs;
- actions.py: submit, retry, invalidate;
- housekeeping.py: gc, fsck;
- check.py: check (is a step deterministic?);
- manifests.py: validate, init, graph.

Modules are imported when their command runs: `cat` should not pay for anyio.
"""

from __future__ import annotations

import importlib
from argparse import Namespace

from task_pipeline.report import Output

HANDLERS = {
    "run": ("run", "cmd_run"),
    "migrate": ("run", "cmd_migrate"),
    "serve": ("serve", "cmd_serve"),
    "export": ("results", "cmd_export"),
    "cat": ("results", "cmd_cat"),
    "why": ("results", "cmd_why"),
    "status": ("status", "cmd_status"),
    "logs": ("status", "cmd_logs"),
    "submit": ("actions", "cmd_submit"),
    "retry": ("actions", "cmd_retry"),
    "invalidate": ("actions", "cmd_invalidate"),
    "gc": ("housekeeping", "cmd_gc"),
    "fsck": ("housekeeping", "cmd_fsck"),
    "check": ("check", "cmd_check"),
    "validate": ("manifests", "cmd_validate"),
    "init": ("manifests", "cmd_init"),
    "graph": ("manifests", "cmd_graph"),
}


def handler(command: str):
    module, name = HANDLERS[command]
    return getattr(importlib.import_module(f"task_pipeline.commands.{module}"), name)


def dispatch(a: Namespace) -> int:
    out = Output(verbose=a.verbose, quiet=a.quiet, log_format=a.log_format)
    try:
        return handler(a.command)(a, out) or 0
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
