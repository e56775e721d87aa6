"""Getting results out: `export` (list them, or write them into a directory), `cat`, `why`.

`export --to DIR` gives make users what they expect: the current results as
ordinary files under their own names. They are read-only copies, checked against
their hash as they are copied; `--link` makes hard links instead,
which cost nothing but share the store's inode: editing one would change the
object, which `fsck` would then report as corrupt. Nothing is overwritten: a
name that would hold two different results, or a file already there with other
content, stops the export before anything is written.
"""

from __future__ import annotations

import errno
import os
import sys
from argparse import Namespace
from pathlib import Path

from task_pipeline import queries
from task_pipeline.commands.common import open_store, print_json
from task_pipeline.errors import UsageError
from task_pipeline.report import Output
from task_pipeline.routing import TERMINAL
from task_pipeline.store import Store, hash_fd
from task_pipeline.textsafe import one_line


def object_ref(ref: str, store: Store) -> str:
    """A hash (or prefix) from what a user may paste: a hash, or an object path as `export` prints it."""
    if "/" in ref:
        h = store.name_of(ref)
        if h is None:
            raise UsageError(f"{one_line(ref)}: not an object of this store (objects are under {store.describe()})")
        return h
    return ref


def cmd_export(a: Namespace, out: Output) -> int:
    target = a.args[0] if a.args else None
    if target is None and not (a.unrouted or a.to):
        raise UsageError("export what? give a STEP (its inputs, or --outputs), 'done' (the final results), "
                         "--unrouted, or --to DIR (every current output)")
    if target is not None and a.unrouted:
        raise UsageError("--unrouted lists the outputs no step consumes; it takes no STEP")
    if target == TERMINAL and (a.outputs or a.input_path):
        raise UsageError("'done' is not a step: 'export done' lists the final results")
    opened = open_store(a)
    db, store = opened.db, opened.store
    layout = a.layout
    if a.input_path:
        if target is None:
            raise UsageError("-input-path needs the step: export STEP -input-path P")
        rows = queries.export_outputs(db, target, _input_ref(a.input_path, store), history=a.history)
    elif target == TERMINAL:
        rows = queries.final_outputs(db, history=a.history)
    elif a.unrouted:
        rows = queries.unrouted_outputs(db)
    elif target is None:
        rows = queries.current_outputs(db, history=a.history)
        layout = layout or "step"
    elif a.outputs:
        rows = queries.step_outputs(db, target, history=a.history)
    else:
        rows = queries.export_inputs(db, target, history=a.history)
        if not rows and not a.json:
            hint = (f"'{target}' is a start step, which takes no inputs; its outputs: export --outputs {target}"
                    if store_is_start(db, target) else f"{target} has no inputs yet")
            out.log("info", hint)
    for r in rows:
        r["path"] = store.path_str(r["hash"])
    if a.to:
        return export_to(Path(a.to), rows, store, layout or "flat", link=a.link, out=out, as_json=a.json)
    if a.json:
        print_json(rows)
    else:
        sys.stdout.write("".join(r["path"] + "\n" for r in rows))
    return 0


def store_is_start(db, step: str) -> bool:
    from task_pipeline.state import load_pipeline

    s = load_pipeline(db).steps.get(step)
    return s is not None and s.is_start


def _input_ref(p: str, store: Store) -> str:
    """-input-path accepts an object path (as -export prints them), a hash, or an input file name."""
    if "/" in p:
        return object_ref(p, store)
    return p


def _dest(r: dict, layout: str) -> Path:
    if layout == "task":
        return Path(r.get("step", "")) / str(r["task"]) / r["name"]
    if layout == "step" and r.get("step"):
        return Path(r["step"]) / r["name"]
    return Path(r["name"])


def export_to(root: Path, rows: list[dict], store: Store, layout: str, *, link: bool, out: Output,
              as_json: bool) -> int:
    plan: dict[Path, str] = {}
    for r in rows:
        rel = _dest(r, layout)
        if rel in plan and plan[rel] != r["hash"]:
            others = sum(1 for x in rows if _dest(x, layout) == rel)
            raise UsageError(f"{one_line(str(rel))}: {others} current results have this name with different content; "
                             f"nothing was written. Use --layout task (DIR/STEP/TASK/NAME) to keep them apart")
        plan[rel] = r["hash"]
    if root.exists() and not root.is_dir():
        raise UsageError(f"--to {one_line(str(root))}: not a directory; give a directory to write the results into")
    skip: set[Path] = set()
    for rel, h in plan.items():
        dest = root / rel
        if os.path.lexists(dest):
            if _same(dest, h, store):
                skip.add(rel)
            else:
                raise UsageError(f"{one_line(str(dest))} exists with other content; nothing was written "
                                 f"(export into an empty or fresh directory)")
    written = []
    for rel, h in plan.items():
        if rel in skip:
            continue
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if link:
            if not store.local:
                raise UsageError(f"--link: the objects are in {store.describe()}, not on this filesystem; export without "
                                 f"--link")
            try:
                os.link(store.path_str(h), dest)
            except OSError as e:
                if e.errno == errno.EXDEV:
                    raise UsageError(f"{root}: on another filesystem than the store, so hard links are impossible; "
                                     f"export without --link") from None
                raise
        else:
            tmp = dest.with_name(f".{dest.name}.tp-{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
            try:
                store.copy_to_fd(h, fd)
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
            os.close(fd)
            os.rename(tmp, dest)
        written.append(rel)
    if as_json:
        print_json([{"file": str(root / rel), "hash": h, "written": rel not in skip} for rel, h in plan.items()])
    else:
        out.log("info", f"{'linked' if link else 'wrote'} {len(written)} file(s) into {root}"
                        + (f"; {len(skip)} already there" if skip else ""))
    return 0


def _same(path: Path, h: str, store: Store) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return hash_fd(fd, store.algo, os.fstat(fd).st_size)[0] == h
    finally:
        os.close(fd)


def cmd_cat(a: Namespace, out: Output) -> int:
    opened = open_store(a)
    h = queries.resolve_hash(opened.db, object_ref(a.args[0], opened.store))
    opened.store.stream(h, sys.stdout.buffer)
    sys.stdout.buffer.flush()
    return 0


def cmd_why(a: Namespace, out: Output) -> int:
    opened = open_store(a)
    h = queries.resolve_hash(opened.db, object_ref(a.args[0], opened.store))
    chains = queries.lineages(opened.db, h, history=a.history)
    if a.json:
        print_json(chains)
        return 0
    if len(chains) > 1:
        out.print(f"object {h[:12]} was produced by {len(chains)} tasks:")
    for n, chain in enumerate(chains):
        if n:
            out.print("")
        _print_chain(chain, out, 0)
    return 0


def _hop_text(hop: dict) -> str:
    step = hop["step"] + (f" v{hop['version']}" if hop["version"] else "")
    task = f"task {hop['task']}" if hop["task"] else "submitted"
    old = "" if hop.get("live", True) else ", superseded"
    return f"{step} ({task}{old})"


def _print_chain(chain: list[dict], out: Output, indent: int) -> None:
    """One hop a line, each further in; a gather task's hop is preceded by its members, one line each
    (the chain that made it, start first), since a gather task has many inputs."""
    for i, hop in enumerate(chain):
        pad = "  " * (indent + i)
        if hop.get("members") is not None:
            out.print(one_line(f"{pad}{len(hop['members'])} member(s) gathered:"))
            for m in hop["members"]:
                # a member's chain in one line: where it began (a start task, or a file someone submitted) on
                path = " -> ".join(_hop_text(x) if x["task"] else f"{x['name']} (submitted)" for x in m["lineage"])
                out.print(one_line(f"{pad}  {(path + ' -> ') if path else ''}{m['name']} {m['object'][:12]}"))
        out.print(one_line(f"{pad}{_hop_text(hop)} -> {hop['name']} {hop['object'][:12]}"))
