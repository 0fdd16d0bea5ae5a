"""End to end on the real embedded model: two training steps of object counting, every role local.

A 135M model writes weak gradients and often malformed proposals; the point here is that a real
run completes and records everything, whatever the model says."""

from __future__ import annotations

import pytest

from autodiff.config import make_config
from autodiff.export import export_run
from autodiff.runner import train
from autodiff.store import Store

pytestmark = pytest.mark.local_model
pytest.importorskip("llama_cpp")


def test_two_steps_on_the_local_model(tmp_path):
    store = Store(tmp_path / "runs.sqlite")
    run_id = train(
        store, make_config(task="object_counting", forward_model="local:smollm2", backward_model="local:smollm2", optimizer_model="local:smollm2", steps=2, batch_size=2, max_failed=1, proposals=1, positives=1, val_limit=4, test_limit=4, concurrency=2, max_tokens=128),
        cache_path=tmp_path / "cache.sqlite",
    )
    run = store.run(run_id)
    assert run.status == "completed", run.error
    steps = store.steps(run_id)
    assert [s.step for s in steps] == [0, 1, 2]
    assert all(s.status == "completed" for s in steps)
    calls = store.call_summaries(run_id)
    assert calls and all(c.model == "local:smollm2" for c in calls)
    assert {c.phase for c in calls} >= {"forward", "validate", "test"}
    assert all(c.prompt_tokens > 0 for c in calls if not c.error)
    # Whatever the small model replied, every failed sample went backward and left a record.
    failed = sum(len(s.failed_samples) for s in steps)
    if failed:
        assert any(c.phase == "backward" for c in calls)
        assert store.gradients(run_id)
    exported = export_run(store, run_id)
    assert exported["run"]["config"]["forward_model"] == "local:smollm2"
    assert len(exported["steps"]) == 3
