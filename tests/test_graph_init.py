"""`graph` (pure graph building and rendering, then the command on a real store) and `init`."""

from __future__ import annotations

import json
import tomllib

from task_pipeline.graph import Node, build_graph, guess_edges, guess_output_names, render_dot, render_mermaid
from task_pipeline.manifest import parse_manifest
from task_pipeline.starter import starter_text

# -- pure functions -------------------------------------------------------------------


def test_guess_output_names_reads_files_written_under_output_dir():
    script = """
    for i in 1 2; do echo $i > "$OUTPUT_DIR/process_$i.txt"; done
    cp "$INPUT_FILE" ${OUTPUT_DIR}/done.json
    echo x >$OUTPUT_DIR/report_a.csv; echo y > "$OUTPUT_DIR/$INPUT_NAME"
    echo "$OUTPUT_DIRX/nope"
    """
    assert guess_output_names(script) == ["process_$i.txt", "done.json", "report_a.csv"]


def test_guess_edges_route_guessed_names_like_real_outputs():
    steps = [
        ("fetch", 'echo a > "$OUTPUT_DIR/parse_1.txt"; echo b > "$OUTPUT_DIR/img_1.png"', ("fetch",)),
        ("parse", 'cp "$INPUT_FILE" "$OUTPUT_DIR/done_x"', ("parse",)),
        ("thumb", 'echo > "$OUTPUT_DIR/unknown_1"', ("*.png",)),
    ]
    assert guess_edges(steps) == [("fetch", "parse"), ("fetch", "thumb"), ("parse", "done")]


def _graph():
    steps = [Node("fetch", start=True, version=1), Node("parse-it", version=2)]
    observed = {("fetch", "parse-it"): 3, ("parse-it", "done"): 3, ("old", "parse-it"): 1}
    guessed = [("fetch", "parse-it"), ("parse-it", "extra")]
    return build_graph(steps, observed, guessed)


def test_build_graph_merges_observed_and_guessed_edges():
    g = _graph()
    names = [n.name for n in g.nodes]
    assert names == ["fetch", "parse-it", "old", "extra", "done"]
    by = {(e.src, e.dst): e for e in g.edges}
    assert by[("fetch", "parse-it")].observed == 3 and by[("fetch", "parse-it")].guessed
    assert not by[("fetch", "parse-it")].dashed
    assert by[("parse-it", "extra")].dashed and by[("parse-it", "extra")].observed == 0
    assert {n.name for n in g.nodes if n.removed} == {"old", "extra"}
    assert g.to_json()["nodes"][0] == {"id": "fetch", "start": True, "terminal": False, "version": 1, "removed": False,
                                       "gather": False}


def test_render_mermaid_and_dot():
    g = _graph()
    m = render_mermaid(g)
    assert m.startswith("flowchart LR\n")
    assert '    step_fetch(["fetch v1 (start)"])' in m
    assert "    step_fetch -->|3| step_parse_it" in m
    assert "    step_parse_it -.-> step_extra" in m
    assert "    step_parse_it -->|3| done" in m and "done(((done)))" in m
    d = render_dot(g)
    assert d.startswith("digraph pipeline {") and d.rstrip().endswith("}")
    assert '"fetch" [label="fetch v1 (start)", peripheries=2];' in d
    assert '"parse-it" -> "extra" [style=dashed];' in d
    assert '"fetch" -> "parse-it" [label="3"];' in d
    assert '"done" [shape=doublecircle' in d


# -- graph on a store ------------------------------------------------------------------


PIPE = """
[[step]]
name = "fetch"
start = true
script = 'for i in 1 2; do echo $i > "$OUTPUT_DIR/work_$i.txt"; done'

[[step]]
name = "work"
script = 'cp "$INPUT_FILE" "$OUTPUT_DIR/done.txt"'

[[step]]
name = "later"
script = 'cp "$INPUT_FILE" "$OUTPUT_DIR/done.txt"'
"""


def test_graph_command_shows_observed_routing_and_guesses(cli):
    m = cli.manifest(PIPE)
    cli.ok("-manifest", m, "-db", cli.db, "-run")
    data = json.loads(cli.ok("graph", "-db", cli.db, "--json").out)
    nodes = {n["id"]: n for n in data["nodes"]}
    assert nodes["fetch"]["start"] and not nodes["work"]["start"] and nodes["done"]["terminal"]
    edges = {(e["from"], e["to"]): e for e in data["edges"]}
    assert set(edges) == {("fetch", "work"), ("work", "done")}
    assert edges[("fetch", "work")]["observed"] == 2 and not edges[("fetch", "work")]["dashed"]

    # with the manifest, a step that has not run yet still shows its guessed edge, dashed
    m.write_text(PIPE.replace("$OUTPUT_DIR/done.txt\"'\n\n[[step]]\nname = \"later\"",
                              "$OUTPUT_DIR/later_x.txt\"'\n\n[[step]]\nname = \"later\""))
    data = json.loads(cli.ok("graph", "-m", m, "-db", cli.db, "--json").out)
    edges = {(e["from"], e["to"]): e for e in data["edges"]}
    assert edges[("work", "later")]["dashed"] and edges[("work", "later")]["guessed"]
    assert edges[("work", "done")]["observed"] == 2
    assert edges[("later", "done")]["dashed"]

    assert "step_work -.-> step_later" in cli.ok("graph", "-m", m, "-db", cli.db).out
    assert '"work" -> "later" [style=dashed];' in cli.ok("graph", "-m", m, "-db", cli.db, "--format", "dot").out


def test_graph_without_manifest_or_store_is_a_usage_error(cli):
    r = cli("graph", "-db", cli.tmp / "none")
    assert r.returncode == 2 and "graph needs a manifest" in r.err


# -- init -------------------------------------------------------------------------------


def test_starter_text_is_commented_valid_and_round_trips():
    text = starter_text()
    m = parse_manifest(text)
    assert [s.name for s in m.steps] == ["fetch", "process"] and m.steps[0].start
    assert sum(line.startswith("#") for line in text.splitlines()) > 15
    assert "\\\"" not in text   # scripts are readable literal strings, not escaped quotes
    assert tomllib.loads(text)["step"][1]["name"] == "process"


def test_init_writes_a_manifest_that_runs_and_refuses_to_overwrite(cli):
    r = cli.ok("init")
    path = cli.tmp / "pipeline.toml"
    assert path.exists() and "wrote pipeline.toml" in r.err
    first = path.read_text()
    r = cli("init")
    assert r.returncode == 2 and "already exists" in r.err and len(r.err.strip().splitlines()) == 1
    assert path.read_text() == first
    cli.ok("-manifest", path, "-db", cli.db, "-run")
    st = {s["step"]: s for s in json.loads(cli.ok("status", "-db", cli.db, "--json").out)["steps"]}
    assert st["fetch"]["done"] == 1 and st["process"]["done"] == 3 and st["process"]["failed"] == 0

    cli.ok("init", "other.toml")
    assert (cli.tmp / "other.toml").read_text() != ""
    (cli.tmp / "sub").mkdir()
    cli.ok("init", "sub")
    assert (cli.tmp / "sub" / "pipeline.toml").exists()
