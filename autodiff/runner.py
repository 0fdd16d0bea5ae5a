"""Start or resume a run: the one function the CLI and the dashboard call."""

from __future__ import annotations

import os
from pathlib import Path

from autodiff.config import RunConfig, make_config
from autodiff.errors import ConfigError
from autodiff.llm.cache import ResponseCache
from autodiff.llm.client import RetryPolicy
from autodiff.llm.types import Provider
from autodiff.store import Store
from autodiff.tasks import load_task
from autodiff.trainer import CallBuffer, Progress, Trainer, make_roles

DEFAULT_HOME = Path(os.environ.get("AUTODIFF_HOME", ".autodiff"))


def default_store_path() -> Path:
    return Path(os.environ.get("AUTODIFF_STORE", DEFAULT_HOME / "runs.sqlite"))


def default_cache_path() -> Path:
    return Path(os.environ.get("AUTODIFF_CACHE", DEFAULT_HOME / "cache.sqlite"))


def prepare(
    config: RunConfig, store: Store, *, run_id: str | None = None, cache_path: Path | None = None,
    providers: dict[str, Provider] | None = None, progress: Progress | None = None,
    retry: RetryPolicy = RetryPolicy(), use_cache: bool = True,
) -> Trainer:
    task = load_task(config.task)
    buffer = CallBuffer(store)
    cache = ResponseCache(cache_path or default_cache_path()) if use_cache else None
    roles = make_roles(config, recorder=buffer, cache=cache, providers=providers, retry=retry)
    return Trainer(task, config, store, roles, buffer, run_id=run_id, progress=progress)


def train(store: Store, **options) -> str:
    """Validate options, build the trainer, run it to the end; returns the run id."""
    extra = {k: options.pop(k) for k in ("cache_path", "providers", "progress", "retry", "use_cache", "run_id")
             if k in options}
    return prepare(make_config(**options), store, **extra).train()


def resume(store: Store, run_id: str, **extra) -> str:
    run = store.run(run_id)
    if run["status"] == "completed":
        raise ConfigError(f"run {run_id} is already completed; nothing to resume")
    config = make_config(**run["config"])
    return prepare(config, store, run_id=run_id, **extra).train()
