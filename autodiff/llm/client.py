"""The one place LLM calls go through: cache, retries, the per-endpoint concurrency limit,
reasoning kept apart from the answer, and the record of every call.

What a call can end as, and what happens to it:

- a usable reply: returned; cached unless it was cut off at the token limit or the caller's
  `validate` refused it (an unparseable reply is asked again next time, never replayed);
- a transient fault (429, 5xx, time-out, connection error, garbage body): retried with backoff
  that honours the server's Retry-After, for up to `RetryPolicy.budget_s` seconds in all; the
  endpoint's limiter backs off meanwhile; after the budget, `LLMTransientError`. Every wait
  counts against the budget, the call's own backoff and the endpoint's shared pause after a 429
  alike; when the server asks for a wait longer than what is left (or the endpoint is paused for
  longer than a new call's whole budget), the call gives up at once and says so, with the budget
  that would have been enough;
- a reply with no answer text (empty, or reasoning only) or a prompt too long for the context
  window: `LLMReplyError` / `LLMContextWindowError` at once (asking again would pay for the
  same outcome);
- a fatal fault (bad key, unknown model, a rejected option): `LLMFatalError` naming the role.

Every call is recorded once, failed or not, with the usage the server reported for all of its
attempts, so recorded tokens match the server's count, and priced once as it is recorded
(`autodiff.llm.pricing`). A run's `Budget` is asked before each call that our cache does not
answer; a call that might not fit is never sent (`BudgetExceeded`).
"""

from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from autodiff.errors import (AutodiffError, BudgetExceeded, LLMError, LLMFatalError, LLMReplyError,
                             LLMTransientError)
from autodiff.llm.budget import Budget
from autodiff.llm.cache import ResponseCache, cache_key
from autodiff.llm.limits import EndpointLimiter
from autodiff.llm.pricing import NO_USAGE_SOURCE, SOURCE_LOCAL, Price, Pricing, count
from autodiff.llm.sdk_errors import MAX_RETRY_AFTER
from autodiff.llm.types import CallContext, Completion, Message, Provider, Request
from autodiff.records import LLMCall

CACHE_MODES = ("use", "refresh", "off")
# Faults that say the endpoint is overloaded: the limiter backs off on these.
OVERLOAD_KINDS = ("rate_limit", "timeout", "server", "connection")


@dataclass(frozen=True)
class RetryPolicy:
    """How long one call keeps trying after transient faults.

    `budget_s`: seconds from the first failure after which no further attempt starts (a wait
    that would end past it is not begun; time queued before the first failure is not counted). `attempts`: an optional cap on requests (None: only
    the time budget). Waits grow exponentially from `initial_wait` to `max_wait` seconds with
    jitter, and are never shorter than what the server asked for in Retry-After."""

    budget_s: float = 300.0
    attempts: int | None = None
    initial_wait: float = 1.0
    max_wait: float = 60.0


PREFLIGHT_RETRY = RetryPolicy(budget_s=30.0, attempts=3)


@dataclass(frozen=True)
class Reply:
    text: str
    call_id: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    finish_reason: str | None = None
    reasoning: str = ""

    @property
    def cut_off(self) -> bool:
        """The reply stopped at the token limit, not where the model ended it."""
        return self.finish_reason == "length"


Recorder = Callable[[LLMCall], None]
Validate = Callable[[str], object]

# Reasoning some models write into the visible reply (DeepSeek-R1, Qwen3 and others served
# without a reasoning parser): a leading <think> block; unclosed when the reply was cut off.
# (<reasoning> is not among them: the optimizer's proposals use that tag for their own field.)
_THINK = re.compile(r"^\s*<(think|thinking)>(.*?)(?:</\1>|\Z)", re.S | re.I)
# Chat templates that open the block in the prompt (DeepSeek-R1, Qwen3) leave only its end.
_THINK_END = re.compile(r"^(.*?)</(think|thinking)>", re.S | re.I)


def split_reasoning(text: str) -> tuple[str, str]:
    """(answer, reasoning) of a visible reply: a leading <think>/<thinking> block,
    or everything before a closing tag whose opening tag was in the prompt, is reasoning,
    never part of the answer."""
    match = _THINK.match(text)
    if match:
        return text[match.end():].lstrip(), match.group(2).strip()
    match = _THINK_END.match(text)
    if match:
        return text[match.end():].lstrip(), match.group(1).strip()
    return text, ""


class _RetryBudget:
    """tenacity stop: no further attempt once `budget_s` seconds have passed since the first
    failure, or when the next wait would end past that (time a request spent queued before it
    first failed does not count), or after `attempts` requests. The next wait is the longer of
    the call's own backoff and what is left of the endpoint's pause (`pause_left`); when what the
    server asked for (Retry-After, or that pause) is what does not fit, `asked` keeps it."""

    def __init__(self, budget_s: float, attempts: int | None, pause_left: Callable[[], float]):
        self.budget_s, self.attempts, self.pause_left = budget_s, attempts, pause_left
        self.first_failure: float | None = None
        self.asked: float | None = None

    def __call__(self, state: RetryCallState) -> bool:
        now = time.monotonic()
        if self.first_failure is None:  # consulted right after each failed attempt
            self.first_failure = now
        if self.attempts and state.attempt_number >= self.attempts:
            return True
        spent = now - self.first_failure
        server_wait = max(_retry_after(state) or 0.0, self.pause_left())
        # What the server asked is named only when it is what does not fit: a budget spent on
        # attempts that each timed out is not a Retry-After, and a larger budget would not help.
        if server_wait > MAX_RETRY_AFTER or (server_wait and spent <= self.budget_s < spent + server_wait):
            self.asked = server_wait
            return True
        return spent + max(state.upcoming_sleep, server_wait) > self.budget_s

    @property
    def deadline(self) -> float | None:
        """The monotonic time past which no wait may go; None before the first failure."""
        return None if self.first_failure is None else self.first_failure + self.budget_s

    @property
    def spent(self) -> float:
        return time.monotonic() - self.first_failure if self.first_failure is not None else 0.0


class _PauseTooLong(Exception):
    """The endpoint's pause (another call's 429) ends past this call's retry deadline."""

    def __init__(self, left: float):
        super().__init__(f"the endpoint is paused for {left:.0f} s more")
        self.left = left


def _retry_after(state: RetryCallState) -> float | None:
    return getattr(state.outcome.exception(), "retry_after", None) if state.outcome else None


def enough_retry_budget(seconds: float) -> int:
    """A retry budget that covers a wait of `seconds` with room to spare: a quarter more,
    rounded up to ten seconds (a 120 s Retry-After: 150)."""
    return max(10, math.ceil(round(seconds) * 1.25 / 10) * 10)


class _WaitForServer:
    """Exponential backoff with jitter, but never less than the Retry-After the server sent."""

    def __init__(self, policy: RetryPolicy):
        self._backoff = wait_exponential_jitter(multiplier=policy.initial_wait, max=policy.max_wait,
                                                jitter=policy.initial_wait)

    def __call__(self, state: RetryCallState) -> float:
        return max(min(_retry_after(state) or 0.0, MAX_RETRY_AFTER), self._backoff(state))


class LLM:
    """A model for one role (forward, backward or optimizer), named `provider:model`.

    `cache_mode`: "use" reads and writes the cache; "refresh" writes it and reads only entries
    written since `cache_since` (a Unix time: the run's start), so a run asks everything anew
    once; "off" never reads it but still writes. `timeout` (seconds, None for the provider's
    default) and `reasoning_effort` go into every request of this role. `pricing` prices each
    recorded call (default: the price table, no prices of the user's); `budget`, shared by a
    run's roles, is asked before each call sent to the provider."""

    def __init__(
        self,
        spec: str,
        provider: Provider,
        *,
        cache: ResponseCache | None = None,
        recorder: Recorder | None = None,
        limiter: EndpointLimiter | None = None,
        retry: RetryPolicy = RetryPolicy(),
        max_tokens: int = 512,
        temperature: float = 0.0,
        timeout: float | None = None,
        reasoning_effort: str | None = None,
        cache_mode: str = "use",
        cache_since: float | None = None,
        role: str | None = None,
        pricing: Pricing | None = None,
        budget: Budget | None = None,
    ):
        if cache_mode not in CACHE_MODES:
            raise ValueError(f"cache mode {cache_mode!r}: use one of {CACHE_MODES}")
        self.spec = spec
        self.provider = provider
        self.model = spec.split(":", 1)[1]
        self.endpoint = getattr(provider, "endpoint", None)
        self.cache = cache
        self.recorder = recorder
        self.limiter = limiter or EndpointLimiter(8)
        self.retry = retry
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.timeout = timeout
        self.reasoning_effort = reasoning_effort
        self.cache_mode = cache_mode
        self.cache_since = cache_since
        self.role = role
        self.pricing = pricing or Pricing()
        self.budget = budget

    def request(self, messages: Sequence[Message] | str, *, max_tokens: int | None = None,
                temperature: float | None = None) -> Request:
        """The request this role sends for `messages` (a string is one user message)."""
        if isinstance(messages, str):
            messages = (Message("user", messages),)
        return Request(
            messages=tuple(messages),
            temperature=self.temperature if temperature is None else temperature,
            max_tokens=max_tokens or self.max_tokens,
            reasoning_effort=self.reasoning_effort,
            timeout=self.timeout,
            role=self.role,
        )

    def complete(
        self,
        messages: Sequence[Message] | str,
        ctx: CallContext,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        validate: Validate | None = None,
    ) -> Reply:
        """Ask the model; returns its reply, or raises an LLMError subclass (see the module doc).

        `validate(text)` is the caller's parser: if it raises, the reply is still returned and
        recorded but not cached, so a later run asks again instead of replaying it."""
        request = self.request(messages, max_tokens=max_tokens, temperature=temperature)
        call_id = uuid.uuid4().hex
        started = time.perf_counter()
        key = cache_key(self.provider.name, self.model, request, self.endpoint) if self.cache else None
        completion = None
        if self.cache is not None and self.cache_mode != "off":
            completion = self.cache.get(key, self.cache_since if self.cache_mode == "refresh" else None)
        cached = completion is not None
        attempts: list[int] = []
        usage = [0, 0]
        error: LLMError | None = None
        reservation = None
        if completion is None and self.budget is not None and self.budget.limited:
            reservation = self.budget.reserve(self.spec, self.endpoint, request, ctx, self.pricing)
        try:
            if completion is None:
                completion = self._call_with_retries(request, attempts, usage, ctx)
                if self.cache is not None and not completion.cut_off and _valid(validate, completion.text):
                    self.cache.put(key, completion)
        except LLMError as exc:
            error = exc
            raise
        except BaseException as exc:  # Ctrl-C, SIGTERM, a call given up on an interrupt (CallCancelled)
            if completion is None:  # no reply: recorded as such, never as a reply with unknown tokens
                error = LLMError(f"interrupted ({type(exc).__name__}) before its reply", kind="interrupted")
            raise
        finally:
            call = self._record(call_id, ctx, request, completion, cached, started, error, len(attempts), usage)
            if self.budget is not None:
                self.budget.settle(reservation, call, usage_unknown=_no_usage(completion, cached, usage))
        return Reply(completion.text, call_id, completion.prompt_tokens, completion.completion_tokens, cached,
                     completion.finish_reason, completion.reasoning)

    def preflight(self, ctx: CallContext) -> None:
        """Check this role's model before a run spends anything: the provider's own `check`
        when it has one (a model file loads), else one tiny question, never cached. Raises
        LLMFatalError naming the role and model on a wrong name, key, endpoint or option, or
        when the endpoint cannot be reached."""
        check = getattr(self.provider, "check", None)
        role = ctx.role or self.role or "model"
        try:
            if check is not None:
                check(self.model)
                return
            # A Retry-After the run's own retry budget would sit out does not fail the probe.
            retry = replace(PREFLIGHT_RETRY, budget_s=max(PREFLIGHT_RETRY.budget_s, self.retry.budget_s))
            probe = LLM(self.spec, self.provider, recorder=self.recorder, limiter=self.limiter,
                        retry=retry, timeout=self.timeout, reasoning_effort=self.reasoning_effort,
                        role=self.role, pricing=self.pricing, budget=self.budget)
            probe.complete("Reply with the word OK.", replace(ctx, phase="preflight"), max_tokens=16)
        except LLMReplyError:
            return  # the model answered; an empty answer to a probe says nothing about the run
        except (LLMFatalError, BudgetExceeded):
            raise  # a budget reached says nothing about the model
        except AutodiffError as exc:
            raise LLMFatalError(f"{role} model {self.spec} is not usable: {exc}") from exc

    def _call_with_retries(self, request: Request, attempts: list[int], usage: list[int],
                           ctx: CallContext) -> Completion:
        policy = self.retry
        budget = _RetryBudget(policy.budget_s, policy.attempts, self.limiter.pause_left)
        retrying = Retrying(stop=budget, wait=_WaitForServer(policy), sleep=self.limiter.sleep,
                            retry=retry_if_exception_type(LLMTransientError), reraise=True)
        last: list[LLMTransientError] = []
        try:
            for attempt in retrying:
                with attempt:
                    try:
                        return self._attempt(request, usage, attempts, budget.deadline, policy.budget_s)
                    except LLMTransientError as exc:
                        last[:] = [exc]
                        raise
        except LLMFatalError as exc:
            role = ctx.role or self.role or "model"
            raise LLMFatalError(f"{role} model {self.spec}: {exc}", usage=exc.usage) from exc
        except LLMTransientError as exc:
            raise self._gave_up(exc, len(attempts), budget) from exc
        except _PauseTooLong as exc:
            budget.asked = exc.left
            if not last:  # paused before this call sent anything: another call's rate limit
                last.append(LLMTransientError("the endpoint is paused after another call's rate limit (HTTP 429)",
                                              kind="rate_limit", retry_after=exc.left))
            raise self._gave_up(last[0], len(attempts), budget) from exc
        raise AssertionError("unreachable")

    def _gave_up(self, exc: LLMTransientError, attempts: int, budget: _RetryBudget) -> LLMTransientError:
        """The error of a call that retries no further: how far it got, and, when a wait the
        server asked for (its own Retry-After, or the endpoint's pause after another call's 429)
        did not fit what was left of the retry budget, that wait, the budget and one that fits."""
        spent = budget.spent
        tried = f"gave up after {count(attempts, 'attempt')} in {spent:.0f}s"
        if budget.asked is None:
            return LLMTransientError(f"{self.spec}: {tried}: {exc}",
                                     kind=exc.kind, retry_after=exc.retry_after)
        if budget.asked > MAX_RETRY_AFTER:  # no retry budget waits that long: say so, suggest none
            hours = f" ({budget.asked / 3600:.1f} h)" if budget.asked >= 3600 else ""
            return LLMTransientError(
                f"{self.spec}: the server asked to wait {budget.asked:.0f} s{hours}, longer than a call ever waits "
                f"({MAX_RETRY_AFTER:.0f} s): a limit that does not pass soon (a daily quota, a spending cap?); "
                f"stopped asking after {count(attempts, 'attempt')}. Check the provider account's limits, and resume "
                f"once it allows requests again: {exc}", kind=exc.kind, retry_after=exc.retry_after)
        enough = enough_retry_budget(spent + budget.asked)
        left = f" ({spent:.0f} s of it spent)" if spent >= 1 else ""
        return LLMTransientError(
            f"{self.spec}: the server asked to wait {budget.asked:.0f} s, more than the {budget.budget_s:g} s retry "
            f"budget{left}: {tried}; raise the retry budget to {enough} s or more (--retry-budget {enough}): {exc}",
            kind=exc.kind, retry_after=exc.retry_after)

    def _attempt(self, request: Request, usage: list[int], attempts: list[int] | None = None,
                 deadline: float | None = None, longest: float | None = None) -> Completion:
        """One request through the endpoint's limiter; adds its reported usage to `usage` and
        one to `attempts`. Raises _PauseTooLong, sending nothing, when the endpoint's pause
        ends past `deadline` or, before any failure of this call, lasts over `longest` seconds
        (its whole retry budget: a pause another call's 429 set is given up on at once, not sat
        out and then tried)."""
        # No wait here outlasts MAX_RETRY_AFTER either: a pause as long as a server asked for (a
        # day, for a quota) is given up on at once, and the error says what was asked.
        cap = MAX_RETRY_AFTER if deadline is not None or longest is None else min(longest, MAX_RETRY_AFTER)
        slot = self.limiter.acquire(deadline, longest=cap)
        if slot is None:
            raise _PauseTooLong(self.limiter.pause_left())
        if attempts is not None:
            attempts.append(1)
        outcome, pause = "other", None
        try:
            completion = self.provider.complete(self.model, request)
            outcome = "ok"
        except LLMError as exc:
            if exc.usage:
                usage[0] += exc.usage[0]
                usage[1] += exc.usage[1]
            if isinstance(exc, LLMTransientError) and exc.kind in OVERLOAD_KINDS:
                outcome, pause = "overload", exc.retry_after  # as asked: callers give up on what they cannot wait
            if isinstance(exc, LLMReplyError) and getattr(exc, "finish_reason", None) == "length":
                exc.args = (f"{exc}: {raise_tokens(self.role)}",)  # cut off before any text: say which limit
            raise
        finally:
            self.limiter.release(slot, outcome, pause)
        usage[0] += completion.prompt_tokens
        usage[1] += completion.completion_tokens
        answer, thought = split_reasoning(completion.text)
        reasoning = "\n\n".join(r for r in (completion.reasoning, thought) if r)
        if not answer.strip():
            cut = f" (cut off at the token limit: {raise_tokens(self.role)})" if completion.cut_off else ""
            said = "only reasoning" if reasoning else "no text"
            error = LLMReplyError(f"{self.spec}: the reply held {said}{cut}",
                                  usage=(completion.prompt_tokens, completion.completion_tokens))
            error.finish_reason, error.reasoning = completion.finish_reason, reasoning  # for the record
            raise error
        return replace(completion, text=answer, reasoning=reasoning)

    def _record(self, call_id: str, ctx: CallContext, request: Request, completion: Completion | None,
                cached: bool, started: float, error: LLMError | None, attempts: int,
                usage: list[int]) -> LLMCall | None:
        """The call's record, priced, handed to the recorder; None when nobody keeps it."""
        if self.recorder is None and self.budget is None:
            return None
        fresh = completion is not None and not cached
        call = LLMCall(
            id=call_id,
            run_id=ctx.run_id,
            step=ctx.step,
            phase=ctx.phase,
            role=ctx.role,
            node=ctx.node,
            sample_id=ctx.sample_id,
            call_index=ctx.call_index,
            model=self.spec,
            messages=tuple((m.role, m.content) for m in request.messages),
            response=completion.text if completion else None,
            # A cached reply reports what it cost when it was made; accounting counts it as 0.
            prompt_tokens=completion.prompt_tokens if cached else usage[0],
            completion_tokens=completion.completion_tokens if cached else usage[1],
            latency_ms=(time.perf_counter() - started) * 1000.0,
            cached=cached,
            error=f"{type(error).__name__}: {error}" if error else None,
            created_at=time.time(),
            endpoint=self.endpoint,
            finish_reason=completion.finish_reason if completion else getattr(error, "finish_reason", None),
            reasoning=(completion.reasoning if completion else getattr(error, "reasoning", "")) or None,
            attempts=attempts,
            error_kind=error.kind if error else None,
            cached_prompt_tokens=completion.cached_prompt_tokens if completion else 0,
            cache_write_tokens=completion.cache_write_tokens if fresh else 0,
            reasoning_tokens=completion.reasoning_tokens if completion else 0,
            proposal_id=ctx.proposal_id,
        )
        price = self.pricing.price(
            self.spec, self.endpoint, cached=cached, prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens, cached_prompt_tokens=call.cached_prompt_tokens,
            cache_write_tokens=completion.cache_write_tokens if completion else 0,
            reasoning_tokens=call.reasoning_tokens, at=call.created_at)
        if _no_usage(completion, cached, usage) and price.source != SOURCE_LOCAL:
            # The server said nothing of the tokens it billed: unknown, not 0. For a cache hit that
            # is what the reply would have cost (the hit itself costs nothing).
            price = Price(0.0, None, NO_USAGE_SOURCE) if cached else Price(None, 0.0, NO_USAGE_SOURCE)
        call = replace(call, cost_usd=price.usd, saved_usd=price.saved_usd, price_source=price.source)
        if self.recorder is not None:
            self.recorder(call)
        return call


def raise_tokens(role: str | None) -> str:
    """What to raise when a reply of `role` is cut off at its token limit, as a person sets it:
    the optimizer's and backward's limits are run options, a forward node's is its own."""
    flag = {"optimizer": "--optimizer-max-tokens", "backward": "--max-tokens"}.get(role or "")
    if flag:
        return f"raise {flag} or lower --reasoning-effort"
    return ("raise the node's max_tokens (in the pipeline's code; --max-tokens for nodes without their own) or "
            "lower --reasoning-effort")


def _no_usage(completion: Completion | None, cached: bool, usage: list[int]) -> bool:
    """A reply whose server reported no token usage at all (no `usage`, or zero tokens both ways
    for a reply it did send): its tokens, and so its cost, are unknown. For a reply from our
    response cache, the usage stored with it when it was made."""
    if completion is None:
        return False
    if cached:
        return completion.prompt_tokens == 0 and completion.completion_tokens == 0
    return usage[0] == 0 and usage[1] == 0


def _valid(validate: Validate | None, text: str) -> bool:
    if validate is None:
        return True
    try:
        validate(text)
    except Exception:  # the caller's parser refused it: the reply stays out of the cache
        return False
    return True
