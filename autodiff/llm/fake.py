"""A scripted fake provider for tests and benchmarks: no network, exact control over replies."""

from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

from autodiff.errors import LLMTransientError
from autodiff.llm.types import Completion, Request

Responder = Callable[[Request], str]


def count_tokens(text: str) -> int:
    """A rough whitespace token count; the fake has no tokenizer."""
    return max(1, len(text.split()))


class FakeProvider:
    """Answers each request with `responder(request)` (or the next item of a list), after
    `latency` seconds. A reply that is an Exception instance is raised instead. Records every
    request it receives in `requests`, in order."""

    name = "fake"
    endpoint = "fake"

    def __init__(self, responder: Responder | Sequence[str | Exception] = "ok", latency: float = 0.0):
        self._responder = responder
        self._script = None if callable(responder) or isinstance(responder, str) else list(responder)
        self.latency = latency
        self.requests: list[tuple[str, Request]] = []
        self._lock = threading.Lock()

    def complete(self, model: str, request: Request) -> Completion:
        with self._lock:
            self.requests.append((model, request))
            reply = self._next(request)
        if self.latency:
            time.sleep(self.latency)
        if isinstance(reply, Exception):
            raise reply
        prompt = " ".join(m.content for m in request.messages)
        return Completion(reply, count_tokens(prompt), count_tokens(reply))

    def _next(self, request: Request) -> str | Exception:
        if self._script is not None:
            if not self._script:
                return LLMTransientError("fake provider: script exhausted")
            return self._script.pop(0)
        if isinstance(self._responder, str):
            return self._responder
        return self._responder(request)

    def check(self, model: str) -> None:
        """Nothing to check, and a scripted reply list is not consumed by a run's preflight."""

    @property
    def calls(self) -> int:
        return len(self.requests)
