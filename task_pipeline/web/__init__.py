"""A window into the daemon: `serve --http ADDR` serves a JSON API (with its own OpenAPI document), a
dashboard and Prometheus metrics, from inside serve's own event loop.

The web part is a consumer of the store like the commands are: it reads through queries, overview
and graph, and acts through state, on a database connection of its own (never the engine's). Modules:

- listen.py: the --http address (host:port or a unix socket path), and whether it is loopback; pure;
- security.py: the bearer token, browser sessions and their CSRF tokens, Host and Origin checks;
- reader.py: the web's own database connections, and the snapshot of the status document it serves;
- stepgraph.py: the step graph it serves, kept and refreshed in the background;
- api.py: the JSON routes, each with its OpenAPI operation; openapi.py: schemas and the document;
- pages.py: the dashboard's HTML routes (templates/ and static/ ship in the package);
- layout.py: the step graph laid out for an SVG picture; pure;
- metrics.py: Prometheus metrics, fed by the engine's reporter and counted at scrape time;
- app.py: the Starlette application; server.py: Hypercorn, as a task in the daemon's task group.

The extra's libraries (Starlette, Hypercorn, Jinja2, prometheus_client) are imported only when
--http is given; `require` turns their absence into one line that says how to install them.
"""

from __future__ import annotations

import importlib

from task_pipeline.errors import UsageError

EXTRA = ("starlette", "hypercorn", "jinja2", "prometheus_client")
INSTALL = "pip install 'task-pipeline[web]'"


def require() -> None:
    missing = []
    for name in EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UsageError(f"--http needs the web extra ({', '.join(missing)} not installed): {INSTALL}")
