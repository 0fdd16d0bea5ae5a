"""Bad input gets one clear error naming the problem, and nothing already stored is lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from autodiff import runner
from autodiff.config import make_config
from autodiff.errors import ConfigError, DataError
from autodiff.llm.registry import make_provider, provider_of
from autodiff.store import Store
from autodiff.tasks import load_task
from autodiff.tasks.data import read_jsonl
from conftest import FAST_RETRY, TOY_DEFAULTS, TOY_TASK


@pytest.fixture
def existing(run_toy, store: Store) -> dict:
    """A store that already holds a finished run, to check bad input leaves it alone."""
    run = run_toy(run_id="kept")
    assert run.record.status == "completed"
    return {"runs": store.runs(), "steps": store.steps("kept"), "calls": len(store.call_summaries("kept"))}


def _assert_untouched(store: Store, existing: dict) -> None:
    assert store.runs() == existing["runs"]
    assert store.steps("kept") == existing["steps"]
    assert len(store.call_summaries("kept")) == existing["calls"]


def _train(store: Store, tmp_path: Path, **options) -> str:
    return runner.train(store, make_config(**{**TOY_DEFAULTS, **options}), cache_path=tmp_path / "cache.sqlite", retry=FAST_RETRY)


def test_unknown_task_is_named(store: Store, tmp_path: Path, existing: dict) -> None:
    with pytest.raises(ConfigError, match="unknown task 'no_such_task'.*object_counting"):
        load_task("no_such_task")
    with pytest.raises(ConfigError, match="no_such_task"):
        _train(store, tmp_path, task="no_such_task")
    with pytest.raises(ConfigError, match="missing.py does not exist"):
        _train(store, tmp_path, task=str(tmp_path / "missing.py") + ":load")
    with pytest.raises(ConfigError, match="has no callable 'nothing_here'"):
        _train(store, tmp_path, task=TOY_TASK.rsplit(":", 1)[0] + ":nothing_here")
    _assert_untouched(store, existing)


def test_a_task_file_that_does_not_import_is_one_error_naming_file_and_line(store: Store, tmp_path: Path,
                                                                          existing: dict) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import os\n\ndef load(:\n    pass\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"task file {broken} failed to import: SyntaxError at {broken}:3:10: "):
        _train(store, tmp_path, task=f"{broken}:load")
    raising = tmp_path / "raising.py"
    raising.write_text("X = {}\nY = X['missing']\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"failed to import: KeyError: 'missing' \(at {raising}:2\)"):
        _train(store, tmp_path, task=f"{raising}:load")
    _assert_untouched(store, existing)


def test_a_run_id_that_is_taken_or_unusable_is_refused_before_anything_is_written(store: Store, tmp_path: Path,
                                                                                existing: dict) -> None:
    """A new run under the id of a stored run would write its steps and calls into that run."""
    with pytest.raises(ConfigError, match="run id kept is taken: this store already holds run kept "
                                          r"\(task .*, completed\)\. To go on with that run: autodiff resume kept"):
        runner.train(store, make_config(**TOY_DEFAULTS), run_id="kept", cache_path=tmp_path / "cache.sqlite",
                     retry=FAST_RETRY)
    with pytest.raises(ConfigError, match="run id kept is taken"):
        runner.create(store, make_config(**TOY_DEFAULTS), run_id="kept", cache_path=tmp_path / "cache.sqlite")
    for bad in ("", "a b/../c", "-x", ".hidden", "x" * 129, "tab\there"):
        with pytest.raises(ConfigError, match="is not usable: give 1-128 letters"):
            runner.train(store, make_config(**TOY_DEFAULTS), run_id=bad, cache_path=tmp_path / "cache.sqlite")
    _assert_untouched(store, existing)


def test_malformed_dataset_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"question": "q1", "answer": "1"}\n\n{"question": "q2", "answer": \n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON"):
        read_jsonl(path, required=("question", "answer"))
    path.write_text('{"question": "q1"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:1: missing field\(s\) \['answer'\]"):
        read_jsonl(path, required=("question", "answer"))
    path.write_text('["q1", "1"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:1: expected a JSON object"):
        read_jsonl(path, required=("question",))
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "absent.jsonl", required=())


@pytest.mark.parametrize("model, variable", [("openai:gpt-4o-mini", "OPENAI_API_KEY"),
                                             ("anthropic:claude-sonnet-4-5", "ANTHROPIC_API_KEY")])
def test_missing_api_key_is_named_before_anything_is_stored(store: Store, tmp_path: Path, existing: dict,
                                                            model: str, variable: str) -> None:
    # conftest removed every key and base URL from the environment.
    for role in ("forward_model", "backward_model", "optimizer_model"):
        with pytest.raises(ConfigError, match=variable):
            _train(store, tmp_path, **{role: model})
    _assert_untouched(store, existing)


@pytest.mark.parametrize("option, value", [("steps", 0), ("tau", 2), ("batch_size", -1), ("concurrency", 0),
                                           ("min_gain", -0.1), ("review", "sometimes"), ("colour", "red")])
def test_out_of_range_option_is_named(store: Store, tmp_path: Path, existing: dict, option: str, value) -> None:
    with pytest.raises(ConfigError, match=rf"invalid run configuration: {option}:"):
        make_config(task="toy", **{option: value})
    with pytest.raises(ConfigError, match=option):
        _train(store, tmp_path, **{option: value})
    _assert_untouched(store, existing)


@pytest.mark.parametrize("spec, message", [("foo:bar", "unknown provider 'foo'"), ("gpt-4o", "provider:model"),
                                           ("openai:", "provider:model")])
def test_unknown_provider_is_refused(store: Store, tmp_path: Path, existing: dict, spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _train(store, tmp_path, forward_model=spec)
    with pytest.raises(ConfigError, match=message):
        provider_of(spec)
    with pytest.raises(ConfigError, match="unknown provider 'foo'"):
        make_provider("foo")
    _assert_untouched(store, existing)


def test_resuming_a_finished_or_unknown_run_is_refused(store: Store, existing: dict) -> None:
    with pytest.raises(ConfigError, match="already completed"):
        runner.resume(store, "kept")
    from autodiff.errors import StoreError

    with pytest.raises(StoreError, match="no run with id 'ghost'"):
        runner.resume(store, "ghost")
    _assert_untouched(store, existing)


@pytest.mark.parametrize(("name", "text", "value"), [
    ("steps", "12", 12), ("steps", " 1e3 ", 1000), ("steps", "12.0", 12), ("tau", "0", 0.0), ("steps", "1_000", 1000),
    ("budget_tokens", "9223372036854775807", 2**63 - 1),
    ("budget_tokens", "9007199254740993.0", 9007199254740993),
    ("tau", "0.5", 0.5), ("budget_usd", "0.00001", 0.00001), ("tau", "", None), ("val_limit", "", None),
])
def test_a_typed_number_is_read_exactly(name: str, text: str, value) -> None:
    from autodiff.config import parse_option

    got = parse_option(name, text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(("name", "text", "said"), [
    ("steps", "2.5", "2.5 is not a whole number"), ("batch_size", "", "empty: enter a whole number, 1 to 256"),
    ("budget_usd", "1e400", "1e400 is too large to be a number"), ("tau", "nan", "nan is not a finite number"),
    ("tau", "1e400", "Input should be less than or equal to 1 (given: 1e400)"),
    ("steps", "-3", "Input should be greater than or equal to 1 (given: -3)"),
    ("tau", "1.00000000000000001", "Input should be less than or equal to 1 (given: 1.00000000000000001)"),
    ("steps", "3.0000000000000001", "3.0000000000000001 is not a whole number"),
    ("budget_usd", "1e-400", "1e-400 is too close to 0: it would be taken as 0"),
    ("budget_usd", "-1e-400", "Input should be greater than 0 (given: -1e-400)"),
    ("steps", "_1", "_1 is not a whole number"), ("steps", "1__0", "1__0 is not a whole number"),
    ("steps", "\uff11", "\uff11 is not a whole number"),
    ("budget_tokens", "99999999999999999999", "99999999999999999999 is too large: at most 9,223,372,036,854,775,807"),
    ("val_limit", "1e5000", "1e5000 is too large: at most 9,223,372,036,854,775,807"),
    ("budget_tokens", "9" * 5000,
     "999999999999…999999 (5,000 characters) is too large: at most 9,223,372,036,854,775,807"),
    ("budget_usd", "-inf", "-inf is not a finite number"), ("val_limit", "ten", "ten is not a whole number"),
    ("budget_usd", "$5", "$5 is not a number"),
])
def test_a_typed_number_that_is_not_one_is_refused_as_typed(name: str, text: str, said: str) -> None:
    from autodiff.config import parse_option

    with pytest.raises(ConfigError) as info:
        parse_option(name, text)
    assert str(info.value) == said


def test_the_cli_names_a_bad_option_by_its_flag(tmp_path: Path, capsys) -> None:
    from autodiff import cli

    code = cli.main(["--store", str(tmp_path / "s.sqlite"), "train", "object_counting", "--model", "fake:x",
                     "--steps", "0", "--budget-tokens", "-5"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == ("error: invalid options: --steps: Input should be greater than or equal to 1 (given: 0); "
                           "--budget-tokens: Input should be greater than 0 (given: -5)")
    assert Store(tmp_path / "s.sqlite").runs() == []
