"""Per-step figures derived from stored records (calls, proposals, steps), never kept as counters."""

from __future__ import annotations

from autodiff.store import Store

PHASES = ("forward", "backward", "propose", "validate", "test")
FATES = ("proposed", "passed_minibatch", "passed_validation", "accepted", "rejected_by_person")


def phase_figures(store: Store, run_id: str) -> list[dict]:
    """One row per (step, phase): calls, cached calls, errors, tokens, summed latency and wall span."""
    return store.call_totals(run_id)


def proposal_figures(store: Store, run_id: str) -> list[dict]:
    """Per step, proposals by how far they got. Stages are cumulative: an accepted proposal also
    counts as proposed and (unless a person edited it in) as having passed both checks. A proposal
    passed a check when its score beat the baseline it was compared with; "rejected by a person"
    counts decisions written by `Store.decide` (the trainer writes none)."""
    return store.proposal_totals(run_id)


def step_figures(store: Store, run_id: str) -> list[dict]:
    """One row per step: scores, tokens and time by phase, proposals by stage, backward savings."""
    phases = phase_figures(store, run_id)
    proposals = {r["step"]: r for r in proposal_figures(store, run_id)}
    rows = []
    cumulative_tokens = 0
    for s in store.steps(run_id):
        step = s["step"]
        row = {"step": step, "status": s["status"], "val_score": s["val_score"], "test_score": s["test_score"],
               "batch": len(s["batch"]), "failed": len(s["failed_samples"])}
        mine = [p for p in phases if p["step"] == step]
        for phase in PHASES:
            match = [p for p in mine if p["phase"] == phase]
            row[f"tokens_{phase}"] = sum(p["tokens"] for p in match)
            row[f"calls_{phase}"] = sum(p["calls"] for p in match)
            row[f"wall_s_{phase}"] = sum(p["wall_s"] for p in match)
        row["tokens"] = sum(row[f"tokens_{p}"] for p in PHASES)
        cumulative_tokens += row["tokens"]
        row["tokens_cumulative"] = cumulative_tokens
        row["wall_s"] = (s["finished_at"] - s["started_at"]) if s["finished_at"] else None
        per_failed = row["calls_backward"] / row["failed"] if row["failed"] else None
        row["backward_calls_saved"] = (
            round(per_failed * (row["batch"] - row["failed"])) if per_failed is not None else None
        )
        for fate in FATES:
            row[fate] = proposals.get(step, {}).get(fate, 0)
        rows.append(row)
    return rows


def run_summary(store: Store, run_id: str) -> dict:
    run = store.run(run_id)
    steps = store.steps(run_id)
    calls = store.call_totals(run_id)
    done = [s for s in steps if s["status"] == "completed"]
    vals = [s["val_score"] for s in done if s["val_score"] is not None]
    tests = [s for s in done if s["test_score"] is not None]
    cfg = run["config"]
    return {
        "id": run_id, "task": run["task"], "status": run["status"], "error": run["error"],
        "forward_model": cfg.get("forward_model"), "backward_model": cfg.get("backward_model"),
        "optimizer_model": cfg.get("optimizer_model"),
        "steps_done": max((s["step"] for s in done), default=0), "steps_planned": cfg.get("steps"),
        "initial_val": done[0]["val_score"] if done else None,
        "best_val": max(vals) if vals else None,
        "initial_test": tests[0]["test_score"] if tests else None,
        "final_test": tests[-1]["test_score"] if tests else None,
        "tokens": sum(c["tokens"] for c in calls),
        "calls": sum(c["calls"] for c in calls),
        "wall_s": (run["updated_at"] - run["created_at"]),
        "created_at": run["created_at"], "review": cfg.get("review"),
        "pending": len(store.proposals(run_id, fate="pending")),
    }
