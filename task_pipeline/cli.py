"""Command line: the Go tool's flags and subcommands, each command taking only its own options.

`task-pipeline -manifest x.toml -db D -run` and `task-pipeline run x.toml -db D` are
the same thing; every `-flag` also works as `--flag`. The table below says which
options each command takes: anything else is a usage error that names the option
and the command (an option that would be silently ignored is how `gc --dry-run`
deleted objects). This module only parses and dispatches; the commands live in
task_pipeline.commands. Errors a user can cause end here as one line and an exit
code: 2 for usage and manifests, 3 for the store; a traceback only with -verbose.
"""

from __future__ import annotations

import argparse
import difflib
import math
import sys
import traceback
from dataclasses import dataclass

from task_pipeline import __version__
from task_pipeline.errors import StoreError, UsageError, UserError
from task_pipeline.textsafe import one_line

MAX_PARALLEL = 1024  # worker threads: beyond this a typo (100000) would only exhaust the machine


@dataclass(frozen=True)
class Opt:
    names: tuple[str, ...]    # spellings without dashes; each works as -name and --name (one letter: -n)
    help: str
    metavar: str | None = None   # None: a switch
    kind: type = str
    choices: tuple[str, ...] = ()
    repeat: bool = False


OPTS: dict[str, Opt] = {
    # the store: every command that opens one
    "db": Opt(("db",), "the store: a directory, or a postgresql:// URL (default ./db, or $TASK_PIPELINE_DB)", "D"),
    "objects": Opt(("objects",), "where objects live (default D/objects; required with PostgreSQL; "
                                 "$TASK_PIPELINE_OBJECTS)", "DIR"),
    "scratch": Opt(("scratch",), "local scratch space for running scripts (default D/tmp; $TASK_PIPELINE_SCRATCH)", "DIR"),
    # output
    "verbose": Opt(("verbose", "v"), "more output (per-task lines); tracebacks on errors"),
    "quiet": Opt(("quiet", "q"), "only errors"),
    "log_format": Opt(("log-format",), "auto (live on a terminal), plain lines, or one JSON object per line "
                                       "(run's summary and failures too)", "F", choices=("auto", "plain", "json")),
    "json": Opt(("json",), "machine-readable output on stdout"),
    # the pipeline
    "manifest": Opt(("manifest", "m"), "the TOML manifest (a lone .toml argument works too)", "M"),
    "parallel": Opt(("parallel", "j"), f"scripts at once in this runner (default: CPU count; at most {MAX_PARALLEL})",
                    "N", int),
    "start": Opt(("start",), "seed from STEP instead of the start step(s)", "STEP"),
    "step": Opt(("step",), "run only these steps (repeatable)", "S", repeat=True),
    "runset": Opt(("runset",), "group a run: start steps run again under a new runset", "NAME"),
    "fail_fast": Opt(("fail-fast",), "stop claiming new work after a failure"),
    "grace": Opt(("grace",), "on SIGINT/SIGTERM, seconds running scripts get to finish (default 30)", "SECONDS", float),
    "lease": Opt(("lease",), "seconds a claimed task stays leased without a heartbeat (default 60)", "SECONDS", float),
    "hash": Opt(("hash",), "hash algorithm of a new store: sha256 (default) or blake3", "ALGO",
                choices=("sha256", "blake3")),
    "replace_manifest": Opt(("replace-manifest",), "register this manifest even though the store was last "
                                                   "registered from another one with other steps"),
    "dry_run": Opt(("dry-run", "n"), "show what would happen; change nothing"),
    # Go-style actions
    "run": Opt(("run",), "run the pipeline (Go-style for 'run')"),
    "migrate_tainted": Opt(("migrate-tainted",), "re-queue tainted tasks (Go-style for 'migrate'); with -run, then run"),
    "export": Opt(("export",), "Go-style for 'export STEP'", "STEP"),
    "export_hash": Opt(("export-hash",), "Go-style for 'cat HASH'", "HASH"),
    # per command
    "input_path": Opt(("input-path",), "the outputs of the task whose input is P (an object path, a hash or a file name)", "P"),
    "outputs": Opt(("outputs",), "list the step's outputs instead of its inputs"),
    "unrouted": Opt(("unrouted",), "list current outputs that no step consumes"),
    "to": Opt(("to",), "write the files into DIR under their own names (read-only copies)", "DIR"),
    "link": Opt(("link",), "with --to: hard links instead of copies (never edit them: that would change the store)"),
    "layout": Opt(("layout",), "with --to: flat (DIR/NAME), step (DIR/STEP/NAME) or task (DIR/STEP/TASK/NAME)",
                  "L", choices=("flat", "step", "task")),
    "history": Opt(("all",), "include history: superseded tasks and old versions"),
    "route": Opt(("route",), "route each file by its name instead of naming the step"),
    "format": Opt(("format",), "mermaid (default) or dot", "F", choices=("mermaid", "dot")),
    "force": Opt(("force",), "even while runners are active (what they stored since they started is kept)"),
    "min_age": Opt(("min-age",), "keep unreferenced objects younger than this many seconds (default 0; 3600 "
                                 "for a bucket)", "SECONDS", float),
    "cache_size": Opt(("cache-size",), "objects in a bucket: keep up to SIZE of downloaded objects on this host "
                                       "(e.g. 10G; default none)", "SIZE"),
    "sample": Opt(("sample",), "re-run N of the step's done tasks, chosen at random (default: all of them)", "N", int),
    "http": Opt(("http",), "serve the API, dashboard and /metrics on ADDR: HOST:PORT (loopback unless a token "
                           "file is given) or a unix socket path; needs the web extra", "ADDR"),
    "http_token_file": Opt(("http-token-file",), "with --http: a file holding the token that actions (retry, "
                                                 "invalidate, submit) need; required off loopback", "FILE"),
}

GLOBAL = ("verbose", "quiet", "log_format")
STORE = ("db", "objects", "scratch")
RUN = ("manifest", "parallel", "start", "step", "runset", "fail_fast", "grace", "lease", "hash", "replace_manifest",
       "dry_run", "migrate_tainted", "cache_size")
ACTIONS = ("run", "migrate_tainted", "export", "export_hash")


@dataclass(frozen=True)
class Command:
    summary: str
    args: str                   # positional arguments, for usage lines
    options: tuple[str, ...]    # beside GLOBAL
    example: str
    max_args: int | None = 0    # None: any number
    min_args: int = 0
    manifest_arg: bool = False  # a lone positional .toml is the manifest


COMMANDS: dict[str, Command] = {
    "run": Command("register the manifest, then process until no work is left", "[MANIFEST]", STORE + RUN,
                   "task-pipeline run pipeline.toml -db ./db -parallel 4\n"
                   "task-pipeline -manifest pipeline.toml -db ./db -run        (Go-style)\n"
                   "task-pipeline run pipeline.toml --dry-run                  (what would run, and why)",
                   max_args=1, manifest_arg=True),
    "migrate": Command("re-queue tainted tasks on their step's current version", "[MANIFEST]",
                       STORE + RUN + ("json", "run"),
                       "task-pipeline migrate -manifest pipeline.toml --dry-run\n"
                       "task-pipeline -manifest pipeline.toml -migrate-tainted -run   (migrate, then run)",
                       max_args=1, manifest_arg=True),
    "export": Command("list or write out results: STEP's inputs, its outputs, done, or everything", "[STEP|done]",
                      STORE + ("input_path", "outputs", "unrouted", "to", "link", "layout", "history", "json"),
                      "task-pipeline export process                  (object paths of process's inputs)\n"
                      "task-pipeline export --outputs fetch          (what the start step fetch produced)\n"
                      "task-pipeline export done --to results/       (the final results, under their names)\n"
                      "task-pipeline export --to snapshot/           (every current output, DIR/STEP/NAME)",
                      max_args=1),
    "cat": Command("write an object to stdout", "HASH", STORE, "task-pipeline cat 3a7bd3e2360a > out.txt",
                   max_args=1, min_args=1),
    "status": Command("tasks per step: pending, running, done, failed, tainted", "", STORE + ("json", "history"),
                      "task-pipeline status\ntask-pipeline status --json | jq .totals"),
    "logs": Command("the attempts of a task, with exit codes, stdout and stderr", "TASK", STORE + ("json",),
                    "task-pipeline logs 42", max_args=1, min_args=1),
    "retry": Command("re-queue failed tasks (of one step, or all)", "[STEP]", STORE + ("dry_run", "json"),
                     "task-pipeline retry process --dry-run", max_args=1),
    "invalidate": Command("re-run a step's current tasks; unchanged outputs stop the cascade", "STEP",
                          STORE + ("dry_run", "json"), "task-pipeline invalidate process", max_args=1, min_args=1),
    "submit": Command("add input files from outside (- reads stdin)", "STEP FILE... | --route FILE...",
                      STORE + ("route", "runset", "json"),
                      "task-pipeline submit process data/*.csv\ncurl -s URL | task-pipeline submit process -",
                      max_args=None, min_args=1),
    "serve": Command("the daemon: process work as it appears until stopped", "[MANIFEST]",
                     STORE + ("manifest", "parallel", "step", "runset", "grace", "lease", "hash", "replace_manifest",
                              "cache_size", "http", "http_token_file"),
                     "task-pipeline serve pipeline.toml -db /var/lib/task-pipeline -parallel 8\n"
                     "task-pipeline serve pipeline.toml --http 127.0.0.1:8080          (dashboard at http://127.0.0.1:8080/)\n"
                     "task-pipeline serve pipeline.toml --http 0.0.0.0:8080 --http-token-file /etc/task-pipeline/token",
                     max_args=1, manifest_arg=True),
    "why": Command("every chain of tasks that produced an object", "HASH|PATH", STORE + ("json", "history"),
                   "task-pipeline why 3a7bd3e2360a\ntask-pipeline why $(task-pipeline export done | head -1)",
                   max_args=1, min_args=1),
    "graph": Command("the step graph as Mermaid (default) or DOT", "[MANIFEST]", STORE + ("manifest", "format", "json"),
                     "task-pipeline graph pipeline.toml --format dot | dot -Tsvg > graph.svg",
                     max_args=1, manifest_arg=True),
    "gc": Command("remove unreferenced objects and leftover scratch", "", STORE + ("force", "dry_run", "json", "min_age"),
                  "task-pipeline gc --dry-run"),
    "fsck": Command("re-hash every object and check every reference", "", STORE + ("json",), "task-pipeline fsck"),
    "check": Command("re-run a step's done tasks in scratch and compare their outputs byte for byte", "STEP",
                     STORE + ("sample", "json", "cache_size"),
                     "task-pipeline check count                  (every done task of count; exit 1 if any differ)\n"
                     "task-pipeline check count --sample 20      (20 of them, chosen at random)\n"
                     "task-pipeline check count --json | jq '.tasks[] | select(.identical | not)'",
                     max_args=1, min_args=1),
    "validate": Command("check a manifest without running anything (and, given -db, what registering it would change)",
                        "[MANIFEST]", ("manifest", "json") + STORE,
                        "task-pipeline validate pipeline.toml\ntask-pipeline validate pipeline.toml -db ./db",
                        max_args=1, manifest_arg=True),
    "init": Command("write a commented starter manifest", "[PATH]", ("manifest", "hash"),
                    "task-pipeline init pipeline.toml", max_args=1),
    "help": Command("show help for a command", "[COMMAND]", (), "task-pipeline help run", max_args=1),
}


HELP_FOR = {  # where an option means something narrower for one command
    ("submit", "runset"): "the runset the new tasks belong to (default: none)",
    ("serve", "runset"): "the runset of start steps without a schedule (scheduled ticks name their own)",
    ("serve", "parallel"): f"scripts at once in this daemon (default: CPU count; at most {MAX_PARALLEL})",
    ("export", "history"): "include history: superseded tasks and old versions",
    ("why", "history"): "include superseded producers",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage dump
        if message.startswith("argument ") and "expected one argument" in message:
            flag = message.split()[1].split("/")[0].rstrip(":")
            message = f"{flag} needs a value"
        raise UsageError(f"{message}; see 'task-pipeline {self.prog.split()[-1]} --help'")


def _spellings(o: Opt) -> list[str]:
    out = []
    for n in o.names:
        out += [f"-{n}", f"--{n}"] if len(n) > 1 else [f"-{n}"]
    return out


SPELLING = {s: dest for dest, o in OPTS.items() for s in _spellings(o)}


def _parser(command: str, accepted: tuple[str, ...]) -> argparse.ArgumentParser:
    p = _Parser(prog=f"task-pipeline {command}", allow_abbrev=False, add_help=False)
    p.add_argument("args", nargs="*")
    for dest in accepted:
        o = OPTS[dest]
        kw: dict = {"dest": dest, "default": argparse.SUPPRESS}
        if o.metavar is None:
            kw["action"] = "store_true"
        else:
            kw.update(metavar=o.metavar, type=o.kind)
            if o.choices:
                kw["choices"] = o.choices
            if o.repeat:
                kw["action"] = "append"
        p.add_argument(*_spellings(o), **kw)
    return p


def _takes_value(token: str) -> bool:
    dest = SPELLING.get(token)
    return dest is not None and OPTS[dest].metavar is not None


def _find_command(argv: list[str]) -> tuple[str | None, int | None]:
    """The subcommand word and its index, skipping option values; None for Go-style invocations."""
    i = 0
    while i < len(argv):
        t = argv[i]
        if t == "--":
            return None, None
        if t.startswith("-") and t != "-":
            if "=" not in t and _takes_value(t):
                i += 1
            i += 1
            continue
        return t, i
    return None, None


def _help_requested(argv: list[str]) -> bool:
    return any(t in ("-h", "-help", "--help") for t in argv)


def parse(argv: list[str]) -> argparse.Namespace:
    word, at = _find_command(argv)
    rest = list(argv)
    if word is not None:
        if word not in COMMANDS:
            close = difflib.get_close_matches(word, COMMANDS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; commands: {', '.join(COMMANDS)}"
            if any(t in ("-run", "--run", "-export", "--export", "-export-hash", "--export-hash",
                         "-migrate-tainted", "--migrate-tainted") for t in argv):
                raise UsageError(f"unexpected argument '{one_line(word)}'; see 'task-pipeline --help'")
            raise UsageError(f"unknown command '{one_line(word)}'{hint}")
        del rest[at]
        command = word
    else:
        command = None
    if _help_requested(rest):
        raise ShowHelp(command)
    if command == "help":
        raise ShowHelp(rest[0] if rest else None, strict=True)

    go = [d for d in ACTIONS if any(SPELLING.get(t.split("=", 1)[0]) == d for t in rest if t.startswith("-"))]
    if command is None:
        command = _go_command(go, rest)
    spec = COMMANDS[command]
    accepted = tuple(dict.fromkeys(GLOBAL + spec.options))
    _check_actions(command, go)
    accepted = tuple(dict.fromkeys(accepted + tuple(go)))  # what is left of the Go-style actions belongs here
    p = _parser(command, accepted)
    a, extras = p.parse_known_intermixed_args(rest)
    for t in extras:
        if t.startswith("-") and t != "-":
            _unknown_option(t, command, accepted)
    a.args = list(a.args) + [t for t in extras if not t.startswith("-") or t == "-"]
    a.command = command
    _fill_defaults(a)
    _go_arguments(a)
    _check(a, spec)
    return a


class ShowHelp(Exception):
    def __init__(self, command: str | None, strict: bool = False) -> None:
        self.command, self.strict = command, strict


def _go_command(go: list[str], argv_seen: list[str]) -> str:
    if "export_hash" in go:
        return "cat"
    if "export" in go:
        return "export"
    if "run" in go and "migrate_tainted" in go:
        return "migrate"
    if "run" in go:
        return "run"
    if "migrate_tainted" in go:
        return "migrate"
    for t in argv_seen:
        if t.startswith("-") and t not in ("-", "--") and t.split("=", 1)[0] not in SPELLING:
            name = t.split("=", 1)[0]
            close = difflib.get_close_matches(name, list(SPELLING), n=1, cutoff=0.6)
            raise UsageError(f"unknown option {one_line(name)}" + (f"; did you mean {close[0]}?" if close else "")
                             + "; see 'task-pipeline --help'")
    raise UsageError("nothing to do: give a command (e.g. 'run') or -run; see 'task-pipeline --help'")


def _check_actions(command: str, go: list[str]) -> None:
    """A second action next to a command makes no sense (-run status, gc -run); -migrate-tainted -run does."""
    allowed = {"run": {"run", "migrate_tainted"}, "migrate": {"run", "migrate_tainted"},
               "export": {"export"}, "cat": {"export_hash"}}.get(command, set())
    actions = [d for d in go if d not in allowed]
    if command == "cat" and "export" in go:
        actions.append("export")
    if command == "export" and "export_hash" in go:
        actions.append("export_hash")
    if actions:
        flag = "-" + OPTS[actions[0]].names[0]
        raise UsageError(f"'{command}' and {flag} are two different actions; give one (see 'task-pipeline --help')")


def _unknown_option(token: str, command: str, accepted: tuple[str, ...]) -> None:
    name = token.split("=", 1)[0]
    if name == "--":
        raise UsageError(f"'--' is not needed: arguments of '{command}' that start with '-' can be given as ./-NAME")
    dest = SPELLING.get(name)
    if dest is not None:
        users = [c for c, spec in COMMANDS.items() if dest in spec.options or dest in GLOBAL]
        where = f" (it belongs to: {', '.join(users)})" if users else ""
        raise UsageError(f"'{command}' does not take {one_line(name)}{where}; see 'task-pipeline {command} --help'")
    own = [s for d in accepted for s in _spellings(OPTS[d])]
    close = difflib.get_close_matches(name, own, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else f"; see 'task-pipeline {command} --help'"
    raise UsageError(f"unknown option {one_line(name)} for '{command}'{hint}")


def _fill_defaults(a: argparse.Namespace) -> None:
    for dest, o in OPTS.items():
        if not hasattr(a, dest):
            setattr(a, dest, [] if o.repeat else (False if o.metavar is None else None))
    if a.log_format is None:
        a.log_format = "auto"
    if a.runset is None:
        a.runset = ""


def _go_arguments(a: argparse.Namespace) -> None:
    if a.export_hash:
        if a.args:
            raise UsageError(f"unexpected argument '{one_line(a.args[0])}' after -export-hash")
        a.args = [a.export_hash]
    elif a.export:
        if a.args:
            raise UsageError(f"unexpected argument '{one_line(a.args[0])}' after -export {one_line(a.export)}")
        a.args = [a.export]
    spec = COMMANDS[a.command]
    if spec.manifest_arg and len(a.args) > 1:
        raise UsageError(f"'{a.command}' takes one manifest; got {len(a.args)} arguments "
                         f"('{one_line(a.args[0])}', '{one_line(a.args[1])}', ...)")
    if spec.manifest_arg and a.args and not a.manifest:
        a.manifest = a.args.pop(0)
    elif spec.manifest_arg and a.args:
        raise UsageError(f"'{a.command}' got a manifest twice: -manifest {one_line(a.manifest)} and "
                         f"'{one_line(a.args[0])}'; give one")
    if a.command == "init" and a.manifest:
        if a.args:
            raise UsageError("init: give the path once, as -manifest PATH or as PATH")
        a.args = [a.manifest]


def _check(a: argparse.Namespace, spec: Command) -> None:
    n = len(a.args)
    if n < spec.min_args or (spec.max_args is not None and n > spec.max_args):
        extra = f"unexpected argument '{one_line(a.args[spec.max_args])}'" if spec.max_args is not None and n > spec.max_args \
            else "missing argument"
        raise UsageError(f"{extra}; usage: task-pipeline {a.command} {spec.args}".rstrip())
    for t in a.args:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"argument {t.encode('utf-8', 'surrogateescape')!r} is not UTF-8 text; "
                             f"rename it or pass a name that is") from None
    if a.parallel is not None and not 1 <= a.parallel <= MAX_PARALLEL:
        raise UsageError(f"-parallel must be between 1 and {MAX_PARALLEL} (got {a.parallel})")
    for flag, v in (("--grace", a.grace), ("--lease", a.lease), ("--min-age", a.min_age)):
        if v is not None and not (math.isfinite(v) and 0 <= v <= 86400 * 365):
            raise UsageError(f"{flag} must be a number of seconds between 0 and a year (got {v:g})")
    if a.lease is not None and a.lease < 3:
        raise UsageError(f"--lease must be at least 3 seconds (got {a.lease:g}); it is renewed every lease/6")
    if a.verbose and a.quiet:
        raise UsageError("-verbose and -quiet contradict each other; pick one")
    for dest, o in OPTS.items():
        if o.metavar is None or o.kind is not str:
            continue
        values = getattr(a, dest)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    shown = value.encode("utf-8", "surrogateescape")
                    raise UsageError(f"-{o.names[0]} {shown!r} is not UTF-8 text; use a name that is") from None
    if (a.link or a.layout) and not a.to:
        raise UsageError("--link and --layout go with --to DIR")
    if a.sample is not None and a.sample < 1:
        raise UsageError(f"--sample must be at least 1 (got {a.sample})")
    if a.http_token_file and not a.http:
        raise UsageError("--http-token-file goes with --http ADDR (the address to serve the API on)")
    if a.input_path and (a.outputs or a.unrouted or a.to):
        raise UsageError("-input-path lists one task's outputs; it does not combine with --outputs, --unrouted or --to")


# -- help -------------------------------------------------------------------------------------


def general_help() -> str:
    lines = ["usage: task-pipeline COMMAND [ARGS] [OPTIONS]", "       task-pipeline -manifest M -db D -run   (Go-style)",
             "", "A content-addressed task queue for shell-script pipelines.", "", "commands:"]
    lines += [f"  {k:<11} {v.summary}" for k, v in COMMANDS.items()]
    lines += ["", "Go-style: -manifest M -db D -run | -migrate-tainted [-run] [--dry-run] | -export STEP [-input-path P]"
              " | -export-hash H",
              "'task-pipeline COMMAND --help' shows a command's options, with examples.",
              "Every -flag also works as --flag. Exit codes: 0 ok, 1 task failures, 2 bad usage or manifest, 3 store error,",
              "130/143 interrupted (SIGINT/SIGTERM)."]
    return "\n".join(lines) + "\n"


def command_help(name: str) -> str:
    spec = COMMANDS[name]
    lines = [f"usage: task-pipeline {name} {spec.args}".rstrip() + (" [OPTIONS]" if spec.options else ""), "",
             spec.summary[0].upper() + spec.summary[1:] + ".", ""]
    opts = [d for d in spec.options if d not in ACTIONS or d in ("run", "migrate_tainted")] + list(GLOBAL)
    if name == "run":
        opts.insert(opts.index("dry_run") + 1 if "dry_run" in opts else 0, "migrate_tainted")
    if opts:
        lines.append("options:")
        for d in dict.fromkeys(opts):
            o = OPTS[d]
            spell = ", ".join(("--" if len(n) > 1 else "-") + n for n in sorted(o.names, key=len))
            if o.metavar:
                spell += f" {o.metavar}"
            lines.append(f"  {spell:<28} {HELP_FOR.get((name, d), o.help)}")
        lines.append("  (every --flag also works with one dash, as the Go tool spells it: -parallel 4)")
        lines.append("")
    lines.append("examples:")
    lines += [f"  {ln}" for ln in spec.example.splitlines()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = any(x in ("-v", "-verbose", "--verbose") for x in argv)
    if argv[:1] in (["--version"], ["-version"]):
        sys.stdout.write(f"task-pipeline {__version__}\n")
        return 0
    try:
        try:
            a = parse(argv)
        except ShowHelp as h:
            if h.command is None:
                sys.stdout.write(general_help())
            elif h.command in COMMANDS:
                sys.stdout.write(command_help(h.command))
            else:
                close = difflib.get_close_matches(h.command, COMMANDS, n=1)
                raise UsageError(f"no command '{one_line(h.command)}'" + (f"; did you mean '{close[0]}'?" if close else ""))
            return 0
        from task_pipeline import commands

        return commands.dispatch(a)
    except UserError as e:
        if verbose:
            traceback.print_exc()
        _say(str(e))
        return e.exit_code
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except Exception as e:
        from task_pipeline.commands.common import explain_failure

        text = explain_failure(e)
        if text is None:
            raise  # a bug: the traceback is what a report needs
        if verbose:
            traceback.print_exc()
        _say(text)
        return StoreError.exit_code


def _say(text: str) -> None:
    try:
        sys.stderr.write(f"task-pipeline: {one_line(text)}\n")
    except OSError:
        pass
