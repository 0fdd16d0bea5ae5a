"""Tracing: nodes record invocations with call indices and the edges that fed them."""

from __future__ import annotations

import pytest

from autodiff.errors import ConfigError
from autodiff.evals import exact_match
from autodiff.graph import LLMNode, Loss, Runtime, Value, activate, deactivate, function_node
from autodiff.parameter import Parameter
from autodiff.pipeline import Pipeline, Task, run_sample


def _task(pipeline: Pipeline, gold: str = "done") -> Task:
    sample = {"id": "s1", "question": "q?", "answer": gold}
    return Task("t", pipeline, Loss(exact_match), {"train": [sample], "val": [sample], "test": [sample]})


class Loop(Pipeline):
    """One LLM node called three times in a loop, each call fed the previous call's output."""

    def __init__(self) -> None:
        self.instruction = Parameter("hop.instruction", "Refine the notes.", role="How to refine.")
        self.hop = LLMNode("hop", [self.instruction])
        self.tidy = function_node(lambda text: text.strip().lower(), name="tidy")

    def forward(self, sample: dict) -> Value:
        notes = sample["question"]
        for _ in range(3):
            notes = self.hop(question=sample["question"], notes=notes)
        return self.tidy(notes)


def test_repeated_calls_get_call_indices_in_order(make_llm) -> None:
    fake = make_llm(lambda request: "  Done ")
    task = _task(Loop())
    trace, evaluation = run_sample(task, task.splits["train"][0], fake.llm, run_id="r", step=1)
    hops = [i for i in trace.invocations if i.node == "hop"]
    assert [h.call_index for h in hops] == [0, 1, 2]
    assert [i.seq for i in trace.invocations] == list(range(len(trace.invocations)))
    # The first call's notes came from the sample; each later call's from the call before it.
    notes = [next(r for r in h.inputs if r.name == "notes") for h in hops]
    assert notes[0].source is None
    assert notes[1].source == hops[0].id and notes[2].source == hops[1].id
    # Each LLM call is recorded with the same call index as its invocation.
    assert [c.call_index for c in fake.phase("forward")] == [0, 1, 2]
    assert all(c.node == "hop" and c.sample_id == "s1" and c.step == 1 for c in fake.calls)
    assert [h.llm_call_id for h in hops] == [c.id for c in fake.calls]
    tidy = next(i for i in trace.invocations if i.node == "tidy")
    assert tidy.node_type == "function" and tidy.inputs[0].source == hops[2].id and tidy.output == "done"
    assert trace.loss.inputs[0].source == tidy.id
    assert evaluation.score == 1.0 and trace.score == 1.0


def test_llm_node_renders_template_with_parameter_values_and_overrides(make_llm) -> None:
    fake = make_llm(lambda request: "x")
    instruction = Parameter("n.instruction", "Be brief.", role="r")
    fmt = Parameter("n.format", "One word.", kind="output_format", role="r")
    node = LLMNode("n", [instruction, fmt], template="{{instruction}} {{format}}\nQ: {{question}}")

    class P(Pipeline):
        def __init__(self) -> None:
            self.node = node

        def forward(self, sample: dict) -> Value:
            return self.node(question=sample["question"])

    task = _task(P())
    trace, _ = run_sample(task, task.splits["train"][0], fake.llm)
    assert trace.invocations[0].prompt == "Be brief. One word.\nQ: q?"
    assert trace.invocations[0].parameters == (("n.instruction", "Be brief."), ("n.format", "One word."))
    trace, _ = run_sample(task, task.splits["train"][0], fake.llm, overrides={"n.format": "Two words."})
    assert trace.invocations[0].prompt == "Be brief. Two words.\nQ: q?"
    assert fmt.value == "One word."  # an override never edits the parameter
    assert instruction.peers == ["n.format"] and fmt.peers == ["n.instruction"]


def test_template_missing_input_and_node_outside_run_are_config_errors(make_llm) -> None:
    node = LLMNode("n", [Parameter("n.i", "x", role="r")], template="{{i}} {{question}}")
    with pytest.raises(ConfigError, match="outside a run"):
        node(question="q")
    token = activate(Runtime(llm=make_llm(lambda r: "x").llm, sample_id="s"))
    try:
        with pytest.raises(ConfigError, match="question"):
            node(context="c")
    finally:
        deactivate(token)


def test_duplicate_parameter_names_are_refused() -> None:
    class P(Pipeline):
        def __init__(self) -> None:
            self.a = LLMNode("a", [Parameter("same", "x", role="r")])
            self.b = LLMNode("b", [Parameter("same", "y", role="r")])

    with pytest.raises(ConfigError, match="same"):
        P().parameters()


def test_llm_error_marks_the_invocation_and_metric_out_of_range_is_refused(make_llm) -> None:
    from autodiff.errors import LLMTransientError

    fake = make_llm(lambda request: LLMTransientError("HTTP 503: overloaded"))
    task = _task(Loop())
    trace, evaluation = run_sample(task, task.splits["train"][0], fake.llm)
    hops = [i for i in trace.invocations if i.node == "hop"]
    # The first failed call ends the sample: it is an error, never a 0, and no later node runs.
    assert len(hops) == 1 and "gave up after 3 attempts" in hops[0].error
    assert evaluation.score is None and evaluation.errored and "gave up" in evaluation.error
    assert trace.score is None and "HTTP 503" in trace.error

    bad = Task("t", Loop(), Loss(lambda p, g: 2.0, "bad"), task.splits)
    with pytest.raises(ConfigError, match="outside"):
        run_sample(bad, task.splits["train"][0], make_llm(lambda r: "x").llm)
