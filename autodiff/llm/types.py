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
    """What a provider is asked. Part of the cache key, so keep every field deterministic."""

    messages: tuple[Message, ...]
    temperature: float = 0.0
    max_tokens: int = 512

    def as_key_dict(self) -> dict:
        return {
            "messages": [[m.role, m.content] for m in self.messages],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }


@dataclass(frozen=True)
class Completion:
    """What a provider returns: the text and the token counts the server reported."""

    text: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class CallContext:
    """Where in a run an LLM call happens; every recorded call carries one."""

    run_id: str | None = None
    step: int | None = None
    phase: str = "forward"  # forward | backward | propose | validate | test
    node: str | None = None
    sample_id: str | None = None
    call_index: int | None = None
    role: str = "forward"  # forward | backward | optimizer
    extra: dict = field(default_factory=dict, compare=False)


class Provider(Protocol):
    """A provider implements one method. It raises LLMTransientError for faults worth retrying
    (429, 5xx, time-out, connection error, unparseable body) and LLMFatalError for the rest
    (401, 403, 404, 400). It never retries itself: retries live in autodiff.llm.client only."""

    name: str

    def complete(self, model: str, request: Request) -> Completion: ...
