"""GDPO: parsing proposals, the checks before validation, and what one optimizer call sees."""

from __future__ import annotations

from dataclasses import replace

import pytest

from autodiff.errors import LLMFatalError
from autodiff.optimizer import (Optimizer, OptimizerInput, build_prompt, feedback_read, format_gradients,
                                parse_proposals)
from autodiff.parameter import Parameter
from autodiff.prompts import OPTIMIZER_PROMPT, OPTIMIZER_SYSTEM
from autodiff.records import Gradient, Proposal
from conftest import EXAMPLES, INSTRUCTION, OUTPUT_FORMAT, Script, proposal


def _param(**kw) -> Parameter:
    return Parameter(**{"name": "p.format", "value": "End with 'Answer: <number>'.", "role": "Reply layout.",
                        "kind": "output_format", "must_keep": ("Answer:",), **kw})


def _proposal(value: str) -> Proposal:
    return Proposal(id="x", step=1, parameter="p.format", value=value, method="rephrase", reasoning="")


def _gradient(gid: str, sample: str | None, call: int | None, score: float | None, text: str,
              origin: str = "backward") -> Gradient:
    return Gradient(gid, sample, "n", None, call, "parameter", "p.format", None, score, text, None, origin=origin)


def test_parse_keeps_placeholders_inside_values_and_reads_several_blocks() -> None:
    text = (proposal("Reason step by step, then write 'Answer: <number>' on the last line.", "add", "why")
            + "\n" + proposal("Finish with <b>Answer: <number></b>.", "Add Example"))
    parsed, reason = parse_proposals(text)
    assert reason is None
    assert [p.value for p in parsed] == [
        "Reason step by step, then write 'Answer: <number>' on the last line.",
        "Finish with <b>Answer: <number></b>.",
    ]
    assert [p.method for p in parsed] == ["add", "add_example"]
    assert parsed[0].reasoning == "why"
    # A block left open ends at the next block; an unknown method falls back to rephrase.
    parsed, _ = parse_proposals("<proposal><method>shout</method><value>Be loud.<proposal><value>Be calm.</value>")
    assert [(p.method, p.value) for p in parsed] == [("rephrase", "Be loud."), ("rephrase", "Be calm.")]


@pytest.mark.parametrize("reply, reason", [
    ("I think the prompt is fine as it is.", "no <proposal> block"),
    ("<proposal><method>add</method><reasoning>the count is", "no <proposal> block"),
    ("<propos", "no <proposal> block"),
])
def test_malformed_reply_becomes_one_failed_proposal(make_llm, reply: str, reason: str) -> None:
    fake = make_llm(lambda request: reply)
    param = _param()
    [p] = Optimizer(fake.llm).propose(OptimizerInput(param, [], [], []), "run", 1)
    assert p.fate == "malformed" and reason in p.reason
    assert p.parameter == "p.format" and p.llm_call_id == fake.calls[0].id
    assert param.value == "End with 'Answer: <number>'."


@pytest.mark.parametrize("reply", ["", "   \n", "<think>The format could say more.</think>"])
def test_reply_with_no_text_is_an_error_asked_once(make_llm, reply: str) -> None:
    fake = make_llm(lambda request: reply)
    [p] = Optimizer(fake.llm).propose(OptimizerInput(_param(), [], [], []), "run", 1)
    assert p.fate == "error" and "optimizer call failed" in p.reason and p.value == ""
    assert fake.provider.calls == 1 and fake.calls[0].error_kind == "empty"


def test_optimizer_call_failure_is_raised_for_the_trainer_and_fatal_errors_stop(make_llm) -> None:
    from autodiff.errors import LLMTransientError

    fake = make_llm(lambda request: LLMTransientError("HTTP 503"))
    with pytest.raises(LLMTransientError, match="gave up after 3 attempts"):
        Optimizer(fake.llm).propose(OptimizerInput(_param(), [], [], []), "run", 1)
    fatal = make_llm(lambda request: LLMFatalError("HTTP 401: bad key"))
    with pytest.raises(LLMFatalError):
        Optimizer(fatal.llm).propose(OptimizerInput(_param(), [], [], []), "run", 1)


def test_checks_reject_garbage_before_validation() -> None:
    opt = Optimizer(llm=None)  # check() needs no LLM
    param = _param()
    line = next(l for l in OPTIMIZER_PROMPT.splitlines() if l.startswith("Samples the current prompt"))
    cases = {
        "": "empty",
        "   ": "empty",
        param.value: "same as the current value",
        "Use the form 'Answer: N'. <feedback>more</feedback>": "own tag",
        "Answer: <number>. </proposal>": "own tag",
        f"Answer: N. {line}": "own instructions",
        f"{OPTIMIZER_SYSTEM} Answer: N": "own instructions",
        "End with the number only, nothing else at all.": "drops what the parameter's role needs",
        "Answer: " + "x" * 2000: "far longer",
    }
    for value, reason in cases.items():
        assert reason in (opt.check(_proposal(value), param, []) or ""), value
    assert opt.check(_proposal("Tried before. Answer: N"), param, ["Tried before. Answer: N"]) == (
        "repeats a value that was already tried")
    plain = Parameter("p.instruction", "Count every item in the list, then add them up.", role="Task.")
    assert "too short" in opt.check(_proposal("Count."), plain, [])
    assert opt.check(_proposal("Finish with the line 'Answer: <number>' in digits."), param, []) is None


def test_prompt_shows_peers_others_history_and_gradients_lowest_first() -> None:
    target, peer = _param(), Parameter("p.instruction", "Count the items.", role="Task.")
    other = Parameter("q.instruction", "Write a query.", role="Query.", node="q")
    grads = [
        _gradient("g1", "b", 1, 0.5, "second call of b"),
        _gradient("g2", "b", 0, 0.5, "first call of b"),
        _gradient("g3", "a", 0, 0.0, "a is worst"),
        _gradient("g4", None, None, None, "from a person", origin="human"),
    ]
    text = format_gradients(grads)
    assert text.index("a is worst") < text.index("first call of b") < text.index("second call of b")
    assert "[human] from a person" in text
    prompt = build_prompt(OptimizerInput(target, [peer], [other], grads, [("2+2?", "4")]), n=3)
    assert '<peer name="p.instruction" kind="instruction">\nCount the items.\n</peer>' in prompt
    assert '<param name="q.instruction" node="q">\nWrite a query.\n</param>' in prompt
    assert "<current_value>\nEnd with 'Answer: <number>'.\n</current_value>" in prompt
    assert "Write 3 different proposals" in prompt and "- input: 2+2?\n  output: 4" in prompt


def test_optimizer_prompt_for_one_peer_shows_the_other_peers_current_values(run_toy) -> None:
    better = "Add the two numbers in the question, digit by digit. LEVEL=2"
    script = Script(proposals={"toy.instruction": [proposal(better)]})
    run = run_toy(script, steps=2)
    assert run.record.status == "completed"
    prompts = script.of_kind("optimizer")
    by_target = [(p.split("`", 2)[1], p) for p in prompts]
    # Each step: instruction, then output_format (the examples peer is not trainable).
    assert [t for t, _ in by_target] == ["toy.instruction", "toy.output_format"] * 2
    first_instruction, first_format, second_instruction, _ = (p for _, p in by_target)
    assert f'<peer name="toy.output_format" kind="output_format">\n{OUTPUT_FORMAT}\n</peer>' in first_instruction
    assert f'<peer name="toy.examples" kind="examples">\n{EXAMPLES}\n</peer>' in first_instruction
    assert f"<current_value>\n{INSTRUCTION}\n</current_value>" in first_instruction
    # The instruction was accepted before output_format's call: its peer view is the current value.
    assert f'<peer name="toy.instruction" kind="instruction">\n{better}\n</peer>' in first_format
    assert INSTRUCTION not in first_format
    assert f"<current_value>\n{better}\n</current_value>" in second_instruction
    # The accepted value shows up in the proposal history with its validation score.
    assert f'<entry score="0.800" step="1">\n{better}\n</entry>' in second_instruction


def test_lenient_parsing_takes_bare_values_and_untagged_replies() -> None:
    assert parse_proposals("Count each item once.")[0] == []  # strict by default
    parsed, reason = parse_proposals("Count each item once.", lenient=True)
    assert reason is None and [(p.method, p.value) for p in parsed] == [("untagged", "Count each item once.")]
    parsed, _ = parse_proposals("Sure! <value>Count twice.</value>", lenient=True)
    assert [p.value for p in parsed] == ["Count twice."]
    # A reply with stray tags but no value is still malformed: it is probably our template echoed.
    assert parse_proposals("<feedback>nothing</feedback>", lenient=True)[0] == []


def test_feedback_read_is_the_feedback_the_prompt_holds() -> None:
    """A proposal records the ids of the gradients its prompt held, in the prompt's order (lowest
    score first); when the feedback is cut to fit, the ids cut away are not recorded."""
    grads = [_gradient(f"g{i}", f"s{i}", 0, (9 - i) / 10, "x" * 100) for i in range(10)]
    assert feedback_read(grads) == tuple(f"g{i}" for i in reversed(range(10)))
    text = format_gradients(grads, limit_chars=300)
    assert feedback_read(grads, limit_chars=300) == ("g9", "g8")
    assert 'id="s8"' in text and 'id="s7"' not in text and "more feedback cut" in text
    assert feedback_read([replace(grads[0], id="")]) == ()  # no id, nothing to record
