"""`gc` and `fsck` (the work is in task_pipeline.housekeeping; this is what they print)."""

from __future__ import annotations

import time
from argparse import Namespace
from contextlib import contextmanager
from typing import Iterator

from task_pipeline import housekeeping as hk
from task_pipeline.commands.common import open_store, print_json
from task_pipeline.errors import UsageError
from task_pipeline.host import display
from task_pipeline.report import Output


@contextmanager
def progress_bar(out: Output, label: str, total: int) -> Iterator:
    """A rich progress bar on a terminal; nothing otherwise."""
    if not out.live:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn(), console=out.err,
                  transient=True) as p:
        tid = p.add_task(label, total=total or None)
        yield lambda n: p.advance(tid, n)


def _object_bytes(db) -> int:
    return int(db.execute("SELECT coalesce(sum(size), 0) FROM object").fetchone()[0])


def cmd_fsck(a: Namespace, out: Output) -> int:
    opened = open_store(a)
    with progress_bar(out, "fsck", _object_bytes(opened.db)) as advance:
        rep = hk.fsck(opened.db, opened.store, opened.loc.scratch, advance)
    if a.json:
        print_json({"ok": not rep.problems, "objects": rep.objects, "bytes": rep.bytes, "references": rep.references,
                    "unreferenced": {"objects": rep.unreferenced, "bytes": rep.unreferenced_bytes},
                    "problems": [p.__dict__ for p in rep.problems], "warnings": rep.warnings})
    else:
        for w in rep.warnings:
            out.log("warning", w)
        for p in rep.problems:
            out.log("error", p.line())
        summary = (f"checked {rep.objects} object(s), {hk.fmt_bytes(rep.bytes)}, and {rep.references} reference(s): "
                   + (f"{len(rep.problems)} problem(s)" if rep.problems else "no problems"))
        if rep.unreferenced:
            summary += (f"; {rep.unreferenced} unreferenced object(s) ({hk.fmt_bytes(rep.unreferenced_bytes)}) "
                        f"that 'gc' would remove")
        out.log("error" if rep.problems else "info", summary)
        if any(p.kind in ("corrupt", "missing") for p in rep.problems):
            out.log("info", "to rebuild a damaged output: delete its object file, then 'invalidate' the step that "
                            "made it and 'run'; a damaged submitted input must be submitted again")
    return 1 if rep.problems else 0


def cmd_gc(a: Namespace, out: Output) -> int:
    opened = open_store(a)
    db = opened.db
    started = time.time()
    cutoff, active = hk.gc_cutoff(db, started)
    # a bucket cannot be told an old object is in use again (see s3store): keep young ones regardless
    from task_pipeline.s3store import GC_GRACE

    min_age = a.min_age if a.min_age is not None else (0.0 if opened.store.local else GC_GRACE)
    cutoff = min(cutoff, started - min_age)
    if active and not a.force and not a.dry_run:
        clock = db.clock()
        who = ", ".join(f"{r.kind} {display(r.host)}:{r.pid} (heartbeat {max(clock - r.heartbeat, 0):.0f}s ago)"
                        for r in active)
        raise UsageError(f"gc: {len(active)} runner(s) or writer(s) active on this store: {who}; wait for them to "
                         f"finish, or pass --force (what they stored since they started is kept)")
    with progress_bar(out, "gc", _object_bytes(db)) as advance:
        rep = hk.gc(db, opened.store, opened.loc.scratch, cutoff=cutoff, progress=advance, prune_dirs=not active,
                    dry_run=a.dry_run, scratch_shared=not opened.loc.shared)
    freed = rep.bytes + rep.scratch.bytes
    if a.json:
        print_json({"dry_run": a.dry_run, "objects_removed": rep.removed, "bytes_freed": freed,
                    "object_bytes": rep.bytes, "kept_recent": rep.kept_recent, "rows_removed": rep.rows,
                    "scratch_removed": rep.scratch.removed, "scratch_bytes": rep.scratch.bytes,
                    "incoming_removed": rep.incoming, "orphans_killed": rep.scratch.killed,
                    "errors": rep.scratch.errors})
        return 0 if not rep.scratch.errors else 1
    for e in rep.scratch.errors:
        out.log("warning", f"could not remove {e}")
    size = f" ({hk.fmt_bytes(freed)})" if freed >= 1024 else ""
    if a.dry_run:
        msg = (f"gc --dry-run: would free {freed} bytes{size}: {rep.removed} unreferenced object(s), "
               f"{rep.scratch.removed} leftover scratch entr{'y' if rep.scratch.removed == 1 else 'ies'}; "
               f"nothing was removed")
    else:
        msg = (f"gc: freed {freed} bytes{size}: {rep.removed} unreferenced object(s), {rep.scratch.removed} leftover "
               f"scratch entr{'y' if rep.scratch.removed == 1 else 'ies'}")
        if rep.scratch.killed:
            msg += f"; killed {rep.scratch.killed} orphaned script(s)"
    if rep.kept_recent:
        msg += (f"; kept {rep.kept_recent} unreferenced object(s) written since "
                f"{'the oldest active runner or writer started' if active else 'gc started'}")
    out.print(msg)
    return 0 if not rep.scratch.errors else 1
