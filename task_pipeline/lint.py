"""Manifests that are valid but cannot do what they seem to say. Pure: no I/O.

Only what can be shown from the manifest itself is reported, and the report
explains how routing works rather than guessing a fix.
"""

from __future__ import annotations

from task_pipeline.graph import guess_output_names
from task_pipeline.manifest import Manifest
from task_pipeline.routing import is_glob, route_key


def warnings(m: Manifest) -> list[str]:
    out: list[str] = []
    written: dict[str, list[str]] = {s.name: guess_output_names(s.script) for s in m.steps}
    keys_written = {route_key(n) for names in written.values() for n in names}
    opaque = any("$OUTPUT_DIR/$" in s.script.replace("${OUTPUT_DIR}", "$OUTPUT_DIR").replace('"', "")
                 for s in m.steps)
    names = set(m.names)
    for s in m.steps:
        for key in s.inputs:
            if is_glob(key) or key == s.name or key not in names or key in keys_written:
                continue
            other = m.step(key)
            what = "a start step, which consumes nothing" if other.start else "a step"
            shown = ", ".join(written[key][:4]) or "nothing visible in its script"
            out.append(
                f"step '{s.name}': inputs = [\"{key}\"] names {what} ('{key}'), but inputs are route keys of "
                f"file names, not step names: '{s.name}' gets every output file whose route key (the part of "
                f"its name before the first '_', without its extension) is '{key}', and no script here "
                f"{'visibly ' if opaque else ''}writes such a file ('{key}' writes: {shown}). A step's outputs "
                f"reach '{s.name}' when their names route to it: named '{s.name}_...', or matching one of its "
                f"inputs.")
    return out
