"""The LLM client: retries, fatal errors, the concurrency limit, the cache, and the real
OpenAI/Anthropic SDKs against local fake servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from autodiff.errors import CallCancelled, LLMFatalError, LLMTransientError
from autodiff.llm.anthropic_provider import AnthropicProvider
from autodiff.llm.cache import ResponseCache, cache_key
from autodiff.llm.client import LLM, RetryPolicy
from autodiff.llm.fake import FakeProvider
from autodiff.llm.limits import EndpointLimiter
from autodiff.llm.openai_provider import OpenAIProvider
from autodiff.llm.types import CallContext, Completion, Message, Request
from tests.http_fakes import FakeAnthropicServer, FakeOpenAIServer

RETRY = RetryPolicy(attempts=3, initial_wait=0, max_wait=0)
CTX = CallContext(run_id="run", step=1, phase="forward", node="n", sample_id="s", call_index=0)
ROOT = Path(__file__).resolve().parents[1]


def _llm(provider, **kw) -> tuple[LLM, list]:
    calls: list = []
    return LLM(f"{provider.name}:m", provider, recorder=calls.append, retry=RETRY, **kw), calls


def test_transient_error_then_success_gives_one_reply() -> None:
    provider = FakeProvider([LLMTransientError("HTTP 429: slow down"), "hello"])
    llm, calls = _llm(provider)
    reply = llm.complete("hi", CTX)
    assert reply.text == "hello" and not reply.cached
    assert provider.calls == 2
    [call] = calls  # one logical call, recorded once, with its context
    assert call.id == reply.call_id and call.response == "hello" and call.error is None
    assert (call.run_id, call.step, call.phase, call.node, call.sample_id) == ("run", 1, "forward", "n", "s")
    assert call.messages == (("user", "hi"),) and call.prompt_tokens == 1 and call.completion_tokens == 1


def test_transient_errors_beyond_the_attempts_give_up() -> None:
    provider = FakeProvider([LLMTransientError("HTTP 503")] * 3 + ["too late"])
    llm, calls = _llm(provider)
    with pytest.raises(LLMTransientError, match=r"gave up after 3 attempts in \d+s: HTTP 503"):
        llm.complete("hi", CTX)
    assert provider.calls == 3
    [call] = calls
    assert "gave up after 3 attempts" in call.error and call.response is None


def test_a_retry_after_longer_than_any_wait_gives_up_at_once_and_says_what_was_asked() -> None:
    """A server asking for a day (a daily quota) is not waited for, even with a retry budget that
    would cover the longest wait a call makes; the error says what the server asked and suggests
    no retry budget (none would help)."""
    from autodiff.llm.sdk_errors import MAX_RETRY_AFTER
    from autodiff.records import Run
    from autodiff.recovery import resume_option

    provider = FakeProvider([LLMTransientError("HTTP 429: quota", kind="rate_limit", retry_after=100_000), "never"])
    llm = LLM("fake:m", provider, retry=RetryPolicy(budget_s=2 * MAX_RETRY_AFTER, initial_wait=0, max_wait=0))
    started = time.monotonic()
    with pytest.raises(LLMTransientError) as raised:
        llm.complete("hi", CTX)
    assert time.monotonic() - started < 5 and provider.calls == 1
    said = str(raised.value)
    assert "asked to wait 100000 s (27.8 h), longer than a call ever waits (600 s)" in said, said
    assert "--retry-budget" not in said
    run = Run(id="r", task="t", config={}, status="stopped", error=f"step 1: 1 of 1 calls failed: {said}",
              created_at=0.0, updated_at=0.0, stop_requested=False, pid=None)
    assert resume_option(run) is None  # no retry budget to suggest
    # Another call of the endpoint meets the pause that 429 set: it says the same, not a capped wait.
    other = LLM("fake:m", FakeProvider(["fine"]), limiter=llm.limiter,
                retry=RetryPolicy(budget_s=300, initial_wait=0, max_wait=0))
    with pytest.raises(LLMTransientError, match=r"asked to wait (99\d\d\d|100000) s \(27\.\d h\), longer than a call ever"):
        other.complete("hi", CTX)
    assert "--retry-budget" not in str(raised.value) and time.monotonic() - started < 5


def test_a_budget_spent_on_time_outs_is_not_called_a_wait_the_server_asked_for() -> None:
    """Attempts that each time out use up the retry budget with no Retry-After sent: the error
    used to say "the server asked to wait 0 s, more than the retry budget" and suggest a larger
    budget, which cannot help; it now gives the time-out, and the resume advice a longer one."""
    from autodiff.records import Run
    from autodiff.recovery import resume_option

    timed_out = LLMTransientError("request timed out (read limit 8s, connect 8s)", kind="timeout")
    provider = FakeProvider([timed_out] * 50, latency=0.1)
    llm = LLM("fake:m", provider, retry=RetryPolicy(budget_s=0.5, initial_wait=0.05, max_wait=0.05))
    with pytest.raises(LLMTransientError) as raised:
        llm.complete("hi", CTX)
    said = str(raised.value)
    assert provider.calls > 1 and "gave up after" in said and "timed out (read limit 8s" in said, said
    assert "asked to wait" not in said and "--retry-budget" not in said, said
    run = Run(id="r", task="t", config={"backward_timeout": 8.0}, status="stopped", error=f"step 1: 2 of 16 backward "
              f"calls failed (more than 10%); first: backward call failed: {said}", created_at=0.0, updated_at=0.0,
              stop_requested=False, pid=None)
    assert resume_option(run) == "--backward-timeout 40"


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, CallCancelled])
def test_a_call_cut_off_by_an_interrupt_is_recorded_as_having_no_reply(interrupt) -> None:
    """Ctrl-C or SIGTERM while a call waits for its reply: it used to be recorded as a successful
    reply with no text and unknown tokens (no error), so the run's token count said "+ unknown"."""
    def cut_off(request):
        raise interrupt()

    llm, calls = _llm(FakeProvider(cut_off))
    with pytest.raises(interrupt):
        llm.complete("hi", CTX)
    [call] = calls
    assert call.response is None and call.error_kind == "interrupted" and "interrupted" in call.error


def test_fatal_error_is_not_retried() -> None:
    provider = FakeProvider([LLMFatalError("HTTP 401: bad key"), "never"])
    llm, calls = _llm(provider)
    with pytest.raises(LLMFatalError, match="401"):
        llm.complete("hi", CTX)
    assert provider.calls == 1
    assert "LLMFatalError" in calls[0].error


def test_concurrency_limit_is_respected() -> None:
    class Counting:
        name = "fake"

        def __init__(self) -> None:
            self.inner = FakeProvider("ok", latency=0.05)
            self.lock = threading.Lock()
            self.now = self.peak = 0

        def complete(self, model: str, request: Request) -> Completion:
            with self.lock:
                self.now += 1
                self.peak = max(self.peak, self.now)
            try:
                return self.inner.complete(model, request)
            finally:
                with self.lock:
                    self.now -= 1

    provider = Counting()
    llm, calls = _llm(provider, limiter=EndpointLimiter(2))
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: llm.complete(f"q{i}", CTX), range(8)))
    assert [r.text for r in replies] == ["ok"] * 8 and len(calls) == 8
    assert provider.peak == 2  # never more than two in flight, and it did run two at once
    assert time.perf_counter() - started >= 4 * 0.05


def test_cache_hit_makes_no_provider_call(tmp_path: Path) -> None:
    provider = FakeProvider(lambda request: "fresh")
    llm, calls = _llm(provider, cache=ResponseCache(tmp_path / "cache.sqlite"))
    first = llm.complete("same prompt", CTX)
    again = LLM("fake:m", provider, cache=ResponseCache(tmp_path / "cache.sqlite"), recorder=calls.append)
    second = again.complete("same prompt", CTX)
    assert provider.calls == 1 and second.text == first.text == "fresh"
    assert (first.cached, second.cached) == (False, True) and [c.cached for c in calls] == [False, True]
    assert (second.prompt_tokens, second.completion_tokens) == (first.prompt_tokens, first.completion_tokens)
    llm.complete("same prompt", CTX, max_tokens=7)  # a different request is a different entry
    assert provider.calls == 2


def test_cache_key_is_a_stable_sha256_without_the_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    request = Request((Message("system", "Be terse."), Message("user", "Count: é, 🍎")), 0.0, 64)
    key = cache_key("openai", "gpt-test", request)
    assert len(key) == 64 and all(c in "0123456789abcdef" for c in key)
    assert key == cache_key("openai", "gpt-test", Request(request.messages, 0.0, 64))
    assert len({key, cache_key("openai", "gpt-other", request), cache_key("anthropic", "gpt-test", request),
                cache_key("openai", "gpt-test", Request(request.messages, 0.5, 64))}) == 4

    code = (
        "from autodiff.llm.cache import cache_key\n"
        "from autodiff.llm.types import Message, Request\n"
        "r = Request((Message('system', 'Be terse.'), Message('user', 'Count: \\u00e9, \\U0001f34e')), 0.0, 64)\n"
        "print(cache_key('openai', 'gpt-test', r))\n"
    )
    keys = []
    for seed, api_key in (("1", "sk-first-0123456789"), ("2", "sk-second-9876543210")):
        env = {**os.environ, "PYTHONHASHSEED": seed, "OPENAI_API_KEY": api_key}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             check=True)
        keys.append(out.stdout.strip())
    assert keys == [key, key]  # other processes, other hash seeds, other keys: the same cache key


def test_cache_file_never_holds_the_api_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-test-cache-SECRET-0123456789"
    with FakeOpenAIServer([("ok", "fine")]) as server:
        provider = OpenAIProvider(secret, server.base_url)
        llm, _ = _llm(provider, cache=ResponseCache(tmp_path / "cache.sqlite"))
        llm.complete("hi", CTX)
        # Another key, same request: served from the cache, so the key is no part of the cache key.
        other = LLM("openai:m", OpenAIProvider("sk-other-key-9876543210", server.base_url),
                    cache=ResponseCache(tmp_path / "cache.sqlite"), retry=RETRY)
        assert other.complete("hi", CTX).cached
    assert len(server.requests) == 1
    assert server.requests[0].headers["authorization"] == f"Bearer {secret}"
    for path in tmp_path.iterdir():
        assert secret.encode() not in path.read_bytes()


# Each SDK provider with the local server speaking its protocol.
SDK_SERVERS = [
    (FakeOpenAIServer, lambda s: OpenAIProvider("sk-test-0123456789abcdef", s.base_url, timeout=5)),
    (FakeAnthropicServer, lambda s: AnthropicProvider("sk-ant-test-0123456789", s.base_url, timeout=5)),
]


@pytest.mark.parametrize("server_class, make", SDK_SERVERS)
def test_sdk_providers_retry_a_429_through_the_client(server_class, make) -> None:
    with server_class([("status", 429), ("ok", "after the wait")]) as server:
        llm, calls = _llm(make(server))
        reply = llm.complete((Message("system", "Be brief."), Message("user", "hi")), CTX)
    assert reply.text == "after the wait" and (reply.prompt_tokens, reply.completion_tokens) == (11, 7)
    assert len(server.requests) == 2 and server.requests[0].body == server.requests[1].body
    assert len(calls) == 1 and calls[0].error is None


@pytest.mark.parametrize("server_class, make", SDK_SERVERS)
def test_sdk_providers_stop_on_401_after_one_request(server_class, make) -> None:
    with server_class([("status", 401), ("ok", "never")]) as server:
        llm, calls = _llm(make(server))
        with pytest.raises(LLMFatalError, match="401") as info:
            llm.complete("hi", CTX)
    assert len(server.requests) == 1
    assert "0123456789" not in str(info.value) and "0123456789" not in json.dumps(calls[0].error)


def test_cache_modes_no_cache_and_refresh(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    replies = iter(["first", "second", "third", "fourth"])
    provider = FakeProvider(lambda request: next(replies))
    use, _ = _llm(provider, cache=ResponseCache(path))
    assert use.complete("q", CTX).text == "first"
    # off: never reads, still writes (a later run reads the newest reply)
    off, _ = _llm(provider, cache=ResponseCache(path), cache_mode="off")
    assert off.complete("q", CTX).text == "second" and off.complete("q", CTX).text == "third"
    assert use.complete("q", CTX).text == "third" and provider.calls == 3
    # refresh: reads only what was written since the run began, so it asks once, then reuses
    refresh, _ = _llm(provider, cache=ResponseCache(path), cache_mode="refresh", cache_since=time.time())
    assert refresh.complete("q", CTX).text == "fourth"
    assert refresh.complete("q", CTX).cached and provider.calls == 4
