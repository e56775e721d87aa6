"""Command line: both the Go tool's flags and subcommands (SPEC section 6).

`task-pipeline -manifest x.toml -db D -run` and `task-pipeline run -m x.toml -db D`
are the same thing; every `-flag` also works as `--flag`. This module only parses
and dispatches; the commands live in commands.py (and daemon.py for `serve`).
Errors a user can cause end here as one line and an exit code: 2 for usage and
manifests, 3 for the store; a traceback only with -verbose.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sqlite3
import sys
import traceback

from task_pipeline import __version__
from task_pipeline.errors import StoreError, UsageError, UserError

COMMANDS = {
    "run": "register the manifest, then process until no work is left",
    "migrate": "re-queue tainted tasks on their step's current version",
    "export": "list object paths of STEP's inputs, or (with -input-path P) of that task's outputs",
    "cat": "write an object to stdout",
    "status": "tasks per step: version, pending, running, done, failed, tainted",
    "logs": "the attempts of a task, with exit codes and stderr",
    "retry": "re-queue failed tasks (of one step, or all)",
    "invalidate": "re-run a step's current tasks; unchanged outputs stop the cascade",
    "submit": "add input files from outside (- reads stdin)",
    "serve": "the daemon: process work as it appears until stopped",
    "why": "the chain of tasks that produced an object",
    "graph": "the step graph as Mermaid (default) or DOT",
    "gc": "remove unreferenced objects and leftover scratch files",
    "fsck": "re-hash every object and check every reference",
    "validate": "check a manifest without running anything",
    "init": "write a commented starter manifest",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage dump
        raise UsageError(f"{message}; see 'task-pipeline --help'")


def build_parser() -> argparse.ArgumentParser:
    epilog = "commands:\n" + "\n".join(f"  {k:<11} {v}" for k, v in COMMANDS.items()) + (
        "\n\nGo-style: -manifest M -db D -run | -migrate-tainted [--dry-run] | -export STEP [-input-path P]"
        " | -export-hash H\nExit codes: 0 ok, 1 task failures, 2 bad usage or manifest, 3 store error.")
    p = _Parser(prog="task-pipeline", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="A content-addressed task queue for shell-script pipelines.", epilog=epilog)
    p.add_argument("command", nargs="?", metavar="COMMAND", help="one of the commands below (optional with Go-style flags)")
    p.add_argument("args", nargs="*", metavar="ARG", help="the command's arguments")

    def flag(*names, **kw):
        spellings = []
        for n in names:
            spellings += [f"-{n}", f"--{n}"] if len(n) > 1 else [f"-{n}"]
        return p.add_argument(*spellings, **kw)

    flag("manifest", "m", metavar="M", help="the TOML manifest")
    flag("db", metavar="D", default=os.environ.get("TASK_PIPELINE_DB", "./db"),
         help="store directory (default ./db, or $TASK_PIPELINE_DB)")
    flag("run", action="store_true", help="run the pipeline (Go-style)")
    flag("migrate-tainted", dest="migrate_tainted", action="store_true", help="migrate tainted tasks (Go-style)")
    flag("export", metavar="STEP", help="export STEP's inputs (Go-style)")
    flag("export-hash", dest="export_hash", metavar="H", help="stream object H (Go-style)")
    flag("input-path", dest="input_path", metavar="P", help="with -export: the outputs of the task whose input is P")
    flag("parallel", "j", type=int, metavar="N", help="global concurrency (default: CPU count)")
    flag("start", metavar="STEP", help="seed from STEP instead of the start step(s)")
    flag("step", action="append", metavar="S", help="run only these steps (repeatable)")
    flag("runset", metavar="NAME", default="", help="group a run; start tasks run again under a new runset")
    flag("verbose", "v", action="store_true", help="more output; tracebacks on errors")
    flag("quiet", "q", action="store_true", help="only errors")
    flag("json", action="store_true", help="machine-readable output")
    flag("dry-run", dest="dry_run", action="store_true", help="show what would change, change nothing")
    flag("fail-fast", dest="fail_fast", action="store_true", help="stop claiming new work after a failure")
    flag("all", dest="history", action="store_true", help="include history: superseded tasks and old versions")
    flag("route", action="store_true", help="submit: route each file by its name")
    flag("hash", metavar="ALGO", choices=["sha256", "blake3"], help="init: hash algorithm of a new store")
    flag("format", metavar="F", choices=["mermaid", "dot"], default="mermaid", help="graph: mermaid or dot")
    flag("grace", type=float, default=30.0, metavar="SECONDS", help="serve/run: time running scripts get on stop")
    flag("log-format", dest="log_format", choices=["auto", "plain", "json"], default="auto",
         help="auto (live on a terminal), plain lines, or one JSON object per line")
    flag("force", action="store_true", help="gc: even while a runner is active")
    flag("version", action="version", version=f"task-pipeline {__version__}")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    a = build_parser().parse_intermixed_args(argv)
    if a.command is not None and a.command not in COMMANDS:
        # With Go-style flags the first positional may be an argument, e.g. `-export-hash` forms never have one.
        close = difflib.get_close_matches(a.command, COMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; commands: {', '.join(COMMANDS)}"
        raise UsageError(f"unknown command '{a.command}'{hint}")
    if a.command is None:
        if a.args:
            raise UsageError(f"unexpected argument '{a.args[0]}'; see 'task-pipeline --help'")
        if a.export_hash:
            a.command, a.args = "cat", [a.export_hash]
        elif a.export:
            a.command, a.args = "export", [a.export]
        elif a.run:
            a.command = "run"
        elif a.migrate_tainted:
            a.command = "migrate"
        else:
            raise UsageError("nothing to do: give a command (e.g. 'run') or -run; see 'task-pipeline --help'")
    if a.parallel is not None and a.parallel < 1:
        raise UsageError(f"-parallel must be at least 1 (got {a.parallel})")
    if a.verbose and a.quiet:
        raise UsageError("-verbose and -quiet contradict each other; pick one")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = any(x in ("-v", "-verbose", "--verbose") for x in argv)
    try:
        a = parse(argv)
        from task_pipeline import commands

        return commands.dispatch(a)
    except UserError as e:
        if verbose:
            traceback.print_exc()
        _say(str(e))
        return e.exit_code
    except sqlite3.DatabaseError as e:
        if verbose:
            traceback.print_exc()
        _say(f"database error: {e}; run 'task-pipeline fsck' and check the disk")
        return StoreError.exit_code
    except BrokenPipeError:
        return 0
    except OSError as e:
        if verbose:
            traceback.print_exc()
        where = f"{e.filename}: " if e.filename else ""
        _say(f"{where}{e.strerror or e}")
        return StoreError.exit_code
    except KeyboardInterrupt:
        _say("interrupted")
        return 130


def _say(text: str) -> None:
    try:
        sys.stderr.write(f"task-pipeline: {text}\n")
    except OSError:
        pass
