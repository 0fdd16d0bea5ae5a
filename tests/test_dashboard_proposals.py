"""AppTest tests of every proposal being visible (the Proposals page; review mode "all" showing what
cannot be validated), of why a parameter changed (the feedback a proposal read, shown from the
proposal and from the gradient), and of state that follows the user (the run, step and parameter in
the URL; pickers that reset when their choices change; Compare's defaults). Stores are filled by
real engine runs on the scripted fake, whose feedback and proposals carry hostile HTML."""

from __future__ import annotations

import html
import re
import threading
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from autodiff import compare
from autodiff.config import make_config
from autodiff.llm.fake import FakeProvider
from autodiff.llm.types import Request
from autodiff.prompts import OPTIMIZER_SYSTEM
from autodiff.runner import train
from autodiff.store import Store
from dashboard.common import md
from tests.fake_runs import HOSTILE, fake_run, filled_store, responder
from tests.test_dashboard_graph import tables
from tests.test_dashboard_pages import APP, assert_clean, html_table_rows, open_page, wait_for


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Store, list[str]]:
    """Two object-counting runs (automatic; review "validated", decided) and, newest, a TREC run."""
    path = tmp_path_factory.mktemp("proposals")
    store, ids = filled_store(path)
    ids.append(fake_run(store, path / "cache.sqlite", steps=1, task="trec"))
    return store, ids


def cards(at: AppTest) -> list[str]:
    """The header line of each proposal shown on the Proposals page."""
    return [m.value for m in at.markdown if m.value.startswith("**Step ")]


def text_of(block: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", block))


# --- every proposal is visible ------------------------------------------------------------------

def test_proposals_page_shows_every_proposal_and_what_became_of_it(runs) -> None:
    store, ids = runs
    every = store.proposals(ids[0])
    at = open_page(store.path, "pages/proposals.py", ids[0])
    assert_clean(at)
    assert any(c.value == f"{len(every)} of {len(every)} proposals, in the order they were made." for c in at.caption)
    assert not at.dataframe  # the table is drawn when opened
    at.session_state["props_table"] = True  # as a click on its panel would
    at.run()
    table = at.dataframe[0].value
    assert list(table["fate"]) == [p.fate for p in every]
    assert list(table["reason"]) == [p.reason for p in every] and all(table["reason"])
    assert {"accepted", "rejected_check", "failed_minibatch"} <= set(table["fate"])
    listed = all_cards(at)
    assert len(listed) == len(every) > PER_PAGE and all(c.startswith(head(p)) for c, p in zip(listed, every))
    assert len(cards(at)) == PER_PAGE  # the first page of them

    # The accepted one: its scores at both stages, and its word diff against the value it replaced.
    accepted = next(p for p in every if p.fate == "accepted")
    at.number_input(key="props_page").set_value(every.index(accepted) // PER_PAGE + 1).run()
    [card] = [c for c in cards(at) if "**accepted**" in c]
    assert (f"mini-batch {accepted.minibatch_score:.3f} vs {accepted.minibatch_baseline:.3f} · validation "
            f"{accepted.val_score:.3f} vs {accepted.val_baseline:.3f}") in card
    diffs = [h.value for h in at.get("html") if "<ins" in h.value and "&lt;script&gt;" in h.value]
    assert diffs  # the proposed value, hostile text escaped
    initial = store.parameter_values_at(ids[0], 0)[accepted.parameter]
    before = [h.value for h in at.get("html") if text_of(h.value).startswith(
        f"The value it would have replaced{initial}Proposed value")]
    assert before and "<del" in before[0]  # the initial value it would replace, removed words struck out
    # A proposal refused by a check: not scored, and says why.
    refused = next(p for p in every if p.fate == "rejected_check")
    at.number_input(key="props_page").set_value(every.index(refused) // PER_PAGE + 1).run()
    assert any(m.value == f"Why: {md(refused.reason)}" for m in at.markdown)
    assert any("**rejected\\_check** · not scored" in c for c in cards(at))
    at.number_input(key="props_page").set_value(every.index(accepted) // PER_PAGE + 1).run()

    # What its optimizer call read, and the call itself (loaded only when opened).
    assert f"Feedback its optimizer call read ({len(accepted.feedback_ids)})" in [e.label for e in at.expander]
    assert not at.code and not any("\\<script\\>alert" in m.value for m in at.markdown)  # drawn when opened
    at.session_state[f"prop_feedback_{accepted.id}"] = True  # as a click on each panel would
    at.session_state[f"prop_call_{accepted.id}"] = True
    at.run()
    assert_clean(at)
    assert any(c.value == OPTIMIZER_SYSTEM for c in at.code)
    reply = store.call(accepted.llm_call_id).response
    assert any(c.value == reply for c in at.code) and accepted.value in reply
    assert any("\\<script\\>alert" in m.value for m in at.markdown)  # the feedback, escaped


PER_PAGE = 10  # proposals per page (pages/proposals.py)


def all_cards(at: AppTest) -> list[str]:
    """The header line of every proposal the page lists, page by page through its page picker
    (when it has one); the page is left on its first page."""
    if not at.number_input:
        return cards(at)
    found = []
    for page in range(1, int(at.number_input(key="props_page").max) + 1):
        at.number_input(key="props_page").set_value(page).run()
        assert len(cards(at)) == PER_PAGE or page == at.number_input(key="props_page").max
        found += cards(at)
    at.number_input(key="props_page").set_value(1).run()
    return found


def head(p) -> str:
    """How the header line of proposal `p`'s card starts (its step, parameter, method and fate)."""
    return f"**Step {p.step} · {md(p.parameter)}** · method {md(p.method)} · **{md(p.fate)}**"


def test_proposals_page_filters_by_fate_and_parameter(runs) -> None:
    store, ids = runs
    every = store.proposals(ids[0])
    at = open_page(store.path, "pages/proposals.py", ids[0])
    assert at.selectbox(key="props_fate").options[0] == "All"
    at.selectbox(key="props_fate").select("rejected_check").run()
    assert_clean(at)
    checked = [p for p in every if p.fate == "rejected_check"]
    assert len(all_cards(at)) == len(checked) > 0 and all("**rejected\\_check**" in c for c in cards(at))
    assert at.query_params["fate"] == "rejected_check"
    at.selectbox(key="props_param").select("counter.examples").run()
    both = [p for p in checked if p.parameter == "counter.examples"]
    assert len(all_cards(at)) == len(both) > 0 and all("counter\\.examples" in c for c in cards(at))
    at.session_state["props_table"] = True  # the table, opened, holds the same proposals as the cards
    at.run()
    assert len(at.dataframe[0].value) == len(both)
    assert at.expander[0].label == f"Table of the {len(both)} proposal{'s' if len(both) > 1 else ''} shown (sortable)"
    at.selectbox(key="props_fate").select("All").run()
    assert "fate" not in at.query_params and at.query_params["parameter"] == "counter.examples"
    assert len(all_cards(at)) == sum(p.parameter == "counter.examples" for p in every)


def test_proposals_page_with_no_proposals_says_so(tmp_path: Path) -> None:
    store = Store(tmp_path / "runs.sqlite")
    store.create_run("fresh", "object_counting", {"task": "object_counting"}, {"train": ["a"]})
    at = AppTest.from_file("../pages/proposals.py", default_timeout=30)
    at.session_state["store_path"] = str(store.path)
    at.session_state["run_id"] = "fresh"  # what the frame's run picker sets
    at.run()
    assert_clean(at)
    assert any("No proposals yet" in i.value for i in at.info)


def _garbage_optimizer(request: Request) -> str:
    """The scripted fake, except that the optimizer ignores the proposal format (and is hostile)."""
    system = request.messages[0].content if len(request.messages) > 1 else ""
    if "proposal blocks" in system:
        return f"I would keep the prompt as it is. {HOSTILE}"
    return responder(request)


def test_review_all_shows_a_malformed_proposal_to_dismiss_or_replace(tmp_path: Path) -> None:
    store = Store(tmp_path / "runs.sqlite")
    config = make_config(task="object_counting", forward_model="fake:forward", backward_model="fake:backward",
                         optimizer_model="fake:optimizer", steps=1, batch_size=4, val_limit=12, test_limit=12,
                         review="all", review_timeout=30)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            train(store, config, run_id="all", cache_path=tmp_path / "cache.sqlite",
                  providers={"fake": FakeProvider(_garbage_optimizer)})
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    first = wait_for(lambda: next(iter(store.proposals("all", fate="pending")), None))
    at = open_page(store.path, "pages/review.py", "all")
    assert_clean(at)
    assert not any("No proposals are waiting" in i.value for i in at.info)
    assert any(c.value.startswith("Every proposal waits here, also a malformed reply") for c in at.caption)
    assert any(w.value.startswith("Malformed reply") for w in at.warning)
    assert not store.proposal(first.id).reasoning  # a malformed reply has none: no empty "Reasoning:" label
    assert not any("Reasoning:" in m.value for m in at.markdown)
    assert any(m.value.startswith("Trainer's note: ") for m in at.markdown)
    assert any(c.value == f"I would keep the prompt as it is. {HOSTILE}" for c in at.code)  # the raw reply, as text
    assert f"accept-{first.id}" not in [b.key for b in at.button]  # nothing to accept
    dismiss = at.button(key=f"reject-{first.id}")
    assert dismiss.label == "Dismiss"
    dismiss.click().run()
    assert_clean(at)
    wait_for(lambda: store.proposal(first.id).fate == "malformed")

    second = wait_for(lambda: next(iter(store.proposals("all", fate="pending")), None))
    at.run()
    box = at.text_area(key=f"edit-{second.id}")
    assert box.value == store.parameter_values_at("all", 0)[second.parameter]  # starts from the current value
    written = "Reply with one line, 'Answer: N', N being the count."
    box.input(written)
    at.button(key=f"edit-accept-{second.id}").click().run()
    assert_clean(at)
    wait_for(lambda: store.proposal(second.id).fate == "accepted")
    assert store.parameter_versions("all", second.parameter)[-1].value == written
    store.request_stop("all")  # the rest stay undecided: stopping dismisses them and ends the run
    thread.join(timeout=30)
    assert not thread.is_alive() and not errors, errors
    dismissed = store.proposal(first.id)
    assert (dismissed.decided_by, dismissed.held_fate) == ("human", "malformed")


# --- why did this change ------------------------------------------------------------------------

def test_the_feedback_a_proposal_read_is_shown_with_it_and_from_each_gradient(runs) -> None:
    store, ids = runs
    accepted = store.proposals(ids[0], fate="accepted")[0]
    read = accepted.feedback_ids
    assert read

    # Prompts: beside the accepted version's diff (the page opens on the parameter that changed).
    at = open_page(store.path, "pages/prompts.py", ids[0])
    assert_clean(at)
    assert at.selectbox(key="prompt_param").value == accepted.parameter
    [shown] = [rows for rows in tables(at) if "feedback" in rows[0]]
    texts = {g.id: g.text for g in store.gradients(ids[0])}
    assert [row["feedback"] for row in shown] == [texts[i] for i in read]
    assert any(f"**Feedback the optimizer read** ({len(read)})" == m.value for m in at.markdown)

    # Gradients: each says which proposals read it, with a link to them.
    at = open_page(store.path, "pages/gradients.py", ids[0])
    at.selectbox(key="grad_step").select(accepted.step).run()
    at.selectbox(key="grad_target").select(f"param:{accepted.parameter}").run()
    assert_clean(at)
    assert at.query_params["step"] == str(accepted.step)
    assert at.query_params["target"] == f"param:{accepted.parameter}"
    link = f"/proposals?run={ids[0]}&step={accepted.step}&parameter={accepted.parameter}"
    lines = [m.value for m in at.markdown if m.value.startswith("Read by")]
    readers = store.proposals_reading(ids[0], read)
    assert len([line for line in lines if link in line]) == len(read) == len(readers)
    assert all(accepted.id in [p.id for p in readers[g]] for g in read)


def test_review_shows_the_feedback_the_pending_proposal_read(tmp_path: Path) -> None:
    store = Store(tmp_path / "runs.sqlite")
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _collect(errors, fake_run, store, tmp_path / "cache.sqlite", steps=1,
                                                      review="validated"), daemon=True)
    thread.start()
    pending = wait_for(lambda: next((p for r in store.runs() for p in store.proposals(r.id, fate="pending")), None))
    at = open_page(store.path, "pages/review.py", pending.run_id)
    assert_clean(at)
    assert f"Gradients that motivated it ({len(pending.feedback_ids)})" in [e.label for e in at.expander]
    store.request_stop(pending.run_id)
    thread.join(timeout=30)
    assert not thread.is_alive() and not errors, errors


def _collect(errors: list, fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


# --- state that follows the user --------------------------------------------------------------

def _frame() -> None:
    """The frame's shared chrome alone (AppTest reruns a page of app.py without app.py: Streamlit's
    legacy pages/ mode, see dashboard/common.py), with the chosen run as the title."""
    import streamlit as st

    from dashboard.common import sidebar

    st.title(str(sidebar()))


def open_frame(store: Store, **query: str) -> AppTest:
    at = AppTest.from_function(_frame, default_timeout=30)
    at.session_state["store_path"] = str(store.path)
    at.query_params.update(query)
    return at.run()


def test_the_url_names_the_run_and_survives_a_rerun(runs) -> None:
    store, ids = runs
    at = open_frame(store, run=ids[0])  # a shared link to a run that is not the newest
    assert_clean(at)
    assert at.title[0].value == ids[0] == at.session_state["run_id"] and at.query_params["run"] == ids[0]
    at.run()  # a rerun (a click, a refresh of a live panel) keeps it
    assert at.title[0].value == ids[0] and at.query_params["run"] == ids[0]
    at.sidebar.selectbox(key="run_picker").select(ids[1]).run()
    assert at.title[0].value == ids[1] and at.query_params["run"] == ids[1]  # the address follows the picker
    at.run()
    assert at.title[0].value == ids[1] and at.query_params["run"] == ids[1]
    at.query_params["run"] = ids[0]  # the address changed under the same session (a link followed)
    at.run()
    assert at.title[0].value == ids[0] and at.sidebar.selectbox(key="run_picker").value == ids[0]

    # The whole app, opened on a link: the run it names, on every page; without one, the newest.
    app = AppTest.from_file(APP, default_timeout=30)
    app.session_state["store_path"] = str(store.path)
    app.query_params["run"] = ids[1]
    app.run()
    assert_clean(app)
    assert app.session_state["run_id"] == ids[1] and app.query_params["run"] == ids[1]
    app.switch_page("pages/curves.py").run()
    assert any(c.value == f"Run {md(ids[1])}" for c in app.caption)
    fresh = open_frame(store)
    assert fresh.query_params["run"] == ids[-1] == fresh.title[0].value  # the newest, and the address says so

    gone = open_frame(store, run="no-such-run")  # a link to a run not in this store: said so
    assert [w.value for w in gone.main.warning] == [  # on the page, not in the sidebar
        f"Run 'no\\-such\\-run' (from the address) is not in this store: showing {md(ids[-1])}."]
    assert gone.title[0].value == ids[-1]


def test_the_url_opens_the_same_parameter_and_step(runs) -> None:
    store, ids = runs
    at = AppTest.from_file(APP, default_timeout=30)
    at.session_state["store_path"] = str(store.path)
    at.query_params.update(run=ids[0], parameter="counter.examples", step="2")
    at.run()
    at.switch_page("pages/prompts.py").run()
    assert_clean(at)
    assert at.selectbox(key="prompt_param").value == "counter.examples"  # not the parameter that changed
    at.run()
    assert at.selectbox(key="prompt_param").value == at.query_params["parameter"] == "counter.examples"
    at.switch_page("pages/proposals.py").run()
    assert_clean(at)
    assert at.selectbox(key="props_step").value == 2
    assert {c.split("**")[1].split(" · ")[0] for c in cards(at)} == {"Step 2"}
    at.switch_page("pages/graph.py").run()
    assert at.selectbox(key="graph_step").value == 2


def test_prompts_pickers_show_counts_and_reset_for_another_parameter_or_run(runs) -> None:
    store, ids = runs
    at = open_page(store.path, "pages/prompts.py", ids[0])
    param = at.selectbox(key="prompt_param")
    assert param.value == "counter.instruction"  # the parameter that changed, not the first one listed
    assert "counter.instruction (2 versions)" in param.options and "counter.examples (1 version)" in param.options
    assert (at.selectbox(key="prompt_old").value, at.selectbox(key="prompt_new").value) == (0, 1)
    at.selectbox(key="prompt_new").select(0).run()  # a person compares v0 with itself
    at.selectbox(key="prompt_param").select("counter.examples").run()
    assert_clean(at)
    assert any("is its only version" in c.value for c in at.caption)
    assert [s.key for s in at.selectbox] == ["prompt_param"]  # no pickers for one version
    at.selectbox(key="prompt_param").select("counter.instruction").run()
    assert (at.selectbox(key="prompt_old").value, at.selectbox(key="prompt_new").value) == (0, 1)  # not v0 vs v0

    at.selectbox(key="prompt_new").select(0).run()
    at.session_state["run_id"] = ids[2]  # what the sidebar's run picker sets: the TREC run
    at.run()
    assert_clean(at)
    name = at.selectbox(key="prompt_param").value
    assert name in [p.name for p in store.parameters(ids[2])]
    versions = store.parameter_versions(ids[2], name)
    if len(versions) > 1:
        assert at.selectbox(key="prompt_new").value == len(versions) - 1  # the other run's last version


def test_runs_table_rows_link_to_their_run(runs) -> None:
    store, ids = runs
    at = open_page(store.path, "pages/runs.py")
    page = at.get("html")[0].proto.body
    assert [row["run"] for row in html_table_rows(page)] == [r.id for r in store.runs()]
    for run_id in ids:
        assert f'<a href="/curves?run={run_id}" target="_self">{run_id}</a>' in page


def test_compare_defaults_to_runs_of_the_same_task(runs) -> None:
    store, ids = runs
    at = open_page(store.path, "pages/compare.py", ids[0])
    assert_clean(at)
    assert at.multiselect(key="compare_runs").value == [ids[0], ids[1]]  # not the newer TREC run
    assert not at.warning

    at.multiselect(key="compare_runs").set_value([ids[0], ids[2]]).run()
    assert_clean(at)
    assert compare.shared_test_samples(store, [ids[0], ids[2]]) == []
    assert any("These runs share no test samples" in w.value for w in at.warning)
    assert any("None to compare: the runs share no test samples." == c.value for c in at.caption)

    at = open_page(store.path, "pages/compare.py", ids[2])  # the TREC run: no other run of its task
    assert_clean(at)
    assert at.multiselect(key="compare_runs").value == [ids[2]]
    assert any("No other run in this store is of task trec" in i.value for i in at.info)


def test_compare_choice_resets_when_another_run_is_chosen(runs) -> None:
    store, ids = runs
    at = open_page(store.path, "pages/compare.py", ids[0])
    at.multiselect(key="compare_runs").set_value([ids[0], ids[2]]).run()
    at.session_state["run_id"] = ids[1]  # what the sidebar's run picker sets
    at.run()
    assert at.multiselect(key="compare_runs").value == [ids[1], ids[0]]


def _repeating_optimizer(request: Request) -> str:
    """The optimizer repeats one line to its token limit, as a small model does; the rest answer."""
    if "proposal blocks" in request.messages[0].content:
        return "- The feedback: count the words.\n" * 60
    return responder(request)


def test_review_folds_a_malformed_reply_that_repeats_itself(tmp_path: Path) -> None:
    """A 2,000-character reply of one repeated line was drawn in full (5,000 px): Review draws the
    line once with its count, and the whole reply stays one click away."""
    store = Store(tmp_path / "runs.sqlite")
    config = make_config(task="object_counting", forward_model="fake:forward", backward_model="fake:backward",
                         optimizer_model="fake:optimizer", steps=1, batch_size=4, val_limit=12, test_limit=12,
                         review="all", review_timeout=30)
    thread = threading.Thread(target=lambda: train(store, config, run_id="rep", cache_path=tmp_path / "cache.sqlite",
                                                   providers={"fake": FakeProvider(_repeating_optimizer)}),
                              daemon=True)
    thread.start()
    first = wait_for(lambda: next(iter(store.proposals("rep", fate="pending")), None))
    at = open_page(store.path, "pages/review.py", "rep")
    assert_clean(at)
    assert any("↻ repeated ×60 in a row" in m.value for m in at.markdown)
    assert any(c.value.startswith("The optimizer's reply (") and "repeated characters folded" in c.value
               for c in at.caption)
    [whole] = [e for e in at.expander if e.label.startswith("The whole reply")]
    assert any(c.value.count("- The feedback: count the words.") == 60 for c in whole.code)  # all of it
    at.button(key=f"reject-{first.id}").click().run()
    store.request_stop("rep")
    thread.join(timeout=60)
