"""Timeline: when each task passed each stage of a run, for finding where wall time goes.

Off unless TASK_PIPELINE_TIMELINE names a file. Then every stage a task passes is kept
in memory, (task id, stage, monotonic seconds, thread id), and written to that file as
JSON lines when the engine ends. bench/timeline.py draws it. Stages, in order:
leased, taken (a worker has it), ready (its input is in place), received (read by the
launcher, once one of its script slots is free), slot, spawned, exited,
finished (outputs stored, directories emptied), committed. The engine's own work is
task -1: sync+/sync- around a store flush, commit+/commit-, claim+/claim-.
"""

from __future__ import annotations

import json
import os
import threading
import time

PATH = os.environ.get("TASK_PIPELINE_TIMELINE") or None
_marks: list[tuple[int, str, float, int]] = []


def mark(task_id: int, stage: str, t: float | None = None) -> None:
    """`t`: when it happened, if not now (monotonic seconds, which other processes share)."""
    if PATH is not None:  # list.append is atomic: no lock on the workers' path
        _marks.append((task_id, stage, time.monotonic() if t is None else t, threading.get_native_id()))


def engine(stage: str) -> None:
    """A stage of the engine's own work (a store flush, a commit, a claim), as task -1."""
    mark(-1, stage)


def write() -> None:
    if PATH is None or not _marks:
        return
    with open(PATH, "a") as f:
        for task, stage, t, thread in _marks:
            f.write(json.dumps({"task": task, "stage": stage, "t": t, "thread": thread}) + "\n")
    _marks.clear()
