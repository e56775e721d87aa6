"""The manifest parser (SPEC section 2): defaults, version identity, durations, workdir,
and the corpus of broken manifests in tests/bad_manifests/.

The corpus: each `tests/bad_manifests/*.toml` starts with `# expect: TEXT` (a substring
the one-line error must contain) and, when the problem is inside a step, `# step: NAME`
(the step the message must name). Every file is checked three ways:
  - the pure parser raises ManifestError with that text (fast, precise failures);
  - the CLI entry point, in-process, for `validate` and for `-run`: exit 2, exactly one
    line on stderr naming the file, and no store directory created by the failed run;
  - the real CLI in a subprocess, for a sample of files that covers every kind of
    problem (a subprocess costs ~0.3 s, 2 x 100 of them would blow the time budget).
"""

from __future__ import annotations

import datetime
import math
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import run_cli
from task_pipeline import cli
from task_pipeline.errors import ManifestError
from task_pipeline.manifest import (
    MAX_SECONDS, STEP_KEYS, Manifest, Step, load_manifest, parse_manifest, version_identity,
)

ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = Path(__file__).resolve().parent / "bad_manifests"
CORPUS = sorted(CORPUS_DIR.glob("*.toml"))
EXAMPLES = sorted((ROOT / "manifests").glob("*.toml"))


def parse(text: str, **kw) -> Manifest:
    return parse_manifest(text, file="m.toml", **kw)


def one(text: str = "", **keys) -> Step:
    """A manifest of one step `s` (script `true` unless given) plus `keys`, parsed; its step."""
    keys.setdefault("script", '"true"')
    body = "\n".join(f"{k} = {v}" for k, v in keys.items())
    return parse(f'[[step]]\nname = "s"\n{body}\n{text}').steps[0]


def error(text: str | bytes, **kw) -> ManifestError:
    with pytest.raises(ManifestError) as e:
        parse_manifest(text, file="m.toml", **kw)
    return e.value


# -- defaults and accessors -------------------------------------------------------------


def test_defaults_of_a_minimal_step():
    s = one()
    assert s == Step(name="s", script="true")
    assert (s.start, s.parallel, s.inputs, s.retries, s.retry_delay, s.timeout, s.env, s.shell, s.schedule) == (
        False, None, (), 0, 1.0, None, {}, "sh", None)
    assert s.consumes == ("s",)


def test_every_key_is_read():
    m = parse('''
[pipeline]
workdir = "sub"

[[step]]
name = "fetch"
start = true
script = "echo hi"
schedule = "15m"

[[step]]
name = "Work-2"
script = "cat $INPUT_FILE"
parallel = 4
inputs = ["fetch", "*.csv", "fetch"]
retries = 2
retry_delay = 0.5
timeout = 600
env = { LANG = "C", EMPTY = "" }
shell = "bash"
''', base_dir=Path("/base"))
    fetch, work = m.steps
    assert m.names == ("fetch", "Work-2")
    assert m.start_steps == (fetch,)
    assert m.step("Work-2") is work
    assert m.workdir == Path("/base/sub")
    assert m.path == "m.toml"
    assert (fetch.start, fetch.schedule) == (True, 900.0)
    assert work.parallel == 4
    assert work.inputs == ("fetch", "*.csv")  # duplicates dropped, order kept
    assert work.consumes == ("fetch", "*.csv")
    assert (work.retries, work.retry_delay, work.timeout) == (2, 0.5, 600.0)
    assert isinstance(work.timeout, float) and isinstance(work.retry_delay, float)
    assert work.env == {"LANG": "C", "EMPTY": ""}
    assert work.shell == "bash"
    with pytest.raises(KeyError):
        m.step("nope")


def test_a_manifest_without_start_step_is_valid():
    m = parse('[[step]]\nname = "a"\nscript = "true"\n')
    assert m.start_steps == ()


def test_bytes_and_str_parse_the_same_and_a_bom_is_accepted():
    text = '[[step]]\nname = "a"\nscript = "echo é"\n'
    assert parse_manifest(text) == parse_manifest(text.encode()) == parse_manifest(b"\xef\xbb\xbf" + text.encode())
    assert parse_manifest("\ufeff" + text).steps[0].script == "echo é"


def test_names_allowed_by_the_pattern():
    m = parse("".join(f'[[step]]\nname = "{n}"\nscript = "true"\n' for n in ("a", "A1", "9-lives", "x--y-", "Done")))
    assert m.names == ("a", "A1", "9-lives", "x--y-", "Done")


def test_glob_inputs_may_contain_underscores():
    assert one(inputs='["raw_*.csv"]').inputs == ("raw_*.csv",)


# -- version identity -----------------------------------------------------------------

BASE = dict(script='"echo 1"', shell='"sh"', env='{ A = "1" }')


def ident(**changes) -> str:
    keys = {**BASE, **changes}
    start = keys.pop("start", None)
    text = "start = true\n" if start else ""
    return one(text, **keys).identity


@pytest.mark.parametrize("change", [
    dict(script='"echo 2"'),
    dict(script='"echo 1\\n"'),  # even whitespace is part of the script
    dict(shell='"bash"'),
    dict(env='{ A = "2" }'),
    dict(env='{ B = "1" }'),
    dict(env='{ A = "1", B = "" }'),
    dict(env="{}"),
])
def test_identity_changes_with_what_changes_results(change):
    assert ident(**change) != ident()


@pytest.mark.parametrize("change", [
    dict(parallel="3"),
    dict(retries="5"),
    dict(retry_delay="9.5"),
    dict(timeout="60"),
    dict(inputs='["x", "y*"]'),
    dict(start=True, schedule='"1h"'),
])
def test_identity_ignores_policy_and_routing(change):
    assert ident(**change) == ident()


def test_gathering_makes_a_new_version_and_its_policy_does_not():
    assert ident(gather="true") != ident()
    assert ident(gather="false") == ident()  # identities of steps that do not gather are what they always were
    assert ident(gather="true", settle='"30s"', on_failure='"gather"') == ident(gather="true")


def test_gather_keys_and_their_defaults():
    s = one(gather="true")
    assert (s.gather, s.settle, s.on_failure) == (True, 5.0, "wait")
    s = one(gather="true", settle='"1500ms"', on_failure='"gather"')
    assert (s.gather, s.settle, s.on_failure) == (True, 1.5, "gather")
    assert one(gather="true", settle="0").settle == 0.0
    assert not one().gather


@pytest.mark.parametrize("keys, key, text", [
    (dict(gather='"yes"'), "gather", "must be true or false, not a string ('yes')"),
    (dict(gather="true", start="true"), "gather", "a start step takes no inputs, so it has nothing to gather"),
    (dict(settle='"5s"'), "settle", "only a gather step (gather = true)"),
    (dict(on_failure='"wait"'), "on_failure", "only a gather step (gather = true)"),
    (dict(gather="true", on_failure='"wiat"'), "on_failure", 'did you mean "wait"?'),
    (dict(gather="true", on_failure="1"), "on_failure", "not an integer (1)"),
    (dict(gather="true", settle='"-1s"'), "settle", "is not a duration"),
    (dict(gather="true", settle="-1"), "settle", "must be at least 0 seconds"),
    (dict(gather="true", settle='"400d"'), "settle", "at most 365 days"),
])
def test_bad_gather_keys(keys, key, text):
    body = "".join(f"{k} = {v}\n" for k, v in keys.items())
    e = error(f'[[step]]\nname = "s"\nscript = "x"\n{body}')
    assert (e.step, e.key) == ("s", key)
    assert text in str(e)


def test_identity_is_stable_and_ignores_env_order():
    a = ident(env='{ A = "1", B = "2" }')
    assert a == ident(env='{ B = "2", A = "1" }')
    assert a == version_identity("echo 1", "sh", {"B": "2", "A": "1"})
    assert len(a) == 64 and int(a, 16) >= 0
    # Going back to an earlier script gives the earlier identity again.
    assert ident(script='"echo 1"') == ident()


def test_identity_does_not_depend_on_the_step_name():
    a = parse('[[step]]\nname = "a"\nscript = "x"\n').steps[0]
    b = parse('[[step]]\nname = "b"\nscript = "x"\n').steps[0]
    assert a.identity == b.identity


# -- durations --------------------------------------------------------------------------


@pytest.mark.parametrize("value, seconds", [
    ('"30s"', 30), ('"15m"', 900), ('"1h30m"', 5400), ('"1h 30m"', 5400), ('"1d"', 86400),
    ('"1.5h"', 5400), ('"2d12h"', 216000), ('"1500ms"', 1.5), ('" 10s "', 10),
    ("60", 60), ("90.5", 90.5), ("1", 1), ('"365d"', MAX_SECONDS),
])
def test_schedule_durations(value, seconds):
    s = one("start = true", schedule=value)
    assert s.schedule == pytest.approx(seconds)
    assert isinstance(s.schedule, float)


@pytest.mark.parametrize("value, text", [
    ('"15"', "is not a duration"), ('"m"', "is not a duration"), ('"15 minutes"', "is not a duration"),
    ('"1h30"', "is not a duration"), ('"-5m"', "is not a duration"), ('"1e3s"', "is not a duration"),
    ('"15M"', "is not a duration"), ('""', "is not a duration"),
    ('"500ms"', "at least one second"), ("0", "at least one second"), ("0.5", "at least one second"),
    ('"366d"', "at most 365 days"), ("1e300", "at most 365 days"), ("9" * 30, "at most 365 days"),
    ("inf", "not a float (inf)"), ("[1]", "not a list"), ("1979-05-27T07:32:00Z", "not a date-time"),
])
def test_bad_schedules(value, text):
    e = error(f'[[step]]\nname = "s"\nstart = true\nscript = "x"\nschedule = {value}\n')
    assert (e.step, e.key) == ("s", "schedule")
    assert text in str(e)


# -- workdir ----------------------------------------------------------------------------


def test_workdir_defaults_to_the_manifest_directory(tmp_path, monkeypatch):
    (tmp_path / "deep").mkdir()
    p = tmp_path / "deep" / "m.toml"
    p.write_text('[[step]]\nname = "a"\nscript = "true"\n')
    monkeypatch.chdir(tmp_path)  # the current directory must not matter
    assert load_manifest("deep/m.toml").workdir == (tmp_path / "deep").resolve()
    assert load_manifest(p).path == str(p)


@pytest.mark.parametrize("workdir, expect", [
    (".", "deep"), ("..", ""), ("data", "deep/data"), ("data/../x", "deep/x"), ("./", "deep"),
])
def test_workdir_is_relative_to_the_manifest(tmp_path, monkeypatch, workdir, expect):
    (tmp_path / "deep").mkdir()
    p = tmp_path / "deep" / "m.toml"
    p.write_text(f'[pipeline]\nworkdir = "{workdir}"\n[[step]]\nname = "a"\nscript = "true"\n')
    monkeypatch.chdir("/")
    assert load_manifest(p).workdir == (tmp_path / expect).resolve()


def test_absolute_workdir_is_kept(tmp_path):
    m = parse(f'[pipeline]\nworkdir = "{tmp_path}"\n[[step]]\nname = "a"\nscript = "true"\n', base_dir=Path("/elsewhere"))
    assert m.workdir == tmp_path.resolve()


def test_load_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(ManifestError, match="missing.toml: file not found") as e:
        load_manifest(tmp_path / "missing.toml")
    assert e.value.file == str(tmp_path / "missing.toml")
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path)  # a directory



@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_an_endless_file_is_refused_not_read_to_the_end():
    with pytest.raises(ManifestError, match=r"^/dev/zero: larger than 16 MiB; is this really a manifest\?$"):
        load_manifest("/dev/zero")


def test_long_names_and_keys_are_shortened_in_messages():
    long = "x" * 5000
    for text, key in [(f'[[step]]\nname = "{long}_"\nscript = "x"\n', "name"),
                      (f'[[step]]\nname = "a"\nscript = "x"\n{long} = 1\n', "x" * 60 + "..."),
                      (f'[[step]]\nname = "a"\nscript = "x"\nenv = {{ {long} = 1 }}\n', "env." + "x" * 60 + "..."),
                      (f'[[step]]\nname = "a"\nscript = "x"\ninputs = ["{long}_"]\n', "inputs")]:
        e = error(text)
        assert e.key == key
        assert len(str(e)) < 400, str(e)

# -- the examples shipped with the project --------------------------------------------


def test_there_are_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path):
    m = load_manifest(path)
    assert m.steps and m.start_steps, "an example should be runnable with a plain -run"
    assert m.workdir == path.parent.resolve()
    assert len(set(m.names)) == len(m.names)
    for s in m.steps:
        assert s.script.strip() and len(s.identity) == 64


# -- errors: located, one line, never anything but ManifestError ----------------------


def test_error_carries_file_step_and_key():
    e = error('[[step]]\nname = "ok"\nscript = "x"\n[[step]]\nname = "bad"\nscript = "x"\nretries = -2\n')
    assert (e.file, e.step, e.key) == ("m.toml", "bad", "retries")
    assert str(e) == "m.toml: step 'bad': key 'retries': must be zero or more (got -2)"


def test_a_step_without_a_usable_name_is_named_by_position():
    e = error('[[step]]\nname = "a"\nscript = "x"\n[[step]]\nname = 7\nscript = "x"\n')
    assert (e.step, e.key) == ("#2", "name")


def test_unknown_key_suggests_the_closest():
    e = error('[[step]]\nname = "a"\nscript = "x"\ntimout = 5\n')
    assert (e.step, e.key) == ("a", "timout")
    assert str(e).endswith("did you mean 'timeout'?")


@pytest.mark.parametrize("key", STEP_KEYS)
def test_every_step_key_rejects_a_wrong_type(key):
    # A date is the wrong type for every key.
    keys = {"name": '"s"', "script": '"x"', "start": "true" if key == "schedule" else "false", key: "1979-05-27"}
    e = error("[[step]]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))
    assert e.key == key
    assert "not a date (1979-05-27)" in str(e)


@pytest.mark.parametrize("text, escaped", [
    ('[[step]]\nname = "a\\nb"\nscript = "x"\n', "a\\nb"),
    ('[[step]]\nname = "a\\rb"\nscript = "x"\n', "a\\rb"),
    ('[[step]]\nname = "a\\u2028b"\nscript = "x"\n', "a\\u2028b"),
    ('[[step]]\nname = "a\\u202eb"\nscript = "x"\n', "a\\u202eb"),  # a bidi override could disguise the message
    ('[[step]]\nname = "a"\nscript = "x"\n"x\\ny" = 1\n', "x\\ny"),
    ('[[step]]\nname = "a"\nscript = "x"\nenv = { "K\\u0085" = 1 }\n', "K\\x85"),
    ('[[step]]\nname = "a"\nstart = true\nscript = "x"\nschedule = "1\\u000bm"\n', "1\\x0bm"),
])
def test_messages_stay_on_one_line(text, escaped):
    e = error(text)
    assert len(str(e).splitlines()) == 1
    assert escaped in str(e)
    assert str(e).isprintable()


def test_hostile_numbers_and_nesting_give_manifest_errors():
    assert "too many digits" in str(error('[[step]]\nname = "a"\nscript = "x"\nretries = ' + "9" * 5000))
    assert "nested too deeply" in str(error("a = " + "[" * 5000 + "]" * 5000))
    assert "nested too deeply" in str(error("a = " + "{b = " * 3000 + "1" + "}" * 3000))
    for key in ("retry_delay", "timeout"):
        e = error(f'[[step]]\nname = "a"\nscript = "x"\n{key} = {"9" * 400}\n')
        assert e.key == key and "at most 365 days" in str(e)
    e = error('[[step]]\nname = "a"\nscript = "x"\nparallel = -' + "9" * 400)
    assert e.key == "parallel" and str(e).endswith("must be at least 1")


def test_not_utf8_names_the_byte():
    e = error(b'[[step]]\nname = "caf\xe9"\n')
    assert str(e) == "m.toml: not UTF-8 text: byte 0xe9 at line 2, column 12; save the manifest as UTF-8"
    assert "byte 0xff at line 1, column 1;" in str(error(b"\xff"))
    assert "byte 0xc3 at line 3, column 2;" in str(error(b"\n\n \xc3"))  # a truncated sequence
    assert "not UTF-8" in str(error("a = '\udcff'"))  # a str with a lone surrogate


def test_zero_byte_manifest():
    assert str(error(b"")) == "m.toml: no steps: add at least one [[step]] with a name and a script"


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_numbers_are_rejected(value):
    text = {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
    for key in ("retry_delay", "timeout"):
        e = error(f'[[step]]\nname = "a"\nscript = "x"\n{key} = {text}\n')
        assert e.key == key and f"not a float ({text})" in str(e)


def test_date_types_are_described():
    e = error('[[step]]\nname = "a"\nscript = 07:32:00\n')
    assert "not a time (07:32:00)" in str(e)
    e = error('[[step]]\nname = "a"\nscript = 1979-05-27T07:32:00\n')
    assert f"not a date-time ({datetime.datetime(1979, 5, 27, 7, 32).isoformat()})" in str(e)


# -- the corpus of broken manifests ---------------------------------------------------


def expectation(path: Path) -> tuple[str, str | None]:
    lines = path.read_bytes().split(b"\n")
    first = lines[0].decode("ascii")
    assert first.startswith("# expect: "), f"{path.name}: the first line must be '# expect: TEXT'"
    step = None
    if len(lines) > 1 and lines[1].startswith(b"# step: "):
        step = lines[1].decode()[len("# step: "):]
    return first[len("# expect: "):], step


def test_corpus_is_big_enough_and_well_formed():
    assert len(CORPUS) >= 45
    for p in CORPUS:
        text, _ = expectation(p)
        assert text.strip(), p.name


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_corpus_parser(path):
    text, step = expectation(path)
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    msg = str(e.value)
    assert text in msg
    assert msg.startswith(f"{path}: ")
    assert len(msg.splitlines()) == 1
    if step is not None:
        assert e.value.step == step and f": step '{step}': " in msg
    if text.startswith("key '"):
        assert e.value.key == text[5:text.index("'", 5)]


def check_cli_failure(path: Path, code: int, err: str, db: Path) -> None:
    text, step = expectation(path)
    assert code == 2, err
    assert "Traceback" not in err
    assert err.endswith("\n") and len(err.splitlines()) == 1, repr(err)
    assert err.startswith("task-pipeline: ")
    assert str(path) in err and text in err
    if step is not None:
        assert f"step '{step}'" in err
    assert not db.exists(), "a failed -run must not create a store"


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_corpus_cli_in_process(path, tmp_path, capsys):
    db = tmp_path / "db"
    for argv in (["validate", "-manifest", str(path), "-db", str(db)],
                 ["-manifest", str(path), "-db", str(db), "-run"],
                 ["run", "--manifest", str(path), "--db", str(db), "-quiet"]):
        code = cli.main(argv)
        captured = capsys.readouterr()
        assert captured.out == ""
        check_cli_failure(path, code, captured.err, db)


# One file of every kind of problem, run as a user would: a real subprocess.
SUBPROCESS_SAMPLE = [
    "syntax_unquoted_string", "syntax_nested_too_deep", "not_utf8", "empty_manifest", "step_single_table",
    "unknown_scirpt", "unknown_pipline", "name_underscore", "name_newline", "name_duplicate", "inputs_done",
    "parallel_zero", "timeout_nan", "env_value_int", "schedule_not_start", "script_nul",
]


def test_corpus_cli_subprocess(tmp_path):
    paths = [CORPUS_DIR / f"{stem}.toml" for stem in SUBPROCESS_SAMPLE]
    assert all(p.exists() for p in paths)
    empty = tmp_path / "zero_bytes.toml"
    empty.write_bytes(b"")
    jobs = []
    for i, p in enumerate(paths):
        db = tmp_path / f"db{i}"
        jobs.append((p, db, ["validate", "-manifest", p]))
        jobs.append((p, db, ["-manifest", p, "-db", db, "-run"]))

    def go(job):
        return run_cli(*job[2], cwd=tmp_path, timeout=60)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(go, jobs))
        zero = pool.submit(run_cli, "-manifest", empty, "-db", tmp_path / "dbz", "-run", cwd=tmp_path).result()
    for (p, db, _), r in zip(jobs, results):
        assert r.stdout == b""
        check_cli_failure(p, r.returncode, r.stderr.decode(), db)
    assert zero.returncode == 2 and zero.stderr.decode() == f"task-pipeline: {empty}: no steps: add at least one [[step]] with a name and a script\n"
    assert not (tmp_path / "dbz").exists()
    assert not (tmp_path / "db").exists()  # the default ./db was not created either


def test_valid_manifest_passes_validate(tmp_path):
    r = run_cli("validate", "-manifest", EXAMPLES[0], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    assert b"valid" in r.stdout
    assert isinstance(r, subprocess.CompletedProcess)
