"""Anthropic's Messages API through the official SDK.

Temperature is not sent. SDK 1.0 removed the sampling options from ``messages.create`` and the
API version this SDK speaks (2026-10-21) answers 400 to any of them, even at the default; newer
models reject them under every version. ``Request.temperature`` still enters the cache key, so
runs stay reproducible from the cache, but Anthropic samples as it sees fit.

Extended thinking is switched on for the model families that have it (`autodiff.llm.models`)
when the request names a reasoning effort: the effort's thinking budget is sent, and added to
``max_tokens``, which counts thinking and answer together. The answer is every text block of
the reply in order; thinking blocks become `Completion.reasoning`.

Requests that name no time-out get 600 s, or no read limit for a server on this machine or the
local network (see `autodiff.llm.sdk_errors`). The provider never retries; it translates
replies and failures for the client (`autodiff.llm.client`).
"""

from __future__ import annotations

import os
from typing import Any

import anthropic

from autodiff.errors import ConfigError
from autodiff.llm.models import THINKING_BUDGET, family_of
from autodiff.llm.sdk_errors import PLACEHOLDER_KEY, SDKGuard, excerpt, token_count
from autodiff.llm.types import Completion, Request

# stop_reason -> the normalised finish reason (see `Completion`); others (tool_use, pause_turn) -> None.
STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",  # the reply filled what the context window left
    "refusal": "content_filter",
}

# What stands in the reasoning for thinking the API returns encrypted.
REDACTED_THINKING = "[redacted thinking]"


class AnthropicProvider:
    name = "anthropic"

    def __init__(
        self, api_key: str | None = None, base_url: str | None = None, timeout: float | None = None
    ) -> None:
        api_key = api_key or os.environ.get("ANTHROPIC_API_KEY") or None
        base_url = base_url or os.environ.get("ANTHROPIC_BASE_URL") or None
        if api_key is None and base_url is None:
            raise ConfigError(
                "no Anthropic API key: set ANTHROPIC_API_KEY (or ANTHROPIC_BASE_URL for a proxy "
                "or local server that speaks the Anthropic Messages API)"
            )
        self._client = anthropic.Anthropic(api_key=api_key or PLACEHOLDER_KEY, base_url=base_url, max_retries=0)
        self.endpoint = str(self._client.base_url)
        self._guard = SDKGuard(self.name, anthropic, api_key or PLACEHOLDER_KEY, self.endpoint, timeout,
                               "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL")

    def _options(self, model: str, request: Request) -> dict[str, Any]:
        """The request fields that depend on the model's family."""
        family = family_of(self.name, model)
        effort = request.reasoning_effort
        options: dict[str, Any] = {"max_tokens": family.completion_budget(request.max_tokens, effort)}
        if family.thinking == "enabled" and effort in THINKING_BUDGET:
            options["thinking"] = {"type": "enabled", "budget_tokens": THINKING_BUDGET[effort]}
        elif family.thinking == "adaptive" and effort in THINKING_BUDGET:
            options["thinking"] = {"type": "adaptive"}
            options["output_config"] = {"effort": "low" if effort == "minimal" else effort}
        return options

    def complete(self, model: str, request: Request) -> Completion:
        # Anthropic takes the system prompt apart from the turns.
        system = "\n\n".join(m.content for m in request.messages if m.role == "system")
        turns = [{"role": m.role, "content": m.content} for m in request.messages if m.role != "system"]
        response = self._guard.call(model, request, lambda timeout: self._client.messages.create(
            model=model, messages=turns, timeout=timeout, **self._options(model, request),
            **({"system": system} if system else {}),
        ))
        # Non-strict parsing lets odd bodies through as strings or half-empty objects.
        blocks = getattr(response, "content", None)
        if not isinstance(blocks, list):
            raise self._guard.garbage(model, f"reply has no content: {excerpt(repr(response))}")
        text, reasoning = [], []
        for block in blocks:
            kind = getattr(block, "type", None)
            if kind == "text" and isinstance(getattr(block, "text", None), str):
                text.append(block.text)
            elif kind == "thinking" and isinstance(getattr(block, "thinking", None), str):
                reasoning.append(block.thinking)
            elif kind == "redacted_thinking":
                reasoning.append(REDACTED_THINKING)
        usage = getattr(response, "usage", None)
        cache_reads = token_count(usage, "cache_read_input_tokens")
        cache_writes = token_count(usage, "cache_creation_input_tokens")
        completion = Completion(
            text="".join(text),  # one answer, split into blocks around citations and the like
            prompt_tokens=token_count(usage, "input_tokens") + cache_reads + cache_writes,
            completion_tokens=token_count(usage, "output_tokens"),
            finish_reason=STOP_REASONS.get(str(getattr(response, "stop_reason", None))),
            reasoning="\n\n".join(r for r in reasoning if r.strip()),
            cached_prompt_tokens=cache_reads,
            cache_write_tokens=cache_writes,
            reasoning_tokens=token_count(getattr(usage, "output_tokens_details", None), "thinking_tokens"),
        )
        if not completion.text:
            raise self._guard.empty_reply(model, completion)
        return completion

