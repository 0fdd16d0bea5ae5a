"""The training loop end to end against the scripted fake: selective backward, two-stage
validation, faults, resume, cache and human review. See conftest.py for the toy task."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter

import pytest

from autodiff import runner
from autodiff.errors import LLMFatalError, LLMTransientError, StoreError
from autodiff.llm.fake import FakeProvider
from conftest import FAST_RETRY, INSTRUCTION, OUTPUT_FORMAT, Script, proposal, toy_forward

BETTER = "Add the two numbers in the question, digit by digit. LEVEL=3"  # val 0.5 -> 1.0
LEVEL2 = "Add the two numbers in the question, digit by digit. LEVEL=2"  # val 0.5 -> 0.8 (3 wins)
WORSE = "Add the two numbers in the question as fast as you can. LEVEL=0"  # wrong everywhere
OVERFIT = "Add the two numbers in the question. OVERFIT LEVEL=1"  # right on train, val unchanged
TRAINONLY = "Add the two numbers in the question. TRAINONLY LEVEL=1"  # right on train, wrong on val


def _overfit_forward(prompt: str) -> str:
    """OVERFIT: right on every training sample, the usual level rule elsewhere."""
    if "OVERFIT" in prompt and "[split train]" in prompt:
        return toy_forward(prompt.replace("LEVEL=1", "LEVEL=9"))
    return toy_forward(prompt)


def _validation_calls(run, step: int = 1) -> list[dict]:
    return [c for c in run.calls("validate", step) if c.sample_id.startswith("val-")]


def _only(rows: list[dict]) -> dict:
    assert len(rows) == 1, rows
    return rows[0]


# --- 4. selective backward ---------------------------------------------------------------------

def test_all_correct_batch_costs_no_backward_or_optimizer_calls(run_toy) -> None:
    run = run_toy(Script(forward=lambda p: toy_forward(p.replace("LEVEL=1", "LEVEL=3"))), steps=2)
    assert run.record.status == "completed"
    assert len(run.calls("forward")) == 16
    assert run.calls("backward") == [] and run.calls("propose") == []
    assert run.store.gradients(run.run_id) == [] and run.proposals() == []
    assert [s.failed_samples for s in run.store.steps(run.run_id)] == [(), (), ()]


def test_only_failed_samples_up_to_max_failed_go_backward(run_toy) -> None:
    run = run_toy(max_failed=2)
    losses = [i for i in run.store.invocations(run.run_id, 1) if i.node_type == "loss"]
    assert len(losses) == 8
    failing = sorted(i.sample_id for i in losses if i.score < 1.0)
    assert failing == ["train-01", "train-03", "train-04", "train-06", "train-07"]
    # The two lowest (by score, then id) are sent backward; the other three cost nothing.
    assert run.store.steps(run.run_id)[1].failed_samples == ("train-01", "train-03")
    backward_calls = run.calls("backward")
    assert {c.sample_id for c in backward_calls} == {"train-01", "train-03"}
    assert len(backward_calls) == 2 * (1 + 2)  # per sample: the loss, then one per trainable peer
    assert {g.sample_id for g in run.store.gradients(run.run_id)} == {"train-01", "train-03"}


# --- 5. two-stage validation -------------------------------------------------------------------

def test_worse_proposal_fails_the_minibatch_and_changes_nothing(run_toy) -> None:
    run = run_toy(Script(proposals={"toy.instruction": [proposal(WORSE)]}))
    p = _only(run.proposals("toy.instruction"))
    assert p.fate == "failed_minibatch" and p.value == WORSE
    assert p.minibatch_score == 0.0 and p.minibatch_baseline == pytest.approx(2 / 6)
    assert _validation_calls(run) == []  # never reached the validation set
    assert len(run.calls("validate", 1)) == 6  # the mini-batch: 4 failed + 2 correct samples
    assert [v.value for v in run.store.parameter_versions(run.run_id, "toy.instruction")] == [INSTRUCTION]
    assert [s.val_score for s in run.store.steps(run.run_id)] == [0.5, 0.5]


def test_better_proposal_passes_both_stages_and_is_accepted(run_toy) -> None:
    run = run_toy(Script(proposals={"toy.instruction": [proposal(BETTER)]}))
    p = _only(run.proposals("toy.instruction"))
    assert p.fate == "accepted" and p.decided_by == "auto"
    assert p.minibatch_score == 1.0 and p.val_score == 1.0 and p.val_baseline == 0.5
    versions = run.store.parameter_versions(run.run_id, "toy.instruction")
    assert [(v.version, v.step, v.value, v.proposal_id) for v in versions] == [
        (0, 0, INSTRUCTION, None), (1, 1, BETTER, p.id)]
    assert run.values()["toy.instruction"] == BETTER
    assert [s.val_score for s in run.store.steps(run.run_id)] == [0.5, 1.0]
    assert len(_validation_calls(run)) == 10  # the whole validation set


def test_proposal_that_beats_only_the_minibatch_fails_validation(run_toy) -> None:
    run = run_toy(Script(proposals={"toy.instruction": [proposal(OVERFIT)]}, forward=_overfit_forward))
    p = _only(run.proposals("toy.instruction"))
    assert p.fate == "failed_val" and p.minibatch_score == 1.0
    assert p.val_score == 0.5 and "did not beat the current value's 0.500" in p.reason
    assert run.values()["toy.instruction"] == INSTRUCTION


def test_validation_stops_early_once_the_proposal_cannot_win(run_toy) -> None:
    run = run_toy(Script(proposals={"toy.instruction": [proposal(TRAINONLY)]}), concurrency=2)
    p = _only(run.proposals("toy.instruction"))
    assert p.fate == "failed_val" and p.val_score is None and "validation stopped after" in p.reason
    evaluated = len(_validation_calls(run))
    assert 0 < evaluated < 10
    assert f"after {evaluated} of 10 samples" in p.reason


@pytest.mark.parametrize("min_gain, fate", [(0.35, "failed_val"), (0.25, "accepted")])
def test_min_gain_is_honoured(run_toy, min_gain: float, fate: str) -> None:
    run = run_toy(Script(proposals={"toy.instruction": [proposal(LEVEL2)]}), min_gain=min_gain)
    p = _only(run.proposals("toy.instruction"))
    assert p.fate == fate and p.val_score == 0.8  # a gain of 0.3 over 0.5
    if fate == "failed_val":
        assert p.reason == ("validation 0.800 did not beat the current value's 0.500 + min gain 0.35"
                               " (on 10 samples scored on both sides)")
        assert run.values()["toy.instruction"] == INSTRUCTION
    else:
        assert run.values()["toy.instruction"] == LEVEL2


@pytest.mark.parametrize("value, fate", [(LEVEL2, "failed_val"), (BETTER, "accepted")])
def test_paired_acceptance_needs_a_significant_sign_test(run_toy, value: str, fate: str) -> None:
    run = run_toy(Script(proposals={"toy.instruction": [proposal(value)]}), acceptance="paired", paired_alpha=0.1)
    p = _only(run.proposals("toy.instruction"))
    assert p.fate == fate
    if fate == "failed_val":  # 3 better, 0 worse: p = 1/8, not below 0.1, though the gain is 0.3
        assert p.val_score == 0.8 and "3 better, 0 worse, p=0.125" in p.reason


def test_bad_proposals_are_rejected_before_any_validation_call(run_toy) -> None:
    echo_line = "Proposals that already failed this step, and why (do not repeat them):"
    replies = "\n".join([
        "<proposal><method>rephrase</method><reasoning>x</reasoning><value>  </value></proposal>",
        proposal(f"Add the numbers. LEVEL=3 <feedback>{INSTRUCTION}</feedback>"),
        proposal(f"Add the numbers. LEVEL=3 {echo_line}"),
    ])
    script = Script(proposals={"toy.instruction": [replies],
                               "toy.output_format": [proposal("Reply with the sum and nothing else.")]})
    run = run_toy(script, proposals=3)
    fates = [(p.parameter, p.fate, p.reason) for p in run.proposals()]
    assert [f[:2] for f in fates] == [("toy.instruction", "rejected_check")] * 3 + [
        ("toy.output_format", "rejected_check")]
    reasons = [f[2] for f in fates]
    assert reasons[0] == "empty value" and "own tag <feedback>" in reasons[1]
    assert "own instructions" in reasons[2] and "drops what the parameter's role needs" in reasons[3]
    assert run.calls("validate", 1) == []
    assert run.values() == run.values(0)


# --- 6. faults ---------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, fate", [("%%% garbage !!!", "malformed"), ("", "error"),
                                         ("<proposal><method>add</method><reasoning>the", "malformed")])
def test_malformed_optimizer_reply_is_recorded_and_the_run_goes_on(run_toy, reply: str, fate: str) -> None:
    run = run_toy(Script(proposals={"toy.instruction": [reply, reply]}), steps=2)
    assert run.record.status == "completed"
    malformed = run.proposals("toy.instruction")
    assert [p.fate for p in malformed] == [fate, fate] and all(p.reason for p in malformed)
    if fate == "error":  # a reply with no text is an error, asked once (no paid retries)
        assert all("held no text" in p.reason for p in malformed)
        assert run.calls("propose") and all(c.attempts == 1 for c in run.calls("propose"))
    assert len(run.store.steps(run.run_id)) == 3


def test_garbage_backward_reply_gives_empty_gradients_and_the_run_goes_on(run_toy) -> None:
    run = run_toy(Script(backward="}}}{{{"))
    assert run.record.status == "completed"
    grads = run.store.gradients(run.run_id)
    assert grads and all(g.text == "" and "no usable text" in g.error for g in grads)
    assert run.calls("propose") == []  # nothing to optimize from


def test_forward_transient_error_fails_that_sample_only(run_toy) -> None:
    flaky = "What is 14 + 25?"  # train-04

    def forward(prompt: str):
        return LLMTransientError("HTTP 503: overloaded") if flaky in prompt else toy_forward(prompt)

    # One errored sample of four is within a 30% error share: the run goes on without it.
    run = run_toy(Script(forward=forward, proposals={"toy.instruction": [proposal(BETTER)]}), max_error_share=0.3)
    assert run.record.status == "completed"
    [inv] = [i for i in run.store.invocations(run.run_id, 1) if i.sample_id == "train-04" and i.node == "solver"]
    assert "gave up after 3 attempts" in inv.error and "HTTP 503" in inv.error
    [call] = [c for c in run.calls("forward", 1) if c.sample_id == "train-04"]
    assert "gave up after 3 attempts" in call.error
    assert run.provider.calls >= 3
    # An errored sample is neither failed nor correct: nothing goes backward for it.
    assert "train-04" not in run.store.steps(run.run_id)[1].failed_samples
    assert all(c.sample_id != "train-04" for c in run.calls("backward"))


@pytest.mark.parametrize("role", ["forward", "optimizer"])
def test_fatal_error_stops_the_run_with_the_message(run_toy, role: str) -> None:
    message = "openai model 'gpt': HTTP 401: authentication failed: check OPENAI_API_KEY"
    script = Script()
    if role == "forward":
        script.forward = lambda prompt: LLMFatalError(message)
    else:
        script.proposals = {"toy.instruction": [LLMFatalError(message)]}
    run = run_toy(script, raises=False)
    assert isinstance(run.error, LLMFatalError)
    assert run.record.status == "failed" and message in run.record.error
    prompts = script.of_kind(role)
    assert prompts and len(prompts) == len(set(prompts))  # never retried
    if role == "optimizer":
        assert len(prompts) == 1 and run.store.last_completed_step(run.run_id) == 0
    else:
        assert run.store.last_completed_step(run.run_id) is None


# --- 7. resume ---------------------------------------------------------------------------------

class Interrupted(BaseException):
    """Stands in for a Ctrl-C or a killed worker in the middle of a step."""


def _three_step_script() -> Script:
    return Script(proposals={"toy.instruction": [proposal(LEVEL2), proposal(BETTER)]})


def _snapshot(store, run_id: str, step: int) -> dict:
    return {
        "invocations": sorted(i.id for i in store.invocations(run_id, step)),
        "gradients": sorted(g.id for g in store.gradients(run_id, step)),
        "proposals": sorted((p.id, p.parameter, p.fate) for p in store.proposals(run_id, step=step)),
    }


def test_interrupted_run_resumes_from_its_last_completed_step(run_toy, tmp_path) -> None:
    reference = run_toy(_three_step_script(), steps=3, run_id="reference", cache_path=tmp_path / "ref-cache.sqlite")
    assert reference.record.status == "completed"

    # Interrupt step 2 on its second LLM call after backward: gradients and a proposal are stored.
    script = _three_step_script()
    armed = {"calls": None}
    inner = script.__call__

    def respond(request):
        if armed["calls"] is not None:
            armed["calls"] += 1
            if armed["calls"] == 2:
                raise Interrupted("stopped mid-step")
        return inner(request)

    def progress(event: str, info: dict) -> None:
        if event == "backward" and info["step"] == 2:
            armed["calls"] = 0

    run = run_toy(script, steps=3, run_id="interrupted", provider=FakeProvider(respond), progress=progress,
                  raises=False)
    assert isinstance(run.error, Interrupted)
    store = run.store
    assert run.record.status == "failed" and "Interrupted" in run.record.error
    assert store.last_completed_step("interrupted") == 1
    assert [s.status for s in store.steps("interrupted")] == ["completed", "completed", "running"]
    partial = _snapshot(store, "interrupted", 2)
    assert partial["invocations"] and partial["gradients"] and partial["proposals"]
    step1 = _snapshot(store, "interrupted", 1)

    resumed = FakeProvider(_three_step_script())
    assert runner.resume(store, "interrupted", providers={"fake": resumed}, cache_path=tmp_path / "cache.sqlite",
                         retry=FAST_RETRY) == "interrupted"

    assert store.run("interrupted").status == "completed" and store.run("interrupted").error is None
    steps, ref_steps = store.steps("interrupted"), store.steps("reference")
    assert [s.step for s in steps] == [s.step for s in ref_steps] == [0, 1, 2, 3]
    assert [s.val_score for s in steps] == [s.val_score for s in ref_steps] == [0.5, 0.8, 1.0, 1.0]
    assert _snapshot(store, "interrupted", 1) == step1  # nothing from step 1 lost or redone
    redone = _snapshot(store, "interrupted", 2)
    for kind in ("invocations", "gradients", "proposals"):  # partial records replaced, not added to
        assert not set(redone[kind]) & set(partial[kind])
        assert len(redone[kind]) == len(_snapshot(store, "reference", 2)[kind])
    fates = sorted(p[1:] for p in redone["proposals"])
    assert fates == sorted(p[1:] for p in _snapshot(store, "reference", 2)["proposals"])
    assert ("toy.instruction", "accepted") in fates
    # Step 2 ran with the value accepted at step 1, restored from the store.
    step2_values = {dict(i.parameters)["toy.instruction"] for i in store.invocations("interrupted", 2)
                    if i.node == "solver"}
    assert step2_values == {LEVEL2}
    assert run.values() == reference.values() and run.values()["toy.instruction"] == BETTER


# --- 8. cache ----------------------------------------------------------------------------------

def test_identical_second_run_is_served_from_the_cache(run_toy) -> None:
    script = Script(proposals={"toy.instruction": [proposal(BETTER), proposal(BETTER)]})
    provider = FakeProvider(script)
    first = run_toy(script, provider=provider, run_id="first")
    made = provider.calls
    assert made > 0 and not any(c.cached for c in first.calls())
    second = run_toy(script, provider=provider, run_id="second")
    assert provider.calls == made  # not one new provider call
    calls = second.calls()
    assert len(calls) == len(first.calls()) and all(c.cached for c in calls)
    assert Counter(c.phase for c in calls) == Counter(c.phase for c in first.calls())
    assert second.values() == first.values() and second.values()["toy.instruction"] == BETTER


# --- 10. human review --------------------------------------------------------------------------

def _train_in_background(run_toy, script: Script, **config) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(run_toy(script, run_id="review", **config)), daemon=True)
    thread.start()
    return thread, out


def _wait_for_pending(store, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pending = store.proposals("review", fate="pending")
        except Exception:  # noqa: BLE001 - the run may not exist yet
            pending = []
        if pending:
            return pending[0]
        time.sleep(0.02)
    raise AssertionError("no proposal became pending")


@pytest.mark.parametrize("decision", ["accept", "reject", "edit"])
def test_review_waits_for_a_person(run_toy, store, decision: str) -> None:
    edited = "Add the two numbers in the question, column by column. LEVEL=2"
    thread, out = _train_in_background(run_toy, Script(proposals={"toy.instruction": [proposal(BETTER)]}),
                                       review="validated")
    pending = _wait_for_pending(store)
    assert pending.value == BETTER and pending.val_score == 1.0
    time.sleep(0.1)
    assert thread.is_alive() and store.run("review").status == "running"  # the trainer is waiting
    assert store.parameter_values_at("review", 1)["toy.instruction"] == INSTRUCTION

    decided = time.monotonic()
    store.decide(pending.id, decision, value=edited if decision == "edit" else None)
    thread.join(timeout=30)
    # The trainer polls the store every fraction of a second; the bound is loose on purpose (a
    # loaded CI machine), it only has to tell "went on" from "waited out its review timeout".
    assert not thread.is_alive() and time.monotonic() - decided < 10.0
    p = store.proposal(pending.id)
    assert p.decided_by == "human"
    final = store.parameter_values_at("review", 1)["toy.instruction"]
    if decision == "accept":
        assert p.fate == "accepted" and final == BETTER
        assert store.steps("review")[1].val_score == 1.0
    elif decision == "reject":
        assert p.fate == "rejected" and final == INSTRUCTION
        assert store.steps("review")[1].val_score == 0.5
    else:
        assert p.fate == "accepted" and final == edited and "edited" in p.reason
        assert store.steps("review")[1].val_score == 0.8  # the edited value's own score
    assert store.run("review").status == "completed"


def test_review_timeout_falls_back_to_reject(run_toy, store) -> None:
    run = run_toy(Script(proposals={"toy.instruction": [proposal(BETTER)]}), review="validated",
                  review_timeout=0.3, review_fallback="reject")
    p = _only(run.proposals("toy.instruction"))
    assert p.fate == "rejected" and "timeout" in p.decided_by
    assert run.values()["toy.instruction"] == INSTRUCTION


def test_human_feedback_is_stored_with_the_step_it_was_written_during(run_toy, store) -> None:
    """Written while step 1 runs: stored with step 1, not the last completed step (0). A stop drops
    the unfinished step 1 on resume; the feedback is kept and waits to be read again. Written on a
    run that is not running: its last completed step."""
    ids: list[str] = []

    def progress(event: str, info: dict) -> None:
        if event == "backward" and info.get("step") == 1:
            ids.append(store.add_human_feedback("during", "Carry the tens.", node="solver", target="toy.instruction"))
            store.request_stop("during")

    run_toy(Script(), run_id="during", progress=progress, steps=2)
    assert store.run("during").status == "stopped" and store.last_completed_step("during") == 0
    [row] = store.gradients_by_id("during", ids)
    assert (row.step, row.origin) == (1, "human")
    assert [g for g in store.gradients("during") if g.step == 1 and g.origin != "human"]  # the step's own work
    store.discard_after("during", 0)  # what a resume does before redoing step 1
    [kept] = store.gradients_by_id("during", ids)
    assert kept.step == 1 and kept.consumed_step is None
    assert not [g for g in store.gradients("during") if g.step == 1 and g.origin != "human"]
    later = store.add_human_feedback("during", "Shorter.", node="solver", target="toy.instruction")
    assert store.gradients_by_id("during", [later])[0].step == 0


def test_human_feedback_reaches_the_next_optimizer_call(run_toy, store) -> None:
    note = "Carry the tens digit; the format is fine."
    ids: list[str] = []

    def progress(event: str, info: dict) -> None:
        if event == "initial":
            ids.append(store.add_human_feedback("fb", note, node="solver", target="toy.output_format"))

    script = Script()
    run = run_toy(script, run_id="fb", progress=progress)
    [prompt] = [p for p in script.of_kind("optimizer") if "Target parameter: `toy.output_format`" in p]
    assert f"- [human] {note}" in prompt
    [other] = [p for p in script.of_kind("optimizer") if "Target parameter: `toy.instruction`" in p]
    assert note not in other
    [row] = [g for g in store.gradients(run.run_id) if g.id == ids[0]]
    assert row.origin == "human" and row.consumed_step == 1
    assert store.pending_human_feedback(run.run_id, ["toy.output_format"]) == []
    assert OUTPUT_FORMAT in prompt


def test_stop_during_the_last_step_leaves_it_for_a_resume(run_toy, store, tmp_path) -> None:
    def progress(event: str, info: dict) -> None:
        if event == "backward":
            store.request_stop("stop")

    run = run_toy(Script(proposals={"toy.instruction": [proposal(BETTER)]}), run_id="stop", progress=progress)
    assert run.record.status == "stopped"
    assert [s.status for s in store.steps("stop")] == ["completed", "running"]
    assert run.calls("backward", 1)  # the calls made before the stop are on record
    assert run.proposals() == []

    runner.resume(store, "stop", providers={"fake": FakeProvider(Script(proposals={
        "toy.instruction": [proposal(BETTER)]}))}, cache_path=tmp_path / "cache.sqlite", retry=FAST_RETRY)
    assert store.run("stop").status == "completed"
    assert [s.status for s in store.steps("stop")] == ["completed", "completed"]
    assert run.values()["toy.instruction"] == BETTER


def test_a_background_start_keeps_a_stop_asked_for_while_it_was_starting(run_toy, store, tmp_path) -> None:
    """The dashboard's Stop shows as soon as a run is registered; the background process it then
    starts (`autodiff resume --keep-stop`) must not wipe a stop pressed before it got going."""
    def stop_at_once(event: str, info: dict) -> None:
        if event == "initial":
            store.request_stop("early")

    run_toy(Script(), run_id="early", progress=stop_at_once)
    assert store.run("early").status == "stopped"
    trained = [s.step for s in store.steps("early") if s.status == "completed"]
    runner.resume(store, "early", clear_stop=False, providers={"fake": FakeProvider(Script())},
                  cache_path=tmp_path / "cache.sqlite", retry=FAST_RETRY)
    assert store.run("early").status == "stopped"  # the stop still stands
    assert [s.step for s in store.steps("early") if s.status == "completed"] == trained


# --- 11. what each proposal read, and review mode "all" -----------------------------------------

def _feedback_lines(prompt: str) -> int:
    return sum(line.startswith(("- [call ", "- [human] ")) for line in prompt.splitlines())


def test_a_proposal_records_the_feedback_its_optimizer_call_read(run_toy, store) -> None:
    """Stored with the proposal when its optimizer call is made (the step's gradients on its
    parameter and the human feedback not yet consumed), and readable the other way round."""
    human: list[str] = []

    def progress(event: str, info: dict) -> None:
        if event == "initial":
            human.append(store.add_human_feedback("read", "Carry the tens.", node="solver", target="toy.instruction"))

    script = Script(proposals={"toy.instruction": [proposal(BETTER)]})
    run = run_toy(script, run_id="read", progress=progress)
    p = _only(run.proposals("toy.instruction"))
    own = [g.id for g in store.gradients("read", step=1, target="toy.instruction")
           if g.text and g.origin != "human"]
    assert own and sorted(p.feedback_ids) == sorted(own + human)
    [prompt] = [x for x in script.of_kind("optimizer") if "Target parameter: `toy.instruction`" in x]
    assert _feedback_lines(prompt) == len(p.feedback_ids)  # every line the prompt held, no more
    assert tuple(g.id for g in store.gradients_by_id("read", p.feedback_ids)) == p.feedback_ids
    readers = store.proposals_reading("read", [*p.feedback_ids, "not-a-gradient"])
    assert {gid: [r.id for r in rows] for gid, rows in readers.items()} == {
        gid: [p.id] for gid in p.feedback_ids}
    other = _only(run.proposals("toy.output_format"))
    assert other.feedback_ids and human[0] not in other.feedback_ids  # it was written on the instruction


def _next_pending(store, seen: list[str], timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = [p for p in store.proposals("review", fate="pending") if p.id not in seen]
        if pending:
            return pending[0]
        time.sleep(0.02)
    raise AssertionError("no new proposal became pending")


def test_review_all_holds_malformed_and_check_failed_proposals_for_a_person(run_toy, store) -> None:
    human: list[str] = []

    def progress(event: str, info: dict) -> None:
        if event == "initial":
            human.append(store.add_human_feedback("review", "Use LEVEL=2.", node="solver", target="toy.instruction"))

    # The instruction's optimizer call replies with garbage; the output format's echoes its value (a failed check).
    out: list = []
    script = Script(proposals={"toy.instruction": ["%%% garbage !!!"]})
    thread = threading.Thread(target=lambda: out.append(run_toy(script, run_id="review", review="all",
                                                                progress=progress)), daemon=True)
    thread.start()
    malformed = _next_pending(store, [])
    assert (malformed.parameter, malformed.held_fate, malformed.value) == (
        "toy.instruction", "malformed", "%%% garbage !!!")
    assert malformed.val_score is None and "no <proposal> block" in malformed.reason
    # What it read is on record while it waits, the human feedback included (consumed only when the step ends).
    assert human[0] in malformed.feedback_ids
    assert _only([g for g in store.gradients("review") if g.id == human[0]]).consumed_step is None
    with pytest.raises(StoreError, match="no value to accept"):
        store.decide(malformed.id, "accept")
    store.decide(malformed.id, "edit", value=LEVEL2)  # a value written in its place

    failed_check = _next_pending(store, [malformed.id])
    assert (failed_check.parameter, failed_check.held_fate) == ("toy.output_format", "rejected_check")
    assert failed_check.reason == "same as the current value"
    store.decide(failed_check.id, "reject")
    thread.join(timeout=30)
    assert not thread.is_alive() and out and out[0].record.status == "completed"

    edited, dismissed = store.proposal(malformed.id), store.proposal(failed_check.id)
    assert (edited.fate, edited.decided_by, edited.decision_value) == ("accepted", "human", LEVEL2)
    assert "edited" in edited.reason
    assert store.parameter_values_at("review", 1)["toy.instruction"] == LEVEL2
    assert store.steps("review")[1].val_score == 0.8  # the written value was scored on validation first
    # ... and those scores are stored on the proposal (pages show them), said to be the edited value's.
    assert edited.val_score == 0.8 and edited.val_baseline is not None
    assert edited.minibatch_score is not None and edited.minibatch_baseline is not None
    assert "the scores are the edited value's" in edited.reason
    assert (dismissed.fate, dismissed.decided_by, dismissed.held_fate) == (
        "rejected_check", "human", "rejected_check")  # a rejection gives it back the fate it was held with


def test_review_all_accepting_a_check_failed_proposal_overrides_the_check(run_toy, store) -> None:
    plain = "Reply with the number alone."  # drops the 'Answer:' the output format must keep: refused
    thread, out = _train_in_background(run_toy, Script(proposals={"toy.output_format": [proposal(plain)]}),
                                       review="all")
    echo = _wait_for_pending(store)  # the instruction's optimizer call echoes its value
    assert (echo.parameter, echo.held_fate) == ("toy.instruction", "rejected_check")
    store.decide(echo.id, "reject")
    held = _next_pending(store, [echo.id])
    assert held.held_fate == "rejected_check" and "drops what the parameter's role needs" in held.reason
    store.decide(held.id, "accept")
    thread.join(timeout=30)
    assert not thread.is_alive() and out[0].record.status == "completed"
    p = store.proposal(held.id)
    assert p.fate == "accepted" and "over the check (drops what" in p.reason
    assert store.parameter_values_at("review", 1)["toy.output_format"] == plain
    scored = [c for c in store.call_summaries("review") if c.proposal_id == held.id]
    assert len(scored) == 10 + 6 and {c.phase for c in scored} == {"validate"}  # validation and mini-batch
    # The scores it was given are stored on it, as a validated proposal's are.
    assert p.val_score == store.steps("review")[1].val_score and p.val_baseline is not None
    assert p.minibatch_score is not None and p.minibatch_baseline is not None


def test_review_all_time_out_never_accepts_a_held_proposal(run_toy, store) -> None:
    run = run_toy(Script(proposals={"toy.instruction": ["%%% garbage !!!"]}), review="all", review_timeout=0.3,
                  review_fallback="accept")
    fates = [(p.parameter, p.fate, p.held_fate) for p in run.proposals()]
    assert fates == [("toy.instruction", "malformed", "malformed"),
                     ("toy.output_format", "rejected_check", "rejected_check")]
    assert all(p.decided_by.startswith("timeout") for p in run.proposals())
    assert run.values()["toy.instruction"] == INSTRUCTION and run.record.status == "completed"


def test_review_off_never_holds_a_proposal(run_toy) -> None:
    run = run_toy(Script(proposals={"toy.instruction": ["%%% garbage !!!"]}))
    assert [(p.fate, p.held_fate) for p in run.proposals()] == [("malformed", None), ("rejected_check", None)]


# --- feedback the optimizer may read -----------------------------------------------------------

class _CutOffBackward(FakeProvider):
    """The scripted fake, but a backward reply holding CUT comes back cut off at the token limit
    (finish_reason "length"), as a server answers when the reply reaches max_tokens."""

    def complete(self, model, request):
        completion = super().complete(model, request)
        return dataclasses.replace(completion, finish_reason="length") if "CUT" in completion.text else completion


def test_cut_off_or_failed_feedback_is_recorded_but_never_read(run_toy, store) -> None:
    """A backward reply cut off at the token limit stops mid-word: its gradient is kept with the
    reason, but neither the optimizer nor a proposal's record of the feedback it read sees it."""
    # The loss's feedback and the instruction's are whole; the output format's is cut off.
    script = Script(backward=lambda prompt: (
        "<feedback>Count the quantities written as wor CUT" if "Your target is the peer `toy.output_format`" in prompt
        else "<feedback>Carry the tens digit when adding.</feedback>"))
    run = run_toy(script, provider=_CutOffBackward(script), steps=1)
    gradients = store.gradients(run.run_id)
    cut = [g for g in gradients if g.error == "feedback cut off at the token limit"]
    usable = [g for g in gradients if not g.error]
    assert cut and usable and all("CUT" in g.text for g in cut)
    optimizer_prompts = script.of_kind("optimizer")
    assert optimizer_prompts and not any("CUT" in p for p in optimizer_prompts)
    assert any("Carry the tens digit" in p for p in optimizer_prompts)
    read = {i for p in store.proposals(run.run_id) for i in (p.feedback_ids or ())}
    assert read and read <= {g.id for g in usable} and not read & {g.id for g in cut}


def test_no_usable_feedback_means_no_optimizer_call(run_toy, store) -> None:
    script = Script(backward="<feedback>Count the quantities written as wor CUT")
    run = run_toy(script, provider=_CutOffBackward(script), steps=1)
    assert store.gradients(run.run_id) and all(g.error for g in store.gradients(run.run_id))
    assert script.of_kind("optimizer") == [] and store.proposals(run.run_id) == []


def test_an_interrupt_stops_a_trainer_called_directly_and_never_marks_it_failed(store, tmp_path, monkeypatch) -> None:
    """Ctrl-C in code that drives `Trainer.train` itself (not through the runner or the CLI): the
    run goes straight to stopped, resumable, and a reader never sees it failed in between."""
    from autodiff.config import make_config
    from autodiff.recovery import recovery
    from conftest import TOY_DEFAULTS

    statuses: list[str] = []
    set_status = store.set_run_status
    monkeypatch.setattr(store, "set_run_status", lambda run_id, status, **kw: (statuses.append(status),
                                                                               set_status(run_id, status, **kw)))

    def interrupt(event: str, info: dict) -> None:
        if event == "backward" and info["step"] == 2:
            raise KeyboardInterrupt

    config = make_config(**{**TOY_DEFAULTS, "steps": 3})
    trainer = runner.prepare(runner.task_for(config), config, store, run_id="direct", cache_path=tmp_path / "c.sqlite",
                             providers={"fake": FakeProvider(Script())}, progress=interrupt, retry=FAST_RETRY)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    run = store.run("direct")
    assert "failed" not in statuses and run.status == "stopped"
    assert "interrupted (Ctrl-C) after step 1; resume goes on from step 2" in run.error
    assert recovery(run).outlook == "go"
