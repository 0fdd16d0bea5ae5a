"""What a fresh user reads: every problem of the Start form at once; an address naming a run, step
or node that is not there said on the page (escaped) and rewritten to what is shown; counts in
agreement with their nouns; the step a live run is on; a Stop button naming its run; a Graph page
that says a stopped run's step 1 waits for a resume; missing scores drawn one way. AppTests against
stores filled by the real trainer on the scripted fake."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from autodiff import runner
from autodiff.config import make_config
from autodiff.samples import SAMPLE_STORE
from autodiff.store import Store
from dashboard.common import count
from tests.fake_runs import fake_run
from tests.test_dashboard_pages import assert_clean, html_table_rows

APP = "../app.py"
FAKES = dict(forward_model="fake:forward", backward_model="fake:backward", optimizer_model="fake:optimizer")


def open_at(store_path: Path, page: str, **query: str) -> AppTest:
    """The app opened straight on `page` with `query` in its address, as a link or a reload opens it."""
    at = AppTest.from_file(APP, default_timeout=30)
    at.session_state["store_path"] = str(store_path)
    for key, value in query.items():
        at.query_params[key] = value
    if page != "pages/runs.py":
        at.switch_page(page)
    at.run()
    assert_clean(at)
    return at


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Store:
    path = tmp_path_factory.mktemp("samples") / "runs.sqlite"
    shutil.copy(SAMPLE_STORE, path)
    return Store(path)


# --- the Start form names every problem at once ------------------------------------------------------

def test_start_form_lists_a_missing_model_file_with_the_other_problems(tmp_path: Path) -> None:
    at = open_at(tmp_path / "runs.sqlite", "pages/runs.py")
    at.text_input(key="model_forward").input("local:/nope/missing.gguf")
    at.text_input(key="model_backward").input("mystery:model")
    at.text_input(key="model_optimizer").input("fake:x")
    next(n for n in at.text_input if n.label == "Steps").input("5000")
    next(b for b in at.button if b.label == "Start").click().run()
    [error] = at.error
    lines = [line.strip() for line in error.value.replace("\\", "").splitlines()]
    assert lines[0] == "Start refused:"
    said = {line.split("**")[1]: line for line in lines[1:]}
    assert list(said) == ["Forward model", "Backward model", "Steps"]  # the form's order, all at once
    assert "local model file not found: /nope/missing.gguf" in said["Forward model"]
    assert "unknown provider 'mystery'" in said["Backward model"]
    assert "less than or equal to 1000 (given: 5000)" in said["Steps"]
    assert Store(tmp_path / "runs.sqlite").runs() == []


# --- an address that names what is not there --------------------------------------------------------

def test_an_unknown_run_in_the_address_is_said_and_replaced(samples: Store) -> None:
    newest = samples.runs()[0].id
    at = open_at(samples.path, "pages/curves.py", run="nope<b>x</b>")
    [warning] = at.warning
    assert warning.value.startswith("Run 'nope\\<b\\>x\\</b\\>' (from the address) is not in this store: showing ")
    assert at.query_params["run"] == newest and at.session_state["run_id"] == newest
    at.run()  # said once: the address now names what is shown
    assert not at.warning and at.query_params["run"] == newest


def test_an_unknown_step_or_target_in_the_address_is_said_and_replaced(samples: Store) -> None:
    run_id = samples.runs()[0].id
    at = open_at(samples.path, "pages/graph.py", run=run_id, step="999")
    last = at.selectbox(key="graph_step").value
    assert [w.value for w in at.warning] == [f"Step '999' (from the address) is not a traced step of this run: "
                                             f"showing {last}."]
    assert at.query_params["step"] == str(last)

    at = open_at(samples.path, "pages/gradients.py", run=run_id, target="node:bogus")
    assert [w.value for w in at.warning] == ["Node or parameter 'node\\:bogus' (from the address) is not a node or "
                                             "parameter of this run: showing All."]
    assert "target" not in at.query_params and at.selectbox(key="grad_target").value == "All"


def test_a_known_value_in_the_address_is_taken_without_a_word(samples: Store) -> None:
    run_id = samples.runs()[-1].id
    at = open_at(samples.path, "pages/graph.py", run=run_id, step="1")
    assert not at.warning and at.session_state["run_id"] == run_id and at.selectbox(key="graph_step").value == 1


# --- wording and layout ------------------------------------------------------------------------------

def test_counts_agree_with_their_nouns() -> None:
    assert [count(n, "proposal") for n in (0, 1, 2, 1234)] == ["0 proposals", "1 proposal", "2 proposals",
                                                                 "1,234 proposals"]
    assert count(1, "LLM call") == "1 LLM call" and count(3, "child", "children") == "3 children"


def test_a_live_run_says_its_step_in_progress_and_its_stop_button_names_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "runs.sqlite")
    ids = [runner.create(store, make_config(task="object_counting", steps=1, batch_size=2, **FAKES),
                         cache_path=tmp_path / "cache.sqlite") for _ in range(2)]
    for run_id in ids:
        store.set_run_status(run_id, "running", pid=__import__("os").getpid())  # as a trainer would
    store.start_step(ids[0], 0, [])  # the initial evaluation, not finished
    at = open_at(store.path, "pages/runs.py")
    panels = {run_id: next(m.value for m in at.markdown if m.value.startswith(f"**{run_id.replace('-', chr(92) + '-')}**"))
              for run_id in ids}
    assert "step 0 (the initial evaluation) in progress" in panels[ids[0]] and " done" not in panels[ids[0]]
    assert "step 0 of 1 done" in panels[ids[1]]
    assert all("0 proposals waiting for review" in p for p in panels.values())
    assert sorted(b.label for b in at.button if b.label.startswith("Stop")) == sorted(f"Stop {i}" for i in ids)
    next(b for b in at.button if b.label == f"Stop {ids[1]}").click().run()
    assert [store.run(i).stop_requested for i in ids] == [False, True]  # the one named, not the other


def test_graph_of_a_stopped_run_without_a_trained_step_says_it_waits_for_a_resume(tmp_path: Path) -> None:
    store = Store(tmp_path / "runs.sqlite")
    run_id = runner.create(store, make_config(task="object_counting", steps=1, batch_size=2, **FAKES),
                           cache_path=tmp_path / "cache.sqlite")
    store.set_run_status(run_id, "failed", error="the provider refused the key")
    at = open_at(store.path, "pages/graph.py", run=run_id)
    [info] = at.info
    assert "It failed, so step 1 will not run until it is resumed" in info.value
    assert "Come back" not in info.value


def test_proposals_table_draws_a_missing_score_as_the_cards_do(tmp_path: Path) -> None:
    store = Store(tmp_path / "runs.sqlite")
    run_id = fake_run(store, tmp_path / "cache.sqlite", steps=1)
    unscored = [p for p in store.proposals(run_id) if p.val_score is None]
    assert unscored  # the scripted fake makes proposals that fail a check before validation
    at = open_at(store.path, "pages/proposals.py", run=run_id)
    at.session_state["props_table"] = True  # as a click on its panel would
    at.run()
    table = at.dataframe[0].value
    assert "None" not in table.astype(str).to_numpy().ravel().tolist()
    assert (table["validation"] == "-").sum() == len(unscored)


def test_the_runs_tables_fit_by_holding_figures_and_settings_apart(samples: Store) -> None:
    at = open_at(samples.path, "pages/runs.py")
    body = at.get("html")[0].proto.body  # one element, two tables
    figures, settings = html_table_rows(body), html_table_rows(body, table=1)
    assert len(figures[0]) <= 11 and len(settings[0]) <= 6  # was one table of 18 columns
    assert {row["models"] for row in settings} == {"local:smollm2 (every role)"}
    assert "projected" not in figures[0] and "error" not in settings[0]  # empty in every row: left out


def test_a_cost_unknown_because_its_calls_are_not_linked_says_so(samples: Store) -> None:
    """The bundled stores predate the links from calls to proposals: Proposals and Prompts say why
    those costs are unknown, and a store with the links says nothing of it."""
    run_id = next(r.id for r in samples.runs() if r.config.get("review") == "all")
    at = open_at(samples.path, "pages/proposals.py", run=run_id)
    assert any("not linked to them in this store" in c.value for c in at.caption), [c.value for c in at.caption]
    parameter = next(p.parameter for p in samples.proposals(run_id)
                     if samples.proposal_costs(run_id)[p.id]["validate_usd"] is None)
    at = open_at(samples.path, "pages/prompts.py", run=run_id, parameter=parameter)
    assert any("not linked to them in this store" in c.value for c in at.caption)
