"""Several runs side by side: their final prompts and the test samples whose outcome differs."""

from __future__ import annotations

from typing import Sequence

from autodiff.records import Evaluation, Run
from autodiff.store import Store


def default_runs(runs: Sequence[Run], run_id: str) -> list[str]:
    """What to compare `run_id` with when nobody has chosen yet: it and the newest other run of the
    same task (`runs` as `Store.runs` lists them, newest first); only it when no other run has that
    task, since runs of different tasks share no samples."""
    task = next(r.task for r in runs if r.id == run_id)
    same = [r.id for r in runs if r.task == task and r.id != run_id]
    return [run_id, *same[:1]]


def shared_test_samples(store: Store, run_ids: Sequence[str]) -> list[str]:
    """The test samples every run's test split holds, in the first run's order."""
    first, *rest = [store.sample_ids(r, "test") for r in run_ids]
    others = [set(ids) for ids in rest]
    return [sid for sid in first if all(sid in ids for ids in others)]


def final_test(store: Store, run_id: str) -> tuple[int | None, dict[str, Evaluation]]:
    """The latest step with test evaluations of the run's current values, and those evaluations by
    sample id."""
    evals = store.evaluations(run_id, split="test", subject="current")
    if not evals:
        return None, {}
    last = max(e.step for e in evals)
    return last, {e.sample_id: e for e in evals if e.step == last}


def differing_samples(store: Store, run_ids: Sequence[str]) -> list[dict]:
    """Test samples scored in every run whose score is not the same in all of them, with each run's
    prediction and score (columns named after the run), in the first run's sample order. A sample
    that errored in any run (score None) is not compared: a provider fault is not an outcome."""
    finals = [final_test(store, r)[1] for r in run_ids]
    rows = []
    for sid, first in finals[0].items():
        if not all(sid in f for f in finals[1:]):
            continue
        scores = [f[sid].score for f in finals]
        if None in scores or min(scores) == max(scores):
            continue
        row = {"sample": sid, "gold": first.gold}
        for run_id, f in zip(run_ids, finals):
            row[f"{run_id} prediction"] = f[sid].prediction
            row[f"{run_id} score"] = f[sid].score
        rows.append(row)
    return rows


def final_values(store: Store, run_id: str) -> dict[str, str]:
    """Each parameter's latest value (accepted versions only)."""
    return {v.name: v.value for v in store.parameter_versions(run_id)}  # ordered by version


def final_prompts(store: Store, run_ids: Sequence[str]) -> list[tuple[str, list[str | None]]]:
    """Per parameter (in the first run's order, then any the others add), each run's final value or None."""
    finals = [final_values(store, r) for r in run_ids]
    names = list(dict.fromkeys(p.name for r in run_ids for p in store.parameters(r)))
    return [(name, [f.get(name) for f in finals]) for name in names]
