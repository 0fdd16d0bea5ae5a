"""What the OpenAI and Anthropic providers share: the time-out a request gets, sorting an SDK's
failures into the errors of `autodiff.errors`, and keeping keys out of every message. Both SDKs
use the same exception class names, so one guard serves both.

How a failure is sorted:

- time-out, connection error, unparseable body, 429, 408, 409, 5xx: `LLMTransientError`, with
  `kind` (timeout, connection, garbage, rate_limit, server) and `retry_after`, the seconds the
  server asked for in `retry-after-ms` or `Retry-After` (as asked; see `MAX_RETRY_AFTER`);
- a prompt longer than the model's context window (OpenAI, vLLM, llama.cpp's server, LM Studio
  and Anthropic each say it their own way): `LLMContextWindowError`;
- any other 4xx: `LLMFatalError`, naming the rejected option when the body says which;
- a reply with no text: `LLMReplyError` (built by the providers through `empty_reply`), with
  the usage the server reported for it and its `finish_reason` ("length": cut off; the client
  adds which limit of the run to raise).
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import math
import re
import time
from types import ModuleType
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

from autodiff.errors import (
    LLMContextWindowError,
    LLMError,
    LLMFatalError,
    LLMReplyError,
    LLMTransientError,
)
from autodiff.llm.types import Completion, Request

# A local server or proxy may need no key, but the SDKs refuse to build a client without one.
PLACEHOLDER_KEY = "not-needed"

# The SDKs' own retry policies treat these as passing faults (and every 5xx, e.g. 529 overloaded).
TRANSIENT_STATUSES = (408, 409, 429)

# Default seconds to wait for a reply from a remote API (what both SDKs default to). A server on
# this machine or the local network gets no read limit: such a server (llama.cpp's, Ollama on a
# laptop) often works through its queue one request at a time, and a request abandoned while
# queued is work lost. Connecting is always limited, so a server that is not there fails fast.
REMOTE_TIMEOUT = 600.0
CONNECT_TIMEOUT = 10.0

# The longest Retry-After a call waits out. A server asking for more (a daily quota, a date far
# away) is not waited for at all: the call gives up at once and says what the server asked.
MAX_RETRY_AFTER = 600.0

# How each server says that the prompt does not fit the context window (matched in lower case
# against the error body): OpenAI's code, OpenAI's and vLLM's message, vLLM V1's, llama.cpp's
# server's error type and message, LM Studio's, Anthropic's.
CONTEXT_WINDOW_MARKERS = (
    "context_length_exceeded",
    "maximum context length",
    "longer than the maximum model length",
    "exceed_context_size_error",
    "exceeds the available context size",
    "greater than the context length",
    "prompt is too long",
)

# Servers echo (partly masked) keys in 401 bodies; never let one reach a message or a log.
_KEY_PATTERN = re.compile(r"sk-[A-Za-z0-9_\-*.]{6,}")

# Anthropic names the rejected field at the start of its message: "temperature: ...".
_LEADING_FIELD = re.compile(r"([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*): ")

T = TypeVar("T")


class SDKGuard:
    """Runs one SDK call for provider `name` and translates its failures.

    `timeout` is the provider's default in seconds for requests that name none; None applies
    the rule above (`default_timeout`)."""

    def __init__(self, name: str, sdk: ModuleType, api_key: str, base_url: str, timeout: float | None,
                 key_env: str, url_env: str):
        self.name, self.sdk, self.api_key, self.base_url = name, sdk, api_key, base_url
        self.key_env, self.url_env = key_env, url_env
        self.default_timeout = timeout if timeout is not None else default_timeout(base_url)

    def timeout(self, request: Request) -> Any:
        """The SDK's `Timeout` for `request`: its own seconds, else the provider's default."""
        seconds = request.timeout if request.timeout is not None else self.default_timeout
        connect = CONNECT_TIMEOUT if seconds is None else min(seconds, CONNECT_TIMEOUT)
        return self.sdk.Timeout(seconds, connect=connect)

    def call(self, model: str, request: Request, fn: Callable[[Any], T]) -> T:
        """`fn(timeout)` with the SDK's failures translated."""
        sdk = self.sdk
        timeout = self.timeout(request)
        try:
            return fn(timeout)
        except sdk.APITimeoutError as exc:
            limit = "no read limit" if timeout.read is None else f"read limit {timeout.read:g}s"
            raise self.transient(model, f"timed out ({limit}, connect {timeout.connect:g}s)",
                                 kind="timeout") from exc
        except sdk.APIConnectionError as exc:
            raise self.transient(model, f"cannot connect ({excerpt(str(exc))})", kind="connection") from exc
        except sdk.APIStatusError as exc:
            raise self.status_error(model, exc) from exc
        except (sdk.APIResponseValidationError, json.JSONDecodeError) as exc:
            raise self.garbage(model, f"unparseable reply ({excerpt(str(exc))})") from exc

    def status_error(self, model: str, exc: Any) -> LLMError:
        status = exc.status_code
        body = exc.body
        reason = self.clean(_reason(exc))
        where = f"at {self.base_url}"
        if _says_context_window(exc):
            return LLMContextWindowError(self.clean(
                f"{self.name} model {model!r} {where}: the prompt does not fit the model's context "
                f"window ({reason}{_sizes(body)}): shorten the prompt (fewer or shorter examples or "
                f"retrieved passages) or lower the reply's token limit (--max-tokens, --optimizer-max-tokens, a "
                f"node's max_tokens), or use a model (or start the local server) "
                f"with a larger context"
            ))
        if _error_field(body, "code") == "insufficient_quota":  # a 429 that waiting cannot fix
            return LLMFatalError(f"{self.name} model {model!r}: HTTP {status}: quota used up {where}: "
                                 f"check the account's plan and billing ({reason})")
        if status >= 500 or status in TRANSIENT_STATUSES:
            return self.transient(model, f"HTTP {status}: {reason}", kind="rate_limit" if status == 429 else "server",
                                  retry_after=retry_after(exc.response.headers))
        option = rejected_option(body) if status in (400, 422) else None
        advice = {
            401: f"authentication failed {where}: check {self.key_env}",
            403: f"permission denied {where}: the key may lack access to model {model!r}",
            404: f"model {model!r} or endpoint not found {where}: check the model name and {self.url_env}",
        }.get(status, f"request rejected {where}: check the model's options and the messages")
        if option:
            fix = ("which options a model family takes is set in autodiff/llm/models.py (FAMILIES): add the "
                   "model's family there, e.g. with temperature=False or token_param='max_completion_tokens'"
                   if option in ("temperature", "max_tokens", "max_completion_tokens", "reasoning_effort",
                                 "thinking") else "change that option of the run")
            advice = (f"request rejected {where} (option: {option}): the model does not take this option or "
                      f"value; {fix}")
        return LLMFatalError(self.clean(f"{self.name} model {model!r}: HTTP {status}: {advice} ({reason})"))

    def transient(self, model: str, detail: str, *, kind: str = "server",
                  retry_after: float | None = None) -> LLMTransientError:
        return LLMTransientError(f"{self.name} model {model!r} at {self.base_url}: {self.clean(detail)}",
                                 kind=kind, retry_after=retry_after)

    def garbage(self, model: str, detail: str) -> LLMTransientError:
        return self.transient(model, detail, kind="garbage")

    def empty_reply(self, model: str, completion: Completion, refusal: str | None = None) -> LLMReplyError:
        """The error for a reply with no text, saying why when the server did and what to do."""
        if completion.finish_reason == "length":
            spent = f"{completion.completion_tokens} completion tokens"
            if completion.reasoning_tokens:
                spent += f", {completion.reasoning_tokens} of them reasoning"
            # The limit to raise depends on the role: the client, which knows it, says which.
            why = f"the reply was cut off by the token limit before any visible text ({spent})"
        elif refusal:
            why = f"the model refused: {excerpt(refusal)}"
        elif completion.finish_reason == "content_filter":
            why = "the reply was withheld by the provider's content filter"
        else:
            why = (f"the reply held no text (finish reason {completion.finish_reason or 'not given'}): "
                   f"check the prompt, or try another model")
        error = LLMReplyError(self.clean(f"{self.name} model {model!r}: {why}"),
                              usage=(completion.prompt_tokens, completion.completion_tokens))
        error.finish_reason = completion.finish_reason  # for the call's record, and the client's advice
        return error

    def clean(self, text: str) -> str:
        if len(self.api_key) >= 8 and self.api_key != PLACEHOLDER_KEY:
            text = text.replace(self.api_key, "***")
        return _KEY_PATTERN.sub("sk-***", text)


def default_timeout(base_url: str) -> float | None:
    """Seconds to wait for a reply from `base_url` when a request names none (None: no limit)."""
    return None if is_local(base_url) else REMOTE_TIMEOUT


def is_local(url: str) -> bool:
    """Whether `url` points at this machine or the local network: a loopback, private or link-
    local address, `localhost`, a `.local`/`.localhost`/`.internal` name (mDNS, Docker's
    host.docker.internal), or a one-label name (a Docker Compose service, a LAN host)."""
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "." not in host or host.endswith((".local", ".localhost", ".internal"))
    return address.is_loopback or address.is_private or address.is_link_local


def retry_after(headers: Any) -> float | None:
    """The wait in seconds that `retry-after-ms` (milliseconds) or `Retry-After` (seconds, or an
    HTTP date) asks for, as asked (the client waits at most `MAX_RETRY_AFTER`); None when neither
    is there or readable."""
    if headers is None:
        return None
    seconds = _number(headers.get("retry-after-ms"))
    if seconds is not None:
        seconds /= 1000.0
    else:
        value = headers.get("retry-after")
        seconds = _number(value)
        if seconds is None and value:
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError, IndexError, OverflowError):
                return None
    if seconds is None:
        return None
    return max(seconds, 0.0)


def rejected_option(body: object) -> str | None:
    """The request field a 400/422 body blames: OpenAI's `error.param`, the last part of a
    FastAPI validation error's `loc` (llama-cpp-python's server), or the field Anthropic names
    at the start of its message."""
    param = _error_field(body, "param")
    if isinstance(param, str) and param:
        return param
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        loc = [str(part) for part in detail[0].get("loc") or () if part != "body"]
        if loc:
            return ".".join(loc)
    if isinstance(body, dict) and body.get("type") == "error":  # Anthropic's error envelope
        message = _error_field(body, "message")
        match = _LEADING_FIELD.match(message) if isinstance(message, str) else None
        return match.group(1) if match else None
    return None


def _error_field(body: object, name: str) -> object:
    """`name` from an error body, whether the SDK kept the whole body (Anthropic) or only its
    `error` object (OpenAI)."""
    if not isinstance(body, dict):
        return None
    inner = body.get("error", body)
    return inner.get(name) if isinstance(inner, dict) else None


def _says_context_window(exc: Any) -> bool:
    body = exc.body
    text = json.dumps(body) if isinstance(body, (dict, list)) else str(body or "")
    if not text and exc.response is not None:
        text = exc.response.text
    text = text.lower()
    return any(marker in text for marker in CONTEXT_WINDOW_MARKERS)


def _sizes(body: object) -> str:
    """The prompt and context sizes llama.cpp's server puts beside its message."""
    prompt, context = _error_field(body, "n_prompt_tokens"), _error_field(body, "n_ctx")
    if isinstance(prompt, int) and isinstance(context, int):
        return f"; prompt {prompt} tokens, context {context}"
    return ""


def token_count(obj: object, field: str) -> int:
    """A token count a reply reported (`obj.field`); absent, null or malformed counts as 0."""
    value = getattr(obj, field, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _reason(exc: Any) -> str:
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
