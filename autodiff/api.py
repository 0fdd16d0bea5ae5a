"""Training from Python: `autodiff.train(task, ...)` and `autodiff.resume(run_id, task)`.

The CLI and the dashboard go through the same runner after turning a task's name into a Task;
here the Task object is at hand. A run trained this way is stored like any other, so it shows in
the dashboard and in `autodiff runs`.

    import autodiff

    result = autodiff.train(task, model="openai:gpt-4o-mini", backward="openai:gpt-4o", steps=4)
    print(result.best_val, result.scores)
    pipeline.load_run(autodiff.Store(result.store_path), result.run_id)   # the best prompts
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from autodiff.config import default_model, make_config
from autodiff.errors import ConfigError
from autodiff.llm.types import Provider
from autodiff.pipeline import Task
from autodiff.progress import Progress, announce_changes, progress_bar
from autodiff.state import resolve_step
from autodiff.store import Store

ROLES = ("forward", "backward", "optimizer")
Model = str | Provider  # "provider:model", or a provider object such as autodiff.ScriptedModel


@dataclass(frozen=True)
class StepScore:
    """One completed step: validation score of the values kept, and test score where measured
    (None where not; both are means over the samples scored, in [0, 1])."""

    step: int
    val_score: float | None
    test_score: float | None


@dataclass(frozen=True)
class TrainResult:
    """What a training run left: its id and store, how it ended, the scores per step and the
    best parameter values (those of the completed step with the highest validation score)."""

    run_id: str
    store_path: Path | str  # the store's SQLite file, or its postgresql:// URL (what Store() opens again)
    status: str  # completed | stopped | failed
    error: str | None  # why it stopped or failed
    models: dict[str, str]  # role -> provider:model it used
    scores: list[StepScore]
    best_step: int | None
    best_values: dict[str, str]

    @property
    def best_val(self) -> float | None:
        return next((s.val_score for s in self.scores if s.step == self.best_step), None)


def resolve_models(model: Model | None = None, forward: Model | None = None, backward: Model | None = None,
                   optimizer: Model | None = None) -> dict[str, Model]:
    """The model of each role: a role given is used; `model` fills the roles not given; a role
    still empty takes the forward model (never silently a different default)."""
    chosen = {"forward": forward or model or default_model(), "backward": backward or model,
              "optimizer": optimizer or model}
    return {role: chosen[role] or chosen["forward"] for role in ROLES}


OBJECT_MARK = "object"  # provider objects stand in a spec as "<provider>:object-<n>"


def _specs(models: dict[str, Model]) -> tuple[dict[str, str], dict[str, Provider]]:
    """Model specs per role, and the provider objects given, keyed by the spec they stand for:
    the first distinct object is "<provider>:object-1", the next "-2", and so on."""
    specs: dict[str, str] = {}
    providers: dict[str, Provider] = {}
    seen: dict[int, str] = {}
    for role in ROLES:
        model = models[role]
        if isinstance(model, str):
            specs[role] = model
            continue
        if id(model) not in seen:  # one object used by several roles is one model
            seen[id(model)] = f"{model.name}:{OBJECT_MARK}-{len(seen) + 1}"
            providers[seen[id(model)]] = model
        specs[role] = seen[id(model)]
    return specs, providers


@contextmanager
def _store(store: Store | str | Path | None) -> Iterator[Store]:
    """The Store given, or the one `store` names (a path or URL; None: the default), opened for
    the call and closed when it ends (a PostgreSQL store's pool is let go of then, not by the
    garbage collector)."""
    if isinstance(store, Store):
        yield store
        return
    from autodiff.store import open_store

    opened = open_store(store)
    try:
        yield opened
    finally:
        opened.close()


def train(task: Task | str, *, model: Model | None = None, forward: Model | None = None,
          backward: Model | None = None, optimizer: Model | None = None, store: Store | str | Path | None = None,
          cache: str | Path | None = None, progress: Progress | bool = True, run_id: str | None = None,
          **options: Any) -> TrainResult:
    """Train `task` (a Task object, or a task name as the CLI takes it) and return the result.

    Models are "provider:model" strings or provider objects (`autodiff.ScriptedModel` for tests
    without a key); see `resolve_models` for which role gets which. `options` are any
    `autodiff.config.RunConfig` fields (steps, batch_size, val_limit, review, ...). The run is
    written to `store` (default `.autodiff/runs.sqlite`, or AUTODIFF_STORE) with the response
    cache at `cache`. `progress`: True draws a bar (terminal or notebook), False nothing, a
    callable receives each event `(name, details)` as well as the bar being drawn.
    Raises ConfigError for a bad option or model, LLMFatalError when a model cannot be used;
    a run stopped by errors or a person returns with status "stopped" and the reason."""
    from autodiff import runner

    specs, providers = _specs(resolve_models(model, forward, backward, optimizer))
    name = task if isinstance(task, str) else task.name
    config = make_config(task=name, task_in_memory=not isinstance(task, str),
                         **{f"{role}_model": spec for role, spec in specs.items()}, **options)
    with _store(store) as the_store:
        run_id = runner.train(the_store, config, task=None if isinstance(task, str) else task, run_id=run_id,
                              cache_path=Path(cache) if cache else None, providers=providers or None,
                              progress=_progress(progress, config.steps))
        return result_of(the_store, run_id)


def resume(run_id: str, task: Task | None = None, *, store: Store | str | Path | None = None,
           model: Model | None = None, forward: Model | None = None, backward: Model | None = None,
           optimizer: Model | None = None, accept_task_changes: bool = False, cache: str | Path | None = None,
           progress: Progress | bool = True, budget_usd: float | None = None,
           budget_tokens: int | None = None, force: bool = False, **options: Any) -> TrainResult:
    """Continue a stopped or failed run from its last completed step. A run trained from a Task
    object needs that task again; provider objects (a ScriptedModel) must be given again for
    the roles that used them. The task must match what the run stored unless
    `accept_task_changes` (recorded in the run's history). `budget_usd` (US dollars) and
    `budget_tokens` replace the run's budgets, for the whole run (a run stopped by its budget
    goes on with a larger one; the change is recorded). `options` change how calls are retried and
    judged (`autodiff.config.RESUME_OPTIONS`: timeout, forward_timeout, ..., retry_budget,
    max_error_share), stored in the run and printed when they change, e.g. a run stopped because
    the server asked for a longer wait than its retry budget: `resume(run_id, retry_budget=150)`.
    A run another process trains is refused
    while that process may be alive (see autodiff.holders); `force` takes it over from one on
    another machine that is really gone. Raises ConfigError otherwise."""
    from autodiff import runner

    with _store(store) as the_store:
        stored = the_store.run(run_id).config
        given = {"forward": forward or model, "backward": backward or model, "optimizer": optimizer or model}
        providers = {stored[f"{role}_model"]: obj for role, obj in given.items()
                     if obj is not None and not isinstance(obj, str)}
        missing = [role for role in ROLES if f":{OBJECT_MARK}-" in stored[f"{role}_model"]
                   and stored[f"{role}_model"] not in providers]
        if missing:
            raise ConfigError(f"run {run_id} was trained with a model object (e.g. a ScriptedModel) for "
                              f"{', '.join(missing)}: give it again (model=... or {missing[0]}=...) to resume")
        runner.resume(the_store, run_id, task=task, accept_task_changes=accept_task_changes, budget_usd=budget_usd,
                      budget_tokens=budget_tokens, force=force, options=options,
                      cache_path=Path(cache) if cache else None, providers=providers or None,
                      progress=announce_changes(_progress(progress, stored["steps"])))
        return result_of(the_store, run_id)


def result_of(store: Store, run_id: str) -> TrainResult:
    """The `TrainResult` of a stored run, whatever process trained it."""
    run = store.run(run_id)
    done = [s for s in store.steps(run_id) if s.status == "completed"]
    scores = [StepScore(s.step, s.val_score, s.test_score) for s in done]
    best = resolve_step(store, run_id, "best") if any(s.val_score is not None for s in scores) else None
    return TrainResult(
        run_id=run_id, store_path=store.path if store.backend == "sqlite" else store.spec, status=run.status,
        error=run.error,
        models={role: run.config[f"{role}_model"] for role in ROLES}, scores=scores, best_step=best,
        best_values=store.parameter_values_at(run_id, best) if best is not None else {},
    )


def _progress(progress: Progress | bool, steps: int) -> Progress | None:
    if progress is True:
        return progress_bar(steps)
    if callable(progress):
        return progress_bar(steps, also=progress)
    return None
