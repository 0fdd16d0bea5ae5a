"""Per-step accounting summed in SQL (Store.call_totals, which metrics and the dashboard use) against
the same sums taken over every call record, on runs of the real trainer with the scripted fake."""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import pytest

from autodiff.metrics import phase_figures, proposal_figures, run_summary
from autodiff.records import CallSummary
from autodiff.store import Store
from tests.fake_runs import fake_run, filled_store


class TracedStore(Store):
    """A store that keeps every SQL statement it runs."""

    statements: list[str] = []

    @contextmanager
    def connect(self):
        with super().connect() as conn:
            conn.set_trace_callback(self.statements.append)
            yield conn


def expected_phases(store: Store, run_id: str) -> list[dict]:
    groups: dict[tuple[int, str], list[CallSummary]] = defaultdict(list)
    for c in store.call_summaries(run_id):
        groups[(-1 if c.step is None else c.step, c.phase)].append(c)
    rows = []
    for (step, phase), calls in sorted(groups.items()):
        fresh = [c for c in calls if not c.cached]
        rows.append({
            "step": step, "phase": phase, "calls": len(calls), "cached": len(calls) - len(fresh),
            "errors": sum(1 for c in calls if c.error),
            # the preflight probe asks for 16 tokens only: its cut-off is by design, not counted
            "cut_off": sum(1 for c in calls if c.finish_reason == "length" and c.phase != "preflight"),
            "context_window": sum(1 for c in calls if c.error_kind == "context_window"),
            "prompt_tokens": sum(c.prompt_tokens for c in fresh),
            "completion_tokens": sum(c.completion_tokens for c in fresh),
            "tokens": sum(c.prompt_tokens + c.completion_tokens for c in fresh),
            "latency_s": pytest.approx(sum(c.latency_ms for c in calls) / 1000.0),
            "wall_s": pytest.approx(max(c.created_at for c in calls)
                                    - min(c.created_at - c.latency_ms / 1000.0 for c in calls)),
            "cost_usd": pytest.approx(sum(c.cost_usd or 0.0 for c in calls)),
            "cost_unknown": sum(1 for c in fresh if c.cost_usd is None),
            "saved_usd": pytest.approx(sum(c.saved_usd or 0.0 for c in calls)),
            "saved_unknown": sum(1 for c in calls if c.cached and c.saved_usd is None),
            "tokens_unknown": sum(1 for c in fresh if c.error is None and c.prompt_tokens == 0
                                  and c.completion_tokens == 0),
        })
    return rows


def test_call_totals_match_the_call_records(tmp_path: Path) -> None:
    store = Store(tmp_path / "runs.sqlite")
    first = fake_run(store, tmp_path / "cache.sqlite", steps=2)
    second = fake_run(store, tmp_path / "cache.sqlite", steps=2)  # same prompts: cache hits, no fresh tokens
    for run_id in (first, second):
        rows = phase_figures(store, run_id)
        assert rows == expected_phases(store, run_id)
        summary = run_summary(store, run_id)
        assert summary["calls"] == len(store.call_summaries(run_id)) == sum(r["calls"] for r in rows)
        assert summary["tokens"] == sum(r["tokens"] for r in rows)
    assert any(r["cached"] for r in phase_figures(store, second))
    assert run_summary(store, second)["tokens"] < run_summary(store, first)["tokens"]


def test_call_totals_read_only_the_accounting_index(tmp_path: Path) -> None:
    store = TracedStore(tmp_path / "runs.sqlite")
    run_id = fake_run(store, tmp_path / "cache.sqlite", steps=1)
    store.statements.clear()
    store.call_totals(run_id)
    [query] = [s for s in store.statements if s.lstrip().upper().startswith("SELECT")]
    with store.connect() as conn:
        plan = " ".join(row["detail"] for row in conn.execute("EXPLAIN QUERY PLAN " + query))
    assert "COVERING INDEX llm_calls_accounting" in plan, plan


def test_rejected_by_person_counts_the_decisions_a_person_wrote(tmp_path: Path) -> None:
    store, (auto, reviewed) = filled_store(tmp_path)
    people = [p for p in store.proposals(reviewed) if p.decision == "reject"]
    assert people and all(p.fate == "rejected" for p in people)
    assert sum(r["rejected_by_person"] for r in proposal_figures(store, reviewed)) == len(people)
    assert sum(r["rejected_by_person"] for r in proposal_figures(store, auto)) == 0
