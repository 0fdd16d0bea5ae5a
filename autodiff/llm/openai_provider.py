"""OpenAI, and any OpenAI-compatible server (Ollama, vLLM, llama.cpp's server, LM Studio).

Only the chat-completions endpoint is used: every compatible server serves it, while newer
OpenAI-only endpoints come back 404 from local servers. Which options a model takes (the token
field, temperature, reasoning effort, room for hidden reasoning) comes from the one table in
`autodiff.llm.models`; a model it does not know, such as any local server's, gets the plain
options every server accepts.

Requests that name no time-out get 600 s, or no read limit at all for a server on this machine
or the local network (see `autodiff.llm.sdk_errors`). The provider never retries; it translates
replies and failures for the client (`autodiff.llm.client`).
"""

from __future__ import annotations

import os
from typing import Any

import openai

from autodiff.errors import ConfigError
from autodiff.llm.models import family_of
from autodiff.llm.sdk_errors import PLACEHOLDER_KEY, SDKGuard, excerpt, token_count
from autodiff.llm.types import Completion, Request

# finish_reason as servers send it -> the normalised one (see `Completion`); others -> None.
FINISH_REASONS = {"stop": "stop", "length": "length", "content_filter": "content_filter"}

# Where OpenAI-compatible servers put the model's reasoning beside the reply: vLLM, llama.cpp's
# server and DeepSeek use `reasoning_content`, Ollama and OpenRouter `reasoning`.
REASONING_FIELDS = ("reasoning_content", "reasoning")


class OpenAIProvider:
    name = "openai"

    def __init__(
        self, api_key: str | None = None, base_url: str | None = None, timeout: float | None = None
    ) -> None:
        api_key = api_key or os.environ.get("OPENAI_API_KEY") or None
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        if api_key is None and base_url is None:
            raise ConfigError(
                "no OpenAI API key: set OPENAI_API_KEY, or set OPENAI_BASE_URL to use a local "
                "OpenAI-compatible server (Ollama, vLLM, llama.cpp's server), which needs no key"
            )
        self._client = openai.OpenAI(api_key=api_key or PLACEHOLDER_KEY, base_url=base_url, max_retries=0)
        self.endpoint = str(self._client.base_url)
        self._guard = SDKGuard(self.name, openai, api_key or PLACEHOLDER_KEY, self.endpoint, timeout,
                               "OPENAI_API_KEY", "OPENAI_BASE_URL")

    def _options(self, model: str, request: Request) -> dict[str, Any]:
        """The request fields that depend on the model's family."""
        family = family_of(self.name, model)
        options: dict[str, Any] = {
            family.token_param: family.completion_budget(request.max_tokens, request.reasoning_effort)
        }
        if family.temperature:
            options["temperature"] = request.temperature
        if family.reasoning_effort and request.reasoning_effort is not None:
            options["reasoning_effort"] = request.reasoning_effort
        return options

    def complete(self, model: str, request: Request) -> Completion:
        response = self._guard.call(model, request, lambda timeout: self._client.chat.completions.create(
            model=model,
            messages=[{"role": m.role, "content": m.content} for m in request.messages],
            timeout=timeout,
            **self._options(model, request),
        ))
        # Non-strict parsing lets odd bodies through as strings or half-empty objects.
        choices = getattr(response, "choices", None)
        if not choices:
            error = self._guard.garbage(model, f"reply has no choices: {excerpt(repr(response))}")
            usage = getattr(response, "usage", None)  # a server that answered still counts its tokens
            if usage is not None:
                error.usage = (token_count(usage, "prompt_tokens"), token_count(usage, "completion_tokens"))
            raise error
        message = getattr(choices[0], "message", None)
        text = getattr(message, "content", None)
        if message is None or not isinstance(text, (str, type(None))):
            raise self._guard.garbage(model, f"reply has no message: {excerpt(repr(choices[0]))}")
        usage = getattr(response, "usage", None)
        prompt_details = getattr(usage, "prompt_tokens_details", None)
        completion = Completion(
            text=text or "",
            prompt_tokens=token_count(usage, "prompt_tokens"),
            completion_tokens=token_count(usage, "completion_tokens"),
            finish_reason=FINISH_REASONS.get(str(getattr(choices[0], "finish_reason", None))),
            reasoning=_reasoning(message),
            cached_prompt_tokens=token_count(prompt_details, "cached_tokens"),
            cache_write_tokens=token_count(prompt_details, "cache_write_tokens"),
            reasoning_tokens=token_count(getattr(usage, "completion_tokens_details", None), "reasoning_tokens"),
        )
        if not completion.text:
            refusal = getattr(message, "refusal", None)
            raise self._guard.empty_reply(model, completion, refusal if isinstance(refusal, str) else None)
        return completion


def _reasoning(message: object) -> str:
    for field in REASONING_FIELDS:
        value = getattr(message, field, None)
        if isinstance(value, str) and value.strip():
            return value
    return ""

