"""A scripted fake provider for tests and benchmarks: no network, exact control over replies."""

from __future__ import annotations

import threading
import time
import uuid
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


Reply = str | Sequence[str] | Callable[[str], str]


class ScriptedModel(FakeProvider):
    """A scripted model for testing your own pipeline without an API key (like DSPy's dummy LM).

    Each role answers with a fixed text, a list of texts (one per call, the last repeated once
    the list runs out), or a function of the prompt text (the user messages, joined):

        model = ScriptedModel(
            forward=lambda prompt: "Answer: 4",
            backward="<feedback>Say the number only.</feedback>",
            optimizer=[ScriptedModel.proposal("Answer with the number only.")],
        )
        result = autodiff.train(task, model=model, steps=1)

    Defaults: the forward role answers "ok", the backward role writes one short feedback, and
    the optimizer proposes nothing (it repeats the current value, which the checks reject), so
    a run completes and shows every phase. Records every request in `requests`, like
    `FakeProvider`. Replies are counted as tokens by whitespace."""

    def __init__(self, forward: Reply = "ok",
                 backward: Reply = "<feedback>Be more specific about what the answer must be.</feedback>",
                 optimizer: Reply | None = None, latency: float = 0.0):
        self._replies = {"forward": _replies(forward), "backward": _replies(backward),
                         "optimizer": _replies(optimizer) if optimizer is not None else None}
        super().__init__(self._answer, latency=latency)
        # An endpoint of its own: the response cache keys on it, so a reply of another script
        # (an earlier run, another test) is never served in place of this one's.
        self.endpoint = f"scripted:{uuid.uuid4().hex}"

    @staticmethod
    def proposal(value: str, method: str = "rephrase", reasoning: str = "Scripted.") -> str:
        """One optimizer proposal in the format the optimizer parses, proposing `value`."""
        return (f"<proposal>\n<method>{method}</method>\n<reasoning>{reasoning}</reasoning>\n"
                f"<value>{value}</value>\n</proposal>")

    def _answer(self, request: Request) -> str:
        prompt = "\n".join(m.content for m in request.messages if m.role == "user")
        replies = self._replies.get(request.role or "forward", self._replies["forward"])
        if replies is None:  # the default optimizer: propose the current value, which is refused
            current = prompt.split("<current_value>", 1)[-1].split("</current_value>", 1)[0].strip()
            return self.proposal(current)
        return replies(prompt)


def _replies(reply: Reply) -> Callable[[str], str]:
    if callable(reply):
        return reply
    if isinstance(reply, str):
        return lambda prompt: reply
    items, lock = list(reply), threading.Lock()
    if not items:
        raise ValueError("a scripted reply list needs at least one reply")

    def next_reply(prompt: str) -> str:
        with lock:
            return items.pop(0) if len(items) > 1 else items[0]

    return next_reply
