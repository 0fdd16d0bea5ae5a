"""Untrusted text (from an LLM or a dataset) stays inert everywhere the Graph, Gradients, Prompts,
Proposals and Review pages put it: the graph's SVG (text and titles, carried as JSON inside a <script> block),
HTML tables and markdown. The graph page also loads nothing from outside."""

from __future__ import annotations

import html
import json
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from autodiff import graphview as gv
from dashboard import graphview as draw
from autodiff.diffs import inline_diff_html, word_diff_html
from autodiff.records import Gradient, InputRef, Invocation, LLMCall, ParameterSpec, Proposal, Trace
from autodiff.store import Store
from tests.fake_runs import HOSTILE, filled_store

PAGES = Path(__file__).resolve().parent.parent / "pages"
CLOSER = "</script><script>alert('closed')</script>"
RAW = ("<script>alert", "<img src=x", "<script>", "</script>")
HOSTILE_MARKERS = ("<script>alert", "<img src=x", "alert('closed')</script>")


def raw_hits(text: str) -> list[str]:
    return [r for r in RAW if r in text]


def unescaped(text: str) -> list[str]:
    """Hostile markers present raw. In markdown a backslash before "<" makes it a literal
    character, so "\\<img src=x" is escaped; in HTML only "&lt;" is."""
    return [m for m in HOSTILE_MARKERS if re.search(r"(?<!\\)" + re.escape(m), text)]


def hostile_store(tmp_path: Path) -> tuple[Store, str]:
    """One hand-written run where every text a model or dataset could write is hostile."""
    store = Store(tmp_path / "runs.sqlite")
    run = "hostile"
    sample = f"s{HOSTILE}"
    store.create_run(run, "object_counting", {"task": "object_counting"}, {"train": [sample]})
    store.add_parameters(run, [
        ParameterSpec("counter.instruction", "counter", "instruction", HOSTILE, trainable=True,
                      peers=("counter.examples",), position=0),
        ParameterSpec("counter.examples", "counter", "examples", "Examples.", trainable=True,
                      peers=("counter.instruction",), position=1),
    ])
    store.start_step(run, 0, [])
    store.add_parameter_version(run, "counter.instruction", 0, "Count the items.", None)
    store.add_parameter_version(run, "counter.examples", 0, f"Example {HOSTILE}", None)
    store.finish_step(run, 0, 0.0, None, [])
    store.start_step(run, 1, [sample])
    params = (("counter.instruction", f"Count the items. {CLOSER}"), ("counter.examples", f"Example {HOSTILE}"))
    llm = Invocation("i1", sample, "counter", "llm", 0, (InputRef(f"question{HOSTILE}", HOSTILE),), HOSTILE,
                     params, prompt=HOSTILE, llm_call_id="c0", seq=0)
    tool = Invocation("i2", sample, "tidy", "function", 0, (InputRef("text", HOSTILE, "i1"),), CLOSER, seq=1)
    again = Invocation("i3", sample, "counter", "llm", 1, (InputRef("question", CLOSER, "i2"),), HOSTILE,
                       params, prompt=HOSTILE, seq=2)
    loss = Invocation("i4", sample, "exact_match", "loss", 0, (InputRef("prediction", HOSTILE, "i3"),
                      InputRef("gold", HOSTILE)), "0.000", score=0.0, seq=3)
    store.add_traces(run, 1, [Trace(sample, [llm, tool, again, loss])])
    now = time.time()
    store.add_calls([LLMCall("c1", run, 1, "backward", "backward", "counter", sample, 1, f"fake:{HOSTILE}",
                             (("system", HOSTILE), ("user", CLOSER)), HOSTILE, 5, 5, 1.0, False, None, now)])
    store.add_gradients(run, 1, [
        Gradient("g1", sample, "exact_match", "i4", 0, "output", "counter", "i3", 0.0, HOSTILE, "exact_match",
                 (), "c1", "loss", None, now),
        Gradient("g2", sample, "counter", "i3", 1, "parameter", "counter.instruction", None, 0.0, CLOSER,
                 "counter", (), "c1", "backward", HOSTILE, now + 1),
        Gradient("g3", sample, "tidy", "i2", 0, "output", "counter", "i1", 0.0, HOSTILE, f"counter{HOSTILE}",
                 (f"tidy{HOSTILE}",), "c1", "backward", None, now + 2),
    ])
    store.add_proposal(run, Proposal("p1", 1, "counter.instruction", f"Count the items. {CLOSER}",
                                     f"add{HOSTILE}", HOSTILE, "c1", "accepted", HOSTILE, 1.0, 0.0, 1.0, 0.0,
                                     feedback_ids=("g2", "g3")))
    # A malformed reply held for review (review mode "all"): its raw reply is the hostile text.
    store.add_proposal(run, Proposal("p2", 1, "counter.examples", f"{HOSTILE}{CLOSER}", "none", "", "c1",
                                     "pending", HOSTILE, feedback_ids=("g2",), held_fate="malformed"))
    store.add_parameter_version(run, "counter.instruction", 1, f"Count the items. {CLOSER}", "p1")
    store.finish_step(run, 1, 1.0, None, [sample])
    store.set_run_status(run, "failed", error=f"the model said {HOSTILE}")  # the Runs table shows errors
    return store, run


# --- the graph drawing -----------------------------------------------------------------------

SVG_TAGS = {"svg", "defs", "marker", "path", "g", "title", "rect", "ellipse", "polygon", "text", "tspan"}


def test_graph_html_escapes_every_context(tmp_path):
    from tests.test_dashboard_graph import drawing, drawn_texts

    store, run = hostile_store(tmp_path)
    g = gv.build_graph(store.invocations(run, 1), store.gradients(run, 1), store.parameters(run))
    page = draw.render_html(g, selected="counter")
    # nothing hostile appears raw in the page: not in the JSON block, not as markup
    for marker in HOSTILE_MARKERS:
        assert marker not in page
    # a "</script>" in the data does not end the block: the page's script closers are its own two
    assert page.count("</script>") == 2
    # the drawing the script puts in place is well-formed SVG of our own elements only; the hostile
    # text sits in <title> (hover text) as characters
    svg = drawing(page)
    tree = ET.fromstring(svg)
    assert {el.tag.split("}")[-1] for el in tree.iter()} <= SVG_TAGS
    assert not [a for el in tree.iter() for a in el.attrib if a.lower().startswith("on")]
    titles = " ".join(el.text or "" for el in tree.iter() if el.tag.endswith("title"))
    assert "<script>alert" in titles and "<img src=x" in titles  # shown as text on hover
    assert "</script><script>alert('closed')" in titles
    assert "0→1" in drawn_texts(svg) and "0→0" in drawn_texts(svg)  # edge labels


def test_graph_html_loads_nothing_from_outside(tmp_path):
    store, run = hostile_store(tmp_path)
    page = draw.render_html(gv.build_graph(store.invocations(run, 1)))
    assert draw.external_resources(page) == []
    assert not re.search(r"<(?:script|link|img)\b[^>]*(?:src|href)\s*=", page, re.I)
    assert "cdnjs" not in page and "jsdelivr" not in page and "@import" not in page and "url(http" not in page
    assert len(page) < 100_000  # the drawing alone: no library in-lined


def test_external_resources_finds_cdn_tags():
    page = ('<script src="https://cdn.example/x.js"></script><link rel="stylesheet" href=//cdn.example/x.css>'
            '<script>var u = "https://example.org";</script>')
    assert len(draw.external_resources(page)) == 2


# --- diffs -----------------------------------------------------------------------------------

def test_word_diff_escapes_both_sides():
    left, right = word_diff_html(f"Count {HOSTILE} items", f"Count all {CLOSER} items")
    for part in (left, right, inline_diff_html(HOSTILE, CLOSER)):
        assert raw_hits(part) == []
    assert "&lt;script&gt;alert(&quot;x&quot;)" in left and "<del" in left
    assert "<ins" in right and "&lt;/script&gt;" in right


def test_word_diff_marks_changed_words_only():
    left, right = word_diff_html("count the red apples", "count the green apples")
    assert re.sub(r"<[^>]+>", "", left) == "count the red apples"
    assert ">red</del>" in left and ">green</ins>" in right and "count the " in right


@pytest.mark.parametrize("old,new", [
    ("a b\n\nc", "a x\n\nc d"), ("  lead x", "lead x"), ("one  two\tthree", "one two three four"), ("", "new"),
    ("gone", ""), (f"keep {HOSTILE}\n", f"keep {CLOSER}"),
])
def test_word_diff_sides_read_as_the_texts(old, new):
    """Each side of the diff, its tags removed and unescaped, is exactly that side's text (every
    space and line break kept); only changed words are marked, never the text around them."""
    left, right = word_diff_html(old, new)
    assert html.unescape(re.sub(r"<[^>]+>", "", left)) == old
    assert html.unescape(re.sub(r"<[^>]+>", "", right)) == new


def test_word_diff_ignores_a_change_of_whitespace_after_a_word():
    left, right = word_diff_html("a b\n\nc", "a x\n\nc d")  # "c" gained a space after it
    assert ">b</del>" in left and ">x</ins>" in right and "c" not in "".join(re.findall(r"<ins[^>]*>([^<]*)", right))


# --- pages -----------------------------------------------------------------------------------

def texts(at: AppTest) -> list[str]:
    from tests.test_dashboard_graph import drawing

    """Every string the page hands to markdown or HTML rendering, and the graph's HTML."""
    out = [e.value for kind in ("markdown", "caption", "info", "warning", "error", "title", "subheader")
           for e in getattr(at, kind)]
    out += [e.label for e in at.expander]
    out += [e.value for e in at.get("html")]
    out += [drawing(e.value) for e in at.get("html") if 'class="graph-drawing' in e.value]  # the SVG itself
    return out


def run_page(name: str, store: Store, run_id: str, monkeypatch, **choices) -> AppTest:
    monkeypatch.setenv("AUTODIFF_STORE", str(store.path))
    at = AppTest.from_file(str(PAGES / name), default_timeout=60)
    at.session_state["run_id"] = run_id
    at.run()
    for key, value in choices.items():
        at.selectbox(key=key).select(value).run()
    assert not at.exception
    return at


@pytest.mark.parametrize("page,choices", [
    ("runs.py", {}), ("graph.py", {}), ("graph.py", {"graph_node": "tidy"}), ("gradients.py", {}),
    ("prompts.py", {}), ("prompts.py", {"prompt_param": "counter.examples"}), ("proposals.py", {}),
    ("proposals.py", {"props_fate": "pending"}), ("review.py", {}),
])
def test_pages_never_show_hostile_text_raw(page, choices, tmp_path, monkeypatch):
    store, run = hostile_store(tmp_path)
    at = run_page(page, store, run, monkeypatch, **choices)
    shown = texts(at)
    assert shown
    for text in shown:
        assert unescaped(text) == [], (page, text[:300])


def test_prompts_page_diff_of_hostile_versions(tmp_path, monkeypatch):
    store, run = hostile_store(tmp_path)
    at = run_page("prompts.py", store, run, monkeypatch)
    diff = [h.value for h in at.get("html") if "<ins" in h.value]
    assert diff and "&lt;/script&gt;&lt;script&gt;alert(&#x27;closed&#x27;)" in diff[0]


def test_prompts_page_shows_hostile_peers_proposals_and_feedback_as_text(tmp_path, monkeypatch):
    """The peer's value (a plain text block), the proposals table and the feedback read (plain
    tables): each hostile text shown whole, as text, and escaped."""
    from tests.test_dashboard_graph import pre_texts, tables

    store, run = hostile_store(tmp_path)
    at = run_page("prompts.py", store, run, monkeypatch)
    assert pre_texts(at) == [f"Example {HOSTILE}"]  # counter.examples, the peer of counter.instruction
    _versions, made, read = tables(at)
    assert [(row["method"], row["reason"], row["value"]) for row in made] == [
        (f"add{HOSTILE}", HOSTILE, f"Count the items. {CLOSER}")]
    assert [(row["feedback"], row["error"]) for row in read] == [(CLOSER, HOSTILE), (HOSTILE, "")]
    blocks = [h.value for h in at.get("html") if "plain-text" in h.value or "plain-table" in h.value]
    assert all(unescaped(b) == [] for b in blocks)
    assert any("Example &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&lt;img src=x" in b for b in blocks)


def test_plain_text_block_keeps_every_character_as_text():
    from dashboard.common import html_pre

    text = f"\n  lead {HOSTILE}\n\n\ttab & {CLOSER} &amp; \"quoted\" 'single'  \n"
    block = html_pre(text)
    assert unescaped(block) == [] and raw_hits(block.split("</style>", 1)[1].replace("</pre>", "")) == []
    [inner] = re.findall(r'<pre class="plain-text">\n([^<]*)</pre>', block)  # the one break HTML drops, then the text
    assert html.unescape(inner) == text


@pytest.fixture(scope="module")
def counting(tmp_path_factory):
    return filled_store(tmp_path_factory.mktemp("counting"))


def test_proposals_page_shows_hostile_proposals_as_text(tmp_path, monkeypatch):
    store, run = hostile_store(tmp_path)
    at = run_page("proposals.py", store, run, monkeypatch)
    for p in store.proposals(run):  # every optimizer call panel opened
        at.session_state[f"prop_call_{p.id}"] = True
    at.run()
    assert not at.exception
    shown = texts(at)
    for text in shown:
        assert unescaped(text) == [], text[:300]
    assert any("&lt;/script&gt;&lt;script&gt;alert(&#x27;closed&#x27;)" in h.value for h in at.get("html"))  # the diff
    assert any("\\<script\\>alert" in m.value for m in at.markdown)  # the feedback it read, the reason
    assert any(c.value == f"{HOSTILE}{CLOSER}" for c in at.code)  # the malformed reply, as plain text
    assert any(c.value == CLOSER for c in at.code)  # its optimizer call's prompt, as plain text


def test_review_page_shows_a_hostile_malformed_reply_as_text(tmp_path, monkeypatch):
    store, run = hostile_store(tmp_path)
    at = run_page("review.py", store, run, monkeypatch)
    assert any(w.value.startswith("Malformed reply") for w in at.warning)
    assert any(c.value == HOSTILE for c in at.code)  # the call's full reply
    for text in texts(at):
        assert unescaped(text) == [], text[:300]


@pytest.mark.parametrize("page", ["graph.py", "gradients.py", "prompts.py", "proposals.py"])
def test_real_runs_never_show_hostile_text_raw(page, counting, monkeypatch):
    store, run_ids = counting
    for run_id in run_ids:
        at = run_page(page, store, run_id, monkeypatch)
        for text in texts(at):
            assert unescaped(text) == [], (page, text[:300])
    if page == "gradients.py":  # the hostile feedback is there, escaped
        assert any("\\<script\\>alert" in m.value for m in at.markdown)


def test_the_raw_check_itself():
    assert unescaped(HOSTILE) == ["<script>alert", "<img src=x"]
    assert unescaped(r'\<script\>alert("x")\</script\>\<img src=x onerror=alert\(1\)\>') == []
    assert unescaped("&lt;img src=x&gt;") == []


def test_markdown_escaping_keeps_entities_as_written():
    """"&lt;" in a gradient or a run id is shown as those four characters: markdown would decode an
    entity, so md() escapes "&" as it escapes the other markdown characters (CommonMark: a
    backslash before "&" makes it literal, and no entity is read)."""
    from dashboard.common import md

    assert md("a & &lt;b&gt; &amp;") == r"a \& \&lt;b\&gt; \&amp;"


def test_markdown_escaping_leaves_no_bare_address_to_link():
    """GitHub-flavoured markdown makes links of bare addresses after escapes are read, so escaping
    the punctuation is not enough: md() puts a word joiner inside each mark an autolink starts
    from (a browser check of st.markdown showed no <a> left but the heading's own anchor)."""
    from dashboard.common import WORD_JOINER, md

    text = "see http://x.example, HTTPS://y.z/a, WWW.x.com and a@b.co"
    shown = md(text)
    plain = shown.replace("\\", "")
    assert not re.search(r"https?://|www\.|\w@\w", plain, re.I)
    assert plain.replace(WORD_JOINER, "") == text  # read as written once the invisible joiners are gone
