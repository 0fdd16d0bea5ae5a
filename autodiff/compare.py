"""Several runs side by side: their final prompts and the test samples whose outcome differs."""

from __future__ import annotations

from typing import Sequence

from autodiff.store import Store


def final_test(store: Store, run_id: str) -> tuple[int | None, dict[str, dict]]:
    """The latest step with test evaluations of the run's current values, and those rows by sample id."""
    rows = store.evaluations(run_id, split="test", subject="current")
    if not rows:
        return None, {}
    last = max(r["step"] for r in rows)
    return last, {r["sample_id"]: r for r in rows if r["step"] == last}


def differing_samples(store: Store, run_ids: Sequence[str]) -> list[dict]:
    """Test samples scored in every run whose score is not the same in all of them, with each run's
    prediction and score (columns named after the run), in the first run's sample order. A sample
    that errored in any run (score None) is not compared: a provider fault is not an outcome."""
    finals = [final_test(store, r)[1] for r in run_ids]
    rows = []
    for sid, first in finals[0].items():
        if not all(sid in f for f in finals[1:]):
            continue
        scores = [f[sid]["score"] for f in finals]
        if None in scores or min(scores) == max(scores):
            continue
        row = {"sample": sid, "gold": first["gold"]}
        for run_id, f in zip(run_ids, finals):
            row[f"{run_id} prediction"] = f[sid]["prediction"]
            row[f"{run_id} score"] = f[sid]["score"]
        rows.append(row)
    return rows


def final_values(store: Store, run_id: str) -> dict[str, str]:
    """Each parameter's latest value (accepted versions only)."""
    return {v["name"]: v["value"] for v in store.parameter_versions(run_id)}  # ordered by version


def final_prompts(store: Store, run_ids: Sequence[str]) -> list[tuple[str, list[str | None]]]:
    """Per parameter (in the first run's order, then any the others add), each run's final value or None."""
    finals = [final_values(store, r) for r in run_ids]
    names = list(dict.fromkeys(p["name"] for r in run_ids for p in store.parameters(r)))
    return [(name, [f.get(name) for f in finals]) for name in names]
