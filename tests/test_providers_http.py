"""The OpenAI and Anthropic providers, through their real SDKs, against local fake servers."""

from __future__ import annotations

import email.utils
import threading
import time
from typing import Callable

import httpx2  # the SDKs' HTTP client: what they would send is inspected at its boundary
import pytest

from autodiff.errors import (
    ConfigError,
    LLMContextWindowError,
    LLMError,
    LLMFatalError,
    LLMReplyError,
    LLMTransientError,
)
from autodiff.llm.anthropic_provider import REDACTED_THINKING, AnthropicProvider
from autodiff.llm.models import REASONING_ALLOWANCE, THINKING_BUDGET
from autodiff.llm.openai_provider import OpenAIProvider
from autodiff.llm.sdk_errors import CONNECT_TIMEOUT, MAX_RETRY_AFTER, REMOTE_TIMEOUT, is_local
from autodiff.llm.types import Completion, Message, Request
from tests.http_fakes import (
    ANTHROPIC_CONTEXT_WINDOW_BODY,
    COMPLETION_TOKENS,
    LLAMA_CPP_CONTEXT_WINDOW_BODY,
    OPENAI_CONTEXT_WINDOW_BODY,
    OPENAI_UNSUPPORTED_TEMPERATURE_BODY,
    PROMPT_TOKENS,
    VLLM_CONTEXT_WINDOW_BODY,
    FakeAnthropicServer,
    FakeOpenAIServer,
)

KEY = "sk-test-0123456789abcdefSECRET"
REQUEST = Request(
    messages=(
        Message("system", "You are terse."),
        Message("user", "Say hi."),
    ),
    temperature=0.0,
    max_tokens=32,
)

# (server class, provider factory) for each protocol; the factory takes the server.
PROTOCOLS: dict[str, tuple[type, Callable]] = {
    "openai": (
        FakeOpenAIServer,
        lambda server, timeout=5.0: OpenAIProvider(KEY, server.base_url, timeout=timeout),
    ),
    "anthropic": (
        FakeAnthropicServer,
        lambda server, timeout=5.0: AnthropicProvider(KEY, server.base_url, timeout=timeout),
    ),
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's real keys or base URLs must never leak into these tests.
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def ask(protocol: str, script: list, model: str = "m-test", request: Request = REQUEST, **server_options):
    """One request through `protocol`'s provider against a fake server running `script`:
    (completion or the LLMError raised, the server)."""
    server_class, make = PROTOCOLS[protocol]
    with server_class(script, **server_options) as server:
        try:
            return make(server).complete(model, request), server
        except LLMError as exc:
            return exc, server


# -- success and the request each model family gets -------------------------------------------


def test_openai_success_sends_chat_completion_and_reads_usage() -> None:
    with FakeOpenAIServer([("ok", "hi there")]) as server:
        provider = OpenAIProvider(KEY, server.base_url)
        completion = provider.complete("gpt-test", REQUEST)
    assert completion == Completion("hi there", PROMPT_TOKENS, COMPLETION_TOKENS, finish_reason="stop")
    assert provider.endpoint.rstrip("/") == server.base_url
    [sent] = server.requests
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.body["model"] == "gpt-test"
    assert sent.body["max_tokens"] == 32
    assert sent.body["temperature"] == 0.0
    assert sent.body["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hi."},
    ]


def test_openai_local_server_from_env_needs_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # Local servers are often given without the /v1 prefix; they serve /chat/completions there.
    with FakeOpenAIServer([("ok", "local")]) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.origin)
        completion = OpenAIProvider().complete("llama", REQUEST)
    assert completion.text == "local"
    assert server.requests[0].path == "/chat/completions"
    assert server.requests[0].headers["authorization"].startswith("Bearer ")


@pytest.mark.parametrize("model", ["gpt-5-mini", "o3", "o4-mini-2025-04-16"])
@pytest.mark.parametrize("effort", [None, "low", "high"])
def test_openai_reasoning_model_gets_completion_budget_and_no_temperature(model: str, effort: str | None) -> None:
    request = Request(REQUEST.messages, temperature=0.0, max_tokens=32, reasoning_effort=effort)
    _, server = ask("openai", [("ok", "hi")], model, request)
    body = server.requests[0].body
    # The visible reply's 32 tokens plus room for hidden reasoning (8192 at the default effort).
    assert body["max_completion_tokens"] == 32 + REASONING_ALLOWANCE[effort]
    assert "max_tokens" not in body and "temperature" not in body
    if effort is None:
        assert "reasoning_effort" not in body
    else:
        assert body["reasoning_effort"] == effort


@pytest.mark.parametrize("model", ["gpt-4o-mini", "llama3.1", "qwen2.5:7b-instruct"])
def test_openai_plain_model_gets_max_tokens_and_temperature(model: str) -> None:
    request = Request(REQUEST.messages, temperature=0.3, max_tokens=32, reasoning_effort="high")
    _, server = ask("openai", [("ok", "hi")], model, request)
    body = server.requests[0].body
    assert body["max_tokens"] == 32 and body["temperature"] == 0.3
    # A plain model (every local server's) is never sent options it may reject.
    assert "max_completion_tokens" not in body and "reasoning_effort" not in body


def test_openai_reply_reasoning_usage_details_and_finish_reason() -> None:
    reply = {"text": "42", "reasoning": "6 times 7", "finish_reason": "length",
             "usage": {"prompt_tokens": 100, "completion_tokens": 50, "cached_tokens": 64, "reasoning_tokens": 40}}
    completion, _ = ask("openai", [("reply", reply)])
    assert completion == Completion("42", 100, 50, finish_reason="length", reasoning="6 times 7",
                                    cached_prompt_tokens=64, reasoning_tokens=40)
    assert completion.cut_off


def test_openai_reads_reasoning_from_ollamas_field() -> None:
    completion, _ = ask("openai", [("reply", {"text": "hi", "reasoning": "greet", "reasoning_field": "reasoning"})])
    assert (completion.text, completion.reasoning) == ("hi", "greet")


@pytest.mark.parametrize("sent, normalised", [("stop", "stop"), ("length", "length"),
                                              ("content_filter", "content_filter"), ("tool_calls", None)])
def test_openai_finish_reason_is_normalised(sent: str, normalised: str | None) -> None:
    completion, _ = ask("openai", [("reply", {"text": "x", "finish_reason": sent})])
    assert completion.finish_reason == normalised


def test_anthropic_success_puts_system_prompt_in_system() -> None:
    with FakeAnthropicServer([("ok", "hello")]) as server:
        provider = AnthropicProvider(KEY, server.base_url)
        completion = provider.complete("claude-test", REQUEST)
    assert completion == Completion("hello", PROMPT_TOKENS, COMPLETION_TOKENS, finish_reason="stop")
    assert provider.endpoint.rstrip("/") == server.base_url
    [sent] = server.requests
    assert sent.path == "/v1/messages"
    assert sent.body["model"] == "claude-test"
    assert sent.body["max_tokens"] == 32
    assert sent.body["system"] == "You are terse."
    assert sent.body["messages"] == [{"role": "user", "content": "Say hi."}]
    assert "temperature" not in sent.body  # the current API version rejects it
    assert "thinking" not in sent.body


def test_anthropic_reads_key_and_base_url_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeAnthropicServer() as server:
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
        assert AnthropicProvider().complete("claude-test", REQUEST).text == "ok"
    # Older SDKs send x-api-key, newer ones Authorization: Bearer; either carries the key.
    assert KEY in " ".join(server.requests[0].headers.values())


@pytest.mark.parametrize("effort", ["low", "high"])
def test_anthropic_thinking_model_gets_a_thinking_budget(effort: str) -> None:
    request = Request(REQUEST.messages, max_tokens=32, reasoning_effort=effort)
    _, server = ask("anthropic", [("ok", "hi")], "claude-opus-4-1", request)
    body = server.requests[0].body
    assert body["thinking"] == {"type": "enabled", "budget_tokens": THINKING_BUDGET[effort]}
    assert body["max_tokens"] == 32 + THINKING_BUDGET[effort]  # thinking counts against max_tokens
    assert "temperature" not in body


@pytest.mark.parametrize("model, effort", [("claude-opus-4-1", None), ("claude-opus-4-1", "none"),
                                           ("claude-3-5-haiku-latest", "high")])
def test_anthropic_thinking_stays_off_without_effort_or_support(model: str, effort: str | None) -> None:
    request = Request(REQUEST.messages, max_tokens=32, reasoning_effort=effort)
    _, server = ask("anthropic", [("ok", "hi")], model, request)
    body = server.requests[0].body
    assert "thinking" not in body and body["max_tokens"] == 32


def test_anthropic_joins_text_blocks_and_keeps_thinking_apart() -> None:
    content = [
        {"type": "thinking", "thinking": "The user wants a greeting.", "signature": "sig"},
        {"type": "redacted_thinking", "data": "opaque"},
        {"type": "text", "text": "Hello, "},
        {"type": "text", "text": "world."},
    ]
    usage = {"input_tokens": 5, "output_tokens": 30, "cache_read_input_tokens": 100,
             "cache_creation_input_tokens": 20, "thinking_tokens": 25}
    completion, server = ask("anthropic", [("reply", {"content": content, "usage": usage})])
    assert completion == Completion(
        "Hello, world.", prompt_tokens=125, completion_tokens=30, finish_reason="stop",
        reasoning=f"The user wants a greeting.\n\n{REDACTED_THINKING}",
        cached_prompt_tokens=100, cache_write_tokens=20, reasoning_tokens=25,
    )
    assert server.reported_usage() == (125, 30)  # the fake counts the prompt as the provider does


@pytest.mark.parametrize("sent, normalised", [("end_turn", "stop"), ("stop_sequence", "stop"),
                                              ("max_tokens", "length"), ("refusal", "content_filter")])
def test_anthropic_stop_reason_is_normalised(sent: str, normalised: str) -> None:
    completion, _ = ask("anthropic", [("reply", {"text": "x", "stop_reason": sent})])
    assert completion.finish_reason == normalised


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_cut_off_reply_says_length(protocol: str) -> None:
    completion, _ = ask(protocol, [("cutoff", "The answer is")])
    assert (completion.text, completion.finish_reason, completion.cut_off) == ("The answer is", "length", True)


# -- replies with no text --------------------------------------------------------------------


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_empty_reply_is_a_reply_error_with_usage(protocol: str) -> None:
    error, server = ask(protocol, [("empty", None)])
    assert isinstance(error, LLMReplyError) and error.kind == "empty"
    assert error.usage == (PROMPT_TOKENS, COMPLETION_TOKENS) == server.reported_usage()
    assert "no text" in str(error) and KEY not in str(error)


def test_openai_null_content_is_a_reply_error() -> None:
    error, _ = ask("openai", [("reply", {"text": None})])
    assert isinstance(error, LLMReplyError) and error.usage == (PROMPT_TOKENS, COMPLETION_TOKENS)


@pytest.mark.parametrize("protocol, reply", [
    ("openai", {"text": "", "reasoning": "Let me think", "cut_off": True,
                "usage": {"completion_tokens": 544, "reasoning_tokens": 544}}),
    ("anthropic", {"content": [{"type": "thinking", "thinking": "Let me think", "signature": "s"}],
                   "cut_off": True, "usage": {"output_tokens": 544, "thinking_tokens": 544}}),
], ids=["openai", "anthropic"])
def test_reply_cut_off_before_any_text_says_what_to_do(protocol: str, reply: dict) -> None:
    error, _ = ask(protocol, [("reply", reply)], request=Request(REQUEST.messages, max_tokens=32))
    assert isinstance(error, LLMReplyError) and error.usage == (PROMPT_TOKENS, 544)
    message = str(error)
    assert "cut off by the token limit before any visible text" in message
    assert "544 completion tokens, 544 of them reasoning" in message
    # Which limit to raise depends on the role, which the client knows: it adds the flag (see
    # test_provider_faults.py::test_a_reply_cut_off_before_any_text_names_the_flag_of_the_roles_token_limit).
    assert error.finish_reason == "length"


def test_openai_refusal_is_named() -> None:
    error, _ = ask("openai", [("reply", {"text": None, "refusal": "I can't help with that."})])
    assert isinstance(error, LLMReplyError) and "refused: I can't help with that." in str(error)


# -- transient faults ------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
@pytest.mark.parametrize(
    "behaviour, kind",
    [(("status", 429), "rate_limit"), (("status", 500), "server"), (("status", 503), "server"),
     (("status", 408), "server"), (("status", 409), "server"), (("garbage", b"not json {"), "garbage")],
    ids=["429", "500", "503", "408", "409", "garbage"],
)
def test_retryable_faults_are_transient(protocol: str, behaviour: tuple, kind: str) -> None:
    server_class, make = PROTOCOLS[protocol]
    with server_class([behaviour]) as server:
        provider = make(server)
        with pytest.raises(LLMTransientError) as caught:
            provider.complete("m-test", REQUEST)
        # The fault is not sticky: the next call (script used up) succeeds.
        assert provider.complete("m-test", REQUEST).text == "ok"
    assert caught.value.kind == kind and caught.value.retry_after is None
    message = str(caught.value)
    assert protocol in message and "m-test" in message
    if behaviour[0] == "status":
        assert str(behaviour[1]) in message
    assert KEY not in message


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
@pytest.mark.parametrize("body", [b"{}", b'"just a string"'], ids=["empty", "string"])
def test_body_without_choices_is_garbage(protocol: str, body: bytes) -> None:
    error, _ = ask(protocol, [("garbage", body)])
    assert isinstance(error, LLMTransientError) and error.kind == "garbage"
    assert "no choices" in str(error) or "no content" in str(error)


def test_anthropic_overloaded_529_is_transient() -> None:
    error, _ = ask("anthropic", [("status", 529)])
    assert isinstance(error, LLMTransientError) and error.kind == "server" and "529" in str(error)


def _in(seconds: float) -> str:
    """An HTTP date `seconds` from now."""
    return email.utils.formatdate(time.time() + seconds, usegmt=True)


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
@pytest.mark.parametrize("headers, expected", [
    (lambda: {"retry-after": "3"}, 3.0),
    (lambda: {"retry-after": "1.5"}, 1.5),
    (lambda: {"retry-after-ms": "250"}, 0.25),
    (lambda: {"retry-after-ms": "250", "retry-after": "1"}, 0.25),  # the precise one wins
    (lambda: {"retry-after": _in(30)}, 30.0),
    (lambda: {"retry-after": _in(-30)}, 0.0),  # a date gone by: no wait
    (lambda: {"retry-after": "86400"}, 86400.0),  # as asked: the client says it waits no such time
    (lambda: {"retry-after": "soon"}, None),
], ids=["seconds", "fraction", "ms", "ms-wins", "date", "past-date", "a-day", "unreadable"])
def test_retry_after_is_read_from_the_headers(protocol: str, headers: Callable[[], dict],
                                              expected: float | None) -> None:
    error, _ = ask(protocol, [("status", 429, headers())])
    assert isinstance(error, LLMTransientError) and error.kind == "rate_limit"
    if expected is None:
        assert error.retry_after is None
    else:
        assert error.retry_after == pytest.approx(expected, abs=2.0)  # a date has whole seconds


def test_retry_after_of_a_503_is_kept() -> None:
    error, _ = ask("openai", [("status", 503, {"retry-after": "7"})])
    assert isinstance(error, LLMTransientError) and (error.kind, error.retry_after) == ("server", 7.0)


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_timeout_is_transient_and_the_server_sees_the_hang_up(protocol: str) -> None:
    server_class, make = PROTOCOLS[protocol]
    with server_class([("sleep", 1.0)]) as server:
        with pytest.raises(LLMTransientError, match="timed out") as caught:
            make(server, timeout=0.3).complete("m-test", REQUEST)
        server.wait_idle()
    assert caught.value.kind == "timeout" and "read limit 0.3s" in str(caught.value)
    [sent] = server.requests
    assert sent.abandoned and sent.ended - sent.started >= 1.0
    assert server.reported_usage() == (0, 0)  # the reply never reached the client


def test_request_timeout_overrides_the_providers() -> None:
    with FakeOpenAIServer([("sleep", 1.0)]) as server:
        provider = OpenAIProvider(KEY, server.base_url, timeout=30.0)
        with pytest.raises(LLMTransientError, match="read limit 0.3s"):
            provider.complete("m-test", Request(REQUEST.messages, timeout=0.3))


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_connection_refused_is_transient(protocol: str) -> None:
    server_class, make = PROTOCOLS[protocol]
    with server_class() as server:
        provider = make(server)
    # The server is gone now: nothing listens on its port.
    with pytest.raises(LLMTransientError, match="connect") as caught:
        provider.complete("m-test", REQUEST)
    assert caught.value.kind == "connection"


# -- what a local server that works one request at a time needs ------------------------------


def _ask_at_once(provider, count: int, request: Request = REQUEST) -> list:
    results: list = [None] * count

    def one(i: int) -> None:
        try:
            results[i] = provider.complete("llama3.1", request)
        except LLMError as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_queued_requests_to_a_local_server_are_never_abandoned_by_default() -> None:
    with FakeOpenAIServer([("sleep", 0.3)] * 3, one_at_a_time=True) as server:
        results = _ask_at_once(OpenAIProvider(base_url=server.base_url), 3)
        server.wait_idle()
    assert all(isinstance(r, Completion) for r in results)
    served = sorted(server.requests, key=lambda r: r.started)
    assert not any(r.abandoned for r in served)
    for before, after in zip(served, served[1:]):
        assert after.started >= before.ended  # strictly one after another
    assert served[-1].started - served[-1].arrived >= 0.5  # the last one waited its turn
    # What the caller was told it used is what the server says it served.
    told = (sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results))
    assert told == server.reported_usage() == (3 * PROMPT_TOKENS, 3 * COMPLETION_TOKENS)


def test_a_read_limit_abandons_queued_requests() -> None:
    # Why local servers get no read limit: the queue, not the model, makes a request late.
    with FakeOpenAIServer([("sleep", 0.5)] * 3, one_at_a_time=True) as server:
        results = _ask_at_once(OpenAIProvider(base_url=server.base_url), 3,
                               Request(REQUEST.messages, timeout=0.75))
        server.wait_idle()
    timeouts = [r for r in results if isinstance(r, LLMTransientError)]
    assert len(timeouts) == 2 and all(e.kind == "timeout" for e in timeouts)
    assert sum(r.abandoned for r in server.requests) == 2
    assert server.reported_usage() == (PROMPT_TOKENS, COMPLETION_TOKENS)


# -- the default time-out, as the SDK would send it ------------------------------------------


@pytest.fixture
def sent_timeouts(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Catches requests where the SDK hands them to its HTTP client; answers each from here."""
    seen: list[dict] = []

    def send(self, request: httpx2.Request, **kwargs) -> httpx2.Response:
        seen.append(request.extensions["timeout"])
        if request.url.path.endswith("/messages"):
            body = {"id": "m", "type": "message", "role": "assistant", "model": "m", "stop_reason": "end_turn",
                    "content": [{"type": "text", "text": "ok"}], "usage": {"input_tokens": 1, "output_tokens": 1}}
        else:
            body = {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        return httpx2.Response(200, json=body, request=request)

    monkeypatch.setattr(httpx2.Client, "send", send)
    return seen


@pytest.mark.parametrize("make, base_url, read", [
    (OpenAIProvider, "http://127.0.0.1:8080/v1", None),
    (OpenAIProvider, "http://localhost:11434/v1", None),
    (OpenAIProvider, "http://192.168.1.20:8000/v1", None),
    (OpenAIProvider, "http://gpu-box.local:8000/v1", None),
    (OpenAIProvider, "https://api.openai.com/v1", REMOTE_TIMEOUT),
    (OpenAIProvider, None, REMOTE_TIMEOUT),  # the SDK's own default URL
    (AnthropicProvider, "http://127.0.0.1:4000", None),
    (AnthropicProvider, None, REMOTE_TIMEOUT),
])
def test_default_timeout_is_none_for_local_servers_and_600s_else(sent_timeouts: list[dict], make, base_url: str | None,
                                                                  read: float | None) -> None:
    provider = make(KEY, base_url)
    assert provider.complete("m-test", REQUEST).text == "ok"
    assert provider.complete("m-test", Request(REQUEST.messages, timeout=12.5)).text == "ok"
    default, explicit = sent_timeouts
    assert default == {"connect": CONNECT_TIMEOUT, "read": read, "write": read, "pool": read}
    assert explicit["read"] == 12.5 and explicit["connect"] == CONNECT_TIMEOUT


@pytest.mark.parametrize("url, local", [
    ("http://127.0.0.1:8080/v1", True), ("http://[::1]:8080", True), ("http://10.0.0.7/v1", True),
    ("http://172.20.0.3:8000", True), ("http://169.254.1.1", True), ("http://ollama:11434/v1", True),
    ("http://host.docker.internal:1234/v1", True), ("http://LOCALHOST:8000", True),
    ("https://api.openai.com/v1", False), ("https://api.anthropic.com", False), ("http://8.8.8.8/v1", False),
    ("https://my-proxy.example.com/v1", False),
])
def test_which_endpoints_count_as_local(url: str, local: bool) -> None:
    assert is_local(url) == local


# -- prompts too long, and requests the model rejects ----------------------------------------


@pytest.mark.parametrize("protocol, behaviour", [
    ("openai", ("context_window", None)),
    ("openai", ("error", 400, OPENAI_CONTEXT_WINDOW_BODY)),
    ("openai", ("error", 400, VLLM_CONTEXT_WINDOW_BODY)),
    ("openai", ("error", 400, LLAMA_CPP_CONTEXT_WINDOW_BODY)),
    ("anthropic", ("context_window", None)),
    ("anthropic", ("error", 400, ANTHROPIC_CONTEXT_WINDOW_BODY)),
], ids=["openai-preset", "openai", "vllm", "llama.cpp", "anthropic-preset", "anthropic"])
def test_prompt_too_long_is_a_context_window_error(protocol: str, behaviour: tuple) -> None:
    error, server = ask(protocol, [behaviour, ("ok", "never")])
    assert isinstance(error, LLMContextWindowError) and not isinstance(error, (LLMFatalError, LLMTransientError))
    assert error.kind == "context_window" and len(server.requests) == 1
    assert "context window" in str(error) and "shorten the prompt" in str(error)


def test_llama_cpp_context_window_error_gives_the_sizes() -> None:
    error, _ = ask("openai", [("error", 400, LLAMA_CPP_CONTEXT_WINDOW_BODY)])
    assert "prompt 5012 tokens, context 4096" in str(error)


def test_openai_rejected_option_is_named() -> None:
    error, _ = ask("openai", [("error", 400, OPENAI_UNSUPPORTED_TEMPERATURE_BODY)], "gpt-new")
    assert isinstance(error, LLMFatalError) and error.kind == "fatal"
    assert "option: temperature" in str(error) and "does not support 0.0" in str(error)


def test_anthropic_rejected_option_is_named() -> None:
    body = {"type": "error", "error": {"type": "invalid_request_error",
                                       "message": "temperature: Extra inputs are not permitted"}}
    error, _ = ask("anthropic", [("error", 400, body)])
    assert isinstance(error, LLMFatalError) and "option: temperature" in str(error)


def test_fastapi_validation_error_names_the_option() -> None:
    # llama-cpp-python's server answers a bad field with FastAPI's 422.
    body = {"detail": [{"loc": ["body", "max_tokens"], "msg": "Input should be a valid integer", "type": "int_parsing"}]}
    error, _ = ask("openai", [("error", 422, body)])
    assert isinstance(error, LLMFatalError) and "option: max_tokens" in str(error)


def test_openai_quota_429_is_fatal() -> None:
    body = {"error": {"message": "You exceeded your current quota, please check your plan and billing details.",
                      "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}}
    error, server = ask("openai", [("error", 429, body)])
    assert isinstance(error, LLMFatalError) and "billing" in str(error)


# -- fatal faults ----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_401_is_fatal_and_names_the_key_variable(protocol: str) -> None:
    server_class, make = PROTOCOLS[protocol]
    with server_class([("status", 401)]) as server:
        with pytest.raises(LLMFatalError) as caught:
            make(server).complete("m-test", REQUEST)
    message = str(caught.value)
    assert f"{protocol.upper()}_API_KEY" in message and "401" in message
    assert KEY not in message and KEY[:12] not in message and "SECRET" not in message


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_404_is_fatal_and_says_what_to_check(protocol: str) -> None:
    server_class, make = PROTOCOLS[protocol]
    with server_class([("status", 404)]) as server:
        with pytest.raises(LLMFatalError) as caught:
            make(server).complete("no-such-model", REQUEST)
    message = str(caught.value)
    assert "'no-such-model'" in message and "not found" in message
    assert server.origin in message and f"{protocol.upper()}_BASE_URL" in message
    assert KEY not in message


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
@pytest.mark.parametrize("status", [400, 403, 422])
def test_other_client_errors_are_fatal(protocol: str, status: int) -> None:
    server_class, make = PROTOCOLS[protocol]
    with server_class([("status", status)]) as server:
        with pytest.raises(LLMFatalError, match=str(status)) as caught:
            make(server).complete("m-test", REQUEST)
    assert caught.value.kind == "fatal" and "option:" not in str(caught.value)


def test_openai_missing_key_is_config_error() -> None:
    with pytest.raises(ConfigError, match="OPENAI_API_KEY") as caught:
        OpenAIProvider()
    assert "OPENAI_BASE_URL" in str(caught.value)


def test_anthropic_missing_key_is_config_error() -> None:
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        AnthropicProvider()
