"""What the OpenAI and Anthropic providers share: sorting an SDK's failures into errors to retry
(LLMTransientError) and errors that must stop the run (LLMFatalError), and keeping keys out of
every message. Both SDKs use the same exception class names, so one guard serves both."""

from __future__ import annotations

import json
import re
from types import ModuleType
from typing import Callable, TypeVar

from autodiff.errors import LLMFatalError, LLMTransientError

# A local server or proxy may need no key, but the SDKs refuse to build a client without one.
PLACEHOLDER_KEY = "not-needed"

# The SDKs' own retry policies treat these as passing faults (and every 5xx, e.g. 529 overloaded).
TRANSIENT_STATUSES = (408, 409, 429)

# Servers echo (partly masked) keys in 401 bodies; never let one reach a message or a log.
_KEY_PATTERN = re.compile(r"sk-[A-Za-z0-9_\-*.]{6,}")

T = TypeVar("T")


class SDKGuard:
    """Runs one SDK call for provider `name` and translates its failures."""

    def __init__(self, name: str, sdk: ModuleType, api_key: str, base_url: str, timeout: float,
                 key_env: str, url_env: str):
        self.name, self.sdk, self.api_key, self.base_url = name, sdk, api_key, base_url
        self.timeout, self.key_env, self.url_env = timeout, key_env, url_env

    def call(self, model: str, fn: Callable[[], T]) -> T:
        sdk = self.sdk
        try:
            return fn()
        except sdk.APITimeoutError as exc:
            raise self.transient(model, f"timed out after {self.timeout:g}s") from exc
        except sdk.APIConnectionError as exc:
            raise self.transient(model, f"cannot connect ({excerpt(str(exc))})") from exc
        except sdk.APIStatusError as exc:
            raise self.status_error(model, exc) from exc
        except (sdk.APIResponseValidationError, json.JSONDecodeError) as exc:
            raise self.transient(model, f"unparseable reply ({excerpt(str(exc))})") from exc

    def status_error(self, model: str, exc) -> Exception:
        status = exc.status_code
        reason = self.clean(_reason(exc))
        if status >= 500 or status in TRANSIENT_STATUSES:
            return self.transient(model, f"HTTP {status}: {reason}")
        where = f"at {self.base_url}"
        advice = {
            401: f"authentication failed {where}: check {self.key_env}",
            403: f"permission denied {where}: the key may lack access to model {model!r}",
            404: f"model {model!r} or endpoint not found {where}: check the model name and {self.url_env}",
        }.get(status, f"request rejected {where}: check the model's options and the messages")
        return LLMFatalError(f"{self.name} model {model!r}: HTTP {status}: {advice} ({reason})")

    def transient(self, model: str, detail: str) -> LLMTransientError:
        return LLMTransientError(f"{self.name} model {model!r} at {self.base_url}: {self.clean(detail)}")

    def clean(self, text: str) -> str:
        if len(self.api_key) >= 8 and self.api_key != PLACEHOLDER_KEY:
            text = text.replace(self.api_key, "***")
        return _KEY_PATTERN.sub("sk-***", text)


def _reason(exc) -> str:
    """The server's own words: the error message from the JSON body, else the raw text."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if message:
            return excerpt(str(message))
    return excerpt(exc.response.text if exc.response is not None else str(exc))


def excerpt(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
