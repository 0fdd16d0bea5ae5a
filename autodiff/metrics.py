"""Per-step figures derived from stored records (calls, proposals, steps, evaluations), never kept
as counters.

Faults are counted from the call records: a call *errored* when its record has an `error` (it gave
no usable reply after the retries allowed; `error_kind` says what kind of fault), and a reply was
*cut off* when it stopped at the token limit (`finish_reason` "length"). The two are counted
separately and may overlap. A sample *errored* when its stored evaluation has no score (NULL): a
provider fault is never a wrong answer, and the step's validation and test scores leave such
samples out.

Money is summed from the calls' recorded prices (`autodiff.llm.pricing`, one price per call as
it was recorded), in US dollars. A call with no known price is counted apart (`cost_unknown`),
never as 0: `cost_*` figures are what the priced calls cost, and come with how many were not.
Calls answered from our response cache cost 0; what they would have cost is "saved".
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict

from autodiff.store import Store

# "preflight" is the tiny question put to each model before a run spends anything (step 0).
PHASES = ("preflight", "forward", "backward", "propose", "validate", "test")
SPLITS = ("val", "test")
FATES = ("proposed", "passed_minibatch", "passed_validation", "accepted", "rejected_by_person")


def phase_figures(store: Store, run_id: str) -> list[dict]:
    """One row per (step, phase): calls, cached calls, errored calls, cut-off replies, context-window
    failures, tokens, summed latency and wall span (`Store.call_totals`)."""
    return store.call_totals(run_id)


def proposal_figures(store: Store, run_id: str) -> list[dict]:
    """Per step, proposals by how far they got. Stages are cumulative: an accepted proposal also
    counts as proposed and (unless a person edited it in) as having passed both checks. A proposal
    passed a check when its score beat the baseline it was compared with; "rejected by a person"
    counts decisions written by `Store.decide` (the trainer writes none)."""
    return store.proposal_totals(run_id)


def fault_calls(store: Store, run_id: str) -> list[dict]:
    """Every call of the run that errored or was cut off, in the order made, without its prompt or
    reply: `id`, `step` (None before the first step), `phase`, `role`, `node`, `sample_id`,
    `call_index`, `model`, `error_kind` (None on records made before kinds were recorded),
    `finish_reason`, `error` (the message), `created_at`."""
    return store.fault_calls(run_id)


def error_kinds(store: Store, run_id: str) -> dict[tuple[int, str], dict[str, int]]:
    """(step, phase) -> {error kind: calls}, most frequent kind first (then by name), for the
    (step, phase) pairs that had errors. Calls without a step count under step -1, as in
    `Store.call_totals`; an error recorded without a kind counts as "unknown"."""
    counts: dict[tuple[int, str], Counter] = defaultdict(Counter)
    for c in fault_calls(store, run_id):
        if c["error"] is not None:
            step = -1 if c["step"] is None else c["step"]
            counts[(step, c["phase"])][c["error_kind"] or "unknown"] += 1
    return {key: dict(sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))) for key, kinds in counts.items()}


def context_window_failures(store: Store, run_id: str) -> list[dict]:
    """The calls that failed because their prompt did not fit the model's context window (rows of
    `fault_calls`), in the order made."""
    return [c for c in fault_calls(store, run_id) if c["error_kind"] == "context_window"]


def errored_samples(store: Store, run_id: str) -> dict[tuple[int, str], int]:
    """(step, split) -> samples of the run's current values whose evaluation at that step has no
    score (the sample errored), for the pairs that have any."""
    return store.errored_sample_counts(run_id)


def step_figures(store: Store, run_id: str) -> list[dict]:
    """One row per step: scores, tokens, money and time by phase, proposals by stage, backward
    savings, and faults. Per phase p: `tokens_p` (prompt + completion tokens of fresh calls; cached
    calls count 0), `cost_p` (USD of its priced calls), `cost_unknown_p` (its fresh calls with no
    known price), `calls_p` (calls made, cached ones included), `wall_s_p` (seconds from the
    phase's first call's start to its last call's end), `errors_p` (calls that errored),
    `cut_off_p` (replies cut off at the token limit). Totals: `tokens`, `cost` and `cost_unknown`
    (over PHASES), `tokens_cumulative` and `cost_cumulative` (this step and those before it), and
    over every phase recorded `errors`, `cut_off` and `context_window` (calls that failed because
    the prompt did not fit the model's context window). Savings: `cache_saved_usd` (what the
    step's calls answered from our response cache would have cost), `backward_calls_saved` and
    `backward_saved_usd` (the backward calls, and their cost at this step's cost per failed
    sample, that the correct samples of the batch did not need: selective backward).
    `samples_errored_val` and `samples_errored_test`: samples left unscored in the step's
    validation and test evaluations (its `val_score` and `test_score` leave them out);
    `samples_errored` is their sum."""
    phases = phase_figures(store, run_id)
    proposals = {r["step"]: r for r in proposal_figures(store, run_id)}
    unscored = errored_samples(store, run_id)
    rows = []
    cumulative_tokens, cumulative_cost, cumulative_unknown = 0, 0.0, 0
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
            row[f"errors_{phase}"] = sum(p["errors"] for p in match)
            row[f"cut_off_{phase}"] = sum(p["cut_off"] for p in match)
            row[f"cost_{phase}"] = sum(p["cost_usd"] for p in match)
            row[f"cost_unknown_{phase}"] = sum(p["cost_unknown"] for p in match)
        row["tokens"] = sum(row[f"tokens_{p}"] for p in PHASES)
        row["cost"] = sum(row[f"cost_{p}"] for p in PHASES)
        row["cost_unknown"] = sum(row[f"cost_unknown_{p}"] for p in PHASES)
        row["cache_saved_usd"] = sum(p["saved_usd"] for p in mine)
        row["errors"] = sum(p["errors"] for p in mine)  # every phase: a fault is never hidden
        row["cut_off"] = sum(p["cut_off"] for p in mine)
        row["context_window"] = sum(p["context_window"] for p in mine)
        for split in SPLITS:
            row[f"samples_errored_{split}"] = unscored.get((step, split), 0)
        row["samples_errored"] = sum(row[f"samples_errored_{split}"] for split in SPLITS)
        cumulative_tokens += row["tokens"]
        cumulative_cost += row["cost"]
        row["tokens_cumulative"] = cumulative_tokens
        row["cost_cumulative"] = cumulative_cost
        cumulative_unknown += row["cost_unknown"]
        row["cost_unknown_cumulative"] = cumulative_unknown  # calls so far without a price
        row["wall_s"] = (s["finished_at"] - s["started_at"]) if s["finished_at"] else None
        per_failed = row["calls_backward"] / row["failed"] if row["failed"] else None
        row["backward_calls_saved"] = (
            round(per_failed * (row["batch"] - row["failed"])) if per_failed is not None else None
        )
        row["backward_saved_usd"] = (
            row["cost_backward"] / row["failed"] * (row["batch"] - row["failed"]) if row["failed"] else None
        )
        for fate in FATES:
            row[fate] = proposals.get(step, {}).get(fate, 0)
        rows.append(row)
    return rows


def estimate_of(store: Store, run_id: str) -> dict | None:
    """The cost estimate stored when the run was created (see `autodiff.estimate.Estimate.as_dict`),
    or None for a run made before estimates were stored."""
    events = [e for e in store.run_events(run_id) if e["kind"] == "estimate"]
    return json.loads(events[-1]["text"]) if events else None


def projection(store: Store, run_id: str, *, steps: list[dict] | None = None,
               totals: list[dict] | None = None) -> dict:
    """What the run has cost and is projected to cost by its end, from what its steps cost so far.

    `spent_usd` and `spent_tokens`: every call of the run so far (priced calls; `unknown` counts
    fresh calls without a price). A training step still to run is projected at the mean of the
    completed training steps (`per_step_usd`, `per_step_tokens`), or, before the first one ends,
    at the estimate stored with the run; the final test at what step 0's test cost. `remaining`:
    training steps not completed. `projected_usd` / `projected_tokens`: spent plus what is still
    to come (the whole run); `to_finish_usd` / `to_finish_tokens`: only what is still to come.
    Figures are None when nothing to base them on is known (a run without an estimate before its
    first training step, or unknown prices). `steps` and `totals` are the run's `step_figures`
    and `Store.call_totals` when the caller has them already."""
    run = store.run(run_id)
    totals = store.call_totals(run_id) if totals is None else totals
    spent_usd = sum(c["cost_usd"] for c in totals)
    spent_tokens = sum(c["tokens"] for c in totals)
    unknown = sum(c["cost_unknown"] for c in totals)
    steps = step_figures(store, run_id) if steps is None else steps
    done = [r for r in steps if r["status"] == "completed" and r["step"] > 0]
    planned = run["config"].get("steps") or 0
    remaining = max(planned - len(done), 0) if run["status"] != "completed" else 0
    per_usd = per_tokens = None
    if done:
        per_usd = sum(r["cost"] for r in done) / len(done)
        per_tokens = sum(r["tokens"] for r in done) / len(done)
    elif (forecast := estimate_of(store, run_id)) is not None:
        per_usd, per_tokens = forecast["per_step"]["usd"], forecast["per_step"]["prompt_tokens"] + \
            forecast["per_step"]["completion_tokens"]
    first = next((r for r in steps if r["step"] == 0), None)
    final_test_usd = first["cost_test"] if first and run["status"] != "completed" else 0.0
    final_test_tokens = first["tokens_test"] if first and run["status"] != "completed" else 0
    to_usd = None if per_usd is None or unknown else per_usd * remaining + final_test_usd
    to_tokens = None if per_tokens is None else round(per_tokens * remaining + final_test_tokens)
    return {
        "spent_usd": spent_usd, "spent_tokens": spent_tokens, "unknown": unknown, "remaining": remaining,
        "per_step_usd": per_usd, "per_step_tokens": per_tokens,
        "to_finish_usd": to_usd, "to_finish_tokens": to_tokens,
        "projected_usd": None if to_usd is None else spent_usd + to_usd,
        "projected_tokens": None if to_tokens is None else spent_tokens + to_tokens,
    }


def run_summary(store: Store, run_id: str) -> dict:
    """A run at a glance. Scores are the step records' (errored samples left out); `tokens`,
    `calls`, `errors` (calls that errored) and `cut_off` (replies cut off at the token limit) are
    summed over every call of the run, preflight and calls outside a step included; so is money:
    `cost_usd` (priced calls), `cost_unknown` (fresh calls without a price), `cache_saved_usd`
    (what our response cache saved), `backward_saved_usd` (what selective backward saved) and
    `saved_usd` (both), with `saved_unknown` (cache hits, and steps' backward savings, whose
    price is unknown: left out of `saved_usd`);
    `projected_usd` / `to_finish_usd` are the run's projected cost (see `projection`), and
    `budget_usd` / `budget_tokens` its budgets (None: none). `wall_s` is seconds from creation to
    the last status change; `pending` counts proposals awaiting review."""
    run = store.run(run_id)
    steps = store.steps(run_id)
    calls = store.call_totals(run_id)
    done = [s for s in steps if s["status"] == "completed"]
    vals = [s["val_score"] for s in done if s["val_score"] is not None]
    tests = [s for s in done if s["test_score"] is not None]
    cfg = run["config"]
    figures = step_figures(store, run_id)
    money = projection(store, run_id, steps=figures, totals=calls)
    cache_saved = sum(c["saved_usd"] for c in calls)
    backward_saved = sum(r["backward_saved_usd"] or 0.0 for r in figures)
    saved_unknown = sum(c["saved_unknown"] for c in calls) + sum(
        1 for r in figures if r["backward_calls_saved"] and r["cost_unknown_backward"])
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
        "errors": sum(c["errors"] for c in calls),
        "cut_off": sum(c["cut_off"] for c in calls),
        "cost_usd": money["spent_usd"], "cost_unknown": money["unknown"],
        "cache_saved_usd": cache_saved, "backward_saved_usd": backward_saved,
        "saved_usd": cache_saved + backward_saved, "saved_unknown": saved_unknown,
        "projected_usd": money["projected_usd"], "to_finish_usd": money["to_finish_usd"],
        "projected_tokens": money["projected_tokens"],
        "budget_usd": cfg.get("budget_usd"), "budget_tokens": cfg.get("budget_tokens"),
        "wall_s": (run["updated_at"] - run["created_at"]),
        "created_at": run["created_at"], "review": cfg.get("review"),
        "pending": len(store.proposals(run_id, fate="pending")),
    }
