"""Users' code is isolated: a function node, a parser or a metric that raises fails its sample,
never the run, and never scores it 0; a metric returning a non-number, clashing names, unusable
data and a forward() no parameter can influence are refused before anything is spent."""

from __future__ import annotations

import math

import pytest

from autodiff.api import train
from autodiff.errors import ConfigError, DataError, LLMFatalError
from autodiff.evals import exact_match
from autodiff.graph import LLMNode, Loss, Runtime, UserCodeError, Value, activate, deactivate, function_node
from autodiff.llm.client import LLM
from autodiff.llm.fake import FakeProvider
from autodiff.llm.types import Completion, Request
from autodiff.parameter import Parameter
from autodiff.pipeline import Pipeline, Task, check_connected, run_sample
from conftest import INSTRUCTION, Script, ToyAdder, proposal, toy_task

SAMPLE = {"id": "s1", "question": "How many legs has a spider?", "answer": "8"}


def one_sample_task(pipeline: Pipeline, loss: Loss | None = None, **options) -> Task:
    return Task("t", pipeline, loss or Loss(exact_match, "exact_match"),
                {"train": [SAMPLE], "val": [SAMPLE], "test": [SAMPLE]}, **options)


def words_to_number(text: str) -> int:
    return int(text)


class AnswerThenConvert(Pipeline):
    """LLM node -> function node; `parse` is the LLM node's parser."""

    def __init__(self, parse=None, trainable: bool = True) -> None:
        self.instruction = Parameter("answer.instruction", "Answer with a number.", role="How to answer.",
                                     trainable=trainable)
        self.answer = LLMNode("answer", [self.instruction], parse=parse)
        self.convert = function_node(words_to_number)

    def forward(self, sample: dict) -> Value:
        return self.convert(self.answer(question=sample["question"]))


# --- 1. user code fails the sample, not the run -----------------------------------------------

def fussy_match(prediction: str, gold: str) -> float:
    """Exact match that cannot handle two of the toy's gold answers: val-03 (29), train-01 (15)."""
    if gold in ("29", "15"):
        raise ValueError(f"cannot compare {prediction!r} with {gold!r}")
    return exact_match(prediction, gold)


def test_a_metric_raising_on_one_sample_marks_it_errored_and_the_run_completes(store, tmp_path, capsys) -> None:
    base = toy_task()
    task = Task("toy", ToyAdder(), Loss(fussy_match, "fussy"), base.splits, tau=1.0)
    better = INSTRUCTION.replace("LEVEL=1", "LEVEL=3")
    script = Script(proposals={"toy.instruction": [proposal(better)]})
    result = train(task, model=FakeProvider(script), store=store, cache=tmp_path / "cache.sqlite",
                   progress=False, steps=1, batch_size=8, max_error_share=0.2, proposals=1)
    # 1 of 10 validation and 1 of 8 training samples errored: under 20%, so the run goes on.
    assert result.status == "completed", result.error
    val0 = {e.sample_id: e for e in store.evaluations(result.run_id, split="val", subject="current")
            if e.step == 0}
    errored = val0["val-03"]
    assert errored.score is None
    for part in ("val-03", "metric 'fussy_match' (loss 'fussy')", "ValueError", "cannot compare '29' with '29'"):
        assert part in errored.error
    # The errored sample is left out of the mean, not counted as a 0: 4 of the 9 scored are right.
    assert result.scores[0].val_score == pytest.approx(4 / 9)
    # The better value was still judged and accepted on the samples scored on both sides.
    assert result.best_values["toy.instruction"] == better and result.best_val == 1.0

    # The training sample's trace keeps the failing loss invocation with the full traceback ...
    invocations = [i for i in store.invocations(result.run_id, step=1) if i.sample_id == "train-01"]
    loss = next(i for i in invocations if i.node_type == "loss")
    first, rest = loss.error.split("\n", 1)
    assert first == "ValueError: cannot compare '16' with '15'"  # train-01 is answered wrong
    assert "Traceback (most recent call last)" in rest and "in fussy_match" in rest
    assert loss.score is None and [r.name for r in loss.inputs] == ["prediction", "gold"]
    assert any(i.node == "solver" for i in invocations)  # what ran before it is visible too
    # ... and, being neither failed nor correct, it is never sent backward.
    assert "train-01" not in {g.sample_id for g in store.gradients(result.run_id)}
    # The step's figures say so wherever they are shown: `autodiff show` and the export.
    from autodiff.cli import main
    from autodiff.export import export_run

    [step1] = [s for s in export_run(store, result.run_id)["steps"] if s["step"] == 1]
    batch = step1["minibatch"]
    assert batch["errored"] == 1 and batch["batch"] == 8
    assert batch["correct"] + batch["failing"] + batch["errored"] == 8
    assert batch["failing"] == batch["sent_backward"] + batch["over_cap"]
    assert main(["--store", store.spec, "show", result.run_id]) == 0
    shown = capsys.readouterr().out
    assert f"failed {batch['failing']}/8 (1 errored)" in shown, shown


def test_a_function_node_raising_marks_the_sample_errored_naming_the_node(make_llm) -> None:
    fake = make_llm(lambda request: "five")
    task = one_sample_task(AnswerThenConvert())
    trace, evaluation = run_sample(task, SAMPLE, fake.llm)
    assert evaluation.score is None and evaluation.errored and trace.score is None
    assert evaluation.error == trace.error == (
        "sample 's1': function node 'words_to_number' raised ValueError: invalid literal for int() with base 10: "
        "'five'")
    # The failing invocation is in the trace, with its input (linked to the LLM call that fed it)
    # and "ExcType: message" then the traceback, which ends in the user's own line.
    answer, convert = trace.invocations
    assert convert.node == "words_to_number" and convert.node_type == "function"
    assert convert.inputs[0].text == "five" and convert.inputs[0].source == answer.id
    first, rest = convert.error.split("\n", 1)
    assert first == "ValueError: invalid literal for int() with base 10: 'five'"
    assert "return int(text)" in rest and "graph.py" not in rest  # none of the engine's own frames
    assert trace.loss is None  # nothing after the failure ran


def test_a_parser_that_raises_is_an_error_of_the_sample_not_a_score_of_zero(make_llm) -> None:
    def strict(text: str) -> str:
        if not text.isdigit():
            raise ValueError(f"not a number: {text!r}")
        return text

    fake = make_llm(lambda request: "eight legs")
    task = one_sample_task(AnswerThenConvert(parse=strict))
    trace, evaluation = run_sample(task, SAMPLE, fake.llm)
    # It used to be scored as an empty answer (a 0); a parser fault now names the node instead.
    assert evaluation.score is None
    assert "the parser of LLM node 'answer' raised ValueError: not a number: 'eight legs'" in evaluation.error
    (answer,) = trace.invocations
    assert answer.error.startswith("ValueError: not a number: 'eight legs'\n")
    assert answer.llm_call_id == fake.calls[0].id and fake.calls[0].response == "eight legs"


def test_a_parser_failing_on_a_cut_off_reply_says_the_reply_was_cut_off() -> None:
    class CutOff(FakeProvider):
        def complete(self, model: str, request: Request) -> Completion:
            return Completion("The answer is ei", 3, 4, finish_reason="length")

    def strict(text: str) -> str:
        raise ValueError("no number")

    task = one_sample_task(AnswerThenConvert(parse=strict))
    trace, evaluation = run_sample(task, SAMPLE, LLM("fake:cut", CutOff()))
    assert evaluation.error.endswith("raised ValueError: no number; its reply was cut off at the token limit "
                                     "(256 tokens)")
    assert trace.invocations[0].error.endswith("\n(reply cut off at the token limit (256 tokens))")


def test_config_errors_and_fatal_provider_errors_still_stop_the_run(make_llm) -> None:
    def misconfigured(text: str) -> int:
        raise ConfigError("the converter needs a locale")

    pipeline = AnswerThenConvert()
    pipeline.convert = function_node(misconfigured, name="words_to_number")
    with pytest.raises(ConfigError, match="locale"):
        run_sample(one_sample_task(pipeline), SAMPLE, make_llm(lambda r: "8").llm)
    with pytest.raises(LLMFatalError):
        run_sample(one_sample_task(AnswerThenConvert()), SAMPLE,
                   make_llm(lambda r: LLMFatalError("HTTP 401: bad key")).llm)


def test_forward_code_raising_is_an_error_of_the_sample(make_llm) -> None:
    class Typo(AnswerThenConvert):
        def forward(self, sample: dict) -> Value:
            return self.convert(self.answer(question=sample["questoin"]))

    task = one_sample_task(Typo())
    trace, evaluation = run_sample(task, SAMPLE, make_llm(lambda r: "8").llm)
    assert evaluation.score is None
    assert evaluation.error.startswith("sample 's1': Typo.forward() raised KeyError: 'questoin' (at test_user_code.py:")


def test_a_user_code_error_keeps_its_cause(make_llm) -> None:
    token = activate(Runtime(llm=make_llm().llm, sample_id="s9"))
    try:
        with pytest.raises(UserCodeError) as caught:
            Loss(fussy_match, "fussy")(Value("15"), "15")
    finally:
        deactivate(token)
    assert isinstance(caught.value.cause, ValueError) and caught.value.sample_id == "s9"
    assert caught.value.details.startswith("ValueError: cannot compare")


# --- 2. a metric must return a number in [0, 1] ------------------------------------------------

@pytest.mark.parametrize("returned, shown", [
    (None, "None (NoneType)"),
    ({"score": 1.0}, "{'score': 1.0} (dict)"),
    ((1.0, "exact"), "(1.0, 'exact') (tuple)"),
    ("1.0", "'1.0' (str)"),
])
def test_a_metric_returning_a_non_number_is_a_config_error_naming_it_and_the_value(make_llm, returned, shown) -> None:
    def judge_answer(prediction, gold):
        return returned

    task = one_sample_task(AnswerThenConvert(), Loss(judge_answer, "judged"))
    with pytest.raises(ConfigError) as caught:
        run_sample(task, SAMPLE, make_llm(lambda r: "8").llm)
    message = str(caught.value)
    assert "metric 'judge_answer' (loss 'judged')" in message and f"returned {shown}" in message
    assert "sample 's1'" in message and "number in [0, 1]" in message


def test_a_metric_value_is_checked_for_range_and_nan_and_a_long_value_is_shortened(make_llm) -> None:
    llm = make_llm(lambda r: "8").llm
    for value, expected in ((math.nan, "returned nan"), (1.5, "returned 1.5"), (-1, "returned -1")):
        task = one_sample_task(AnswerThenConvert(), Loss(lambda p, g, v=value: v, "bad"))
        with pytest.raises(ConfigError, match="outside \\[0, 1\\]") as caught:
            run_sample(task, SAMPLE, llm)
        assert expected in str(caught.value) and "metric of loss 'bad'" in str(caught.value)
    task = one_sample_task(AnswerThenConvert(), Loss(lambda p, g: ["x" * 50] * 40, "long"))
    with pytest.raises(ConfigError) as caught:
        run_sample(task, SAMPLE, llm)
    assert "..." in str(caught.value) and len(str(caught.value)) < 300


def test_a_metric_may_return_a_bool_or_an_int(make_llm) -> None:
    llm = make_llm(lambda r: "8").llm
    for metric, expected in ((lambda p, g: str(p) == g, 1.0), (lambda p, g: str(p) != g, 0.0), (lambda p, g: 1, 1.0)):
        _, evaluation = run_sample(one_sample_task(AnswerThenConvert(), Loss(metric, "m")), SAMPLE, llm)
        assert evaluation.score == expected and evaluation.error is None


# --- 3. names ----------------------------------------------------------------------------------

def test_two_nodes_with_one_name_are_refused_naming_the_clash() -> None:
    pipeline = AnswerThenConvert()
    pipeline.convert = function_node(words_to_number, name="answer")
    with pytest.raises(ConfigError, match="two nodes are named 'answer': an LLM node and a function node "
                                          "\\(wrapping words_to_number\\)"):
        one_sample_task(pipeline)
    with pytest.raises(ConfigError, match="the loss is named 'answer', like an LLM node"):
        one_sample_task(AnswerThenConvert(), Loss(exact_match, "answer"))
    # One node held by two attributes is one node.
    held_twice = AnswerThenConvert()
    held_twice.tools = [held_twice.convert]
    one_sample_task(held_twice)


def test_two_parameters_of_one_node_with_one_placeholder_name_are_refused() -> None:
    first = Parameter("answer.instruction", "a", role="r")
    second = Parameter("style.instruction", "b", role="r")
    with pytest.raises(ConfigError, match="LLM node 'answer': parameters 'answer.instruction' and "
                                          "'style.instruction' share the placeholder name 'instruction'"):
        LLMNode("answer", [first, second])
    with pytest.raises(ConfigError, match="parameter 'answer.instruction' is given twice"):
        LLMNode("answer", [first, first])


def test_a_parameter_shared_by_two_nodes_is_refused_naming_both() -> None:
    class Shared(Pipeline):
        def __init__(self) -> None:
            self.instruction = Parameter("shared.instruction", "Be brief.", role="r")
            self.draft = LLMNode("draft", [self.instruction])
            self.final = LLMNode("final", [self.instruction])

        def forward(self, sample: dict) -> Value:
            return self.final(draft=self.draft(question=sample["question"]))

    with pytest.raises(ConfigError, match="parameter 'shared.instruction' is used by LLM nodes 'draft' and "
                                          "'final': sharing a parameter is refused"):
        one_sample_task(Shared())


def test_a_task_needs_a_loss_and_a_forward() -> None:
    with pytest.raises(ConfigError, match="wrap your metric"):
        one_sample_task(AnswerThenConvert(), exact_match)  # type: ignore[arg-type]

    class NoForward(Pipeline):
        pass

    with pytest.raises(ConfigError, match="NoForward does not define forward"):
        one_sample_task(NoForward())


# --- 4. data -----------------------------------------------------------------------------------

def splits(**changed: list) -> dict[str, list]:
    base = {"train": [dict(SAMPLE, id="t0"), dict(SAMPLE, id="t1")], "val": [dict(SAMPLE, id="v0")],
            "test": [dict(SAMPLE, id="x0")]}
    return {**base, **changed}


def make(data: dict, **options) -> Task:
    return Task("mine", AnswerThenConvert(), Loss(exact_match, "exact_match"), data, **options)


def test_samples_without_an_id_the_gold_key_or_an_input_key_are_one_data_error() -> None:
    no_id = {"question": "q", "answer": "a"}
    with pytest.raises(DataError, match="split 'val', sample 1 has no 'id'"):
        make(splits(val=[dict(SAMPLE, id="v0"), no_id]))
    labelled = [{"id": "t0", "question": "q", "label": "a"}]
    with pytest.raises(DataError) as caught:
        make(splits(train=labelled))
    assert ("split 'train', sample 0 (id 't0') has no 'answer' (the gold_key): set gold_key= to the key that "
            "holds the expected answer (its keys: id, question, label)") in str(caught.value)
    make(splits(train=labelled, val=[dict(s, label="a") for s in splits()["val"]],
                test=[dict(s, label="a") for s in splits()["test"]]), gold_key="label")  # as the error says
    with pytest.raises(DataError, match="split 'test', sample 0 \\(id 'x0'\\) has no 'text' \\(one of input_keys\\)"):
        make(splits(), input_keys=("question", "text"))


def test_all_data_problems_are_counted_and_the_first_few_shown() -> None:
    rows = [{"id": f"t{i}", "question": "q"} for i in range(12)]
    with pytest.raises(DataError) as caught:
        make(splits(train=rows))
    message = str(caught.value)
    assert message.startswith("task 'mine': 12 problems in the samples:")
    assert "sample 4 (id 't4')" in message and "sample 5 " not in message and "(and 7 more)" in message


def test_ids_must_be_strings_and_unique_across_splits() -> None:
    with pytest.raises(DataError, match="split 'train', sample 0: id 7 is not a non-empty string"):
        make(splits(train=[dict(SAMPLE, id=7)]))
    with pytest.raises(DataError, match="split 'val', sample 0 \\(id 't1'\\): split 'train', sample 1 has the same "
                                        "id but is another sample"):
        make(splits(val=[dict(SAMPLE, id="t1", answer="9")]))
    with pytest.raises(DataError, match="split 'train', sample 1 \\(id 't0'\\): split 'train', sample 0"):
        make(splits(train=[dict(SAMPLE, id="t0"), dict(SAMPLE, id="t0", question="other")]))
    make(splits(val=[dict(SAMPLE, id="t1")]))  # the same sample in two splits is one sample


def test_text_that_is_not_valid_unicode_is_a_data_error_naming_sample_and_key() -> None:
    """Bytes that were not UTF-8, decoded with errors='surrogateescape', leave lone surrogates that
    the store, the cache and every provider refuse mid-run; refused up front, by key path."""
    with pytest.raises(DataError, match=r"split 'val', sample 0 \(id 'v0'\): 'question' is not valid Unicode"):
        make(splits(val=[dict(SAMPLE, id="v0", question="caf\udce9?")]))
    with pytest.raises(DataError, match=r"split 'train', sample 0 \(id 't\\udcff'\): 'id' is not valid"):
        make(splits(train=[dict(SAMPLE, id="t\udcff")]))
    with pytest.raises(DataError, match=r"'passages'\[1\] is not valid Unicode"):
        make(splits(test=[dict(SAMPLE, id="x0", passages=["fine", "b\udc80d"])]))
    make(splits(val=[dict(SAMPLE, id="v0", question="café? 日本 🎉")]))  # real Unicode is fine


def test_a_loop_that_does_not_end_fails_its_sample_before_the_next_call_is_sent(make_llm) -> None:
    class Forever(AnswerThenConvert):
        def forward(self, sample: dict) -> Value:
            while True:
                self.answer(question=sample["question"])

    fake = make_llm(lambda request: "8")
    task = one_sample_task(Forever(), max_node_calls=7)
    trace, evaluation = run_sample(task, SAMPLE, fake.llm)
    assert evaluation.score is None and evaluation.errored
    assert "forward() called nodes 7 times on this sample, the limit" in evaluation.error
    assert "max_node_calls" in evaluation.error
    assert len(trace.invocations) == 7 and len(fake.calls) == 7  # the 8th call never reached the model
    check_connected(one_sample_task(Forever()))  # the dry run ends too (at the default limit), and cannot tell


def test_splits_must_be_lists_of_dicts() -> None:
    with pytest.raises(DataError, match="split 'train' is a str, not a list of sample dicts"):
        make(splits(train="train.jsonl"))
    with pytest.raises(DataError, match="split 'val', sample 0 is a str, not a dict"):
        make(splits(val=["What is 2 + 2?"]))
    with pytest.raises(DataError, match="splits must be a dict"):
        make([SAMPLE])  # type: ignore[arg-type]


# --- 5. a forward() that training cannot influence ---------------------------------------------

def test_a_connected_pipeline_passes_the_dry_run_without_touching_a_provider() -> None:
    task = toy_task()
    before = {p.name: p.value for p in task.pipeline.parameters()}
    check_connected(task)
    check_connected(one_sample_task(AnswerThenConvert()))  # through a function node
    assert {p.name: p.value for p in task.pipeline.parameters()} == before


def test_a_forward_returning_a_plain_value_is_refused() -> None:
    class Plain(AnswerThenConvert):
        def forward(self, sample: dict) -> str:
            return f"The answer is {self.answer(question=sample['question'])}"

    with pytest.raises(ConfigError, match="task 't': forward\\(\\) returned a plain str, not a node's output"):
        check_connected(one_sample_task(Plain()))


def test_an_output_no_trainable_parameter_feeds_is_refused_naming_the_node() -> None:
    class Bypass(AnswerThenConvert):
        def forward(self, sample: dict) -> Value:
            self.answer(question=sample["question"])  # its output is dropped
            return self.convert(sample["answer"])

    with pytest.raises(ConfigError) as caught:
        check_connected(one_sample_task(Bypass()))
    assert ("the output comes from function node 'words_to_number', which no trainable parameter feeds; "
            "LLM node(s) 'answer' ran but do not feed it") in str(caught.value)

    class Frozen(AnswerThenConvert):
        def __init__(self) -> None:
            super().__init__()
            self.extra = Parameter("check.instruction", "Check the answer.", role="r")
            self.check = LLMNode("check", [self.extra])

        def forward(self, sample: dict) -> Value:
            draft = self.answer(question=sample["question"])
            return self.check(answer=str(draft))  # str() drops the link to `answer`

    pipeline = Frozen()
    pipeline.extra.trainable = False
    with pytest.raises(ConfigError, match="comes from LLM node 'check', which no trainable parameter feeds; "
                                          "the LLM nodes feeding it \\(check\\) have no trainable parameter"):
        check_connected(one_sample_task(pipeline))
    with pytest.raises(ConfigError, match="no trainable parameter, so training has nothing to change"):
        check_connected(one_sample_task(AnswerThenConvert(trainable=False)))


def test_the_dry_run_is_lenient_with_code_that_cannot_handle_the_scripted_reply() -> None:
    # "ok" is no number: words_to_number raises in the dry run, which says nothing about the wiring.
    class PlainAfterFailure(AnswerThenConvert):
        def forward(self, sample: dict) -> str:
            return str(self.convert(self.answer(question=sample["question"])))

    check_connected(one_sample_task(PlainAfterFailure()))

    def never(text: str) -> str:
        raise ValueError("unreadable")

    check_connected(one_sample_task(AnswerThenConvert(parse=never)))
