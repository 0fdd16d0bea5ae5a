"""The pipeline graph (the model in autodiff.graphview, its drawing in dashboard.graphview) and the
Graph, Gradients and Prompts pages.

Stores come from real engine runs on scripted fakes: tests.fake_runs.filled_store for object
counting, and a multi-hop pipeline below (query generator called twice around a retriever, then
de-duplication and an answer generator) for repeated calls and function nodes.
"""

from __future__ import annotations

import html
import json
import re
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from autodiff.config import make_config
from autodiff import graphview as gv
from autodiff.evals import exact_match
from autodiff.graph import LLMNode, Loss, Value, function_node
from autodiff.llm.fake import FakeProvider
from autodiff.llm.types import Request
from autodiff.parameter import Parameter
from autodiff.pipeline import Pipeline, Task
from autodiff.prompts import BACKWARD_SYSTEM, OPTIMIZER_SYSTEM
from autodiff.records import Gradient, InputRef, Invocation
from autodiff.runner import train
from autodiff.store import Store
from dashboard import graphview as draw
from dashboard import textfold
from tests.fake_runs import HOSTILE, filled_store
from tests.test_dashboard_pages import html_table_rows

ROOT = Path(__file__).resolve().parents[1]
PAGES = ROOT / "pages"
MULTIHOP_TASK = f"{Path(__file__).resolve()}:multihop_task"
QUERY_INSTRUCTION = "Write one search query for the next hop of the question."
ANSWER_INSTRUCTION = "Answer the question from the passages."
BETTER_ANSWER = "Answer the question from the passages with the city name only. CITY"


# --- a multi-hop pipeline: query_generator#0 -> retrieve#0 -> query_generator#1 -> retrieve#1 ---

def _retrieve(query: str) -> list[str]:
    return [f"Passage for {query}", "A shared passage"]


def _dedupe(first: list[str], second: list[str]) -> list[str]:
    return list(dict.fromkeys([*first, *second]))


class MultiHop(Pipeline):
    def __init__(self) -> None:
        self.query = Parameter("query_generator.instruction", QUERY_INSTRUCTION, role="How to write each query.")
        self.answer = Parameter("answer_generator.instruction", ANSWER_INSTRUCTION, role="How to answer.")
        self.query_generator = LLMNode("query_generator", [self.query])
        self.answer_generator = LLMNode("answer_generator", [self.answer])
        self.retrieve = function_node(_retrieve, name="retrieve")
        self.dedupe = function_node(_dedupe, name="dedupe")

    def forward(self, sample: dict) -> Value:
        first = self.retrieve(self.query_generator(question=sample["question"]))
        second = self.retrieve(self.query_generator(question=sample["question"], context=first))
        return self.answer_generator(question=sample["question"], context=self.dedupe(first, second))


def multihop_task() -> Task:
    def samples(split: str, n: int) -> list[dict]:
        return [{"id": f"{split}-{i}", "question": f"Where was person {i} born?", "answer": "Paris"}
                for i in range(n)]

    return Task("multihop", MultiHop(), Loss(exact_match, "exact_match"),
                {"train": samples("train", 4), "val": samples("val", 3), "test": samples("test", 2)}, tau=1.0)


def multihop_responder(request: Request) -> str:
    system = request.messages[0].content if len(request.messages) > 1 else ""
    text = request.messages[-1].content
    if system == OPTIMIZER_SYSTEM:
        value = BETTER_ANSWER if "`answer_generator.instruction`" in text else QUERY_INSTRUCTION + " Name the entity."
        return f"<proposal><method>rephrase</method><reasoning>be precise</reasoning><value>{value}</value></proposal>"
    if system == BACKWARD_SYSTEM:
        return f"<feedback>Look for the birthplace. {HOSTILE}</feedback>"
    if text.startswith(QUERY_INSTRUCTION):
        return "query two" if "Context:" in text else "query one"
    return "Paris" if "CITY" in text else "I do not know"


def multihop_run(store: Store, cache: Path) -> str:
    return train(
        store, make_config(task=MULTIHOP_TASK, forward_model="fake:forward", backward_model="fake:backward", optimizer_model="fake:optimizer", steps=1, batch_size=2, proposals=1),
        cache_path=cache, providers={"fake": FakeProvider(multihop_responder)},
    )


@pytest.fixture(scope="module")
def counting(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, list[str]]:
    return filled_store(tmp_path_factory.mktemp("counting"))


@pytest.fixture(scope="module")
def multihop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, str]:
    path = tmp_path_factory.mktemp("multihop")
    store = Store(path / "runs.sqlite")
    return store, multihop_run(store, path / "cache.sqlite")


# --- the graph model ---------------------------------------------------------------------------

def test_object_counting_graph(counting):
    store, (run_id, _) = counting
    g = gv.build_graph(store.invocations(run_id, 1), store.gradients(run_id, 1), store.parameters(run_id))
    params = ["counter.instruction", "counter.output_format", "counter.examples"]
    assert sorted(g.nodes) == sorted(["node:counter", "node:integer_match", *(f"param:{p}" for p in params)])
    assert [g.nodes[v]["kind"] for v in ("node:counter", "node:integer_match")] == ["llm", "loss"]
    assert sorted(g.edges) == sorted([("node:counter", "node:integer_match"),
                                      *((f"param:{p}", "node:counter") for p in params)])
    edge = g.edges["node:counter", "node:integer_match"]
    assert edge["calls"] == [(0, 0)] and draw.edge_label(edge) == ""
    assert edge["samples"] == 4
    failed = store.steps(run_id)[1].failed_samples
    assert g.nodes["node:integer_match"]["failed_samples"] == len(failed) > 0
    assert g.nodes["node:counter"]["failing"] == len(failed)  # one loss gradient per failed sample
    assert all(g.nodes[f"param:{p}"]["failing"] == len(failed) for p in params)
    assert gv.node_names(g) == ["counter", "integer_match"]


def test_repeated_calls_are_labelled_with_call_indices(multihop):
    store, run_id = multihop
    g = gv.build_graph(store.invocations(run_id, 1), store.gradients(run_id, 1), store.parameters(run_id))
    assert gv.node_names(g) == ["query_generator", "retrieve", "dedupe", "answer_generator", "exact_match"]
    kinds = {d["name"]: d["kind"] for _v, d in g.nodes(data=True)}
    assert kinds["retrieve"] == kinds["dedupe"] == "function" and kinds["exact_match"] == "loss"
    assert g.nodes["node:query_generator"]["calls"] == [0, 1]
    label = {(g.nodes[u]["name"], g.nodes[v]["name"]): draw.edge_label(d) for u, v, d in g.edges(data=True)}
    assert label[("query_generator", "retrieve")] == "0→0, 1→1"
    assert label[("retrieve", "query_generator")] == "0→1"
    assert label[("retrieve", "dedupe")] == "0→0, 1→0"
    assert label[("dedupe", "answer_generator")] == ""  # neither end repeats
    assert ("param:query_generator.instruction", "node:query_generator") in g.edges
    # feedback on the answer passed through dedupe and retrieve back to the query generator
    assert g.nodes["node:query_generator"]["failing"] > 0 and g.nodes["node:retrieve"]["failing"] > 0
    passed = [x for x in store.gradients(run_id, 1) if x.target == "query_generator" and x.path]
    assert passed and "retrieve" in passed[0].path
    page = draw.render_html(g, selected="query_generator")
    assert {"0→0, 1→1", "0→1"} <= set(drawn_texts(drawing(page)))  # edge labels, placed beside their edges
    assert draw.external_resources(page) == [] and "src=" not in page and "href=" not in page


def drawing(page: str) -> str:
    """The SVG markup the Graph page's HTML (dashboard.graphview.render_html) puts in place: the
    JSON string in its data block."""
    found = re.search(r'<script type="application/json">(.*?)</script>', page, re.S)
    assert found, "no drawing in the page"
    return json.loads(found[1])


def drawn_texts(svg: str) -> list[str]:
    """Every line of text the drawing shows (node and edge labels), as a browser reads it."""
    return [html.unescape(t) for t in re.findall(r"<tspan [^>]*>([^<]*)</tspan>", svg)]


def drawn_nodes(svg: str) -> dict[str, dict]:
    """Vertex id -> its classes and its fills in the two palettes."""
    return {html.unescape(v): {"classes": c.split(), **dict(re.findall(r"--fill-(\w+): (#[0-9a-f]{6})", style))}
            for c, v, style in re.findall(r'<g class="node ([^"]*)" data-id="([^"]*)" style="([^"]*)">', svg)}


def graph_html(at: AppTest) -> str:
    """The HTML of the drawing on a Graph page run by AppTest."""
    [page] = [h.proto.body for h in at.get("html") if 'class="graph-drawing' in h.proto.body]
    return page


def agent_invocations(retrieve: str = "retrieve") -> list[Invocation]:
    """One sample's trace of a ReAct-like agent: planner#0 -> retrieve#0 -> planner#1 -> retrieve#1
    (which also reads retrieve#0) -> planner#2 -> finish -> loss: a loop, a self-loop and an edge
    that skips a node."""
    def inv(i: str, node: str, kind: str, call: int, inputs=(), parameters=(), score=None) -> Invocation:
        return Invocation(i, "s", node, kind, call, tuple(InputRef(name, "text", src) for name, src in inputs), "",
                          tuple(parameters), score=score)

    plan = (("planner.instruction", "Plan."), ("planner.tools", "retrieve, finish"))
    return [inv("p0", "planner", "llm", 0, [("question", None)], plan),
            inv("r0", retrieve, "function", 0, [("query", "p0")]),
            inv("p1", "planner", "llm", 1, [("observation", "r0")], plan),
            inv("r1", retrieve, "function", 1, [("query", "p1"), ("seen", "r0")]),
            inv("p2", "planner", "llm", 2, [("observation", "r1")], plan),
            inv("f0", "finish", "function", 0, [("answer", "p2")]),
            inv("l0", "exact_match", "loss", 0, [("prediction", "f0")], score=0.0)]


def assert_readable(g) -> draw.Layout:
    """Every node and edge label has its own place: no two boxes overlap, no arc crosses a node
    other than its ends, and every edge label sits beside an edge that has one."""
    where = draw.layout(g)
    boxes = [*where.boxes.items(), *((f"label {lab.text}", lab.box) for lab in where.labels)]
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1:]:
            assert not box_a.overlaps(box_b, gap=0), (a, b)
    for (u, v), points in where.curves.items():
        for w, box in where.boxes.items():
            if w not in (u, v):
                assert not any(box.contains(x, y) for x, y in points), (u, v, w)
    labelled = {(u, v) for u, v, d in g.edges(data=True) if d["kind"] == "data" and draw.edge_label(d)}
    assert sorted(lab.edge for lab in where.labels) == sorted(labelled)
    assert set(where.smooth) == {(u, v) for u, v, d in g.edges(data=True) if d["kind"] == "data"}
    return where


def test_the_layout_keeps_every_label_clear(counting, multihop):
    store, (run_id, _) = counting
    assert_readable(gv.build_graph(store.invocations(run_id, 1), store.gradients(run_id, 1), store.parameters(run_id)))
    store, run_id = multihop
    g = gv.build_graph(store.invocations(run_id, 1), store.gradients(run_id, 1), store.parameters(run_id))
    where = assert_readable(g)
    assert where.smooth[("node:retrieve", "node:query_generator")]["type"] == "curvedCCW"  # the loop arcs
    assert where.smooth[("node:query_generator", "node:retrieve")] == {"enabled": False}
    agent = gv.build_graph(agent_invocations())
    where = assert_readable(agent)
    assert ("node:retrieve", "node:retrieve") in where.curves  # the self-loop's label clears its circle
    assert where.smooth[("node:planner", "node:finish")]["type"] == "curvedCW"  # skips retrieve, on the right
    # parameters stacked left of their node, nodes top to bottom in the order they ran
    ys = [where.boxes[gv.node_id(n)].y for n in gv.node_names(agent)]
    assert ys == sorted(ys)
    assert all(where.boxes[f"param:planner.{p}"].x < where.boxes["node:planner"].x for p in ("instruction", "tools"))
    # a node between too wide for an arc to pass: a detour right of it and of its self-loop's label
    wide = "retrieve_passages_from_the_whole_corpus_with_bm25"
    where = assert_readable(gv.build_graph(agent_invocations(wide)))
    [top, bottom] = where.routes[("node:planner", "node:finish")]
    assert top[0] == bottom[0] > max(b.x + b.w / 2 for b in [where.boxes[f"node:{wide}"], *(
        lab.box for lab in where.labels if lab.edge == (f"node:{wide}", f"node:{wide}"))])


def test_the_drawing_is_shown_at_full_size_in_the_themes_colours(multihop):
    """Fonts of at least 14 px, drawn at scale 1 (the SVG's size is its view box's), as big as the
    layout; every colour from the theme's palette, both palettes in the style sheet."""
    store, run_id = multihop
    g = gv.build_graph(store.invocations(run_id, 1), store.gradients(run_id, 1), store.parameters(run_id))
    where = draw.layout(g)
    for theme in ("light", "dark"):
        page = draw.render_html(g, selected="query_generator", theme=theme, where=where)
        svg = drawing(page)
        assert f'class="graph-drawing {theme}"' in page
        assert min(int(px) for px in re.findall(r"font-size: (\d+)px", svg)) >= 14
        size = re.search(r'<svg [^>]*width="(\d+)" height="(\d+)" viewBox="\S+ \S+ (\d+) (\d+)"', svg)
        assert size and size[1] == size[3] == str(where.width) and size[2] == size[4] == str(where.height)
        nodes = drawn_nodes(svg)
        assert set(nodes) == set(g.nodes)
        assert [v for v, n in nodes.items() if "selected" in n["classes"]] == ["node:query_generator"]
        for name in ("light", "dark"):
            colours = draw.palette(name)
            rule = re.search(rf"\.{name} \{{ ([^}}]*) \}}", page)[1]
            assert f"--text: {colours.text};" in rule and f"--bg: {colours.background};" in rule
            assert f"--edge: {colours.edge};" in rule and f"--loop: {colours.loop};" in rule
            worst = max(d["failing"] for _v, d in g.nodes(data=True))
            assert {v: n[name] for v, n in nodes.items()} == {
                v: draw.heat(d["failing"], worst, colours) for v, d in g.nodes(data=True)}
    assert draw.palette("dark").text != draw.palette("light").text
    assert draw.palette(None) == draw.LIGHT  # before the browser has told the theme
    assert draw.palette("dark", "#202020").background == "#202020"  # a theme's own background
    assert draw.palette("dark", "red; }").background == draw.DARK.background  # not a colour: ignored


def test_every_edge_is_drawn_from_outline_to_outline(multihop):
    """Each edge starts on its source's outline and its arrow's tip touches its target's (a
    straight edge between two rows: the bottom of one box, the top of the next), and a loop arcs
    back in the loop colour."""
    store, run_id = multihop
    g = gv.build_graph(store.invocations(run_id, 1), store.gradients(run_id, 1), store.parameters(run_id))
    where = draw.layout(g)
    svg = drawing(draw.render_html(g, where=where))
    paths = re.findall(r'<path class="edge e-(\w+)" d="([^"]*)"', svg)
    assert len(paths) == g.number_of_edges()
    points = {kind_d: [tuple(map(float, p.split(","))) for p in re.findall(r"-?[\d.]+,-?[\d.]+", kind_d[1])]
              for kind_d in paths}
    a, b = where.boxes["node:retrieve"], where.boxes["node:dedupe"]  # ellipses, one row after the other
    straight = [p for (kind, _d), p in points.items() if kind == "data" and len(p) == 2 and
                abs(p[0][1] - (a.y + a.h / 2)) < 0.2 and abs(p[1][1] - (b.y - b.h / 2)) < 0.2]
    assert straight, "no edge from the bottom of retrieve's ellipse to the top of dedupe's"
    assert any(kind == "loop" for kind, _d in paths)  # retrieve -> query_generator, back up
    assert sum(kind == "parameter" for kind, _d in paths) == sum(1 for _u, _v, d in g.edges(data=True)
                                                                 if d["kind"] == "parameter")


def test_the_drawing_holds_both_themes_escaped(multihop):
    """The page carries both palettes, so it can follow a switch in place (its script toggles the
    class); the drawing travels as JSON in a block that is never run, escaped for it."""
    store, run_id = multihop
    g = gv.build_graph(store.invocations(run_id, 1), store.gradients(run_id, 1), store.parameters(run_id))
    page = draw.render_html(g, theme="light")
    block = re.search(r'<script type="application/json">(.*?)</script>', page, re.S)[1]
    assert not set(block) & set("<>&\u2028\u2029")
    assert page.count("<script") == 2 and 'classList.toggle("dark", dark)' in page
    for theme in ("light", "dark"):
        assert f"--text: {draw.palette(theme).text};" in page


def test_node_text_meets_wcag_contrast_on_every_fill():
    """Text on the coldest and the hottest fill of each palette has at least WCAG 2.x's AA
    contrast for normal text, 4.5:1 (https://www.w3.org/TR/WCAG21/#contrast-minimum)."""
    def luminance(rgb):
        linear = [c / 255 / 12.92 if c / 255 <= 0.03928 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in rgb]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    for colours in (draw.LIGHT, draw.DARK):
        text = tuple(int(colours.text[i:i + 2], 16) for i in (1, 3, 5))
        for fill in (colours.cold, colours.hot):
            high, low = sorted((luminance(text), luminance(fill)), reverse=True)
            assert (high + 0.05) / (low + 0.05) >= 4.5, (colours.name, fill)


def test_repeated_text_is_folded():
    line = "The input `context` should have been different."
    pieces = textfold.fold("Intro.\n\n" + "\n\n".join([line] * 37) + "\n\nThe input `cont")
    assert pieces == [textfold.Piece("Intro.\n\n"), textfold.Piece(line, 37, cut_off=True)]
    assert textfold.folded_chars(pieces) == 36 * len(line)
    # a block of two lines, repeated
    block = "```\nThe instruction is not to blame."
    pieces = textfold.fold("Change it to:\n" + "\n".join([block] * 5))
    assert [(p.text, p.times) for p in pieces] == [("Change it to:\n", 1), (block, 5)]
    # a sentence repeated inside one line, then something else
    pieces = textfold.fold("Be exact about it. " * 4 + "Then stop.")
    assert [(p.text.strip(), p.times) for p in pieces] == [("Be exact about it.", 4), ("Then stop.", 1)]
    # ordinary writing is left alone: a phrase said twice, short repeats, no repeats
    for text in ("Count every item. Count every item. Be brief.", "no no no no", "One line.\nAnother line.", ""):
        assert textfold.fold(text) == [textfold.Piece(text)]
    long = "word " * 400
    assert not textfold.is_long("short") and textfold.is_long(long) and textfold.is_long("a\n" * 12)
    assert textfold.preview(long).endswith(" …") and len(textfold.preview(long)) <= textfold.PREVIEW_CHARS + 2


def about_call(gradient: Gradient, calls: dict[str, int]) -> int | None:
    """What a gradient is about, worked out here from the traces: for feedback on an output, the
    call that wrote the output; else the call of the node whose parameter it is about."""
    if gradient.target_type == "output" and gradient.target_invocation in calls:
        return calls[gradient.target_invocation]
    return gradient.call_index


def test_the_store_gives_a_nodes_gradients(multihop):
    """The Graph page asks the store for the gradients on a node: its output and its parameters."""
    store, run_id = multihop
    parameters = store.parameters(run_id)
    assert gv.targets_of("query_generator", parameters) == ["query_generator", "query_generator.instruction"]
    total, qg = store.find_gradients(run_id, targets=gv.targets_of("query_generator", parameters))
    assert total == len(qg) > 0
    assert {x.target for x in qg} == {"query_generator", "query_generator.instruction"}
    calls = store.invocation_call_indices(run_id)
    _, second = store.find_gradients(run_id, targets=["query_generator"], call_index=1)
    assert second and all(calls[x.target_invocation] == 1 for x in second) and len(second) < len(qg)
    # dedupe#0 hands feedback to both retrieve calls: each is about the call it reached
    handed = [x for x in store.find_gradients(run_id)[1] if x.node == "dedupe"]
    assert sorted(x.about_call for x in handed) == [0, 0, 1, 1]
    assert {x.call_index for x in handed} == {0}
    rows = draw.gradient_rows(qg)
    assert [r["call"] for r in rows] == [x.about_call for x in qg]
    assert all(r["from"] for r in rows)
    rows = draw.call_rows(store.invocations(run_id, 1), "query_generator")
    assert sorted(r["call"] for r in rows) == [0, 0, 1, 1]
    assert any("context ← retrieve#0" in r["inputs"] for r in rows)


def test_find_gradients_filters(multihop):
    """`Store.find_gradients` is the one reader of gradients for the pages: each filter checked
    against the gradients worked out here from every stored row."""
    store, run_id = multihop
    store.add_human_feedback(run_id, "be brief", node="query_generator", target="query_generator.instruction")
    gradients = store.gradients(run_id)
    calls = store.invocation_call_indices(run_id)
    sample = next(x.sample_id for x in gradients if x.sample_id)

    def expected(step=None, targets=None, sample=None, call_index=None, score=None) -> list[Gradient]:
        keep = [g for g in gradients
                if (step is None or g.step == step) and (targets is None or g.target in targets)
                and (sample is None or g.sample_id == sample)
                and (call_index is None or about_call(g, calls) == call_index)
                and (score is None or (g.score is None and score == (0.0, 1.0))
                     or (g.score is not None and score[0] <= g.score <= score[1]))]
        return sorted(keep, key=lambda g: g.created_at)

    cases = [{}, {"step": 1}, {"targets": ["query_generator"]}, {"targets": ["query_generator"], "call_index": 1},
             {"targets": ["query_generator", "query_generator.instruction"]}, {"sample": sample}, {"call_index": 0},
             {"score": (0.0, 1.0)}, {"score": (0.0, 0.5)}, {"score": (0.5, 1.0)}, {"targets": []}]
    for case in cases:
        want = expected(**case)
        total, rows = store.find_gradients(run_id, **case)
        assert total == len(want), case
        assert [x.id for x in rows] == [x.id for x in want], case
        assert [x.about_call for x in rows] == [about_call(x, calls) for x in want], case
    assert expected(score=(0.5, 1.0)) == []  # every traced sample failed
    assert any(x.origin == "human" for x in store.find_gradients(run_id, score=(0.0, 1.0))[1])
    assert not any(x.origin == "human" for x in store.find_gradients(run_id, score=(0.0, 0.5))[1])
    # a page: `limit` rows from `offset`, the total still counting every match
    total, page = store.find_gradients(run_id, limit=3, offset=2)
    assert total == len(gradients) and [x.id for x in page] == [x.id for x in expected()[2:5]]
    by_id = store.gradients_by_id(run_id, [page[1].id, page[0].id, "missing"])
    assert [x.id for x in by_id] == [page[1].id, page[0].id]
    assert [x.about_call for x in by_id] == [page[1].about_call, page[0].about_call]
    facets = store.gradient_facets(run_id)
    assert facets["total"] == len(gradients)
    assert facets["steps"] == sorted({x.step for x in gradients})
    assert facets["samples"] == sorted({x.sample_id for x in gradients if x.sample_id})
    assert facets["call_indices"] == sorted({about_call(x, calls) for x in gradients} - {None})
    assert facets["outputs"] == sorted({x.target for x in gradients if x.target_type == "output"})


# --- pages -----------------------------------------------------------------------------------

def open_page(name: str, store: Store, monkeypatch: pytest.MonkeyPatch, run_id: str | None = None) -> AppTest:
    monkeypatch.setenv("AUTODIFF_STORE", str(store.path))
    at = AppTest.from_file(str(PAGES / name), default_timeout=60)
    if run_id:
        at.session_state["run_id"] = run_id  # what the frame's sidebar picker sets
    at.run()
    assert not at.exception
    return at


def tables(at: AppTest) -> list[list[dict]]:
    """The rows of each plain HTML table the page drew (dashboard/common.html_table), in order; a
    folded cell reads as its whole text (its preview, in <summary>, left out)."""
    return [html_table_rows(re.sub(r"<summary>[^<]*</summary>", "", h.proto.body)) for h in at.get("html")
            if 'class="plain-table"' in h.proto.body]


def pre_texts(at: AppTest) -> list[str]:
    """The text of each plain text block the page drew (dashboard/common.html_pre), in order, as a
    browser reads it: unescaped, without the line break that follows <pre>."""
    return [html.unescape(text.removeprefix("\n")) for h in at.get("html")
            for text in re.findall(r'<pre class="plain-text">([^<]*)</pre>', h.proto.body)]


@pytest.mark.parametrize("page", ["graph.py", "gradients.py", "prompts.py"])
def test_empty_store_says_how_to_start(page, tmp_path, monkeypatch):
    at = open_page(page, Store(tmp_path / "empty.sqlite"), monkeypatch)
    assert "No runs" in at.info[0].value and "autodiff train" in at.info[0].value


@pytest.mark.parametrize("page,note", [("graph.py", "not traced a training step"),
                                       ("gradients.py", "No gradients yet"), ("prompts.py", "no parameters")])
def test_a_run_that_has_not_started_says_so(page, note, tmp_path, monkeypatch):
    store = Store(tmp_path / "runs.sqlite")
    store.create_run("fresh", "object_counting", {"task": "object_counting"}, {"train": ["a"]})
    at = open_page(page, store, monkeypatch, "fresh")
    assert note in at.info[0].value


def test_graph_page_shows_the_chosen_node(multihop, monkeypatch):
    store, run_id = multihop
    at = open_page("graph.py", store, monkeypatch, run_id)
    page = graph_html(at)
    assert "node:query_generator" in drawn_nodes(drawing(page)) and draw.external_resources(page) == []
    at.selectbox(key="graph_node").select("query_generator").run()
    assert not at.exception
    params, calls, grads = tables(at)
    assert [row["parameter"] for row in params] == ["query_generator.instruction"]
    assert sorted(row["call"] for row in calls) == ["0", "0", "1", "1"]
    assert {row["target"] for row in grads} == {"query_generator", "query_generator.instruction"}
    at.selectbox(key="graph_node").select("dedupe").run()
    assert any("nothing to train" in c.value for c in at.caption)
    assert len(tables(at)[0]) == 2  # its two calls


def test_gradient_filters_narrow_the_list(multihop, monkeypatch):
    store, run_id = multihop
    at = open_page("gradients.py", store, monkeypatch, run_id)

    def shown() -> int:
        return int(re.search(r"(\d+) of (\d+) gradients", at.caption[0].value)[1])

    total = shown()
    assert total == len(store.gradients(run_id))
    at.selectbox(key="grad_target").select("node:query_generator").run()
    on_query = shown()
    assert 0 < on_query < total
    at.selectbox(key="grad_call").select(1).run()
    assert 0 < shown() < on_query
    headers = [m.value for m in at.markdown if m.value.startswith("**Step")]
    assert headers and all("call 1**" in h for h in headers)
    at.selectbox(key="grad_sample").select("train-0").run()
    assert all("sample train\\-0" in m.value for m in at.markdown if m.value.startswith("**Step"))
    at.slider(key="grad_score").set_range(0.5, 1.0).run()
    assert shown() == 0
    assert not at.exception


def test_gradient_shows_its_backward_call(multihop, monkeypatch):
    store, run_id = multihop
    at = open_page("gradients.py", store, monkeypatch, run_id)
    assert any(e.label == "Backward call that wrote it" for e in at.expander)
    assert not at.code  # a call is loaded only when its panel is opened
    for g in store.gradients(run_id):
        at.session_state[f"grad_call_{g.id}"] = True  # as a click on each panel would
    at.run()
    assert not at.exception
    assert any(c.value == BACKWARD_SYSTEM for c in at.code)  # the prompt it was sent
    assert any(c.value.startswith("<feedback>Look for the birthplace") for c in at.code)  # and the reply
    assert any("answer_generator (via dedupe → retrieve)" in c.value.replace("\\", "") for c in at.caption)


def test_prompts_page_shows_a_diff_and_why(counting, monkeypatch):
    store, (run_id, _) = counting
    at = open_page("prompts.py", store, monkeypatch, run_id)
    at.selectbox(key="prompt_param").select("counter.instruction").run()
    assert not at.exception
    diff = [h.value for h in at.get("html") if "<del" in h.value or "<ins" in h.value]
    assert len(diff) == 3  # the two versions picked, and the accepted version against the one before it
    assert any("Reasoning" in m.value for m in at.markdown)
    assert any("Peers at step" in m.value for m in at.markdown)
    peers = store.parameter_values_at(run_id, 1)
    assert pre_texts(at) == [peers["counter.output_format"], peers["counter.examples"]]  # as written, in order
    versions, made, read = tables(at)
    assert [row["version"] for row in versions] == ["0", "1"]
    proposals = store.proposals(run_id, parameter="counter.instruction")
    assert [(row["step"], row["fate"], row["reason"], row["value"]) for row in made] == [
        (str(p.step), p.fate, "-" if p.reason is None else p.reason, "-" if p.value is None else p.value)
        for p in proposals]
    [accepted] = [p for p in proposals if p.fate == "accepted"]
    assert [row["feedback"] for row in read] == [g.text for g in store.gradients_by_id(run_id, accepted.feedback_ids)]


def test_prompts_page_multi_node(multihop, monkeypatch):
    store, run_id = multihop
    at = open_page("prompts.py", store, monkeypatch, run_id)
    assert at.selectbox(key="prompt_param").options == [  # each with its number of versions
        f"{name} ({n} version{'' if n == 1 else 's'})" for name in ("query_generator.instruction",
                                                                    "answer_generator.instruction")
        for n in [len(store.parameter_versions(run_id, name))]]
    at.selectbox(key="prompt_param").select("answer_generator.instruction").run()
    assert not at.exception
    assert any("None: this parameter is its node's whole prompt." in c.value for c in at.caption)


def test_gradients_say_when_they_were_written_and_fold_repeats(multihop, monkeypatch):
    store, run_id = multihop
    line = f"Answer with the city only. {HOSTILE}"
    gid = store.add_human_feedback(run_id, "\n".join([line] * 40) + "\nAnswer with the ci", node="answer_generator",
                                   target="answer_generator.instruction")
    at = open_page("gradients.py", store, monkeypatch, run_id)
    at.selectbox(key="grad_target").select("param:answer_generator.instruction").run()
    assert not at.exception
    [card] = [m.value for m in at.markdown if "Answer with the city only" in m.value]
    assert card.count("Answer with the city only") == 1  # drawn once, with its count
    assert ":gray-badge[↻ repeated ×40 in a row, the last cut off]" in card
    assert "<script>" not in card and "\\<script\\>" in card  # escaped markdown, not markup
    written = store.gradients_by_id(run_id, [gid])[0].created_at
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(written))
    assert any(stamp in c.value for c in at.caption)
    # every backward gradient says how far into its step it was written
    starts = {s.step: s.started_at for s in store.steps(run_id)}
    g = next(x for x in store.find_gradients(run_id, targets=["answer_generator.instruction"])[1] if x.llm_call_id)
    assert any(f"(+{g.created_at - starts[g.step]:.1f} s into step {g.step})" in c.value for c in at.caption)
    # feedback written after its step ended (the run is over) shows the plain time, no offset into it
    human = store.gradients_by_id(run_id, [gid])[0]
    assert human.created_at > next(s.finished_at for s in store.steps(run_id) if s.step == human.step)
    [mine] = [c.value for c in at.caption if c.value.startswith("From human feedback")]
    assert f"at {stamp}." in mine and "into step" not in mine
    # the full text is a click away, loaded only then
    [panel] = [e for e in at.expander if e.label.startswith("Full text")]
    text = store.gradients_by_id(run_id, [gid])[0].text
    assert panel.label == f"Full text ({len(text):,} characters, {39 * len(line):,} repeated characters folded)"
    assert not [c for c in at.code if line in c.value]
    at.session_state[f"grad_call_{gid}"] = True
    at.run()
    assert [c.value for c in at.code if line in c.value] == [text]
