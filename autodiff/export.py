"""A run as one JSON document (schema in the README). Keys never appear: the store has none."""

from __future__ import annotations

import dataclasses

from autodiff.llm.pricing import table_version
from autodiff.metrics import PHASES, SPLITS, error_kinds, projection, step_figures
from autodiff.store import NO_PROPOSAL_COST, Store


def export_run(store: Store, run_id: str) -> dict:
    run = store.run(run_id)
    stored = store.steps(run_id)  # before the figures, so that a step a live run adds meanwhile has them
    figures = {r["step"]: r for r in step_figures(store, run_id)}
    kinds = error_kinds(store, run_id)
    calls = store.call_totals(run_id)
    money = projection(store, run_id, steps=list(figures.values()), totals=calls)
    steps = []
    for s in stored:
        f = figures.get(s.step)
        if f is None:  # not in the figures after all (a resume discarded it meanwhile): left out
            continue
        steps.append({
            # left part-way by a run no longer training: redone whole on resume, not running
            "step": s.step, "status": "unfinished" if s.status == "running" and run.status != "running" else s.status,
            "parameters": store.parameter_values_at(run_id, s.step),
            "val_score": s.val_score, "test_score": s.test_score,
            "tokens_by_phase": {p: f[f"tokens_{p}"] for p in PHASES},
            "tokens_unknown_by_phase": {p: f[f"tokens_unknown_{p}"] for p in PHASES},
            "cost_by_phase": {p: f[f"cost_{p}"] for p in PHASES},
            "cost_unknown_by_phase": {p: f[f"cost_unknown_{p}"] for p in PHASES},
            # the calls of attempts of this step that were stopped part-way and redone on resume
            "redone": {"calls": f["calls_redone"], "tokens": f["tokens_redone"], "cost_usd": f["cost_redone"],
                       "cost_unknown": f["cost_unknown_redone"], "tokens_unknown": f["tokens_unknown_redone"],
                       "errors": f["errors_redone"], "cut_off": f["cut_off_redone"]},
            "tokens": f["tokens"], "cost_usd": f["cost"],  # the step's totals, redone attempts included
            "savings": {"cache_usd": f["cache_saved_usd"], "backward_usd": f["backward_saved_usd"],
                        "backward_calls": f["backward_calls_saved"]},
            "errors_by_phase": {p: f[f"errors_{p}"] for p in PHASES},
            "error_kinds_by_phase": {p: k for (step, p), k in sorted(kinds.items(), key=_phase_order)
                                     if step == s.step},
            "cut_off_by_phase": {p: f[f"cut_off_{p}"] for p in PHASES},
            "samples_errored": {split: f[f"samples_errored_{split}"] for split in SPLITS},
            # the training mini-batch: batch = correct + failing + errored; failing = sent_backward + over_cap
            "minibatch": {"batch": f["batch"], "correct": f["correct"], "failing": f["failed"],
                          "sent_backward": f["sent_backward"], "over_cap": f["over_cap"],
                          "errored": f["errored_batch"]},
            "failed_samples": list(s.failed_samples),
        })
    costs = store.proposal_costs(run_id)
    proposals = [
        {
            "id": p.id, "parameter": p.parameter, "step": p.step, "value": p.value,
            "method": p.method, "reasoning": p.reasoning,
            "scores": {"minibatch": p.minibatch_score, "minibatch_baseline": p.minibatch_baseline,
                       "validation": p.val_score, "validation_baseline": p.val_baseline},
            "fate": p.fate, "reason": p.reason, "decided_by": p.decided_by,
            "edited_value": p.decision_value if p.decision == "edit" else None,
            "held_fate": p.held_fate, "feedback_ids": None if p.feedback_ids is None else list(p.feedback_ids),
            "cost": costs.get(p.id, NO_PROPOSAL_COST),
        }
        for p in store.proposals(run_id)
    ]
    gradients = [
        {
            "id": g.id, "step": g.step, "sample": g.sample_id, "node": g.node,
            "target_type": g.target_type, "target": g.target, "call_index": g.call_index, "score": g.score,
            "text": g.text, "source_node": g.source_node, "path": list(g.path), "origin": g.origin, "error": g.error,
            "llm_call_id": g.llm_call_id,
        }
        for g in store.gradients(run_id)
    ]
    return {
        "run": {"id": run.id, "task": run.task, "config": run.config, "status": run.status,
                "error": run.error, "created_at": run.created_at,
                "errors": sum(c["errors"] for c in calls), "cut_off": sum(c["cut_off"] for c in calls),
                "tokens": sum(c["tokens"] for c in calls), "tokens_unknown": sum(c["tokens_unknown"] for c in calls),
                "cost_usd": money["spent_usd"], "cost_unknown": money["unknown"],
                "cache_saved_usd": sum(c["saved_usd"] for c in calls),
                "projected_usd": money["projected_usd"], "price_table": table_version()},
        # As the table holds them: the run's id first, then every field of the record.
        "parameters": [{"run_id": run_id, **dataclasses.asdict(p), "peers": list(p.peers)}
                       for p in store.parameters(run_id)],
        "steps": steps,
        "proposals": proposals,
        "gradients": gradients,
    }


def _phase_order(item: tuple[tuple[int, str], dict]) -> tuple[int, int, str]:
    """(step, phase) keys in step order, phases in PHASES order (any other phase after them)."""
    (step, phase), _ = item
    return step, PHASES.index(phase) if phase in PHASES else len(PHASES), phase
