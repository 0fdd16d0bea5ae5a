"""Start or resume a run: the one function the CLI and the dashboard call."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from autodiff.config import RunConfig, make_config
from autodiff.errors import ConfigError, StoreError
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
    retry: RetryPolicy | None = None, use_cache: bool = True,
) -> Trainer:
    task = load_task(config.task)
    buffer = CallBuffer(store)
    cache = ResponseCache(cache_path or default_cache_path()) if use_cache else None
    # "refresh" reads only replies written since the run began (a resume keeps its own).
    try:
        since = store.run(run_id)["created_at"] if run_id else time.time()
    except StoreError:
        since = time.time()
    roles = make_roles(config, recorder=buffer, cache=cache, providers=providers, retry=retry, cache_since=since)
    return Trainer(task, config, store, roles, buffer, run_id=run_id, progress=progress)


def train(store: Store, **options) -> str:
    """Validate options, build the trainer, run it to the end; returns the run id."""
    extra = {k: options.pop(k) for k in ("cache_path", "providers", "progress", "retry", "use_cache", "run_id")
             if k in options}
    return prepare(make_config(**options), store, **extra).train()


def create(store: Store, **options) -> str:
    """Validate options (task, models, keys) and write the run to the store without starting it."""
    extra = {k: options.pop(k) for k in ("cache_path", "providers", "run_id") if k in options}
    return prepare(make_config(**options), store, **extra).register()


def start_background(store_path: Path, run_id: str, cache_path: Path | None = None) -> int:
    """Run (or resume) a stored run in a separate process that outlives the caller (a browser tab
    closing, a dashboard restart). Its output goes to a log file beside the store. Returns the pid."""
    log_dir = Path(store_path).parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    # --keep-stop: whoever asked for this process has already cleared any stop request (or it is a
    # new run); one made since, while the process was starting, must still stop it.
    cmd = [sys.executable, "-m", "autodiff.cli", "resume", run_id, "--store", str(store_path), "--quiet",
           "--keep-stop"]
    if cache_path:
        cmd += ["--cache", str(cache_path)]
    with open(log_dir / f"{run_id}.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return proc.pid


def launch(store: Store, cache_path: Path | None = None, **options) -> str:
    """Validate and register a run (see `create`), then train it in a background process."""
    run_id = create(store, cache_path=cache_path, **options)
    start_background(store.path, run_id, cache_path)
    return run_id


def resume_background(store: Store, run_id: str, cache_path: Path | None = None) -> int:
    """Resume a stopped or failed run in a background process; it shows as created until it starts."""
    status = store.run(run_id)["status"]
    if status in ("completed", "running"):
        raise ConfigError(f"run {run_id} is {status}; only a stopped or failed run can be resumed")
    store.clear_stop(run_id)  # a stop asked for before the run got going would end it again at once
    store.set_run_status(run_id, "created")
    return start_background(store.path, run_id, cache_path)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_dead_runs(store: Store) -> list[str]:
    """Runs that say `running` but whose process is gone (killed, machine restarted) become
    `stopped`, with a note, so they can be resumed instead of looking alive forever."""
    dead = []
    for run in store.runs():
        if run["status"] == "running" and run["pid"] and not pid_alive(run["pid"]):
            store.set_run_status(run["id"], "stopped",
                                 error=f"process {run['pid']} ended without finishing; resume to continue")
            dead.append(run["id"])
    return dead


def resume(store: Store, run_id: str, clear_stop: bool = True, **extra) -> str:
    """Train a stored run on from its last completed step, in this process. A person resuming
    overrides an earlier stop request (`clear_stop`); a background process started for the run
    keeps one made while it was starting."""
    run = store.run(run_id)
    if clear_stop:
        store.clear_stop(run_id)
    if run["status"] == "completed":
        raise ConfigError(f"run {run_id} is already completed; nothing to resume")
    config = make_config(**run["config"])
    return prepare(config, store, run_id=run_id, **extra).train()
