"""The `autodiff` command: train, estimate, resume, stop, runs, show, export, prompts, dashboard, worker,
store copy, sample-runs."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import types
import typing
from pathlib import Path

from autodiff.config import RESUME_OPTIONS
from autodiff.errors import AutodiffError
from autodiff.exposure import exposure_warning
from autodiff.records import Run
from autodiff.recovery import budget_option, resume_command, resume_option, store_option
from autodiff.runner import default_cache_path
from autodiff.store.spec import is_url, mask_secrets, resolve_spec
from autodiff.samples import SAMPLE_STORE  # the bundled sample runs: a new store starts as a copy

ROOT = Path(__file__).resolve().parents[1]


STORE_HELP = ("run store: a SQLite file or a postgresql://user@host/db URL (password in the URL, PGPASSWORD or "
              "~/.pgpass); default AUTODIFF_STORE, else .autodiff/runs.sqlite")

# Run options with a CLI form of their own (or none): every other RunConfig field becomes --field-name.
_SPECIAL_OPTIONS = ("task", "task_args", "task_in_memory", "cache", "prices")
_ALIASES = {"max_error_share": ("--max-errors",)}


def _add_config_option(p: argparse.ArgumentParser, name: str) -> None:
    """The option of RunConfig field `name`: --field-name, its help the field's description (its
    limits are checked by RunConfig, as for every way a run is made)."""
    from autodiff.config import RunConfig

    field = RunConfig.model_fields[name]
    flags = ["--" + name.replace("_", "-"), *_ALIASES.get(name, ())]
    kind = field.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None: the option takes X
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    if kind is bool:
        p.add_argument(*flags, dest=name, action="store_true", default=None, help=field.description)
    elif typing.get_origin(kind) is typing.Literal:
        p.add_argument(*flags, dest=name, choices=typing.get_args(kind), help=field.description)
    else:
        p.add_argument(*flags, dest=name, type=kind, help=field.description)


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """`train`'s options, made from RunConfig's fields (their help is the field's description)."""
    from autodiff.config import RunConfig

    p.add_argument("--model", help="provider:model for every role not given below")
    for name in RunConfig.model_fields:
        if name not in _SPECIAL_OPTIONS:
            _add_config_option(p, name)
    p.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument of a task factory (repeatable)")
    p.add_argument("--price", action="append", default=[], metavar="PROVIDER:MODEL=USD[/USD]",
                   help="your price in USD per million tokens for a model, input/output or one for both (a rented "
                        "GPU server, a model the price table lacks; repeatable). Local models cost 0 otherwise")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--no-cache", dest="cache_mode", action="store_const", const="off",
                       help="ask the provider for every call of this run (replies are still written to the cache)")
    cache.add_argument("--refresh-cache", dest="cache_mode", action="store_const", const="refresh",
                       help="ask anew once: read only replies this run wrote itself")
    p.add_argument("--run-id")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="autodiff", description="Textual autodiff for LLM pipelines.")
    ap.add_argument("--store", default=None, help=STORE_HELP)
    ap.add_argument("--cache", type=Path, default=None, help="response cache; default .autodiff/cache.sqlite")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    sub = ap.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a task (built-in name, file.py:factory or module:factory)")
    train.add_argument("task")
    _add_train_options(train)
    train.add_argument("--queue", action="store_true",
                       help="register the run and queue it for a worker (`autodiff worker`) instead of training it "
                            "here; needs a PostgreSQL store")
    resume = sub.add_parser("resume", help="resume a run from its last completed step")
    resume.add_argument("run_id")
    resume.add_argument("--keep-stop", action="store_true", help=argparse.SUPPRESS)  # background starts
    resume.add_argument("--accept-task-changes", action="store_true",
                        help="go on although the task's parameters or samples changed (recorded in the run)")
    resume.add_argument("--budget-usd", type=float, help="a new budget in US dollars for the whole run (what it "
                                                         "spent before included; recorded in the run)")
    resume.add_argument("--budget-tokens", type=int, help="a new budget in tokens for the whole run (recorded in "
                                                          "the run)")
    for name in RESUME_OPTIONS:  # how calls are retried and judged: stored in the run, said when changed
        _add_config_option(resume, name)
    resume.add_argument("--force", action="store_true",
                        help="take the run over from a process on another machine that still says it trains it, "
                             "when that process is really gone (killed, its machine down); recorded in the run")
    stop = sub.add_parser("stop", help="ask a run to stop at its next step boundary, wherever it trains (this "
                                       "machine, another, a worker; the dashboard's Stop)")
    stop.add_argument("run_id")
    estimate = sub.add_parser("estimate", help="expected calls, tokens and cost per phase of a run, without "
                                               "calling any model")
    estimate.add_argument("task")
    _add_train_options(estimate)
    estimate.add_argument("--failed-share", type=float, default=0.5,
                          help="assumed share of each mini-batch that fails and goes backward (default 0.5)")
    estimate.add_argument("--reply-share", type=float, default=0.25,
                          help="assumed share of their token budget that forward and backward replies use "
                               "(default 0.25)")
    estimate.add_argument("--to-validation", type=float, default=0.5,
                          help="assumed share of proposals that pass the mini-batch and are scored on all of "
                               "validation (default 0.5)")
    estimate.add_argument("--json", action="store_true", help="print the estimate as JSON")
    sub.add_parser("runs", help="list runs")
    show = sub.add_parser("show", help="one run: config, steps, proposals")
    show.add_argument("run_id")
    export = sub.add_parser("export", help="print a run as JSON")
    export.add_argument("run_id")
    prompts = sub.add_parser("prompts", help="print a run's parameter values at one step (default: the best)")
    prompts.add_argument("run_id")
    which = prompts.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="this completed step")
    which.add_argument("--best", dest="step", action="store_const", const="best",
                       help="the completed step with the highest validation score (the default)")
    which.add_argument("--last", dest="step", action="store_const", const="last", help="the last completed step")
    prompts.add_argument("--format", choices=["json", "md"], default="json",
                         help="json: a state file for pipeline.load(path); md: a heading and fenced block each")
    dash = sub.add_parser("dashboard", help="open the dashboard on localhost")
    dash.add_argument("--port", type=int, default=8501)
    dash.add_argument("--address", default="localhost")
    dash.add_argument("--reload", action="store_true",
                      help="reload pages when their source files change (for working on the dashboard)")
    worker = sub.add_parser("worker", help="train queued runs of a PostgreSQL store until stopped (SIGTERM or "
                                           "Ctrl-C stop its runs at a step boundary and queue them again)")
    worker.add_argument("--concurrency", type=int, default=1, help="runs trained at once (default 1)")
    worker.add_argument("--name", help="how the worker is named in runs' history and logs (default host:pid)")
    worker.add_argument("--heartbeat", type=float, default=10.0,
                        help="seconds between the worker's signs of life in the database (default 10)")
    worker.add_argument("--stalled-after", type=float, default=60.0,
                        help="seconds without a sign of life after which a worker is taken as dead and its runs "
                             "are queued again for another worker (default 60)")
    worker.add_argument("--poll", type=float, default=5.0,
                        help="seconds between looks at the queue when no notice of a new run came (default 5)")
    stores = sub.add_parser("store", help="work on stores: copy runs between them")
    copy = stores.add_subparsers(dest="store_command", required=True).add_parser(
        "copy", help="copy runs from one store to another (a SQLite path or a postgresql:// URL each), checking "
                     "each table's row count and content hash after the copy")
    copy.add_argument("source", metavar="SRC", help="the store to copy from")
    copy.add_argument("target", metavar="DST", help="the store to copy into (created if a new SQLite path)")
    copy.add_argument("run_ids", metavar="RUN", nargs="*", help="runs to copy (default: every run of SRC)")
    copy.add_argument("--replace", action="store_true", help="overwrite runs that already exist in DST (never one "
                                                             "that is queued or running there)")
    copy.add_argument("--snapshot", action="store_true",
                      help="copy runs still training in SRC as they stand now: stored in DST as stopped, with a run "
                           "event saying so (resume there redoes the unfinished step)")
    samples = sub.add_parser("sample-runs", help="regenerate the bundled sample runs with the local model")
    samples.add_argument("--only", type=int, nargs="*", help="redo only these entries of SAMPLE_RUNS (0-based)")
    for p in (resume, worker, stop):
        p.add_argument("--store", default=argparse.SUPPRESS, help=STORE_HELP)
        p.add_argument("--cache", type=Path, default=argparse.SUPPRESS)
        p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except AutodiffError as exc:
        if str(exc).startswith("invalid run configuration"):  # `make_config`'s: options by their flags
            from autodiff.config import RunConfig

            flags = {"prices": "--price PROVIDER:MODEL=USD[/USD]"}  # options whose flag is not the field's name
            said = "; ".join((flags.get(name) or f"--{name.replace('_', '-')}" if name in RunConfig.model_fields
                              else name) + f": {text}" for name, text in exc.problems)
            print(f"error: invalid options: {said}", file=sys.stderr)
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        from autodiff.runner import Interrupted

        if isinstance(exc, Interrupted):
            store = args.opened_stores[-1]  # train and resume open one store: the run's
            command = resume_command(exc.run_id, store, cache=getattr(args, "cache", None))
            print(f"interrupted ({exc.how}): run {exc.run_id} is stopped; continue with: {command}"
                  f"{_password_note(command)}", file=sys.stderr)
            if exc.abandoned_calls:  # threads still wait for replies nobody will read: end now, not when they do
                for opened in getattr(args, "opened_stores", ()):
                    opened.close()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(130)
        else:
            print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `autodiff runs | head`: the reader left; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:  # a PostgreSQL store's pool is closed here, not left to the garbage collector's thread
        for store in getattr(args, "opened_stores", ()):
            store.close()


def _password_note(command: str) -> str:
    """For a printed command that names a store URL with its password masked: how to give it."""
    from autodiff.store.spec import MASK

    return (f" ({MASK} stands for the store's password: type it there, or leave it out of the URL and set "
            "PGPASSWORD)") if f":{MASK}@" in command else ""


def _store(args, create: bool = True):
    """The store `--store` names (else AUTODIFF_STORE, else the default), kept in `args` to be
    closed. `create` False, for commands that only read or change existing runs: a SQLite file
    that is not there is refused (StoreError naming the path), not made empty."""
    from autodiff.store import Store

    store = Store(resolve_spec(args.store), create=create)
    args.opened_stores = [*getattr(args, "opened_stores", ()), store]
    return store


def _progress_bar(total: int, quiet: bool):
    from autodiff.progress import progress_bar

    return progress_bar(total, quiet)


def _config(args):
    """The RunConfig that `train`'s (and `estimate`'s) options describe."""
    from autodiff.api import resolve_models
    from autodiff.config import RunConfig, make_config

    options = {name: getattr(args, name) for name in RunConfig.model_fields
               if name not in _SPECIAL_OPTIONS and not name.endswith("_model")}
    models = resolve_models(args.model, args.forward_model, args.backward_model, args.optimizer_model)
    if args.reasoning_effort is not None:
        from autodiff.llm.models import takes_reasoning_effort

        ignored = [spec for spec in dict.fromkeys(models.values()) if not takes_reasoning_effort(spec)]
        if ignored:  # said, not refused: a run may mix a reasoning model with others
            print(f"note: --reasoning-effort {args.reasoning_effort} is sent only to reasoning models (OpenAI's "
                  f"o-series and GPT-5, Anthropic's with extended thinking); {', '.join(ignored)} "
                  f"{'is' if len(ignored) == 1 else 'are'} asked without it", file=sys.stderr)
    return make_config(task=args.task, task_args=_task_args(args.task_arg), cache=args.cache_mode,
                       prices=_pairs(args.price, "--price", "PROVIDER:MODEL=USD[/USD]"),
                       **{f"{role}_model": spec for role, spec in models.items()}, **options)


def cmd_train(args) -> int:
    from autodiff.runner import train

    config = _config(args)
    store = _store(args)
    if args.queue:
        return _queue(args, store, config)
    with _sigterm_interrupts():
        run_id = train(store, config, cache_path=args.cache or default_cache_path(), run_id=args.run_id,
                       progress=_progress_bar(config.steps, args.quiet))
    _print_summary(store, run_id)
    return _stopped_exit(store, run_id, args.cache)


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM to a training process ends it as Ctrl-C does: the run is recorded as stopped,
    resumable (see `runner.train_here`), not left for `mark_dead_runs` to find."""
    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _queue(args, store, config) -> int:
    """`train --queue`: check and register the run here, then leave it to a worker."""
    from autodiff.runner import create
    from autodiff.workers import check_queue, queue_run

    check_queue(store)  # a SQLite store (or unusable queue tables) is refused before anything is registered
    where, _, factory = config.task.rpartition(":")
    if where.endswith(".py") and not Path(where).is_absolute():  # a worker's folder is not this shell's
        config = config.model_copy(update={"task": f"{Path(where).resolve()}:{factory}"})
    run_id = create(store, config, run_id=args.run_id, cache_path=args.cache or default_cache_path())
    queue_run(store, run_id)
    where = store_option(store)
    print(f"run {run_id} queued: a worker trains it (autodiff worker{where}); follow it with "
          f"autodiff show {run_id}{where} or in the dashboard" + _password_note(where))
    return 0


def cmd_worker(args) -> int:
    import logging

    from autodiff.workers import MaskPasswords, WorkerOptions, serve

    options = WorkerOptions(concurrency=args.concurrency, heartbeat_s=args.heartbeat, stalled_s=args.stalled_after,
                            poll_s=args.poll, cache_path=args.cache or default_cache_path(),
                            **({"name": args.name} if args.name else {}))
    store = _store(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(MaskPasswords(store))
    logging.getLogger("procrastinate").setLevel(logging.WARNING)  # its per-job lines repeat ours
    serve(store, options)
    return 0


def cmd_store(args) -> int:
    """`store copy`: copy runs, then print each run's tables with row counts and content hashes
    as read back from both stores."""
    from autodiff.store import open_store
    from autodiff.store.copy import copy_runs

    from autodiff.runner import mark_dead_runs
    from autodiff.store import Store

    source = Store(resolve_spec(args.source), create=False)  # a source that does not exist is a typo: never made
    try:
        target = open_store(args.target)
    except BaseException:
        source.close()
        raise
    try:
        for store in (source, target):
            mark_dead_runs(store)  # a run whose process on this machine is gone is copied as the stopped run it is
        copied = copy_runs(source, target, args.run_ids, replace=args.replace, snapshot=args.snapshot)
    finally:
        source.close()
        target.close()
    for run in copied:
        replaced = (f" (replaced a different run of that name there: {run.replaced_other})" if run.replaced_other
                    else " (replaced)" if run.replaced else "")
        print(f"run {run.run_id}{replaced}: {source.display} -> {target.display}")
        for t in run.tables:
            print(f"  {t.table:<19} rows {t.source_rows:>7} -> {t.copied_rows:<7} sha256 {t.source_hash[:16]} -> "
                  f"{t.copied_hash[:16]}  {'equal' if t.equal else 'DIFFERENT'}")
    print(f"{len(copied)} run{'s' if len(copied) != 1 else ''} copied; every table equal in both stores")
    return 0


def cmd_stop(args) -> int:
    from autodiff.runner import stop

    print(stop(_store(args, create=False), args.run_id))
    return 0


def _task_args(pairs: list[str]) -> dict[str, str]:
    return _pairs(pairs, "--task-arg", "KEY=VALUE")


def _pairs(pairs: list[str], option: str, form: str) -> dict[str, str]:
    from autodiff.errors import ConfigError

    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise ConfigError(f"{option} takes {form}; got {bad}")
    return dict(p.rsplit("=", 1) if option == "--price" else p.split("=", 1) for p in pairs)


def cmd_estimate(args) -> int:
    from autodiff.estimate import Assumptions, estimate, format_estimate
    from autodiff.runner import task_for

    config = _config(args)
    forecast = estimate(task_for(config), config, Assumptions(args.failed_share, args.reply_share,
                                                               args.to_validation))
    print(json.dumps(forecast.as_dict(), indent=2) if args.json else format_estimate(forecast, config))
    return 0


def _stopped_exit(store, run_id: str, cache: Path | None = None) -> int:
    """0 for a completed run; 3, with the reason and how to go on, for one that stopped itself."""
    from autodiff import holders

    run = store.run(run_id)
    if run.status == "completed":
        return 0
    if (held := holders.holder(run)) is not None and not held.is_me():
        print(f"run {run_id} was taken over by {held.describe()}: this process left it to that one", file=sys.stderr)
        return 3
    if run.error:
        print(f"run {run_id} stopped: {run.error}", file=sys.stderr)
    command = resume_command(run_id, store, cache=cache)
    if budget_option(run):  # the same budget would stop it again at once
        command += " " + _larger_budget(store, run)
    elif option := resume_option(run):  # its own retry settings stopped it: the same would again
        command += f" {option}"
    print(f"continue with: {command}{_password_note(command)}", file=sys.stderr)
    return 3


def _larger_budget(store, run: Run) -> str:
    """The option of a budget larger than the one a run stopped at: at least twice it, and at
    least the run's projected cost, rounded up."""
    from autodiff.metrics import run_summary

    summary = run_summary(store, run.id)
    if "--budget-tokens" in (run.error or ""):
        current = run.config.get("budget_tokens") or 0
        want = max(2 * current, summary["projected_tokens"] or 0, summary["tokens"] + 1)
        return f"--budget-tokens {_round_up(want, 1000):.0f}"
    current = run.config.get("budget_usd") or 0.0
    want = max(2 * current, summary["projected_usd"] or 0.0, summary["cost_usd"] * 1.01)
    step = 10 ** (math.floor(math.log10(want)) - 1) if want > 0 else 0.01
    return f"--budget-usd {_round_up(want, step):.6g}"


def _round_up(value: float, step: float) -> float:
    return math.ceil(round(value / step, 9)) * step


def cmd_resume(args) -> int:
    from autodiff.runner import resume

    store = _store(args, create=False)
    run = store.run(args.run_id)
    from autodiff.progress import announce_changes

    progress = announce_changes(_progress_bar(run.config["steps"], args.quiet))
    with _sigterm_interrupts():
        run_id = resume(store, args.run_id, clear_stop=not args.keep_stop,
                        cache_path=args.cache or default_cache_path(), accept_task_changes=args.accept_task_changes,
                        budget_usd=args.budget_usd, budget_tokens=args.budget_tokens, force=args.force,
                        options={name: getattr(args, name) for name in RESUME_OPTIONS}, progress=progress)
    _print_summary(store, run_id)
    return _stopped_exit(store, run_id, args.cache)


def _print_summary(store, run_id: str) -> None:
    from autodiff.llm.pricing import format_tokens, format_usd
    from autodiff.metrics import run_summary

    s = run_summary(store, run_id)
    faults = "".join(f", {n} {what}" for n, what in ((s["errors"], "failed"), (s["cut_off"], "cut off")) if n)
    saved = s["saved_usd"]
    print(f"run {run_id}: {s['status']}; validation {_f(s['initial_val'])} -> best {_f(s['best_val'])}; "
          f"test {_f(s['initial_test'])} -> {_f(s['final_test'])}; "
          f"{format_tokens(s['tokens'], s['tokens_unknown'])} tokens in {s['calls']} calls"
          f"{faults}; cost {format_usd(s['cost_usd'], s['cost_unknown'])}"
          + (f" (saved {format_usd(saved, s['saved_unknown'])} by the cache and selective backward)"
             if saved or s["saved_unknown"] else ""))


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def cmd_runs(args) -> int:
    from autodiff.metrics import run_summary
    from autodiff.runner import mark_dead_runs

    store = _store(args, create=False)
    mark_dead_runs(store)
    rows = [run_summary(store, r.id) for r in store.runs()]
    if not rows:
        print("no runs yet: start one with `autodiff train object_counting`")
        return 0
    from autodiff.llm.pricing import format_tokens, format_usd

    header = (f"{'run':42} {'task':16} {'status':10} {'steps':>5} {'val0':>6} {'best':>6} {'test':>6} {'tokens':>17}"
              f" {'cost':>17} {'projected':>10} {'errors':>6}")
    print(header)
    for s in rows:
        projected = format_usd(s["projected_usd"]) if s["status"] != "completed" and s["projected_usd"] is not None \
            else "-"
        print(f"{s['id']:42} {s['task'][:16]:16} {s['status']:10} {s['steps_done']:>5} {_f(s['initial_val']):>6} "
              f"{_f(s['best_val']):>6} {_f(s['final_test']):>6} {format_tokens(s['tokens'], s['tokens_unknown']):>17} "
              f"{format_usd(s['cost_usd'], s['cost_unknown']):>17} {projected:>10} {s['errors']:>6}")
    return 0


def cmd_show(args) -> int:
    from autodiff.llm.pricing import count, format_tokens, format_usd
    from autodiff.metrics import (PHASES, context_window_failures, error_kinds, phase_figures, run_summary,
                                  step_figures)

    store = _store(args, create=False)
    run = store.run(args.run_id)
    print(json.dumps(run_summary(store, args.run_id), indent=2, default=str))
    print("config:", json.dumps(run.config, indent=2))
    kinds = error_kinds(store, args.run_id)
    faults: dict[int, list[dict]] = {}  # step -> its phases' call totals that had a fault, in PHASES order
    order = {phase: i for i, phase in enumerate(PHASES)}
    for r in sorted(phase_figures(store, args.run_id), key=lambda r: (r["step"], order.get(r["phase"], len(order)))):
        if r["errors"] or r["cut_off"]:
            faults.setdefault(r["step"], []).append(r)

    def fault_text(step: int, row: dict | None = None) -> str:
        """'; errors: validate 3 (rate_limit 2, timeout 1), redone 2; cut off: forward 1', or ''
        without faults. A step's figures (`row`, from step_figures, as the export and the
        dashboard count them: its kept attempt by phase, then its redone attempts); without one
        (calls outside any stored step), the calls' own totals by phase."""
        errors, cut = [], []
        if row is not None:
            parts = [(p, row[f"errors_{p}"], row[f"cut_off_{p}"]) for p in (*PHASES, "redone")]
        else:
            parts = [(r["phase"], r["errors"], r["cut_off"]) for r in faults.get(step, [])]
        for phase, errored, cut_off in parts:
            if errored:
                by_kind = ", ".join(f"{k} {n}" for k, n in kinds.get((step, phase), {}).items())
                errors.append(f"{phase} {errored}" + (f" ({by_kind})" if by_kind else ""))
            if cut_off:
                cut.append(f"{phase} {cut_off}")
        return (f"; errors: {', '.join(errors)}" if errors else "") + (f"; cut off: {', '.join(cut)}" if cut else "")

    def score(value: float | None, errored: int) -> str:
        return _f(value) + (f" ({errored} errored)" if errored else "")

    def cost_text(row: dict) -> str:
        """'cost $0.0123 (forward $0.0010, validate $0.0113); saved $0.0040 by the cache, ...'"""
        phases = ", ".join(f"{p} {format_usd(row[f'cost_{p}'], row[f'cost_unknown_{p}'])}" for p in (*PHASES, "redone")
                           if row[f"calls_{p}"])  # redone: attempts of the step stopped part-way, made again
        saved = [f"{format_usd(usd)} {how}" for usd, how in ((row["cache_saved_usd"], "by the cache"),
                                                             (row["backward_saved_usd"], "by selective backward"))
                 if usd]
        return (f" cost {format_usd(row['cost'], row['cost_unknown'])}" + (f" ({phases})" if phases else "")
                + (f", saved {' and '.join(saved)}" if saved else ""))

    steps = step_figures(store, args.run_id)
    for row in steps:
        errored = f" ({row['errored_batch']} errored)" if row["errored_batch"] else ""
        batch = f"{row['failed']}/{row['batch']}{errored}"
        print(f"step {row['step']:>3}: val {score(row['val_score'], row['samples_errored_val'])} "
              f"test {score(row['test_score'], row['samples_errored_test'])} "
              f"failed {batch} tokens {format_tokens(row['tokens'], row['tokens_unknown'])}"
              f"{cost_text(row)} proposals "
              f"{row['proposed']} accepted {row['accepted']}{fault_text(row['step'], row)}")
    for step in sorted(set(faults) - {row["step"] for row in steps}):  # e.g. preflight before step 0 began
        print(f"{'outside a step' if step < 0 else f'step {step:>3} (no step record)'}: {fault_text(step)[2:]}")
    costs = store.proposal_costs(args.run_id)
    for p in store.proposals(args.run_id):
        c = costs.get(p.id)
        unlinked = (c["make_usd"] is None) + (c["validate_usd"] is None) if c else 0  # calls not in the store
        unpriced = c["unknown"] - unlinked if c else 0
        cost = (f"; made for {format_usd(c['make_usd'], c['make_unknown'])}, validated for "
                f"{format_usd(c['validate_usd'], c['validate_unknown'])}"
                + (f" ({count(unpriced, 'call')} unpriced)" if unpriced else "")
                + (" (its calls are not linked to it in this store)" if unlinked else "")) if c else ""
        print(f"  [{p.step}] {p.parameter}: {p.fate} ({p.reason}){cost}")
    if overflows := context_window_failures(store, args.run_id):
        print("calls that failed because the prompt did not fit the model's context window:")
        for c in overflows:
            sample = f" sample {c.sample_id}" if c.sample_id else ""
            print(f"  step {'-' if c.step is None else c.step} {c.phase} node {c.node or '-'}{sample}: {c.error}")
    if run.error:
        print(f"run {run.status}: {run.error}")
    return 0


def cmd_export(args) -> int:
    from autodiff.export import export_run

    print(json.dumps(export_run(_store(args, create=False), args.run_id), indent=2, ensure_ascii=False))
    return 0


def cmd_prompts(args) -> int:
    from autodiff import state

    step, values = state.run_state(_store(args, create=False), args.run_id, "best" if args.step is None else args.step)
    if args.format == "md":
        print(state.to_markdown(values, title=f"{args.run_id}, step {step}"), end="")
    else:
        print(state.to_json(values), end="")
    return 0


def seed_store(path: Path) -> None:
    """A new store starts as a copy of the bundled sample runs, so the dashboard has real runs to show."""
    if not path.exists() and SAMPLE_STORE.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLE_STORE, path)


def dashboard_command(address: str, port: int, reload: bool = False) -> list[str]:
    """The dashboard's server command, run from the project root: Streamlit's own command line
    through dashboard/serve.py, which loads the pages' imports while the server starts."""
    return [sys.executable, "-m", "dashboard.serve", "run", str(ROOT / "app.py"), "--server.address", address,
            "--server.port", str(port), "--browser.gatherUsageStats", "false", "--server.headless", "true",
            "--server.enableStaticServing", "true",  # the charts' plotly.js (dashboard/charts.py)
            "--server.fileWatcherType", "poll" if reload else "none",  # see .streamlit/config.toml
            "--runner.postScriptGC", "false", "--runner.magicEnabled", "false"]  # ditto: time per page run


def cmd_dashboard(args) -> int:
    from autodiff.store import Store

    spec = resolve_spec(args.store)
    if not is_url(spec):
        spec = str(Path(spec).resolve())
        seed_store(Path(spec))
    Store(spec).close()  # a store that cannot be opened (wrong password, not a store) is said here, not in the page
    env = dict(os.environ, AUTODIFF_STORE=spec,  # the environment, not argv: a password stays out of `ps`
               AUTODIFF_CACHE=str((args.cache or default_cache_path()).resolve()))
    cmd = dashboard_command(args.address, args.port, reload=args.reload)
    warning = exposure_warning(args.address, ROOT)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(f"dashboard on http://{args.address}:{args.port}  (store {mask_secrets(spec)})", flush=True)
    return run_until_signalled(cmd, env=env, cwd=ROOT)


def run_until_signalled(cmd: list[str], grace: float = 10.0, **popen) -> int:
    """Run `cmd` as a child; SIGTERM or SIGINT to this process stops the child too (terminate,
    then kill after `grace` seconds), so a stopped `autodiff dashboard` never leaves its server
    holding the port. Returns the child's exit code."""
    proc = subprocess.Popen(cmd, **popen)
    stopped_at: list[float] = []

    def stop(signum, frame) -> None:
        if not stopped_at:
            stopped_at.append(time.monotonic())
        if proc.poll() is None:
            proc.terminate()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if stopped_at and time.monotonic() - stopped_at[0] > grace:
                    proc.kill()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_sample_runs(args) -> int:
    from autodiff.samples import regenerate

    regenerate(SAMPLE_STORE, quiet=args.quiet, only=args.only)
    return 0


COMMANDS = {
    "train": cmd_train, "estimate": cmd_estimate, "resume": cmd_resume, "runs": cmd_runs, "show": cmd_show, "export": cmd_export,
    "dashboard": cmd_dashboard, "sample-runs": cmd_sample_runs, "prompts": cmd_prompts, "worker": cmd_worker,
    "store": cmd_store, "stop": cmd_stop,
}

if __name__ == "__main__":
    sys.exit(main())
