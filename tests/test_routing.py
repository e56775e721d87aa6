"""Routing (SPEC section 3): the route key of a file name, which steps consume it, fan-out,
the terminal key `done`, unrouted outputs, and `matches` (back-filling a new consumer)."""

from __future__ import annotations

import pytest

from task_pipeline.manifest import parse_manifest
from task_pipeline.routing import TERMINAL, Router, is_glob, matches, route_key


@pytest.mark.parametrize("name, key", [
    ("process_001.txt", "process"),
    ("done.json", "done"),
    ("a.b.c", "a.b"),
    ("x", "x"),
    ("a_b_c.txt", "a"),
    ("process", "process"),
    ("process_001", "process"),
    ("process.txt", "process"),
    ("count_shout_world.txt", "count"),
    ("done", "done"),
    ("done_42.json", "done"),
    ("a.b_c.d", "a.b"),         # the extension goes first, then the part before '_'
    ("a_b.c.d", "a"),
    ("tar.gz", "tar"),
    ("data.tar.gz", "data.tar"),
    ("x.", "x"),
    ("_x.txt", ""),             # an empty key: no step can consume it
    ("Process_1.txt", "Process"),  # keys are case-sensitive
    ("café_1.txt", "café"),
    ("a b_c", "a b"),
])
def test_route_key(name, key):
    assert route_key(name) == key


def test_route_key_of_a_dot_name_keeps_the_leading_dot():
    # Outputs starting with '.' are rejected by the executor; the key function itself must not crash.
    assert route_key(".hidden") == ".hidden"
    assert route_key(".") == "."
    assert route_key("") == ""


@pytest.mark.parametrize("pattern, glob", [
    ("process", False), ("a.b", False), ("raw_*", True), ("?x", True), ("[ab]c", True), ("a]", False),
])
def test_is_glob(pattern, glob):
    assert is_glob(pattern) is glob


def router(*consumers: tuple[str, list[str]]) -> Router:
    return Router.build(consumers)


def test_exact_keys():
    r = router(("shout", ["shout"]), ("count", ["count"]))
    assert r.consumers("shout_world.txt") == ("shout",)
    assert r.consumers("count_shout_world.txt") == ("count",)
    assert r.consumers("shout") == ("shout",)
    assert r.consumers("shouting_x") == ()  # the key is 'shouting', not a prefix match
    assert r.consumers("Shout_x") == ()


def test_fan_out_in_manifest_order_without_duplicates():
    r = router(("b", ["item"]), ("a", ["item", "item"]), ("c", ["other"]), ("d", ["item"]))
    assert r.consumers("item_1.txt") == ("b", "a", "d")
    assert r.consumers("other") == ("c",)


def test_globs_match_the_whole_file_name():
    r = router(("csv", ["*.csv"]), ("raw", ["raw_*"]), ("one", ["?.txt"]))
    assert r.consumers("report_1.csv") == ("csv",)
    assert r.consumers("report_1.csv.bak") == ()       # whole name, not a search
    assert r.consumers("raw_2024.json") == ("raw",)
    assert r.consumers("rawdata.json") == ()
    assert r.consumers("a.txt") == ("one",)
    assert r.consumers("ab.txt") == ()
    assert r.consumers("REPORT.CSV") == ()             # case-sensitive on every platform


def test_a_key_and_a_glob_to_the_same_step_give_one_task():
    r = router(("s", ["item", "item_*"]), ("t", ["*.txt"]))
    assert r.consumers("item_1.txt") == ("s", "t")
    assert r.consumers("item.csv") == ("s",)


def test_exact_consumers_come_before_glob_consumers():
    r = router(("g", ["*"]), ("e", ["k"]))
    assert r.consumers("k_1") == ("e", "g")


@pytest.mark.parametrize("name", ["done", "done.json", "done_001.txt", "done_x_y.csv"])
def test_done_is_terminal_even_for_a_catch_all_glob(name):
    r = router(("all", ["*"]), ("d", ["done*"]))
    assert route_key(name) == TERMINAL
    assert r.consumers(name) == ()
    assert not r.is_unrouted(name)
    assert not matches(["*", "done*"], name)


def test_unrouted():
    r = router(("shout", ["shout"]), ("csv", ["*.csv"]))
    assert r.is_unrouted("shuot_1.txt")  # a typo
    assert r.is_unrouted("_x")
    assert not r.is_unrouted("shout_1.txt")
    assert not r.is_unrouted("x.csv")
    assert not r.is_unrouted("done.txt")
    empty = router()
    assert empty.is_unrouted("anything") and empty.consumers("anything") == ()


@pytest.mark.parametrize("patterns, name, expect", [
    (["process"], "process_001.txt", True),
    (["process"], "process.txt", True),
    (["process"], "processed_1.txt", False),
    (["a.b"], "a.b.c", True),
    (["a"], "a.b.c", False),
    (["*.csv"], "x_1.csv", True),
    (["*.csv"], "x_1.csv.gz", False),
    (["x", "*.csv"], "y.csv", True),
    ([], "x", False),
    (["done"], "done.json", False),
])
def test_matches(patterns, name, expect):
    assert matches(patterns, name) is expect


@pytest.mark.parametrize("name", [
    "process_001.txt", "a.b.c", "x", "x_1.csv", "done.json", "zzz", "raw_1", "report.csv", "_x", "a.b_c.d",
])
def test_matches_agrees_with_the_router(name):
    consumers = [("process", ["process"]), ("ab", ["a.b"]), ("x", ["x", "*.csv"]), ("raw", ["raw_*"])]
    r = Router.build(consumers)
    assert r.consumers(name) == tuple(s for s, pats in consumers if matches(pats, name))


def test_router_from_a_manifest_uses_consumes():
    m = parse_manifest('''
[[step]]
name = "fetch"
start = true
script = "true"
[[step]]
name = "shout"
script = "true"
[[step]]
name = "count"
inputs = ["count", "*.log"]
script = "true"
[[step]]
name = "audit"
inputs = ["shout"]
script = "true"
''')
    # as the store builds it: start steps take no inputs
    r = Router.build((s.name, s.consumes) for s in m.steps if not s.start)
    assert r.consumers("shout_world.txt") == ("shout", "audit")
    assert r.consumers("count_x") == ("count",)
    assert r.consumers("x.log") == ("count",)
    assert r.is_unrouted("fetch_1")  # named after a start step, which consumes nothing
    assert r.is_unrouted("cuont_x")
