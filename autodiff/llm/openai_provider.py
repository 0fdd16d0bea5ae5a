"""OpenAI, and any OpenAI-compatible server (Ollama, vLLM, llama.cpp's server, LM Studio).

Only the chat-completions endpoint is used: every compatible server serves it, while newer
OpenAI-only endpoints come back 404 from local servers. The provider never retries; it sorts
failures into LLMTransientError (retry) and LLMFatalError (stop the run) for the caller.
"""

from __future__ import annotations

import os

import openai

from autodiff.errors import ConfigError
from autodiff.llm.sdk_errors import PLACEHOLDER_KEY, SDKGuard, excerpt
from autodiff.llm.types import Completion, Request


class OpenAIProvider:
    name = "openai"

    def __init__(
        self, api_key: str | None = None, base_url: str | None = None, timeout: float = 60.0
    ) -> None:
        api_key = api_key or os.environ.get("OPENAI_API_KEY") or None
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        if api_key is None and base_url is None:
            raise ConfigError(
                "no OpenAI API key: set OPENAI_API_KEY, or set OPENAI_BASE_URL to use a local "
                "OpenAI-compatible server (Ollama, vLLM, llama.cpp's server), which needs no key"
            )
        self._client = openai.OpenAI(
            api_key=api_key or PLACEHOLDER_KEY, base_url=base_url, max_retries=0, timeout=timeout
        )
        self.base_url = str(self._client.base_url)
        self._guard = SDKGuard(self.name, openai, api_key or PLACEHOLDER_KEY, self.base_url, timeout,
                               "OPENAI_API_KEY", "OPENAI_BASE_URL")

    def complete(self, model: str, request: Request) -> Completion:
        response = self._guard.call(model, lambda: self._client.chat.completions.create(
            model=model,
            messages=[{"role": m.role, "content": m.content} for m in request.messages],
            temperature=request.temperature,
            max_tokens=request.max_tokens,
        ))
        # Non-strict parsing lets odd bodies through as strings or half-empty objects.
        choices = getattr(response, "choices", None)
        if not choices:
            raise self._guard.transient(model, f"reply has no choices: {excerpt(repr(response))}")
        text = getattr(getattr(choices[0], "message", None), "content", None)
        if not isinstance(text, str):
            raise self._guard.transient(model, "reply has no message content")
        usage = getattr(response, "usage", None)
        return Completion(
            text=text,
            prompt_tokens=getattr(usage, "prompt_tokens", None) or 0,
            completion_tokens=getattr(usage, "completion_tokens", None) or 0,
        )
