"""The run store: migrations, WAL, no secrets, decisions only on pending proposals."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from autodiff.errors import StoreError
from autodiff.records import Proposal
from autodiff.store import MIGRATIONS, Store


def _proposal(pid: str, fate: str) -> Proposal:
    return Proposal(id=pid, step=1, parameter="p", value="v", method="rephrase", reasoning="r", fate=fate,
                    created_at=time.time())


def test_migrations_are_idempotent_and_data_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite"
    first = Store(path)
    first.create_run("r1", "toy", {"steps": 1}, {"val": ["a", "b"]})
    second = Store(path)  # migrates again: nothing applied twice, nothing lost
    Store(path)
    with sqlite3.connect(path) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM migrations ORDER BY name")]
    assert names == [name for name, _ in MIGRATIONS]
    assert [r["id"] for r in second.runs()] == ["r1"] and second.sample_ids("r1", "val") == ["a", "b"]
    for store in (first, second):
        store.close()


def test_store_uses_wal_and_short_connections(store: Store) -> None:
    with store.connect() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with sqlite3.connect(store.path) as raw:  # the mode is persistent in the file itself
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_stored_config_never_holds_an_api_key(run_toy, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-live-DO-NOT-STORE-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.setenv("ANTHROPIC_API_KEY", secret + "-ant")
    run = run_toy()
    assert run.record["status"] == "completed"
    assert "key" not in " ".join(run.record["config"]).lower()
    store.close()  # checkpoint, so every row is in the main file too
    files = [p for p in store.path.parent.iterdir() if p.is_file()]
    assert files and all(secret.encode() not in p.read_bytes() for p in files)


def test_decide_only_on_a_pending_proposal(store: Store) -> None:
    store.create_run("r", "toy", {}, {})
    store.add_proposal("r", _proposal("pending", "pending"))
    store.add_proposal("r", _proposal("done", "accepted"))
    with pytest.raises(StoreError, match="accepted, not pending"):
        store.decide("done", "accept")
    with pytest.raises(StoreError, match="no proposal"):
        store.decide("missing", "accept")
    with pytest.raises(StoreError, match="unknown decision"):
        store.decide("pending", "maybe")
    with pytest.raises(StoreError, match="non-empty value"):
        store.decide("pending", "edit", value="  ")
    assert store.decision("pending") is None
    store.decide("pending", "edit", value="new text")
    assert store.decision("pending") == ("edit", "new text", "human")
    store.decide("pending", "reject")  # the first decision stands
    assert store.decision("pending") == ("edit", "new text", "human")


def test_unknown_run_and_empty_feedback_are_store_errors(store: Store) -> None:
    with pytest.raises(StoreError, match="no run with id 'nope'"):
        store.run("nope")
    store.create_run("r", "toy", {}, {})
    with pytest.raises(StoreError, match="empty"):
        store.add_human_feedback("r", "   ", node="n", target="p")
    with pytest.raises(StoreError, match="cannot update"):
        store.update_proposal("x", decision="accept")


def test_discard_after_drops_partial_steps_only(store: Store) -> None:
    store.create_run("r", "toy", {}, {})
    for step in (0, 1, 2):
        store.start_step("r", step, [])
        store.add_parameter_version("r", "p", step, f"v{step}", None)
    store.finish_step("r", 0, 0.5, None, [])
    store.finish_step("r", 1, 0.6, None, [])
    assert store.last_completed_step("r") == 1
    store.discard_after("r", 1)
    assert [s["step"] for s in store.steps("r")] == [0, 1]
    assert store.parameter_values_at("r", 5) == {"p": "v1"}
