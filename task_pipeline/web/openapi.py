"""The API's OpenAPI 3.0 document: its schemas, written as data, and the document assembled from
the routes in api.py (each route carries its own operation), served at /api/openapi.json.

tests/test_web.py runs schemathesis against the served document: every response must match it.
"""

from __future__ import annotations

from task_pipeline import __version__

VERSION = "3.0.3"


def _nullable(t: str, **kw) -> dict:
    return {"type": t, "nullable": True, **kw}


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


INT, STR, BOOL, NUM = {"type": "integer"}, {"type": "string"}, {"type": "boolean"}, {"type": "number"}
TIME = _nullable("string", format="date-time")
COUNTS = ("pending", "running", "leased", "done", "failed", "tainted")

SCHEMAS: dict[str, dict] = {
    "Error": _obj({"error": STR}),
    "StepCounts": _obj({"step": STR, "version": INT, **{k: INT for k in COUNTS}, "history": INT,
                        "in_manifest": BOOL, "last_error": _nullable("string"), "parallel": _nullable("integer")}),
    "Runner": _obj({"id": STR, "host": STR, "pid": INT, "kind": STR, "started_at": TIME, "heartbeat": TIME}),
    "Failure": _obj({"task": INT, "step": STR, "input": STR, "exit": _nullable("integer"), "error": _nullable("string"),
                     "finished_at": TIME, "stderr_hash": _nullable("string"), "stderr": _nullable("string")}),
    "Gather": _obj({"step": STR, "members": INT, "gathered": _nullable("integer"), "task": _nullable("integer"),
                    "due": BOOL, "waiting": _nullable("string"), "summary": STR}),
    "Status": _obj({"store": STR, "steps": {"type": "array", "items": _ref("StepCounts")},
                    "totals": _obj({k: INT for k in COUNTS}), "gathers": {"type": "array", "items": _ref("Gather")},
                    "oldest_pending_age": _nullable("number"),
                    "runners": {"type": "array", "items": _ref("Runner")},
                    "last_failures": {"type": "array", "items": _ref("Failure")}}),
    "TaskRow": _obj({"task": INT, "step": STR, "version": INT, "current": BOOL, "input": _nullable("string"),
                     "input_hash": _nullable("string"), "state": {"type": "string", "enum": ["pending", "running", "done", "failed"]},
                     "live": BOOL, "attempts": INT, "exit": _nullable("integer"), "error": _nullable("string"),
                     "runset": STR, "created_at": TIME, "finished_at": TIME, "started_at": TIME}),
    "TaskPage": _obj({"tasks": {"type": "array", "items": _ref("TaskRow")},
                      "next": _nullable("integer", description="pass as `before` for the next page; null on the last")}),
    "Log": _obj({"hash": STR, "size": INT, "tail": STR, "truncated": BOOL}),
    "Attempt": _obj({"id": INT, "task_id": INT, "attempt": INT, "runner": STR, "started_at": TIME, "finished_at": TIME,
                     "outcome": STR, "exit_code": _nullable("integer"), "error": _nullable("string"),
                     "stdout_hash": _nullable("string"), "stderr_hash": _nullable("string"),
                     "stdout": {"allOf": [_ref("Log")], "nullable": True},
                     "stderr": {"allOf": [_ref("Log")], "nullable": True}}),
    "Output": _obj({"name": STR, "hash": STR, "key": STR}),
    "Hop": _obj({"object": STR, "name": STR, "task": _nullable("integer"), "step": STR, "version": _nullable("integer"),
                 "input": _nullable("string"), "runset": _nullable("string"), "live": BOOL}),
    "Task": _obj({"task": INT, "step": STR, "version": INT, "input": STR, "input_hash": STR, "state": STR, "live": BOOL,
                  "attempts": {"type": "array", "items": _ref("Attempt")},
                  "outputs": {"type": "array", "items": _ref("Output")},
                  "origin": {"type": "array", "items": _ref("Hop")}}),
    "Lineage": _obj({"object": STR, "chains": {"type": "array", "items": {"type": "array", "items": _ref("Hop")}}}),
    "Graph": _obj({"nodes": {"type": "array", "items": _obj({"id": STR, "start": BOOL, "terminal": BOOL,
                                                             "version": _nullable("integer"), "removed": BOOL})},
                   "edges": {"type": "array", "items": _obj({"from": STR, "to": STR, "observed": INT, "guessed": BOOL,
                                                             "dashed": BOOL})}}),
    "RetryRequest": _obj({"step": _nullable("string", minLength=1, maxLength=200, pattern="^[^\\x00]*$",
                                            description="only this step (default: all)"),
                          "dry_run": BOOL}, required=[]),
    "RetryResult": _obj({"dry_run": BOOL, "tasks": INT, "steps": {"type": "object", "additionalProperties": INT}}),
    "InvalidateRequest": _obj({"step": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[^\\x00]*$"},
                               "dry_run": BOOL}, required=["step"]),
    "InvalidateResult": _obj({"dry_run": BOOL, "step": STR, "tasks": INT}),
    "SubmitResult": _obj({"name": STR, "hash": STR, "size": INT, "new_tasks": {"type": "array", "items": STR}}),
}


def error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


def json_response(schema: str, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def query(name: str, schema: dict, description: str, required: bool = False) -> dict:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


def path_param(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


# every operation can answer these
COMMON = {"400": error("bad request: the message says what to change"),
          "421": error("the Host header names another server (a loopback listener answers only its own names)"),
          "503": error("the database cannot be reached now; try again")}
ACTION = {"401": error("a token is required: Authorization: Bearer TOKEN"),
          "403": error("wrong token, or a request from another site"),
          "415": error("the request's content type is not the one this action takes")}


def document(routes: list) -> dict:
    """The OpenAPI document of `routes` (api.ApiRoute: path, method, operation)."""
    paths: dict[str, dict] = {}
    for r in routes:
        op = dict(r.operation)
        op["responses"] = {**COMMON, **(ACTION if r.method == "post" else {}), **op["responses"]}
        paths.setdefault(r.path, {})[r.method] = op
    return {
        "openapi": VERSION,
        "info": {"title": "task-pipeline", "version": __version__,
                 "description": "The daemon's API (`task-pipeline serve --http`). Times are UTC ISO 8601 with "
                                "milliseconds. Actions (POST) need `Authorization: Bearer TOKEN` when the daemon "
                                "was given --http-token-file."},
        "paths": paths,
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
