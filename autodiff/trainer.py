"""The training loop: forward, selective backward, GDPO proposals, two-stage validation, accept
or revert, optional human review. Everything is written to the store as it happens, so a run can
be watched live and resumed from its last completed step."""

from __future__ import annotations

import math
import os
import random
import secrets
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from autodiff.backward import BackwardContext, backward
from autodiff.config import RunConfig
from autodiff.errors import AutodiffError, LLMFatalError, StoreError
from autodiff.llm.cache import ResponseCache
from autodiff.llm.client import LLM, RetryPolicy
from autodiff.llm.registry import make_provider, provider_of
from autodiff.llm.types import Provider
from autodiff.optimizer import HistoryEntry, Optimizer, OptimizerInput
from autodiff.parameter import Parameter
from autodiff.pipeline import Task, run_sample
from autodiff.records import Evaluation, Gradient, LLMCall, Proposal, Trace
from autodiff.store import Store

Progress = Callable[[str, dict], None]


class CallBuffer:
    """Collects LLM call records from worker threads; the trainer flushes them in batches."""

    def __init__(self, store: Store):
        self.store = store
        self._calls: list[LLMCall] = []
        self._lock = threading.Lock()

    def __call__(self, call: LLMCall) -> None:
        with self._lock:
            self._calls.append(call)

    def flush(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        self.store.add_calls(calls)


@dataclass
class Roles:
    forward: LLM
    backward: LLM
    optimizer: LLM


def make_roles(
    config: RunConfig, *, recorder, cache: ResponseCache | None, providers: dict[str, Provider] | None = None,
    retry: RetryPolicy = RetryPolicy(),
) -> Roles:
    """One LLM per role; providers are shared by name (one local model load for all roles)."""
    providers = dict(providers or {})
    limiter = threading.Semaphore(config.concurrency)
    llms = []
    for spec in (config.forward_model, config.backward_model, config.optimizer_model):
        name = provider_of(spec)
        if name not in providers:
            providers[name] = make_provider(name)
        llms.append(LLM(spec, providers[name], cache=cache, recorder=recorder, limiter=limiter, retry=retry,
                        max_tokens=config.max_tokens))
    return Roles(*llms)


def new_run_id(task: str) -> str:
    safe = "".join(c if c.isalnum() else "-" for c in task.rsplit(":", 1)[-1])[:24]
    return f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided exact sign test: chance of at least `wins` wins among wins+losses fair coin flips."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


class Trainer:
    def __init__(
        self, task: Task, config: RunConfig, store: Store, roles: Roles, buffer: CallBuffer,
        run_id: str | None = None, progress: Progress | None = None,
    ):
        self.task, self.config, self.store, self.roles, self.buffer = task, config, store, roles, buffer
        self.run_id = run_id or new_run_id(task.name)
        self.progress = progress or (lambda event, info: None)
        self.params = {p.name: p for p in task.pipeline.parameters()}
        self.samples = task.sample_index()
        self.tau = config.tau if config.tau is not None else task.tau
        self.optimizer = Optimizer(roles.optimizer, n_proposals=config.proposals, lenient=config.lenient_proposals,
                                   max_tokens=config.optimizer_max_tokens)
        self.pool = ThreadPoolExecutor(max_workers=config.concurrency)
        self.val = task.splits["val"][: config.val_limit]
        self.test = task.splits["test"][: config.test_limit]
        self.best_val = 0.0
        self.current_val_evals: list[Evaluation] = []

    # --- the run ----------------------------------------------------------------------------

    def train(self) -> str:
        try:
            start = self._begin()
            self.store.set_run_status(self.run_id, "running", pid=os.getpid())
            # One more check after the last step: a stop during it leaves it incomplete (for a
            # resume to redo), and the run must then say stopped, not completed.
            for step in range(start, self.config.steps + 2):
                if self.store.stop_requested(self.run_id):
                    self.buffer.flush()
                    self.store.set_run_status(self.run_id, "stopped")
                    self.progress("stopped", {"step": step})
                    return self.run_id
                if step <= self.config.steps:
                    self.run_step(step)
            self._final_test()
            self.store.set_run_status(self.run_id, "completed")
            self.progress("completed", {"best_val": self.best_val})
        except LLMFatalError as exc:
            self.buffer.flush()
            self.store.set_run_status(self.run_id, "failed", error=str(exc))
            raise
        except BaseException as exc:
            self.buffer.flush()
            self.store.set_run_status(self.run_id, "failed", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self.pool.shutdown(wait=False)
        return self.run_id

    def _begin(self) -> int:
        """Create the run (step 0: initial validation and test), or resume it. Returns the next step."""
        self.register()
        last = self.store.last_completed_step(self.run_id)
        if last is None:
            self._initial_step()
            return 1
        self.store.discard_after(self.run_id, last)
        for name, value in self.store.parameter_values_at(self.run_id, last).items():
            if name in self.params:
                self.params[name].value = value
        self.best_val = self.store.steps(self.run_id)[last]["val_score"] or 0.0
        rows = self.store.evaluations(self.run_id, split="val", subject="current")
        latest = max((r["step"] for r in rows), default=0)
        self.current_val_evals = [
            Evaluation(r["sample_id"], r["prediction"], r["gold"], r["score"], r["error"])
            for r in rows if r["step"] == latest
        ]
        self.progress("resumed", {"step": last})
        return last + 1

    def register(self) -> str:
        """Write the run, its config, sample ids and parameters to the store (once)."""
        try:
            self.store.run(self.run_id)
            return self.run_id
        except StoreError:
            pass
        splits = {name: [s["id"] for s in rows] for name, rows in self.task.splits.items()}
        splits["val"], splits["test"] = [s["id"] for s in self.val], [s["id"] for s in self.test]
        self.store.create_run(self.run_id, self.task.name, self.config.model_dump(), splits)
        self.store.add_parameters(self.run_id, [p.describe() for p in self.params.values()])
        return self.run_id

    def _initial_step(self) -> None:
        self.store.start_step(self.run_id, 0, [])
        for p in self.params.values():
            self.store.add_parameter_version(self.run_id, p.name, 0, p.value, None)
        val_evals = self.evaluate(self.val, {}, phase="validate", step=0)
        test_evals = self.evaluate(self.test, {}, phase="test", step=0)
        self.current_val_evals = val_evals
        self.best_val = mean([e.score for e in val_evals])
        self.store.add_evaluations(self.run_id, 0, "val", "current", val_evals)
        self.store.add_evaluations(self.run_id, 0, "test", "current", test_evals)
        self.store.finish_step(self.run_id, 0, self.best_val, mean([e.score for e in test_evals]), [])
        self.buffer.flush()
        self.progress("initial", {"val": self.best_val})

    def _final_test(self) -> None:
        last = self.store.last_completed_step(self.run_id) or 0
        evals = self.evaluate(self.test, {}, phase="test", step=last)
        self.store.add_evaluations(self.run_id, last, "test", "current", evals)
        self.store.set_step_test_score(self.run_id, last, mean([e.score for e in evals]))
        self.buffer.flush()

    # --- one step ---------------------------------------------------------------------------

    def batch_for(self, step: int) -> list[dict]:
        """A seeded batch: the same step of the same run always sees the same samples."""
        rng = random.Random(f"{self.config.seed}:{step}")
        train = self.task.splits["train"]
        return rng.sample(train, min(self.config.batch_size, len(train)))

    def run_step(self, step: int) -> None:
        batch = self.batch_for(step)
        self.store.start_step(self.run_id, step, [s["id"] for s in batch])
        self.progress("step", {"step": step})
        results = list(self.pool.map(lambda s: run_sample(
            self.task, s, self.roles.forward, run_id=self.run_id, step=step, phase="forward"), batch))
        traces = [t for t, _ in results]
        self.store.add_traces(self.run_id, step, traces)
        self.buffer.flush()
        scores = {e.sample_id: e.score for _, e in results}
        failed = sorted((t for t in traces if t.score < self.tau), key=lambda t: (t.score, t.sample_id))
        failed = failed[: self.config.max_failed]
        correct = [t for t in traces if t.score >= self.tau][: self.config.positives]
        gradients = self._backward(step, failed)
        minibatch = [self.samples[t.sample_id] for t in failed + correct]
        baseline = {s["id"]: scores[s["id"]] for s in minibatch}
        positives = [(self.task.describe_input(self.samples[t.sample_id]), _prediction(t))
                     for t in correct]
        self._human_read: list[str] = []
        if failed or self.store.pending_human_feedback(self.run_id, list(self.params)):
            for param in self.params.values():
                if not param.trainable:
                    continue
                if self.store.stop_requested(self.run_id):
                    return  # the step stays incomplete; a resume redoes it
                baseline = self._optimize_parameter(step, param, gradients, minibatch, baseline, positives)
        self.store.mark_feedback_consumed(self._human_read, step)
        self.store.add_evaluations(self.run_id, step, "val", "current", self.current_val_evals)
        test_score = None
        if self.config.test_each_accept and any(
            p["fate"] == "accepted" for p in self.store.proposals(self.run_id, step=step)
        ):
            evals = self.evaluate(self.test, {}, phase="test", step=step)
            self.store.add_evaluations(self.run_id, step, "test", "current", evals)
            test_score = mean([e.score for e in evals])
        self.buffer.flush()
        self.store.finish_step(self.run_id, step, self.best_val, test_score, [t.sample_id for t in failed])
        self.progress("step_done", {"step": step, "val": self.best_val, "failed": len(failed)})

    def _backward(self, step: int, failed: Sequence[Trace]) -> list[Gradient]:
        index = self.samples

        def one(trace: Trace) -> list[Gradient]:
            sample = index[trace.sample_id]
            ctx = BackwardContext(self.run_id, step, self.params, self.task.describe_input(sample),
                                  str(self.task.gold(sample)))
            return backward(trace, self.roles.backward, ctx)

        gradients = [g for grads in self.pool.map(one, failed) for g in grads]
        self.store.add_gradients(self.run_id, step, gradients)
        self.buffer.flush()
        self.progress("backward", {"step": step, "gradients": len(gradients)})
        return gradients

    def _optimize_parameter(
        self, step: int, param: Parameter, gradients: Sequence[Gradient], minibatch: list[dict],
        baseline: dict[str, float], positives: list[tuple[str, str]],
    ) -> dict[str, float]:
        """Propose for one parameter and validate; returns the (possibly new) mini-batch baseline."""
        own = [_grad_dict(g) for g in gradients if g.target_type == "parameter" and g.target == param.name
               and g.text]
        human = self.store.pending_human_feedback(self.run_id, [param.name])
        if not own and not human:
            return baseline
        peers = [self.params[n] for n in param.peers if n in self.params]
        others = [p for p in self.params.values() if p.trainable and p is not param and p not in peers]
        feedback = own + human
        self._human_read.extend(h["id"] for h in human if h["id"] not in self._human_read)
        tried = self._tried_values(param)
        for _ in range(self.config.rounds):
            inp = OptimizerInput(param, peers, others, feedback, positives, self._history(param),
                                 self._failed_before(param, step))
            proposals = self.optimizer.propose(inp, self.run_id, step)
            self.buffer.flush()
            for proposal in proposals:
                if proposal.fate == "malformed":
                    self.store.add_proposal(self.run_id, proposal)
                    continue
                reason = self.optimizer.check(proposal, param, tried)
                if reason:
                    self.store.add_proposal(self.run_id, replace(proposal, fate="rejected_check", reason=reason))
                    continue
                tried.append(proposal.value.strip())
                self.store.add_proposal(self.run_id, proposal)
                accepted, new_baseline = self._validate(step, param, proposal, minibatch, baseline)
                if accepted:
                    return new_baseline
                if self.store.stop_requested(self.run_id):
                    return baseline
        return baseline

    def _failed_before(self, param: Parameter, step: int, limit: int = 5) -> list[tuple[str, str]]:
        """Failed proposals for this parameter, this step's first, then the most recent earlier ones."""
        failed = [p for p in self.store.proposals(self.run_id, parameter=param.name)
                  if p["fate"] not in ("accepted", "pending", "proposed") and p["method"] != "none"]
        failed.sort(key=lambda p: (p["step"] != step, -p["step"], -p["created_at"]))
        return [(p["value"], p["reason"]) for p in failed[:limit]]

    def _validate(
        self, step: int, param: Parameter, proposal: Proposal, minibatch: list[dict], baseline: dict[str, float],
    ) -> tuple[bool, dict[str, float]]:
        overrides = {param.name: proposal.value}
        mb = self.evaluate(minibatch, overrides, phase="validate", step=step)
        mb_score, mb_base = mean([e.score for e in mb]), mean(list(baseline.values()))
        update = {"minibatch_score": mb_score, "minibatch_baseline": mb_base}
        review_all = self.config.review == "all"
        if mb_score <= mb_base and not review_all:
            self.store.update_proposal(proposal.id, fate="failed_minibatch", reason=(
                f"mini-batch {mb_score:.3f} did not beat the current value's {mb_base:.3f}"), **update)
            self.buffer.flush()
            return False, baseline
        target = self.best_val + self.config.min_gain
        val = self.evaluate(self.val, overrides, phase="validate", step=step,
                            stop_below=None if review_all else target)
        val_score = mean([e.score for e in val]) if len(val) == len(self.val) else None
        update |= {"val_score": val_score, "val_baseline": self.best_val}
        reason = self._val_failure(val, val_score, target)
        self.buffer.flush()
        if reason and not review_all:
            self.store.update_proposal(proposal.id, fate="failed_val", reason=reason, **update)
            return False, baseline
        if self.config.review == "off":
            self.store.update_proposal(proposal.id, fate="accepted", reason="beat the best validation score",
                                       decided_by="auto", decided_at=time.time(), **update)
            self._accept(step, param, proposal.value, proposal.id, val)
            return True, {e.sample_id: e.score for e in mb}
        self.store.update_proposal(proposal.id, fate="pending", reason=reason or "passed validation", **update)
        return self._await_review(step, param, proposal, val, mb, minibatch, baseline)

    def _val_failure(self, val: list[Evaluation], val_score: float | None, target: float) -> str | None:
        if val_score is None:
            return f"stopped early after {len(val)} of {len(self.val)} samples: could not reach {target:.3f}"
        if val_score < target:
            return f"validation {val_score:.3f} below best {self.best_val:.3f} + min gain {self.config.min_gain}"
        if self.config.acceptance == "paired":
            current = {e.sample_id: e.score for e in self.current_val_evals}
            wins = sum(1 for e in val if e.score > current.get(e.sample_id, 0.0))
            losses = sum(1 for e in val if e.score < current.get(e.sample_id, 0.0))
            p = sign_test_p(wins, losses)
            if p > self.config.paired_alpha:
                return f"paired sign test: {wins} better, {losses} worse, p={p:.3f} > {self.config.paired_alpha}"
        return None

    def _await_review(
        self, step: int, param: Parameter, proposal: Proposal, val: list[Evaluation], mb: list[Evaluation],
        minibatch: list[dict], baseline: dict[str, float],
    ) -> tuple[bool, dict[str, float]]:
        self.progress("pending", {"step": step, "parameter": param.name, "proposal": proposal.id})
        decision, value, by = self.wait_for_decision(proposal.id)
        now = time.time()
        if decision == "reject":
            self.store.update_proposal(proposal.id, fate="rejected", decided_by=by, decided_at=now)
            return False, baseline
        reason = f"accepted by {by}" if not by.startswith("timeout") else f"accepted by fallback ({by})"
        if decision == "edit":
            overrides = {param.name: value}
            val = self.evaluate(self.val, overrides, phase="validate", step=step)
            mb = self.evaluate(minibatch, overrides, phase="validate", step=step)
            reason = f"edited, then accepted by {by}"
        else:
            value = proposal.value
        self.store.update_proposal(proposal.id, fate="accepted", decided_by=by, decided_at=now, reason=reason)
        self._accept(step, param, value, proposal.id, val)
        self.buffer.flush()
        return True, {e.sample_id: e.score for e in mb}

    def wait_for_decision(self, proposal_id: str) -> tuple[str, str | None, str]:
        deadline = time.monotonic() + self.config.review_timeout
        while time.monotonic() < deadline:
            decision = self.store.decision(proposal_id)
            if decision:
                return decision
            if self.store.stop_requested(self.run_id):
                return "reject", None, "stop requested"
            time.sleep(0.25)
        return self.config.review_fallback, None, f"timeout after {self.config.review_timeout:.0f}s"

    def _accept(self, step: int, param: Parameter, value: str, proposal_id: str, val: list[Evaluation]) -> None:
        param.update(value, step, proposal_id)
        self.store.add_parameter_version(self.run_id, param.name, step, value, proposal_id)
        if len(val) == len(self.val):
            self.current_val_evals = val
            self.best_val = mean([e.score for e in val])
        self.progress("accepted", {"step": step, "parameter": param.name, "val": self.best_val})

    # --- helpers ----------------------------------------------------------------------------

    def evaluate(
        self, samples: Sequence[dict], overrides: dict[str, str], *, phase: str, step: int,
        stop_below: float | None = None,
    ) -> list[Evaluation]:
        """Score samples concurrently, keeping `concurrency` samples in flight (a sliding window: a
        slow sample never holds up the ones after it). With `stop_below`, stop once the mean can no
        longer reach it: samples not yet started are dropped, those running are finished, and the
        evaluations made are returned, in sample order."""
        total = len(samples)
        upcoming = iter(enumerate(samples))
        running: dict[Future, int] = {}
        done: dict[int, Evaluation] = {}
        score_sum = 0.0

        def start_next() -> None:
            for i, sample in upcoming:
                running[self.pool.submit(run_sample, self.task, sample, self.roles.forward, run_id=self.run_id,
                                         step=step, phase=phase, overrides=overrides)] = i
                return

        try:
            for _ in range(max(self.config.concurrency, 1)):
                start_next()
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    evaluation = done[running.pop(future)] = future.result()[1]
                    score_sum += evaluation.score
                if stop_below is not None and total:
                    best_possible = (score_sum + (total - len(done))) / total
                    if best_possible < stop_below:
                        break
                for _ in finished:
                    start_next()
            for future in [f for f in running if not f.cancel()]:
                done[running.pop(future)] = future.result()[1]
        finally:
            for future in running:
                future.cancel()
        return [done[i] for i in sorted(done)]

    def _history(self, param: Parameter) -> list[HistoryEntry]:
        versions = self.store.parameter_versions(self.run_id, param.name)
        steps = {s["step"]: s["val_score"] for s in self.store.steps(self.run_id)}
        props = {p["id"]: p for p in self.store.proposals(self.run_id, parameter=param.name)}
        entries = []
        for v in versions:
            score = props[v["proposal_id"]]["val_score"] if v["proposal_id"] in props else steps.get(v["step"])
            entries.append(HistoryEntry(v["value"], score, v["step"]))
        entries.sort(key=lambda h: -(h.val_score or 0.0))
        return entries[:3]

    def _tried_values(self, param: Parameter) -> list[str]:
        values = [v["value"].strip() for v in self.store.parameter_versions(self.run_id, param.name)]
        values += [p["value"].strip() for p in self.store.proposals(self.run_id, parameter=param.name)]
        return values


def _prediction(trace: Trace) -> str:
    loss = trace.loss
    return loss.inputs[0].text if loss else ""


def _grad_dict(g: Gradient) -> dict:
    return {"sample_id": g.sample_id, "call_index": g.call_index, "score": g.score, "text": g.text,
            "origin": g.origin, "source_node": g.source_node, "path": list(g.path)}
