"""Routing: which steps consume an output file, decided by its name alone (SPEC section 3).

Pure functions, no I/O. The route key of `process_001.txt` is `process`: the part
before the first `_` of the name without its last extension. A step consumes the
keys in its `inputs` (exact keys, or globs matched against the whole file name),
or by default its own name. `done` is terminal; any other key that nobody consumes
is "unrouted" (kept, and reported because it is usually a typo).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable

TERMINAL = "done"
_GLOB_CHARS = frozenset("*?[")


def route_key(filename: str) -> str:
    stem = filename.rsplit(".", 1)[0] if "." in filename[1:] else filename
    return stem.split("_", 1)[0]


def is_glob(pattern: str) -> bool:
    return any(c in _GLOB_CHARS for c in pattern)


@dataclass(frozen=True)
class Router:
    """Maps file names to consumer step names. Build once per manifest, call per output."""

    by_key: dict[str, tuple[str, ...]]
    globs: tuple[tuple[str, str], ...]  # (pattern, step name)

    @classmethod
    def build(cls, consumers: Iterable[tuple[str, Iterable[str]]]) -> "Router":
        """`consumers`: (step name, patterns it consumes) pairs, in manifest order."""
        by_key: dict[str, list[str]] = {}
        globs: list[tuple[str, str]] = []
        for step, patterns in consumers:
            for pat in patterns:
                if is_glob(pat):
                    globs.append((pat, step))
                else:
                    by_key.setdefault(pat, []).append(step)
        return cls({k: tuple(dict.fromkeys(v)) for k, v in by_key.items()}, tuple(globs))

    def consumers(self, filename: str) -> tuple[str, ...]:
        key = route_key(filename)
        if key == TERMINAL:
            return ()
        found = self.by_key.get(key, ())
        if self.globs:
            extra = [s for pat, s in self.globs if fnmatch.fnmatchcase(filename, pat) and s not in found]
            if extra:
                found = tuple(dict.fromkeys((*found, *extra)))
        return found

    def is_unrouted(self, filename: str) -> bool:
        return route_key(filename) != TERMINAL and not self.consumers(filename)


def matches(patterns: Iterable[str], filename: str) -> bool:
    """Does a step consuming `patterns` take `filename`? (Used to back-fill a new consumer.)"""
    key = route_key(filename)
    if key == TERMINAL:
        return False
    return any(fnmatch.fnmatchcase(filename, p) if is_glob(p) else p == key for p in patterns)
