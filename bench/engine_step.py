"""Benchmark: one training step of object counting against the scripted fake LLM.

    .venv/bin/python bench/engine_step.py [--latencies 0 200] [--concurrency 16]

For each fake latency, a fresh store and cache, then `autodiff.runner.train` with steps=1,
batch 4, the full validation set (100). Step 0 (the initial evaluation) is not timed; step 1 is
timed from the trainer's own progress events (step start to step done). The fake answers so that
about half the samples fail, so backward and propose run, and proposals beat the mini-batch and
are validated on all 100 validation samples. At 0 ms the step is run several times (fresh each
time) and the median is shown, since a busy machine makes single runs noisy.

Printed per latency: LLM calls and tokens by phase, the step's wall time, and
- at 0 ms: engine time per LLM call, as wall time / calls, as (wall time - time spent inside
  the fake provider) / calls, and as process CPU time / calls. Target: < 1 ms.
- at > 0 ms: the step's wall time over the critical path of its LLM calls. Target: < 1.5x.

Critical path, from the recorded calls of the step (phase, node, sample, call index, latency):
the step is a sequence of stages that the trainer runs one after another: forward on the batch,
backward, then per parameter one optimizer call followed by the evaluations of its proposals (a
mini-batch evaluation, then possibly a validation-set evaluation). Calls inside one stage may run
concurrently. A stage costs

    max(longest dependent chain in the stage, total latency of the stage / concurrency)

where the chain is one sample's calls in sequence (forward and evaluation stages: a pipeline runs
its nodes for one sample in order; backward: per sample, the loss call, then for each node
invocation in reverse order the slowest of its per-peer calls, which run in parallel). The
critical path is the sum over stages, with the provider's own latency for each call (the fixed
fake latency; 0 for a cache hit), so engine overhead that the client's recorded latency would
include is not counted as path. Stages are recovered by ordering the calls by start time: a
new stage begins when the phase changes, when an evaluation moves between the mini-batch
(training samples) and the validation set, or when a sample repeats (the next proposal).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autodiff.config import make_config
from autodiff import runner  # noqa: E402
from autodiff.llm.client import RetryPolicy  # noqa: E402
from autodiff.llm.fake import FakeProvider  # noqa: E402
from autodiff.llm.types import Completion, Request  # noqa: E402
from autodiff.prompts import BACKWARD_SYSTEM, OPTIMIZER_SYSTEM  # noqa: E402
from autodiff.records import CallSummary  # noqa: E402
from autodiff.store import Store  # noqa: E402
from autodiff.tasks import load_task  # noqa: E402
from autodiff.tasks.object_counting import EXAMPLES, INSTRUCTION, OUTPUT_FORMAT  # noqa: E402

BETTER_INSTRUCTION = INSTRUCTION + " Count each item one at a time, adding the number written before it."
OTHER_INSTRUCTION = INSTRUCTION + " Think about the category first."
BETTER_FORMAT = OUTPUT_FORMAT + " Double-check the total before the last line."
OTHER_EXAMPLES = EXAMPLES.replace("violin", "cello")


def proposal(value: str) -> str:
    return f"<proposal><method>add</method><reasoning>From the feedback.</reasoning><value>{value}</value></proposal>"


class Responder:
    """Plays the three roles. Forward: right on a sample when a stable hash of its question is
    below a threshold: 2 of 4 buckets at first, one more with the better instruction, one more
    with the better output format."""

    def __init__(self) -> None:
        task = load_task("object_counting")
        self.gold = {s["question"]: int(s["answer"]) for split in task.splits.values() for s in split}

    def __call__(self, request: Request) -> str:
        system = request.messages[0].content if request.messages[0].role == "system" else ""
        prompt = request.messages[-1].content
        if system == BACKWARD_SYSTEM:
            return "<feedback>The count missed items written as words; count every item, one at a time.</feedback>"
        if system == OPTIMIZER_SYSTEM:
            target = re.search(r"Target parameter: `([^`]+)`", prompt)[1]
            if target.endswith("instruction"):
                return proposal(BETTER_INSTRUCTION) + proposal(OTHER_INSTRUCTION)
            if target.endswith("output_format"):
                return proposal(BETTER_FORMAT)
            return proposal(OTHER_EXAMPLES)
        question = prompt.rsplit("Question: ", 1)[-1].rsplit("\nReasoning:", 1)[0]
        gold = self.gold.get(question, 0)
        bucket = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) % 4
        threshold = 2 + ("one at a time" in prompt) + ("Double-check" in prompt)
        return f"I count the items of the category.\nAnswer: {gold if bucket < threshold else gold + 1}"


class TimedProvider:
    """The fake provider, remembering when each call was inside it."""

    name = "fake"

    def __init__(self, latency: float) -> None:
        self.inner = FakeProvider(Responder(), latency=latency)
        self.spans: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def complete(self, model: str, request: Request) -> Completion:
        started = time.perf_counter()
        try:
            return self.inner.complete(model, request)
        finally:
            with self._lock:
                self.spans.append((started, time.perf_counter()))

    def seconds_between(self, start: float, end: float) -> float:
        """Time inside the provider, summed over threads, for calls that began in [start, end]."""
        return sum(b - a for a, b in self.spans if start <= a <= end)


def stages(calls: list[CallSummary], val_ids: set[str]) -> list[tuple[str, list[CallSummary]]]:
    """Split a step's calls into the sequential stages described in the module docstring."""
    out: list[tuple[str, list[CallSummary]]] = []
    seen: set[tuple] = set()
    for call in sorted(calls, key=lambda c: c.created_at - c.latency_ms / 1000):  # by start
        if call.phase in ("forward", "backward"):
            key = call.phase
        elif call.phase == "propose":
            key = f"propose:{call.id}"  # each optimizer call waits for the one before
        else:
            key = f"{call.phase}:{'val' if call.sample_id in val_ids else 'minibatch'}"
        ident = (call.sample_id, call.node, call.call_index)
        repeat = call.phase != "backward" and ident in seen
        if not out or out[-1][0] != key or repeat:
            out.append((key, []))
            seen = set()
        out[-1][1].append(call)
        seen.add(ident)
    return out


def chain_seconds(key: str, calls: list[CallSummary]) -> float:
    by_sample: dict[str, list[CallSummary]] = defaultdict(list)
    for c in calls:
        by_sample[c.sample_id].append(c)
    if key != "backward":
        return max(sum(c.latency_ms for c in cs) for cs in by_sample.values()) / 1000
    chains = []
    for cs in by_sample.values():  # per invocation, its per-peer calls run in parallel
        groups: dict[tuple, float] = defaultdict(float)
        for c in cs:
            groups[(c.node, c.call_index)] = max(groups[(c.node, c.call_index)], c.latency_ms)
        chains.append(sum(groups.values()))
    return max(chains) / 1000


def critical_path(calls: list[CallSummary], val_ids: set[str], concurrency: int) -> tuple[float, list[str]]:
    total, lines = 0.0, []
    for key, cs in stages(calls, val_ids):
        chain = chain_seconds(key, cs)
        spread = sum(c.latency_ms for c in cs) / 1000 / concurrency
        total += max(chain, spread)
        lines.append(f"    {key.split(':')[0] if key.startswith('propose') else key:<20} {len(cs):>4} calls"
                     f"  chain {chain * 1000:7.1f} ms  total/concurrency {spread * 1000:7.1f} ms")
    return total, lines


def run_once(latency_ms: float, concurrency: int) -> dict:
    """One fresh run (store, cache, provider); returns the figures of its step 1."""
    marks: dict[str, tuple[float, float]] = {}

    def progress(event: str, info: dict) -> None:
        if event in ("step", "step_done") and info.get("step") == 1:
            marks[event] = (time.perf_counter(), time.process_time())

    with tempfile.TemporaryDirectory(prefix="autodiff-bench-") as tmp:
        store = Store(Path(tmp) / "runs.sqlite")
        provider = TimedProvider(latency_ms / 1000)
        run_id = runner.train(store, make_config(task="object_counting", forward_model="fake:forward", backward_model="fake:backward", optimizer_model="fake:optimizer", steps=1, batch_size=4, max_failed=4, positives=2, proposals=2, concurrency=concurrency, test_limit=16), cache_path=Path(tmp) / "cache.sqlite", providers={"fake": provider}, retry=RetryPolicy(attempts=2, initial_wait=0, max_wait=0), progress=progress)
        step = store.steps(run_id)[1]
        calls = [c for c in store.call_summaries(run_id) if c.phase != "test" and c.step == 1]
        figures = {
            "step": step, "calls": calls, "val_ids": set(store.sample_ids(run_id, "val")),
            "fates": [p.fate for p in store.proposals(run_id, step=1)],
            "wall": marks["step_done"][0] - marks["step"][0],
            "cpu": marks["step_done"][1] - marks["step"][1],
            "in_provider": provider.seconds_between(*(marks[e][0] for e in ("step", "step_done"))),
        }
        store.close()
    return figures


def report(latency_ms: float, concurrency: int, repeats: int, show_stages: bool) -> None:
    runs = sorted((run_once(latency_ms, concurrency) for _ in range(repeats)), key=lambda f: f["wall"])
    f = runs[len(runs) // 2]  # the median run by wall time
    calls, n = f["calls"], len(f["calls"])
    print(f"\n=== fake latency {latency_ms:g} ms, concurrency {concurrency}"
          f" (median of {repeats} runs by wall time) ===")
    print(f"  batch {len(f['step'].batch)}, failed {len(f['step'].failed_samples)}, proposals: "
          + ", ".join(f"{fate} x{f['fates'].count(fate)}" for fate in dict.fromkeys(f["fates"])))
    print(f"  {'phase':<10} {'calls':>6} {'prompt tok':>11} {'completion tok':>15}")
    for phase in ("forward", "backward", "propose", "validate"):
        cs = [c for c in calls if c.phase == phase]
        print(f"  {phase:<10} {len(cs):>6} {sum(c.prompt_tokens for c in cs):>11}"
              f" {sum(c.completion_tokens for c in cs):>15}")
    print(f"  {'total':<10} {n:>6} {sum(c.prompt_tokens for c in calls):>11}"
          f" {sum(c.completion_tokens for c in calls):>15}")
    walls = ", ".join(f"{r['wall'] * 1000:.0f}" for r in runs)
    print(f"  step wall time: {f['wall'] * 1000:.1f} ms" + (f"  (all runs: {walls} ms)" if repeats > 1 else ""))
    if latency_ms == 0:
        engine = f["wall"] - f["in_provider"]
        print(f"  engine time per LLM call: {f['wall'] / n * 1000:.3f} ms wall/calls;"
              f" {engine / n * 1000:.3f} ms (wall - time inside the fake)/calls;"
              f" {f['cpu'] / n * 1000:.3f} ms process CPU/calls   target < 1 ms")
    else:
        # Each call at its recorded start, lasting what the provider was told to take.
        nominal = [replace(c, latency_ms=nominal_ms, created_at=c.created_at - (c.latency_ms - nominal_ms) / 1000)
                   for c in calls for nominal_ms in [0.0 if c.cached else latency_ms]]
        path, lines = critical_path(nominal, f["val_ids"], concurrency)
        recorded, _ = critical_path(calls, f["val_ids"], concurrency)
        if show_stages:
            print("  stages (provider latency):")
            print("\n".join(lines))
        print(f"  critical path: {path * 1000:.1f} ms with the provider's {latency_ms:g} ms per uncached call"
              f" ({recorded * 1000:.1f} ms with the latencies the client recorded)")
        print(f"  wall / critical path: {f['wall'] / path:.2f}x   target < 1.5x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latencies", type=float, nargs="+", default=[0.0, 200.0], help="fake latency, ms")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="runs per latency; the median is shown")
    parser.add_argument("--stages", action="store_true", help="print the stages of the critical path")
    args = parser.parse_args()
    for latency in args.latencies:
        report(latency, args.concurrency, args.repeats if latency == 0 else 1, args.stages)


if __name__ == "__main__":
    main()
