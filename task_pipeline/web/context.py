"""What every route reaches through `request.app.state.web`, and the one error type routes raise.

`Problem` is an answer that is not a success: a status and one line that names the thing and
says what to do. The API answers it as JSON ({"error": ...}); pages as a small HTML page.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from task_pipeline.errors import UsageError
from task_pipeline.store import ObjectStore
from task_pipeline.web.metrics import Metrics
from task_pipeline.web.reader import Reader, Snapshot
from task_pipeline.web.security import Guard
from task_pipeline.web.stepgraph import StepGraph

MAX_JSON = 64 * 1024            # bytes of a JSON or form request body
MAX_UPLOAD = 512 * 1024 * 1024  # bytes of a submitted file (larger: `task-pipeline submit` on the host)
MAX_OBJECT = 16 * 1024 * 1024   # bytes of an object served whole (larger: `task-pipeline cat`)
LOG_TAIL = 16 * 1024            # bytes of each log a task answer shows by default
MAX_LOG_TAIL = 256 * 1024
PAGE = 50                       # tasks per page by default
MAX_PAGE = 500


class Problem(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def from_usage(e: UsageError) -> Problem:
    """The queries' one-line errors: 'no task 7 in this store' and the like are 404, the rest 400."""
    text = str(e)
    return Problem(404 if text.startswith("no ") else 400, text)


@dataclass
class Web:
    reader: Reader
    snapshot: Snapshot
    store: ObjectStore
    where: str                 # the store, as status names it
    scratch: Path              # private to this host: uploads are spooled here
    guard: Guard
    metrics: Metrics
    templates: object          # starlette.templating.Jinja2Templates
    graph: StepGraph
    started: float = field(default_factory=time.time)
