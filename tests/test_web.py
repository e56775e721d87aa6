"""`serve --http`: the JSON API, the dashboard's forms and /metrics, tested against a real `serve`
on a free port with a real HTTP client (httpx), on a real store (SQLite, and PostgreSQL where the
state matters). Tests that only read share one settled daemon (the `shared` fixture); a test that
changes the store starts its own. Pure parts (the address, the graph's layout, sessions and CSRF
tokens) are tested directly at the end. The OpenAPI document is checked by schemathesis in
test_web_openapi.py, the dashboard in a real browser in test_web_dashboard.py.
"""

from __future__ import annotations

import hashlib
import html
import importlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CLI, ROOT
from servers import REQUIRE_ENV, free_ports
from test_daemon import Serve, wait_until


def need(module: str):
    """A library of the test extra: its absence skips the web tests (a Nix build's check has only
    pytest and hypothesis), except under TASK_PIPELINE_REQUIRE_SERVERS=1 (CI), where it is an error."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get(REQUIRE_ENV) == "1":
            raise
        pytest.skip(f"{module} is not installed (pip install -e '.[test]'); the web tests need it",
                    allow_module_level=True)


httpx = need("httpx")
text_string_to_metric_families = need("prometheus_client.parser").text_string_to_metric_families

TOKEN = "s3cret-token-0123456789abcdef"

# four inputs; process fails on the third until the file `fixed` exists in the workdir (a retry then
# succeeds); one output name is markup
PIPELINE = """
[[step]]
name = "start"
start = true
script = '''
for i in 1 2 3; do echo "item $i" > "$OUTPUT_DIR/process_$i"; done
echo hostile > "$OUTPUT_DIR/process_<script>alert(1)<"
'''

[[step]]
name = "process"
script = '''
case "$INPUT_NAME" in *3) [ -e fixed ] || {{ echo "boom on $INPUT_NAME: <b>bold</b>" >&2; exit 4; }};; esac
tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"
'''
""".replace("{{", "{").replace("}}", "}")

# an output larger than the API serves whole, and a stderr longer than a task's log tail
BIG = """
[[step]]
name = "big"
start = true
script = 'head -c 17000000 /dev/zero > "$OUTPUT_DIR/blob"; head -c 300000 /dev/zero | tr "\\\\0" x >&2'
"""


class Http:
    """A `serve --http 127.0.0.1:PORT` and an HTTP client for it."""

    def __init__(self, cli: CLI, *extra: str, manifest: str = PIPELINE) -> None:
        self.cli = cli
        self.port = free_ports(1, "127.0.0.1")[0]
        self.base = f"http://127.0.0.1:{self.port}"
        self.serve = Serve(cli, cli.manifest(manifest), "--http", f"127.0.0.1:{self.port}", *extra)
        self.serve.wait_log("http: dashboard and API on")
        self.client = httpx.Client(base_url=self.base, timeout=10)

    def get(self, path: str, **kw) -> httpx.Response:
        return self.client.get(path, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return self.client.post(path, **kw)

    def status(self) -> dict:
        r = self.get("/api/status")
        assert r.status_code == 200, r.text
        return r.json()

    def counts(self, step: str) -> dict:
        return next(c for c in self.status()["steps"] if c["step"] == step)

    def settled(self, done: int = 4) -> dict:
        """Wait until `done` tasks are done and nothing is pending or running; the status then."""
        def idle():
            s = self.status()
            return s if s["totals"]["done"] >= done and not any(s["totals"][k] for k in ("pending", "running", "leased")) \
                else None
        return wait_until(idle, timeout=20, step=0.1)

    def close(self) -> int:
        self.client.close()
        return self.serve.stop()

    def kill(self) -> None:
        self.client.close()
        self.serve.kill()


@pytest.fixture
def http(cli):
    started: list[Http] = []

    def start(*extra: str, **kw) -> Http:
        h = Http(cli, *extra, **kw)
        started.append(h)
        return h

    yield start
    for h in started:
        h.kill()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One daemon behind a token, its pipeline settled (one failed task, one big output), for the
    tests that only read. Nothing may change its store through it."""
    cli = CLI(tmp_path_factory.mktemp("shared"))
    h = Http(cli, "--http-token-file", token_file(cli), manifest=PIPELINE + BIG)
    try:
        h.settled(done=5)
        yield h
    finally:
        h.kill()


def token_file(cli: CLI) -> Path:
    p = cli.tmp / "token"
    p.write_text(TOKEN + "\n")
    p.chmod(0o600)
    return p


def cli_json(cli: CLI, *args) -> object:
    return json.loads(cli.ok(*args, "-db", cli.db, "--json").out)


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def error_of(r: httpx.Response, status: int) -> str:
    """The one line an error answers with (JSON under /api)."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    text = r.json()["error"]
    assert text and "\n" not in text and len(text) < 400, text
    return text


def without_heartbeats(doc: dict) -> dict:
    for r in doc["runners"]:
        r.pop("heartbeat")
    return doc


# -- reads --------------------------------------------------------------------------------------


def test_api_reads_match_the_cli(shared):
    h, cli = shared, shared.cli
    doc = h.status()
    assert doc["totals"]["failed"] == 1 and doc["totals"]["done"] == 5

    # status: the same document as `status --json` (heartbeats move on between the two calls)
    assert without_heartbeats(doc) == without_heartbeats(cli_json(cli, "status"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["last_failures"][0]["finished_at"])
    assert doc["last_failures"][0]["stderr"] == "boom on process_3: <b>bold</b>"

    # tasks: pages by cursor, newest first, nothing twice, nothing missed
    seen, before = [], None
    while True:
        r = h.get("/api/tasks", params={"limit": 2, **({"before": before} if before else {})})
        assert r.status_code == 200
        page = r.json()
        assert len(page["tasks"]) <= 2
        seen += [t["task"] for t in page["tasks"]]
        before = page["next"]
        if before is None:
            break
    assert seen == sorted(seen, reverse=True) and len(seen) == len(set(seen)) == 6
    failed = h.get("/api/tasks", params={"step": "process", "state": "failed"}).json()["tasks"]
    assert [t["input"] for t in failed] == ["process_3"] and failed[0]["exit"] == 4
    assert h.get("/api/tasks", params={"step": "start"}).json()["tasks"][0]["input"] is None
    assert "nope" in error_of(h.get("/api/tasks", params={"step": "nope"}), 404)
    assert "use one of pending, running, done, failed" in error_of(h.get("/api/tasks", params={"state": "exploded"}), 400)
    assert "whole number" in error_of(h.get("/api/tasks", params={"limit": "ten"}), 400)

    # one task: attempts, exit codes, the tail of its stderr, where its input came from
    task = h.get(f"/api/tasks/{failed[0]['task']}").json()
    (attempt,) = task["attempts"]
    assert attempt["outcome"] == "failed" and attempt["exit_code"] == 4
    assert attempt["stderr"]["tail"] == "boom on process_3: <b>bold</b>\n"
    assert [hop["step"] for hop in task["origin"]] == ["start"]
    assert "no task 999999" in error_of(h.get("/api/tasks/999999"), 404)
    assert "no task 99999999999999999999" in error_of(h.get("/api/tasks/99999999999999999999"), 404)
    assert h.get("/tasks/99999999999999999999").status_code == 404

    # lineage: what `why --json` says; the object's bytes
    done = [t for t in h.get("/api/tasks", params={"step": "process", "state": "done"}).json()["tasks"]
            if t["input"] == "process_1"][0]
    out = h.get(f"/api/tasks/{done['task']}").json()["outputs"][0]
    assert out["name"] == "done_process_1"
    lineage = h.get(f"/api/objects/{out['hash']}/lineage").json()
    assert lineage == {"object": out["hash"], "chains": cli_json(cli, "why", out["hash"])}
    r = h.get(f"/api/objects/{out['hash']}")
    assert r.content == b"ITEM 1\n" and r.headers["content-type"] == "application/octet-stream"

    # graph: the store's steps and observed routing, as `graph --json` has them
    g = h.get("/api/graph").json()
    want = cli_json(cli, "graph")
    assert g["nodes"] == want["nodes"]
    observed = {(e["from"], e["to"]): e["observed"] for e in g["edges"] if e["observed"]}
    assert observed == {(e["from"], e["to"]): e["observed"] for e in want["edges"]} == \
        {("start", "process"): 4, ("process", "done"): 3}


GATHER = """
[[step]]
name = "count"
script = 'wc -c < "$INPUT_FILE" > "$OUTPUT_DIR/report_$INPUT_NAME"'

[[step]]
name = "report"
gather = true
settle = 0.5
script = 'cat "$INPUT_DIR"/* > "$OUTPUT_DIR/done_total"'
"""


def test_the_dashboard_says_what_each_gather_step_waits_for(cli, http):
    h = http(manifest=GATHER)
    for i in range(3):
        (cli.tmp / f"in{i}").write_text("x" * (i + 1))
        cli.ok("submit", "count", cli.tmp / f"in{i}", "-db", cli.db)

    def gathered():
        g = h.status()["gathers"]
        return g if g and g[0]["gathered"] == 3 and not g[0]["due"] else None

    (g,) = wait_until(gathered, timeout=20, step=0.1)
    assert g["summary"] == f"gather step 'report': 3 member(s), gathered by task {g['task']}"
    page = h.get("/").text
    shown = re.search(r'<li data-gather="report">(.*?)</li>', page, re.S)
    assert shown and html.unescape(shown.group(1)).strip() == g["summary"], page
    # the same sentence as `status` prints
    assert g["summary"] in cli.ok("status", "-db", cli.db).out


def test_errors_are_one_line(shared):
    h = shared
    assert "/api/openapi.json" in error_of(h.get("/api/nothing-here"), 404)
    assert "POST is not allowed" in error_of(h.post("/api/status"), 405)
    page = h.get("/nothing-here")
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    assert "nothing at /nothing-here" in page.text
    # a loopback listener answers only names of this machine (DNS rebinding)
    assert "use one of those names" in error_of(h.get("/api/status", headers={"Host": f"evil.example:{h.port}"}), 421)
    assert h.get("/api/status", headers={"Host": f"localhost:{h.port}"}).status_code == 200
    for r in (h.get("/"), h.get("/api/status"), h.get("/static/style.css")):
        assert r.headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in r.headers["content-security-policy"]

# -- actions --------------------------------------------------------------------------------------


def metric_samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.mark.backends
def test_api_actions_need_the_token(cli, http):
    h = http("--http-token-file", token_file(cli))
    # reads on this backend: what `status --json` says
    assert without_heartbeats(h.settled()) == without_heartbeats(cli_json(cli, "status"))
    body = {"step": "process"}
    r = h.post("/api/retry", json=body)
    assert "Authorization: Bearer TOKEN" in error_of(r, 401) and r.headers["www-authenticate"].startswith("Bearer")
    assert r.headers["connection"] == "close"   # its body was never read: a keep-alive client must not reuse it
    assert "wrong token" in error_of(h.post("/api/retry", json=body, headers=auth("wrong-token-0123456789")), 403)
    error_of(h.post("/api/invalidate", json=body), 401)
    error_of(h.post("/api/submit", params={"step": "process", "name": "x"}, content=b"x"), 401)
    # a page of another site cannot send JSON without asking first; form bodies never act
    assert "send this action's body as application/json" in error_of(h.post("/api/retry", data=body, headers=auth()), 415)
    assert "another site" in error_of(h.post("/api/retry", json=body, headers={**auth(), "Origin": "https://evil.example"}), 403)
    assert h.counts("process")["failed"] == 1   # nothing happened

    dry = h.post("/api/retry", json={**body, "dry_run": True}, headers=auth())
    assert dry.json() == {"dry_run": True, "tasks": 1, "steps": {"process": 1}}
    (cli.tmp / "fixed").write_text("")
    r = h.post("/api/retry", json=body, headers=auth())
    assert r.status_code == 200 and r.json() == {"dry_run": False, "tasks": 1, "steps": {"process": 1}}
    # the action shows in the next answer, and the daemon runs the task
    assert h.counts("process")["failed"] == 0
    wait_until(lambda: h.counts("process")["done"] == 4, timeout=15, step=0.1)
    # /metrics counts what happened: the store's counts, and this daemon's attempts
    m = metric_samples(h.get("/metrics").text)
    assert m[("task_pipeline_tasks", (("state", "done"), ("step", "process")))] == 4
    assert m[("task_pipeline_tasks", (("state", "failed"), ("step", "process")))] == 0
    assert m[("task_pipeline_attempts_total", (("outcome", "ok"), ("step", "process")))] == 4
    assert m[("task_pipeline_attempts_total", (("outcome", "failed"), ("step", "process")))] == 1

    r = h.post("/api/invalidate", json={"step": "start"}, headers=auth())
    assert r.json() == {"dry_run": False, "step": "start", "tasks": 1}
    assert "nope" in error_of(h.post("/api/invalidate", json={"step": "nope"}, headers=auth()), 404)
    assert "step: give a step name" in error_of(h.post("/api/invalidate", json={}, headers=auth()), 400)
    assert "not JSON" in error_of(h.post("/api/invalidate", content=b"{", headers={**auth(), "Content-Type":
                                                                                     "application/json"}), 400)

    data = b"submitted through http\n"
    octets = {**auth(), "Content-Type": "application/octet-stream"}
    r = h.post("/api/submit", params={"step": "process", "name": "extra.txt"}, content=data, headers=octets)
    assert r.status_code == 200, r.text
    assert r.json() == {"name": "extra.txt", "hash": hashlib.sha256(data).hexdigest(), "size": len(data),
                        "new_tasks": ["process"]}
    want = hashlib.sha256(data.upper()).hexdigest()
    wait_until(lambda: (cli.db / "objects" / want[:2] / want[2:4] / want[4:]).exists(), timeout=15)
    # without a step, the name routes the file (submit --route)
    r = h.post("/api/submit", params={"name": "process_9"}, content=b"routed\n", headers=octets)
    assert r.status_code == 200 and r.json()["new_tasks"] == ["process"]
    r = h.post("/api/submit", params={"name": "nowhere.bin"}, content=b"x", headers=octets)
    assert "no step consumes 'nowhere.bin'" in error_of(r, 404)
    assert "no '/'" in error_of(h.post("/api/submit", params={"step": "process", "name": "../x"}, content=b"x",
                                       headers=octets), 400)
    assert "step= is empty" in error_of(h.post("/api/submit", params={"name": "y", "step": ""}, content=b"y",
                                               headers=octets), 400)
    assert h.close() == 0


def _csrf(page: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)


def test_forms_sign_in_and_are_protected_against_cross_site_requests(cli, http):
    h = http("--http-token-file", token_file(cli))
    h.settled()
    page = h.get("/")
    cookie = page.headers["set-cookie"].lower()
    assert "tp_session=" in cookie and "samesite=strict" in cookie and "httponly" in cookie
    assert "sign in to act" in page.text and "retry failed" not in page.text
    login = h.get("/login")
    # a form of our own page, but not signed in
    r = h.post("/actions/retry", data={"csrf": _csrf(login.text), "step": "process"})
    assert r.status_code == 403 and "token first" in r.text
    assert h.post("/login", data={"csrf": _csrf(login.text), "token": "wrong-token-0123456789"}).status_code == 403
    r = h.post("/login", data={"csrf": _csrf(login.text), "token": TOKEN, "next": "/"})
    assert r.status_code == 303
    page = h.get("/")
    assert "retry failed" in page.text and "sign out" in page.text
    csrf = _csrf(page.text)

    # signed in, but another site's page: no CSRF token, a made-up one, one without the session
    # cookie, a foreign Origin, or a browser saying the request is cross-site
    form = {"step": "process", "next": "/"}
    for r in (h.post("/actions/retry", data=form),
              h.post("/actions/retry", data={**form, "csrf": "0" * 64}),
              httpx.Client(base_url=h.base).post("/actions/retry", data={**form, "csrf": csrf}),
              h.post("/actions/retry", data={**form, "csrf": csrf}, headers={"Origin": "http://evil.example"}),
              h.post("/actions/retry", data={**form, "csrf": csrf}, headers={"Sec-Fetch-Site": "cross-site"})):
        assert r.status_code == 403 and "did not come from this daemon" in r.text, r.text
    assert h.post("/actions/retry", json={**form, "csrf": csrf}).status_code == 415
    assert h.counts("process")["failed"] == 1

    # our own page's form acts, and sends the browser back to a page of ours only
    (cli.tmp / "fixed").write_text("")
    r = h.post("/actions/retry", data={**form, "csrf": csrf, "next": "https://evil.example/"},
               headers={"Origin": h.base})
    assert r.status_code == 303 and r.headers["location"].startswith("/?msg=")
    assert "re-queued 1 failed task(s) of process" in h.get(r.headers["location"]).text
    # a message in a link someone else made is not shown
    assert 'class="flash"' not in h.get("/", params={"msg": "forged", "sig": "0" * 32}).text
    wait_until(lambda: h.counts("process")["done"] == 4, timeout=15, step=0.1)
    r = h.post("/actions/invalidate", data={**form, "csrf": csrf})
    assert r.status_code == 303 and "process: 4 task(s) will run again" in h.get(r.headers["location"]).text
    assert h.post("/actions/explode", data={**form, "csrf": csrf}).status_code == 404

    # signing out ends the session's right to act
    r = h.post("/logout", data={"csrf": csrf, "next": "/"})
    assert r.status_code == 303
    page = h.get("/")
    assert "sign in to act" in page.text
    assert h.post("/actions/retry", data={**form, "csrf": _csrf(h.get("/login").text)}).status_code == 403
    assert h.close() == 0


# -- refusals at start-up ----------------------------------------------------------------------------


def test_http_refusals_are_one_line(cli, tmp_path):
    """Each a line and exit 2, before the store is created. (The address's and the token file's
    other mistakes are tested directly at the end.)"""
    m = cli.manifest(PIPELINE)
    (port,) = free_ports(1, "127.0.0.1")

    def refused(*args: str) -> str:
        r = cli("serve", m, "-db", cli.db, *args, timeout=30)
        assert r.returncode == 2, (r.returncode, r.err)
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("task-pipeline: "), r.err
        return lines[0]

    assert "other machines could reach it" in refused("--http", f"0.0.0.0:{port}")
    assert "goes with --http" in refused("--http-token-file", str(token_file(cli)))
    loose = tmp_path / "loose-token"
    loose.write_text(TOKEN)
    loose.chmod(0o644)
    assert "chmod o-r" in refused("--http", f"127.0.0.1:{port}", "--http-token-file", str(loose))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        assert "in use" in refused("--http", f"127.0.0.1:{port}")
    assert not (cli.db / "db").exists(), "a refused serve must not create the store"


def test_a_missing_web_extra_is_one_line_naming_the_extra(cli):
    m = cli.manifest(PIPELINE)
    block = ("import sys\n"
             "class Block:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] == 'starlette':\n"
             "            raise ModuleNotFoundError(name)\n"
             "sys.meta_path.insert(0, Block())\n"
             "from task_pipeline.cli import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", block, "serve", str(m), "-db", str(cli.db), "--http", "127.0.0.1:9"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip() == ("task-pipeline: --http needs the web extra (starlette not installed): "
                                "pip install 'task-pipeline[web]'")


# -- robustness: escaping, caps, the store's boundary ------------------------------------------------


def test_hostile_names_are_escaped_in_every_page(shared):
    h = shared
    hostile = [t for t in h.get("/api/tasks", params={"step": "process"}).json()["tasks"]
               if t["input"].startswith("process_<script>")][0]
    failed = h.get("/api/tasks", params={"state": "failed"}).json()["tasks"][0]
    pages = ["/", "/tasks", "/tasks?step=process", "/tasks?state=failed", f"/tasks/{hostile['task']}",
             f"/objects/{hostile['input_hash']}", f"/tasks/{failed['task']}", "/login?next=%3Cscript%3E"]
    for path in pages:
        r = h.get(path)
        assert r.status_code == 200, path
        assert "<script>alert" not in r.text and "<b>bold" not in r.text and "<script>\"" not in r.text, path
        assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "process_&lt;script&gt;alert(1)&lt;" in h.get(f"/tasks/{hostile['task']}").text
    assert "&lt;b&gt;bold&lt;/b&gt;" in h.get(f"/tasks/{failed['task']}").text
    # the dashboard: the graph, the failed task with its stderr, counts the script can update
    page = h.get("/").text
    assert 'aria-label="step graph"' in page and "boom on process_3: &lt;b&gt;bold&lt;/b&gt;" in page
    assert 'data-step="process" data-count="failed">1<' in page


def test_responses_are_capped_and_lists_paged(shared):
    h = shared
    task = h.get("/api/tasks", params={"step": "big"}).json()["tasks"][0]
    info = h.get(f"/api/tasks/{task['task']}").json()
    log = info["attempts"][0]["stderr"]
    assert log["size"] == 300000 and log["truncated"] and log["tail"] == "x" * 16 * 1024
    assert len(h.get(f"/api/tasks/{task['task']}", params={"tail": 100}).json()["attempts"][0]["stderr"]["tail"]) == 100
    assert "from 0 to 262144" in error_of(h.get(f"/api/tasks/{task['task']}", params={"tail": 10 ** 7}), 400)
    assert "task-pipeline cat" in error_of(h.get(f"/api/objects/{info['outputs'][0]['hash']}"), 413)
    assert "from 1 to 500" in error_of(h.get("/api/tasks", params={"limit": 501}), 400)
    assert len(h.get("/api/tasks", params={"limit": 3}).json()["tasks"]) == 3
    assert len(h.get("/api/tasks").json()["tasks"]) == 6 <= 50
    huge = {**auth(), "Content-Type": "application/json"}
    assert "larger than 65536" in error_of(h.post("/api/retry", content=b"{" + b" " * 70000 + b"}", headers=huge), 413)


def test_the_object_endpoint_cannot_read_outside_the_store(shared, tmp_path):
    h, cli = shared, shared.cli
    secret = tmp_path / "secret.txt"
    secret.write_text("not for you\n")
    out = [t for t in h.get("/api/tasks", params={"step": "process", "state": "done"}).json()["tasks"]
           if t["input"] == "process_2"][0]
    known = h.get(f"/api/tasks/{out['task']}").json()["outputs"][0]["hash"]
    for path in ["/api/objects/..%2f..%2fsecret.txt", "/api/objects/%2e%2e/%2e%2e/etc/passwd",
                 f"/api/objects/{known[:12]}", f"/api/objects/{known.upper()}", "/api/objects/" + "0" * 64,
                 f"/api/objects/{known}%00", f"/objects/{known[:20]}", f"/api/objects/{'0' * 64}/lineage"]:
        r = h.get(path)
        assert r.status_code == 404, (path, r.status_code)
        assert b"not for you" not in r.content and b"root:" not in r.content
    # a known object (only this test reads it) whose file was swapped for a link to a file outside
    # is not followed
    p = cli.db / "objects" / known[:2] / known[2:4] / known[4:]
    p.parent.chmod(0o750)
    p.unlink()
    p.symlink_to(secret)
    r = h.get(f"/api/objects/{known}")
    assert "symlink" in error_of(r, 500) and b"not for you" not in r.content


# -- metrics, the unix socket, a bucket ---------------------------------------------------------------


def test_metrics_count_the_store(shared):
    h = shared
    r = h.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
    m = metric_samples(r.text)
    # every step and state, as the status document counts them
    for c in h.status()["steps"]:
        for st in ("pending", "running", "leased", "done", "failed", "tainted", "history"):
            assert m[("task_pipeline_tasks", (("state", st), ("step", c["step"])))] == c[st], (c["step"], st)
    assert m[("task_pipeline_tasks", (("state", "done"), ("step", "process")))] == 3
    assert m[("task_pipeline_tasks", (("state", "failed"), ("step", "process")))] == 1
    assert m[("task_pipeline_attempts_total", (("outcome", "ok"), ("step", "process")))] == 3
    assert m[("task_pipeline_attempts_total", (("outcome", "failed"), ("step", "process")))] == 1
    assert m[("task_pipeline_task_failures_total", (("step", "process"),))] == 1
    assert m[("task_pipeline_task_duration_seconds_count", (("step", "process"),))] == 4
    assert m[("task_pipeline_commit_seconds_count", ())] >= 1
    assert m[("task_pipeline_commit_batch_tasks_sum", ())] == 6   # every result was committed once
    assert m[("task_pipeline_oldest_pending_age_seconds", ())] == 0
    assert m[("task_pipeline_runners", (("kind", "serve"),))] == 1
    assert m[("task_pipeline_scripts_running", ())] == 0
    assert "process_open_fds" in r.text   # the process collector
    # what Prometheus asks for
    om = h.get("/metrics", headers={"Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"})
    assert om.headers["content-type"].startswith("application/openmetrics-text") and om.text.endswith("# EOF\n")


def test_unix_socket(cli):
    sock = cli.tmp / "http.sock"
    d = Serve(cli, cli.manifest(PIPELINE), "--http", str(sock))
    try:
        d.wait_log("http: dashboard and API on http\\+unix://")
        assert stat.S_ISSOCK(os.stat(sock).st_mode)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost") as c:
            wait_until(lambda: c.get("/api/status").json()["totals"]["failed"] == 1, timeout=15, step=0.1)
            assert c.get("/").status_code == 200
        assert d.stop(signal.SIGTERM) == 0
        assert not sock.exists()
    finally:
        d.kill()


def test_objects_in_a_bucket(tmp_path, s3_server, s3_bucket):
    """The web reads and stores objects through the store's interface: a bucket works as a directory."""
    cli = CLI(tmp_path, env=s3_server.env())
    h = Http(cli, "--objects", f"s3://{s3_bucket}/store", "--scratch", str(tmp_path / "scratch"))
    try:
        h.settled()
        done = [t for t in h.get("/api/tasks", params={"step": "process", "state": "done"}).json()["tasks"]
                if t["input"] == "process_1"][0]
        out = h.get(f"/api/tasks/{done['task']}").json()["outputs"][0]
        assert h.get(f"/api/objects/{out['hash']}").content == b"ITEM 1\n"
        failed = h.get("/api/tasks", params={"state": "failed"}).json()["tasks"][0]
        stderr = h.get(f"/api/tasks/{failed['task']}").json()["attempts"][0]["stderr"]
        assert stderr["tail"] == "boom on process_3: <b>bold</b>\n"
        assert h.status()["last_failures"][0]["stderr"] == "boom on process_3: <b>bold</b>"
        r = h.post("/api/submit", params={"step": "process", "name": "up.txt"}, content=b"up\n",
                   headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        assert h.get(f"/api/objects/{r.json()['hash']}").content == b"up\n"
        assert not (tmp_path / "db" / "objects").exists()
        assert h.close() == 0
    finally:
        h.kill()


# -- pure parts ------------------------------------------------------------------------------------------


def test_listen_addresses():
    from task_pipeline.errors import UsageError
    from task_pipeline.web.listen import check, parse

    assert parse("127.0.0.1:8080").loopback and parse("localhost:80").loopback and parse("[::1]:1").loopback
    assert not parse("0.0.0.0:8080").loopback and not parse("[::]:8080").loopback
    assert not parse("example.org:8080").loopback and not parse("10.1.2.3:8080").loopback
    assert parse("/run/tp.sock").path == "/run/tp.sock" and parse("unix:./tp.sock").path == "./tp.sock"
    assert parse("[::1]:8080").url() == "http://[::1]:8080"
    assert "127.0.0.1:8080" in parse("127.0.0.1:8080").hosts() and parse("0.0.0.0:1").hosts() is None
    for bad, says in (("8080", "HOST:PORT"), (":8080", "HOST:PORT"), ("::1:8080", "in brackets"),
                      ("[::1]8080", "after the bracket"), ("[zz]:1", "not an IPv6 address"), ("host:0", "1 to 65535"),
                      ("127.0.0.1:99999", "1 to 65535"), ("host:http", "1 to 65535")):
        with pytest.raises(UsageError, match=re.escape(says)):
            parse(bad)
    for reachable in ("0.0.0.0:1", "[::]:1", "example.org:1"):
        with pytest.raises(UsageError, match="--http-token-file FILE"):
            check(parse(reachable), False, reachable)
        check(parse(reachable), True, reachable)
    check(parse("127.0.0.1:1"), False, "127.0.0.1:1")


def test_token_files(tmp_path):
    from task_pipeline.errors import UsageError
    from task_pipeline.web.security import read_token

    def token(text: str, mode: int = 0o600) -> Path:
        p = tmp_path / f"token{len(list(tmp_path.iterdir()))}"
        p.write_text(text)
        p.chmod(mode)
        return p

    assert read_token(str(token(f"  {TOKEN}\n"))) == TOKEN
    for path, says in ((token(TOKEN, 0o644), "chmod o-r"), (token("abc"), "at least 16"),
                       (token("two words of token text"), "one word"), (tmp_path / "none", "cannot read it")):
        with pytest.raises(UsageError, match=re.escape(says)):
            read_token(str(path))


def test_sessions_and_csrf_tokens():
    from task_pipeline.web.security import Guard, local_path, same_origin, simple_content_type

    g = Guard(None, None)
    s, cookie = g.new_session()
    assert g.session(cookie) == s and g.csrf_ok(s, g.csrf(s))
    assert g.session(cookie.replace(".0.", ".1.")) is None            # signing in cannot be forged
    assert not g.csrf_ok(g.new_session()[0], g.csrf(s))               # a token is its session's only
    assert not g.csrf_ok(None, g.csrf(s)) and not g.csrf_ok(s, "")
    assert Guard(None, None).session(cookie) is None                  # nor valid for another daemon
    t = Guard(TOKEN, None)
    assert t.bearer(None) == 401 and t.bearer("Bearer nope") == 403 and t.bearer(f"bearer {TOKEN}") == 200
    assert g.bearer(None) == 200
    assert not t.may_act(t.new_session()[0]) and t.may_act(t.new_session(signed_in=True)[0])
    assert same_origin(None, None, "http", "h:1") and same_origin("http://h:1", "same-origin", "http", "h:1")
    assert not same_origin("http://evil:1", None, "http", "h:1") and not same_origin(None, "cross-site", "http", "h")
    assert simple_content_type("text/plain; charset=utf-8") and simple_content_type(None)
    assert not simple_content_type("application/json")
    assert local_path("/tasks?x=1") == "/tasks?x=1"
    for bad in ("https://evil", "//evil", "/\\evil", "javascript:x", "/a\nb"):
        assert local_path(bad) == "/"


def test_graph_layout():
    from task_pipeline.graph import Edge, Graph, Node
    from task_pipeline.web.layout import columns, lay_out

    g = Graph([Node("fetch", start=True), Node("split"), Node("a"), Node("b"), Node("merge"), Node("done", terminal=True)],
              [Edge("fetch", "split", 1), Edge("split", "a", 1), Edge("split", "b", 1), Edge("a", "merge", 1),
               Edge("b", "merge", 1), Edge("merge", "done", 1), Edge("merge", "split", 1), Edge("a", "a", 1)])
    col = columns(g)
    assert col == {"fetch": 0, "split": 1, "a": 2, "b": 2, "merge": 3, "done": 4}
    lay = lay_out(g)
    boxes = {b.name: b for b in lay.boxes}
    assert boxes["a"].x == boxes["b"].x and boxes["a"].y != boxes["b"].y
    assert all(0 <= b.x and b.x + b.w <= lay.width and 0 <= b.y and b.y + b.h <= lay.height for b in lay.boxes)
    assert len(lay.arrows) == 8 and all(a.d.startswith("M") for a in lay.arrows)
    assert lay_out(Graph([Node("done", terminal=True)], [])).boxes[0].terminal
