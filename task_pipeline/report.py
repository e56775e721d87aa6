"""Output for people and for log shippers (SPEC section 9).

On a terminal: a live progress display per step (rich) and summary tables.
Otherwise: plain lines with a timestamp and a level, or one JSON object per
line (`--log-format json`), which is what journald and log shippers want.
Everything the user reads goes through here, so `-quiet` and `-verbose` mean
the same thing in every command.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Iterable

from task_pipeline.state import Claimed, CommitReport
from task_pipeline.textsafe import one_line

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

# rich is imported where it is used: a no-op `run` or a `cat` should not pay for it.

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def timestamp(t: float | None = None) -> str:
    """The one time format of log lines and JSON: UTC, ISO 8601, milliseconds."""
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


@dataclass
class Output:
    """Where messages go, and how loud they are."""

    verbose: bool = False
    quiet: bool = False
    log_format: str = "auto"   # auto | plain | json

    @cached_property
    def out(self) -> "Console":
        from rich.console import Console

        # not on a terminal, a table line is as long as its content (no wrapping at 80 columns)
        return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 4000)

    @cached_property
    def err(self) -> "Console":
        from rich.console import Console

        return Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 4000)

    @cached_property
    def tty(self) -> bool:
        return sys.stderr.isatty()

    @property
    def live(self) -> bool:
        return self.log_format == "auto" and self.tty and not self.quiet

    def log(self, level: str, text: str, **fields) -> None:
        """One line. `fields` (step, task, attempt, ...) become JSON fields; text from scripts is escaped."""
        if self.quiet and LEVELS[level] < LEVELS["error"]:
            return
        if level == "debug" and not self.verbose:
            return
        if self.log_format == "json":
            sys.stderr.write(json.dumps({"ts": timestamp(), "level": level, "msg": text, **fields},
                                        ensure_ascii=False, default=str) + "\n")
            sys.stderr.flush()
        elif self.log_format == "plain" or not self.tty:
            sys.stderr.write(f"{timestamp()} {level.upper():7} {one_line(text)}\n")
            sys.stderr.flush()
        else:
            style = {"warning": "yellow", "error": "bold red", "debug": "dim"}.get(level)
            prefix = {"warning": "warning: ", "error": "error: "}.get(level, "")
            self.err.print(prefix + one_line(text), style=style, markup=False, highlight=False)

    def emit_json(self, kind: str, data) -> None:
        """A JSON record on the log stream (with --log-format json): summaries and tables as data."""
        sys.stderr.write(json.dumps({"ts": timestamp(), "level": "info", "kind": kind, **data},
                                    ensure_ascii=False, default=str) + "\n")
        sys.stderr.flush()

    def print(self, renderable) -> None:
        """Results (tables, lists) go to stdout, even with -quiet. A string is plain text, never markup."""
        if isinstance(renderable, str):
            self.out.print(one_line(renderable) if "\n" not in renderable else renderable, markup=False,
                           highlight=False)
        else:
            self.out.print(renderable)


class RunReporter:
    """Follows a run: live progress on a terminal, periodic plain lines otherwise.

    `running` counts scripts this runner has started and not yet reported back; a task
    leased but never started (given back on a stop) is not counted in or out."""

    def __init__(self, output: Output, pending: dict[str, int], order: Iterable[str]) -> None:
        self.o = output
        self.order = list(order)
        self.total: Counter = Counter(pending)
        self.done: Counter = Counter()
        self.failed: Counter = Counter()
        self.running: Counter = Counter()
        self._last_plain = time.monotonic()
        self._progress = None
        self._lock = threading.Lock()
        self._rows: dict[str, int] = {}

    def __enter__(self) -> "RunReporter":
        if self.o.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("done  {task.fields[running]:>3} running  {task.fields[failed]:>3} failed"),
                TextColumn("{task.fields[speed_text]}"), TimeRemainingColumn(),
                console=self.o.err, transient=False, refresh_per_second=8,
            )
            self._progress.__enter__()
            for name in self.order:
                self._row(name)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._refresh_all()
            self._progress.__exit__(*exc)

    def _row(self, name: str) -> None:
        if self._progress is not None and name not in self._rows:
            self._rows[name] = self._progress.add_task(name, total=self.total[name] or None, running=0, failed=0,
                                                       speed_text="")

    def _refresh(self, name: str) -> None:
        if self._progress is None:
            return
        self._row(name)
        p = self._progress
        tid = self._rows[name]
        task = next((t for t in p.tasks if t.id == tid), None)
        speed = f"{task.speed:6.1f}/s" if task is not None and task.speed else ""
        # the bar is what succeeded: 108/120 with 12 failed, never 120/120
        p.update(tid, total=max(self.total[name], self.done[name] + self.failed[name]) or None,
                 completed=self.done[name], running=max(self.running[name], 0), failed=self.failed[name],
                 speed_text=speed)

    def _refresh_all(self) -> None:
        for name in list(self._rows):
            self._refresh(name)

    def task_started(self, c: Claimed) -> None:
        # called from worker threads
        with self._lock:
            self.running[c.step.name] += 1
        if self.o.verbose and not self.o.live:
            self.o.log("debug", f"[{c.step.name}#{c.task_id}] start {c.input_name or '(start)'} attempt {c.attempt}",
                       step=c.step.name, task=c.task_id, attempt=c.attempt)
        self._refresh(c.step.name)

    def committed(self, rep: CommitReport) -> None:
        for name, n in rep.created.items():
            self.total[name] += n
        touched = set(rep.created)
        with self._lock:
            for r in rep.done + rep.failed + rep.retrying + rep.stale + rep.requeued:
                if r.started:
                    self.running[r.step] -= 1
                touched.add(r.step)
        for r in rep.done:
            self.done[r.step] += 1
            if self.o.verbose and not self.o.live:
                self.o.log("debug", f"[{r.step}#{r.task_id}] done in {r.finished_at - r.started_at:.2f}s, "
                                    f"{len(r.outputs)} output(s)", step=r.step, task=r.task_id, attempt=r.attempt)
        for r in rep.failed:
            self.failed[r.step] += 1
            self.o.log("error", f"[{r.step}#{r.task_id}] {r.input_name or '(start)'} failed: {r.error}"
                                + (f": {r.stderr_tail}" if r.stderr_tail else ""),
                       step=r.step, task=r.task_id, attempt=r.attempt, input=r.input_name, exit=r.exit_code)
        for r in rep.retrying:
            self.o.log("warning", f"[{r.step}#{r.task_id}] {r.input_name or '(start)'} attempt {r.attempt} failed "
                                  f"({r.error}); retrying", step=r.step, task=r.task_id, attempt=r.attempt)
        for name in touched:
            self._refresh(name)
        if self._progress is None and not self.o.quiet and time.monotonic() - self._last_plain > 5:
            self._last_plain = time.monotonic()
            parts = [f"{n} {self.done[n]}/{self.total[n]}" + (f" ({self.failed[n]} failed)" if self.failed[n] else "")
                     for n in self.order if self.total[n]]
            self.o.log("info", "progress: " + ", ".join(parts))

    def log(self, level: str, text: str) -> None:
        self.o.log(level, text)


class DaemonReporter:
    """One log line per finished task (plain or JSON lines); no progress display."""

    def __init__(self, out: Output) -> None:
        self.o = out
        self.unrouted_seen: set[str] = set()

    def task_started(self, c: Claimed) -> None:
        self.o.log("debug", f"[{c.step.name}#{c.task_id}] start {c.input_name or '(start)'} attempt {c.attempt}",
                   step=c.step.name, task=c.task_id, attempt=c.attempt)

    def committed(self, rep: CommitReport) -> None:
        for r in rep.done:
            self.o.log("info", f"[{r.step}#{r.task_id}] {r.input_name or '(start)'} done in "
                               f"{r.finished_at - r.started_at:.2f}s, {len(r.outputs)} output(s)",
                       step=r.step, task=r.task_id, attempt=r.attempt, input=r.input_name,
                       seconds=round(r.finished_at - r.started_at, 3), outputs=len(r.outputs))
        for r in rep.retrying:
            self.o.log("warning", f"[{r.step}#{r.task_id}] {r.input_name or '(start)'} attempt {r.attempt} failed "
                                  f"({r.error}); retrying", step=r.step, task=r.task_id, attempt=r.attempt,
                       input=r.input_name, exit=r.exit_code)
        for r in rep.failed:
            self.o.log("error", f"[{r.step}#{r.task_id}] {r.input_name or '(start)'} failed: {r.error}"
                                + (f": {r.stderr_tail}" if r.stderr_tail else ""),
                       step=r.step, task=r.task_id, attempt=r.attempt, input=r.input_name, exit=r.exit_code)
        for r in rep.requeued:
            self.o.log("info", f"[{r.step}#{r.task_id}] {r.input_name or '(start)'} re-queued ({r.error})",
                       step=r.step, task=r.task_id, attempt=r.attempt)
        for key in sorted(rep.unrouted):
            if key not in self.unrouted_seen:
                self.unrouted_seen.add(key)
                self.o.log("warning", f"unrouted: outputs with route key '{key}' went nowhere: no step consumes it; "
                                      f"they are kept as terminal outputs")

    def log(self, level: str, text: str) -> None:
        self.o.log(level, text)


def table(title: str | None, columns: list[str], rows: list[list], right: Iterable[str] = ()) -> "Table":
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", show_edge=False, pad_edge=False)
    right = set(right)
    for c in columns:
        t.add_column(c, justify="right" if c in right else "left", overflow="fold")
    for r in rows:
        # cells are data (file names, stderr lines), never rich markup nor terminal controls
        t.add_row(*["" if v is None else escape(one_line(str(v))) for v in r])
    return t


def failures_table(failed: list[dict]) -> "Table":
    return table("Failed tasks", ["step", "task", "input", "exit", "last stderr line"],
                 [[f["step"], f["task"], f["input"] or "(start)", f["exit"], f["stderr"] or f["error"] or ""]
                  for f in failed], right=["task", "exit"])


def fmt_rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.1f}/s" if seconds > 0 and n else "-"
