"""Provider faults are never wrong answers: errored samples stay unscored, comparisons use only
samples scored on both sides, too many errors decide nothing and stop the run (resumable), and
a failure is never replayed from the cache. Toy task and scripted fake: see conftest.py."""

from __future__ import annotations

import threading

from autodiff import runner
from autodiff.errors import LLMTransientError
from autodiff.judge import Rule, judge, out_of_reach
from autodiff.records import Evaluation
from conftest import FAST_RETRY, INSTRUCTION, Script, proposal, toy_forward

BETTER = "Add the two numbers in the question, digit by digit. LEVEL=3"  # val 0.5 -> 1.0


class Outage:
    """Forward calls on the samples named fail with a 429 until `end()` is called."""

    def __init__(self, failing: set[str], forward=toy_forward):
        self.failing, self.forward, self.on = failing, forward, True
        self.lock = threading.Lock()

    def end(self) -> None:
        self.on = False

    def __call__(self, prompt: str):
        if self.on and any(f"What is {q}?" in prompt for q in self.failing):
            return LLMTransientError("HTTP 429: rate limited", kind="rate_limit")
        return self.forward(prompt)


def _val_question(i: int) -> str:
    return f"{3 * i + 2} + {5 * i + 3}"  # toy_samples("val", ...) sample i


def test_rate_limited_baseline_stops_the_run_and_resume_asks_again(run_toy, tmp_path) -> None:
    # 7 of the 10 validation samples are rate-limited through the whole retry budget at step 0.
    outage = Outage({_val_question(i) for i in range(7)})
    script = Script(forward=outage, proposals={"toy.instruction": [proposal(INSTRUCTION + " ")]})
    run = run_toy(script, run_id="outage")
    record = run.record
    assert record.status == "stopped"
    assert "step 0: 7 of 10 validation samples errored" in record.error and "429" in record.error
    evals = run.store.evaluations("outage", split="val")
    assert sum(e.score is None for e in evals) == 7  # recorded as errors, never as 0
    assert all(e.error for e in evals if e.score is None)
    assert run.store.last_completed_step("outage") is None and run.proposals() == []
    failed_calls = [c for c in run.calls("validate", 0) if c.error]
    assert len(failed_calls) == 7 and {c.error_kind for c in failed_calls} == {"rate_limit"}

    # The outage ends; the resume asks the failed calls again (they were never cached).
    outage.end()
    asked_before = len(script.of_kind("forward"))
    runner.resume(run.store, "outage", providers={"fake": run.provider}, cache_path=tmp_path / "cache.sqlite",
                  retry=FAST_RETRY)
    assert run.record.status == "completed"
    val0 = [e for e in run.store.evaluations("outage", split="val") if e.step == 0]
    assert len(val0) == 10 and all(e.score is not None for e in val0)
    asked_again = script.of_kind("forward")[asked_before:]
    assert sum(any(f"What is {_val_question(i)}?" in p for i in range(7)) for p in asked_again) >= 7
    # The proposal that changes nothing but a space is never accepted.
    assert all(p.fate != "accepted" for p in run.proposals())


def test_errors_in_a_proposals_validation_decide_nothing(run_toy) -> None:
    # Validation errors start once the proposal is being validated: the candidate's answers are
    # right, but 3 of its 10 validation samples fail.
    def forward(prompt: str):
        if "digit by digit" in prompt and any(f"What is {_val_question(i)}?" in prompt for i in (0, 5, 9)):
            return LLMTransientError("HTTP 503: overloaded", kind="server")
        return toy_forward(prompt)

    run = run_toy(Script(forward=forward, proposals={"toy.instruction": [proposal(BETTER)]}), run_id="spoiled",
                  concurrency=1)
    p = run.proposals("toy.instruction")[0]
    assert p.fate == "error" and "validation samples errored" in p.reason
    assert run.record.status == "stopped" and "resume" in run.record.error
    assert run.values()["toy.instruction"] == INSTRUCTION  # nothing was accepted


def test_comparisons_use_only_samples_scored_on_both_sides(run_toy) -> None:
    # One validation sample errors for the candidate: within a 20% share, it is left out of both
    # sides of the comparison (the candidate is judged on the other 9).
    def forward(prompt: str):
        if "digit by digit" in prompt and f"What is {_val_question(9)}?" in prompt:
            return LLMTransientError("HTTP 500", kind="server")
        return toy_forward(prompt)

    run = run_toy(Script(forward=forward, proposals={"toy.instruction": [proposal(BETTER)]}),
                  max_error_share=0.2)
    p = run.proposals("toy.instruction")[0]
    assert p.fate == "accepted" and "on 9 samples scored on both sides" in p.reason
    assert p.val_score == 1.0 and abs(p.val_baseline - 5 / 9) < 1e-9


def test_errored_forward_samples_are_not_sent_backward(run_toy) -> None:
    flaky = "What is 14 + 25?"  # train-04, a sample the toy model gets wrong

    def forward(prompt: str):
        return LLMTransientError("HTTP 503", kind="server") if flaky in prompt else toy_forward(prompt)

    run = run_toy(Script(forward=forward), max_error_share=0.5)
    assert "train-04" not in run.store.steps(run.run_id)[1].failed_samples
    assert all(c.sample_id != "train-04" for c in run.calls("backward"))


def test_judge_pairs_samples_and_refuses_to_decide_on_errors() -> None:
    base = {"a": 0.0, "b": 1.0, "c": None, "d": 0.0}
    cand = [Evaluation("a", "", "", 1.0), Evaluation("b", "", "", 1.0), Evaluation("c", "", "", 1.0),
            Evaluation("d", "", "", None, "HTTP 429")]
    j = judge(cand, base, Rule(min_gain=0.0, max_error_share=0.5), stage="validation")
    assert j.decided and j.better and j.paired == 2 and (j.score, j.baseline) == (1.0, 0.5) and j.errors == 1
    j = judge(cand, base, Rule(min_gain=0.0, max_error_share=0.1), stage="validation")
    assert not j.decided and not j.better and "1 of 4 validation samples errored" in j.reason
    same = [Evaluation("a", "", "", 0.0), Evaluation("b", "", "", 1.0)]
    assert not judge(same, base, Rule(), stage="mini-batch").better  # no gain is no improvement


def test_out_of_reach_counts_errors_and_headroom() -> None:
    base = {"a": 0.0, "b": 0.0, "c": 1.0}
    rule = Rule(min_gain=0.5, max_error_share=0.34)
    assert not out_of_reach([Evaluation("a", "", "", 0.0)], ["b", "c"], base, rule, 3)
    assert out_of_reach([Evaluation("a", "", "", 0.0), Evaluation("b", "", "", 0.0)], ["c"], base, rule, 3)
    errs = [Evaluation("a", "", "", None, "x"), Evaluation("b", "", "", None, "x")]
    assert out_of_reach(errs, ["c"], base, rule, 3)  # 2 of 3 errored: can never be judged


def test_errored_baseline_samples_are_asked_again_before_a_proposal_is_judged(run_toy) -> None:
    # One validation sample fails at step 0 (within a 20% share); the proposal at step 1 is
    # judged on all 10 samples, the failed one asked again first, not on the 9 left.
    outage = Outage({_val_question(0)})

    def forward(prompt: str):
        reply = outage(prompt)
        if not isinstance(reply, Exception) and "digit by digit" in prompt:
            outage.end()  # the fault has passed by the time a proposal is validated
        return reply

    run = run_toy(Script(forward=forward, proposals={"toy.instruction": [proposal(BETTER)]}), max_error_share=0.2)
    p = run.proposals("toy.instruction")[0]
    assert p.fate == "accepted" and "on 10 samples scored on both sides" in p.reason
    assert p.val_baseline == 0.5  # the baseline with the re-asked sample, not 4/9


def test_failed_backward_calls_past_the_share_stop_the_run(run_toy) -> None:
    def backward(prompt: str):
        return LLMTransientError("HTTP 500", kind="server")

    run = run_toy(Script(backward=backward), run_id="nobackward")
    assert run.record.status == "stopped" and "backward calls failed" in run.record.error
    assert run.proposals() == [] and run.store.last_completed_step("nobackward") == 0


def test_a_validation_with_no_sample_scored_is_no_score(run_toy) -> None:
    run = run_toy(Script(forward=lambda prompt: LLMTransientError("HTTP 503", kind="server")),
                  run_id="unscored", max_error_share=1.0, steps=1)
    steps = run.store.steps("unscored")
    assert steps[0].val_score is None and steps[0].test_score is None  # never shown as 0
