"""AppTest tests of the Runs, Curves, Review and Compare pages, against stores filled by real engine
runs on the scripted fake LLM (whose feedback and proposals carry hostile HTML)."""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from autodiff.config import make_config
from autodiff import compare, runner
from autodiff.llm.pricing import format_usd
from autodiff.metrics import PHASES, run_summary, step_figures
from autodiff.store import Store
from dashboard.common import fmt_score
from tests.fake_runs import fake_run, filled_store

APP = "../app.py"
MY_PAGES = ("pages/runs.py", "pages/curves.py", "pages/review.py", "pages/compare.py", "pages/proposals.py")
# Elements whose text Streamlit renders as markdown or HTML: untrusted text must arrive escaped.
RENDERED = ("markdown", "caption", "title", "header", "subheader", "info", "success", "warning", "error",
            "html", "toast")
HOSTILE_HTML = re.compile(r"<\s*(script|img)", re.I)
HOSTILE_MARKDOWN = re.compile(r"(?<!\\)<\s*(script|img)", re.I)
FAKE_MODELS = dict(forward_model="fake:forward", backward_model="fake:backward", optimizer_model="fake:optimizer")


@pytest.fixture(scope="module")
def filled(tmp_path_factory) -> tuple[Store, list[str]]:
    """An auto run, a review run (a person rejected and accepted), and a newest run whose every
    validated proposal was rejected, so its test outcomes differ from the others'."""
    path = tmp_path_factory.mktemp("filled")
    store, ids = filled_store(path)
    ids.append(fake_run(store, path / "cache.sqlite", steps=1, review="validated", seed=2,
                        decide=lambda store, proposal: ("reject", None)))
    return store, ids


def open_page(store_path: Path, page: str, run_id: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=30)
    at.session_state["store_path"] = str(store_path)
    if run_id:
        at.query_params["run"] = run_id
    at.run()
    if page != "pages/runs.py":
        at.switch_page(page).run()
    return at


def walk(block):
    for child in block.children.values():
        yield child
        if hasattr(child, "children"):
            yield from walk(child)


def assert_clean(at: AppTest) -> None:
    """No exception shown, and no hostile tag reaches a markdown or HTML element unescaped
    (in markdown a backslash before '<' makes it literal text)."""
    assert not at.exception, [e.value for e in at.exception]
    for node in walk(at._tree):
        kind = getattr(node, "type", None)
        if kind in RENDERED:
            pattern = HOSTILE_HTML if kind == "html" else HOSTILE_MARKDOWN
            assert not pattern.search(charts_data_removed(node)), node.value


def charts_data_removed(node) -> str:
    """An element's text; for the kinds allowed to run their scripts (dashboard/charts.py, the
    graph of dashboard/graphview.py), with their JSON data blocks and their own code taken out,
    after checking that these are all the scripts they have and that no store text sits in the code."""
    from dashboard import charts
    from dashboard import graphview

    if getattr(node, "type", None) != "html" or not node.proto.unsafe_allow_javascript:
        return node.value
    if node.value in (charts.preload_html(), charts.preload_html(idle=True)):  # exactly charts' own
        return ""
    blocks = re.findall(r"<script([^>]*)>(.*?)</script>", node.value, re.S)
    if 'class="graph-drawing' in node.value:
        root = re.search(r'<div id="(graph-[0-9a-f]+)"', node.value).group(1)
        assert [attrs.strip() for attrs, _ in blocks] == ['type="application/json"', ""]
        assert not set(blocks[0][1]) & set("<>&")  # JSON with < written as \u003c: no tag ends a block
        assert blocks[1][1] == graphview._FOLLOW_JS % {"root": json.dumps(root)}
        return re.sub(r"<script[^>]*>.*?</script>", "", node.value, flags=re.S)
    assert [attrs.strip() for attrs, _ in blocks] == ['type="application/json" class="figures"',
                                                      'type="application/json" class="template"', ""]
    assert "<" not in blocks[0][1] + blocks[1][1]  # JSON with < written as \\u003c: no tag ends a block
    assert blocks[2][1].strip() == charts_code(node.value).strip()
    return re.sub(r"<script[^>]*>.*?</script>", "", node.value, flags=re.S)


def charts_code(body: str) -> str:
    """The drawing code dashboard/charts.py writes for the element whose id `body` holds."""
    from dashboard import charts

    root = re.search(r'<div id="(charts-[0-9a-f]+)"', body).group(1)
    bundle = re.search(r'loadPlotly\(("[^"]*")\)', body).group(1)
    height = int(re.search(r"const HEIGHT = (\d+);", body).group(1))
    fallback = re.search(r"const FALLBACK = (\{[^}]*\});", body).group(1)
    return charts._DRAW_JS % {"root": json.dumps(root), "fallback": fallback, "foreground": charts.FOREGROUND,
                              "height": height, "bundle": bundle, "loader": charts.LOADER_JS}


def wait_for(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def html_tables_of(at: AppTest) -> list[list[dict]]:
    """The rows of each plain HTML table the page drew (dashboard/common.html_table), in order; a
    folded cell reads as its whole text (its preview, in <summary>, left out)."""
    return [html_table_rows(re.sub(r"<summary>[^<]*</summary>", "", h.proto.body), table=n)
            for h in at.get("html") if 'class="plain-table"' in h.proto.body
            for n in range(h.proto.body.count("<table>"))]


def html_table_rows(page: str, table: int = 0) -> list[dict]:
    """The rows of the `table`-th HTML table in `page` (dashboard/common.html_table; 0 the first),
    as header -> text."""
    class Cells(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[list[str]] = []
            self.cell: list[str] | None = None
            self.tables = -1

        def handle_starttag(self, tag, attrs) -> None:
            if tag == "table":
                self.tables += 1
            elif tag == "tr" and self.tables == table:
                self.rows.append([])
            elif tag in ("td", "th") and self.tables == table:
                self.cell = []

        def handle_endtag(self, tag) -> None:
            if tag in ("td", "th") and self.cell is not None and self.rows:
                self.rows[-1].append("".join(self.cell))
                self.cell = None

        def handle_data(self, data) -> None:
            if self.cell is not None:
                self.cell.append(data)

    parser = Cells()
    parser.feed(page)
    header, *rows = parser.rows
    return [dict(zip(header, row)) for row in rows]


def button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


# --- every page, empty and filled -------------------------------------------------------------

@pytest.mark.parametrize("page", MY_PAGES)
def test_empty_store_says_so(tmp_path: Path, page: str) -> None:
    at = open_page(tmp_path / "runs.sqlite", page)
    assert_clean(at)
    assert any("No runs in this store yet" in i.value and "autodiff train" in i.value for i in at.info)


@pytest.mark.parametrize("page", MY_PAGES)
def test_filled_store_pages_draw_safely(filled, page: str) -> None:
    store, ids = filled
    for run_id in ids:
        at = open_page(store.path, page, run_id)
        assert_clean(at)
        assert at.session_state["run_id"] == run_id


def test_frame_opens_on_the_newest_run(filled) -> None:
    store, ids = filled
    at = open_page(store.path, "pages/curves.py")
    assert at.session_state["run_id"] == ids[-1] == store.runs()[0].id


# --- runs ---------------------------------------------------------------------------------------

def test_runs_table(filled) -> None:
    store, ids = filled
    at = open_page(store.path, "pages/runs.py")
    table = html_table_rows(at.get("html")[0].proto.body)
    assert [row["run"] for row in table] == [r.id for r in store.runs()]
    assert {row["status"] for row in table} == {  # status and steps in one cell
        f"completed ({r.config['steps']}/{r.config['steps']} steps)" for r in store.runs()}
    for column in ("best validation", "latest test", "tokens", "cost", "saved", "call errors", "run time (s)"):
        assert column in table[0]
    assert "projected" not in table[0]  # every run completed: the column is left out
    settings = html_table_rows(at.get("html")[0].proto.body, table=1)  # one element holds both tables
    assert [row["run"] for row in settings] == [r.id for r in store.runs()]
    assert {row["models"] for row in settings} == {"forward fake:forward, backward fake:backward, "
                                                    "optimizer fake:optimizer"}
    assert {row["task"] for row in settings} == {r.task for r in store.runs()} and "error" not in settings[0]
    assert [row["cost"] for row in table] == [format_usd(run_summary(store, r.id)["cost_usd"])
                                              for r in store.runs()]
    assert all(row["cost"].startswith("$") and row["cost"] != "$0.0000" for row in table)
    assert {row["call errors"] for row in table} == {"0"}  # the scripted fake never fails
    assert max(float(row["best validation"]) for row in table) == pytest.approx(0.75)
    assert not [b for b in at.button if b.label.startswith("Stop")]  # nothing is running


def test_settled_run_summaries_are_kept_until_the_run_changes(tmp_path: Path, monkeypatch) -> None:
    from dashboard import common

    store = Store(tmp_path / "runs.sqlite")
    run_id = fake_run(store, tmp_path / "cache.sqlite", steps=1)
    computed = []
    monkeypatch.setattr(common, "run_summary", lambda store_, r: computed.append(r) or run_summary(store_, r))
    common._settled_summary.clear()
    first = common.summary(store, store.run(run_id))
    assert common.summary(store, store.run(run_id)) == first and len(computed) == 1  # completed: kept
    store.set_run_status(run_id, "running")  # e.g. resumed: figures change while it runs
    assert common.summary(store, store.run(run_id))["status"] == "running"
    common.summary(store, store.run(run_id))
    assert len(computed) == 3  # a running run is summed afresh on every visit
    store.set_run_status(run_id, "stopped")
    assert common.summary(store, store.run(run_id))["status"] == "stopped" and len(computed) == 4


def test_start_form_defaults_to_the_local_model_and_shows_config_errors(tmp_path: Path) -> None:
    at = open_page(tmp_path / "runs.sqlite", "pages/runs.py")
    assert [at.text_input(key=f"model_{r}").value for r in ("forward", "backward", "optimizer")] == ["local:smollm2"] * 3
    at.text_input(key="model_forward").input("openai:gpt-4o-mini")
    button(at, "Start").click().run()
    assert_clean(at)
    assert any("no OpenAI API key" in e.value for e in at.error)
    assert Store(tmp_path / "runs.sqlite").runs() == []


def test_start_form_runs_in_the_background(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTODIFF_CACHE", str(tmp_path / "cache.sqlite"))
    at = open_page(tmp_path / "runs.sqlite", "pages/runs.py")
    for role in ("forward", "backward", "optimizer"):
        at.text_input(key=f"model_{role}").input(f"fake:{role}")
    at.text_input(key="opt_steps").input("1")
    button(at, "Start").click().run()
    assert_clean(at)
    assert any("Started run" in s.value for s in at.success)
    store = Store(tmp_path / "runs.sqlite")
    [run] = store.runs()
    assert run.config["forward_model"] == "fake:forward" and run.config["steps"] == 1
    wait_for(lambda: store.run(run.id).status in ("completed", "failed"), timeout=120)
    assert store.run(run.id).status == "completed", store.run(run.id).error
    assert store.run(run.id).pid not in (None, 0)


def test_start_form_takes_a_budget_and_refuses_one_too_small_for_step_0(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTODIFF_CACHE", str(tmp_path / "cache.sqlite"))
    at = open_page(tmp_path / "runs.sqlite", "pages/runs.py")
    for role in ("forward", "backward", "optimizer"):
        at.text_input(key=f"model_{role}").input(f"fake:{role}")
    at.text_input(key="opt_steps").input("1")
    budget = next(n for n in at.text_input if n.label == "Budget (tokens)")
    budget.input("10")
    button(at, "Start").click().run()
    assert_clean(at)
    [refused] = [e.value.replace("\\", "") for e in at.error]
    assert refused.startswith("Start refused:") and "**Budget (tokens)**: too small: step 0" in refused, refused
    assert "--" not in refused and "$" not in refused  # no flags; a token budget in tokens only
    assert Store(tmp_path / "runs.sqlite").runs() == []
    at.run()  # a rerun (the live table's, a sidebar click) keeps the refusal until the next Start
    assert [e.value.replace("\\", "") for e in at.error] == [refused]
    next(n for n in at.text_input if n.label == "Budget (tokens)").input("1000000")
    button(at, "Start").click().run()
    assert_clean(at)
    [run] = Store(tmp_path / "runs.sqlite").runs()
    assert run.config["budget_tokens"] == 1_000_000 and run.config["budget_usd"] is None


def test_a_run_stopped_at_its_budget_resumes_with_a_larger_one(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTODIFF_CACHE", str(tmp_path / "cache.sqlite"))
    store = Store(tmp_path / "runs.sqlite")
    run_id = fake_run(store, tmp_path / "cache.sqlite", steps=3, budget_tokens=10_500)
    assert store.run(run_id).error.startswith("budget")
    at = open_page(store.path, "pages/runs.py", run_id)
    assert any("stopped at its budget" in w.value for w in at.warning)
    table = html_table_rows(at.get("html")[0].proto.body)
    assert table[0]["projected"].startswith("$")  # not finished: what it is projected to cost
    field = next(n for n in at.text_input if n.label == "New budget (tokens)")
    assert field.value == "10500"  # the run's own budget, to raise
    button(at, f"Resume {run_id}").click().run()  # not raised: it would stop again at once
    said = " ".join(e.value.replace("\\", "") for e in at.error)
    assert "stopped at its budget of 10,500 tokens" in said and "give a larger New budget (tokens)" in said, said
    assert "--budget" not in said and store.run(run_id).status == "stopped"
    next(n for n in at.text_input if n.label == "New budget (tokens)").input("-5")
    button(at, f"Resume {run_id}").click().run()
    said = " ".join(e.value.replace("\\", "") for e in at.error)
    assert "Resume refused: New budget (tokens): Input should be greater than 0 (given: -5)" in said, said
    next(n for n in at.text_input if n.label == "New budget (tokens)").input("10000000")
    button(at, f"Resume {run_id}").click().run()
    assert_clean(at)
    assert store.run(run_id).config["budget_tokens"] == 10_000_000
    assert [e.text for e in store.run_events(run_id) if e.kind == "budget_changed"] == [
        "budget_tokens 10500 -> 10000000"]
    wait_for(lambda: store.run(run_id).status in ("completed", "failed"), timeout=120)
    assert store.run(run_id).status == "completed", store.run(run_id).error


def test_stop_and_resume_buttons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTODIFF_CACHE", str(tmp_path / "cache.sqlite"))
    store = Store(tmp_path / "runs.sqlite")
    run_id = runner.create(store, make_config(task="object_counting", steps=1, batch_size=2, **FAKE_MODELS), cache_path=tmp_path / "cache.sqlite")
    store.set_run_status(run_id, "running")  # as a trainer in another process would
    at = open_page(store.path, "pages/runs.py")
    assert any(run_id.replace("-", "\\-") in m.value for m in at.markdown)  # the live panel
    button(at, f"Stop {run_id}").click().run()
    assert_clean(at)
    assert store.stop_requested(run_id)
    assert any("Stop requested" in c.value for c in at.caption)

    store.set_run_status(run_id, "stopped")  # as the trainer does on seeing the request
    at.run()
    button(at, f"Resume {run_id}").click().run()
    assert_clean(at)
    wait_for(lambda: store.run(run_id).status == "completed", timeout=120)


# --- curves -------------------------------------------------------------------------------------

def chart_figures(at: AppTest) -> list[dict]:
    """The plotly figures a page drew (dashboard/charts.py puts them all in one element)."""
    frames = [e.proto.body for e in walk(at.main) if e.type == "html" and 'class="figures"' in e.proto.body]
    assert len(frames) == 1, f"{len(frames)} chart elements"
    block = re.search(r'<script type="application/json" class="figures">(.*?)</script>', frames[0], re.S)
    return json.loads(block.group(1))


def heights(trace: dict) -> list:
    """A trace's y values, where a bar's left-out value (charts.figure does not draw a zero bar) is
    the 0 it stands for."""
    ys = values(trace["y"])
    return [0 if v is None else v for v in ys] if trace.get("type") == "bar" else ys


def values(data: list | dict) -> list:
    """A trace's x or y as a list: plotly writes numpy arrays as base64 typed arrays."""
    if isinstance(data, dict):
        return np.frombuffer(base64.b64decode(data["bdata"]), dtype=data["dtype"]).tolist()
    return data


def test_curves_draws_every_chart(filled) -> None:
    store, ids = filled
    at = open_page(store.path, "pages/curves.py", ids[0])
    assert_clean(at)
    figures = chart_figures(at)
    titles = [f["layout"]["title"]["text"] for f in figures]
    assert titles == ["Score per step (test: only where it was measured)", "Mini-batch samples per step",
                      "Tokens per step by phase, and cumulative", "Time per step by phase, and run time",
                      "Cost per step by phase, and cumulative", "Money saved per step",
                      "Proposals per step by the stage they reached",
                      "Backward calls per step: made, saved, over the cap"]
    rows = step_figures(store, ids[0])
    score = {t["name"]: values(t["y"]) for t in figures[0]["data"]}
    assert score["validation"] == [r["val_score"] for r in rows]
    tokens = {t["name"]: values(t["y"]) for t in figures[2]["data"]}
    assert set(tokens) == {*PHASES, "cumulative (right axis)"}
    assert tokens["cumulative (right axis)"][-1] == sum(r["tokens"] for r in rows) > 0
    cost = {t["name"]: heights(t) for t in figures[4]["data"]}
    assert cost["validate"] == pytest.approx([r["cost_validate"] for r in rows])
    assert cost["cumulative (right axis)"][-1] == pytest.approx(sum(r["cost"] for r in rows)) != 0
    saved = {t["name"]: heights(t) for t in figures[5]["data"]}
    # step 0 has no backward pass: nothing saved there (no bar)
    assert saved["by selective backward"][1:] == pytest.approx([r["backward_saved_usd"] or 0 for r in rows[1:]])
    fates = {t["name"]: heights(t) for t in figures[6]["data"]}
    assert fates["proposed"] == [r["proposed"] for r in rows] and sum(fates["proposed"]) > 0
    # No fault charts for a run without faults (tests/test_error_counts.py draws them): a caption says so.
    assert any(c.value.startswith("No LLM call errored in the completed steps") for c in at.caption)


def test_pages_draw_a_step_in_progress(tmp_path: Path) -> None:
    store = Store(tmp_path / "runs.sqlite")
    done = fake_run(store, tmp_path / "cache.sqlite", steps=1)
    live = fake_run(store, tmp_path / "cache.sqlite", steps=1)
    store.discard_after(live, 0)
    store.start_step(live, 1, ["oc-001"])  # as the trainer does when a step begins: no scores yet
    store.set_run_status(live, "running")
    for page in MY_PAGES:
        at = open_page(store.path, page, live)
        assert_clean(at)
    assert compare.final_test(store, live)[0] == 0 < compare.final_test(store, done)[0]

    # Curves: the step in progress in a line, the charts of completed steps only (so a live run's
    # charts are redrawn when a step ends, not on every refresh).
    at = open_page(store.path, "pages/curves.py", live)
    assert any("Step 1 in progress" in m.value for m in at.markdown)
    assert {x for t in chart_figures(at)[0]["data"] for x in values(t["x"])} == {0}


# --- review -------------------------------------------------------------------------------------

def start_review_run(tmp_path: Path, review: str) -> tuple[Store, threading.Thread, list[BaseException]]:
    """A trainer thread in review mode with nobody deciding: it waits on the dashboard."""
    store = Store(tmp_path / "runs.sqlite")
    errors: list[BaseException] = []

    def train() -> None:
        try:
            fake_run(store, tmp_path / "cache.sqlite", steps=2, review=review)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    return store, thread, errors


def next_pending(store: Store, seen: list[str]) -> dict:
    def find():
        return next((p for r in store.runs() for p in store.proposals(r.id, fate="pending")
                     if p.id not in seen), None)
    return wait_for(find)


def test_review_buttons_unblock_a_waiting_trainer(tmp_path: Path) -> None:
    store, thread, errors = start_review_run(tmp_path, "validated")
    first = next_pending(store, [])
    at = open_page(store.path, "pages/review.py")
    assert_clean(at)
    assert any("&lt;script&gt;" in h.value for h in at.get("html"))  # the proposed value, escaped
    assert any("\\<script\\>" in m.value for m in at.markdown)  # the motivating gradients, escaped

    at.button(key=f"reject-{first.id}").click().run()
    assert_clean(at)
    assert store.proposal(first.id).decision == "reject"
    second = next_pending(store, [first.id])
    at.run()
    at.button(key=f"accept-{second.id}").click().run()
    assert_clean(at)

    thread.join(timeout=30)
    assert not thread.is_alive() and not errors, errors
    rejected, accepted = store.proposal(first.id), store.proposal(second.id)
    assert (rejected.fate, rejected.decided_by) == ("rejected", "human")
    assert (accepted.fate, accepted.decided_by) == ("accepted", "human")
    run_id = accepted.run_id
    assert store.run(run_id).status == "completed"
    assert store.parameter_values_at(run_id, 2)[accepted.parameter] == accepted.value
    at.run()
    assert_clean(at)
    assert any("No proposals are waiting" in i.value for i in at.info)
    [decisions] = [rows for rows in html_tables_of(at) if "decision" in rows[0]]
    assert [row["decision"] for row in decisions] == ["reject", "accept"]


def test_review_edit_then_accept(tmp_path: Path) -> None:
    store, thread, errors = start_review_run(tmp_path, "all")
    first = next_pending(store, [])
    at = open_page(store.path, "pages/review.py")
    edited = "Count every item one by one; number words like 'two' count as that many."
    at.text_area(key=f"edit-{first.id}").input(edited)
    at.button(key=f"edit-accept-{first.id}").click().run()
    assert_clean(at)
    wait_for(lambda: store.proposal(first.id).fate == "accepted")
    run_id = first.run_id
    assert store.parameter_versions(run_id, first.parameter)[-1].value == edited
    store.request_stop(run_id)  # the rest stay undecided: stopping rejects them and ends the run
    thread.join(timeout=30)
    assert not thread.is_alive() and not errors, errors
    assert store.run(run_id).status == "stopped"


def test_review_feedback_form(tmp_path: Path) -> None:
    store, ids = filled_store(tmp_path)
    at = open_page(store.path, "pages/review.py", ids[1])
    assert_clean(at)
    assert any("No proposals are waiting" in i.value for i in at.info)
    assert at.selectbox[-2].options[0] == "counter"  # the node first, then its parameters
    at.selectbox[-2].select("counter")
    at.selectbox[-1].select(at.selectbox[-1].options[1])
    at.text_area[-1].input("Number words <b>count</b> too.")
    button(at, "Add feedback").click().run()
    assert_clean(at)
    # a completed run: stored, and the page says no optimizer call will read it
    assert any("Feedback stored" in w.value and "will not train again" in w.value for w in at.warning)
    params = [p.name for p in store.parameters(ids[1])]
    rows = store.pending_human_feedback(ids[1], params)
    assert sorted(r.target for r in rows) == sorted(params)
    assert {r.sample_id for r in rows} == {at.selectbox[-1].options[1]}

    button(at, "Add feedback").click().run()  # empty text
    assert any("feedback is empty" in e.value for e in at.error)


# --- compare ------------------------------------------------------------------------------------

def test_compare_runs(filled) -> None:
    store, ids = filled
    at = open_page(store.path, "pages/compare.py", ids[0])
    assert_clean(at)
    assert at.multiselect(key="compare_runs").value == [ids[0], ids[2]]
    figures = chart_figures(at)
    assert [f["layout"]["title"]["text"] for f in figures] == [
        "Scores per step (solid: validation, dotted: test, only where measured)", "Cumulative tokens",
        "Cumulative cost", "Run time so far"]
    assert {t["name"] for t in figures[1]["data"]} == {ids[0], ids[2]}
    cost = {t["name"]: values(t["y"]) for t in figures[2]["data"]}
    assert cost[ids[0]][-1] == pytest.approx(step_figures(store, ids[0])[-1]["cost_cumulative"]) != 0
    table = html_table_rows(next(h.proto.body for h in at.get("html") if "run time (s)" in h.proto.body))
    assert [row["cost"] for row in table] == [format_usd(run_summary(store, r)["cost_usd"]) for r in (ids[0], ids[2])]
    assert any("&lt;script&gt;" in h.value for h in at.get("html"))  # a final prompt diffed, escaped
    differing = html_tables_of(at)[-1]
    rows = compare.differing_samples(store, [ids[0], ids[2]])
    assert [row["sample"] for row in differing] == [row["sample"] for row in rows] and rows
    for row, stored in zip(differing, rows):
        assert row[f"{ids[0]} score"] == fmt_score(stored[f"{ids[0]} score"]) != row[f"{ids[2]} score"]
        assert row[f"{ids[2]} prediction"] == str(stored[f"{ids[2]} prediction"])

    at.multiselect(key="compare_runs").set_value([ids[0], ids[1], ids[2]]).run()
    assert_clean(at)
    at.multiselect(key="compare_runs").set_value([ids[0]]).run()
    assert any("Pick two or more runs" in i.value for i in at.info)


def test_compare_needs_two_runs(tmp_path: Path) -> None:
    store = Store(tmp_path / "runs.sqlite")
    fake_run(store, tmp_path / "cache.sqlite", steps=1)
    at = open_page(store.path, "pages/compare.py")
    assert_clean(at)
    assert any("at least two runs" in i.value for i in at.info)


def test_differing_samples_uses_the_latest_test_evaluation(filled) -> None:
    store, ids = filled
    step, latest = compare.final_test(store, ids[0])
    assert step == store.last_completed_step(ids[0])
    rows = compare.differing_samples(store, [ids[0], ids[2]])
    _, rejected_all = compare.final_test(store, ids[2])
    for row in rows:
        assert row[f"{ids[0]} prediction"] == latest[row["sample"]].prediction
        assert row[f"{ids[2]} score"] == rejected_all[row["sample"]].score
    assert compare.differing_samples(store, [ids[0], ids[0]]) == []


def test_proposals_page_shows_what_each_proposal_cost(filled) -> None:
    store, ids = filled
    every = store.proposals(ids[0])
    costs = store.proposal_costs(ids[0])
    at = open_page(store.path, "pages/proposals.py", ids[0])
    at.session_state["props_table"] = True  # as a click on its panel would
    at.run()
    assert_clean(at)
    table = at.dataframe[0].value
    assert list(table["cost to make"]) == [format_usd(costs[p.id]["make_usd"]) for p in every]
    assert list(table["cost to validate"]) == [format_usd(costs[p.id]["validate_usd"]) for p in every]
    validated = [p for p in every if p.minibatch_score is not None]
    assert validated and all(costs[p.id]["validate_usd"] > 0 for p in validated)
    assert any("cost to make \\$" in m.value and "to validate \\$" in m.value for m in at.markdown)


def test_curves_draws_no_cost_line_for_a_run_with_no_known_price(tmp_path: Path) -> None:
    store = Store(tmp_path / "runs.sqlite")
    run_id = fake_run(store, tmp_path / "cache.sqlite", steps=1)
    with store.connect() as conn:  # as if no call's model were in the price table
        conn.execute("UPDATE llm_calls SET cost_usd = NULL WHERE run_id = ? AND cached = 0", (run_id,))
        conn.execute("UPDATE llm_calls SET saved_usd = NULL WHERE run_id = ?", (run_id,))
    at = open_page(store.path, "pages/curves.py", run_id)
    assert_clean(at)
    figures = {f["layout"]["title"]["text"]: f for f in chart_figures(at)}
    assert "Cost per step by phase, and cumulative" not in figures  # never a flat $0 line
    assert any("no known price" in c.value for c in at.caption)
    # Nor $0 saved: the Runs page says unknown, and so does the chart, in place of bars and axes
    # (no cache hit in this run, so nothing known was saved; the backward calls saved have no price).
    saved = figures["Money saved per step"]
    assert not saved["data"] and "Unknown" in saved["layout"]["annotations"][0]["text"]
    assert any("Money saved leaves out" in c.value and "unknown, not \\$0" in c.value for c in at.caption)
    summary = run_summary(store, run_id)
    assert summary["saved_usd"] == 0 and summary["saved_unknown"] > 0
