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

Every figure the dashboard shows comes from one function here, so pages cannot disagree:

- **Attempts.** A step stopped part-way is redone whole on resume; the store keeps the records of
  the attempt that ran last and every call ever made (`Store.attempt_totals` says which calls
  belong to the kept attempt). Per-step figures of the work (calls by phase, backward calls made
  and saved, time) count the kept attempt only, so a resumed step is never counted twice. Money
  and tokens count everything actually spent: the calls of a discarded attempt appear apart, as
  "redone" (`calls_redone`, `tokens_redone`, `cost_redone`), in the step's totals and the run's.
  Two edges: calls made for a step before its attempt started (a resume re-scoring a changed
  validation split) count as redone; calls of no stored step (one a resume discarded and then
  stopped before redoing) count in the run's totals (`run_summary`) only.
- **Run time** (`step_figures` `wall_s_cumulative`, `run_summary` `wall_s`): the seconds the run
  spent on its completed steps: for each completed step, from its start to its end (or its last
  call's end, when later: the final test is recorded under the last step), summed. A step not
  completed (running now, or stopped or failed part-way, so redone whole on resume) is not in it
  in any state of the run: its time so far is its own row's `wall_s`, shown apart. So the figure
  is the same on every page whether the run is running, stopped, failed, completed or resumed,
  and never drops on resume. Time between a stop and a resume, a discarded attempt and the
  preflight check are not in it either.
- **Mini-batch outcomes** (`batch_outcome`): each sample of a step's mini-batch is correct
  (scored at or above the run's tau), failing (below tau) or errored (no score). Failing samples
  are sent backward up to the per-step cap (`max_failed`), the lowest scores first; the rest are
  *over the cap*. "Saved by selective backward" counts the correct samples only.
- **Proposal stages** (`Store.proposal_totals`): each stage counts the proposals that reached
  it, so the stages never grow from one to the next.
- **Scores**: the step records' validation and test scores (errored samples left out); a step
  whose test set was not scored has no test score (None), never the previous one.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from autodiff.records import CallSummary, Run
from autodiff.store import Store

# "preflight" is the tiny question put to each model before a run spends anything (step 0).
PHASES = ("preflight", "forward", "backward", "propose", "validate", "test")
SPLITS = ("val", "test")
# Proposal stages, each counting the proposals that reached it (monotone), then one outcome.
STAGES = ("proposed", "passed_minibatch", "passed_validation", "accepted")
FATES = (*STAGES, "rejected_by_person")
STAGE_LABELS = {"proposed": "proposed", "passed_minibatch": "passed mini-batch",
                "passed_validation": "passed validation", "accepted": "accepted",
                "rejected_by_person": "rejected by a person"}


def phase_figures(store: Store, run_id: str) -> list[dict]:
    """One row per (step, phase): calls, cached calls, errored calls, cut-off replies, context-window
    failures, tokens, summed latency and wall span (`Store.call_totals`)."""
    return store.call_totals(run_id)


def proposal_figures(store: Store, run_id: str) -> list[dict]:
    """Per step, proposals by how far they got (`STAGES`). Each stage counts the proposals that
    reached it, so the counts never grow from one stage to the next: an accepted proposal also
    counts as proposed and as past both checks (a value a person accepted without them included:
    the person stood in for the checks). A proposal passed a check when its score beat the
    baseline it was compared with; "rejected by a person" (not a stage) counts decisions written
    by `Store.decide` (the trainer writes none)."""
    return store.proposal_totals(run_id)


def funnel(rows: Iterable[dict]) -> dict[str, int]:
    """Stage -> proposals that reached it (plus "rejected_by_person" and "accepted_unchecked": those
    accepted, by a person, without beating both baselines, which every stage counts), summed over
    `rows` (rows of `proposal_figures` or `step_figures`: pass a run's, or one step's)."""
    rows = list(rows)
    return {fate: sum(r.get(fate, 0) or 0 for r in rows) for fate in (*FATES, "accepted_unchecked")}


def run_tau(run: Run) -> float:
    """The run's threshold: samples scoring below it are failing. The task default, when the run
    kept None, is 1.0 for every bundled task."""
    tau = run.config.get("tau")
    return 1.0 if tau is None else float(tau)


def is_failing(score: float | None, tau: float) -> bool:
    """A scored sample below tau (a sample without a score errored: neither failing nor correct)."""
    return score is not None and score < tau


@dataclass(frozen=True)
class BatchOutcome:
    """What became of one step's mini-batch, in samples: `batch` = `correct` + `failing` +
    `errored`, and `failing` = `sent_backward` + `over_cap`."""

    batch: int  # samples in the mini-batch
    correct: int  # scored at or above tau: no backward call needed (what selective backward saves)
    failing: int  # scored below tau
    sent_backward: int  # failing samples the backward pass was run for (lowest scores first, up to the cap)
    over_cap: int  # failing samples beyond the per-step cap: no backward call, and not a saving
    errored: int  # no score: a call failed (left out, neither failing nor correct)


def batch_outcome(batch: Sequence[str], scores: Mapping[str, float | None], tau: float, *,
                  sent: Sequence[str] | None = None, cap: int | None = None) -> BatchOutcome:
    """The outcome of a mini-batch (sample ids) from its samples' scores (sample id -> score in
    [0, 1], None or absent: errored). `sent`: the failing samples the trainer sent backward, as a
    completed step records them (failing whatever `scores` say: the trainer's decision stands);
    for a step still running, `cap` (the run's `max_failed`) gives how many it sends."""
    was_sent = set(sent or ())
    failing = errored = 0
    for sid in batch:
        score = scores.get(sid)
        if sid in was_sent or is_failing(score, tau):
            failing += 1
        elif score is None:
            errored += 1
    if sent is not None:
        sent_backward = sum(1 for sid in batch if sid in was_sent)
    else:
        sent_backward = failing if cap is None else min(failing, cap)
    return BatchOutcome(batch=len(batch), correct=len(batch) - failing - errored, failing=failing,
                        sent_backward=sent_backward, over_cap=failing - sent_backward, errored=errored)


def busy_seconds(spans: Iterable[tuple[float, float]], start: float, end: float) -> float:
    """Seconds within [start, end] during which at least one of the (start, end) spans ran:
    overlapping calls (concurrent samples) count once."""
    total, reached = 0.0, start
    for a, b in sorted(spans):
        a, b = max(a, reached), min(b, end)
        if b > a:
            total += b - a
            reached = b
    return total


def fault_calls(store: Store, run_id: str) -> list[CallSummary]:
    """Every call of the run that errored or was cut off, in the order made, without its prompt or
    reply (`step` is None before the first step; `error_kind` None on records made before kinds
    were recorded)."""
    return store.fault_calls(run_id)


def error_kinds(store: Store, run_id: str) -> dict[tuple[int, str], dict[str, int]]:
    """(step, phase) -> {error kind: calls}, most frequent kind first (then by name), for the
    (step, phase) pairs that had errors, over the same calls as `step_figures`' `errors_{phase}`:
    those of the attempts the store keeps (an attempt stopped part-way and redone on resume is the
    step's `redone`, not here). Calls without a step count under step -1, as in
    `Store.call_totals`; an error recorded without a kind counts as "unknown"."""
    counts: dict[tuple[int, str], Counter] = defaultdict(Counter)
    for c in store.fault_calls(run_id, kept_only=True):
        if c.error is not None:
            step = -1 if c.step is None else c.step
            counts[(step, c.phase)][c.error_kind or "unknown"] += 1
    return {key: dict(sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))) for key, kinds in counts.items()}


def context_window_failures(store: Store, run_id: str) -> list[CallSummary]:
    """The calls that failed because their prompt did not fit the model's context window (of
    `fault_calls`), in the order made."""
    return [c for c in fault_calls(store, run_id) if c.error_kind == "context_window"]


def errored_samples(store: Store, run_id: str) -> dict[tuple[int, str], int]:
    """(step, split) -> samples of the run's current values whose evaluation at that step has no
    score (the sample errored), for the pairs that have any."""
    return store.errored_sample_counts(run_id)


def step_figures(store: Store, run_id: str) -> list[dict]:
    """One row per stored step, in step order: scores, tokens, money and time by phase, the
    mini-batch's outcome, backward calls made and saved, proposals by stage, and faults.

    Per phase p, over the calls of the step's kept attempt (see the module docstring): `calls_p`
    (calls made, cached ones included), `tokens_p` (prompt + completion tokens of fresh calls;
    cached calls count 0), `cost_p` (USD of its priced calls), `cost_unknown_p` (its fresh calls
    with no known price), `errors_p` (calls that errored), `cut_off_p` (replies cut off at the
    token limit), `wall_s_p` (seconds of the step during which a call of the phase was running;
    concurrent calls count once). The calls of discarded attempts of the step (stopped part-way,
    redone on resume) are `calls_redone`, `tokens_redone`, `cost_redone`, `cost_unknown_redone`,
    `errors_redone` and `cut_off_redone`.

    Totals, over everything the step spent (kept and redone): `tokens`, `cost`, `cost_unknown`,
    `tokens_cumulative`, `cost_cumulative` and `cost_unknown_cumulative` (this step and those
    before it), `errors`, `cut_off` and `context_window` (calls that failed because the prompt
    did not fit the model's context window), `cache_saved_usd` (what calls answered from our
    response cache would have cost, where their price is known) and `cache_saved_unknown` (those
    cache hits whose price is unknown, left out of it). `tokens_unknown`: the step's fresh
    replies whose server reported no token usage (counted as 0 in the token figures).

    Time, in seconds: `wall_s` (the step's time: start to end, or to its last call's end when
    later; a step not completed: to its last call so far), `wall_s_other` (the part of it with no
    LLM call running: the trainer's own work, a wait for review), `wall_s_cumulative` (run time
    so far: the completed steps' `wall_s` up to this one; a step not completed adds nothing). Scores: `val_score`, `test_score` (None where the test set was not scored).

    The mini-batch (`batch_outcome`): `batch`, `correct`, `failed` (failing samples),
    `sent_backward`, `over_cap`, `errored_batch`. Backward calls: `calls_backward` (made, kept
    attempt), `backward_calls_saved` (what the correct samples would have needed at the step's
    calls per sample sent; None when no sample was sent, so there is no rate to go by),
    `backward_calls_over_cap` (the same for the samples over the cap: not made, not a saving;
    both None at a step without a mini-batch, step 0),
    `backward_saved_usd` (the saved calls' cost at the step's cost per sample sent, from its
    priced backward calls) and `backward_saved_unknown` (1 when calls were saved but the step's
    backward calls have no known price, so that figure leaves them out; else 0). Proposals:
    one column per `FATES` entry (see `proposal_figures`). `samples_errored_val` and
    `samples_errored_test`: samples left unscored in the step's validation and test evaluations
    (the scores leave them out); `samples_errored` is their sum."""
    run = store.run(run_id)
    tau, cap = run_tau(run), run.config.get("max_failed")
    proposals = {r["step"]: r for r in proposal_figures(store, run_id)}
    unscored = errored_samples(store, run_id)
    scores = store.loss_scores(run_id)
    totals: dict[int, list[dict]] = defaultdict(list)
    for t in store.attempt_totals(run_id):
        totals[t["step"]].append(t)
    spans: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)  # sorted by start (the reader's order)
    for step, phase, a, b in store.kept_call_spans(run_id):
        spans[(step, phase)].append((a, b))
    rows = []
    cumulative = {"tokens": 0, "cost": 0.0, "cost_unknown": 0, "wall_s": 0.0}
    for s in store.steps(run_id):
        step = s.step
        row = {"step": step, "status": s.status, "val_score": s.val_score, "test_score": s.test_score}
        mine = totals.get(step, [])
        for phase in (*PHASES, "redone"):
            match = [t for t in mine if (not t["kept"] if phase == "redone" else t["kept"] and t["phase"] == phase)]
            for column, source in (("tokens", "tokens"), ("calls", "calls"), ("errors", "errors"),
                                   ("cut_off", "cut_off"), ("cost", "cost_usd"), ("cost_unknown", "cost_unknown"),
                                   ("tokens_unknown", "tokens_unknown")):
                row[f"{column}_{phase}"] = sum(t[source] for t in match)
        for column in ("tokens", "cost", "cost_unknown"):
            row[column] = sum(row[f"{column}_{p}"] for p in (*PHASES, "redone"))
        row["cache_saved_usd"] = sum(t["saved_usd"] for t in mine)
        row["cache_saved_unknown"] = sum(t["saved_unknown"] for t in mine)
        row["tokens_unknown"] = sum(t["tokens_unknown"] for t in mine)
        row["errors"] = sum(t["errors"] for t in mine)  # every phase and attempt: a fault is never hidden
        row["cut_off"] = sum(t["cut_off"] for t in mine)
        row["context_window"] = sum(t["context_window"] for t in mine)
        for split in SPLITS:
            row[f"samples_errored_{split}"] = unscored.get((step, split), 0)
        row["samples_errored"] = sum(row[f"samples_errored_{split}"] for split in SPLITS)

        # Time: the step's span, and within it the time each phase had a call running.
        last_call = max((b for p in PHASES if p != "preflight" for _a, b in spans.get((step, p), ())),
                        default=s.started_at)
        ended = max(s.finished_at or s.started_at, last_call)
        row["wall_s"] = ended - s.started_at
        for phase in PHASES:
            row[f"wall_s_{phase}"] = busy_seconds(spans.get((step, phase), ()), s.started_at, ended)
        row["wall_s_other"] = max(row["wall_s"] - sum(row[f"wall_s_{p}"] for p in PHASES), 0.0)

        for column in cumulative:
            # Run time counts completed steps only: an unfinished attempt (running, or stopped or
            # failed and to be redone whole on resume) is its own row's `wall_s`, not in the sum.
            if column != "wall_s" or s.status == "completed":
                cumulative[column] += row[column]
            row[f"{column}_cumulative"] = cumulative[column]

        outcome = batch_outcome(s.batch, scores.get(step, {}), tau,
                                sent=s.failed_samples if s.status == "completed" else None, cap=cap)
        row.update(batch=outcome.batch, correct=outcome.correct, failed=outcome.failing,
                   sent_backward=outcome.sent_backward, over_cap=outcome.over_cap, errored_batch=outcome.errored)
        per_sample = row["calls_backward"] / outcome.sent_backward if outcome.sent_backward else None
        trained = outcome.batch > 0  # step 0 (the initial evaluation) has no mini-batch: nothing to save
        row["backward_calls_saved"] = _estimate(per_sample, outcome.correct) if trained else None
        row["backward_calls_over_cap"] = _estimate(per_sample, outcome.over_cap) if trained else None
        row["backward_saved_usd"] = (row["cost_backward"] / outcome.sent_backward * outcome.correct
                                     if outcome.sent_backward else None)
        row["backward_saved_unknown"] = int(bool(row["backward_calls_saved"] and row["cost_unknown_backward"]))
        for fate in FATES:
            row[fate] = proposals.get(step, {}).get(fate, 0) or 0
        rows.append(row)
    return rows


def _estimate(per_sample: float | None, samples: int) -> int | None:
    """Calls `samples` would have needed at `per_sample` calls each; 0 for no samples, None when
    there is no rate to go by."""
    if not samples:
        return 0
    return None if per_sample is None else round(per_sample * samples)


def estimate_of(store: Store, run_id: str) -> dict | None:
    """The cost estimate stored when the run was created (see `autodiff.estimate.Estimate.as_dict`),
    or None for a run made before estimates were stored."""
    events = [e for e in store.run_events(run_id) if e.kind == "estimate"]
    return json.loads(events[-1].text) if events else None


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
    planned = run.config.get("steps") or 0
    remaining = max(planned - len(done), 0) if run.status != "completed" else 0
    per_usd = per_tokens = None
    if done:
        per_usd = sum(r["cost"] for r in done) / len(done)
        per_tokens = sum(r["tokens"] for r in done) / len(done)
    elif (forecast := estimate_of(store, run_id)) is not None:
        per_usd, per_tokens = forecast["per_step"]["usd"], forecast["per_step"]["prompt_tokens"] + \
            forecast["per_step"]["completion_tokens"]
    first = next((r for r in steps if r["step"] == 0), None)
    final_test_usd = first["cost_test"] if first and run.status != "completed" else 0.0
    final_test_tokens = first["tokens_test"] if first and run.status != "completed" else 0
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
    `tokens_unknown` counts fresh replies whose server reported no token usage (their tokens are
    not in `tokens`); `projected_usd` / `to_finish_usd` are the run's projected cost (see `projection`), and
    `budget_usd` / `budget_tokens` its budgets (None: none). `wall_s` is the run time in seconds
    (see the module docstring: its completed steps' times, summed; `step_figures`'
    `wall_s_cumulative` at the last step), `unfinished_s` the time so far of a step not completed
    (None when every step is), not in `wall_s`; `pending` counts proposals awaiting review."""
    run = store.run(run_id)
    steps = store.steps(run_id)
    calls = store.call_totals(run_id)
    done = [s for s in steps if s.status == "completed"]
    vals = [s.val_score for s in done if s.val_score is not None]
    tests = [s for s in done if s.test_score is not None]
    cfg = run.config
    figures = step_figures(store, run_id)
    money = projection(store, run_id, steps=figures, totals=calls)
    cache_saved = sum(c["saved_usd"] for c in calls)
    backward_saved = sum(r["backward_saved_usd"] or 0.0 for r in figures)
    saved_unknown = sum(c["saved_unknown"] for c in calls) + sum(r["backward_saved_unknown"] for r in figures)
    return {
        "id": run_id, "task": run.task, "status": run.status, "error": run.error,
        "forward_model": cfg.get("forward_model"), "backward_model": cfg.get("backward_model"),
        "optimizer_model": cfg.get("optimizer_model"),
        "steps_done": max((s.step for s in done), default=0), "steps_planned": cfg.get("steps"),
        "initial_val": done[0].val_score if done else None,
        "best_val": max(vals) if vals else None,
        "initial_test": tests[0].test_score if tests else None,
        "final_test": tests[-1].test_score if tests else None,
        "tokens": sum(c["tokens"] for c in calls),
        "tokens_unknown": sum(c["tokens_unknown"] for c in calls),
        "calls": sum(c["calls"] for c in calls),
        "errors": sum(c["errors"] for c in calls),
        "cut_off": sum(c["cut_off"] for c in calls),
        "cost_usd": money["spent_usd"], "cost_unknown": money["unknown"],
        "cache_saved_usd": cache_saved, "backward_saved_usd": backward_saved,
        "saved_usd": cache_saved + backward_saved, "saved_unknown": saved_unknown,
        "projected_usd": money["projected_usd"], "to_finish_usd": money["to_finish_usd"],
        "projected_tokens": money["projected_tokens"],
        "budget_usd": cfg.get("budget_usd"), "budget_tokens": cfg.get("budget_tokens"),
        "wall_s": figures[-1]["wall_s_cumulative"] if figures else 0.0,
        "unfinished_s": next((r["wall_s"] for r in reversed(figures) if r["status"] != "completed"), None),
        "created_at": run.created_at, "review": cfg.get("review"),
        "pending": len(store.proposals(run_id, fate="pending")),
    }
