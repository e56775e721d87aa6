"""The manifest: reading and validating the TOML file that names the steps (SPEC section 2).

Pure apart from reading the file: `parse_manifest` turns text into a validated
`Manifest` or raises one `ManifestError` naming file, step and key. A step's
version identity (what makes a new version) is defined here too.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from task_pipeline.errors import ManifestError
from task_pipeline.routing import is_glob

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
RESERVED_NAMES = {"done"}

STEP_KEYS = (
    "name", "start", "script", "parallel", "inputs", "retries", "retry_delay",
    "timeout", "env", "shell", "schedule",
)
PIPELINE_KEYS = ("workdir",)
TOP_KEYS = ("pipeline", "step")

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_RETRY_DELAY = 3600.0


@dataclass(frozen=True)
class Step:
    name: str
    script: str
    start: bool = False
    parallel: int | None = None
    inputs: tuple[str, ...] = ()
    retries: int = 0
    retry_delay: float = 1.0
    timeout: float | None = None
    env: dict[str, str] = field(default_factory=dict, hash=False)
    shell: str = "sh"
    schedule: float | None = None  # seconds between daemon ticks

    @property
    def identity(self) -> str:
        """Hash of what changes results: script, shell and env. Nothing else makes a version."""
        return version_identity(self.script, self.shell, self.env)

    @property
    def consumes(self) -> tuple[str, ...]:
        return self.inputs or (self.name,)


@dataclass(frozen=True)
class Manifest:
    path: str
    workdir: Path
    steps: tuple[Step, ...]

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps)

    @property
    def start_steps(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.start)


def version_identity(script: str, shell: str, env: dict[str, str]) -> str:
    blob = json.dumps({"script": script, "shell": shell, "env": env}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_manifest(path: str | Path) -> Manifest:
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ManifestError("file not found; pass the manifest with -manifest PATH", file=str(p)) from None
    except OSError as e:
        raise ManifestError(f"cannot read: {e.strerror}", file=str(p)) from None
    return parse_manifest(data, file=str(p), base_dir=p.resolve().parent)


def parse_manifest(data: bytes | str, *, file: str = "manifest.toml", base_dir: Path | None = None) -> Manifest:
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ManifestError(f"not UTF-8 text (byte {e.start}); save the manifest as UTF-8", file=file) from None
    else:
        text = data
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"invalid TOML: {e}", file=file) from None
    base_dir = base_dir or Path.cwd()
    _check_keys(doc, TOP_KEYS, file=file, step=None, what="top-level table")

    pipeline = doc.get("pipeline", {})
    if not isinstance(pipeline, dict):
        raise ManifestError("must be a table: [pipeline]", file=file, key="pipeline")
    _check_keys(pipeline, PIPELINE_KEYS, file=file, step=None, what="[pipeline]")
    workdir = base_dir
    if "workdir" in pipeline:
        wd = pipeline["workdir"]
        if not isinstance(wd, str) or not wd:
            raise ManifestError("must be a non-empty string (a directory)", file=file, key="pipeline.workdir")
        workdir = (base_dir / wd).resolve()

    raw_steps = doc.get("step")
    if raw_steps is None:
        raise ManifestError("no steps: add at least one [[step]] with a name and a script", file=file)
    if not isinstance(raw_steps, list) or not all(isinstance(s, dict) for s in raw_steps):
        raise ManifestError("must be an array of tables, written [[step]]", file=file, key="step")
    if not raw_steps:
        raise ManifestError("no steps: add at least one [[step]] with a name and a script", file=file)

    steps: list[Step] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_steps):
        step = _parse_step(raw, i, file)
        if step.name in seen:
            raise ManifestError("duplicate step name; step names must be unique", file=file, step=step.name, key="name")
        seen.add(step.name)
        steps.append(step)
    return Manifest(path=file, workdir=workdir, steps=tuple(steps))


def _check_keys(table: dict, allowed: tuple[str, ...], *, file: str, step: str | None, what: str) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; allowed keys: {', '.join(allowed)}"
            raise ManifestError(f"unknown key in {what}{hint}", file=file, step=step, key=key)


def _parse_step(raw: dict, index: int, file: str) -> Step:
    label = raw.get("name") if isinstance(raw.get("name"), str) and raw.get("name") else f"#{index + 1}"

    def err(key: str, msg: str) -> ManifestError:
        return ManifestError(msg, file=file, step=label, key=key)

    _check_keys(raw, STEP_KEYS, file=file, step=label, what="[[step]]")
    if "name" not in raw:
        raise err("name", "missing; every step needs a name")
    name = raw["name"]
    if not isinstance(name, str):
        raise err("name", f"must be a string, not {_type(name)}")
    if not NAME_RE.match(name):
        raise err("name", "must match [A-Za-z0-9][A-Za-z0-9-]* (routing could never reach a name with '_', '.' or spaces)")
    if name in RESERVED_NAMES:
        raise err("name", "'done' is reserved for terminal outputs; choose another name")

    if "script" not in raw:
        raise err("script", "missing; every step needs a script")
    script = raw["script"]
    if not isinstance(script, str):
        raise err("script", f"must be a string, not {_type(script)}")
    if not script.strip():
        raise err("script", "is empty")

    start = raw.get("start", False)
    if not isinstance(start, bool):
        raise err("start", f"must be true or false, not {_type(start)}")

    parallel = raw.get("parallel")
    if parallel is not None:
        if not _is_int(parallel):
            raise err("parallel", f"must be an integer, not {_type(parallel)}")
        if parallel < 1:
            raise err("parallel", f"must be at least 1 (got {parallel})")

    inputs = raw.get("inputs")
    if inputs is None:
        inputs_t: tuple[str, ...] = ()
    else:
        if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
            raise err("inputs", "must be a list of strings (route keys or file-name globs)")
        if not inputs:
            raise err("inputs", "is empty; leave it out to consume the step's own name")
        for pat in inputs:
            if not pat:
                raise err("inputs", "contains an empty string")
            if pat == "done":
                raise err("inputs", "'done' is terminal and cannot be consumed; route to another key")
            if not is_glob(pat) and "_" in pat:
                raise err("inputs", f"'{pat}' can never match: a route key is the part of the file name before the first '_' (use a glob like '{pat}*' to match whole names)")
        if start:
            raise err("inputs", "a start step takes no inputs; remove 'inputs' or 'start'")
        inputs_t = tuple(dict.fromkeys(inputs))

    retries = raw.get("retries", 0)
    if not _is_int(retries):
        raise err("retries", f"must be an integer, not {_type(retries)}")
    if retries < 0:
        raise err("retries", f"must not be negative (got {retries})")

    retry_delay = raw.get("retry_delay", 1.0)
    if not _is_number(retry_delay):
        raise err("retry_delay", f"must be a number of seconds, not {_type(retry_delay)}")
    if retry_delay < 0:
        raise err("retry_delay", f"must not be negative (got {retry_delay})")

    timeout = raw.get("timeout")
    if timeout is not None:
        if not _is_number(timeout):
            raise err("timeout", f"must be a number of seconds, not {_type(timeout)}")
        if timeout <= 0:
            raise err("timeout", f"must be positive (got {timeout})")

    env = raw.get("env", {})
    if not isinstance(env, dict):
        raise err("env", f"must be a table of strings, like env = {{ LANG = \"C\" }}, not {_type(env)}")
    for k, v in env.items():
        if not isinstance(v, str):
            raise err(f"env.{k}", f"must be a string, not {_type(v)} (quote it)")
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise err(f"env.{k}", "is not a valid environment variable name")

    shell = raw.get("shell", "sh")
    if not isinstance(shell, str) or not shell.strip():
        raise err("shell", "must be a non-empty string naming an interpreter, like \"bash\"")

    schedule = raw.get("schedule")
    sched_s: float | None = None
    if schedule is not None:
        if not start:
            raise err("schedule", "only a start step (start = true) can have a schedule")
        sched_s = _parse_duration(schedule, err)

    return Step(
        name=name, script=script, start=start, parallel=parallel, inputs=inputs_t,
        retries=retries, retry_delay=float(retry_delay), timeout=None if timeout is None else float(timeout),
        env=dict(env), shell=shell, schedule=sched_s,
    )


def _parse_duration(value, err) -> float:
    if _is_number(value):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        pos, seconds = 0, 0.0
        for m in _DURATION_RE.finditer(text):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            pos = m.end()
        if pos != len(text) or not text:
            raise err("schedule", f"'{value}' is not a duration; write e.g. \"30s\", \"15m\", \"1h30m\" or \"1d\"")
    else:
        raise err("schedule", f"must be a duration like \"15m\", not {_type(value)}")
    if seconds < 1:
        raise err("schedule", f"must be at least one second (got {value!r})")
    return seconds


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and v not in (float("inf"), float("-inf"))


def _type(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(v), type(v).__name__)
