"""Anthropic's Messages API through the official SDK.

Temperature is not sent. SDK 1.0 removed the sampling options from ``messages.create`` and the
API version this SDK speaks (2026-10-21) answers 400 to any of them, even at the default; newer
models reject them under every version. ``Request.temperature`` still enters the cache key, so
runs stay reproducible from the cache, but Anthropic samples as it sees fit.

The provider never retries; it sorts failures into LLMTransientError (retry) and LLMFatalError
(stop the run) for the caller.
"""

from __future__ import annotations

import json
import os
import re

import anthropic

from autodiff.errors import ConfigError, LLMFatalError, LLMTransientError
from autodiff.llm.types import Completion, Request

# A proxy or local server speaking this protocol may need no key, but the SDK wants one.
PLACEHOLDER_KEY = "not-needed"

# The SDK's own retry policy treats these as passing faults (529 "overloaded" is a 5xx).
_TRANSIENT_STATUSES = (408, 409, 429)

# Never let a key echoed back in an error body reach a message or a log.
_KEY_PATTERN = re.compile(r"sk-[A-Za-z0-9_\-*.]{6,}")


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
        self._api_key = api_key or PLACEHOLDER_KEY
        self._timeout = timeout
        self._client = anthropic.Anthropic(
            api_key=self._api_key, base_url=base_url, max_retries=0, timeout=timeout
        )
        self.base_url = str(self._client.base_url)

    def complete(self, model: str, request: Request) -> Completion:
        # Anthropic takes the system prompt apart from the turns.
        system = "\n\n".join(m.content for m in request.messages if m.role == "system")
        turns = [
            {"role": m.role, "content": m.content}
            for m in request.messages
            if m.role != "system"
        ]
        try:
            response = self._client.messages.create(
                model=model,
                messages=turns,
                max_tokens=request.max_tokens,
                **({"system": system} if system else {}),
            )
        except anthropic.APITimeoutError as exc:
            raise self._transient(model, f"timed out after {self._timeout:g}s") from exc
        except anthropic.APIConnectionError as exc:
            raise self._transient(model, f"cannot connect ({_excerpt(str(exc))})") from exc
        except anthropic.APIStatusError as exc:
            raise self._status_error(model, exc) from exc
        except (anthropic.APIResponseValidationError, json.JSONDecodeError) as exc:
            raise self._transient(model, f"unparseable reply ({_excerpt(str(exc))})") from exc
        return self._completion(model, response)

    def _completion(self, model: str, response: object) -> Completion:
        # Non-strict parsing lets odd bodies through as strings or half-empty objects.
        blocks = getattr(response, "content", None)
        if not isinstance(blocks, list):
            raise self._transient(model, f"reply has no content: {_excerpt(repr(response))}")
        text = "".join(
            b.text for b in blocks if getattr(b, "type", None) == "text" and isinstance(b.text, str)
        )
        usage = getattr(response, "usage", None)
        return Completion(
            text=text,
            prompt_tokens=getattr(usage, "input_tokens", None) or 0,
            completion_tokens=getattr(usage, "output_tokens", None) or 0,
        )

    def _status_error(self, model: str, exc: anthropic.APIStatusError) -> Exception:
        status = exc.status_code
        reason = self._clean(_reason(exc))
        if status >= 500 or status in _TRANSIENT_STATUSES:
            return self._transient(model, f"HTTP {status}: {reason}")
        where = f"at {self.base_url}"
        advice = {
            401: f"authentication failed {where}: check ANTHROPIC_API_KEY",
            403: f"permission denied {where}: the key may lack access to model {model!r}",
            404: (
                f"model {model!r} or endpoint not found {where}: "
                "check the model name and ANTHROPIC_BASE_URL"
            ),
        }.get(status, f"request rejected {where}: check the model's options and the messages")
        return LLMFatalError(f"anthropic model {model!r}: HTTP {status}: {advice} ({reason})")

    def _transient(self, model: str, detail: str) -> LLMTransientError:
        return LLMTransientError(
            f"anthropic model {model!r} at {self.base_url}: {self._clean(detail)}"
        )

    def _clean(self, text: str) -> str:
        if len(self._api_key) >= 8 and self._api_key != PLACEHOLDER_KEY:
            text = text.replace(self._api_key, "***")
        return _KEY_PATTERN.sub("sk-***", text)


def _reason(exc: anthropic.APIStatusError) -> str:
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
