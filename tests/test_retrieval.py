"""BM25 retrieval and de-duplication: a real search over the HotPotQA paragraphs, built once per
process, traced as function nodes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from autodiff.errors import DataError
from autodiff.graph import Runtime, Value, activate, deactivate
from autodiff.records import Trace
from autodiff.tasks import retrieval
from autodiff.tasks.hotpotqa import corpus_index, load_splits, read_rows
from autodiff.tasks.retrieval import BM25Index, Passage, build_corpus, cached_index, dedupe, make_dedupe, make_retriever

SMALL = [
    Passage("Danube", "The Danube is a river of Central and Eastern Europe, about 2,850 km long."),
    Passage("Rhine", "The Rhine is a European river that flows into the North Sea."),
    Passage("Lake Tahoe", "Lake Tahoe is a large freshwater lake in the Sierra Nevada."),
    Passage("Sierra Nevada", "The Sierra Nevada is a mountain range in the western United States."),
]


def test_build_corpus_keeps_first_occurrences_in_order():
    corpus = build_corpus([("A", "one  two"), ("B", "three"), ("A", "one two"), ("C", "  "), ("B", "four")])
    assert corpus == [Passage("A", "one two"), Passage("B", "three"), Passage("B", "four")]
    assert str(corpus[0]) == "A: one two"


def test_search_ranks_by_bm25_and_respects_k():
    index = BM25Index(SMALL)
    assert index.search("Which lake is in the Sierra Nevada?", 1) == [str(SMALL[2])]
    top = index.search("Sierra Nevada mountain range", 2)
    assert top[0] == str(SMALL[3]) and len(top) == 2
    assert len(index.search("river Europe", 10)) == 2  # only passages that match at all
    assert index.search("zzzq qqxv", 3) == []  # no known word: nothing, not arbitrary passages
    assert index.search("", 3) == [] and index.search("the of and", 3) == []


def test_empty_corpus_and_bad_k_are_clear_errors():
    with pytest.raises(DataError, match="empty corpus"):
        BM25Index([])
    with pytest.raises(DataError, match="top-k"):
        make_retriever(BM25Index(SMALL), k=0)


def test_dedupe_keeps_earlier_passages_first_and_each_once():
    assert dedupe(["b", "a", "B ", "c"], earlier=["a", "d"]) == ["a", "d", "b", "c"]
    assert dedupe(["x", "x", ""]) == ["x"]
    assert dedupe([]) == []


def test_retriever_and_dedupe_are_traced_function_nodes():
    index = BM25Index(SMALL)
    retriever, dd = make_retriever(index, k=2), make_dedupe()
    trace = Trace("s1")
    token = activate(Runtime(llm=None, sample_id="s1", trace=trace))
    try:
        found = retriever(Value("Sierra Nevada lake", source="q-inv", node="query_generator"))
        merged = dd(found, earlier=Value([str(SMALL[0])], source="earlier-inv"))
    finally:
        deactivate(token)
    ret, ded = trace.invocations
    assert (ret.node, ret.node_type, ret.inputs[0].name, ret.inputs[0].source) == ("retriever", "function", "query",
                                                                                   "q-inv")
    assert found.data == [str(SMALL[2]), str(SMALL[3])] and found.source == ret.id
    assert [(r.name, r.source) for r in ded.inputs] == [("passages", ret.id), ("earlier", "earlier-inv")]
    assert merged.data == [str(SMALL[0]), str(SMALL[2]), str(SMALL[3])]


def test_cached_index_is_built_once_even_under_concurrent_first_use():
    built = []

    def passages():
        built.append(1)
        time.sleep(0.05)
        return SMALL

    key = f"test-{time.time_ns()}"
    results = []
    threads = [threading.Thread(target=lambda: results.append(cached_index(key, passages))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and len({id(r) for r in results}) == 1
    retrieval._INDEXES.pop(key)


def test_hotpotqa_corpus_is_the_whole_subset_and_searches_for_real():
    rows = read_rows()
    paragraphs = sum(len(r["context"]) for r in rows)
    started = time.perf_counter()
    index = corpus_index()
    first = time.perf_counter() - started
    assert corpus_index() is index  # kept for the process
    assert 9_500 <= len(index) <= paragraphs  # about 10,000 passages, exact repeats removed
    # the gold paragraphs are found by searching, not looked up: most questions get one in their top 3
    val = load_splits()["val"]
    hits = sum(any(p.split(":", 1)[0] in s["supporting_titles"] for p in index.search(s["question"], 3)) for s in val)
    assert hits >= 60, hits
    assert first < 30  # a second or two normally; generous for slow shared machines


def test_importing_the_tasks_builds_nothing_and_writes_no_file(tmp_path):
    code = (
        "import autodiff.tasks.retrieval as r, autodiff.tasks.hotpotqa, autodiff.tasks;"
        "autodiff.tasks.load_task; assert r._INDEXES == {}, r._INDEXES"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=120)
    assert list(tmp_path.iterdir()) == []


def test_a_bound_method_or_partial_is_a_function_node_with_the_right_input_names():
    import functools

    from autodiff.graph import function_node

    index = BM25Index(SMALL)
    by_method = function_node(index.search, name="retriever")  # `self` is not an input
    by_partial = function_node(functools.partial(index.search, k=1))
    trace = Trace("s1")
    token = activate(Runtime(llm=None, sample_id="s1", trace=trace))
    try:
        by_method(Value("Danube river", source="q0"), 1)
        found = by_partial(Value("Sierra Nevada lake", source="q1"))
    finally:
        deactivate(token)
    assert [[(r.name, r.source) for r in inv.inputs] for inv in trace.invocations] == [
        [("query", "q0"), ("k", None)], [("query", "q1")]]
    assert found.data == [str(SMALL[2])] and by_partial.name == "partial"
