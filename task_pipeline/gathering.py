"""Gather steps, the pure part: the identity of a member set, and which steps can feed a gather step.

No I/O. A gather step's task takes every current output routed to it at once. Its
input is one object, the **listing** of its members: `name<TAB>hash\\n` lines, sorted,
each (name, hash) pair once. The listing's hash is the set's identity, so the task
identity (step version, input name, input hash) of an ordinary task covers it: the
same set never runs twice, and a changed member makes a new task. The script sees the
listing as INPUT_FILE and the members as files under their own names in INPUT_DIR.

Which steps can feed a gather step (its **upstream**) is read from the routing graph:
a step whose script visibly writes only literal names (`$OUTPUT_DIR/count_$i.txt`
has the route key `count`) feeds the steps those names route to; a step whose script
writes names that cannot be read from its text (`$OUTPUT_DIR/$NAME`, `cd "$OUTPUT_DIR"`,
a Python script, a program it calls) is taken to feed every step. Upstream is the
transitive closure. Wrong in the safe direction only: a gather step may wait for a
step that could not have fed it, never fire while one that could is still working.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from task_pipeline.routing import Router, TERMINAL, route_key

GATHER_INPUT = "gather"     # the input name of every gather task (its input object is the listing)
MEMBERS_DIR = "members"     # INPUT_DIR's name inside the attempt's in/ directory
ON_FAILURE = ("wait", "gather")
DEFAULT_SETTLE = 5.0        # seconds a gather step's set must stay unchanged before `serve` fires it

# $OUTPUT_DIR/name or ${OUTPUT_DIR}/name (as graph.py reads them), and every mention of the variable
_WRITE_RE = re.compile(r"""\$(?:\{OUTPUT_DIR\}|OUTPUT_DIR\b)/+([^\s"'`;|&<>()]+)""")
_MENTION_RE = re.compile(r"OUTPUT_DIR")
_VARIABLE_CHARS = "$`*?[{\\"


def listing(members: Iterable[tuple[str, str]]) -> bytes:
    """The set's canonical form: `name<TAB>hash` lines, sorted, each pair once."""
    return "".join(f"{name}\t{h}\n" for name, h in sorted(set(members))).encode("utf-8")


def parse_listing(data: bytes) -> list[tuple[str, str]]:
    """The members a listing names; ValueError if it is not one (the object is damaged or not a listing)."""
    out: list[tuple[str, str]] = []
    for line in data.decode("utf-8").splitlines():
        name, sep, h = line.partition("\t")
        if not sep or not name or not h or "\t" in h:
            raise ValueError(f"not a member listing: {line[:80]!r}")
        out.append((name, h))
    if out != sorted(set(out)):
        raise ValueError("not a member listing: its lines are not sorted and distinct")
    return out


def collisions(members: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Names that more than one member has (with different content): a directory holds one file per name."""
    by_name: dict[str, set[str]] = {}
    for name, h in members:
        by_name.setdefault(name, set()).add(h)
    return {name: sorted(hs) for name, hs in sorted(by_name.items()) if len(hs) > 1}


def unsafe_name(name: str) -> bool:
    """A member name that cannot be a file in INPUT_DIR (outputs never have one; a damaged listing might)."""
    return name in (".", "..") or name.startswith(".") or "/" in name or "\0" in name


# -- which steps can feed which --------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What the feeder analysis needs of a step."""

    name: str
    script: str
    consumes: tuple[str, ...]
    start: bool = False
    gather: bool = False


def written_names(script: str) -> list[tuple[str, str, bool]] | None:
    """The files a script visibly writes into OUTPUT_DIR, as (name, route key, name has variable
    parts); None when what it writes cannot be read from its text."""
    writes = [m.group(1).rstrip("\\") for m in _WRITE_RE.finditer(script)]
    if not writes or len(writes) != len(_MENTION_RE.findall(script)):
        return None  # OUTPUT_DIR used some other way (cd, a variable, another language): anything goes
    out = []
    for name in writes:
        cut = min((name.index(c) for c in _VARIABLE_CHARS if c in name), default=None)
        if cut is None:
            out.append((name, route_key(name), False))
            continue
        # with variable parts, the key is fixed only when the literal part already holds the first '_'
        # (and no '.' before it, which the extension rule could make part of the key or not)
        head, sep, _ = name[:cut].partition("_")
        if not sep or not head or "." in head:
            return None
        out.append((name, head, True))
    return out


def feeds(steps: Sequence[Shape]) -> dict[str, frozenset[str]]:
    """For each step, the steps its outputs can be routed to (gather steps included)."""
    consumers = [s for s in steps if not s.start]   # start steps consume nothing
    router = Router.build((s.name, s.consumes) for s in consumers)
    everyone = frozenset(s.name for s in consumers)
    out: dict[str, frozenset[str]] = {}
    for s in steps:
        names = written_names(s.script)
        if names is None:
            out[s.name] = everyone
            continue
        targets: set[str] = set()
        for name, key, variable in names:
            if not variable:
                targets.update(router.consumers(name))
            elif key != TERMINAL:
                # a glob in `inputs` matches whole names: one with variable parts may match any of them
                targets.update(router.by_key.get(key, ()))
                targets.update(step for _, step in router.globs)
        out[s.name] = frozenset(targets)
    return out


def upstream(steps: Sequence[Shape]) -> dict[str, frozenset[str]]:
    """For each gather step, every step whose work can end up in its member set, transitively
    (the gather step itself left out)."""
    edges = feeds(steps)
    feeders: dict[str, set[str]] = {s.name: set() for s in steps}
    for src, dsts in edges.items():
        for d in dsts:
            if d in feeders:
                feeders[d].add(src)
    out: dict[str, frozenset[str]] = {}
    for g in steps:
        if not g.gather:
            continue
        seen: set[str] = set()
        stack = [g.name]
        while stack:
            for f in feeders[stack.pop()]:
                if f not in seen:
                    seen.add(f)
                    stack.append(f)
        seen.discard(g.name)
        out[g.name] = frozenset(seen)
    return out


def firing_order(up: dict[str, frozenset[str]]) -> list[str]:
    """Gather steps, each after the gather steps upstream of it (steps in a cycle: by name)."""
    return sorted(up, key=lambda g: (sum(1 for h in up if h in up[g] and g not in up[h]), g))
