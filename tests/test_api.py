"""Training from Python (`autodiff.train`, `autodiff.resume`), the scripted model for users'
own tests, which model each role takes, resume checks of the task, and task files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import autodiff
from autodiff import cli
from autodiff.errors import ConfigError
from autodiff.parameter import Parameter
from autodiff.store import Store
from conftest import INSTRUCTION, toy_forward, toy_task

BETTER = "Add the two numbers in the question, digit by digit. LEVEL=3"  # val 0.5 -> 1.0
ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(steps=1, batch_size=8, max_failed=4, proposals=1, concurrency=4)


def scripted(*proposals: str) -> autodiff.ScriptedModel:
    return autodiff.ScriptedModel(forward=toy_forward,
                                  optimizer=[autodiff.ScriptedModel.proposal(p) for p in proposals] or None)


def test_train_from_python_returns_scores_and_best_values(tmp_path: Path) -> None:
    events: list[str] = []
    result = autodiff.train(toy_task(), model=scripted(BETTER), store=tmp_path / "runs.sqlite",
                            cache=tmp_path / "cache.sqlite", progress=lambda event, info: events.append(event),
                            **SMALL)
    assert result.status == "completed" and result.error is None
    assert [(s.step, s.val_score) for s in result.scores] == [(0, 0.5), (1, 1.0)]
    assert result.best_step == 1 and result.best_val == 1.0
    assert result.best_values["toy.instruction"] == BETTER
    assert set(result.models.values()) == {"fake:object-1"}  # one object for every role
    assert "initial" in events and "step_done" in events and events[-1] == "completed"
    # Stored like any other run: the CLI lists it.
    store = Store(tmp_path / "runs.sqlite")
    assert [r.id for r in store.runs()] == [result.run_id]
    assert store.run(result.run_id).config["task_in_memory"] is True


def test_scripted_model_answers_by_role(tmp_path: Path) -> None:
    model = autodiff.ScriptedModel(forward=lambda prompt: "Answer: 3", backward=["<feedback>one</feedback>",
                                   "<feedback>two</feedback>"])
    result = autodiff.train(toy_task(), model=model, store=tmp_path / "r.sqlite", cache=tmp_path / "c.sqlite",
                            progress=False, **SMALL)
    roles = [r.role for _, r in model.requests]
    assert {"forward", "backward", "optimizer"} <= set(roles)
    grads = Store(tmp_path / "r.sqlite").gradients(result.run_id)
    assert {g.text for g in grads if g.origin != "human"} <= {"one", "two"}
    # the default optimizer proposes nothing new, so nothing changes
    assert result.best_values["toy.instruction"] == INSTRUCTION


def test_roles_not_given_take_the_forward_model(tmp_path: Path) -> None:
    assert autodiff.api.resolve_models(forward="openai:a") == {
        "forward": "openai:a", "backward": "openai:a", "optimizer": "openai:a"}
    assert autodiff.api.resolve_models(model="openai:m", backward="openai:b") == {
        "forward": "openai:m", "backward": "openai:b", "optimizer": "openai:m"}
    parsed = cli.parser().parse_args(["train", "trec", "--forward-model", "fake:only"])
    assert parsed.backward_model is None  # resolved in cmd_train: see below
    from autodiff.config import make_config
    config = make_config(task="trec", forward_model="fake:only")
    assert (config.backward_model, config.optimizer_model) == ("fake:only", "fake:only")


def test_resume_an_in_memory_task_from_python(tmp_path: Path) -> None:
    store = Store(tmp_path / "runs.sqlite")
    task = toy_task()

    def stop_after_step_1(event: str, info: dict) -> None:
        if event == "step_done" and info["step"] == 1:
            store.request_stop(run_id_of(store))

    first = autodiff.train(task, model=scripted(), store=store, cache=tmp_path / "c.sqlite",
                           progress=stop_after_step_1, **{**SMALL, "steps": 3})
    assert first.status == "stopped" and [s.step for s in first.scores] == [0, 1]
    # From the CLI the in-memory task cannot be found: one clear error.
    code = cli.main(["--store", str(tmp_path / "runs.sqlite"), "--quiet", "resume", first.run_id])
    assert code == 2 and "autodiff.resume(run_id, task)" in store.run(first.run_id).error
    done = autodiff.resume(first.run_id, task, store=store, model=scripted(), cache=tmp_path / "c.sqlite",
                           progress=False)
    assert done.status == "completed" and [s.step for s in done.scores] == [0, 1, 2, 3]


def run_id_of(store: Store) -> str:
    return store.runs()[0].id


def test_train_and_resume_close_a_store_they_opened(tmp_path: Path, monkeypatch) -> None:
    """Given a store's path (or URL), train and resume open it and close it before they return or
    raise (a PostgreSQL store's pool is not left to the garbage collector); a Store given is the
    caller's, left open."""
    closed: list[str] = []
    close = Store.close
    monkeypatch.setattr(Store, "close", lambda self: (closed.append(self.spec), close(self)))
    path = tmp_path / "runs.sqlite"
    result = autodiff.train(toy_task(), model=scripted(), store=path, cache=tmp_path / "c.sqlite", progress=False,
                            **SMALL)
    assert result.status == "completed" and closed == [str(path)]
    with pytest.raises(ConfigError, match="already completed"):
        autodiff.resume(result.run_id, toy_task(), model=scripted(), store=str(path), cache=tmp_path / "c.sqlite",
                        progress=False)
    assert closed == [str(path)] * 2
    mine = Store(path)
    autodiff.train(toy_task(), model=scripted(), store=mine, cache=tmp_path / "c.sqlite", progress=False, **SMALL)
    assert closed == [str(path)] * 2 and len(mine.runs()) == 2  # not closed: still the caller's to use


def test_resume_refuses_a_changed_task_unless_accepted(tmp_path: Path) -> None:
    store = Store(tmp_path / "runs.sqlite")

    def stop_at_once(event: str, info: dict) -> None:
        if event == "initial":
            store.request_stop(run_id_of(store))

    first = autodiff.train(toy_task(), model=scripted(), store=store, cache=tmp_path / "c.sqlite",
                           progress=stop_at_once, **SMALL)
    assert first.status == "stopped"
    changed = toy_task()
    changed.pipeline.hint = Parameter("toy.hint", "Think.", role="A hint.")
    with pytest.raises(ConfigError, match=r"new parameters \['toy.hint'\]"):
        autodiff.resume(first.run_id, changed, store=store, model=scripted(), progress=False)
    other = toy_task()
    other.splits["val"] = other.splits["val"][:5]
    with pytest.raises(ConfigError, match="val samples differ"):
        autodiff.resume(first.run_id, other, store=store, model=scripted(), progress=False)
    done = autodiff.resume(first.run_id, changed, store=store, model=scripted(), cache=tmp_path / "c.sqlite",
                           accept_task_changes=True, progress=False)
    assert done.status == "completed"
    [event] = [e for e in store.run_events(first.run_id) if e.kind != "estimate"]
    assert event.kind == "task_changes_accepted" and "toy.hint" in event.text


TASK_FILE = '''
from helper_module import make


def load(level="1"):
    return make(int(level))
'''

HELPER_MODULE = '''
import sys
sys.path.insert(0, {tests!r})
from conftest import toy_task, INSTRUCTION


def make(level):
    task = toy_task()
    task.pipeline.instruction.value = INSTRUCTION.replace("LEVEL=1", f"LEVEL={{level}}")
    task.pipeline.instruction.history.clear()
    task.pipeline.instruction.__post_init__()
    return task
'''


def test_task_file_imports_its_neighbours_takes_arguments_and_resumes_from_elsewhere(tmp_path: Path) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "mytask.py").write_text(TASK_FILE)
    (folder / "helper_module.py").write_text(HELPER_MODULE.format(tests=str(ROOT / "tests")))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    store = tmp_path / "runs.sqlite"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "ANTHROPIC"))}
    base = [sys.executable, "-m", "autodiff.cli", "--store", str(store), "--cache", str(tmp_path / "c.sqlite"),
            "--quiet"]
    run = subprocess.run([*base, "train", "mytask.py:load", "--task-arg", "level=2", "--model", "fake:x",
                          "--steps", "1", "--run-id", "filetask"], cwd=folder, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    stored = Store(store).run("filetask")
    assert stored.task == f"{folder / 'mytask.py'}:load" and stored.config["task_args"] == {"level": "2"}
    versions = Store(store).parameter_versions("filetask", "toy.instruction")
    assert "LEVEL=2" in versions[0].value
    Store(store).set_run_status("filetask", "stopped")
    with Store(store).connect() as conn:  # as if stopped before its last step
        conn.execute("UPDATE steps SET status = 'running' WHERE run_id = 'filetask' AND step = 1")
    again = subprocess.run([*base, "resume", "filetask"], cwd=elsewhere, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr
    assert Store(store).run("filetask").status == "completed"


def test_public_api_lists_what_a_user_needs() -> None:
    for name in ("train", "resume", "TrainResult", "ScriptedModel", "Pipeline", "Task", "LLMNode", "Parameter",
                 "function_node", "Loss", "Store"):
        assert name in autodiff.__all__ and getattr(autodiff, name).__doc__
    assert json.dumps(autodiff.__all__)  # plain names


def test_scripted_models_never_share_cached_replies(tmp_path: Path) -> None:
    scores = []
    for answer in ("Answer: 0", "Answer: 9"):
        model = autodiff.ScriptedModel(forward=lambda prompt, a=answer: a)
        result = autodiff.train(toy_task(), model=model, store=tmp_path / "r.sqlite", cache=tmp_path / "c.sqlite",
                                progress=False, **SMALL)
        scores.append(result.scores[0].val_score)
        assert model.requests  # asked itself, not served another script's replies from the cache
    assert scores == [0.0, 0.0]


def test_resume_needs_the_model_object_again(tmp_path: Path) -> None:
    store = Store(tmp_path / "r.sqlite")

    def stop_at_once(event: str, info: dict) -> None:
        if event == "initial":
            store.request_stop(info["run_id"])  # every progress event names its run

    first = autodiff.train(toy_task(), forward=scripted(), backward="fake:plain", store=store,
                           cache=tmp_path / "c.sqlite", progress=stop_at_once, **SMALL)
    assert first.status == "stopped" and "stopped on request after step 0" in first.error
    assert first.models == {"forward": "fake:object-1", "backward": "fake:plain", "optimizer": "fake:object-1"}
    with pytest.raises(ConfigError, match="give it again"):
        autodiff.resume(first.run_id, toy_task(), store=store, progress=False)


def test_a_scripted_model_runs_a_pipeline_on_a_new_input() -> None:
    task = toy_task()
    model = autodiff.ScriptedModel(forward=toy_forward)
    assert task.pipeline({"question": "What is 2 + 3? [difficulty 1] [split new]"}, llm=model) == "5"


def test_tasks_without_the_three_splits_are_refused(tmp_path: Path) -> None:
    from autodiff.errors import DataError

    for change, words in ((lambda sp: sp.pop("val"), "no 'val' split"), (lambda sp: sp.update(val=[]), "empty"),
                          (lambda sp: sp.update(dev=sp["val"]), r"unknown splits \['dev'\]")):
        task = toy_task()
        change(task.splits)
        with pytest.raises(DataError, match=words):
            autodiff.train(task, model=scripted(), store=tmp_path / "r.sqlite", progress=False, **SMALL)


def test_a_parameter_missing_from_its_template_is_refused() -> None:
    from autodiff import LLMNode

    a, b = Parameter("n.instruction", "Do it.", role="r"), Parameter("n.format", "Say X.", role="r")
    with pytest.raises(ConfigError, match=r"no placeholder for parameters \['n.format'\]"):
        LLMNode("n", [a, b], template="{{instruction}} {{question}}")


def test_a_factory_that_raises_is_one_clear_error(tmp_path: Path) -> None:
    from autodiff.tasks import load_task

    path = tmp_path / "t.py"
    path.write_text("def make(n='1'):\n    return int(n)\n")
    with pytest.raises(ConfigError, match=r"raised ValueError: invalid literal .* arrive as strings"):
        load_task(f"{path}:make", {"n": "abc"})


def test_accepted_task_changes_are_adopted(tmp_path: Path) -> None:
    store = Store(tmp_path / "r.sqlite")

    def stop_at_once(event: str, info: dict) -> None:
        if event == "initial":
            store.request_stop(info["run_id"])

    model = scripted(BETTER)
    first = autodiff.train(toy_task(), model=model, store=store, cache=tmp_path / "c.sqlite",
                           progress=stop_at_once, **SMALL)
    changed = toy_task()
    changed.pipeline.hint = Parameter("toy.hint", "Think.", role="A hint.")
    changed.splits["val"] = changed.splits["val"][:6]  # difficulties 1,1,1,1,1,2: 5 of 6 right at LEVEL=1
    done = autodiff.resume(first.run_id, changed, store=store, model=model, cache=tmp_path / "c.sqlite",
                           accept_task_changes=True, progress=False)
    assert done.status == "completed"
    assert "toy.hint" in {p.name for p in store.parameters(first.run_id)}
    assert done.best_values["toy.hint"] == "Think."
    assert store.sample_ids(first.run_id, "val") == [s["id"] for s in changed.splits["val"]]
    p = store.proposals(first.run_id, step=1)[0]
    assert p.val_baseline == pytest.approx(5 / 6)  # judged against the new split, scored afresh


def test_resume_from_python_changes_how_calls_are_retried_and_judged_and_nothing_else(tmp_path: Path,
                                                                                     capsys) -> None:
    from autodiff.errors import ConfigError

    store = Store(tmp_path / "runs.sqlite")
    task = toy_task()

    def stop_after_step_1(event: str, info: dict) -> None:
        if event == "step_done" and info["step"] == 1:
            store.request_stop(run_id_of(store))

    first = autodiff.train(task, model=scripted(), store=store, cache=tmp_path / "c.sqlite", progress=stop_after_step_1,
                           **{**SMALL, "steps": 2, "retry_budget": 20})
    with pytest.raises(ConfigError, match="cannot change steps"):
        autodiff.resume(first.run_id, task, store=store, model=scripted(), progress=False, steps=5)
    with pytest.raises(ConfigError, match="max_error_share"):
        autodiff.resume(first.run_id, task, store=store, model=scripted(), progress=False, max_error_share=2)
    capsys.readouterr()
    done = autodiff.resume(first.run_id, task, store=store, model=scripted(), cache=tmp_path / "c.sqlite",
                           progress=False, retry_budget=150, max_error_share=0.3)
    assert done.status == "completed"
    assert "retry_budget 20.0 -> 150.0; max_error_share 0.1 -> 0.3" in capsys.readouterr().err
    config = store.run(first.run_id).config
    assert (config["retry_budget"], config["max_error_share"], config["steps"]) == (150.0, 0.3, 2)
