"""What the commands share: opening the store a user named, reading the manifest, printing JSON,
and turning an unexpected failure into one line when it is the store's fault."""

from __future__ import annotations

import json
import os
import sys
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

from task_pipeline import fsutil, state
from task_pipeline.db import Database, open_database
from task_pipeline.errors import ManifestError, StoreError, UsageError
from task_pipeline.location import Location, resolve
from task_pipeline.manifest import Manifest, load_manifest
from task_pipeline.overview import iso  # noqa: F401 - the commands' time format lives with the status document
from task_pipeline.store import ALGORITHMS, ObjectStore, Store
from task_pipeline.textsafe import one_line

_opened: list[Database] = []  # for explain_failure: the database this process is using


@dataclass
class Opened:
    db: Database
    store: ObjectStore
    loc: Location
    created: bool = False


def open_store(a: Namespace, *, create: bool = False) -> Opened:
    """Open the store named by -db/--objects/--scratch (or their variables); `create` allows a new one."""
    loc = resolve(a.db, a.objects, a.scratch)
    wanted = getattr(a, "hash", None)
    if wanted and wanted not in ALGORITHMS:
        raise UsageError(f"--hash {wanted}: use one of {', '.join(ALGORITHMS)}")
    db = open_database(loc.db, create=create, hash_algo=wanted or "sha256",
                       objects_hint=None if loc.bucket else str(loc.objects), password_file=loc.password_file)
    _opened.append(db)
    created = bool(getattr(db, "created", False))
    algo = state.meta(db, "hash_algo") or "sha256"
    if wanted and wanted != algo and not created:
        raise UsageError(f"--hash {wanted}: this store hashes with {algo}, fixed when it was created; "
                         f"leave out --hash, or create a new store (another -db) for {wanted}")
    _check_objects_location(db, loc, created)
    if create:
        try:
            fsutil.make_dirs(str(loc.scratch), 0o700)
        except OSError as e:
            raise StoreError(f"{loc.scratch}: cannot create the scratch directory: {e.strerror}") from None
    store = object_store(loc, algo, getattr(a, "cache_size", None))
    if create:
        store.create_dirs()
    store.check()
    fsutil.check_private(str(loc.scratch), "scratch directory")
    return Opened(db, store, loc, created)


def object_store(loc: Location, algo: str, cache_size: str | None = None) -> ObjectStore:
    """The store's objects: a directory here, or a bucket (with this host's download cache)."""
    if loc.bucket:
        from task_pipeline.location import parse_size
        from task_pipeline.s3store import S3Store

        size = parse_size(cache_size, "--cache-size") if cache_size else 0
        return S3Store(loc.bucket, algo, loc.scratch / "cache", size)
    if cache_size:
        raise UsageError("--cache-size is for objects in a bucket (--objects s3://...); a directory needs no cache")
    return Store(loc.objects, loc.incoming, algo)


def _check_objects_location(db: Database, loc: Location, created: bool) -> None:
    """A store directory whose objects live elsewhere (--objects) records where, when it is made;
    naming another place later would split the store in two (new outputs in one place, the old
    ones in the other). The default, DB/objects, is recorded as such, so that the store directory
    can be moved or copied."""
    if loc.shared:
        return  # hosts may mount a shared objects directory at different paths
    here = loc.bucket or os.path.abspath(loc.objects)
    default = os.path.abspath(os.path.join(loc.db, "objects"))
    if created:
        with db.transaction():
            state.set_meta(db, "objects", "" if here == default else here)
        return
    recorded = state.meta(db, "objects") or default
    if recorded != here and not (not loc.bucket and os.path.exists(recorded) and os.path.exists(here)
                                 and os.path.samefile(recorded, here)):
        raise UsageError(f"{loc.db}: this store keeps its objects in {recorded}, not {here}; pass --objects "
                         f"{recorded}, or leave --objects out if that is the store's own objects directory")


def need_manifest(a: Namespace, *, runs: bool = True) -> Manifest:
    """The manifest named by -manifest; for commands that run scripts, its workdir must exist."""
    if not a.manifest:
        raise UsageError(f"'{a.command}' needs a manifest: add -manifest PATH (or give the .toml file as an argument)")
    m = load_manifest(a.manifest)
    if runs and not m.workdir.is_dir():
        raise ManifestError(f"the workdir {m.workdir} is not a directory; create it or fix [pipeline] workdir",
                            file=m.path, key="pipeline.workdir")
    return m


def store_args(a: Namespace) -> str:
    """The store options as the user gave them, for hints that must work when pasted."""
    parts = []
    if a.db is not None or not os.environ.get("TASK_PIPELINE_DB"):
        parts += ["-db", _quote(a.db or "./db")]
    if a.objects:
        parts += ["--objects", _quote(a.objects)]
    if a.scratch:
        parts += ["--scratch", _quote(a.scratch)]
    return " ".join(parts)


def command_hint(a: Namespace, *words: str, manifest: bool = True) -> str:
    parts = ["task-pipeline", *words]
    if manifest and a.manifest:
        parts += ["-manifest", _quote(a.manifest)]
    return " ".join(p for p in parts + [store_args(a)] if p)


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(one_line(s))


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")


def explain_failure(e: BaseException) -> str | None:
    """One line for an error that is the store's fault rather than a bug, or None.

    Database driver errors and OS errors explain themselves. Anything else (a KeyError,
    a TypeError) may be a damaged database read as if it were sound: if the database's
    own integrity check finds damage, that is the explanation; otherwise it is a bug.
    """
    from task_pipeline.db import explain

    text = explain(e)
    if text is not None:
        return text
    if isinstance(e, UnicodeDecodeError) and _opened:
        return (f"{_opened[-1].name}: the database holds text that is not UTF-8, so it is damaged; restore it "
                f"from a backup ('task-pipeline fsck' says more)")
    if isinstance(e, MemoryError):
        return "out of memory; lower -parallel or free some memory"
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}"
    from task_pipeline.housekeeping import content_problems

    for db in _opened:
        try:
            problems = db.integrity() or content_problems(db)
        except Exception as err:  # noqa: BLE001 - the check itself fails on a damaged file
            problems = [str(err).splitlines()[0] if str(err) else type(err).__name__]
        if problems:
            return (f"{db.name}: the database is damaged ({'; '.join(problems[:3])}); restore it from a backup "
                    f"('task-pipeline fsck' says more)")
    return None


def step_filter(a: Namespace, manifest: Manifest) -> frozenset[str] | None:
    if not a.step:
        return None
    unknown = [s for s in a.step if s not in manifest.names]
    if unknown:
        raise UsageError(f"-step {unknown[0]}: no such step in {manifest.path} (steps: {', '.join(manifest.names)})")
    return frozenset(a.step)


def absolute(p: str) -> str:
    return str(Path(p).absolute())
