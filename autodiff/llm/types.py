"""Records shared by every provider: one request shape, one completion shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Request:
    """What a provider is asked. Everything but `timeout` is part of the cache key, so keep
    every such field deterministic.

    `max_tokens` is the visible reply's budget in tokens; a reasoning model's provider adds room
    for its hidden reasoning (see `autodiff.llm.models`). `reasoning_effort` (none, minimal, low,
    medium, high) is sent only to model families that take it. `timeout` is seconds to wait for
    the reply once sent (None: the provider's default; see `OpenAIProvider`)."""

    messages: tuple[Message, ...]
    temperature: float = 0.0
    max_tokens: int = 512
    reasoning_effort: str | None = None
    timeout: float | None = field(default=None, compare=False)
    # Which role asks (forward, backward, optimizer): not sent to providers, not in the cache
    # key; scripted models answer by it.
    role: str | None = field(default=None, compare=False)

    def as_key_dict(self) -> dict:
        key = {
            "messages": [[m.role, m.content] for m in self.messages],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if self.reasoning_effort is not None:  # absent when unset: older cache keys stay valid
            key["reasoning_effort"] = self.reasoning_effort
        return key


@dataclass(frozen=True)
class Completion:
    """What a provider returns: the answer text and the usage the server reported.

    `finish_reason` is normalised across providers: "stop" (the model ended its reply), "length"
    (cut off by the token limit: OpenAI `length`, Anthropic `max_tokens`), "content_filter", or
    None when the server did not say. `reasoning` is what the model wrote as reasoning (OpenAI-
    compatible `reasoning_content`, Anthropic thinking blocks, or `<think>` text in the reply),
    never part of `text`. Token counts are the server's: `cached_prompt_tokens` of the prompt were
    served from the provider's prompt cache (OpenAI cached tokens, Anthropic cache reads),
    `cache_write_tokens` were written to it (Anthropic), `reasoning_tokens` of the completion were
    hidden reasoning."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    reasoning: str = ""
    cached_prompt_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def cut_off(self) -> bool:
        return self.finish_reason == "length"


@dataclass(frozen=True)
class CallContext:
    """Where in a run an LLM call happens; every recorded call carries one."""

    run_id: str | None = None
    step: int | None = None
    phase: str = "forward"  # forward | backward | propose | validate | test | preflight
    node: str | None = None
    sample_id: str | None = None
    call_index: int | None = None
    role: str = "forward"  # forward | backward | optimizer
    proposal_id: str | None = None  # the proposal being scored, for validation calls
    extra: dict = field(default_factory=dict, compare=False)


class Provider(Protocol):
    """A provider implements one method. It raises LLMTransientError for faults worth retrying
    (429, 5xx, time-out, connection error, unparseable body; with `retry_after` when the server
    asked for a wait), LLMReplyError for a reply with no text, LLMContextWindowError for a prompt
    too long for the model, and LLMFatalError for the rest (401, 403, 404, 400). It never
    retries itself: retries live in autodiff.llm.client only.

    `endpoint` names where requests go (an API's base URL, or the model file for an in-process
    model): the cache key and the per-endpoint concurrency limit use it. A provider may also
    define `check(model)`, a free way to verify a model before a run (the client otherwise asks
    one tiny question)."""

    name: str
    endpoint: str

    def complete(self, model: str, request: Request) -> Completion: ...
