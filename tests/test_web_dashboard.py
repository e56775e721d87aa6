"""The dashboard in a real browser: Debian's headless Chromium, driven by Playwright (never its own
browser download, which cannot work here). A pipeline with a failed task: the first screen shows
the step graph and the counts, a click on retry re-queues the task, and the counts then change on
the open page by themselves (the page polls /api/status) as the daemon finishes the work.

Without Chromium or Playwright the test skips, unless TASK_PIPELINE_REQUIRE_SERVERS=1 (CI), where
it fails: .ci/run installs chromium.
"""

from __future__ import annotations

import os
import shutil

import pytest

from servers import unavailable
from test_daemon import wait_until
from test_web import Http

CHROMIUM = os.environ.get("TASK_PIPELINE_CHROMIUM", "/usr/bin/chromium")

# process_3 fails until `fixed` exists; once retried, it waits for `release` before finishing,
# so that the test sees it running first and then done, on a page it never reloads
PIPELINE = """
[[step]]
name = "start"
start = true
script = 'for i in 1 2 3; do echo "item $i" > "$OUTPUT_DIR/process_$i"; done'

[[step]]
name = "process"
script = '''
case "$INPUT_NAME" in *3)
  [ -e fixed ] || { echo "boom on $INPUT_NAME" >&2; exit 4; }
  while [ ! -e release ]; do sleep 0.05; done;;
esac
tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"
'''
"""


@pytest.fixture
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("Playwright for Python is missing: pip install -e '.[test]'")
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
        unavailable(f"Chromium not found at {CHROMIUM}: apt-get install chromium (or set TASK_PIPELINE_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


def test_the_dashboard_shows_live_progress_and_retries(cli, browser, tmp_path):
    from playwright.sync_api import expect   # there, since the fixture found it

    h = Http(cli, manifest=PIPELINE)
    try:
        wait_until(lambda: h.counts("process")["failed"] == 1 and h.counts("process")["done"] == 2,
                   timeout=20, step=0.1)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(h.base + "/")

        def cell(state: str):
            return page.locator(f'td[data-step="process"][data-count="{state}"]')

        # the first screen: the step graph, with each step's counts in its box
        assert page.locator('svg.graph g.node[data-step="process"]').is_visible()
        assert page.locator('svg.graph g.node.has-failed[data-step="process"]').count() == 1
        assert page.locator('svg.graph tspan[data-step="process"][data-count="failed"]').text_content() == "1"
        assert cell("failed").text_content() == "1" and cell("done").text_content() == "2"
        assert "boom on process_3" in page.locator("table.failures").text_content()

        (cli.tmp / "fixed").write_text("")
        page.locator('button.retry[data-step="process"]').click()
        page.wait_for_url(lambda url: "?msg=" in url, timeout=10000)
        assert "re-queued 1 failed task(s) of process" in page.locator("p.flash").text_content()
        # the retried task waits for `release`: not finished yet
        assert cell("failed").text_content() == "0" and cell("done").text_content() == "2"
        assert int(cell("pending").text_content()) + int(cell("running").text_content()) == 1

        # from here on the page is not reloaded: only its script can change what it shows
        page.evaluate("window.stillTheSamePage = true")
        (cli.tmp / "release").write_text("")
        expect(cell("done")).to_have_text("3", timeout=10000)
        assert cell("running").text_content() == "0" and cell("pending").text_content() == "0"
        assert page.locator('svg.graph tspan[data-step="process"][data-count="done"]').text_content() == "3"
        assert page.locator('svg.graph g.node.has-failed[data-step="process"]').count() == 0
        assert page.evaluate("window.stillTheSamePage") is True
        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert not problems, problems   # no script errors, nothing refused by the page's CSP
        assert h.close() == 0
    finally:
        h.kill()
