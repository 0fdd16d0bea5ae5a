"""The one place LLM calls go through: cache, retries with backoff, concurrency limit, recording."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Sequence

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from autodiff.errors import LLMError, LLMFatalError, LLMTransientError
from autodiff.llm.cache import ResponseCache, cache_key
from autodiff.llm.types import CallContext, Completion, Message, Provider, Request
from autodiff.records import LLMCall


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    initial_wait: float = 1.0
    max_wait: float = 30.0


@dataclass(frozen=True)
class Reply:
    text: str
    call_id: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool


Recorder = Callable[[LLMCall], None]


class LLM:
    """A model for one role (forward, backward or optimizer), named `provider:model`."""

    def __init__(
        self,
        spec: str,
        provider: Provider,
        *,
        cache: ResponseCache | None = None,
        recorder: Recorder | None = None,
        limiter: threading.Semaphore | None = None,
        retry: RetryPolicy = RetryPolicy(),
        max_tokens: int = 512,
        temperature: float = 0.0,
    ):
        self.spec = spec
        self.provider = provider
        self.model = spec.split(":", 1)[1]
        self.cache = cache
        self.recorder = recorder
        self.limiter = limiter or threading.Semaphore(8)
        self.retry = retry
        self.max_tokens = max_tokens
        self.temperature = temperature

    def complete(
        self,
        messages: Sequence[Message] | str,
        ctx: CallContext,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Reply:
        if isinstance(messages, str):
            messages = (Message("user", messages),)
        request = Request(
            messages=tuple(messages),
            temperature=self.temperature if temperature is None else temperature,
            max_tokens=max_tokens or self.max_tokens,
        )
        call_id = uuid.uuid4().hex
        started = time.perf_counter()
        key = cache_key(self.provider.name, self.model, request) if self.cache else None
        completion = self.cache.get(key) if self.cache else None
        cached = completion is not None
        error: str | None = None
        try:
            if completion is None:
                completion = self._call_with_retries(request)
                if self.cache:
                    self.cache.put(key, completion)
        except LLMError as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._record(call_id, ctx, request, completion, cached, started, error)
        return Reply(completion.text, call_id, completion.prompt_tokens, completion.completion_tokens, cached)

    def _call_with_retries(self, request: Request) -> Completion:
        retrying = Retrying(
            stop=stop_after_attempt(self.retry.attempts),
            wait=wait_exponential_jitter(
                multiplier=self.retry.initial_wait, jitter=self.retry.initial_wait, max=self.retry.max_wait
            ),
            retry=retry_if_exception_type(LLMTransientError),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    with self.limiter:
                        return self.provider.complete(self.model, request)
        except LLMFatalError:
            raise
        except LLMTransientError as exc:
            raise LLMTransientError(
                f"{self.spec}: gave up after {self.retry.attempts} attempts: {exc}"
            ) from exc
        raise AssertionError("unreachable")

    def _record(self, call_id, ctx, request, completion, cached, started, error) -> None:
        if self.recorder is None:
            return
        self.recorder(
            LLMCall(
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
                prompt_tokens=completion.prompt_tokens if completion else 0,
                completion_tokens=completion.completion_tokens if completion else 0,
                latency_ms=(time.perf_counter() - started) * 1000.0,
                cached=cached,
                error=error,
                created_at=time.time(),
            )
        )
