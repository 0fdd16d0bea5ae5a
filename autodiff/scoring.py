"""Scoring samples: run the pipeline on each sample and score it, concurrently. A sample whose
LLM call failed after its retries stays an error (`Evaluation.score` is None), never a 0."""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from typing import Callable, Mapping, Sequence

from autodiff.llm.client import LLM
from autodiff.pipeline import Task, run_sample
from autodiff.records import Evaluation, Trace

Scored = tuple[Trace, Evaluation]
StopWhen = Callable[[Sequence[Evaluation], Sequence[str]], bool]


def run_samples(
    task: Task, samples: Sequence[dict], llm: LLM, pool: Executor, *, window: int, run_id: str | None,
    step: int | None, phase: str, overrides: Mapping[str, str] | None = None, stop_when: StopWhen | None = None,
    proposal_id: str | None = None,
) -> list[Scored]:
    """Trace and score `samples`, keeping `window` of them in flight (a sliding window: a slow
    sample never holds up the ones after it). Returns (trace, evaluation) pairs in sample order.

    `stop_when(done, unfinished_ids)` is asked after each sample finishes, with the evaluations
    so far and the ids of the samples running or not yet started; when it says True, no further
    sample starts, those running are finished, and only the samples run are returned."""
    upcoming = list(enumerate(samples))
    running: dict[Future, int] = {}
    done: dict[int, Scored] = {}

    def start_next() -> None:
        if upcoming:
            i, sample = upcoming.pop(0)
            running[pool.submit(run_sample, task, sample, llm, run_id=run_id, step=step, phase=phase,
                                overrides=dict(overrides or {}), proposal_id=proposal_id)] = i

    try:
        for _ in range(max(window, 1)):
            start_next()
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                done[running.pop(future)] = future.result()
            unfinished = [samples[i]["id"] for i in running.values()] + [s["id"] for _, s in upcoming]
            if stop_when is not None and stop_when([done[i][1] for i in sorted(done)], unfinished):
                upcoming.clear()
            for _ in finished:
                start_next()
    finally:
        for future in running:
            future.cancel()
    return [done[i] for i in sorted(done)]


def score_samples(task: Task, samples: Sequence[dict], llm: LLM, pool: Executor, **options) -> list[Evaluation]:
    """`run_samples` without the traces: the evaluations, in sample order."""
    return [evaluation for _, evaluation in run_samples(task, samples, llm, pool, **options)]


def mean_score(evaluations: Sequence[Evaluation]) -> float | None:
    """Mean score over the samples that were scored; None when none was."""
    scores = [e.score for e in evaluations if e.score is not None]
    return sum(scores) / len(scores) if scores else None


def error_share(evaluations: Sequence[Evaluation]) -> float:
    """Share of the samples (0..1) that errored; 0 for no samples."""
    return sum(e.errored for e in evaluations) / len(evaluations) if evaluations else 0.0
