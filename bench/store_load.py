"""Benchmark: one run store under a team's load, on SQLite and on PostgreSQL.

    .venv/bin/python bench/store_load.py [--seconds 60] [--writers 8] [--readers 4]
        [--calls 5000] [--gradients 2500] [--postgres URL] [--backends sqlite,postgresql]

On each backend, `--writers` trainer processes each write one realistic run through the Store
API while `--readers` processes load the dashboard's page queries in a loop, for `--seconds`.

A writer is bench/dashboard_load.py's `Writer` (the trainer's write pattern: an 8-node pipeline,
12 samples a batch of which 10 fail, traces, gradients, LLM calls with 1-2 KB prompts, proposals,
validation and test evaluations), paced as a 50-step run on a fast provider: its 50 steps spread
evenly over `--seconds` (a step every 1.2 s at the default 60 s), `--calls` LLM calls and
`--gradients` gradients over the run. A writer that falls behind its pace writes as fast as it
can and stops at the deadline.

A reader picks a random run and loads what the pages read: the Runs page's summary of every run
(`runs_summary`: `Store.runs` + `metrics.run_summary` each), Curves (`metrics.step_figures`),
Gradients (a filtered page of 50 and the facets), Proposals (proposals and their costs), Prompts
(parameter versions), Graph (one step's traces).

Printed per backend: rows written per second (all writers, every row of every insert that
committed), each page query's p50 and p95 in ms and how often it ran, errors by kind (a lock
time-out, a serialization failure or deadlock that reached the caller, anything else) and rows
lost: rows a writer saw committed that are not in the store at the end (expected 0).

The PostgreSQL server is `--postgres URL` (a database the benchmark may fill), else one started
on loopback with scripts/postgres.sh and stopped at the end. The machine's load average is
printed: other processes competing for the CPUs slow every figure.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

STEPS = 50
TABLES = ("runs", "samples", "parameters", "parameter_versions", "steps", "invocations", "gradients", "llm_calls",
          "proposals", "evaluations")


class Deadline(Exception):
    """The benchmark's time is up: the writer stops where it is."""


def error_kind(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if "locked" in text or "busy" in text:
        return "lock"
    if "SerializationFailure" in text or "DeadlockDetected" in text or "could not serialize" in text:
        return "serialization"
    return "other: " + text.splitlines()[0][:120]


class CountingStore:
    """The Store, counting the rows of each write that returned (so committed) and the keys it
    wrote, per table: what must be in the store at the end."""

    def __init__(self, store: Any):
        self._store = store
        self.rows = 0
        self.keys: dict[str, set] = defaultdict(set)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def _wrote(self, table: str, keys: list) -> None:
        self.rows += len(keys)
        self.keys[table].update(keys)

    def create_run(self, run_id, task, config, splits):
        self._store.create_run(run_id, task, config, splits)
        self._wrote("runs", [run_id])
        self._wrote("samples", [(s, i) for s, ids in splits.items() for i in range(len(ids))])

    def add_parameters(self, run_id, parameters):
        parameters = list(parameters)
        self._store.add_parameters(run_id, parameters)
        self._wrote("parameters", [p.name for p in parameters])

    def add_parameter_version(self, run_id, name, step, value, proposal_id):
        version = self._store.add_parameter_version(run_id, name, step, value, proposal_id)
        self._wrote("parameter_versions", [(name, version)])
        return version

    def start_step(self, run_id, step, batch):
        self._store.start_step(run_id, step, batch)
        self._wrote("steps", [step])

    def add_traces(self, run_id, step, traces):
        traces = list(traces)
        self._store.add_traces(run_id, step, traces)
        self._wrote("invocations", [i.id for t in traces for i in t.invocations])

    def add_gradients(self, run_id, step, gradients):
        gradients = list(gradients)
        self._store.add_gradients(run_id, step, gradients)
        self._wrote("gradients", [g.id for g in gradients])

    def add_calls(self, calls):
        calls = list(calls)
        self._store.add_calls(calls)
        self._wrote("llm_calls", [c.id for c in calls])

    def add_proposal(self, run_id, p):
        self._store.add_proposal(run_id, p)
        self._wrote("proposals", [p.id])

    def add_evaluations(self, run_id, step, split, subject, evals):
        evals = list(evals)
        self._store.add_evaluations(run_id, step, split, subject, evals)
        self._wrote("evaluations", [(step, split, subject, e.sample_id) for e in evals])

    def update_proposal(self, proposal_id, **fields):
        self._store.update_proposal(proposal_id, **fields)
        self.rows += 1


def writer(spec: str, index: int, start: float, seconds: float, calls: int, gradients: int, out: Any) -> None:
    from autodiff.store import Store
    from dashboard_load import Writer

    step_s = seconds / STEPS
    deadline = start + seconds
    errors: Counter = Counter()
    store = CountingStore(Store(spec))

    class Paced(Writer):
        def train_step(self, step: int, calls_in_step: int, val_score: float) -> float:
            if time.time() >= deadline:
                raise Deadline
            wait = start + step * step_s - time.time()
            if wait > 0:
                time.sleep(wait)
            return super().train_step(step, calls_in_step, val_score)

    run_id = f"load-{index}"
    while time.time() < start:
        time.sleep(0.01)
    try:
        Paced(store, run_id, steps=STEPS, gradients=gradients, calls=calls, seed=index).write()
    except Deadline:
        pass
    except Exception as exc:  # noqa: BLE001 - counted and printed, the benchmark goes on
        errors[error_kind(exc)] += 1
        traceback.print_exc()
    out.put({"run_id": run_id, "rows": store.rows, "keys": {t: len(k) for t, k in store.keys.items()},
             "errors": dict(errors), "ended": time.time()})
    store.close()


def reader(spec: str, index: int, start: float, seconds: float, out: Any) -> None:
    from autodiff import metrics
    from autodiff.store import Store

    store = Store(spec)
    rng = random.Random(index)
    times: dict[str, list[float]] = defaultdict(list)
    errors: Counter = Counter()

    def timed(name: str, fn: Any) -> Any:
        began = time.perf_counter()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - counted and printed, the benchmark goes on
            errors[error_kind(exc)] += 1
            if errors[error_kind(exc)] == 1:
                traceback.print_exc()
            return None
        finally:
            times[name].append((time.perf_counter() - began) * 1000)

    while time.time() < start:
        time.sleep(0.01)
    while time.time() < start + seconds:
        runs = timed("runs_summary", lambda: [metrics.run_summary(store, r.id) and r for r in store.runs()])
        if not runs:
            time.sleep(0.05)
            continue
        run_id = rng.choice(runs).id
        timed("curves", lambda: metrics.step_figures(store, run_id))
        timed("gradients", lambda: (store.find_gradients(run_id, limit=50, offset=0), store.gradient_facets(run_id)))
        timed("proposals", lambda: (store.proposals(run_id), store.proposal_costs(run_id)))
        timed("prompts", lambda: store.parameter_versions(run_id))
        last = store.last_completed_step(run_id)
        timed("graph", lambda: store.invocations(run_id, step=last or 0))
    out.put({"times": dict(times), "errors": dict(errors)})
    store.close()


def count_rows(spec: str, run_ids: list[str]) -> dict[str, dict[str, int]]:
    from autodiff.store import Store

    store = Store(spec)
    found: dict[str, dict[str, int]] = {}
    with store.connect() as conn:
        for run_id in run_ids:
            found[run_id] = {t: conn.execute(f"SELECT COUNT(*) FROM {t} WHERE {'id' if t == 'runs' else 'run_id'} = ?",
                                             (run_id,)).fetchone()[0] for t in TABLES}
    store.close()
    return found


def bench(name: str, spec: str, args: argparse.Namespace) -> None:
    from autodiff.store import Store

    Store(spec).close()  # the schema in place before the clock starts
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start = time.time() + 8.0  # every process imported and connected before the clock starts
    procs = [ctx.Process(target=writer, args=(spec, i, start, args.seconds, args.calls, args.gradients, out))
             for i in range(args.writers)]
    procs += [ctx.Process(target=reader, args=(spec, i, start, args.seconds, out)) for i in range(args.readers)]
    for p in procs:
        p.start()
    results = [out.get(timeout=args.seconds + 600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    writers = [r for r in results if "rows" in r]
    readers = [r for r in results if "times" in r]
    elapsed = max(r["ended"] for r in writers) - start
    rows = sum(r["rows"] for r in writers)
    found = count_rows(spec, [r["run_id"] for r in writers])
    lost = sum(max(0, n - found[r["run_id"]].get(t, 0)) for r in writers for t, n in r["keys"].items())
    errors: Counter = Counter()
    for r in results:
        errors.update(r["errors"])
    times: dict[str, list[float]] = defaultdict(list)
    for r in readers:
        for q, ts in r["times"].items():
            times[q] += ts
    print(f"\n{name}: {args.writers} writers, {args.readers} readers, {args.seconds:.0f} s "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(f"  rows written: {rows} in {elapsed:.1f} s = {rows / elapsed:,.0f} rows/s; "
          f"steps completed per writer: {sorted(found[r['run_id']]['steps'] for r in writers)} of {STEPS + 1}")
    for q, ts in times.items():
        qs = statistics.quantiles(ts, n=20) if len(ts) > 1 else ts * 19
        print(f"  {q:<13} p50 {statistics.median(ts):8.1f} ms   p95 {qs[18]:8.1f} ms   ({len(ts)} loads)")
    print(f"  errors: {dict(errors) or 'none'}")
    print(f"  rows lost: {lost}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--calls", type=int, default=5000, help="LLM calls per run (default 5000: 100 a step)")
    ap.add_argument("--gradients", type=int, default=2500, help="gradients per run (default 2500: 50 a step)")
    ap.add_argument("--postgres", help="a PostgreSQL URL to use (default: start one on loopback)")
    ap.add_argument("--backends", default="sqlite,postgresql")
    args = ap.parse_args()
    backends = args.backends.split(",")
    with tempfile.TemporaryDirectory(prefix="autodiff-store-load-") as tmp:
        if "sqlite" in backends:
            bench("sqlite", str(Path(tmp) / "runs.sqlite"), args)
        if "postgresql" in backends:
            url, folder = args.postgres, None
            if not url:
                folder = tempfile.mkdtemp(prefix="autodiff-store-load-pg-")  # the server's user must reach it
                url = subprocess.run(["bash", str(ROOT / "scripts" / "postgres.sh"), "start", folder], check=True,
                                     capture_output=True, text=True).stdout.strip()
            try:
                bench("postgresql", url, args)
            finally:
                if folder:
                    subprocess.run(["bash", str(ROOT / "scripts" / "postgres.sh"), "stop", folder], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
