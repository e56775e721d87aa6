"""Property tests: whatever a manifest contains, the parser either returns a valid Manifest
or raises ManifestError with a one-line message, and the CLI never shows a traceback.

Kept small (a few hundred examples in all) so the file runs in a few seconds; raise
`max_examples` locally to search harder.
"""

from __future__ import annotations

import datetime
import re
import string
from concurrent.futures import ThreadPoolExecutor

import pytest
import tomli_w
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import ROOT, run_cli
from task_pipeline.errors import ManifestError
from task_pipeline.manifest import INT_MAX, MAX_SECONDS, NAME_RE, Manifest, parse_manifest

FILE = "fuzz.toml"
QUICKSTART = (ROOT / "manifests" / "quickstart.toml").read_bytes()
FAST = settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies ---------------------------------------------------------------------------

names = st.one_of(
    st.sampled_from(["fetch", "work", "done", "a_b", "a.b", "-x", "", "Work-2", "fetch"]),
    st.text(alphabet=string.ascii_letters + string.digits + "-_. \n", max_size=8),
    st.text(max_size=6),
)
durations = st.one_of(
    st.sampled_from(["30s", "15m", "1h30m", "1d", "0s", "500ms", "400d", "x", "", "1e3s", "9" * 400 + "s"]),
    st.from_regex(r"\A( ?\d{1,4}(\.\d)?(ms|s|m|h|d|x)?){0,3}\Z"),
)
timestamps = st.one_of(st.datetimes(), st.dates(), st.times(),
                       st.datetimes(timezones=st.just(datetime.timezone.utc)))
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, INT_MAX, INT_MAX + 1, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    timestamps,
)
anything = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.text(max_size=6), inner, max_size=3),
), max_leaves=8)

# For each key, plausible values (so that generation gets past the first checks) or anything at all.
PLAUSIBLE = {
    "name": names,
    "start": st.booleans(),
    "script": st.one_of(st.just("echo hi > $OUTPUT_DIR/done"), st.text(max_size=20)),
    "parallel": st.integers(-3, 10),
    "inputs": st.lists(st.one_of(names, st.sampled_from(["*.csv", "raw_*", "done", "x_y"])), max_size=3),
    "retries": st.integers(-3, 10),
    "retry_delay": st.one_of(st.integers(-3, 10), st.floats(-5, 1e10)),
    "timeout": st.one_of(st.integers(-3, 10**9), st.floats(allow_nan=True)),
    "env": st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5), anything), max_size=3),
    "shell": st.sampled_from(["sh", "bash", "", " ", "bash -e", "python3", "sh\0"]),
    "schedule": st.one_of(durations, st.integers(-10, 10**12), st.floats(allow_nan=True)),
}
MISSPELT = ["scirpt", "paralel", "input", "retry", "timout", "Name", "workdir", ""]
steps = st.fixed_dictionaries(
    {},
    optional={**{k: st.one_of(v, anything) for k, v in PLAUSIBLE.items()},
              **{k: anything for k in MISSPELT}},
)
pipelines = st.fixed_dictionaries({}, optional={"workdir": st.one_of(st.sampled_from([".", "..", "sub", ""]), anything),
                                                "work_dir": anything})
documents = st.fixed_dictionaries(
    {},
    optional={"step": st.one_of(st.lists(steps, max_size=4), anything),
              "pipeline": st.one_of(pipelines, anything),
              "steps": anything, "pipline": anything, "name": anything},
)


def mutate(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """Replace data[i:i+n] with b at each (i, n, b)."""
    for i, n, b in edits:
        i %= len(data) + 1
        data = data[:i] + b + data[i + n:]
    return data


edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 8), st.binary(max_size=6)), min_size=1, max_size=6)

# -- checks -------------------------------------------------------------------------------


def check(data: bytes | str) -> Manifest | None:
    """Parse; only ManifestError may escape, its message one printable line; a result is valid."""
    try:
        m = parse_manifest(data, file=FILE)
    except ManifestError as e:
        msg = str(e)
        assert msg.startswith(f"{FILE}: ")
        assert len(msg.splitlines()) == 1 and msg.isprintable(), repr(msg)
        assert e.file == FILE
        return None
    check_valid(m)
    return m


def check_valid(m: Manifest) -> None:
    assert m.steps
    assert len(set(m.names)) == len(m.names)
    for s in m.steps:
        assert NAME_RE.match(s.name) and s.name != "done"
        assert isinstance(s.script, str) and s.script.strip() and "\0" not in s.script
        assert s.parallel is None or 1 <= s.parallel <= INT_MAX
        assert 0 <= s.retries <= INT_MAX
        assert 0 <= s.retry_delay <= MAX_SECONDS
        assert s.timeout is None or 0 < s.timeout <= MAX_SECONDS
        assert s.schedule is None or (s.start and 1 <= s.schedule <= MAX_SECONDS)
        assert not (s.start and s.inputs)
        assert all(p and p != "done" for p in s.inputs)
        assert s.shell.strip() and not re.search(r"\s", s.shell)
        assert all(isinstance(k, str) and isinstance(v, str) and k and "=" not in k for k, v in s.env.items())
        assert re.fullmatch(r"[0-9a-f]{64}", s.identity)


# -- properties ---------------------------------------------------------------------------


@FAST
@given(documents)
def test_random_documents(doc):
    check(tomli_w.dumps(doc))
    check(tomli_w.dumps(doc).encode())


@FAST
@given(st.lists(steps, min_size=1, max_size=3))
def test_random_steps(raw_steps):
    check(tomli_w.dumps({"step": raw_steps}))


@FAST
@given(st.fixed_dictionaries({k: v for k, v in PLAUSIBLE.items() if k in ("name", "script")},
                             optional={k: v for k, v in PLAUSIBLE.items() if k not in ("name", "script")}))
def test_plausible_steps_are_often_valid_and_always_consistent(raw):
    check(tomli_w.dumps({"step": [raw]}))


valid_names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9-]{0,10}\Z").filter(lambda n: n != "done")
valid_steps = st.fixed_dictionaries(
    {"name": valid_names, "script": st.text(min_size=1, max_size=30).filter(lambda t: t.strip() and "\0" not in t)},
    optional={
        "parallel": st.integers(1, 2**63 - 1),
        "inputs": st.lists(st.one_of(st.from_regex(r"\A[a-z.-]{1,6}\Z"), st.sampled_from(["*.csv", "raw_*", "?"])),
                           min_size=1, max_size=3).filter(lambda xs: "done" not in xs),
        "retries": st.integers(0, 2**63 - 1),
        "retry_delay": st.one_of(st.integers(0, 3600), st.floats(0, MAX_SECONDS)),
        "timeout": st.one_of(st.integers(1, 86400), st.floats(0.001, MAX_SECONDS)),
        "env": st.dictionaries(st.from_regex(r"\A[A-Z_][A-Z0-9_]{0,5}\Z"),
                               st.text(max_size=8).filter(lambda t: "\0" not in t), max_size=3),
        "shell": st.sampled_from(["sh", "bash", "python3", "/bin/sh"]),
    },
)


@FAST
@given(valid_steps, st.booleans(), st.one_of(st.none(), st.integers(1, 86400), st.sampled_from(["30s", "1h30m", "2d"])))
def test_valid_steps_are_accepted_as_written(raw, start, schedule):
    if start:
        raw = {**raw, "start": True}
        raw.pop("inputs", None)
        if schedule is not None:
            raw["schedule"] = schedule
    m = check(tomli_w.dumps({"step": [raw]}))
    assert m is not None, raw
    (s,) = m.steps
    assert s.name == raw["name"] and s.script == raw["script"] and s.start == start
    assert s.parallel == raw.get("parallel")
    assert s.inputs == tuple(dict.fromkeys(raw.get("inputs", ())))
    assert s.retries == raw.get("retries", 0)
    assert s.retry_delay == raw.get("retry_delay", 1.0)
    assert s.timeout == raw.get("timeout")
    assert s.env == raw.get("env", {}) and s.shell == raw.get("shell", "sh")
    assert (s.schedule is None) == (raw.get("schedule") is None)


@FAST
@given(st.binary(max_size=200))
@example(b"\xff\xfe")
@example(b"\xef\xbb\xbf")
@example(b"a = " + b"[" * 4000)
@example(b"[[step]]\nname = \"a\\u0000\"")
def test_random_bytes(data):
    check(data)


@FAST
@given(st.text(max_size=200))
def test_random_text(text):
    check(text)


@FAST
@given(edits)
def test_mutated_example(e):
    check(mutate(QUICKSTART, e))


def test_the_unmutated_example_is_valid():
    assert check(QUICKSTART) is not None  # the mutation test starts from a valid manifest


def test_check_notices_a_bad_message(monkeypatch):
    # The property helper itself must be able to fail: a multi-line message is caught.
    import task_pipeline.manifest as manifest_module

    monkeypatch.setattr(manifest_module, "_oneline", lambda s: s)
    with pytest.raises(AssertionError):
        check('[[step]]\nname = "a\\nb"\nscript = "x"\n')


# -- the real CLI on random input -------------------------------------------------------


@settings(max_examples=1, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.one_of(st.binary(max_size=120), edits.map(lambda e: mutate(QUICKSTART, e))), min_size=25, max_size=25))
def test_validate_never_shows_a_traceback(tmp_path, inputs):
    # 25 random manifests in one example, validated concurrently: a subprocess costs ~0.3 s.
    paths = []
    for i, data in enumerate(inputs):
        paths.append(tmp_path / f"random{i}.toml")
        paths[-1].write_bytes(data)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda p: run_cli("validate", "-manifest", p, cwd=tmp_path, timeout=60), paths))
    for path, r in zip(paths, results):
        err = r.stderr.decode("utf-8", "replace")
        assert r.returncode in (0, 2), err
        assert "Traceback" not in err
        assert len(err.splitlines()) <= 1, err
        if r.returncode == 2:
            assert err.startswith(f"task-pipeline: {path}: ")
        else:
            assert err == "" and b"valid" in r.stdout
        # The CLI and the parser agree.
        assert (r.returncode == 0) == (check(path.read_bytes()) is not None)
