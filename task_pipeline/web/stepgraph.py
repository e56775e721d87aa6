"""The step graph the web serves: what `graph --json` gives for the store (the registered steps,
the routing observed between them, edges guessed from the scripts).

Its observed edges count every task, a second or more at a million tasks, so the graph is kept:
reused while the registered pipeline is the same (its generation) and, once older than MAX_AGE,
refreshed in the background on the web's second connection while requests answer from the kept
one. Only the first request, or the first after the manifest changed, waits for it.
"""

from __future__ import annotations

import time

from task_pipeline import graph as graphs
from task_pipeline import state
from task_pipeline.web.reader import Reader

MAX_AGE = 30.0   # seconds the observed edges are reused before a refresh is started


def step_graph(db) -> dict:
    pipe = state.load_pipeline(db)
    nodes = [graphs.Node(s.name, start=s.is_start, version=s.version, removed=not s.in_manifest)
             for s in pipe.steps.values()]
    guessed = graphs.guess_edges([(s.name, s.script, s.consumes) for s in pipe.active])
    return graphs.build_graph(nodes, graphs.observed_edges(db), guessed).to_json()


def _generation(db) -> str | None:
    return state.meta(db, "generation")


class StepGraph:
    def __init__(self, reader: Reader, background: Reader) -> None:
        self.reader, self.background = reader, background
        self.value: dict | None = None
        self._gen: str | None = None
        self._mono = 0.0
        self._busy = False
        self.tg = None           # the task group refreshes run in (server.serve's)

    async def get(self) -> dict:
        gen = await self.reader(_generation)
        if self.value is None or gen != self._gen:
            self._store(gen, await self.background(step_graph))
        elif time.monotonic() - self._mono > MAX_AGE and not self._busy and self.tg is not None:
            self._busy = True
            self.tg.start_soon(self._refresh, gen)
        return self.value

    async def _refresh(self, gen: str | None) -> None:
        try:
            self._store(gen, await self.background(step_graph))
        except Exception:  # noqa: BLE001 - the kept graph is served; the next refresh tries again
            pass
        finally:
            self._busy = False

    def _store(self, gen: str | None, g: dict) -> None:
        # a graph begun before a manifest change is stored under the old generation: the next
        # request sees the new one and builds the graph again
        self.value, self._gen, self._mono = g, gen, time.monotonic()
