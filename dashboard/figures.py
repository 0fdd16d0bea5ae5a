"""Figures of `autodiff.metrics` for the pages: kept for runs that no longer change, and written as
sentences for the pages that show them as text rather than in a chart (the same numbers as the
Curves charts, in one wording everywhere)."""

from __future__ import annotations

from collections.abc import Mapping

import streamlit as st

from autodiff.metrics import STAGE_LABELS, STAGES, step_figures
from autodiff.records import Run
from autodiff.store import Store
from dashboard.common import ACTIVE, get_store


@st.cache_data(max_entries=200, show_spinner=False)
def _settled_steps(path: str, run_id: str, status: str, updated_at: float) -> list[dict]:
    return step_figures(get_store(path), run_id)


def steps_of(store: Store, run: Run) -> list[dict]:
    """`step_figures` of a run (as `Store.runs` gives it). A run no process writes to changes only
    along with its status and time stamp (as `dashboard.common.summary` relies on too), so its
    figures are computed once and kept; a live run's are computed on every call."""
    if run.status in ACTIVE:
        return step_figures(store, run.id)
    return _settled_steps(store.spec, run.id, run.status, run.updated_at)


def _n(value: int | None, unit: str = "") -> str:
    return "unknown" if value is None else f"{value:,}{unit}"


def batch_sentence(row: Mapping) -> str:
    """A step's mini-batch and backward calls, from its `step_figures` row: "4 samples in the
    mini-batch: 1 correct, 3 failing (2 sent backward, 1 over the per-step cap), 0 errored.
    Backward calls: 4 made, 2 saved by selective backward (correct samples), 2 not made (over the
    cap)." Calls saved and not made are at the step's calls per failing sample sent."""
    return (f"{row['batch']:,} samples in the mini-batch: {row['correct']:,} correct, {row['failed']:,} failing "
            f"({row['sent_backward']:,} sent backward, {row['over_cap']:,} over the per-step cap), "
            f"{row['errored_batch']:,} errored. Backward calls: {row['calls_backward']:,} made, "
            f"{_n(row['backward_calls_saved'])} saved by selective backward (correct samples), "
            f"{_n(row['backward_calls_over_cap'])} not made (over the cap).")


def funnel_sentence(counts: Mapping[str, int]) -> str:
    """Proposals by the stage they reached (`metrics.funnel`): "5 proposed → 3 passed mini-batch →
    2 passed validation → 1 accepted; 0 rejected by a person"."""
    stages = " → ".join(f"{counts[s]:,} {STAGE_LABELS[s]}" for s in STAGES)
    unchecked = counts.get("accepted_unchecked", 0)
    return (f"{stages}; {counts['rejected_by_person']:,} {STAGE_LABELS['rejected_by_person']}"
            + (f"; {unchecked:,} of the accepted did not beat both baselines (a person accepted "
               f"{'it' if unchecked == 1 else 'them'}), and count as past both checks" if unchecked else ""))
