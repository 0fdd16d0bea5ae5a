"""Per-step figures derived from stored records (calls, proposals, steps, evaluations), never kept
as counters.

Faults are counted from the call records: a call *errored* when its record has an `error` (it gave
no usable reply after the retries allowed; `error_kind` says what kind of fault), and a reply was
*cut off* when it stopped at the token limit (`finish_reason` "length"). The two are counted
separately and may overlap. A sample *errored* when its stored evaluation has no score (NULL): a
provider fault is never a wrong answer, and the step's validation and test scores leave such
samples out.
"""

from __future__ import annotations

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
    # Read here until Store has a reader for it; only the few fault rows are returned.
    with store.connect() as conn:
        rows = conn.execute(
            "SELECT id, step, phase, role, node, sample_id, call_index, model, error_kind, finish_reason, error,"
            " created_at FROM llm_calls WHERE run_id = ? AND (error IS NOT NULL OR finish_reason = 'length')"
            " ORDER BY created_at",
            (run_id,),
        ).fetchall()
    return [dict(r) for r in rows]


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
    # Read here until Store has a reader for it: a count, no prediction text.
    with store.connect() as conn:
        rows = conn.execute(
            "SELECT step, split, COUNT(*) - COUNT(score) AS errored FROM evaluations"
            " WHERE run_id = ? AND subject = 'current' GROUP BY step, split",
            (run_id,),
        ).fetchall()
    return {(r["step"], r["split"]): r["errored"] for r in rows if r["errored"]}


def step_figures(store: Store, run_id: str) -> list[dict]:
    """One row per step: scores, tokens and time by phase, proposals by stage, backward savings,
    and faults. Per phase p: `tokens_p` (prompt + completion tokens of fresh calls; cached calls
    count 0), `calls_p` (calls made, cached ones included), `wall_s_p` (seconds from the phase's
    first call's start to its last call's end), `errors_p` (calls that errored), `cut_off_p`
    (replies cut off at the token limit). Totals: `tokens` (over PHASES), and over every phase
    recorded `errors`, `cut_off` and `context_window` (calls that failed because the prompt did
    not fit the model's context window). `samples_errored_val` and `samples_errored_test`: samples
    left unscored in the step's validation and test evaluations (its `val_score` and `test_score`
    leave them out); `samples_errored` is their sum."""
    phases = phase_figures(store, run_id)
    proposals = {r["step"]: r for r in proposal_figures(store, run_id)}
    unscored = errored_samples(store, run_id)
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
            row[f"errors_{phase}"] = sum(p["errors"] for p in match)
            row[f"cut_off_{phase}"] = sum(p["cut_off"] for p in match)
        row["tokens"] = sum(row[f"tokens_{p}"] for p in PHASES)
        row["errors"] = sum(p["errors"] for p in mine)  # every phase: a fault is never hidden
        row["cut_off"] = sum(p["cut_off"] for p in mine)
        row["context_window"] = sum(p["context_window"] for p in mine)
        for split in SPLITS:
            row[f"samples_errored_{split}"] = unscored.get((step, split), 0)
        row["samples_errored"] = sum(row[f"samples_errored_{split}"] for split in SPLITS)
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
    """A run at a glance. Scores are the step records' (errored samples left out); `tokens`,
    `calls`, `errors` (calls that errored) and `cut_off` (replies cut off at the token limit) are
    summed over every call of the run, preflight and calls outside a step included; `wall_s` is
    seconds from creation to the last status change; `pending` counts proposals awaiting review."""
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
        "errors": sum(c["errors"] for c in calls),
        "cut_off": sum(c["cut_off"] for c in calls),
        "wall_s": (run["updated_at"] - run["created_at"]),
        "created_at": run["created_at"], "review": cfg.get("review"),
        "pending": len(store.proposals(run_id, fate="pending")),
    }
