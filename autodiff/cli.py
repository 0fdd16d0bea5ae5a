"""The `autodiff` command: train, resume, runs, show, export, dashboard, sample-runs."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from autodiff.errors import AutodiffError
from autodiff.llm.models import REASONING_EFFORTS
from autodiff.runner import default_cache_path, default_store_path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_STORE = ROOT / "sample_data" / "runs" / "sample_runs.sqlite"


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="provider:model for all three roles (overridden per role below)")
    p.add_argument("--forward-model", help="provider:model that runs the pipeline")
    p.add_argument("--backward-model", help="provider:model that writes gradients")
    p.add_argument("--optimizer-model", help="provider:model that proposes new values")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--tau", type=float, help="samples scoring below this go backward")
    p.add_argument("--max-failed", type=int, help="failed samples sent backward per step")
    p.add_argument("--proposals", type=int, help="proposals per optimizer call")
    p.add_argument("--lenient-proposals", action="store_true", default=None,
                   help="weak optimizer models: take untagged replies as candidates (still validated)")
    p.add_argument("--rounds", type=int, help="optimizer calls per parameter per step while none is accepted")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--review", choices=["off", "validated", "all"])
    p.add_argument("--review-timeout", type=float, help="seconds to wait for a decision")
    p.add_argument("--review-fallback", choices=["reject", "accept"])
    p.add_argument("--min-gain", type=float)
    p.add_argument("--acceptance", choices=["gain", "paired"])
    p.add_argument("--val-limit", type=int, help="use only the first N validation samples")
    p.add_argument("--test-limit", type=int, help="use only the first N test samples")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-error-share", type=float,
                   help="share (0-1) of samples whose calls may fail in one phase of a step before nothing is "
                        "decided and the run stops, resumable (default 0.1)")
    p.add_argument("--timeout", type=float, help="seconds to wait for one reply, every role (default: no limit "
                   "for a server on this machine or a private network, 600 for a hosted API)")
    for role in ("forward", "backward", "optimizer"):
        p.add_argument(f"--{role}-timeout", type=float, help=f"seconds to wait for one {role} reply")
    p.add_argument("--retry-budget", type=float,
                   help="seconds one call keeps retrying rate limits, server errors and time-outs (default 300)")
    p.add_argument("--reasoning-effort", choices=REASONING_EFFORTS,
                   help="for reasoning models that take it (OpenAI o-series and gpt-5, Claude with thinking)")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--no-cache", dest="cache_mode", action="store_const", const="off",
                       help="ask the provider for every call of this run (replies are still written to the cache)")
    cache.add_argument("--refresh-cache", dest="cache_mode", action="store_const", const="refresh",
                       help="ask anew once: read only replies this run wrote itself")
    p.add_argument("--run-id")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="autodiff", description="Textual autodiff for LLM pipelines.")
    ap.add_argument("--store", type=Path, default=None, help="run store (SQLite); default .autodiff/runs.sqlite")
    ap.add_argument("--cache", type=Path, default=None, help="response cache; default .autodiff/cache.sqlite")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    sub = ap.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a task (built-in name, file.py:factory or module:factory)")
    train.add_argument("task")
    _add_train_options(train)
    resume = sub.add_parser("resume", help="resume a run from its last completed step")
    resume.add_argument("run_id")
    resume.add_argument("--keep-stop", action="store_true", help=argparse.SUPPRESS)  # background starts
    sub.add_parser("runs", help="list runs")
    show = sub.add_parser("show", help="one run: config, steps, proposals")
    show.add_argument("run_id")
    export = sub.add_parser("export", help="print a run as JSON")
    export.add_argument("run_id")
    dash = sub.add_parser("dashboard", help="open the dashboard on localhost")
    dash.add_argument("--port", type=int, default=8501)
    dash.add_argument("--address", default="localhost")
    dash.add_argument("--reload", action="store_true",
                      help="reload pages when their source files change (for working on the dashboard)")
    samples = sub.add_parser("sample-runs", help="regenerate the bundled sample runs with the local model")
    samples.add_argument("--only", type=int, nargs="*", help="redo only these entries of SAMPLE_RUNS (0-based)")
    for p in (resume,):
        for a in ("--store", "--cache"):
            p.add_argument(a, type=Path, default=argparse.SUPPRESS)
        p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except AutodiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: resume with `autodiff resume RUN_ID`", file=sys.stderr)
        return 130


def _store(args):
    from autodiff.store import Store

    return Store(args.store or default_store_path())


def _progress_bar(total: int, quiet: bool):
    from tqdm import tqdm

    bars: list = []  # made on the first event, so a bad input prints no empty bar

    def on(event: str, info: dict) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="step", disable=quiet, file=sys.stderr))
        bar = bars[0]
        if event == "step":
            bar.set_description(f"step {info['step']}")
        elif event == "step_done":
            bar.update(1)
            bar.set_postfix(val=f"{info['val']:.3f}", failed=info["failed"])
        elif event == "resumed":
            bar.update(info["step"])
        elif event == "pending":
            bar.write(f"proposal {info['proposal']} for {info['parameter']} is waiting for review")
        elif event == "initial":
            bar.write(f"initial validation score {info['val']:.3f}")
        elif event in ("completed", "stopped"):
            bar.close()

    return on


def cmd_train(args) -> int:
    from autodiff.runner import train

    options = {k: getattr(args, k) for k in (
        "task", "forward_model", "backward_model", "optimizer_model", "steps", "batch_size", "tau", "max_failed",
        "proposals", "lenient_proposals", "rounds", "concurrency", "review", "review_timeout", "review_fallback", "min_gain", "acceptance",
        "val_limit", "test_limit", "seed", "max_error_share", "timeout", "forward_timeout", "backward_timeout",
        "optimizer_timeout", "retry_budget", "reasoning_effort")}
    options["cache"] = args.cache_mode
    for role in ("forward_model", "backward_model", "optimizer_model"):
        options[role] = options[role] or args.model
    store = _store(args)
    steps = options["steps"] or 3
    run_id = train(store, cache_path=args.cache or default_cache_path(), run_id=args.run_id,
                   progress=_progress_bar(steps, args.quiet), **options)
    _print_summary(store, run_id)
    return _stopped_exit(store, run_id)


def _stopped_exit(store, run_id: str) -> int:
    """0 for a completed run; 3, with the reason and how to go on, for one that stopped itself."""
    run = store.run(run_id)
    if run["status"] == "completed":
        return 0
    if run["error"]:
        print(f"run {run_id} stopped: {run['error']}", file=sys.stderr)
    print(f"continue with: autodiff resume {run_id}", file=sys.stderr)
    return 3


def cmd_resume(args) -> int:
    from autodiff.runner import resume

    store = _store(args)
    run = store.run(args.run_id)
    run_id = resume(store, args.run_id, clear_stop=not args.keep_stop, cache_path=args.cache or default_cache_path(),
                    progress=_progress_bar(run["config"]["steps"], args.quiet))
    _print_summary(store, run_id)
    return _stopped_exit(store, run_id)


def _print_summary(store, run_id: str) -> None:
    from autodiff.metrics import run_summary

    s = run_summary(store, run_id)
    faults = "".join(f", {n} {what}" for n, what in ((s["errors"], "failed"), (s["cut_off"], "cut off")) if n)
    print(f"run {run_id}: {s['status']}; validation {_f(s['initial_val'])} -> best {_f(s['best_val'])}; "
          f"test {_f(s['initial_test'])} -> {_f(s['final_test'])}; {s['tokens']} tokens in {s['calls']} calls"
          f"{faults}")


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def cmd_runs(args) -> int:
    from autodiff.metrics import run_summary
    from autodiff.runner import mark_dead_runs

    store = _store(args)
    mark_dead_runs(store)
    rows = [run_summary(store, r["id"]) for r in store.runs()]
    if not rows:
        print("no runs yet: start one with `autodiff train object_counting`")
        return 0
    header = (f"{'run':42} {'task':16} {'status':10} {'steps':>5} {'val0':>6} {'best':>6} {'test':>6} {'tokens':>9}"
              f" {'errors':>6}")
    print(header)
    for s in rows:
        print(f"{s['id']:42} {s['task'][:16]:16} {s['status']:10} {s['steps_done']:>5} {_f(s['initial_val']):>6} "
              f"{_f(s['best_val']):>6} {_f(s['final_test']):>6} {s['tokens']:>9} {s['errors']:>6}")
    return 0


def cmd_show(args) -> int:
    from autodiff.metrics import (PHASES, context_window_failures, error_kinds, phase_figures, run_summary,
                                  step_figures)

    store = _store(args)
    run = store.run(args.run_id)
    print(json.dumps(run_summary(store, args.run_id), indent=2, default=str))
    print("config:", json.dumps(run["config"], indent=2))
    kinds = error_kinds(store, args.run_id)
    faults: dict[int, list[dict]] = {}  # step -> its phases' call totals that had a fault, in PHASES order
    order = {phase: i for i, phase in enumerate(PHASES)}
    for r in sorted(phase_figures(store, args.run_id), key=lambda r: (r["step"], order.get(r["phase"], len(order)))):
        if r["errors"] or r["cut_off"]:
            faults.setdefault(r["step"], []).append(r)

    def fault_text(step: int) -> str:
        """'; errors: validate 3 (rate_limit 2, timeout 1); cut off: forward 1', or '' without faults."""
        errors, cut = [], []
        for r in faults.get(step, []):
            if r["errors"]:
                by_kind = ", ".join(f"{k} {n}" for k, n in kinds.get((step, r["phase"]), {}).items())
                errors.append(f"{r['phase']} {r['errors']}" + (f" ({by_kind})" if by_kind else ""))
            if r["cut_off"]:
                cut.append(f"{r['phase']} {r['cut_off']}")
        return (f"; errors: {', '.join(errors)}" if errors else "") + (f"; cut off: {', '.join(cut)}" if cut else "")

    def score(value: float | None, errored: int) -> str:
        return _f(value) + (f" ({errored} errored)" if errored else "")

    steps = step_figures(store, args.run_id)
    for row in steps:
        print(f"step {row['step']:>3}: val {score(row['val_score'], row['samples_errored_val'])} "
              f"test {score(row['test_score'], row['samples_errored_test'])} "
              f"failed {row['failed']}/{row['batch']} tokens {row['tokens']} proposals {row['proposed']} "
              f"accepted {row['accepted']}{fault_text(row['step'])}")
    for step in sorted(set(faults) - {row["step"] for row in steps}):  # e.g. preflight before step 0 began
        print(f"{'outside a step' if step < 0 else f'step {step:>3} (no step record)'}: {fault_text(step)[2:]}")
    for p in store.proposals(args.run_id):
        print(f"  [{p['step']}] {p['parameter']}: {p['fate']} ({p['reason']})")
    if overflows := context_window_failures(store, args.run_id):
        print("calls that failed because the prompt did not fit the model's context window:")
        for c in overflows:
            sample = f" sample {c['sample_id']}" if c["sample_id"] else ""
            print(f"  step {'-' if c['step'] is None else c['step']} {c['phase']} node {c['node'] or '-'}"
                  f"{sample}: {c['error']}")
    if run["error"]:
        print(f"run {run['status']}: {run['error']}")
    return 0


def cmd_export(args) -> int:
    from autodiff.export import export_run

    print(json.dumps(export_run(_store(args), args.run_id), indent=2, ensure_ascii=False))
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
            "--server.fileWatcherType", "poll" if reload else "none"]  # see .streamlit/config.toml


def cmd_dashboard(args) -> int:
    store_path = (args.store or default_store_path()).resolve()
    seed_store(store_path)
    env = dict(os.environ, AUTODIFF_STORE=str(store_path),
               AUTODIFF_CACHE=str((args.cache or default_cache_path()).resolve()))
    cmd = dashboard_command(args.address, args.port, reload=args.reload)
    print(f"dashboard on http://{args.address}:{args.port}  (store {store_path})")
    return subprocess.call(cmd, env=env, cwd=ROOT)


def cmd_sample_runs(args) -> int:
    from autodiff.samples import regenerate

    regenerate(SAMPLE_STORE, quiet=args.quiet, only=args.only)
    return 0


COMMANDS = {
    "train": cmd_train, "resume": cmd_resume, "runs": cmd_runs, "show": cmd_show, "export": cmd_export,
    "dashboard": cmd_dashboard, "sample-runs": cmd_sample_runs,
}

if __name__ == "__main__":
    sys.exit(main())
