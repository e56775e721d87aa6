"""`graph`: the step graph as Mermaid (default), DOT (`--format dot`) or JSON (`--json`).

Nodes are the steps (start steps marked) and the terminal `done`. Edges come from
two places:

- observed, from the store: a task whose parent task ran step A and which itself
  runs step B is an edge A -> B; a gather task of step B whose members step A made
  is an edge A -> B too (counted in members); a done task's outputs with route key
  `done` are an edge to `done`. These are drawn solid.
- guessed, from the manifest's scripts (when -manifest is given): file names
  written under $OUTPUT_DIR (`> "$OUTPUT_DIR/process_$i.txt"`, `cp x $OUTPUT_DIR/done.json`)
  are routed like real outputs. Guesses not (yet) confirmed by the store are drawn dashed.

Everything but `observed_edges` is pure, so it is tested without a store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from task_pipeline.routing import TERMINAL, Router, route_key

# $OUTPUT_DIR/name or ${OUTPUT_DIR}/name, the name running up to a quote, space or shell operator
_OUTPUT_RE = re.compile(r"""\$(?:\{OUTPUT_DIR\}|OUTPUT_DIR\b)/+([^\s"'`;|&<>()]+)""")


@dataclass(frozen=True)
class Node:
    name: str
    start: bool = False
    terminal: bool = False
    version: int | None = None
    removed: bool = False      # in the store, no longer in the manifest
    gather: bool = False       # takes every output routed to it as one task


@dataclass
class Edge:
    src: str
    dst: str
    observed: int = 0          # tasks routed this way (from the store)
    guessed: bool = False      # found in the source step's script

    @property
    def dashed(self) -> bool:
        return not self.observed


@dataclass
class Graph:
    nodes: list[Node] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "nodes": [{"id": n.name, "start": n.start, "terminal": n.terminal, "version": n.version,
                       "removed": n.removed, "gather": n.gather} for n in self.nodes],
            "edges": [{"from": e.src, "to": e.dst, "observed": e.observed, "guessed": e.guessed,
                       "dashed": e.dashed} for e in self.edges],
        }


def guess_output_names(script: str) -> list[str]:
    """File names a script writes under $OUTPUT_DIR, as far as they can be read from its text.
    A name that starts with a variable (`$OUTPUT_DIR/$NAME`) says nothing about its route key and is skipped."""
    names = []
    for m in _OUTPUT_RE.finditer(script):
        name = m.group(1).rstrip("\\")
        if name and not name.startswith("$") and name not in names:
            names.append(name)
    return names


def guess_edges(steps: list[tuple[str, str, tuple[str, ...]]]) -> list[tuple[str, str]]:
    """(step, consumer) pairs from each step's script; `steps` are (name, script, consumes) in manifest order."""
    router = Router.build((name, consumes) for name, _, consumes in steps)
    edges: list[tuple[str, str]] = []
    for name, script, _ in steps:
        for out in guess_output_names(script):
            targets = (TERMINAL,) if route_key(out) == TERMINAL else router.consumers(out)
            for t in targets:
                if (name, t) not in edges:
                    edges.append((name, t))
    return edges


def build_graph(steps: list[Node], observed: dict[tuple[str, str], int], guessed: list[tuple[str, str]]) -> Graph:
    """Nodes: `steps`, any step an observed edge names, and `done`. Edges: observed first, then guesses."""
    nodes = {n.name: n for n in steps}
    for src, dst in [*observed, *guessed]:
        for name in (src, dst):
            if name not in nodes and name != TERMINAL:
                nodes[name] = Node(name, removed=True)
    nodes[TERMINAL] = Node(TERMINAL, terminal=True)
    edges: dict[tuple[str, str], Edge] = {}
    for (src, dst), n in observed.items():
        edges[(src, dst)] = Edge(src, dst, observed=n)
    for src, dst in guessed:
        e = edges.setdefault((src, dst), Edge(src, dst))
        e.guessed = True
    order = {name: i for i, name in enumerate(nodes)}
    return Graph(list(nodes.values()), sorted(edges.values(), key=lambda e: (order[e.src], order[e.dst])))


def _label(n: Node) -> str:
    label = n.name
    if n.version is not None:
        label += f" v{n.version}"
    if n.start:
        label += " (start)"
    if n.gather:
        label += " (gather)"
    if n.removed:
        label += " (removed)"
    return label


def _mermaid_id(name: str) -> str:
    return "done" if name == TERMINAL else "step_" + name.replace("-", "_")


def render_mermaid(g: Graph) -> str:
    lines = ["flowchart LR"]
    for n in g.nodes:
        nid, label = _mermaid_id(n.name), _label(n)
        if n.terminal:
            lines.append(f"    {nid}(((done)))")
        elif n.start:
            lines.append(f'    {nid}(["{label}"])')
        elif n.gather:
            lines.append(f'    {nid}[/"{label}"\\]')   # a trapezoid: many in, one out
        else:
            lines.append(f'    {nid}["{label}"]')
    for e in g.edges:
        arrow = "-.->" if e.dashed else "-->"
        count = f"|{e.observed}|" if e.observed else ""
        lines.append(f"    {_mermaid_id(e.src)} {arrow}{count} {_mermaid_id(e.dst)}")
    return "\n".join(lines) + "\n"


def render_dot(g: Graph) -> str:
    lines = ["digraph pipeline {", "    rankdir=LR;", "    node [shape=box];"]
    for n in g.nodes:
        if n.terminal:
            attrs = 'shape=doublecircle, label="done"'
        else:
            attrs = (f'label="{_label(n)}"' + (", peripheries=2" if n.start else "")
                     + (", shape=invtrapezium" if n.gather else "") + (", style=dotted" if n.removed else ""))
        lines.append(f'    "{n.name}" [{attrs}];')
    for e in g.edges:
        attrs = []
        if e.dashed:
            attrs.append("style=dashed")
        if e.observed:
            attrs.append(f'label="{e.observed}"')
        lines.append(f'    "{e.src}" -> "{e.dst}"' + (f" [{', '.join(attrs)}]" if attrs else "") + ";")
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- reading the store -------------------------------------------------------------


def observed_edges(db) -> dict[tuple[str, str], int]:
    """Routing as it happened: parent task's step -> child task's step, and done outputs -> `done`."""
    found: dict[tuple[str, str], int] = {}
    for src, dst, n in db.execute(
            """SELECT ps.name, cs.name, count(*) FROM task c JOIN task p ON p.id = c.parent_id
               JOIN step ps ON ps.id = p.step_id JOIN step cs ON cs.id = c.step_id
               GROUP BY ps.name, cs.name"""):
        found[(src, dst)] = n
    for src, dst, n in db.execute(
            """SELECT ps.name, gs.name, count(DISTINCT m.task_id || '/' || m.name || '/' || m.hash)
               FROM gather_member m JOIN task g ON g.id = m.task_id JOIN step gs ON gs.id = g.step_id
               JOIN output o ON o.hash = m.hash AND o.name = m.name JOIN task p ON p.id = o.task_id
               JOIN step ps ON ps.id = p.step_id GROUP BY ps.name, gs.name"""):
        found[(src, dst)] = found.get((src, dst), 0) + n
    for src, n in db.execute(
            """SELECT s.name, count(*) FROM output o JOIN task t ON t.id = o.task_id JOIN step s ON s.id = t.step_id
               WHERE o.key = ? GROUP BY s.name""", (TERMINAL,)):
        found[(src, TERMINAL)] = n
    return found
