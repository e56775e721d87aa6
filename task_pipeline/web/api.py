"""The JSON API: routes under /api, each declared with its OpenAPI operation (openapi.py builds the
document from them), and /metrics.

Reads go through the web's own connection (reader.py); actions through state, as the commands do
(submit registers as a writer while it stores the file, so that a concurrent gc keeps it). Lists
are paged, logs are tails, objects are served whole only up to a size: no answer grows with the
store.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from dataclasses import dataclass
from typing import Callable

import anyio
import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from task_pipeline import queries, state
from task_pipeline.errors import StoreError, UsageError
from task_pipeline.overview import iso
from task_pipeline.web import openapi as oa
from task_pipeline.web.context import (LOG_TAIL, MAX_JSON, MAX_LOG_TAIL, MAX_OBJECT, MAX_PAGE, MAX_UPLOAD, PAGE,
                                       Problem, Web, from_usage)
from task_pipeline.web.security import same_origin, simple_content_type

HASH = re.compile(r"[0-9a-f]{64}")
MAX_NAME = 255    # bytes: the input is a file of that name in the task's directory
MAX_ID = 2 ** 63 - 1
NO_NUL = "^[^\\x00]*$"


@dataclass(frozen=True)
class ApiRoute:
    path: str
    method: str
    endpoint: Callable
    operation: dict


def web_of(request: Request) -> Web:
    return request.app.state.web


# -- reading parameters ------------------------------------------------------------------------


# A parameter that is absent takes its default; one that is present must be valid, even when empty
# (`before=` is a mistake, not a request for the first page).

def int_param(request: Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or len(raw) > 19 or not lo <= int(raw) <= hi:
        raise Problem(400, f"{name}={raw[:40]!r}: give a whole number from {lo} to {hi}")
    return int(raw)


def bool_param(request: Request, name: str) -> bool:
    raw = (request.query_params.get(name) or "").lower()
    if name not in request.query_params:
        return False
    if raw not in ("true", "false", "1", "0"):
        raise Problem(400, f"{name}={raw[:40]!r}: give true or false")
    return raw in ("true", "1")


def text_param(request: Request, name: str, required: bool = False, limit: int = 200) -> str | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        if required:
            raise Problem(400, f"the query parameter {name} is required")
        return None
    if len(raw) > limit or "\x00" in raw:
        raise Problem(400, f"{name}: at most {limit} characters, and no NUL")
    return raw


def full_hash(h: str) -> str:
    if not HASH.fullmatch(h):
        raise Problem(404, f"no object {h[:80]!r}: give an object's full hash (64 lowercase hex digits)")
    return h


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise Problem(413, f"the request body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Problem(413, f"the request body is larger than {limit} bytes")
    return bytes(body)


async def json_body(request: Request) -> dict:
    body = await read_body(request, MAX_JSON)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Problem(400, "the request body is not JSON; send an object such as {\"step\": \"process\"}") from None
    if not isinstance(data, dict):
        raise Problem(400, "the request body must be a JSON object, such as {\"step\": \"process\"}")
    return data


def may_act(request: Request, content_type: str) -> None:
    """An API action: the bearer token (when there is one), the content type the action takes (a page
    of another site cannot send it without a CORS preflight, which is never granted) and no other
    Origin."""
    web = web_of(request)
    status = web.guard.bearer(request.headers.get("authorization"))
    if status == 401:
        raise Problem(401, "this action needs the daemon's token: send Authorization: Bearer TOKEN "
                           "(the token is in the file given to --http-token-file)",
                      {"WWW-Authenticate": 'Bearer realm="task-pipeline"'})
    if status == 403:
        raise Problem(403, "wrong token: send the one in the file given to serve --http-token-file")
    given = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    if given != content_type or simple_content_type(given):
        raise Problem(415, f"send this action's body as {content_type} (got {given[:60] or 'no content type'})")
    if not same_origin(request.headers.get("origin"), request.headers.get("sec-fetch-site"), request.url.scheme,
                       request.headers.get("host")):
        raise Problem(403, "a request from another site may not act on this daemon")


def step_text(value, name: str = "step", required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > 200 or "\x00" in value:
        raise Problem(400, f"{name}: give a step name (a string of 1 to 200 characters, no NUL)")
    return value


def dry_run_flag(data: dict) -> bool:
    value = data.get("dry_run", False)
    if not isinstance(value, bool):
        raise Problem(400, "dry_run: give true or false")
    return value


# -- reads ----------------------------------------------------------------------------------------


async def status_doc(web: Web) -> dict:
    return await web.snapshot.get()


async def get_status(request: Request) -> Response:
    web = web_of(request)
    doc = await status_doc(web)
    return JSONResponse(doc, headers={"X-Counted-At": iso(web.snapshot.at) or ""})


def _task_rows(db, **kw) -> dict:
    page, nxt = queries.task_page(db, **kw)
    for t in page:
        for k in ("created_at", "finished_at", "started_at"):
            t[k] = iso(t[k])
    return {"tasks": page, "next": nxt}


async def get_tasks(request: Request) -> Response:
    web = web_of(request)
    state_ = request.query_params.get("state")
    if state_ is not None and state_ not in queries.TASK_STATES:
        raise Problem(400, f"state={state_[:40]!r}: use one of {', '.join(queries.TASK_STATES)}")
    kw = dict(step=text_param(request, "step"), state=state_, before=int_param(request, "before", None, 1, MAX_ID),
              limit=int_param(request, "limit", PAGE, 1, MAX_PAGE), history=bool_param(request, "history"))
    try:
        return JSONResponse(await web.reader(_task_rows, **kw))
    except UsageError as e:
        raise from_usage(e) from None


def log_tail(store, h: str | None, limit: int) -> dict | None:
    """The last `limit` bytes of a log object, from the start of a line; None if it cannot be read."""
    if not h:
        return None
    try:
        data, size = store.read_tail(h, limit)
    except (OSError, StoreError):
        return None
    if size > len(data) and b"\n" in data:
        data = data.split(b"\n", 1)[1]
    return {"hash": h, "size": size, "tail": data.decode("utf-8", "replace"), "truncated": size > len(data)}


def task_story(db, store, task_id: int, tail: int) -> dict:
    info = queries.task_attempts(db, task_id)
    for at in info["attempts"]:
        at["started_at"], at["finished_at"] = iso(at["started_at"]), iso(at["finished_at"])
        at["stdout"] = log_tail(store, at["stdout_hash"], tail)
        at["stderr"] = log_tail(store, at["stderr_hash"], tail)
    info["outputs"] = queries.task_outputs(db, task_id)
    info["origin"] = queries.task_origin(db, task_id)
    return info


async def get_task(request: Request) -> Response:
    web = web_of(request)
    task_id = request.path_params["task_id"]
    tail = int_param(request, "tail", LOG_TAIL, 0, MAX_LOG_TAIL)
    try:
        return JSONResponse(await web.reader(task_story, web.store, task_id, tail))
    except UsageError as e:
        raise from_usage(e) from None


class _Capped(io.BytesIO):
    """Where an object is copied to: a file bigger than the database says (damaged) stops at the cap."""

    def write(self, data) -> int:
        if self.tell() + len(data) > MAX_OBJECT:
            raise Problem(413, f"the object is larger than the {MAX_OBJECT} bytes this API serves")
        return super().write(data)


def _object_bytes(db, store, h: str) -> bytes:
    size = queries.object_size(db, h)
    if size is None:
        raise Problem(404, f"no object {h} in this store")
    if size > MAX_OBJECT:
        raise Problem(413, f"object {h} has {size} bytes, more than the {MAX_OBJECT} this API serves; "
                           f"use 'task-pipeline cat {h}' on the daemon's host")
    out = _Capped()
    store.stream(h, out)   # checks the bytes against the hash: a damaged object is an error, not an answer
    return out.getvalue()


async def get_object(request: Request) -> Response:
    """An object's bytes: only a full hash the database knows, read through the store (which opens
    it without following links), checked against its hash before anything is sent."""
    web = web_of(request)
    h = full_hash(request.path_params["hash"])
    data = await web.reader(_object_bytes, web.store, h)
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{h}"'})


async def get_lineage(request: Request) -> Response:
    web = web_of(request)
    h = full_hash(request.path_params["hash"])
    history = bool_param(request, "history")

    def read(db) -> dict:
        if queries.object_size(db, h) is None:
            raise Problem(404, f"no object {h} in this store")
        return {"object": h, "chains": queries.lineages(db, h, history=history)}

    try:
        return JSONResponse(await web.reader(read))
    except UsageError as e:
        raise from_usage(e) from None


async def graph_json(web: Web) -> dict:
    return await web.graph.get()


async def get_graph(request: Request) -> Response:
    return JSONResponse(await graph_json(web_of(request)))


async def get_openapi(request: Request) -> Response:
    return JSONResponse(oa.document(ROUTES))


async def get_metrics(request: Request) -> Response:
    web = web_of(request)
    doc = await status_doc(web)
    web.metrics.scraped(doc["steps"], doc["oldest_pending_age"], doc["runners"])
    body, ctype = web.metrics.exposition(request.headers.get("accept"))
    return Response(body, headers={"Content-Type": ctype})


# -- actions ---------------------------------------------------------------------------------------


def retry(db, step: str | None, dry_run: bool) -> dict:
    if dry_run:
        found = state.dry_run(db, state.retry_failed, step)
    else:
        with state.writing(db, "retry"):
            found = state.retry_failed(db, step)
    return {"dry_run": dry_run, "tasks": sum(found.values()), "steps": dict(found)}


def invalidate(db, step: str, dry_run: bool) -> dict:
    if dry_run:
        n = state.dry_run(db, state.invalidate, step)
    else:
        with state.writing(db, "invalidate"):
            n = state.invalidate(db, step)
    return {"dry_run": dry_run, "step": step, "tasks": n}


async def act(web: Web, fn: Callable, *args) -> dict:
    try:
        result = await web.reader(fn, *args)
    except UsageError as e:
        raise from_usage(e) from None
    web.snapshot.discard()
    return result


async def post_retry(request: Request) -> Response:
    may_act(request, "application/json")
    data = await json_body(request)
    return JSONResponse(await act(web_of(request), retry, step_text(data.get("step")), dry_run_flag(data)))


async def post_invalidate(request: Request) -> Response:
    may_act(request, "application/json")
    data = await json_body(request)
    return JSONResponse(await act(web_of(request), invalidate, step_text(data.get("step"), required=True),
                                  dry_run_flag(data)))


def file_name(name: str) -> str:
    if name in (".", "..") or "/" in name or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        raise Problem(400, f"name={name[:60]!r}: give a file name (no '/', at most {MAX_NAME} bytes)")
    return name


def _check_target(db, name: str, step: str | None) -> None:
    pipe = state.load_pipeline(db)
    if step is not None:
        pipe.require(step)
    elif not pipe.router.consumers(name):
        from task_pipeline.routing import route_key

        raise Problem(404, f"no step consumes '{name}' (its route key is '{route_key(name)}'); give step=STEP")


def _submit_file(db, store, f, name: str, step: str | None, runset: str) -> dict:
    with state.writing(db, "submit"):
        h, size = store.ingest_stream(f)
        ((_, made),) = state.submit(db, [(name, h, size, step)], runset)
    return {"name": name, "hash": h, "size": size, "new_tasks": made}


async def post_submit(request: Request) -> Response:
    """The request's body is the file: spooled to an unnamed file in the scratch directory, stored as
    an object (hashed on the way in), then queued as an input of `step`, or, without one, of the
    steps its name routes to (`submit --route`)."""
    may_act(request, "application/octet-stream")
    web = web_of(request)
    name = file_name(text_param(request, "name", required=True, limit=1024))
    step = text_param(request, "step")
    if step is None and "step" in request.query_params:
        raise Problem(400, "step= is empty: name a step, or leave step out to route the file by its name")
    runset = text_param(request, "runset") or ""
    try:
        await web.reader(_check_target, name, step)
    except UsageError as e:
        raise from_usage(e) from None
    too_big = Problem(413, f"the file is larger than {MAX_UPLOAD} bytes; submit it with 'task-pipeline submit' "
                           f"on the daemon's host")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_UPLOAD:
        raise too_big
    with tempfile.TemporaryFile(dir=web.scratch) as f:
        n = 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > MAX_UPLOAD:
                raise too_big
            await anyio.to_thread.run_sync(f.write, chunk)
        await anyio.to_thread.run_sync(f.flush)
        f.seek(0)
        result = await act(web, _submit_file, web.store, f, name, step, runset)
    return JSONResponse(result)


# -- the routes and their operations ------------------------------------------------------------------

_STEP = oa.query("step", {"type": "string", "maxLength": 200, "pattern": NO_NUL},
                 "only this step's tasks (every version of it)")
_HASH = oa.path_param("hash", {"type": "string", "pattern": "^[0-9a-f]{64}$"}, "the object's full hash")
ROUTES: list[ApiRoute] = [
    ApiRoute("/api/status", "get", get_status, {
        "summary": "Tasks per step and state, runners, the last failures: what `status --json` prints",
        "operationId": "status",
        "description": "The document is a snapshot, rebuilt when the store changed, at most about a second "
                       "old on a small store and a few seconds on a huge one (its time is in the X-Counted-At "
                       "header); an action through this API shows at once.",
        "responses": {"200": oa.json_response("Status")}}),
    ApiRoute("/api/tasks", "get", get_tasks, {
        "summary": "Tasks, newest first, a page at a time", "operationId": "tasks",
        "parameters": [_STEP,
                       oa.query("state", {"type": "string", "enum": list(queries.TASK_STATES)}, "only tasks in this state"),
                       oa.query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": PAGE},
                                "tasks per page"),
                       oa.query("before", {"type": "integer", "minimum": 1, "maximum": MAX_ID},
                                "the `next` of the previous page"),
                       oa.query("history", {"type": "boolean"}, "include superseded tasks")],
        "responses": {"200": oa.json_response("TaskPage"), "404": oa.error("no such step")}}),
    ApiRoute("/api/tasks/{task_id}", "get", get_task, {
        "summary": "One task: its attempts with exit codes and the tails of their logs, outputs, and where its "
                   "input came from", "operationId": "task",
        "parameters": [oa.path_param("task_id", {"type": "integer", "minimum": 1, "maximum": MAX_ID}, "the task"),
                       oa.query("tail", {"type": "integer", "minimum": 0, "maximum": MAX_LOG_TAIL, "default": LOG_TAIL},
                                "bytes of each log")],
        "responses": {"200": oa.json_response("Task"), "404": oa.error("no such task")}}),
    ApiRoute("/api/objects/{hash}", "get", get_object, {
        "summary": f"An object's bytes (up to {MAX_OBJECT} bytes), checked against its hash", "operationId": "object",
        "parameters": [_HASH],
        "responses": {"200": {"description": "the object", "content": {"application/octet-stream": {
                          "schema": {"type": "string", "format": "binary"}}}},
                      "404": oa.error("no such object"), "413": oa.error("too large to serve here")}}),
    ApiRoute("/api/objects/{hash}/lineage", "get", get_lineage, {
        "summary": "Every chain of tasks that produced an object (`why`)", "operationId": "lineage",
        "parameters": [_HASH,
                       oa.query("history", {"type": "boolean"}, "include superseded producers")],
        "responses": {"200": oa.json_response("Lineage"), "404": oa.error("no such object, or nothing produced it")}}),
    ApiRoute("/api/graph", "get", get_graph, {
        "summary": "The step graph: steps, observed routing and edges guessed from the scripts (`graph --json`)",
        "operationId": "graph", "responses": {"200": oa.json_response("Graph")}}),
    ApiRoute("/api/retry", "post", post_retry, {
        "summary": "Re-queue failed tasks, of one step or all (`retry`)", "operationId": "retry",
        "security": [{"bearer": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": oa._ref("RetryRequest")}}},
        "responses": {"200": oa.json_response("RetryResult"), "404": oa.error("no such step"),
                      "413": oa.error("the body is too large")}}),
    ApiRoute("/api/invalidate", "post", post_invalidate, {
        "summary": "Re-run a step's current tasks (`invalidate`)", "operationId": "invalidate",
        "security": [{"bearer": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": oa._ref("InvalidateRequest")}}},
        "responses": {"200": oa.json_response("InvalidateResult"), "404": oa.error("no such step"),
                      "413": oa.error("the body is too large")}}),
    ApiRoute("/api/submit", "post", post_submit, {
        "summary": "Add a file as an input (`submit`): the body is the file", "operationId": "submit",
        "security": [{"bearer": []}],
        "parameters": [oa.query("name", {"type": "string", "format": "file-name", "minLength": 1, "maxLength": MAX_NAME,
                                         "pattern": "^(?!\\.\\.?$)[^/\\x00]+$"},
                                f"the file's name: no '/', at most {MAX_NAME} bytes in UTF-8", required=True),
                       oa.query("step", {"type": "string", "minLength": 1, "maxLength": 200, "pattern": NO_NUL},
                                "the step to queue it for; without it, the steps its name routes to"),
                       oa.query("runset", {"type": "string", "maxLength": 200, "pattern": NO_NUL},
                                "the runset of the new tasks")],
        "requestBody": {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}},
        "responses": {"200": oa.json_response("SubmitResult"),
                      "404": oa.error("no such step, or no step consumes the name"),
                      "413": oa.error(f"larger than {MAX_UPLOAD} bytes")}}),
    ApiRoute("/api/openapi.json", "get", get_openapi, {
        "summary": "This document", "operationId": "openapi",
        "responses": {"200": {"description": "OpenAPI 3.0", "content": {"application/json": {"schema": {"type": "object"}}}}}}),
    ApiRoute("/metrics", "get", get_metrics, {
        "summary": "Prometheus metrics", "operationId": "metrics",
        "responses": {"200": {"description": "Prometheus text format, or OpenMetrics when the Accept header asks",
                              "content": {"text/plain": {"schema": {"type": "string"}},
                                          "application/openmetrics-text": {"schema": {"type": "string"}}}}}}),
]
