"""The served OpenAPI document against the live server (schemathesis): requests generated from the
document, valid and invalid, sent to every operation of a real `serve --http` with its token, so
that the actions act. No answer may be a 5xx, and every answer must match the document (its status
code, content type, headers and body schema).

Schemathesis is driven directly (a Hypothesis strategy per operation) rather than through its
pytest plugin, whose fixture-based loader does not run under pytest 9.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CLI
from test_web import BIG, PIPELINE, Http, auth, need, token_file

schemathesis = need("schemathesis")
GenerationMode = schemathesis.GenerationMode

OPERATIONS = [("get", "/api/status"), ("get", "/api/tasks"), ("get", "/api/tasks/{task_id}"),
              ("get", "/api/objects/{hash}"), ("get", "/api/objects/{hash}/lineage"), ("get", "/api/graph"),
              ("post", "/api/retry"), ("post", "/api/invalidate"), ("post", "/api/submit"),
              ("get", "/api/openapi.json"), ("get", "/metrics")]
EXAMPLES = 20     # per operation and mode; `-m slow` runs 200

# The document's `file-name` format: what a directory entry can be called (no '/', no NUL, not '.'
# or '..', at most 255 bytes in UTF-8), which JSON Schema cannot say in bytes.
schemathesis.openapi.format("file-name", st.text(st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1)
                            .filter(lambda n: n not in (".", "..") and len(n.encode()) <= 255))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    cli = CLI(tmp_path_factory.mktemp("openapi"))
    h = Http(cli, "--http-token-file", token_file(cli), manifest=PIPELINE + BIG)
    try:
        h.settled(done=5)
        yield h
    finally:
        h.kill()


@pytest.fixture(scope="module")
def document(live):
    """The document as the live server serves it."""
    r = live.get("/api/openapi.json")
    assert r.status_code == 200
    return schemathesis.openapi.from_dict(r.json())


def test_the_document_names_every_operation(live):
    """The list above is the document's: an operation added to the API is fuzzed too."""
    paths = live.get("/api/openapi.json").json()["paths"]
    assert {(m, p) for p, ops in paths.items() for m in ops} == set(OPERATIONS)


def fuzz(document, live, method: str, path: str, examples: int) -> None:
    op = document[path][method.upper()]
    raw = live.get("/api/openapi.json").json()["paths"][path][method]
    # invalid requests, where the operation takes anything that can be invalid
    modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if raw.get("parameters") or raw.get("requestBody")
                                         else [])
    for mode in modes:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            case.call_and_validate(base_url=live.base, headers=auth())

        check()


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m.upper()} {p}" for m, p in OPERATIONS])
def test_every_answer_matches_the_document(document, live, method, path):
    fuzz(document, live, method, path, EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m.upper()} {p}" for m, p in OPERATIONS])
def test_every_answer_matches_the_document_long(document, live, method, path):
    fuzz(document, live, method, path, 200)
