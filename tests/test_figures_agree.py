"""Every figure is the same on every page that shows it (issue: "every number on it agrees").

A store filled by the real trainer on the scripted fake: a plain run, and a run stopped in the
middle of step 1 (after its backward pass) and resumed, so step 1 was made twice. Both cap the
failing samples sent backward at 1 of a batch of 4, so some failing samples are over the cap.
The figures are read from what each page draws (chart data, captions, tables, the graph's
drawing), then checked against each other and against the records they come from."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from autodiff import runner
from autodiff.config import make_config
from autodiff.llm.fake import FakeProvider
from autodiff.metrics import STAGES, batch_outcome, busy_seconds, run_summary, step_figures
from autodiff.records import Proposal
from autodiff.store import Store
from dashboard.common import fmt_score
from tests.fake_runs import FAKE_PRICES, responder
from tests.test_dashboard_pages import assert_clean, chart_figures, html_table_rows, values, walk
from tests.test_dashboard_graph import drawing

STEPS = 3


def config(**options):
    return make_config(task="object_counting", forward_model="fake:forward", backward_model="fake:backward",
                       optimizer_model="fake:optimizer", steps=STEPS, batch_size=4, val_limit=12, test_limit=12,
                       max_failed=1, prices=FAKE_PRICES, **options)


def plain_and_stopped(path: Path) -> tuple[Store, Path, str, str]:
    """(store, cache, plain run, stopped run) in a new store under `path`: the second run was
    stopped in the middle of step 1, after its backward pass, so step 1 is unfinished."""
    store, cache = Store(path / "runs.sqlite"), path / "cache.sqlite"
    plain = runner.train(store, config(), cache_path=cache, providers={"fake": FakeProvider(responder)})

    def stop_after_backward(event: str, info: dict) -> None:
        if event == "backward" and info.get("step") == 1:
            store.request_stop(info["run_id"])

    stopped = runner.train(store, config(seed=1), cache_path=cache, providers={"fake": FakeProvider(responder)},
                           progress=stop_after_backward)
    assert store.run(stopped).status == "stopped"
    assert [s.status for s in store.steps(stopped)] == ["completed", "running"]
    return store, cache, plain, stopped


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Store, str, str]:
    """(store, plain run, resumed run): the resumed run was stopped after step 1's backward pass
    and resumed, so its step 1 was made twice; the first attempt's calls are in the store."""
    store, cache, plain, resumed = plain_and_stopped(tmp_path_factory.mktemp("agree"))
    runner.resume(store, resumed, cache_path=cache, providers={"fake": FakeProvider(responder)})
    assert store.run(resumed).status == "completed"
    return store, plain, resumed


def page(store: Store, name: str, run_id: str, **query: str):
    at = open_page(store.path, "pages/runs.py" if name == "runs" else f"pages/{name}.py", run_id, **query)
    assert_clean(at)
    return at


def open_page(store_path: Path, name: str, run_id: str, **query: str):
    """tests.test_dashboard_pages.open_page with more of the query string (a step, say)."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file("../app.py", default_timeout=30)
    at.session_state["store_path"] = str(store_path)
    at.query_params["run"] = run_id
    for key, value in query.items():
        at.query_params[key] = value
    at.run()
    if name != "pages/runs.py":
        at.switch_page(name).run()
    return at


def charts_by_title(at) -> dict[str, dict]:
    return {f["layout"]["title"]["text"]: f for f in chart_figures(at)}


def traces(fig: dict) -> dict[str, list]:
    """Trace name -> (x, y) with NaN for a gap in a line, and 0 for a bar left out (charts.figure
    draws no zero bar)."""
    return {t["name"]: (values(t["x"]), [(0 if t.get("type") == "bar" else math.nan) if v is None else v
                                         for v in values(t["y"])])
            for t in fig["data"]}


def series(fig: dict, name: str) -> dict[int, float]:
    x, y = traces(fig)[name]
    return dict(zip((int(v) for v in x), y))


def runs_table(store: Store) -> dict[str, dict]:
    at = page(store, "runs", store.runs()[0].id)
    body = next(h.proto.body for h in at.get("html") if "run time (s)" in h.proto.body)
    return {row["run"]: row for row in html_table_rows(body)}


def compare_page(store: Store, run_id: str):
    at = page(store, "compare", run_id)
    assert len(at.multiselect[0].value) == 2  # the two runs of the task
    body = next(h.proto.body for h in at.get("html") if "run time (s)" in h.proto.body)
    # The figures' table and the settings' table of the same element, one row per run.
    table = {row["run"]: row for row in html_table_rows(body)}
    for row in html_table_rows(body, table=1):
        table[row["run"]] |= row
    return at, table


def kept_backward_calls(store: Store, run_id: str, step: int) -> tuple[int, int]:
    """(backward calls of the step's kept attempt, every backward call recorded at the step),
    counted from the call records."""
    started = next(s.started_at for s in store.steps(run_id) if s.step == step)
    calls = [c for c in store.call_summaries(run_id) if c.step == step and c.phase == "backward"]
    return sum(1 for c in calls if c.created_at >= started), len(calls)


# --- run time -------------------------------------------------------------------------------------

def test_run_time_is_one_figure_on_runs_compare_and_curves(runs) -> None:
    store, plain, resumed = runs
    table = runs_table(store)
    for run_id in (plain, resumed):
        rows = step_figures(store, run_id)
        wall = run_summary(store, run_id)["wall_s"]
        # The definition: each kept step from its start to its end (or its last call's end), summed.
        assert wall == pytest.approx(sum(r["wall_s"] for r in rows)) and wall > 0
        for s, r in zip(store.steps(run_id), rows):
            assert r["wall_s"] >= s.finished_at - s.started_at
        assert table[run_id]["run time (s)"] == f"{wall:,.1f}"
        compare, compare_table = compare_page(store, run_id)
        assert compare_table[run_id]["run time (s)"] == f"{wall:,.1f}"
        so_far = traces(charts_by_title(compare)["Run time so far"])
        assert so_far[run_id][1][-1] == pytest.approx(wall)
        curves = charts_by_title(page(store, "curves", run_id))["Time per step by phase, and run time"]
        assert traces(curves)["run time so far (right axis)"][1][-1] == pytest.approx(wall)
        # The bars split each step's time: phases (time a call of theirs was running) and the rest.
        by_step = [sum(y[i] for name, (_, y) in traces(curves).items() if "right axis" not in name)
                   for i in range(len(rows))]
        assert by_step == pytest.approx([r["wall_s"] for r in rows])


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> tuple[Store, str, str]:
    """(store, plain run, stopped run): the stopped run was stopped in the middle of step 1 (after
    its backward pass) and not resumed, so step 1 is unfinished and will be redone whole."""
    store, _, plain, run_id = plain_and_stopped(tmp_path_factory.mktemp("stopped"))
    return store, plain, run_id


def test_run_time_of_a_run_stopped_mid_step_is_one_figure_on_every_page(stopped) -> None:
    """Stopped in step 1 and not resumed: the run time counts the completed step 0 only, on Runs,
    Compare and Curves alike; step 1's time so far is shown apart, not in it."""
    store, _, run_id = stopped
    rows = step_figures(store, run_id)
    wall = run_summary(store, run_id)["wall_s"]
    assert wall == pytest.approx(rows[0]["wall_s"]) and wall > 0
    unfinished = rows[1]["wall_s"]
    assert unfinished > 0 and rows[1]["wall_s_cumulative"] == wall
    assert run_summary(store, run_id)["unfinished_s"] == unfinished
    assert runs_table(store)[run_id]["run time (s)"] == f"{wall:,.1f}"
    compare, compare_table = compare_page(store, run_id)
    assert compare_table[run_id]["run time (s)"] == f"{wall:,.1f}"
    assert traces(charts_by_title(compare)["Run time so far"])[run_id][1][-1] == pytest.approx(wall)
    curves = page(store, "curves", run_id)
    line = traces(charts_by_title(curves)["Time per step by phase, and run time"])["run time so far (right axis)"]
    assert line[1][-1] == pytest.approx(wall)
    assert any(f"{unfinished:,.1f} s so far, not in the run time" in m.value for m in curves.markdown)


# --- failing samples and backward calls --------------------------------------------------------------

GRAPH_LINE = re.compile(
    r"Step (\d+): (\d+) samples in the mini-batch: (\d+) correct, (\d+) failing \((\d+) sent backward, (\d+) over "
    r"the per-step cap\), (\d+) errored\. Backward calls: (\d+) made, (\d+) saved by selective backward \(correct "
    r"samples\), (\d+) not made \(over the cap\)\.")


def test_failing_samples_and_backward_calls_agree_between_curves_and_graph(runs) -> None:
    store, plain, resumed = runs
    over_cap_seen = 0
    for run_id in (plain, resumed):
        figures = charts_by_title(page(store, "curves", run_id))
        samples = figures["Mini-batch samples per step"]
        backward = figures["Backward calls per step: made, saved, over the cap"]
        rows = {r["step"]: r for r in step_figures(store, run_id)}
        for step in range(1, STEPS + 1):
            at = page(store, "graph", run_id, step=str(step))
            line = next(m for c in at.caption if (m := GRAPH_LINE.fullmatch(c.value)))
            (shown_step, batch, correct, failing, sent, over, errored, made, saved, not_made) = map(int, line.groups())
            assert shown_step == step
            # Curves and Graph: the same mini-batch and the same backward calls.
            curves_samples = {name: series(samples, name)[step] for name in traces(samples)}
            assert curves_samples == {"correct": correct, "failing, sent backward": sent,
                                      "failing, over the per-step cap": over, "errored (no score)": errored}
            assert batch == correct + failing + errored == 4 and failing == sent + over
            curves_backward = {name: series(backward, name)[step] for name in traces(backward)}
            assert curves_backward == {"made (failing samples sent)": made, "saved (correct samples)": saved,
                                       "not made (failing samples over the cap)": not_made}
            # The drawing's loss node counts the same failing samples.
            svg = drawing(next(e.proto.body for e in walk(at.main) if e.type == "html"
                               and 'class="graph-drawing' in e.proto.body))
            assert re.findall(r"failed (\d+)/\d+", svg) == [str(failing)]
            # From the records: the calls of the kept attempt; saved counts correct samples only, and
            # failing samples over the cap are their own figure, not a saving.
            assert made == kept_backward_calls(store, run_id, step)[0] > 0
            assert sent == 1 and saved == round(made / sent * correct) and not_made == round(made / sent * over)
            assert rows[step]["backward_saved_usd"] == pytest.approx(rows[step]["cost_backward"] / sent * correct)
            over_cap_seen += over
    assert over_cap_seen  # the cap bit somewhere, or this test would not tell the two apart


def test_a_resumed_step_is_counted_once(runs) -> None:
    store, _, resumed = runs
    made, recorded = kept_backward_calls(store, resumed, 1)
    assert recorded == 2 * made > 0  # both attempts' calls are on record
    rows = step_figures(store, resumed)
    assert rows[1]["calls_backward"] == made and rows[1]["calls_redone"] > 0
    figures = charts_by_title(page(store, "curves", resumed))
    backward = figures["Backward calls per step: made, saved, over the cap"]
    assert series(backward, "made (failing samples sent)")[1] == made
    # What the first attempt spent is shown, apart, and the totals agree with the Runs page.
    tokens = traces(figures["Tokens per step by phase, and cumulative"])
    assert series(figures["Tokens per step by phase, and cumulative"], "redone")[1] == rows[1]["tokens_redone"] > 0
    summary = run_summary(store, resumed)
    assert tokens["cumulative (right axis)"][1][-1] == summary["tokens"]
    assert runs_table(store)[resumed]["tokens"] == f"{summary['tokens']:,}"
    assert any(c.value.startswith("Redone after a stop") and "step 1:" in c.value for c in page(
        store, "curves", resumed).caption)


# --- proposals by stage ------------------------------------------------------------------------------

FUNNEL = re.compile(r"(\d+) proposed → (\d+) passed mini-batch → (\d+) passed validation → (\d+) accepted; "
                    r"(\d+) rejected by a person")


def test_the_funnel_is_monotone_and_the_same_on_curves_and_proposals(runs) -> None:
    store, plain, resumed = runs
    labels = ("proposed", "passed mini-batch", "passed validation", "accepted")
    for run_id in (plain, resumed):
        chart = charts_by_title(page(store, "curves", run_id))["Proposals per step by the stage they reached"]
        per_step = {step: [series(chart, label)[step] for label in labels] for step in range(STEPS + 1)}
        for counts in per_step.values():
            assert counts == sorted(counts, reverse=True)  # no stage above the one before
        assert sum(c[0] for c in per_step.values()) == len(store.proposals(run_id)) > 0

        def shown(**query: str) -> list[int]:
            at = page(store, "proposals", run_id, **query)
            found = next(m for c in at.caption if (m := FUNNEL.search(c.value)))
            return [int(n) for n in found.groups()[:4]]

        assert shown() == [sum(c[i] for c in per_step.values()) for i in range(4)]
        step = next(s for s, c in per_step.items() if c[0])
        assert shown(step=str(step)) == per_step[step]


def test_each_stage_counts_the_proposals_that_reached_it(tmp_path: Path) -> None:
    """A value a person accepted without the checks counts as past them; one that beat the
    mini-batch but not validation counts at the mini-batch only."""
    store = Store(tmp_path / "runs.sqlite")
    store.create_run("r", "object_counting", {}, {"train": [], "val": [], "test": []})
    for i, (fate, mb, val) in enumerate([("failed_minibatch", (0.2, 0.5), (None, None)),
                                         ("accepted", (None, None), (None, None)),  # a person's decision
                                         ("failed_val", (0.8, 0.5), (0.4, 0.6)),
                                         ("accepted", (0.8, 0.5), (0.7, 0.6))]):
        store.add_proposal("r", Proposal(id=f"p{i}", step=1, parameter="x", value="v", method="add", reasoning="",
                                         fate=fate, minibatch_score=mb[0], minibatch_baseline=mb[1],
                                         val_score=val[0], val_baseline=val[1]))
    [row] = store.proposal_totals("r")
    assert [row[s] for s in STAGES] == [4, 3, 2, 2]
    assert row["accepted_unchecked"] == 1  # and the sentence says which count it stands in
    from autodiff.metrics import funnel
    from dashboard.figures import funnel_sentence

    said = funnel_sentence(funnel([row]))
    assert said.startswith("4 proposed → 3 passed mini-batch → 2 passed validation → 2 accepted")
    assert "1 of the accepted did not beat both baselines (a person accepted it)" in said


# --- scores ------------------------------------------------------------------------------------------

def test_scores_agree_and_unmeasured_test_steps_are_gaps(runs) -> None:
    store, plain, resumed = runs
    table = runs_table(store)
    for run_id in (plain, resumed):
        rows = step_figures(store, run_id)
        summary = run_summary(store, run_id)
        curves = charts_by_title(page(store, "curves", run_id))["Score per step (test: only where it was measured)"]
        compare, compare_table = compare_page(store, run_id)
        versus = charts_by_title(compare)["Scores per step (solid: validation, dotted: test, only where measured)"]
        for split, column in (("validation", "val_score"), ("test", "test_score")):
            expected = [math.nan if r[column] is None else r[column] for r in rows]
            on_curves, on_compare = traces(curves)[split][1], traces(versus)[f"{run_id} {split}"][1]
            assert on_curves == pytest.approx(expected, nan_ok=True)
            assert on_compare == pytest.approx(expected, nan_ok=True)
        # Test is measured at step 0 and at the end only: the steps between are gaps, never a line.
        test = traces(curves)["test"][1]
        assert not math.isnan(test[0]) and not math.isnan(test[-1]) and all(math.isnan(v) for v in test[1:-1])
        for fig in (curves, versus):
            assert all(t.get("connectgaps") is False for t in fig["data"])
        assert table[run_id]["best validation"] == fmt_score(summary["best_val"])
        assert table[run_id]["latest test"] == fmt_score(summary["final_test"])
        assert summary["best_val"] == max(traces(curves)["validation"][1])
        assert summary["final_test"] == test[-1]
        assert compare_table[run_id]["best validation"] == fmt_score(summary["best_val"])
        assert compare_table[run_id]["latest test"] == fmt_score(summary["final_test"])


# --- charts: units, ticks, theme, no empty axes ------------------------------------------------------

def test_every_chart_has_units_whole_step_ticks_and_no_white(runs) -> None:
    store, plain, _ = runs
    units = {"score (%)": {"tickformat": ".0%"}, "time (s)": {"ticksuffix": " s"}, "cost (USD)": {"tickprefix": "$"},
             "saved (USD)": {"tickprefix": "$"}, "tokens": {"tickformat": ",.3~s"}, "samples": {"tickformat": ",d"},
             "calls": {"tickformat": ",d"}, "proposals": {"tickformat": ",d"}, "run time (s)": {"ticksuffix": " s"}}
    for name in ("curves", "compare"):
        at = page(store, name, plain)
        frame = next(e.proto.body for e in walk(at.main) if e.type == "html" and 'class="figures"' in e.proto.body)
        assert "white" not in frame.lower() and "#fff" not in frame.lower()
        for fig in chart_figures(at):
            layout = fig["layout"]
            if not any(math.isfinite(v) for t in fig["data"] for v in traces({"data": [t]})[t["name"]][1]):
                # nothing to draw: a message, never plotly's empty -1..1 axes
                assert layout["yaxis"]["visible"] is False and layout["annotations"], layout
                continue
            y = layout["yaxis"]["title"]["text"]
            assert units[y].items() <= layout["yaxis"].items(), (layout["title"]["text"], layout["yaxis"])
            assert layout["xaxis"]["title"]["text"] == "step"
            assert layout["xaxis"]["dtick"] == 1 and layout["xaxis"]["tickformat"] == "d"


# --- the engine's definitions --------------------------------------------------------------------------

def test_batch_outcome_keeps_over_cap_and_errored_samples_apart() -> None:
    scores = {"a": 1.0, "b": 0.0, "c": 0.5, "d": None}
    assert batch_outcome(["a", "b", "c", "d", "e"], scores, 1.0, sent=["b"]) == batch_outcome(
        ["a", "b", "c", "d", "e"], scores, 1.0, cap=1)
    outcome = batch_outcome(["a", "b", "c", "d", "e"], scores, 1.0, sent=["b"])
    assert (outcome.batch, outcome.correct, outcome.failing, outcome.sent_backward, outcome.over_cap,
            outcome.errored) == (5, 1, 2, 1, 1, 2)
    # A sample the trainer sent backward is failing, whatever the scores here say.
    assert batch_outcome(["a", "d"], scores, 1.0, sent=["d"]).failing == 1


def test_busy_seconds_counts_overlapping_calls_once_within_the_window() -> None:
    assert busy_seconds([(0, 2), (1, 3), (5, 6)], 0, 10) == 4
    assert busy_seconds([(-5, 1), (9, 20)], 0, 10) == 2
    assert busy_seconds([], 0, 10) == 0


def test_a_chart_with_nothing_to_draw_says_so(tmp_path: Path) -> None:
    """Runs none of whose calls has a known price: Compare's cost chart says so, with no axes
    (plotly would draw empty -1..1 axes)."""
    from tests.fake_runs import fake_run

    store = Store(tmp_path / "runs.sqlite")
    first = fake_run(store, tmp_path / "cache.sqlite", steps=1)
    fake_run(store, tmp_path / "other-cache.sqlite", steps=1, seed=1)  # no cache hits: every call unpriced
    with store.connect() as conn:
        conn.execute("UPDATE llm_calls SET cost_usd = NULL, saved_usd = NULL, price_source = NULL")
    cost = charts_by_title(page(store, "compare", first))["Cumulative cost"]
    assert cost["layout"]["xaxis"]["visible"] is False and cost["layout"]["yaxis"]["visible"] is False
    assert [a["text"] for a in cost["layout"]["annotations"]] == [
        "No cost to draw: no call of these runs has a known price."]
    assert not cost["data"]


def test_compare_keeps_its_runs_in_the_address(runs) -> None:
    """The chosen runs are in the query string (?compare=), so a reload or a shared link opens the
    same comparison; a run the address names that the store lacks is said and left out."""
    store, _, _ = runs
    ids = [r.id for r in store.runs()]
    at = page(store, "compare", ids[0])
    at.multiselect[0].set_value([ids[-1], ids[0]]).run()
    assert at.query_params["compare"] == [ids[-1], ids[0]]
    again = open_page(store.path, "pages/compare.py", ids[0], compare=[ids[-1], "gone-run", ids[0]])
    assert again.multiselect[0].value == [ids[-1], ids[0]] and not again.exception
    assert any("gone" in w.value and "left out" in w.value for w in again.warning)


def test_gradient_filters_and_prompt_versions_are_in_the_address(runs) -> None:
    """Gradients' sample and call filters and Prompts' two version pickers are in the query string
    too, so a reload or a shared link keeps them (they fell back to their defaults)."""
    store, plain, _ = runs
    at = page(store, "gradients", plain)
    sample = next(o for o in at.selectbox(key="grad_sample").options if o != "All")
    at.selectbox(key="grad_sample").set_value(sample).run()
    at.selectbox(key="grad_call").set_value(at.selectbox(key="grad_call").options[1]).run()
    assert at.query_params["sample"] == [sample] or at.query_params["sample"] == sample
    again = open_page(store.path, "pages/gradients.py", plain, sample=sample, call="0")
    assert again.selectbox(key="grad_sample").value == sample and str(again.selectbox(key="grad_call").value) == "0"
    prompts = page(store, "prompts", plain)  # opens on a parameter that changed: two version pickers
    old, new = prompts.selectbox(key="prompt_old").value, prompts.selectbox(key="prompt_new").value
    assert old != new
    reopened = open_page(store.path, "pages/prompts.py", plain, parameter=prompts.selectbox(key="prompt_param").value,
                         **{"from": str(new), "to": str(old)})
    assert (reopened.selectbox(key="prompt_old").value, reopened.selectbox(key="prompt_new").value) == (new, old)


def test_the_export_steps_sum_to_the_run_and_carry_the_redone_attempts(runs) -> None:
    """A resumed run's step 1 was made twice: the export's steps say what the discarded attempt
    spent, and their totals sum to the run's tokens and cost, as on the Runs page."""
    from autodiff.export import export_run

    store, plain, resumed = runs
    for run_id in (plain, resumed):
        doc = export_run(store, run_id)
        rows = {r["step"]: r for r in step_figures(store, run_id)}
        assert sum(s["tokens"] for s in doc["steps"]) == doc["run"]["tokens"]
        assert sum(s["cost_usd"] for s in doc["steps"]) == pytest.approx(doc["run"]["cost_usd"])
        for s in doc["steps"]:
            assert s["tokens"] == sum(s["tokens_by_phase"].values()) + s["redone"]["tokens"]
            assert s["redone"]["tokens"] == rows[s["step"]]["tokens_redone"]
    redone = export_run(store, resumed)["steps"][1]["redone"]
    assert redone["calls"] > 0 and redone["tokens"] > 0


def test_an_export_while_the_run_adds_a_step_does_not_fail(runs, monkeypatch) -> None:
    """A live run can add a step between the export's reads: the steps are read first, so the
    figures cover them, and a step without figures is left out rather than failing the export."""
    from autodiff import export

    store, plain, _resumed = runs
    real = export.step_figures
    monkeypatch.setattr(export, "step_figures", lambda s, r: real(s, r)[:-1])  # as if it came after them
    doc = export.export_run(store, plain)
    assert [s["step"] for s in doc["steps"]] == [s.step for s in store.steps(plain)][:-1]


def test_show_splits_a_redone_steps_cost_with_its_redone_part(runs, capsys) -> None:
    """`autodiff show`: a step made twice lists what its discarded attempt cost beside the phases,
    so the parts add up to the step's cost."""
    from autodiff import cli

    store, _plain, resumed = runs
    assert cli.main(["--store", str(store.path), "show", resumed]) == 0
    [line] = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step   1:")]
    assert ", redone $" in line, line


def test_the_export_calls_a_stopped_runs_part_way_step_unfinished(stopped) -> None:
    from autodiff.export import export_run

    store, _plain, run_id = stopped
    assert [s.status for s in store.steps(run_id)][-1] == "running"  # as the trainer left it
    assert [s["status"] for s in export_run(store, run_id)["steps"]] == ["completed", "unfinished"]
