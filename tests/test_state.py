"""A pipeline's state: read, write, save, load, load from a run; running a pipeline on a new
input; `autodiff prompts`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autodiff import cli, state
from autodiff.errors import ConfigError, LLMError
from autodiff.graph import current_runtime
from autodiff.parameter import Parameter
from tests.conftest import EXAMPLES, INSTRUCTION, OUTPUT_FORMAT, Script, ToyAdder, proposal, user_text

BETTER = "Add the two numbers in the question, digit by digit. LEVEL=3"
NAMES = ["toy.instruction", "toy.output_format", "toy.examples"]
# Not in any split; right only at LEVEL>=3 (the scripted model answers 2 + 3 + 1 below that).
NEW_INPUT = {"question": "What is 2 + 3? [difficulty 3] [split new]"}


@pytest.fixture
def trained(run_toy):
    """A toy run of two steps: BETTER accepted at step 1 (validation 0.5 -> 1.0), nothing at step 2."""
    run = run_toy(Script(proposals={"toy.instruction": [proposal(BETTER)]}), steps=2)
    assert [p.fate for p in run.proposals("toy.instruction", step=1)] == ["accepted"]
    return run


def test_state_round_trip_in_pipeline_order() -> None:
    pipeline = ToyAdder()
    assert list(pipeline.state()) == NAMES
    assert pipeline.state() == {"toy.instruction": INSTRUCTION, "toy.output_format": OUTPUT_FORMAT,
                                "toy.examples": EXAMPLES}
    changed = {**pipeline.state(), "toy.instruction": BETTER}
    assert pipeline.load_state(changed) is pipeline
    assert pipeline.state() == changed
    assert pipeline.instruction.value == BETTER
    fresh = ToyAdder().load_state(pipeline.state())
    assert fresh.state() == changed


def test_partial_load_sets_only_the_names_given() -> None:
    pipeline = ToyAdder()
    pipeline.load_state({"toy.instruction": BETTER}, partial=True)
    assert pipeline.state() == {"toy.instruction": BETTER, "toy.output_format": OUTPUT_FORMAT,
                                "toy.examples": EXAMPLES}


def test_bad_state_is_one_error_naming_every_problem_and_changes_nothing() -> None:
    pipeline = ToyAdder()
    before = pipeline.state()
    bad = {"toy.instruction": BETTER, "toy.nope": "x", "other.name": "y", "toy.examples": 3}
    with pytest.raises(ConfigError) as caught:
        pipeline.load_state(bad)
    message = str(caught.value)
    for name in ("toy.nope", "other.name", "toy.output_format", "'toy.examples' is int"):
        assert name in message
    assert pipeline.state() == before  # toy.instruction was valid, and still not applied

    with pytest.raises(ConfigError) as caught:
        pipeline.load_state({"toy.instruction": None}, partial=True)
    assert "'toy.instruction' is NoneType" in str(caught.value) and "missing" not in str(caught.value)
    with pytest.raises(ConfigError, match="toy.nope"):
        pipeline.load_state({"toy.nope": "x"}, partial=True)
    assert pipeline.state() == before


def test_save_then_load_into_a_fresh_pipeline_and_run_it_on_a_new_input(tmp_path: Path, make_llm) -> None:
    trained = ToyAdder().load_state({"toy.instruction": BETTER}, partial=True)
    path = trained.save(tmp_path / "out" / "best.json")
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc == {"format": "autodiff.pipeline-state/1", "parameters": trained.state()}
    assert list(doc["parameters"]) == NAMES
    assert [p.name for p in path.parent.iterdir()] == ["best.json"]  # no temporary file left

    fresh = ToyAdder().load(path)
    assert fresh.state() == trained.state()
    llm = make_llm(Script())
    assert fresh(NEW_INPUT, llm.llm) == "5"  # the data, not a Value; no gold, no id needed
    (_, request), = llm.provider.requests
    assert BETTER in user_text(request) and INSTRUCTION not in user_text(request)
    with pytest.raises(ConfigError):  # no runtime is left active
        current_runtime()

    untrained = make_llm(Script())
    assert ToyAdder()(NEW_INPUT, untrained.llm) == "6"  # LEVEL=1 gets this one wrong


def test_save_keeps_non_ascii_and_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("old", encoding="utf-8")
    pipeline = ToyAdder().load_state({"toy.examples": "Frage: Was ist 1 + 1?\nAntwort: 2 — ✓"}, partial=True)
    pipeline.save(path)
    assert "— ✓" in path.read_text(encoding="utf-8")
    assert ToyAdder().load(path).examples.value.endswith("— ✓")


def test_bad_state_files_name_the_file_and_change_nothing(tmp_path: Path) -> None:
    pipeline = ToyAdder()
    before = pipeline.state()
    cases = {
        "missing.json": None,
        "garbage.json": "{not json",
        "format.json": json.dumps({"format": "something/2", "parameters": before}),
        "shape.json": json.dumps({"format": state.FORMAT, "parameters": ["a"]}),
        "names.json": json.dumps({"format": state.FORMAT, "parameters": {**before, "toy.extra": "x"}}),
    }
    expected = {"missing.json": "cannot read", "garbage.json": "not JSON", "format.json": "'something/2'",
                "shape.json": "'parameters'", "names.json": "toy.extra"}
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as caught:
            pipeline.load(path)
        assert str(path) in str(caught.value) and expected[name] in str(caught.value), name
    assert pipeline.state() == before


def test_calling_with_a_model_spec_builds_its_provider() -> None:
    # The fake provider built from a spec answers "ok" to everything; the parser keeps it as is.
    assert ToyAdder()(NEW_INPUT, "fake:any") == "ok"
    with pytest.raises(ConfigError, match="unknown provider"):
        ToyAdder()(NEW_INPUT, "nope:model")


def test_a_provider_fault_raises_instead_of_answering(make_llm) -> None:
    failing = make_llm([])  # an empty script: every call fails
    with pytest.raises(LLMError, match="script exhausted"):
        ToyAdder()(NEW_INPUT, failing.llm)
    assert len(failing.provider.requests) == 3  # retried (FAST_RETRY), then raised


def test_load_run_best_last_and_a_step_number(trained) -> None:
    assert trained.record.status == "completed"
    steps = {s.step: s.val_score for s in trained.store.steps(trained.run_id)}
    assert steps[1] > steps[0] and steps[2] == steps[1]  # a tie: best is the earliest

    assert state.resolve_step(trained.store, trained.run_id, "best") == 1
    assert state.resolve_step(trained.store, trained.run_id, "last") == 2
    best = ToyAdder().load_run(trained.store, trained.run_id)
    assert best.instruction.value == BETTER
    assert list(best.state()) == NAMES
    assert ToyAdder().load_run(trained.store, trained.run_id, "last").instruction.value == BETTER
    assert ToyAdder().load_run(trained.store, trained.run_id, 0).instruction.value == INSTRUCTION
    assert state.run_state(trained.store, trained.run_id, 1) == (1, best.state())


def test_load_run_refuses_an_unknown_run_or_step_or_other_names(trained) -> None:
    pipeline = ToyAdder()
    before = pipeline.state()
    with pytest.raises(ConfigError) as caught:
        pipeline.load_run(trained.store, "no-such-run")
    assert "'no-such-run'" in str(caught.value) and trained.run_id in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        pipeline.load_run(trained.store, trained.run_id, 7)
    assert "no completed step 7" in str(caught.value) and "[0, 1, 2]" in str(caught.value)
    for step in ("first", True, "1"):
        with pytest.raises(ConfigError, match="'best', 'last' or a step number"):
            pipeline.load_run(trained.store, trained.run_id, step)

    other = ToyAdder()
    other.extra = Parameter("toy.extra", "x", role="Not in the run.")
    with pytest.raises(ConfigError) as caught:
        other.load_run(trained.store, trained.run_id)
    assert f"run '{trained.run_id}' step 1" in str(caught.value) and "toy.extra" in str(caught.value)
    assert other.instruction.value == INSTRUCTION and pipeline.state() == before


def test_prompts_command_prints_a_loadable_state_file(trained, tmp_path: Path, capsys) -> None:
    store = trained.store.spec
    assert cli.main(["--store", store, "prompts", trained.run_id]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"format": state.FORMAT, "parameters": trained.values(1)}
    path = tmp_path / "best.json"
    path.write_text(out, encoding="utf-8")
    assert ToyAdder().load(path).instruction.value == BETTER

    assert cli.main(["--store", store, "prompts", trained.run_id, "--step", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"]["toy.instruction"] == INSTRUCTION
    assert cli.main(["--store", store, "prompts", trained.run_id, "--last"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == trained.values(2)
    with pytest.raises(SystemExit):  # one choice of step only
        cli.main(["--store", store, "prompts", trained.run_id, "--best", "--step", "1"])
    capsys.readouterr()


def test_prompts_command_as_markdown(trained, capsys) -> None:
    assert cli.main(["--store", trained.store.spec, "prompts", trained.run_id, "--format", "md"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# {trained.run_id}, step 1\n")
    for name in NAMES:
        assert f"\n## {name}\n" in out
    assert f"```\n{BETTER}\n```\n" in out


def test_markdown_fences_outgrow_backticks_in_values() -> None:
    text = state.to_markdown({"a.b": "Reply in a block:\n```json\n{}\n```", "c.d": "plain"})
    assert "## a.b\n\n````\nReply in a block:\n```json\n{}\n```\n````\n" in text
    assert "## c.d\n\n```\nplain\n```\n" in text


def test_prompts_command_bad_run_or_step_is_one_clear_error(trained, capsys) -> None:
    store = trained.store.spec
    assert cli.main(["--store", store, "prompts", "missing-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no run 'missing-run'") and trained.run_id in err and "Traceback" not in err
    assert cli.main(["--store", store, "prompts", trained.run_id, "--step", "9"]) == 2
    assert "no completed step 9; completed steps: [0, 1, 2]" in capsys.readouterr().err
