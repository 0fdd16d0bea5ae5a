"""The OpenAI and Anthropic providers, through their real SDKs, against local fake servers."""

from __future__ import annotations

from typing import Callable

import pytest

from autodiff.errors import ConfigError, LLMFatalError, LLMTransientError
from autodiff.llm.anthropic_provider import AnthropicProvider
from autodiff.llm.openai_provider import OpenAIProvider
from autodiff.llm.types import Message, Request
from tests.http_fakes import (
    COMPLETION_TOKENS,
    PROMPT_TOKENS,
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


def test_openai_success_sends_chat_completion_and_reads_usage() -> None:
    with FakeOpenAIServer([("ok", "hi there")]) as server:
        completion = OpenAIProvider(KEY, server.base_url).complete("gpt-test", REQUEST)
    assert completion.text == "hi there"
    assert (completion.prompt_tokens, completion.completion_tokens) == (
        PROMPT_TOKENS,
        COMPLETION_TOKENS,
    )
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


def test_anthropic_success_puts_system_prompt_in_system() -> None:
    with FakeAnthropicServer([("ok", "hello")]) as server:
        completion = AnthropicProvider(KEY, server.base_url).complete("claude-test", REQUEST)
    assert completion.text == "hello"
    assert (completion.prompt_tokens, completion.completion_tokens) == (
        PROMPT_TOKENS,
        COMPLETION_TOKENS,
    )
    [sent] = server.requests
    assert sent.path == "/v1/messages"
    assert sent.body["model"] == "claude-test"
    assert sent.body["max_tokens"] == 32
    assert sent.body["system"] == "You are terse."
    assert sent.body["messages"] == [{"role": "user", "content": "Say hi."}]
    assert "temperature" not in sent.body  # the current API version rejects it


def test_anthropic_reads_key_and_base_url_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeAnthropicServer() as server:
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
        assert AnthropicProvider().complete("claude-test", REQUEST).text == "ok"
    # Older SDKs send x-api-key, newer ones Authorization: Bearer; either carries the key.
    assert KEY in " ".join(server.requests[0].headers.values())


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
@pytest.mark.parametrize(
    "behaviour",
    [("status", 429), ("status", 500), ("status", 503), ("garbage", b"not json {")],
    ids=["429", "500", "503", "garbage"],
)
def test_retryable_faults_are_transient(protocol: str, behaviour: tuple) -> None:
    server_class, make = PROTOCOLS[protocol]
    with server_class([behaviour]) as server:
        provider = make(server)
        with pytest.raises(LLMTransientError) as caught:
            provider.complete("m-test", REQUEST)
        # The fault is not sticky: the next call (script used up) succeeds.
        assert provider.complete("m-test", REQUEST).text == "ok"
    message = str(caught.value)
    assert protocol in message and "m-test" in message
    if behaviour[0] == "status":
        assert str(behaviour[1]) in message
    assert KEY not in message


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
@pytest.mark.parametrize("body", [b"{}", b'"just a string"'], ids=["empty", "string"])
def test_body_without_choices_is_transient(protocol: str, body: bytes) -> None:
    server_class, make = PROTOCOLS[protocol]
    with server_class([("garbage", body)]) as server:
        with pytest.raises(LLMTransientError, match="no (choices|content)"):
            make(server).complete("m-test", REQUEST)


def test_openai_null_content_is_transient() -> None:
    null_content = (
        b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": null}}]}'
    )
    with FakeOpenAIServer([("garbage", null_content)]) as server:
        with pytest.raises(LLMTransientError, match="no message content"):
            OpenAIProvider(KEY, server.base_url).complete("m-test", REQUEST)


def test_anthropic_overloaded_529_is_transient() -> None:
    with FakeAnthropicServer([("status", 529)]) as server:
        with pytest.raises(LLMTransientError, match="529"):
            AnthropicProvider(KEY, server.base_url).complete("m-test", REQUEST)


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_timeout_is_transient(protocol: str) -> None:
    server_class, make = PROTOCOLS[protocol]
    with server_class([("sleep", 2.0)]) as server:
        with pytest.raises(LLMTransientError, match="timed out"):
            make(server, timeout=0.5).complete("m-test", REQUEST)


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_connection_refused_is_transient(protocol: str) -> None:
    server_class, make = PROTOCOLS[protocol]
    with server_class() as server:
        provider = make(server)
    # The server is gone now: nothing listens on its port.
    with pytest.raises(LLMTransientError, match="connect"):
        provider.complete("m-test", REQUEST)


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
        with pytest.raises(LLMFatalError, match=str(status)):
            make(server).complete("m-test", REQUEST)


def test_openai_missing_key_is_config_error() -> None:
    with pytest.raises(ConfigError, match="OPENAI_API_KEY") as caught:
        OpenAIProvider()
    assert "OPENAI_BASE_URL" in str(caught.value)


def test_anthropic_missing_key_is_config_error() -> None:
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        AnthropicProvider()
