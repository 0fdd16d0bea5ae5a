"""The training loop: forward, selective backward, GDPO proposals, two-stage validation, accept
or revert, optional human review. Everything is written to the store as it happens, so a run can
be watched live and resumed from its last completed step."""

from __future__ import annotations

import json
import random
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from autodiff import holders
from autodiff.backward import BackwardContext, backward, usable
from autodiff.config import RunConfig
from autodiff.estimate import Estimate, estimate
from autodiff.errors import (BudgetExceeded, ConfigError, LLMFatalError, LLMTransientError, RunTakenOver, StoreError,
                             StoreUnreachable, TooManyErrors)
from autodiff.judge import Rule, judge, out_of_reach
from autodiff.metrics import projection
from autodiff.llm.budget import Budget
from autodiff.llm.cache import ResponseCache
from autodiff.llm.client import LLM, RetryPolicy
from autodiff.llm.limits import Limiters
from autodiff.llm.pricing import Pricing, format_usd_exact, table_version
from autodiff.llm.registry import check_model, make_provider, provider_of
from autodiff.llm.types import CallContext, Provider
from autodiff.optimizer import HistoryEntry, Optimizer, OptimizerInput
from autodiff.parameter import Parameter
from autodiff.pipeline import Task, check_connected, check_splits, may_pass
from autodiff.review import REVIEW_WAIT
from autodiff.records import Evaluation, Gradient, LLMCall, Proposal, Trace
from autodiff.scoring import mean_score, run_samples
from autodiff.state import load_state
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

    def drop(self) -> int:
        """Forget the records not flushed yet (their run is no longer this process's to write);
        returns how many there were."""
        with self._lock:
            calls, self._calls = self._calls, []
        return len(calls)


@dataclass
class Roles:
    forward: LLM
    backward: LLM
    optimizer: LLM


def make_roles(
    config: RunConfig, *, recorder, cache: ResponseCache | None, providers: dict[str, Provider] | None = None,
    retry: RetryPolicy | None = None, cache_since: float | None = None, budget: Budget | None = None,
) -> Roles:
    """One LLM per role. `providers` maps a model spec ("fake:scripted") or a provider name
    ("openai") to a provider object to use; others are made by name and shared (one local model
    load for all roles), and so is each endpoint's adaptive concurrency limit (see
    autodiff.llm.limits). Every role prices its calls with the run's prices and asks `budget`
    before each call. A budget in USD needs a price for every role's model: ConfigError names
    the models without one."""
    providers = dict(providers or {})
    pricing = Pricing(config.prices)
    limiters = Limiters(config.concurrency)
    retry = retry or RetryPolicy(budget_s=config.retry_budget)
    llms = []
    for role, spec in (("forward", config.forward_model), ("backward", config.backward_model),
                       ("optimizer", config.optimizer_model)):
        name = provider_of(spec)
        if spec not in providers and name not in providers:
            providers[name] = make_provider(name)
        provider = providers.get(spec) or providers[name]  # an object given for this very model first
        llms.append(LLM(spec, provider, cache=cache, recorder=recorder, retry=retry, max_tokens=config.max_tokens,
                        limiter=limiters.for_endpoint(getattr(provider, "endpoint", None) or name),
                        timeout=config.timeout_for(role), reasoning_effort=config.reasoning_effort,
                        cache_mode=config.cache, cache_since=cache_since, role=role, pricing=pricing,
                        budget=budget))
    if config.budget_usd is not None:
        unpriced = list(dict.fromkeys(llm.spec for llm in llms if not pricing.known(llm.spec, llm.endpoint)))
        if unpriced:
            raise ConfigError(
                f"--budget-usd needs a price for every model, and the price table ({table_version()}) "
                f"has none for {', '.join(unpriced)}: set one with --price {unpriced[0]}=USD_PER_MILLION_TOKENS "
                "(input/output), or budget in tokens (--budget-tokens)")
    return Roles(*llms)


def new_run_id(task: str) -> str:
    """A new run id for task `task` (a name as RunConfig.task holds it): the task's own name
    (a `file.py:factory` task by its file, a `module:factory` one by its module's last part),
    the time and 4 random hex digits: "retrieve-answer-20261202-141503-9f2c"."""
    where, _, _factory = task.rpartition(":")
    name = (Path(where).stem if where.endswith(".py") else where.rsplit(".", 1)[-1]) if where else task
    safe = "".join(c if c.isalnum() else "-" for c in name)[:24].strip("-") or "run"
    return f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


class Trainer:
    def __init__(
        self, task: Task, config: RunConfig, store: Store, roles: Roles, buffer: CallBuffer,
        run_id: str | None = None, progress: Progress | None = None,
    ):
        self.task, self.config, self.store, self.roles, self.buffer = task, config, store, roles, buffer
        self.run_id = run_id or new_run_id(task.name)
        check_splits(task)
        given = progress or (lambda event, info: None)
        self.progress = lambda event, info: given(event, {"run_id": self.run_id, **info})  # every event says whose
        self.params = {p.name: p for p in task.pipeline.parameters()}
        self.samples = task.sample_index()
        self.tau = config.tau if config.tau is not None else task.tau
        self.optimizer = Optimizer(roles.optimizer, n_proposals=config.proposals, lenient=config.lenient_proposals,
                                   max_tokens=config.optimizer_max_tokens)
        self.pool = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix=f"autodiff-{self.run_id}")
        self.val = task.splits["val"][: config.val_limit]
        self.test = task.splits["test"][: config.test_limit]
        self.best_val: float | None = None  # mean over scored samples; None while none was scored
        self.current_val_evals: list[Evaluation] = []
        self.minibatch_rule = Rule(min_gain=0.0, max_error_share=config.max_error_share)
        self.val_rule = Rule(min_gain=config.min_gain, acceptance=config.acceptance, alpha=config.paired_alpha,
                             max_error_share=config.max_error_share)

    # --- the run ----------------------------------------------------------------------------

    def train(self) -> str:
        """Run (or resume) to the end. A stop request, provider errors past the run's limit
        (TooManyErrors) or the budget reached (BudgetExceeded: the next call might not fit) stop
        the run cleanly with the reason, resumable; so does a KeyboardInterrupt (Ctrl-C; SIGTERM
        in the CLI), which is then raised again. An LLMFatalError or any other failure marks it
        failed and is raised. A run another live process holds is refused with a ConfigError
        before anything is touched (see autodiff.holders); one taken over by another process
        meanwhile is left to it at the next step boundary, and if this process was paused while
        it happened (a machine asleep, a stopped process), at its first write after waking: every
        write is fenced (`Store.fence`), so the step it was in is not stored twice."""
        try:
            self.register()
            holders.take(self.store, self.run_id)  # before any step is discarded or redone
            self.store.fence(self.run_id)
        except BaseException:
            self.pool.shutdown(wait=False)
            raise
        try:
            return self._train_held()
        except RunTakenOver as exc:
            self._leave(exc)
            return self.run_id
        finally:
            self.store.unfence(self.run_id)

    def _leave(self, taken: RunTakenOver) -> None:
        """Let go of a run another process took over while this one trained it: calls waiting
        give up, none queued starts, nothing more is written, and the calls made since the last
        write (really made, and paid for) are said, as they cannot be recorded."""
        self._cancel_waiting_calls()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.progress("taken_over", {"step": self.current_step, "during": True, "reason": taken.now,
                                     "unrecorded_calls": self.buffer.drop()})

    def _cancel_waiting_calls(self) -> None:
        """Every call of this run waiting (a Retry-After, the endpoint's pause, a free slot) gives
        up now, and none queued starts; requests already sent are not cut short."""
        roles = (self.roles.forward, self.roles.backward, self.roles.optimizer)
        for limiter in {id(llm.limiter): llm.limiter for llm in roles}.values():
            limiter.cancel()

    def _train_held(self) -> str:
        self.current_step = None
        self.abandoned_calls = False  # a second interrupt left calls in flight: see the KeyboardInterrupt handler
        try:
            start = self._begin()
            # One more check after the last step: a stop during it leaves it incomplete (for a
            # resume to redo), and the run must then say stopped, not completed.
            for step in range(start, self.config.steps + 2):
                if not holders.still_holds(self.store, self.run_id):
                    self.buffer.flush()
                    self.progress("taken_over", {"step": step})
                    return self.run_id
                if self.store.stop_requested(self.run_id):
                    self._stop(step)
                    return self.run_id
                if step <= self.config.steps:
                    self.current_step = step
                    self.run_step(step)
            self._final_test()
            self.store.set_run_status(self.run_id, "completed")
            self.progress("completed", {"best_val": self.best_val})
        except RunTakenOver:
            raise  # nothing of this process is to be written to the run any more: see `_leave`
        except TooManyErrors as exc:
            self.buffer.flush()
            self.store.set_run_status(self.run_id, "stopped", error=f"{exc}; fix the cause, then resume: failed samples are asked again")
            self.progress("stopped", {"reason": str(exc)})
        except BudgetExceeded as exc:
            self.pool.shutdown(wait=True, cancel_futures=True)  # calls in flight finish and are recorded
            self.buffer.flush()
            flag = "--" + exc.option.replace("_", "-")
            reason = f"{exc}; resume it with a larger budget ({flag})"
            self.store.set_run_status(self.run_id, "stopped", error=reason)
            self.progress("stopped", {"reason": reason})
        except LLMFatalError as exc:
            self.buffer.flush()
            self.store.set_run_status(self.run_id, "failed", error=str(exc))
            raise
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as the CLI raises it: a stop, not a failure
            # Calls waiting (a Retry-After, a pause, a free slot) give up now; those queued never
            # start. The run says stopped only once no call of this process is left: until then
            # it is still held, so a resume elsewhere is refused rather than run beside them.
            self._cancel_waiting_calls()
            how = str(exc.args[0]) if exc.args else "Ctrl-C"
            self.progress("interrupting", {"how": how})
            try:
                self.pool.shutdown(wait=True, cancel_futures=True)
            except KeyboardInterrupt:  # again, while calls already sent were still out: stop waiting for them
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.abandoned_calls = True
                how += " twice: the calls still out were not waited for, and are not recorded"
            self.buffer.flush()
            self._interrupted(how)
            raise
        except StoreUnreachable as exc:  # the database went away mid-run: a stop to resume, not a failure
            self._cancel_waiting_calls()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self._record_outage(exc)
            raise
        except BaseException as exc:
            self.buffer.flush()
            self.store.set_run_status(self.run_id, "failed", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self.pool.shutdown(wait=False)
        return self.run_id

    OUTAGE = "the run store did not answer"  # how a stop for a store outage starts (workers read it)

    def _record_outage(self, exc: StoreUnreachable, tries: int = 3) -> None:
        """Record the run as stopped by a store outage, resumable, once the store answers again
        (each try waits as long as the store waits for a connection); if it never does in that
        time, nothing is written: the run says running, held by this process, until a trainer or
        the dashboard on this machine finds the process gone, or its worker queues it again. The
        calls not written yet are written with it (they were made, and paid for)."""
        for _ in range(tries):
            try:
                done = self.store.last_completed_step(self.run_id)
                self.buffer.flush()
                after = "before its first step" if done is None else f"after step {done}"
                self.store.set_run_status(self.run_id, "stopped", error=(
                    f"{self.OUTAGE} ({exc}) {after}; resume it once the database answers: nothing stored is lost, "
                    "the unfinished step is redone"))
                return
            except StoreUnreachable:
                continue

    def _interrupted(self, how: str) -> None:
        """Record the run as stopped by an interrupt (`how`: "Ctrl-C", "SIGTERM"), with where a
        resume goes on; a run already completed stays so. `autodiff.recovery` reads the text."""
        if self.store.run(self.run_id).status == "completed":
            return
        done = self.store.last_completed_step(self.run_id)
        where = ("resume starts it" if done is None else
                 f"resume goes on from step {done + 1}, redoing any part of it already done")
        after = "before its first step" if done is None else f"after step {done}"
        self.store.set_run_status(self.run_id, "stopped", error=f"interrupted ({how}) {after}; {where}")

    def _stop(self, step: int) -> None:
        """End the run on a stop request, noticed before `step`: what finished is kept (completed
        steps; every LLM call, in the store and the response cache); a step left unfinished is
        redone from its start on resume (see autodiff.recovery.stop_effect), and the reason says so."""
        self.buffer.flush()
        done = self.store.last_completed_step(self.run_id) or 0
        replay = (", its finished LLM calls answered from this machine's response cache (a resume on another "
                  "machine asks them again)" if self.config.cache != "off"
                  else ", its calls asked again (the run's response cache is off)")
        redo = (f"resume redoes step {done + 1} from its start{replay}" if step > done + 1
                else f"resume goes on from step {done + 1}")
        self.store.set_run_status(self.run_id, "stopped", error=f"stopped on request after step {done}; {redo}")
        self.progress("stopped", {"step": step})

    def preflight(self) -> None:
        """Ask each distinct model one tiny question (or let its provider check it) before
        anything is spent: a wrong model name, key, endpoint or option fails in seconds with
        an LLMFatalError naming the role and the model."""
        seen: list[str] = []
        for role in ("forward", "backward", "optimizer"):
            llm = getattr(self.roles, role)
            if llm.spec in seen:
                continue
            seen.append(llm.spec)
            llm.preflight(CallContext(run_id=self.run_id, step=0, phase="preflight", role=role))
        self.buffer.flush()

    def _begin(self) -> int:
        """Create the run (step 0: initial validation and test), or resume it. Returns the next step."""
        self.register()
        check_connected(self.task)  # a forward() cut off from every trainable parameter is refused here
        self.preflight()
        last = self.store.last_completed_step(self.run_id)
        if last is None:
            self.store.discard_after(self.run_id, -1)  # a step 0 stopped part-way is redone whole
            self._initial_step()
            return 1
        self.store.discard_after(self.run_id, last)
        stored = self.store.parameter_values_at(self.run_id, last)
        # Parameters the task gained or lost since (accepted on resume) keep their own values.
        load_state(self.task.pipeline, {n: v for n, v in stored.items() if n in self.params}, partial=True,
                   source=f"run {self.run_id!r} step {last}")
        stored_evals = self.store.evaluations(self.run_id, split="val", subject="current")
        latest = max((e.step for e in stored_evals), default=0)
        self.current_val_evals = [e for e in stored_evals if e.step == latest]
        stored = self.store.steps(self.run_id)[last].val_score
        self.best_val = stored if stored is not None else mean_score(self.current_val_evals)
        if sorted(e.sample_id for e in self.current_val_evals) != sorted(s["id"] for s in self.val):
            # The validation split changed (accepted on resume): the current values are scored
            # on it afresh, as part of the next step, before any proposal is judged against them.
            self.current_val_evals = self.evaluate(self.val, {}, phase="validate", step=last + 1)
            self._check_errors(self.current_val_evals, last + 1, "validation")
            self.best_val = mean_score(self.current_val_evals)
        self.progress("resumed", {"step": last})
        return last + 1

    def register(self) -> str:
        """Write the run, its config, sample ids and parameters to the store (once), with the
        estimate of what it will cost (a run event "estimate", JSON; see autodiff.estimate). A
        model spec that cannot work (see `check_model`: an unknown provider, a GGUF file that is
        not there) and a budget too small for step 0 (the initial validation and test) by that
        estimate are refused with a ConfigError before anything is written or spent."""
        try:
            self.store.run(self.run_id)
            return self.run_id
        except StoreError:
            pass
        for role in ("forward", "backward", "optimizer"):
            spec = getattr(self.roles, role).spec
            try:
                check_model(spec)
            except ConfigError as exc:
                raise ConfigError(f"{role} model {spec}: {exc}") from None
        forecast = self._estimate()
        splits = {name: [s["id"] for s in rows] for name, rows in self.task.splits.items()}
        splits["val"], splits["test"] = [s["id"] for s in self.val], [s["id"] for s in self.test]
        self.store.create_run(self.run_id, self.task.name, self.config.model_dump(), splits)
        self.store.add_parameters(self.run_id, [p.spec(i) for i, p in enumerate(self.params.values())])
        self.store.add_run_event(self.run_id, "estimate", json.dumps(forecast.as_dict()))
        return self.run_id

    def _estimate(self) -> Estimate:
        """The run's cost estimate; refuses (ConfigError) a budget step 0 would not fit in."""
        forecast = estimate(self.task, self.config, pricing=self.roles.forward.pricing)
        # The worst case, as the budget reserves before each call: a run that passes this check
        # cannot be stopped by its reservations in step 0.
        first, c = forecast.step0_worst or forecast.step0, self.config
        step0 = f"step 0 (initial validation on {len(self.val)} and test on {len(self.test)} samples)"
        worst = ("(the worst case the budget reserves: every reply at its whole token budget, hidden reasoning "
                 "included)")
        too_small = []  # (option, the budget, what step 0 may take) for each budget it might not fit in
        if c.budget_usd is not None and first.usd is not None and first.usd > c.budget_usd:
            too_small.append(("budget_usd", f"a budget of {format_usd_exact(c.budget_usd)}",
                              f"{step0} may cost up to {format_usd_exact(first.usd)} ({first.tokens:,.0f} tokens in "
                              f"{first.calls:,.0f} calls) {worst}"))
        if c.budget_tokens is not None and first.tokens > c.budget_tokens:
            too_small.append(("budget_tokens", f"a budget of {c.budget_tokens:,} tokens",
                              f"{step0} may take up to {first.tokens:,.0f} tokens in {first.calls:,.0f} calls {worst}"))
        if too_small:
            option, budget, what = too_small[0]
            flag = "--" + option.replace("_", "-")
            error = ConfigError(f"{budget} is too small: {what}; raise {flag} or lower --val-limit/--test-limit "
                                "(autodiff estimate shows the whole run)")
            # For a form: each budget by its option, in words that name no command-line flag.
            error.problems = [(o, f"too small: {w}; raise it, or lower the validation and test sample limits")
                              for o, _b, w in too_small]
            raise error
        return forecast

    def _initial_step(self) -> None:
        """Step 0: the baseline on validation and test, errors recorded with it."""
        self.store.start_step(self.run_id, 0, [])
        for p in self.params.values():
            self.store.add_parameter_version(self.run_id, p.name, 0, p.value, None)
        val_evals = self.evaluate(self.val, {}, phase="validate", step=0)
        self.store.add_evaluations(self.run_id, 0, "val", "current", val_evals)
        self._check_errors(val_evals, 0, "validation")
        test_evals = self.evaluate(self.test, {}, phase="test", step=0)
        self.store.add_evaluations(self.run_id, 0, "test", "current", test_evals)
        self._check_errors(test_evals, 0, "test")
        self.current_val_evals = val_evals
        self.best_val = mean_score(val_evals)
        self.store.finish_step(self.run_id, 0, mean_score(val_evals), mean_score(test_evals), [])
        self.buffer.flush()
        self.progress("initial", {"val": self.best_val})

    def _final_test(self) -> None:
        last = self.store.last_completed_step(self.run_id) or 0
        evals = self.evaluate(self.test, {}, phase="test", step=last)
        self.store.add_evaluations(self.run_id, last, "test", "current", evals)
        self._check_errors(evals, last, "final test")
        self.store.set_step_test_score(self.run_id, last, mean_score(evals))
        self.buffer.flush()

    def _check_errors(self, evals: Sequence[Evaluation], step: int, what: str) -> None:
        """Stop the run (TooManyErrors) when more than the allowed share of `evals` errored."""
        errored = [e for e in evals if e.errored]
        if evals and len(errored) > self.config.max_error_share * len(evals):
            self.buffer.flush()
            raise TooManyErrors(
                f"step {step}: {len(errored)} of {len(evals)} {what} samples errored (more than "
                f"{self.config.max_error_share:.0%}); first: {errored[0].error}")

    # --- one step ---------------------------------------------------------------------------

    def batch_for(self, step: int) -> list[dict]:
        """A seeded batch: the same step of the same run always sees the same samples."""
        rng = random.Random(f"{self.config.seed}:{step}")
        train = self.task.splits["train"]
        return rng.sample(train, min(self.config.batch_size, len(train)))

    def run_step(self, step: int) -> None:
        """Forward on the mini-batch, backward from the failed samples (errored ones are neither
        failed nor correct: they are left out), then for each trainable parameter: propose,
        check, validate, settle."""
        batch = self.batch_for(step)
        self.store.start_step(self.run_id, step, [s["id"] for s in batch])
        self.progress("step", {"step": step})
        results = run_samples(self.task, batch, self.roles.forward, self.pool, window=self.config.concurrency,
                              run_id=self.run_id, step=step, phase="forward")
        traces = [t for t, _ in results]
        self.store.add_traces(self.run_id, step, traces)
        self.buffer.flush()
        self._check_errors([e for _, e in results], step, "forward")
        scored = [t for t in traces if t.score is not None]
        scores = {t.sample_id: t.score for t in scored}
        failed = sorted((t for t in scored if t.score < self.tau), key=lambda t: (t.score, t.sample_id))
        failed = failed[: self.config.max_failed]
        correct = [t for t in scored if t.score >= self.tau][: self.config.positives]
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
            p.fate == "accepted" for p in self.store.proposals(self.run_id, step=step)
        ):
            evals = self.evaluate(self.test, {}, phase="test", step=step)
            self.store.add_evaluations(self.run_id, step, "test", "current", evals)
            self._check_errors(evals, step, "test")
            test_score = mean_score(evals)
        self.buffer.flush()
        self.store.finish_step(self.run_id, step, self.best_val, test_score, [t.sample_id for t in failed])
        money = projection(self.store, self.run_id)
        self.progress("step_done", {"step": step, "val": self.best_val, "failed": len(failed),
                                    "cost_usd": money["spent_usd"], "cost_unknown": money["unknown"],
                                    "to_finish_usd": money["to_finish_usd"], "projected_usd": money["projected_usd"]})

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
        # Gradients written by a backward call here (not handed on through a function node).
        written = [g for g in gradients if g.origin in ("loss", "backward") and not g.path]
        lost = [g for g in written if (g.error or "").startswith("backward call failed")]
        if written and len(lost) > self.config.max_error_share * len(written):
            raise TooManyErrors(f"step {step}: {len(lost)} of {len(written)} backward calls failed (more than "
                                f"{self.config.max_error_share:.0%}); first: {lost[0].error}")
        self.progress("backward", {"step": step, "gradients": len(gradients)})
        return gradients

    def _optimize_parameter(
        self, step: int, param: Parameter, gradients: Sequence[Gradient], minibatch: list[dict],
        baseline: dict[str, float], positives: list[tuple[str, str]],
    ) -> dict[str, float]:
        """Propose for one parameter and validate; returns the (possibly new) mini-batch baseline."""
        # Feedback with an error (a failed, empty or cut-off backward reply) is on the record, not read.
        own = [g for g in gradients if g.target_type == "parameter" and g.target == param.name and usable(g)]
        human = self.store.pending_human_feedback(self.run_id, [param.name])
        if not own and not human:
            return baseline
        peers = [self.params[n] for n in param.peers if n in self.params]
        others = [p for p in self.params.values() if p.trainable and p is not param and p not in peers]
        feedback = own + human
        self._human_read.extend(h.id for h in human if h.id not in self._human_read)
        tried = self._tried_values(param)
        for _ in range(self.config.rounds):
            inp = OptimizerInput(param, peers, others, feedback, positives, self._history(param),
                                 self._failed_before(param, step))
            try:
                proposals = self.optimizer.propose(inp, self.run_id, step)
            except LLMTransientError as exc:  # the provider failed through the whole retry budget
                self.store.add_proposal(self.run_id, self.optimizer.failed(inp, step, f"optimizer call failed: {exc}"))
                self.buffer.flush()
                raise TooManyErrors(f"step {step}: the optimizer call for {param.name} failed: {exc}") from exc
            self.buffer.flush()
            for proposal in proposals:
                refused = self._screen(proposal, param, tried)
                if refused is not None:
                    if refused.fate == "error" or self.config.review != "all":
                        self.store.add_proposal(self.run_id, refused)
                        continue
                    # Review mode "all": every proposal waits for a person, even one that cannot be validated.
                    accepted, new_baseline = self._hold(step, param, refused, minibatch, baseline)
                    if accepted:
                        return new_baseline
                    if self.store.stop_requested(self.run_id):
                        return baseline
                    continue
                tried.append(proposal.value.strip())
                self.store.add_proposal(self.run_id, proposal)
                accepted, new_baseline = self._validate(step, param, proposal, minibatch, baseline)
                if accepted:
                    return new_baseline
                if self.store.stop_requested(self.run_id):
                    return baseline
        return baseline

    def _screen(self, proposal: Proposal, param: Parameter, tried: list[str]) -> Proposal | None:
        """The proposal marked with why it cannot be validated (a failed optimizer call, a malformed
        reply, a failed check), or None when it may go on to validation."""
        if proposal.fate in ("malformed", "error"):
            return proposal
        reason = self.optimizer.check(proposal, param, tried)
        return replace(proposal, fate="rejected_check", reason=reason) if reason else None

    def _hold(
        self, step: int, param: Parameter, proposal: Proposal, minibatch: list[dict], baseline: dict[str, float],
    ) -> tuple[bool, dict[str, float]]:
        """Review mode "all": a malformed reply or a proposal that failed a check waits for a person
        too, marked with that fate (`held_fate`) and its reason, without validation scores (it was
        not worth a validation run). Rejecting it gives it that fate back; see `_await_review` for
        what accepting it means."""
        self.store.add_proposal(self.run_id, replace(proposal, fate="pending", held_fate=proposal.fate))
        self.buffer.flush()
        return self._await_review(step, param, proposal, minibatch, baseline, held=proposal.fate)

    def _failed_before(self, param: Parameter, step: int, limit: int = 5) -> list[tuple[str, str]]:
        """Failed proposals for this parameter, this step's first, then the most recent earlier ones.
        Proposals that errored say nothing about their value and are left out."""
        failed = [p for p in self.store.proposals(self.run_id, parameter=param.name)
                  if p.fate not in ("accepted", "pending", "proposed", "error") and p.method != "none"]
        failed.sort(key=lambda p: (p.step != step, -p.step, -p.created_at))
        return [(p.value, p.reason) for p in failed[:limit]]

    def _validate(
        self, step: int, param: Parameter, proposal: Proposal, minibatch: list[dict], baseline: dict[str, float],
    ) -> tuple[bool, dict[str, float]]:
        """Two stages: the mini-batch, then validation (stopping early once the proposal cannot
        win). A sample errored on either side counts at both extremes of its unknown score
        (`judge`); a stage the errors could decide, or with too many of them, decides nothing: the
        proposal is marked "error" and the run stops (TooManyErrors), to be resumed once the
        cause is gone (the step is redone, its calls asked again)."""
        overrides = {param.name: proposal.value}
        review_all = self.config.review == "all"
        mb = self.evaluate(minibatch, overrides, phase="validate", step=step, proposal_id=proposal.id)
        first = judge(mb, baseline, self.minibatch_rule, stage="mini-batch")
        update = {"minibatch_score": first.score, "minibatch_baseline": first.baseline}
        if not first.decided:
            self._undecided(proposal, first.reason, update, step)
        if not first.better and not review_all:
            self.store.update_proposal(proposal.id, fate="failed_minibatch", reason=first.reason, **update)
            self.buffer.flush()
            return False, baseline
        self._fill_baseline(step)
        current = {e.sample_id: e.score for e in self.current_val_evals}
        stop_when = None if review_all else (
            lambda done, pending: out_of_reach(done, pending, current, self.val_rule, len(self.val)))
        val = self.evaluate(self.val, overrides, phase="validate", step=step, stop_when=stop_when,
                            proposal_id=proposal.id)
        second = judge(val, current, self.val_rule, stage="validation", expected=len(self.val))
        complete = len(val) == len(self.val)
        update |= {"val_score": second.score if complete else None,
                   "val_baseline": second.baseline if complete else self.best_val}
        self.buffer.flush()
        if not second.decided:
            self._undecided(proposal, second.reason, update, step)
        if not second.better and not review_all:
            self.store.update_proposal(proposal.id, fate="failed_val", reason=second.reason, **update)
            return False, baseline
        if self.config.review == "off":
            self.store.update_proposal(proposal.id, fate="accepted", reason=second.reason,
                                       decided_by="auto", decided_at=time.time(), **update)
            self._accept(step, param, proposal.value, proposal.id, val)
            return True, _scores(mb)
        self.store.update_proposal(proposal.id, fate="pending",
                                   reason=second.reason if second.better else f"for review: {second.reason}",
                                   **update)
        return self._await_review(step, param, proposal, minibatch, baseline, val=val, mb=mb)

    def _fill_baseline(self, step: int) -> None:
        """Validation samples of the current values that errored are asked again before a
        proposal is judged against them: a passing fault must not take a sample out of the
        comparison (and so tilt it). Still errored past the allowed share: the run stops."""
        holes = [self.samples[e.sample_id] for e in self.current_val_evals if e.errored]
        if not holes:
            return
        again = {e.sample_id: e for e in self.evaluate(holes, {}, phase="validate", step=step)}
        self.current_val_evals = [again.get(e.sample_id, e) for e in self.current_val_evals]
        self._check_errors(self.current_val_evals, step, "validation (current values)")
        self.best_val = mean_score(self.current_val_evals)

    def _undecided(self, proposal: Proposal, reason: str, update: dict, step: int) -> None:
        """A comparison spoiled by errors: record why on the proposal, then stop the run."""
        self.store.update_proposal(proposal.id, fate="error", reason=reason, **update)
        self.buffer.flush()
        raise TooManyErrors(f"step {step}: proposal for {proposal.parameter}: {reason}")

    def _await_review(
        self, step: int, param: Parameter, proposal: Proposal, minibatch: list[dict], baseline: dict[str, float],
        val: list[Evaluation] | None = None, mb: list[Evaluation] | None = None, held: str | None = None,
    ) -> tuple[bool, dict[str, float]]:
        """Wait for a person's decision on a pending proposal and apply it. `val` and `mb` are the
        proposal's validation and mini-batch evaluations; a proposal `held` for review without
        them (see `_hold`) has what is accepted scored first, as an edited value always is. A
        malformed reply has no value to accept, and a time-out's fallback never accepts a held
        proposal: both count as a rejection, which gives it back its `held` fate. What is accepted
        after being scored here (a held proposal, an edited value) has those scores stored on the
        proposal (mini-batch and validation score and baseline); an edited value's replace the
        scores of the value it replaced, and its reason says so."""
        self.progress("pending", {"step": step, "parameter": param.name, "proposal": proposal.id})
        # The time-out's fallback never accepts a held proposal (see below): say so while it waits.
        decision, value, by = self.wait_for_decision(proposal.id, fallback="reject" if held else None)
        now = time.time()
        if held and decision == "accept" and (held == "malformed" or by.startswith("timeout")):
            decision = "reject"
        if decision == "reject":
            self.store.update_proposal(proposal.id, fate=held or "rejected", decided_by=by, decided_at=now)
            return False, baseline
        reason = f"accepted by {by}" if not by.startswith("timeout") else f"accepted by fallback ({by})"
        if decision == "edit":
            reason = f"edited, then accepted by {by}"
        else:
            value = proposal.value
            if held:
                reason = f"accepted by {by} over the check ({proposal.reason})"
        scores: dict[str, float | None] = {}
        if decision == "edit" or val is None or mb is None:
            overrides = {param.name: value}
            val = self.evaluate(self.val, overrides, phase="validate", step=step, proposal_id=proposal.id)
            mb = self.evaluate(minibatch, overrides, phase="validate", step=step, proposal_id=proposal.id)
            # The scores of what was accepted (an edited value's, a held proposal's) are stored on
            # the proposal, as a validated proposal's are, so every page shows them.
            first = judge(mb, baseline, self.minibatch_rule, stage="mini-batch")
            second = judge(val, {e.sample_id: e.score for e in self.current_val_evals}, self.val_rule,
                           stage="validation", expected=len(self.val))
            scores = {"minibatch_score": first.score, "minibatch_baseline": first.baseline,
                      "val_score": second.score, "val_baseline": second.baseline}
            if decision == "edit":
                reason += " (the scores are the edited value's)"
        self.store.update_proposal(proposal.id, fate="accepted", decided_by=by, decided_at=now, reason=reason,
                                   **scores)
        self._accept(step, param, value, proposal.id, val)
        self.buffer.flush()
        return True, _scores(mb)

    def wait_for_decision(self, proposal_id: str, fallback: str | None = None) -> tuple[str, str | None, str]:
        """Poll the store for a person's decision on a pending proposal: (decision, value, by).
        A stop request rejects it; after `review_timeout` seconds the run's `review_fallback` (or
        `fallback`) decides. The wait's end is recorded first as a "review_wait" run event (JSON:
        proposal, until in Unix time, fallback), so the Review page can show the time left."""
        deadline = time.monotonic() + self.config.review_timeout
        self.store.add_run_event(self.run_id, REVIEW_WAIT, json.dumps({
            "proposal": proposal_id, "until": time.time() + self.config.review_timeout,
            "fallback": fallback or self.config.review_fallback}))
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
            self.best_val = mean_score(val)
        self.progress("accepted", {"step": step, "parameter": param.name, "val": self.best_val})

    # --- helpers ----------------------------------------------------------------------------

    def evaluate(self, samples: Sequence[dict], overrides: dict[str, str], *, phase: str, step: int,
                 stop_when=None, proposal_id: str | None = None) -> list[Evaluation]:
        """Score samples under `overrides` (see autodiff.scoring.run_samples). A sample that
        errored on a fault that may pass (`may_pass`: a rate limit or server fault that outlasted
        its call's retries) is asked once more after the others, so that a passing fault leaves no
        hole in a comparison (`judge`), unless more than the allowed share of the samples errored
        (an outage: the run stops, and a resume asks again). An errored sample comes back with
        score None; every attempt's calls are recorded. `proposal_id` tags the calls with the
        proposal being scored."""
        def scored(batch: Sequence[dict], stop=None) -> list[Evaluation]:
            return [e for _, e in run_samples(self.task, batch, self.roles.forward, self.pool,
                                              window=self.config.concurrency, run_id=self.run_id, step=step,
                                              phase=phase, overrides=overrides, stop_when=stop,
                                              proposal_id=proposal_id)]

        evals = scored(samples, stop_when)
        by_id = {s["id"]: s for s in samples}
        holes = [by_id[e.sample_id] for e in evals if may_pass(e)]
        if not holes or sum(e.errored for e in evals) > self.config.max_error_share * len(evals):
            return evals
        again = {e.sample_id: e for e in scored(holes)}
        return [again.get(e.sample_id, e) for e in evals]

    def _history(self, param: Parameter) -> list[HistoryEntry]:
        versions = self.store.parameter_versions(self.run_id, param.name)
        steps = {s.step: s.val_score for s in self.store.steps(self.run_id)}
        props = {p.id: p for p in self.store.proposals(self.run_id, parameter=param.name)}
        entries = []
        for v in versions:
            score = props[v.proposal_id].val_score if v.proposal_id in props else steps.get(v.step)
            entries.append(HistoryEntry(v.value, score, v.step))
        entries.sort(key=lambda h: -(h.val_score or 0.0))
        return entries[:3]

    def _tried_values(self, param: Parameter) -> list[str]:
        values = [v.value.strip() for v in self.store.parameter_versions(self.run_id, param.name)]
        values += [p.value.strip() for p in self.store.proposals(self.run_id, parameter=param.name)]
        return values


def _scores(evals: Sequence[Evaluation]) -> dict[str, float | None]:
    return {e.sample_id: e.score for e in evals}


def _prediction(trace: Trace) -> str:
    loss = trace.loss
    return loss.inputs[0].text if loss else ""

