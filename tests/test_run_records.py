"""A run's own records (Run, Step, ParameterSpec, ParameterVersion, RunEvent) go into the store and
come back equal on both backends, and the export keeps the keys and order the README documents."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from autodiff import cli
from autodiff.records import ParameterSpec, ParameterVersion, Run, RunEvent, Step
from autodiff.store import Store
from tests.fake_runs import fake_run

SPECS = (
    ParameterSpec("solver.instruction", "solver", "instruction", "What to compute.", trainable=True,
                  peers=("solver.examples",), position=0),
    ParameterSpec("solver.examples", "solver", "examples", "Worked examples.", trainable=False,
                  peers=("solver.instruction",), position=1),
    ParameterSpec("glue", None, "other", "Text no node owns.", trainable=True, peers=(), position=2),
)


def test_a_run_and_its_steps_come_back_as_records(store: Store) -> None:
    config = {"steps": 2, "tau": 0.5, "task_args": {"level": "2"}}
    store.create_run("r", "toy", config, {"train": ["a", "b"], "val": [], "test": []})
    [run] = store.runs()
    assert run == store.run("r")
    assert (run.id, run.task, run.config, run.status, run.error, run.pid) == ("r", "toy", config, "created", None, None)
    assert run.stop_requested is False and run.created_at == run.updated_at > 0
    store.set_run_status("r", "running", pid=4321)
    store.request_stop("r")
    run = store.run("r")
    assert (run.status, run.pid, run.stop_requested) == ("running", 4321, True)
    assert run.updated_at >= run.created_at

    store.start_step("r", 0, [])
    store.finish_step("r", 0, 0.25, 0.5, [])
    store.start_step("r", 1, ["a", "b"])
    store.finish_step("r", 1, 0.75, None, ["b"])
    store.start_step("r", 2, ["b"])
    steps = store.steps("r")
    assert all(isinstance(s, Step) for s in steps)
    assert [(s.step, s.status, s.val_score, s.test_score, s.batch, s.failed_samples) for s in steps] == [
        (0, "completed", 0.25, 0.5, (), ()), (1, "completed", 0.75, None, ("a", "b"), ("b",)),
        (2, "running", None, None, ("b",), ())]
    assert steps[1].finished_at >= steps[1].started_at and steps[2].finished_at is None


def test_parameters_versions_and_events_come_back_as_they_went_in(store: Store) -> None:
    store.create_run("r", "toy", {}, {})
    store.add_parameters("r", SPECS)
    assert store.parameters("r") == list(SPECS)
    # Registered again (a task change adopted on resume): replaced, not doubled.
    store.add_parameters("r", [dataclasses.replace(SPECS[1], trainable=True)])
    assert [p.trainable for p in store.parameters("r")] == [True, True, True]
    store.add_parameters("r", [])  # nothing to register is not an error

    assert store.add_parameter_version("r", "solver.instruction", 0, "Add them.", None) == 0
    assert store.add_parameter_version("r", "solver.instruction", 2, "Add both numbers.", "p1") == 1
    assert store.add_parameter_version("r", "glue", 0, "-", None) == 0
    versions = store.parameter_versions("r")
    assert all(isinstance(v, ParameterVersion) for v in versions)
    assert [(v.name, v.version, v.step, v.value, v.proposal_id) for v in versions] == [
        ("glue", 0, 0, "-", None), ("solver.instruction", 0, 0, "Add them.", None),
        ("solver.instruction", 1, 2, "Add both numbers.", "p1")]
    assert [v.version for v in store.parameter_versions("r", "solver.instruction")] == [0, 1]
    assert store.parameter_values_at("r", 1) == {"glue": "-", "solver.instruction": "Add them."}

    store.add_run_event("r", "budget_changed", "budget_tokens 10 -> 20")
    store.add_run_event("r", "requeued", "worker gone")
    events = store.run_events("r")
    assert [(e.kind, e.text) for e in events] == [("budget_changed", "budget_tokens 10 -> 20"),
                                                  ("requeued", "worker gone")]
    assert all(isinstance(e, RunEvent) for e in events) and events[0].at <= events[1].at


def test_records_are_frozen(store: Store) -> None:
    """Updates go through the store: a record read from it cannot be changed in place."""
    store.create_run("r", "toy", {}, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        store.run("r").status = "completed"  # type: ignore[misc]


def test_every_column_of_the_run_tables_is_a_field(store: Store) -> None:
    """The records name the columns their inserts write: a column a migration adds to one of these
    tables must be added to its record too (besides `run_id`, which says whose row it is)."""
    for table, record in (("runs", Run), ("steps", Step), ("parameters", ParameterSpec),
                          ("parameter_versions", ParameterVersion), ("run_events", RunEvent)):
        with store.connect() as conn:
            columns = [c[0] for c in conn.execute(f"SELECT * FROM {table} LIMIT 0").description]
        assert [c for c in columns if c != "run_id"] == [f.name for f in dataclasses.fields(record)], table


@pytest.fixture
def exported(tmp_path: Path, capsys) -> tuple[Store, str, dict]:
    store = Store(tmp_path / "runs.sqlite")
    run_id = fake_run(store, tmp_path / "cache.sqlite", steps=2)
    assert cli.main(["--store", str(store.path), "export", run_id]) == 0
    return store, run_id, json.loads(capsys.readouterr().out)


def test_the_export_keeps_its_keys_and_their_order(exported) -> None:
    """The README's export schema, key for key and in order, for the run, its parameters and steps."""
    store, run_id, doc = exported
    assert list(doc) == ["run", "parameters", "steps", "proposals", "gradients"]
    assert list(doc["run"]) == ["id", "task", "config", "status", "error", "created_at", "errors", "cut_off",
                                "tokens", "tokens_unknown", "cost_usd", "cost_unknown", "cache_saved_usd", "projected_usd", "price_table"]
    assert [list(p) for p in doc["parameters"]] == [
        ["run_id", "name", "node", "kind", "role", "trainable", "peers", "position"]] * len(doc["parameters"])
    assert [list(s) for s in doc["steps"]] == [
        ["step", "status", "parameters", "val_score", "test_score", "tokens_by_phase", "tokens_unknown_by_phase",
         "cost_by_phase",
         "cost_unknown_by_phase", "redone", "tokens", "cost_usd", "savings", "errors_by_phase",
         "error_kinds_by_phase", "cut_off_by_phase",
         "samples_errored", "minibatch", "failed_samples"]] * len(doc["steps"])
    run = store.run(run_id)
    assert (doc["run"]["id"], doc["run"]["task"], doc["run"]["config"], doc["run"]["status"],
            doc["run"]["created_at"]) == (run.id, run.task, run.config, run.status, run.created_at)


def test_the_exported_parameters_and_steps_are_the_stored_rows(exported) -> None:
    """Each exported parameter is its table row (JSON decoded, 0/1 as a boolean); each step's
    status, scores and failed samples are its row's."""
    store, run_id, doc = exported
    with store.connect() as conn:
        rows = conn.execute("SELECT * FROM parameters WHERE run_id = ? ORDER BY position", (run_id,)).fetchall()
        steps = conn.execute("SELECT * FROM steps WHERE run_id = ? ORDER BY step", (run_id,)).fetchall()
    assert rows and doc["parameters"] == [
        dict(r, trainable=bool(r["trainable"]), peers=json.loads(r["peers"])) for r in rows]
    assert [(s["step"], s["status"], s["val_score"], s["test_score"], s["failed_samples"]) for s in doc["steps"]] == \
        [(r["step"], r["status"], r["val_score"], r["test_score"], json.loads(r["failed_samples"])) for r in steps]
