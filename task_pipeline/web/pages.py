"""The dashboard: HTML pages rendered with Jinja2 (autoescaped: names, file names and logs are data
from scripts), and the forms that act (retry, invalidate, signing in).

The first screen is the step graph, drawn as inline SVG from layout.py, with each step's counts,
kept current without a reload by static/dashboard.js polling /api/status every two seconds. The
pages work without script too. Forms carry the session's CSRF token (see security.py).
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from task_pipeline import graph as graphs
from task_pipeline import queries
from task_pipeline.errors import UsageError
from task_pipeline.overview import iso
from task_pipeline.web import api
from task_pipeline.web.context import LOG_TAIL, MAX_JSON, MAX_OBJECT, PAGE, Problem, Web, from_usage
from task_pipeline.web.layout import lay_out
from task_pipeline.web.security import COOKIE, Session, local_path, same_origin

FAILED_SHOWN = 20        # failed tasks on the first screen
STDERR_LINES = 12        # lines of each one's stderr
POLL_MS = 2000


def shown(counts: dict, k: str) -> int:
    """A count as the dashboard shows it: a task a runner has claimed but not started yet (leased,
    for a moment) counts as running, so that it never seems to vanish."""
    return counts["running"] + counts["leased"] if k == "running" else counts[k]


def web_of(request: Request) -> Web:
    return request.app.state.web


def session_of(request: Request) -> Session | None:
    return web_of(request).guard.session(request.cookies.get(COOKIE))


def render(request: Request, template: str, context: dict, status: int = 200) -> Response:
    """A page, with the session it needs for its forms (a new one if the browser has none)."""
    web = web_of(request)
    s = session_of(request)
    cookie = None
    if s is None:
        s, cookie = web.guard.new_session()
    msg = request.query_params.get("msg")
    flash = msg if msg and web.guard.verify(msg, request.query_params.get("sig")) else None
    ctx = {"request": request, "csrf": web.guard.csrf(s), "signed_in": s.signed_in,
           "token_required": web.guard.token_required, "may_act": web.guard.may_act(s), "flash": flash,
           "here": request.url.path + (f"?{request.url.query}" if request.url.query else ""), **context}
    resp = web.templates.TemplateResponse(request, template, ctx, status_code=status)
    if cookie is not None:
        resp.set_cookie(COOKIE, cookie, httponly=True, samesite="strict", path="/")
    return resp


def graph_of(d: dict) -> graphs.Graph:
    return graphs.Graph([graphs.Node(n["id"], n["start"], n["terminal"], n["version"], n["removed"]) for n in d["nodes"]],
                        [graphs.Edge(e["from"], e["to"], e["observed"], e["guessed"]) for e in d["edges"]])


def _failures(db, store) -> list[dict]:
    rows = queries.failed_tasks(db, limit=FAILED_SHOWN)
    for f in rows:
        tail = api.log_tail(store, f["stderr_hash"], 4096)
        lines = (tail["tail"] if tail else "").rstrip("\n").split("\n")
        f["stderr_tail"] = "\n".join(lines[-STDERR_LINES:]) if tail else ""
        f["finished_at"] = iso(f["finished_at"])
    return rows


async def dashboard(request: Request) -> Response:
    web = web_of(request)
    doc = await api.status_doc(web)
    g = await api.graph_json(web)
    failures = await web.reader(_failures, web.store)
    by_step = {c["step"]: c for c in doc["steps"]}
    return render(request, "dashboard.html", {"status": doc, "layout": lay_out(graph_of(g)), "by_step": by_step,
                                              "failures": failures, "poll_ms": POLL_MS})


async def tasks(request: Request) -> Response:
    web = web_of(request)
    step = api.text_param(request, "step")
    state = api.text_param(request, "state")
    if state is not None and state not in queries.TASK_STATES:
        raise Problem(400, f"state={state[:40]!r}: use one of {', '.join(queries.TASK_STATES)}")
    before = api.int_param(request, "before", None, 1, 2 ** 63 - 1)
    try:
        page = await web.reader(api._task_rows, step=step, state=state, before=before, limit=PAGE)
    except UsageError as e:
        raise from_usage(e) from None
    doc = await api.status_doc(web)
    query = {k: v for k, v in (("step", step), ("state", state)) if v}
    nxt = f"/tasks?{urlencode({**query, 'before': page['next']})}" if page["next"] else None
    return render(request, "tasks.html", {"page": page, "step": step, "state": state, "next": nxt,
                                          "steps": [c["step"] for c in doc["steps"]], "states": queries.TASK_STATES})


async def task(request: Request) -> Response:
    web = web_of(request)
    try:
        info = await web.reader(api.task_story, web.store, request.path_params["task_id"], LOG_TAIL)
    except UsageError as e:
        raise from_usage(e) from None
    return render(request, "task.html", {"t": info})


async def obj(request: Request) -> Response:
    web = web_of(request)
    h = api.full_hash(request.path_params["hash"])

    def read(db):
        size = queries.object_size(db, h)
        if size is None:
            raise Problem(404, f"no object {h} in this store")
        try:
            chains = queries.lineages(db, h, history=True)
        except UsageError:
            chains = []
        return size, chains

    size, chains = await web.reader(read)
    return render(request, "object.html", {"hash": h, "size": size, "chains": chains, "servable": size <= MAX_OBJECT})


# -- forms ------------------------------------------------------------------------------------


async def form_of(request: Request) -> tuple[dict, Session]:
    """A form post's fields, once it has shown it comes from one of our pages."""
    web = web_of(request)
    ctype = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise Problem(415, "send the form as application/x-www-form-urlencoded")
    body = await api.read_body(request, MAX_JSON)
    try:
        fields = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20))
    except (UnicodeDecodeError, ValueError):
        raise Problem(400, "the form could not be read; reload the page and try again") from None
    s = session_of(request)
    if not web.guard.csrf_ok(s, fields.get("csrf")) or not same_origin(
            request.headers.get("origin"), request.headers.get("sec-fetch-site"), request.url.scheme,
            request.headers.get("host")):
        raise Problem(403, "this form did not come from this daemon's own page (or the page is too old); reload "
                           "the page and try again")
    assert s is not None
    return fields, s


def back(request: Request, fields: dict, text: str) -> Response:
    web = web_of(request)
    target = local_path(fields.get("next"))
    sep = "&" if "?" in target else "?"
    return RedirectResponse(f"{target}{sep}{urlencode({'msg': text, 'sig': web.guard.sign(text)})}", status_code=303)


async def action(request: Request) -> Response:
    web = web_of(request)
    fields, s = await form_of(request)
    if not web.guard.may_act(s):
        raise Problem(403, "sign in with the daemon's token first (the sign-in link at the top of the page)")
    what = request.path_params["what"]
    step = fields.get("step") or None
    if what == "retry":
        result = await api.act(web, api.retry, step, False)
        text = f"re-queued {result['tasks']} failed task(s)" + (f" of {step}" if step else "")
    elif what == "invalidate":
        if step is None:
            raise Problem(400, "name the step to invalidate")
        result = await api.act(web, api.invalidate, step, False)
        text = f"{step}: {result['tasks']} task(s) will run again"
    else:
        raise Problem(404, f"no action '{what[:40]}'; the actions are retry and invalidate")
    return back(request, fields, text)


async def login_page(request: Request) -> Response:
    return render(request, "login.html", {"next": local_path(request.query_params.get("next"))})


async def login(request: Request) -> Response:
    web = web_of(request)
    fields, _ = await form_of(request)
    if not web.guard.token_matches(fields.get("token", "").strip()):
        raise Problem(403, "wrong token: paste the one in the file given to serve --http-token-file")
    _, cookie = web.guard.new_session(signed_in=True)   # a new session id on signing in
    resp = back(request, fields, "signed in")
    resp.set_cookie(COOKIE, cookie, httponly=True, samesite="strict", path="/")
    return resp


async def logout(request: Request) -> Response:
    fields, _ = await form_of(request)
    resp = back(request, fields, "signed out")
    resp.delete_cookie(COOKIE, path="/")
    return resp
