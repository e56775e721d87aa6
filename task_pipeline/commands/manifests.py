"""Commands about the manifest itself: `validate`, `init`, `graph`."""

from __future__ import annotations

import json
import os
import sys
from argparse import Namespace
from pathlib import Path

from task_pipeline import lint, state
from task_pipeline.commands.common import need_manifest, open_store, print_json
from task_pipeline.errors import StoreError, UsageError
from task_pipeline.location import ENV_DB
from task_pipeline.graph import Node, build_graph, guess_edges, observed_edges, render_dot, render_mermaid
from task_pipeline.manifest import Manifest, load_manifest
from task_pipeline.report import Output
from task_pipeline.starter import starter_text
from task_pipeline.textsafe import one_line


def cmd_validate(a: Namespace, out: Output) -> int:
    m = need_manifest(a, runs=False)
    notes = lint.warnings(m)
    if not m.workdir.is_dir():
        notes.insert(0, f"{m.path}: the workdir {m.workdir} does not exist here; create it before running")
    changes: list[str] = []
    if a.db or a.objects or os.environ.get(ENV_DB):
        changes = _against_store(a, m)
    if a.json:
        print_json({"manifest": m.path, "valid": True, "steps": list(m.names),
                    "start": [s.name for s in m.start_steps], "warnings": notes, "store_changes": changes})
        return 0
    for w in notes:
        out.log("warning", w)
    starts = ", ".join(s.name for s in m.start_steps) or "none (fed by submit)"
    out.print(f"{m.path}: {len(m.steps)} step(s) valid; start: {starts}")
    for c in changes:
        out.print(f"  {c}")
    return 0


def _against_store(a: Namespace, m: Manifest) -> list[str]:
    """What registering `m` on the store would change (a dry run; a refusal is raised as run would)."""
    from task_pipeline.commands.run import check_manifest_switch

    try:
        opened = open_store(a)
    except StoreError as e:
        if "no store here" in str(e) or "no tables" in str(e):
            return ["no store there yet: the first run creates it"]
        raise

    def simulate(db):
        check_manifest_switch(db, m, a)
        return state.register(db, m)

    reg = state.dry_run(opened.db, simulate)
    out = [f"{name}: would make version {new} current (now v{old})" for name, old, new in reg.new_versions
           if old is not None]
    out += [f"{name}: a new step" for name, old, new in reg.new_versions if old is None]
    out += [f"{name}: {n} existing output(s) would be queued" for name, n in reg.backfilled.items() if n]
    out += [f"{name}: {t.count} finished task(s) would be tainted" for name, t in reg.tainted.items()]
    if reg.removed:
        out.append(f"no longer in the manifest: {', '.join(reg.removed)}")
    return out or ["registering it changes nothing in the store"]


def cmd_init(a: Namespace, out: Output) -> int:
    path = Path(a.args[0]) if a.args else Path("pipeline.toml")
    if path.is_dir():
        path = path / "pipeline.toml"
    shown = one_line(str(path))
    if path.exists() or path.is_symlink():
        raise UsageError(f"{shown} already exists; not overwriting it (remove it or give another path: init PATH)")
    text = starter_text(str(path))
    try:
        with open(path, "x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        raise UsageError(f"{shown} already exists; not overwriting it (remove it or give another path: init PATH)") from None
    except OSError as e:
        raise UsageError(f"{shown}: cannot write: {e.strerror}") from None
    out.log("info", f"wrote {shown}; run it with: task-pipeline run {shown} -db db")
    if a.hash:
        out.log("info", f"--hash {a.hash} applies when a store is created: pass it to the first run "
                        f"(task-pipeline run {shown} -db db --hash {a.hash})")
    return 0


def cmd_graph(a: Namespace, out: Output) -> int:
    manifest: Manifest | None = load_manifest(a.manifest) if a.manifest else None
    observed: dict[tuple[str, str], int] = {}
    versions: dict[str, int] = {}
    store_steps: list[Node] = []
    try:
        opened = open_store(a)
    except StoreError as e:
        if manifest is None:
            raise UsageError(f"graph needs a manifest (-manifest M) or a store (-db D): {e}") from None
        opened = None
    if opened is not None:
        pipe = state.load_pipeline(opened.db)
        observed = observed_edges(opened.db)
        versions = {s.name: s.version for s in pipe.steps.values()}
        store_steps = [Node(s.name, start=s.is_start, version=s.version, removed=not s.in_manifest,
                            gather=s.policy.gather) for s in pipe.steps.values()]
    if manifest is not None:
        steps = [Node(s.name, start=s.start, version=versions.get(s.name), gather=s.gather) for s in manifest.steps]
        guessed = guess_edges([(s.name, s.script, s.consumes) for s in manifest.steps])
    else:
        steps, guessed = store_steps, []
    g = build_graph(steps, observed, guessed)
    if a.json:
        sys.stdout.write(json.dumps(g.to_json(), indent=2) + "\n")
    else:
        sys.stdout.write(render_dot(g) if a.format == "dot" else render_mermaid(g))
    return 0
