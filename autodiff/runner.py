"""Start or resume a run: the one function the CLI and the dashboard call."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from autodiff import holders
from autodiff.config import RESUME_OPTIONS, RunConfig, make_config
from autodiff.errors import AutodiffError, ConfigError, StoreError
from autodiff.pipeline import Task, check_connected
from autodiff.llm.budget import Budget
from autodiff.llm.cache import ResponseCache, normalise_endpoint
from autodiff.llm.client import RetryPolicy
from autodiff.llm.types import Provider
from autodiff.records import Run
from autodiff.recovery import budget_option, resume_command
from autodiff.store import Store
from autodiff.tasks import load_task
from autodiff.trainer import CallBuffer, Progress, Trainer, make_roles

DEFAULT_HOME = Path(os.environ.get("AUTODIFF_HOME", ".autodiff"))


def default_cache_path() -> Path:
    return Path(os.environ.get("AUTODIFF_CACHE", DEFAULT_HOME / "cache.sqlite"))


def prepare(
    task: Task, config: RunConfig, store: Store, *, run_id: str | None = None, cache_path: Path | None = None,
    providers: dict[str, Provider] | None = None, progress: Progress | None = None,
    retry: RetryPolicy | None = None, use_cache: bool = True,
) -> Trainer:
    """The trainer for `task` under `config`, its LLMs built (providers shared by name) and
    sharing the run's budget, which counts what a stored run has already spent."""
    buffer = CallBuffer(store)
    cache = ResponseCache(cache_path or default_cache_path()) if use_cache else None
    # "refresh" reads only replies written since the run began (a resume keeps its own).
    try:
        since = store.run(run_id).created_at if run_id else time.time()
    except StoreError:
        since = time.time()
    budget = None
    if config.budget_usd is not None or config.budget_tokens is not None:
        spent = store.call_totals(run_id) if run_id else []
        budget = Budget(config.budget_usd, config.budget_tokens, spent_usd=sum(c["cost_usd"] for c in spent),
                        spent_tokens=sum(c["tokens"] for c in spent))
    roles = make_roles(config, recorder=buffer, cache=cache, providers=providers, retry=retry, cache_since=since,
                       budget=budget)
    return Trainer(task, config, store, roles, buffer, run_id=run_id, progress=progress)


def task_for(config: RunConfig, task: Task | None = None) -> Task:
    """The run's task: the one given, else the one `config.task` names (a built-in name, a
    `file.py:factory` or `module:factory`, called with `config.task_args`). The one place a
    task's name becomes a Task."""
    return task if task is not None else load_task(config.task, config.task_args)


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_new_run_id(store: Store, run_id: str | None) -> None:
    """Raise ConfigError unless `run_id` can name a new run of `store`: None (a new id is made
    from the task's name and the time), or 1-128 letters, digits, '.', '_' and '-', starting with a
    letter or digit (the id names files and appears in shell commands), not taken by a run of the
    store. A new run under a taken id would write into that run: its steps, scores and calls mixed
    with another task's or config's, under the old run's config."""
    if run_id is None:
        return
    if not RUN_ID.fullmatch(run_id):
        raise ConfigError(f"run id {run_id!r} is not usable: give 1-128 letters, digits, '.', '_' or '-', starting "
                          "with a letter or digit, or none (a new id is made from the task's name and the time)")
    try:
        run = store.run(run_id)
    except StoreError:
        return
    raise ConfigError(f"run id {run_id} is taken: this store already holds run {run_id} (task {run.task}, "
                      f"{run.status}). To go on with that run: {resume_command(run_id, store)}. For a new run, give "
                      "another run id, or none (a new id is made from the task's name and the time)")


def train(
    store: Store, config: RunConfig, *, task: Task | None = None, run_id: str | None = None,
    cache_path: Path | None = None, providers: dict[str, Provider] | None = None,
    progress: Progress | None = None, retry: RetryPolicy | None = None, use_cache: bool = True,
) -> str:
    """Train a new run of `task` (or of the task `config.task` names) to the end, in this
    process; returns the run id. Raises ConfigError for a `run_id` that cannot name a new run
    (`check_new_run_id`), before anything is written. See `Trainer.train` for how a run ends."""
    check_new_run_id(store, run_id)
    return train_here(prepare(task_for(config, task), config, store, run_id=run_id, cache_path=cache_path,
                              providers=providers, progress=progress, retry=retry, use_cache=use_cache))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, which the CLI turns into one) ended a run this process trained; the run
    is recorded as stopped, resumable. `run_id` names it, so the message can say what to resume;
    `abandoned_calls` is True when a second interrupt stopped the wait for calls still out (their
    threads may still be waiting for a reply: the process need not wait for them to exit)."""

    def __init__(self, run_id: str, how: str, abandoned_calls: bool = False):
        super().__init__(f"run {run_id} interrupted by {how}")
        self.run_id, self.how, self.abandoned_calls = run_id, how, abandoned_calls


def train_here(trainer: Trainer) -> str:
    """`trainer.train()` in this process. A KeyboardInterrupt (Ctrl-C; the CLI's SIGTERM) stops the
    run as a stop request would, not as a failure (`Trainer.train` records it as stopped, with
    where a resume goes on: calls still queued are dropped, those in flight finish and are
    recorded); `Interrupted` is then raised with its id."""
    try:
        return trainer.train()
    except KeyboardInterrupt as exc:
        try:
            trainer.store.run(trainer.run_id)
        except StoreError:  # interrupted before the run was written: nothing to resume
            raise exc from None
        raise Interrupted(trainer.run_id, str(exc.args[0]) if exc.args else "Ctrl-C",
                          abandoned_calls=getattr(trainer, "abandoned_calls", False)) from exc


def create(store: Store, config: RunConfig, *, task: Task | None = None, run_id: str | None = None,
           cache_path: Path | None = None, providers: dict[str, Provider] | None = None) -> str:
    """Check the task (data, names, a forward() connected to its parameters), models and keys,
    and write the run to the store without starting it. Raises ConfigError (a `run_id` that
    cannot name a new run among them: `check_new_run_id`) or DataError."""
    check_new_run_id(store, run_id)
    task = task_for(config, task)
    check_connected(task)
    return prepare(task, config, store, run_id=run_id, cache_path=cache_path, providers=providers).register()


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


def launch(store: Store, config: RunConfig, cache_path: Path | None = None) -> str:
    """Validate and register a run (see `create`), then start it: on a PostgreSQL store it is
    queued for a worker (see autodiff.workers), on SQLite it trains in a background process."""
    from autodiff import workers

    if workers.shared(store):
        workers.check_queue(store)  # unusable queue tables are refused before the run is registered
    run_id = create(store, config, cache_path=cache_path)
    start(store, run_id, cache_path)
    return run_id


def start(store: Store, run_id: str, cache_path: Path | None = None) -> None:
    """Train a registered run away from the caller: queued for the workers of a PostgreSQL
    store, or in a background process on this machine for a SQLite store."""
    from autodiff import workers

    if workers.shared(store):
        workers.queue_run(store, run_id)
    else:
        start_background(store.path, run_id, cache_path)


def resume_background(store: Store, run_id: str, cache_path: Path | None = None, *, budget_usd: float | None = None,
                      budget_tokens: int | None = None, **options: Any) -> None:
    """Resume a stopped or failed run away from the caller (see `start`); it shows as created
    (or queued) until it starts. New budgets, if given, replace the run's (see `set_budget`);
    `options` (those of `RESUME_OPTIONS`) replace the run's (see `change_options`)."""
    mark_dead_runs(store)  # a run whose process on this machine is gone says stopped, and is resumed
    run = store.run(run_id)
    status = run.status
    if status == "running":  # by a process that may be alive (a dead one's run was just marked stopped)
        _refuse_if_queued(store, run_id)  # a worker's run: the queue's rule, with its own words
        raise ConfigError(holders.refusal(run, holders.liveness(run, store.backend), store))
    if status in ("completed", "queued"):
        raise ConfigError(f"run {run_id} is {status}; only a stopped or failed run can be resumed")
    holders.check(store, run)  # a process an interrupt just stopped it in may not have ended yet
    budgets = {k: v for k, v in (("budget_usd", budget_usd), ("budget_tokens", budget_tokens)) if v is not None}
    config = make_config(**run.config)
    config = set_budget(store, run_id, config, **budgets)
    change_options(store, run_id, config, **options)
    store.clear_stop(run_id)  # a stop asked for before the run got going would end it again at once
    store.set_run_status(run_id, "created")
    start(store, run_id, cache_path)


pid_alive = holders.pid_alive  # where it was; autodiff.holders decides who holds a run


def mark_dead_runs(store: Store, runs: Sequence[Run] | None = None) -> list[str]:
    """Runs that say `running` but whose process on this machine is gone (killed, machine
    restarted) become `stopped`, with a note, so they can be resumed instead of looking alive
    forever. Runs of other hosts are left alone (their pids mean nothing here), and so, on a
    PostgreSQL store, are runs whose worker's job is open: the workers hand those back (see
    autodiff.workers). `runs`: the store's runs if the caller has just read them. Returns the
    ids of the runs stopped."""
    from autodiff import workers

    dead = []
    for run in store.runs() if runs is None else runs:
        if run.status != "running" or holders.liveness(run, store.backend) != "dead":
            continue
        if workers.shared(store) and workers.open_job(store, run.id) is not None:
            continue
        store.set_run_status(run.id, "stopped", error=f"process {run.pid} on {run.host or 'this machine'} ended "
                                                      "without finishing; resume to continue")
        dead.append(run.id)
    return dead


def stop(store: Store, run_id: str) -> str:
    """Ask run `run_id` to stop, wherever it trains (this machine, another, a worker): its trainer
    reads the flag at its next step boundary (see `recovery.stop_effect`); a run waiting on the
    queue stops when a worker takes it, or at once when resumed here; one whose process on this
    machine is gone is marked stopped at once (see `mark_dead_runs`). The dashboard's Stop sets
    the same flag. Returns what will happen, in a sentence. Raises ConfigError for a run that is not
    active (completed, stopped, failed), StoreError for an unknown run."""
    run = store.run(run_id)
    if run.status not in ("created", "queued", "running"):
        raise ConfigError(f"run {run_id} is {run.status}: there is nothing to stop")
    store.request_stop(run_id)
    if run.status == "running" and run_id in mark_dead_runs(store):
        return (f"run {run_id} had no process left to stop: {run.pid} on this machine is gone. It is marked "
                f"stopped; resume it with {resume_command(run_id, store)}")
    if run.status == "running":
        who = holders.holder(run)
        return (f"stop requested: run {run_id} stops after the work in progress, at its next step boundary "
                f"({who.describe() if who else 'its process'} holds it); what it finished is kept")
    if run.status == "queued":
        return (f"stop requested: run {run_id} waits on the queue; the worker that takes it stops it at once "
                f"(or resume it here: {resume_command(run_id, store)})")
    return f"stop requested: run {run_id} has not started training; it stops as soon as it starts"


def resume(store: Store, run_id: str, *, task: Task | None = None, clear_stop: bool = True,
           accept_task_changes: bool = False, budget_usd: float | None = None, budget_tokens: int | None = None,
           from_queue: bool = False, force: bool = False, options: dict[str, Any] | None = None, **extra) -> str:
    """Train a stored run on from its last completed step, in this process. A person resuming
    overrides an earlier stop request (`clear_stop`); a background process started for the run
    keeps one made while it was starting. The task (given, or loaded by the stored name) must
    match the stored run (see `task_changes`) unless `accept_task_changes`, which is recorded
    in the run's history. A task that cannot be loaded marks the run failed with the reason.
    `budget_usd` / `budget_tokens` replace the run's budgets (for the whole run, what it spent
    before included), recorded as a "budget_changed" event. `options` (those of `RESUME_OPTIONS`:
    time-outs, retry budget, error share) replace the run's, recorded as an "options_changed"
    event and told to `progress` (extra) as an "options_changed" event with the `changes`. On a PostgreSQL store, a run that
    waits on the queue or that a worker holds is refused unless this is that worker
    (`from_queue`): one run is never trained by two processes at once. Likewise a run another
    process trains (a shell, Python, the dashboard's background process) is refused while that
    process may be alive; `force` takes over from one on another host that cannot be checked
    (see autodiff.holders). Raises ConfigError for a completed, queued or held run, a task that
    cannot be loaded, a changed task, or a bad budget."""
    run = store.run(run_id)
    if not from_queue:
        _refuse_if_queued(store, run_id)
    holders.check(store, run, force=force)  # before anything is written; `take` checks again, atomically
    if clear_stop:
        store.clear_stop(run_id)
    if run.status == "completed":
        raise ConfigError(f"run {run_id} is already completed; nothing to resume")
    try:
        config = make_config(**run.config)
        budgets = {k: v for k, v in (("budget_usd", budget_usd), ("budget_tokens", budget_tokens)) if v is not None}
        config = set_budget(store, run_id, config, **budgets)
        config, changed = change_options(store, run_id, config, **(options or {}))
        try:
            task = task_for(config, task)
        except AutodiffError as exc:
            message = f"cannot load the run's task {config.task!r}: {exc}"
            if run.config.get("task_in_memory"):
                message += "; the run was trained from Python: resume it with autodiff.resume(run_id, task)"
            store.set_run_status(run_id, "failed", error=message)
            raise ConfigError(message) from exc
        changes = task_changes(store, run_id, task, config)
        if changes and not accept_task_changes:
            raise ConfigError(
                f"the task of run {run_id} changed since it was stored: {'; '.join(changes)}. Restore the task, "
                "or resume with --accept-task-changes (autodiff.resume(..., accept_task_changes=True)) to go on "
                "with the changed task")
    except AutodiffError as exc:
        if run.status in ("created", "queued"):  # a background start or a worker: nobody sees this output
            store.set_run_status(run_id, "failed", error=str(exc))
        raise
    if changes:
        store.add_run_event(run_id, "task_changes_accepted", "; ".join(changes))
        adopt_task(store, run_id, task, config)
    trainer = prepare(task, config, store, run_id=run_id, **extra)
    moved = endpoint_changes(store, run_id, trainer)
    if moved and not accept_task_changes:
        raise ConfigError(
            f"run {run_id} would go on against another server: {'; '.join(moved)}. Point the provider back "
            "(e.g. OPENAI_BASE_URL), or resume with --accept-task-changes to mix the two servers' replies")
    if moved:
        store.add_run_event(run_id, "endpoint_changes_accepted", "; ".join(moved))
    holders.take(store, run_id, force=force)  # the trainer takes it too; `force` is honoured here
    if changed:
        trainer.progress("options_changed", {"changes": changed})
    return train_here(trainer)


def _refuse_if_queued(store: Store, run_id: str) -> None:
    """On a PostgreSQL store, refuse a run that a worker holds, or that waits on the queue
    (unless a stop was asked for it: then it is taken off the queue, to be resumed here)."""
    from autodiff import workers

    if not workers.shared(store) or (job := workers.open_job(store, run_id)) is None:
        return
    if job[1] == "todo" and store.stop_requested(run_id) and workers.take_off_queue(store, run_id):
        return
    if job[1] == "todo":
        raise ConfigError(f"run {run_id} waits on the queue for a worker: start one (autodiff worker), or stop the "
                          "run first (the dashboard's Stop) to resume it here")
    run = store.run(run_id)
    held = holders.holder(run)
    raise ConfigError(f"a worker holds run {run_id} (it is {run.status}"
                      + (f": {held.describe()}" if held else "") + f"): stop it first (the dashboard's Stop, or "
                      f"autodiff stop {run_id}) to resume it here. If that worker is gone, a running worker hands the "
                      "run to the queue again after its --stalled-after time")


def endpoint_changes(store: Store, run_id: str, trainer: Trainer) -> list[str]:
    """Roles whose model would now be asked at another HTTP endpoint than the run's calls
    went to (a resume against another server would mix two servers' replies)."""
    used: dict[str, str] = {}
    for call in store.call_summaries(run_id):  # in time order: the last endpoint of each model wins
        if call.endpoint:
            used[call.model] = call.endpoint
    moved: list[str] = []
    for role in ("forward", "backward", "optimizer"):
        llm = getattr(trainer.roles, role)
        before, now = used.get(llm.spec), llm.endpoint
        if before and now and before.startswith("http") and normalise_endpoint(before) != normalise_endpoint(now):
            note = f"{llm.spec} at {now} (its calls went to {before})"
            if note not in moved:
                moved.append(note)
    return moved


def adopt_task(store: Store, run_id: str, task: Task, config: RunConfig) -> None:
    """Make a stored run follow its changed task: parameters it gained are registered, with
    their values as of the last completed step, and splits whose samples changed are replaced
    (the trainer scores the current values on a changed validation split before going on).
    Parameters the run already had keep their stored values: the run goes on from where it was."""
    last = store.last_completed_step(run_id) or 0
    known = {p.name for p in store.parameters(run_id)}
    params = task.pipeline.parameters()
    store.add_parameters(run_id, [p.spec(i) for i, p in enumerate(params)])
    for p in params:
        if p.name not in known:
            store.add_parameter_version(run_id, p.name, last, p.value, None)
    limits = {"val": config.val_limit, "test": config.test_limit}
    for split in ("train", "val", "test"):
        ids = [s["id"] for s in task.splits[split]][: limits.get(split)]
        if ids != store.sample_ids(run_id, split):
            store.replace_samples(run_id, split, ids)


def refuse_unraised_budget(run: Run, config: RunConfig) -> None:
    """Raise ConfigError when `run` stopped at a budget that `config` (what it would resume with)
    does not raise: it would stop again at once, having done nothing. The budget is the one the
    stop names (`recovery.budget_option`)."""
    from autodiff.llm.pricing import format_usd_exact

    flag = budget_option(run)
    if flag is None:
        return
    option = flag[2:].replace("-", "_")
    old, new = run.config.get(option), getattr(config, option)
    # What the call it stopped at would have brought the run to: less stops at that call again.
    reached = re.search(r"could bring the run to \$?([\d,.]+)", run.error or "")
    need = float(reached.group(1).replace(",", "")) if reached else None
    if old is None or new is None or (new > old and (need is None or new >= need)):
        return

    def shown(budget: float) -> str:
        return format_usd_exact(budget) if option == "budget_usd" else f"{budget:,.0f} tokens"

    given = "the same budget" if new == old else f"a budget of {shown(new)}"
    least = (f"at least {shown(need)}, what the call it stopped at needed" if need is not None and need > old
             else f"more than {shown(old)}")
    raise ConfigError(f"run {run.id} stopped at its budget of {shown(old)}; resumed with {given} it would stop again "
                      f"at the same call: give a larger {flag} ({least}; more leaves room for the rest of "
                      "the run)")


def set_budget(store: Store, run_id: str, config: RunConfig, **budgets: float | int) -> RunConfig:
    """Store new budgets (`budget_usd`, `budget_tokens`) in a run's config and note the change
    in its history; returns the new config. Raises ConfigError for an invalid budget, for one
    below what the run has already spent (a budget is for the whole run: it would stop at once),
    naming the spent figure, and for a run stopped at its budget that this does not raise
    (`refuse_unraised_budget`; with no budgets given, that check alone, and `config` is returned)."""
    from autodiff.llm.pricing import format_usd_exact

    if not budgets:
        refuse_unraised_budget(store.run(run_id), config)
        return config
    new = make_config(**(config.model_dump() | budgets))
    spent = store.call_totals(run_id)
    spent_usd, spent_tokens = sum(c["cost_usd"] for c in spent), sum(c["tokens"] for c in spent)
    if "budget_usd" in budgets and new.budget_usd is not None and new.budget_usd < spent_usd:
        raise ConfigError(f"a budget of {format_usd_exact(new.budget_usd)} (--budget-usd) is below what run {run_id} "
                          f"has already spent, {format_usd_exact(spent_usd)}: a budget is for the whole run, so give "
                          "more than that")
    if "budget_tokens" in budgets and new.budget_tokens is not None and new.budget_tokens < spent_tokens:
        raise ConfigError(f"a budget of {new.budget_tokens:,} tokens (--budget-tokens) is below what run {run_id} "
                          f"has already spent, {spent_tokens:,} tokens: a budget is for the whole run, so give more "
                          "than that")
    refuse_unraised_budget(store.run(run_id), new)
    _record_change(store, run_id, config, new, list(budgets), "budget_changed")
    return new


def change_options(store: Store, run_id: str, config: RunConfig, **options: Any) -> tuple[RunConfig, list[str]]:
    """Store new values of `RESUME_OPTIONS` (None: keep the run's) in a run's config and note the
    change in its history as an "options_changed" event; returns the new config and the changes
    ("retry_budget 20 -> 150"). Raises ConfigError for another option or a value out of range
    (the limits are RunConfig's, as for a new run)."""
    given = {k: v for k, v in options.items() if v is not None}
    other = [k for k in given if k not in RESUME_OPTIONS]
    if other:
        raise ConfigError(f"a resume cannot change {', '.join(other)}: only {', '.join(RESUME_OPTIONS)} (how calls "
                          "are retried and judged); start a new run to change the others")
    if not given:
        return config, []
    new = make_config(**(config.model_dump() | given))
    return new, _record_change(store, run_id, config, new, list(given), "options_changed")


def _record_change(store: Store, run_id: str, old: RunConfig, new: RunConfig, names: list[str],
                   kind: str) -> list[str]:
    """Write `new` as the run's config when any of `names` changed, with a `kind` run event
    saying what; returns the changes ("retry_budget 20.0 -> 150.0")."""
    changed = [f"{k} {getattr(old, k)} -> {getattr(new, k)}" for k in names if getattr(old, k) != getattr(new, k)]
    if changed:
        store.set_run_config(run_id, new.model_dump())
        store.add_run_event(run_id, kind, "; ".join(changed))
    return changed


def task_changes(store: Store, run_id: str, task: Task, config: RunConfig) -> list[str]:
    """How `task` differs from what run `run_id` stored: parameter names, kinds and initial
    values, and the sample ids of each split. Empty when they agree."""
    changes: list[str] = []
    stored = {p.name: p for p in store.parameters(run_id)}
    params = {p.name: p for p in task.pipeline.parameters()}
    added, removed = [n for n in params if n not in stored], [n for n in stored if n not in params]
    if added:
        changes.append(f"new parameters {added}")
    if removed:
        changes.append(f"parameters gone {removed}")
    initial = {v.name: v.value for v in store.parameter_versions(run_id) if v.version == 0}
    for name in [n for n in params if n in stored]:
        if params[name].kind != stored[name].kind:
            changes.append(f"{name}: kind {stored[name].kind} -> {params[name].kind}")
        first = params[name].history[0].value if params[name].history else params[name].value
        if name in initial and first != initial[name]:
            changes.append(f"{name}: initial value changed")
    limits = {"val": config.val_limit, "test": config.test_limit}
    for split in ("train", "val", "test"):
        ids = [s["id"] for s in task.splits.get(split, [])][: limits.get(split)]
        if ids != store.sample_ids(run_id, split):
            changes.append(f"{split} samples differ")
    return changes
