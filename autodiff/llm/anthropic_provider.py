"""Anthropic's Messages API through the official SDK.

Temperature is not sent. SDK 1.0 removed the sampling options from ``messages.create`` and the
API version this SDK speaks (2026-10-21) answers 400 to any of them, even at the default; newer
models reject them under every version. ``Request.temperature`` still enters the cache key, so
runs stay reproducible from the cache, but Anthropic samples as it sees fit.

The provider never retries; it sorts failures into LLMTransientError (retry) and LLMFatalError
(stop the run) for the caller.
"""

from __future__ import annotations

import os

import anthropic

from autodiff.errors import ConfigError
from autodiff.llm.sdk_errors import PLACEHOLDER_KEY, SDKGuard, excerpt
from autodiff.llm.types import Completion, Request


class AnthropicProvider:
    name = "anthropic"

    def __init__(
        self, api_key: str | None = None, base_url: str | None = None, timeout: float = 60.0
    ) -> None:
        api_key = api_key or os.environ.get("ANTHROPIC_API_KEY") or None
        base_url = base_url or os.environ.get("ANTHROPIC_BASE_URL") or None
        if api_key is None and base_url is None:
            raise ConfigError(
                "no Anthropic API key: set ANTHROPIC_API_KEY (or ANTHROPIC_BASE_URL for a proxy "
                "or local server that speaks the Anthropic Messages API)"
            )
        self._client = anthropic.Anthropic(
            api_key=api_key or PLACEHOLDER_KEY, base_url=base_url, max_retries=0, timeout=timeout
        )
        self.base_url = str(self._client.base_url)
        self._guard = SDKGuard(self.name, anthropic, api_key or PLACEHOLDER_KEY, self.base_url, timeout,
                               "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL")

    def complete(self, model: str, request: Request) -> Completion:
        # Anthropic takes the system prompt apart from the turns.
        system = "\n\n".join(m.content for m in request.messages if m.role == "system")
        turns = [{"role": m.role, "content": m.content} for m in request.messages if m.role != "system"]
        response = self._guard.call(model, lambda: self._client.messages.create(
            model=model, messages=turns, max_tokens=request.max_tokens,
            **({"system": system} if system else {}),
        ))
        # Non-strict parsing lets odd bodies through as strings or half-empty objects.
        blocks = getattr(response, "content", None)
        if not isinstance(blocks, list):
            raise self._guard.transient(model, f"reply has no content: {excerpt(repr(response))}")
        text = "".join(
            b.text for b in blocks if getattr(b, "type", None) == "text" and isinstance(b.text, str)
        )
        usage = getattr(response, "usage", None)
        return Completion(
            text=text,
            prompt_tokens=getattr(usage, "input_tokens", None) or 0,
            completion_tokens=getattr(usage, "output_tokens", None) or 0,
        )
