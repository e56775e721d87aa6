"""Gather steps, the pure part (gathering.py): the listing that is a set's identity, name clashes,
and which steps can feed a gather step, read from the routing graph and the scripts."""

from __future__ import annotations

import pytest

from task_pipeline.gathering import (
    Shape, collisions, feeds, firing_order, listing, parse_listing, unsafe_name, upstream, written_names,
)

H1, H2 = "1" * 64, "2" * 64


def test_the_listing_is_canonical_sorted_and_distinct():
    a = listing([("b.txt", H2), ("a.txt", H1), ("b.txt", H2)])
    assert a == f"a.txt\t{H1}\nb.txt\t{H2}\n".encode()
    assert listing([("a.txt", H1), ("b.txt", H2)]) == a          # order and repeats do not matter
    assert listing([("a.txt", H1), ("b.txt", H1)]) != a          # content does
    assert parse_listing(a) == [("a.txt", H1), ("b.txt", H2)]
    assert listing([]) == b"" and parse_listing(b"") == []


@pytest.mark.parametrize("data", [b"no tab\n", b"a\t\n", f"b\t{H1}\na\t{H1}\n".encode(), b"\xff\t1\n"])
def test_a_damaged_listing_is_refused(data):
    with pytest.raises((ValueError, UnicodeDecodeError)):
        parse_listing(data)


def test_collisions_are_names_with_more_than_one_content():
    assert collisions([("a", H1), ("b", H1), ("a", H2)]) == {"a": [H1, H2]}
    assert collisions([("a", H1), ("b", H1)]) == {}
    assert [n for n in (".", "..", ".hidden", "a/b", "ok.txt") if unsafe_name(n)] == [".", "..", ".hidden", "a/b"]


@pytest.mark.parametrize("script, names", [
    ('echo > "$OUTPUT_DIR/count_1.txt"', [("count_1.txt", "count", False)]),
    ('for i in 1 2; do echo $i > "${OUTPUT_DIR}/count_$i.txt"; done', [("count_$i.txt", "count", True)]),
    ("cp x $OUTPUT_DIR/done.json", [("done.json", "done", False)]),
    ('echo > "$OUTPUT_DIR/$NAME"', None),                 # the name, so the key, is a variable
    ('echo > "$OUTPUT_DIR/report$N.txt"', None),           # the first '_' could come from $N
    ('echo > "$OUTPUT_DIR/a.b_$N"', None),                 # the extension rule makes the key unknowable
    ('cd "$OUTPUT_DIR" && echo > count_1', None),          # OUTPUT_DIR used otherwise
    ('python3 -c "import os; open(os.environ[\'OUTPUT_DIR\'] + \'/count_1\', \'w\')"', None),
    ("./make-outputs.sh", None),                           # does not mention OUTPUT_DIR at all
])
def test_what_a_script_visibly_writes(script, names):
    assert written_names(script) == names


GEN = Shape("gen", 'for i in 1 2; do echo > "$OUTPUT_DIR/count_$i.txt"; done', (), start=True)
COUNT = Shape("count", 'wc < "$INPUT_FILE" > "$OUTPUT_DIR/words_$INPUT_NAME"', ("count",))
REPORT = Shape("report", 'cat "$INPUT_DIR"/* > "$OUTPUT_DIR/total.txt"', ("words",), gather=True)
PUBLISH = Shape("publish", 'cp "$INPUT_FILE" "$OUTPUT_DIR/done_total"', ("total",))
SIDE = Shape("side", 'echo > "$OUTPUT_DIR/done_side"', ("side",))


def test_upstream_is_transitive_and_leaves_out_steps_that_cannot_feed():
    assert feeds([GEN, COUNT, REPORT, PUBLISH, SIDE]) == {
        "gen": {"count"}, "count": {"report"}, "report": {"publish"}, "publish": set(), "side": set()}
    assert upstream([GEN, COUNT, REPORT, PUBLISH, SIDE]) == {"report": {"gen", "count"}}


def test_a_script_whose_outputs_cannot_be_read_feeds_every_step():
    opaque = Shape("opaque", 'python3 make.py', ("side",))
    up = upstream([GEN, COUNT, REPORT, PUBLISH, SIDE, opaque])
    assert up["report"] == {"gen", "count", "opaque"}
    # ... and what feeds it is upstream too, transitively
    assert upstream([GEN, Shape("count", "./count.sh", ("count",)), REPORT, SIDE])["report"] == {"gen", "count"}


def test_glob_inputs_are_matched_against_literal_names_and_assumed_for_variable_ones():
    g = Shape("g", 'cat "$INPUT_DIR"/* > "$OUTPUT_DIR/done_all"', ("*.csv",), gather=True)
    lit = Shape("lit", 'echo > "$OUTPUT_DIR/table_1.csv"', ("lit",))
    txt = Shape("txt", 'echo > "$OUTPUT_DIR/table_1.txt"', ("txt",))
    var = Shape("var", 'echo > "$OUTPUT_DIR/table_$N.csv"', ("var",))
    assert upstream([lit, txt, var, g])["g"] == {"lit", "var"}


def test_a_gather_step_is_not_its_own_upstream_and_gather_steps_fire_in_order():
    again = Shape("again", 'cat "$INPUT_DIR"/* > "$OUTPUT_DIR/done_all"', ("total",), gather=True)
    loop = Shape("report", 'cat "$INPUT_DIR"/* > "$OUTPUT_DIR/words_all"', ("words",), gather=True)
    up = upstream([GEN, COUNT, REPORT, again])
    assert up == {"report": {"gen", "count"}, "again": {"gen", "count", "report"}}
    assert firing_order(up) == ["report", "again"]
    assert "report" not in upstream([GEN, COUNT, loop])["report"]
