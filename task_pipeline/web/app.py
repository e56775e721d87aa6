"""The Starlette application: the API's routes (api.py), the pages (pages.py), the static files,
and what wraps every answer: the Host check of a loopback listener, security headers (a strict
Content-Security-Policy: the pages run only our own script, load nothing from elsewhere, and cannot
be framed), and errors as one line (JSON under /api, a small page elsewhere).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from task_pipeline.db import DatabaseUnavailable
from task_pipeline.errors import StoreError
from task_pipeline.textsafe import one_line
from task_pipeline.web import api, pages
from task_pipeline.web.context import Problem, Web

HERE = Path(__file__).resolve().parent
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    # not no-referrer: under it a browser's form posts carry `Origin: null`, which the CSRF check refuses
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def templates():
    import jinja2
    from starlette.templating import Jinja2Templates

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["short"] = lambda h: (h or "")[:12]
    env.globals["shown"] = pages.shown
    return Jinja2Templates(env=env)


class Guarded:
    """Every answer gets the security headers; a loopback listener answers only its own Host names."""

    def __init__(self, app, web: Web) -> None:
        self.app, self.web = app, web

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
        if not self.web.guard.host_ok(host):
            resp = JSONResponse({"error": f"this daemon answers only to {', '.join(sorted(self.web.guard.hosts or []))}"
                                          f"; use one of those names"}, status_code=421)
            return await self._headers(resp)(scope, receive, send)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                h = MutableHeaders(scope=message)
                for k, v in HEADERS.items():
                    if k not in h:
                        h[k] = v
            await send(message)

        await self.app(scope, receive, send_with_headers)

    @staticmethod
    def _headers(resp: Response) -> Response:
        for k, v in HEADERS.items():
            resp.headers.setdefault(k, v)
        return resp


def _has_body(request: Request) -> bool:
    h = request.headers
    return h.get("content-length", "0") != "0" or "transfer-encoding" in h


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or request.url.path == "/metrics"


def build(web: Web, log: Callable[[str, str], None]) -> Starlette:
    def answer(request: Request, status: int, message: str, headers: dict | None = None) -> Response:
        message = one_line(message)
        if _has_body(request):
            # answered perhaps before its body was read: the server closes the connection after this
            # answer, and says so, or a keep-alive client sends its next request into the closing socket
            headers = {**(headers or {}), "Connection": "close"}
        if _wants_json(request):
            return JSONResponse({"error": message}, status_code=status, headers=headers)
        return web.templates.TemplateResponse(request, "error.html", {"status": status, "message": message},
                                              status_code=status, headers=headers)

    async def problem(request: Request, e: Problem) -> Response:
        return answer(request, e.status, e.message, e.headers)

    async def http_error(request: Request, e: HTTPException) -> Response:
        text = {404: f"nothing at {request.url.path[:200]}; the API is described at /api/openapi.json",
                405: f"{request.method} is not allowed on {request.url.path[:200]}"}.get(e.status_code, str(e.detail))
        return answer(request, e.status_code, text, dict(e.headers or {}))

    async def unavailable(request: Request, e: DatabaseUnavailable) -> Response:
        return answer(request, 503, f"{e}; try again in a few seconds", {"Retry-After": "5"})

    async def store_error(request: Request, e: StoreError) -> Response:
        log("error", f"web: {request.method} {request.url.path[:200]}: {e}")
        return answer(request, 500, str(e))

    async def bug(request: Request, e: Exception) -> Response:
        log("error", f"web: {request.method} {request.url.path[:200]} failed: {type(e).__name__}: {e}")
        return answer(request, 500, "internal error; the daemon's log says more")

    routes = [Route(r.path.replace("{task_id}", "{task_id:int}"), r.endpoint, methods=[r.method.upper()])
              for r in api.ROUTES]
    routes += [
        Route("/", pages.dashboard),
        Route("/tasks", pages.tasks),
        Route("/tasks/{task_id:int}", pages.task),
        Route("/objects/{hash}", pages.obj),
        Route("/actions/{what}", pages.action, methods=["POST"]),
        Route("/login", pages.login_page),
        Route("/login", pages.login, methods=["POST"]),
        Route("/logout", pages.logout, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={
        Problem: problem, HTTPException: http_error, DatabaseUnavailable: unavailable, StoreError: store_error,
        Exception: bug})
    app.state.web = web
    return Guarded(app, web)
