"""The manifest: reading and validating the TOML file that names the steps (SPEC section 2).

Pure apart from reading the file: `parse_manifest` turns text into a validated
`Manifest` or raises one `ManifestError` naming file, step and key. A step's
version identity (what makes a new version) is defined here too.
"""

from __future__ import annotations

import datetime
import difflib
import hashlib
import math
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from task_pipeline.errors import ManifestError
from task_pipeline.gathering import DEFAULT_SETTLE, ON_FAILURE
from task_pipeline.routing import is_glob

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
RESERVED_NAMES = {"done"}

STEP_KEYS = (
    "name", "start", "script", "parallel", "inputs", "retries", "retry_delay",
    "timeout", "env", "shell", "schedule", "gather", "settle", "on_failure",
)
PIPELINE_KEYS = ("workdir",)
TOP_KEYS = ("pipeline", "step")

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_TOML_HINTS = (  # tomllib's message fragment -> what the user most likely has to do
    ("at end of document", "; the file ends inside a value: close the array, table or string that is still open"),
    ("Invalid value", "; is a string missing its quotes? e.g. script = \"echo hi\""),
    ("Cannot overwrite a value", "; a key may appear once per table, and [step] cannot be mixed with [[step]]"),
    ("Cannot declare", "; a table may be declared once (write [[step]] for each step)"),
    ("Unterminated string", "; close the string with its opening quote"),
    ("Illegal character '\\n'", "; a \"string\" must end on its line (use '''...''' for a script of several lines)"),
    ("Unescaped '\\'", "; write \\\\ for a backslash, or use a 'literal string'"),
    ("Unclosed", "; close the array or inline table"),
)
MAX_SECONDS = 365 * 86400.0  # longest timeout, retry_delay or schedule: beyond it a value is surely a mistake
_MAX_TEXT = "365 days (31536000 seconds)"
MAX_MANIFEST_BYTES = 16 << 20
MAX_SHOWN = 60  # characters of a name or key quoted in a message
INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # TOML integers are 64-bit; tomllib accepts more


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
    gather: bool = False           # one task over every current output routed to it (gathering.py)
    settle: float = DEFAULT_SETTLE  # gather steps under `serve`: seconds the set must stay unchanged
    on_failure: str = "wait"       # gather steps: "wait" while an upstream task failed, or "gather" what succeeded

    @property
    def identity(self) -> str:
        """Hash of what changes results: script, shell, env, and whether the step gathers (the same
        script given one input or a directory of them computes something else). Nothing else makes
        a version."""
        return version_identity(self.script, self.shell, self.env, self.gather)

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


def version_identity(script: str, shell: str, env: dict[str, str], gather: bool = False) -> str:
    fields: dict = {"script": script, "shell": shell, "env": env}
    if gather:  # only when set, so that the identities of every other step stay what they always were
        fields["gather"] = True
    blob = json.dumps(fields, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_manifest(path: str | Path) -> Manifest:
    try:
        return _load(Path(path))
    except ManifestError as e:
        raise _clean(e) from None


def _load(p: Path) -> Manifest:
    try:
        with p.open("rb") as f:  # bounded: -manifest /dev/zero must not eat the memory
            data = f.read(MAX_MANIFEST_BYTES + 1)
        base_dir = p.resolve().parent
    except FileNotFoundError:
        raise ManifestError("file not found; pass the manifest with -manifest PATH", file=str(p)) from None
    except OSError as e:
        raise ManifestError(f"cannot read: {e.strerror or e}", file=str(p)) from None
    except (RuntimeError, ValueError) as e:  # a symlink loop on some Pythons, a NUL byte in the path
        raise ManifestError(f"cannot read: {e}", file=str(p)) from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"larger than {MAX_MANIFEST_BYTES >> 20} MiB; is this really a manifest?", file=str(p))
    return _parse(data, str(p), base_dir)


def parse_manifest(data: bytes | str, *, file: str = "manifest.toml", base_dir: Path | None = None) -> Manifest:
    """Validate a manifest; any problem raises ManifestError with a one-line message, nothing else."""
    try:
        return _parse(data, file, base_dir)
    except ManifestError as e:
        # Names, keys and values come from the file: never let them break the one-line message.
        raise _clean(e) from None


def _parse(data: bytes | str, file: str, base_dir: Path | None) -> Manifest:
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            column = e.start - data.rfind(b"\n", 0, e.start)
            raise ManifestError(f"not UTF-8 text: byte 0x{data[e.start]:02x} at line {line}, column {column}; "
                                "save the manifest as UTF-8", file=file) from None
    else:
        text = data
    text = text.removeprefix("\ufeff")  # a byte-order mark (Windows editors write one) is harmless
    if isinstance(data, str):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ManifestError(f"not UTF-8 text (character {e.start}); save the manifest as UTF-8", file=file) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        hint = next((h for k, h in _TOML_HINTS if k in msg), "")
        raise ManifestError(f"invalid TOML: {msg}{hint}", file=file) from None
    except ValueError:  # tomllib reads integers of any size, up to Python's 4300-digit limit
        raise ManifestError("invalid TOML: a number has too many digits", file=file) from None
    except RecursionError:
        raise ManifestError("invalid TOML: arrays or tables nested too deeply", file=file) from None
    base_dir = base_dir or Path.cwd()
    _check_keys(doc, TOP_KEYS, file=file, step=None, what="top-level table")

    pipeline = doc.get("pipeline", {})
    if not isinstance(pipeline, dict):
        raise ManifestError("must be a table: [pipeline]", file=file, key="pipeline")
    _check_keys(pipeline, PIPELINE_KEYS, file=file, step=None, what="[pipeline]")
    workdir = base_dir
    if "workdir" in pipeline:
        wd = pipeline["workdir"]
        if not isinstance(wd, str) or not wd or "\0" in wd:
            raise ManifestError(f"must be a non-empty string (a directory), not {_describe(wd)}", file=file,
                                key="pipeline.workdir")
        try:
            workdir = (base_dir / wd).resolve()
        except (OSError, RuntimeError, ValueError) as e:
            raise ManifestError(f"cannot resolve the directory: {e}", file=file, key="pipeline.workdir") from None

    raw_steps = doc.get("step")
    if raw_steps is None:
        raise ManifestError("no steps: add at least one [[step]] with a name and a script", file=file)
    if isinstance(raw_steps, dict):
        raise ManifestError("is a single table; write each step as [[step]] (double brackets)", file=file, key="step")
    if not isinstance(raw_steps, list) or not all(isinstance(s, dict) for s in raw_steps):
        raise ManifestError(f"must be an array of tables, written [[step]], not {_describe(raw_steps)}", file=file,
                            key="step")
    if not raw_steps:
        raise ManifestError("no steps: add at least one [[step]] with a name and a script", file=file)

    steps: list[Step] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_steps):
        step = _parse_step(raw, i, file)
        if step.name in seen:
            raise ManifestError(f"duplicate step name (step #{i + 1} repeats an earlier one); step names must be unique",
                                file=file, step=_short(step.name), key="name")
        seen.add(step.name)
        steps.append(step)
    return Manifest(path=file, workdir=workdir, steps=tuple(steps))


def _check_keys(table: dict, allowed: tuple[str, ...], *, file: str, step: str | None, what: str) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            if close:
                hint = f"; did you mean '{close[0]}'?"
            elif allowed is TOP_KEYS and key in STEP_KEYS:
                hint = "; step keys belong inside a [[step]] table"
            elif allowed is STEP_KEYS and key in PIPELINE_KEYS:
                hint = f"; '{key}' belongs in the [pipeline] table"
            else:
                hint = f"; allowed keys: {', '.join(allowed)}"
            raise ManifestError(f"unknown key in {what}{hint}", file=file, step=step, key=_short(key))


def _parse_step(raw: dict, index: int, file: str) -> Step:
    label = _short(raw["name"]) if isinstance(raw.get("name"), str) and raw["name"] else f"#{index + 1}"

    def err(key: str, msg: str) -> ManifestError:
        return ManifestError(msg, file=file, step=label, key=key)

    def integer(key: str, default, minimum: int, what: str):
        v = raw.get(key, default)
        if v is None:
            return None
        if not _is_int(v):
            raise err(key, f"must be an integer, not {_describe(v)}")
        if v < minimum:
            raise err(key, f"must be {what} (got {v})" if INT_MIN <= v else f"must be {what}")
        if v > INT_MAX:
            raise err(key, "is too large for a 64-bit integer")
        return v

    def seconds(key: str, v, *, positive: bool) -> float:
        if not _is_number(v):
            raise err(key, f"must be a number of seconds, not {_describe(v)}")
        if v < 0 or (positive and v == 0):
            raise err(key, f"must be {'positive' if positive else 'zero or more'} (got {_describe_num(v)})")
        if v > MAX_SECONDS:
            raise err(key, f"must be at most {_MAX_TEXT}")
        return float(v)

    _check_keys(raw, STEP_KEYS, file=file, step=label, what="[[step]]")
    if "name" not in raw:
        raise err("name", "missing; every step needs a name")
    name = raw["name"]
    if not isinstance(name, str):
        raise err("name", f"must be a string, not {_describe(name)}")
    if not NAME_RE.match(name):
        raise err("name", f"{_short(name)!r} must match [A-Za-z0-9][A-Za-z0-9-]*: letters, digits and '-' (routing could never reach a name with '_', '.' or spaces)")
    if name in RESERVED_NAMES:
        raise err("name", "'done' is reserved for terminal outputs; choose another name")

    if "script" not in raw:
        raise err("script", "missing; every step needs a script")
    script = raw["script"]
    if not isinstance(script, str):
        raise err("script", f"must be a string, not {_describe(script)}")
    if not script.strip():
        raise err("script", "is empty; give the shell commands the step runs")
    if "\0" in script:
        raise err("script", "contains a NUL character, which no shell can run")

    start = raw.get("start", False)
    if not isinstance(start, bool):
        raise err("start", f"must be true or false, not {_describe(start)}")

    parallel = integer("parallel", None, 1, "at least 1")
    inputs = raw.get("inputs")
    if inputs is None:
        inputs_t: tuple[str, ...] = ()
    else:
        if not isinstance(inputs, list):
            raise err("inputs", f"must be a list of strings (route keys or file-name globs), like inputs = [\"{name}\"], not {_describe(inputs)}")
        for x in inputs:
            if not isinstance(x, str):
                raise err("inputs", f"must be a list of strings (route keys or file-name globs), not a list containing {_describe(x)}")
        if not inputs:
            raise err("inputs", "is empty; leave it out to consume the step's own name")
        for pat in inputs:
            if not pat:
                raise err("inputs", "contains an empty string")
            if pat == "done":
                raise err("inputs", "'done' is terminal and cannot be consumed; route to another key")
            if not is_glob(pat) and "_" in pat:
                raise err("inputs", f"'{_short(pat)}' can never match: a route key is the part of the file name before the first '_' (use a glob like '{_short(pat)}*' to match whole names)")
        if start:
            raise err("inputs", "a start step takes no inputs; remove 'inputs' or 'start'")
        inputs_t = tuple(dict.fromkeys(inputs))

    retries = integer("retries", 0, 0, "zero or more")
    retry_delay = seconds("retry_delay", raw.get("retry_delay", 1.0), positive=False)
    timeout = raw.get("timeout")
    if timeout is not None:
        timeout = seconds("timeout", timeout, positive=True)

    env = raw.get("env", {})
    if not isinstance(env, dict):
        raise err("env", f"must be a table of strings, like env = {{ LANG = \"C\" }}, not {_describe(env)}")
    for k, v in env.items():
        if not isinstance(v, str):
            raise err(f"env.{_short(k)}", f"must be a string, not {_describe(v)} (quote it)")
        if not k or "=" in k or "\0" in k:
            raise err(f"env.{_short(k)}", "is not a valid environment variable name (empty, or contains '=' or NUL)")
        if "\0" in v:
            raise err(f"env.{_short(k)}", "contains a NUL character, which the environment cannot hold")

    shell = raw.get("shell", "sh")
    if not isinstance(shell, str):
        raise err("shell", f"must be a string naming an interpreter, like \"bash\", not {_describe(shell)}")
    if not shell.strip() or "\0" in shell:
        raise err("shell", "must name an interpreter, like \"bash\"")
    if shell != shell.strip() or any(c.isspace() for c in shell):
        raise err("shell", f"must be one program, run as [shell, \"-c\", script], not {_short(shell)!r}; put options in the script")

    schedule = raw.get("schedule")
    sched_s: float | None = None
    if schedule is not None:
        if not start:
            raise err("schedule", "only a start step (start = true) can have a schedule")
        sched_s = _parse_duration(schedule, err)

    gather = raw.get("gather", False)
    if not isinstance(gather, bool):
        raise err("gather", f"must be true or false, not {_describe(gather)}")
    if gather and start:
        raise err("gather", "a start step takes no inputs, so it has nothing to gather; remove 'gather' or 'start'")
    settle = DEFAULT_SETTLE
    if "settle" in raw:
        settle = _parse_duration(raw["settle"], err, key="settle", minimum=0.0)
        if not gather:
            raise err("settle", "only a gather step (gather = true) waits for its inputs to settle")
    on_failure = raw.get("on_failure", "wait")
    if not isinstance(on_failure, str) or on_failure not in ON_FAILURE:
        close = difflib.get_close_matches(on_failure, ON_FAILURE, n=1) if isinstance(on_failure, str) else []
        raise err("on_failure", f"must be \"wait\" (do not gather while an upstream task has failed) or \"gather\" "
                                f"(gather what succeeded), not {_describe(on_failure)}"
                                + (f"; did you mean \"{close[0]}\"?" if close else ""))
    if "on_failure" in raw and not gather:
        raise err("on_failure", "only a gather step (gather = true) has an upstream failure policy")

    return Step(
        name=name, script=script, start=start, parallel=parallel, inputs=inputs_t,
        retries=retries, retry_delay=retry_delay, timeout=timeout,
        env=dict(env), shell=shell, schedule=sched_s, gather=gather, settle=settle, on_failure=on_failure,
    )


def _parse_duration(value, err, *, key: str = "schedule", minimum: float = 1.0) -> float:
    least = "one second" if minimum == 1.0 else f"{minimum:g} seconds"
    if _is_number(value):
        if value > MAX_SECONDS:  # compare before float(): a huge integer does not fit in one
            raise err(key, f"must be at most {_MAX_TEXT}")
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
            raise err(key, f"{_describe(value)} is not a duration; write e.g. \"30s\", \"15m\", \"1h30m\" or \"1d\"")
    else:
        raise err(key, f"must be a duration like \"15m\", not {_describe(value)}")
    if not seconds >= minimum:
        raise err(key, f"must be at least {least} (got {_describe(value)})")
    if not seconds <= MAX_SECONDS:
        raise err(key, f"must be at most {_MAX_TEXT} (got {_describe(value)})")
    return seconds


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    return _is_int(v)


def _type(v) -> str:
    if isinstance(v, datetime.datetime):
        return "a date-time"
    if isinstance(v, datetime.date):
        return "a date"
    if isinstance(v, datetime.time):
        return "a time"
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
            list: "a list", dict: "a table"}.get(type(v), type(v).__name__)


def _describe_num(v) -> str:
    if isinstance(v, int) and not INT_MIN <= v <= INT_MAX:
        return "a huge number"
    return repr(v) if isinstance(v, float) else str(v)


def _describe(v) -> str:
    """The type of a value, with the value itself when it is short: `a float (2.5)`."""
    if isinstance(v, bool):
        return f"a boolean ({'true' if v else 'false'})"
    if isinstance(v, (int, float)):
        return f"{_type(v)} ({_describe_num(v)})"
    if isinstance(v, str):
        return f"a string ({v[:40]!r}{'...' if len(v) > 40 else ''})"
    if isinstance(v, (datetime.date, datetime.time)):
        return f"{_type(v)} ({v.isoformat()})"
    return _type(v)


def _short(text: str) -> str:
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


def _oneline(text: str) -> str:
    """Escape what could break a one-line message or fool a terminal: newlines, control and format characters."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _clean(e: ManifestError) -> ManifestError:
    """The same error with names, keys and values from the file made safe for a one-line message."""
    clean = ManifestError("", file=_oneline(e.file or ""), step=None if e.step is None else _oneline(e.step),
                          key=None if e.key is None else _oneline(e.key))
    clean.args = (_oneline(str(e)),)
    return clean
