"""The step graph laid out for a picture: boxes in columns, edges as SVG paths. Pure.

Columns follow the flow: a step's column is one past the furthest step that feeds it (edges that
go back, cycles and a step feeding itself are drawn, but do not push columns); `done` is the last
column. Within a column, steps keep the manifest's order. The template draws it as inline SVG, so
the picture needs no script, no library and no network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from task_pipeline.graph import Graph

BOX_W, BOX_H = 176, 66          # a step: its name, its version, a line of counts
GAP_X, GAP_Y, PAD = 64, 26, 16
DONE_W = 76


@dataclass(frozen=True)
class Box:
    name: str
    x: int
    y: int
    w: int
    h: int
    start: bool = False
    terminal: bool = False
    removed: bool = False
    version: int | None = None

    @property
    def cx(self) -> int:
        return self.x + self.w // 2


@dataclass(frozen=True)
class Arrow:
    src: str
    dst: str
    d: str               # the SVG path
    dashed: bool
    observed: int
    label_x: int
    label_y: int


@dataclass
class Layout:
    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)
    arrows: list[Arrow] = field(default_factory=list)


def columns(g: Graph) -> dict[str, int]:
    """Each node's column: the longest path to it over forward edges (in node order, an edge to an
    earlier node is a back edge and is ignored); `done` after every step."""
    order = {n.name: i for i, n in enumerate(g.nodes)}
    col = {n.name: 0 for n in g.nodes}
    forward = [(e.src, e.dst) for e in g.edges
               if e.src in order and e.dst in order and order[e.src] < order[e.dst]]
    for _ in range(len(g.nodes)):   # relax until stable: at most one pass per node
        changed = False
        for src, dst in forward:
            if col[dst] < col[src] + 1:
                col[dst] = col[src] + 1
                changed = True
        if not changed:
            break
    steps = [n.name for n in g.nodes if not n.terminal]
    last = max((col[s] for s in steps), default=-1) + 1
    for n in g.nodes:
        if n.terminal:
            col[n.name] = last
    return col


def lay_out(g: Graph) -> Layout:
    col = columns(g)
    by_col: dict[int, list] = {}
    for n in g.nodes:
        by_col.setdefault(col[n.name], []).append(n)
    tallest = max((len(v) for v in by_col.values()), default=1)
    height = PAD * 2 + tallest * BOX_H + (tallest - 1) * GAP_Y
    boxes: dict[str, Box] = {}
    x = PAD
    for c in sorted(by_col):
        nodes = by_col[c]
        span = len(nodes) * BOX_H + (len(nodes) - 1) * GAP_Y
        y = (height - span) // 2
        w = max(BOX_W if not n.terminal else DONE_W for n in nodes)
        for n in nodes:
            bw = DONE_W if n.terminal else BOX_W
            boxes[n.name] = Box(n.name, x + (w - bw) // 2, y, bw, BOX_H, n.start, n.terminal, n.removed, n.version)
            y += BOX_H + GAP_Y
        x += w + GAP_X
    width = x - GAP_X + PAD
    arrows = [_arrow(boxes[e.src], boxes[e.dst], e.dashed, e.observed) for e in g.edges
              if e.src in boxes and e.dst in boxes]
    # room below the boxes for edges that go back
    extra = 40 if any(a.label_y > height - PAD for a in arrows) else 0
    return Layout(width, height + extra, list(boxes.values()), arrows)


def _arrow(a: Box, b: Box, dashed: bool, observed: int) -> Arrow:
    if a.name == b.name:       # a step that feeds itself: a loop over its top right corner
        x, y = a.x + a.w - 30, a.y
        d = f"M{x},{y} C{x},{y - 34} {x + 44},{y - 34} {x + 30},{y}"
        return Arrow(a.name, b.name, d, dashed, observed, x + 18, y - 30)
    if b.x > a.x:              # forward: right side to left side
        x1, y1, x2, y2 = a.x + a.w, a.y + a.h // 2, b.x, b.y + b.h // 2
        mid = (x1 + x2) // 2
        d = f"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2 - 2},{y2}"
        return Arrow(a.name, b.name, d, dashed, observed, mid, (y1 + y2) // 2 - 6)
    # back or within a column: bottom to bottom, under the boxes
    x1, y1, x2, y2 = a.cx, a.y + a.h, b.cx, b.y + b.h
    low = max(y1, y2) + 36
    d = f"M{x1},{y1} C{x1},{low} {x2},{low} {x2},{y2 + 2}"
    return Arrow(a.name, b.name, d, dashed, observed, (x1 + x2) // 2, low - 4)
