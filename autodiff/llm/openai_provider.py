"""OpenAI, and any OpenAI-compatible server (Ollama, vLLM, llama.cpp's server, LM Studio).

Only the chat-completions endpoint is used: every compatible server serves it, while newer
OpenAI-only endpoints come back 404 from local servers. The provider never retries; it sorts
failures into LLMTransientError (retry) and LLMFatalError (stop the run) for the caller.
"""

from __future__ import annotations

import json
import os
import re

import openai

from autodiff.errors import ConfigError, LLMFatalError, LLMTransientError
from autodiff.llm.types import Completion, Request

# Local servers ignore the key, but the SDK refuses to build a client without one.
PLACEHOLDER_KEY = "not-needed"

# The SDK's own retry policy treats these as passing faults, so we do too.
_TRANSIENT_STATUSES = (408, 409, 429)

# Servers echo (partly masked) keys in 401 bodies; never let one reach a message or a log.
_KEY_PATTERN = re.compile(r"sk-[A-Za-z0-9_\-*.]{6,}")


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
        self._api_key = api_key or PLACEHOLDER_KEY
        self._timeout = timeout
        self._client = openai.OpenAI(
            api_key=self._api_key, base_url=base_url, max_retries=0, timeout=timeout
        )
        self.base_url = str(self._client.base_url)

    def complete(self, model: str, request: Request) -> Completion:
        try:
            response = self._client.chat.completions.create(
                model=model,
                messages=[{"role": m.role, "content": m.content} for m in request.messages],
                temperature=request.temperature,
                max_tokens=request.max_tokens,
            )
        except openai.APITimeoutError as exc:
            raise self._transient(model, f"timed out after {self._timeout:g}s") from exc
        except openai.APIConnectionError as exc:
            raise self._transient(model, f"cannot connect ({_excerpt(str(exc))})") from exc
        except openai.APIStatusError as exc:
            raise self._status_error(model, exc) from exc
        except (openai.APIResponseValidationError, json.JSONDecodeError) as exc:
            raise self._transient(model, f"unparseable reply ({_excerpt(str(exc))})") from exc
        return self._completion(model, response)

    def _completion(self, model: str, response: object) -> Completion:
        # Non-strict parsing lets odd bodies through as strings or half-empty objects.
        choices = getattr(response, "choices", None)
        if not choices:
            raise self._transient(model, f"reply has no choices: {_excerpt(repr(response))}")
        text = getattr(getattr(choices[0], "message", None), "content", None)
        if not isinstance(text, str):
            raise self._transient(model, "reply has no message content")
        usage = getattr(response, "usage", None)
        return Completion(
            text=text,
            prompt_tokens=getattr(usage, "prompt_tokens", None) or 0,
            completion_tokens=getattr(usage, "completion_tokens", None) or 0,
        )

    def _status_error(self, model: str, exc: openai.APIStatusError) -> Exception:
        status = exc.status_code
        reason = self._clean(_reason(exc))
        if status >= 500 or status in _TRANSIENT_STATUSES:
            return self._transient(model, f"HTTP {status}: {reason}")
        where = f"at {self.base_url}"
        advice = {
            401: f"authentication failed {where}: check OPENAI_API_KEY",
            403: f"permission denied {where}: the key may lack access to model {model!r}",
            404: (
                f"model {model!r} or endpoint not found {where}: "
                "check the model name and OPENAI_BASE_URL"
            ),
        }.get(status, f"request rejected {where}: check the model's options and the messages")
        return LLMFatalError(f"openai model {model!r}: HTTP {status}: {advice} ({reason})")

    def _transient(self, model: str, detail: str) -> LLMTransientError:
        return LLMTransientError(
            f"openai model {model!r} at {self.base_url}: {self._clean(detail)}"
        )

    def _clean(self, text: str) -> str:
        if len(self._api_key) >= 8 and self._api_key != PLACEHOLDER_KEY:
            text = text.replace(self._api_key, "***")
        return _KEY_PATTERN.sub("sk-***", text)


def _reason(exc: openai.APIStatusError) -> str:
    """The server's own words: the error message from the JSON body, else the raw text."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if message:
            return _excerpt(str(message))
    return _excerpt(exc.response.text if exc.response is not None else str(exc))


def _excerpt(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
