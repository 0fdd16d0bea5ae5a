"""Provider faults are never wrong answers: errored samples stay unscored, comparisons use only
samples scored on both sides, too many errors decide nothing and stop the run (resumable), and
a failure is never replayed from the cache. Toy task and scripted fake: see conftest.py."""

from __future__ import annotations

import re
import threading
import time

import pytest

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


def test_a_sample_a_passing_fault_spoiled_is_asked_again_before_the_proposal_is_judged(run_toy) -> None:
    # The candidate's call on one validation sample outlasts its retries once; asked again after
    # the others, it answers: the proposal is judged on all 10 samples, as without the fault.
    failed = []

    def forward(prompt: str):
        if "digit by digit" in prompt and f"What is {_val_question(9)}?" in prompt \
                and len(failed) < FAST_RETRY.attempts:  # every attempt of the first call
            failed.append(prompt)
            return LLMTransientError("HTTP 503: overloaded", kind="server")
        return toy_forward(prompt)

    run = run_toy(Script(forward=forward, proposals={"toy.instruction": [proposal(BETTER)]}))
    p = run.proposals("toy.instruction")[0]
    assert failed and p.fate == "accepted" and "on 10 samples scored on both sides" in p.reason
    asked = [c for c in run.calls("validate") if c.sample_id == "val-09" and c.proposal_id == p.id]
    assert [bool(c.error) for c in asked] == [True, False]  # both asks recorded, the failed one as an error


def test_a_fault_that_could_flip_the_decision_decides_nothing(run_toy) -> None:
    # The current value (LEVEL=1) is right on val-00..04. The candidate is right on every training
    # sample (it passes the mini-batch), on val-01..05, and fails on val-00 with a fault that does
    # not pass. Scored on the other 9 it looks better (5/9 against 4/9); with val-00 at 0 it ties
    # (5/10 against 5/10). The fault could decide it: not judged, and the run stops, resumable.
    candidate = INSTRUCTION + " CANDIDATE"

    def forward(prompt: str):
        if "CANDIDATE" not in prompt:
            return toy_forward(prompt)
        if "[split train]" in prompt or f"What is {_val_question(5)}?" in prompt:
            a, b = map(int, re.search(r"What is (\d+) \+ (\d+)\?", prompt.rsplit("Question: ", 1)[-1]).groups())
            return f"Answer: {a + b}"
        if f"What is {_val_question(0)}?" in prompt:
            return LLMTransientError("HTTP 503: overloaded", kind="server")
        return toy_forward(prompt)

    run = run_toy(Script(forward=forward, proposals={"toy.instruction": [proposal(candidate)]}), max_error_share=0.2)
    p = run.proposals("toy.instruction")[0]
    assert p.fate == "error" and "could decide it either way" in p.reason, (p.fate, p.reason)
    assert run.record.status == "stopped" and run.values()["toy.instruction"] == INSTRUCTION
    # Asked twice (the second ask after the other samples), then left undecided.
    assert len([c for c in run.calls("validate") if c.sample_id == "val-00" and c.proposal_id == p.id]) == 2


def test_judge_decides_only_what_the_errored_samples_cannot_change() -> None:
    """The tester's case: 12 validation samples, the current value right on 5. The candidate
    errs (a fault) on one the current value gets right, and is right on one more elsewhere.
    Scored on the other 11 it looks better (5/11 against 4/11); with the errored sample at 0 it
    ties (5/12 against 5/12). The fault could decide it: not judged."""
    base = {f"s{i}": float(i < 5) for i in range(12)}
    cand = [Evaluation("s0", "", "", None, "LLMTransientError: HTTP 503")]
    cand += [Evaluation(f"s{i}", "", "", float(1 <= i < 6)) for i in range(1, 12)]
    j = judge(cand, base, Rule(max_error_share=0.1), stage="validation")
    assert not j.decided and not j.better and "could decide it either way" in j.reason
    assert (j.paired, round(j.score, 3), round(j.baseline, 3)) == (11, 0.455, 0.364)
    # Right on two more: better even with the errored sample at its worst: judged better.
    cand[-2:] = [Evaluation("s10", "", "", 1.0), Evaluation("s11", "", "", 1.0)]
    j = judge(cand, base, Rule(max_error_share=0.1), stage="validation")
    assert j.decided and j.better and "whatever its 1 errored samples would have scored" in j.reason
    # Worse even with it at its best: judged not better.
    worse = [Evaluation("s0", "", "", None, "x")] + [Evaluation(f"s{i}", "", "", 0.0) for i in range(1, 12)]
    j = judge(worse, base, Rule(max_error_share=0.1), stage="validation")
    assert j.decided and not j.better
    # An errored sample of the current value counts the same way.
    j = judge([Evaluation(f"s{i}", "", "", float(i < 5)) for i in range(12)], base | {"s0": None},
              Rule(max_error_share=0.1), stage="validation")
    assert not j.decided and "could decide it either way" in j.reason


def test_out_of_reach_counts_errored_samples_at_their_best() -> None:
    base = {"a": 1.0, "b": 1.0, "c": 0.0}
    rule = Rule(min_gain=0.0, max_error_share=0.5)
    # a: the candidate ties; b: it errored, and could have been a win over... nothing: b's current
    # value is right, so at best a tie; c still to come could win: not out of reach.
    assert not out_of_reach([Evaluation("a", "", "", 1.0), Evaluation("b", "", "", None, "x")], ["c"], base, rule, 3)
    # With c done and lost, nothing can raise the gain above 0: out of reach.
    done = [Evaluation("a", "", "", 1.0), Evaluation("b", "", "", None, "x"), Evaluation("c", "", "", 0.0)]
    assert out_of_reach(done, [], base, rule, 3)
    # An errored sample whose current value is wrong could be a win: not out of reach.
    assert not out_of_reach([Evaluation("a", "", "", 1.0), Evaluation("c", "", "", None, "x")], [], base, rule, 3)


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


def test_a_second_interrupt_stops_the_wait_for_calls_still_out_and_still_records_the_stop(store, tmp_path) -> None:
    """After Ctrl-C the trainer waits for the calls already sent (their replies are recorded),
    and says so. A second Ctrl-C during that wait used to end the process with the run still
    saying running and its finished calls unrecorded (while the terminal said stopped); now the
    wait ends, what finished is recorded, and the run says stopped, interrupted twice."""
    import os
    import signal

    from autodiff.config import make_config
    from autodiff.llm.fake import FakeProvider
    from conftest import TOY_DEFAULTS

    release = threading.Event()

    def forward(prompt: str):
        if "Reply with the word OK" in prompt:
            return "OK"
        release.wait(30)  # a slow server: the reply is still out when both interrupts come
        return "Answer: 1"

    events: list[str] = []
    timers = [threading.Timer(at, os.kill, (os.getpid(), signal.SIGINT)) for at in (1.5, 3.0)]
    for timer in timers:
        timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt) as raised:
            runner.train(store, make_config(**TOY_DEFAULTS), run_id="twice", cache_path=tmp_path / "cache.sqlite",
                         providers={"fake": FakeProvider(Script(forward=forward))},
                         progress=lambda event, info: events.append(event))
    finally:
        for timer in timers:
            timer.cancel()
        release.set()
    assert time.monotonic() - started < 10  # not the 30 s the calls would have taken
    assert "interrupting" in events
    assert getattr(raised.value, "abandoned_calls", False)
    run = store.run("twice")
    assert run.status == "stopped" and run.error.startswith("interrupted (Ctrl-C twice: the calls still out were "
                                                           "not waited for"), run.error


def test_an_interrupt_ends_calls_waiting_out_a_retry_after_at_once(store, tmp_path) -> None:
    """Ctrl-C (or SIGTERM) while calls wait out a server's 30 s Retry-After: they give up at once
    (the process does not live on until the wait is over), and the run says stopped only once no
    call of it is left, so a resume cannot start beside them."""
    import os
    import signal

    from autodiff.config import make_config
    from autodiff.llm.client import RetryPolicy
    from autodiff.llm.fake import FakeProvider
    from conftest import TOY_DEFAULTS

    def forward(prompt: str):
        if "Reply with the word OK" in prompt:
            return "OK"  # the preflight probe passes; then every call is rate-limited
        return LLMTransientError("HTTP 429: rate limited", kind="rate_limit", retry_after=30)

    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))  # Ctrl-C
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.train(store, make_config(**TOY_DEFAULTS), run_id="waiting", cache_path=tmp_path / "cache.sqlite",
                         providers={"fake": FakeProvider(Script(forward=forward))},
                         retry=RetryPolicy(budget_s=120, initial_wait=0, max_wait=0))
    finally:
        timer.cancel()
    assert time.monotonic() - started < 10  # not the 30 s Retry-After
    assert not [t for t in threading.enumerate() if t.name.startswith("autodiff-waiting")]  # no call left
    run = store.run("waiting")
    assert run.status == "stopped" and run.error.startswith("interrupted (")
