"""Faults of real protocols, through the providers' own SDKs against local servers that speak
them: Retry-After is honoured, every worker of an endpoint slows down after a 429, a run with
one call in five failing completes and counts every fault, the cache keeps two servers apart,
reasoning models get the options they accept, and recorded tokens equal what the server reported.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from autodiff.config import make_config
from autodiff import runner
from autodiff.errors import LLMFatalError
from autodiff.llm.anthropic_provider import AnthropicProvider
from autodiff.llm.cache import ResponseCache
from autodiff.llm.client import LLM, RetryPolicy
from autodiff.llm.limits import EndpointLimiter
from autodiff.llm.openai_provider import OpenAIProvider
from autodiff.llm.types import CallContext, Message, Request
from autodiff.metrics import step_figures
from conftest import TOY_DEFAULTS, Script
from tests.http_fakes import FakeAnthropicServer, FakeOpenAIServer, RecordedRequest

KEY = "sk-test-0123456789abcdef"
CTX = CallContext(run_id="r", step=1, phase="forward", node="n", sample_id="s", call_index=0, role="forward")
QUICK = RetryPolicy(budget_s=30, initial_wait=0.01, max_wait=0.05)


def _llm(provider, spec: str = "openai:m", **kw) -> tuple[LLM, list]:
    calls: list = []
    return LLM(spec, provider, recorder=calls.append, retry=kw.pop("retry", QUICK), **kw), calls


def test_429_with_retry_after_is_retried_no_sooner_than_asked() -> None:
    with FakeOpenAIServer([("status", 429, {"retry-after": "3"}), ("ok", "after the wait")]) as server:
        llm, calls = _llm(OpenAIProvider(KEY, server.base_url))
        reply = llm.complete("hi", CTX)
        first, second = server.requests
    assert reply.text == "after the wait"
    assert second.arrived - first.ended >= 3.0  # the backoff alone would have waited 0.01 s
    assert calls[0].attempts == 2 and calls[0].error is None


def test_retry_after_ms_is_honoured_too() -> None:
    with FakeOpenAIServer([("status", 503, {"retry-after-ms": "1500"}), ("ok", "fine")]) as server:
        llm, _ = _llm(OpenAIProvider(KEY, server.base_url))
        llm.complete("hi", CTX)
        first, second = server.requests
    assert second.arrived - first.ended >= 1.5


def test_after_a_429_every_worker_of_the_endpoint_waits() -> None:
    limiter = EndpointLimiter(4)
    with FakeOpenAIServer([("status", 429, {"retry-after": "2"})]) as server:
        provider = OpenAIProvider(KEY, server.base_url)
        first, _ = _llm(provider, limiter=limiter)
        other, _ = _llm(provider, limiter=limiter)
        worker = threading.Thread(target=first.complete, args=("one", CTX))
        worker.start()
        while limiter.paused_until <= time.monotonic():  # until the client has read the 429
            time.sleep(0.01)
        rate_limited_at = server.requests[0].ended
        other.complete("another request, from another worker", CTX)
        worker.join()
    later = [r for r in server.requests[1:]]
    assert len(later) == 2 and all(r.arrived - rate_limited_at >= 2.0 for r in later)
    assert limiter.limit < 4  # halved on the 429 (then growing again with each success)


def test_two_servers_behind_one_cache_each_get_their_own_replies(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "cache.sqlite")
    with FakeOpenAIServer([("ok", "from A")]) as a, FakeOpenAIServer([("ok", "from B")]) as b:
        on_a, _ = _llm(OpenAIProvider(None, a.base_url), spec="openai:llama3.1", cache=cache)
        on_b, _ = _llm(OpenAIProvider(None, b.base_url), spec="openai:llama3.1", cache=cache)
        assert on_a.complete("same question", CTX).text == "from A"
        assert on_b.complete("same question", CTX).text == "from B"
        again_a, again_b = on_a.complete("same question", CTX), on_b.complete("same question", CTX)
    assert (again_a.text, again_a.cached, again_b.text, again_b.cached) == ("from A", True, "from B", True)
    assert (len(a.requests), len(b.requests)) == (1, 1)


def test_reasoning_model_request_through_the_client() -> None:
    with FakeOpenAIServer([("ok", "4"), ("ok", "4")]) as server:
        provider = OpenAIProvider(KEY, server.base_url)
        reasoning, _ = _llm(provider, spec="openai:gpt-5-mini", reasoning_effort="low", max_tokens=300)
        reasoning.complete("Count the apples.", CTX)
        plain, _ = _llm(provider, spec="openai:gpt-4o-mini", max_tokens=300)
        plain.complete("Count the apples.", CTX)
    sent, plain_sent = server.requests[0].body, server.requests[1].body
    assert "temperature" not in sent and "max_tokens" not in sent
    assert sent["max_completion_tokens"] > 300 and sent["reasoning_effort"] == "low"
    assert plain_sent["max_tokens"] == 300 and plain_sent["temperature"] == 0.0
    assert "reasoning_effort" not in plain_sent


def test_anthropic_thinking_and_text_blocks_give_the_text_and_keep_the_reasoning() -> None:
    blocks = [{"type": "thinking", "thinking": "Three apples and two pears.", "signature": "sig"},
              {"type": "text", "text": "There are "}, {"type": "text", "text": "5 fruits."}]
    with FakeAnthropicServer([("reply", {"content": blocks})]) as server:
        llm, calls = _llm(AnthropicProvider("sk-ant-test-0123456789", server.base_url), spec="anthropic:claude-x")
        reply = llm.complete("How many fruits?", CTX)
    assert reply.text == "There are 5 fruits." and reply.reasoning == "Three apples and two pears."
    assert calls[0].response == "There are 5 fruits." and calls[0].reasoning == "Three apples and two pears."


def test_reasoning_in_the_visible_reply_is_kept_apart_and_never_the_answer(tmp_path: Path) -> None:
    with FakeOpenAIServer([("ok", "<think>Count: 2 + 3.</think>\nAnswer: 5"), ("ok", "<think>Still thinking")]) \
            as server:
        llm, calls = _llm(OpenAIProvider(None, server.base_url), cache=ResponseCache(tmp_path / "c.sqlite"))
        reply = llm.complete("q1", CTX)
        assert (reply.text, reply.reasoning) == ("Answer: 5", "Count: 2 + 3.")
        with pytest.raises(Exception, match="only reasoning"):
            llm.complete("q2", CTX)
    assert calls[1].error_kind == "empty" and calls[1].response is None


def test_cut_off_and_empty_replies_are_marked_and_never_cached(tmp_path: Path) -> None:
    script = [("cutoff", "Answer: 1"), ("empty", None), ("ok", "Answer: 12"), ("ok", "Answer: 13")]
    with FakeOpenAIServer(script) as server:
        llm, calls = _llm(OpenAIProvider(None, server.base_url), cache=ResponseCache(tmp_path / "c.sqlite"))
        cut = llm.complete("q", CTX)
        assert cut.cut_off and calls[0].finish_reason == "length" and calls[0].cut_off
        with pytest.raises(Exception, match="no text"):
            llm.complete("q2", CTX)
        assert calls[1].attempts == 1  # an empty reply is not paid for again
        assert llm.complete("q", CTX).text == "Answer: 12"  # the cut-off reply was not cached
        assert llm.complete("q2", CTX).text == "Answer: 13"  # nor the empty one
    assert len(server.requests) == 4


def test_recorded_tokens_equal_what_the_server_reported_with_retries() -> None:
    script = [("status", 500), ("empty", None), ("status", 429), ("garbage", b"{not json"),
              ("reply", {"text": "fine", "usage": {"prompt_tokens": 40, "completion_tokens": 9}}),
              ("cutoff", "half")]
    with FakeOpenAIServer(script) as server:
        llm, calls = _llm(OpenAIProvider(None, server.base_url))
        with pytest.raises(Exception):
            llm.complete("a", CTX)  # 500, then an empty reply (with usage): an error
        llm.complete("b", CTX)  # 429, garbage, then fine
        llm.complete("c", CTX)  # cut off
        reported = server.reported_usage()
    recorded = (sum(c.prompt_tokens for c in calls), sum(c.completion_tokens for c in calls))
    assert recorded == reported and reported[0] > 0
    assert [c.attempts for c in calls] == [2, 3, 1]
    assert sum(c.attempts for c in calls) == len(server.requests)


# --- whole runs through the OpenAI protocol ------------------------------------------------------

def _responder(script: Script, faults: list[str]):
    """Answers as the scripted toy model, except that every fifth request gets the next fault."""
    counter = iter(range(1_000_000))
    lock = threading.Lock()
    served: list[str] = []

    def respond(request: RecordedRequest):
        body = request.body
        reply = script(Request(tuple(Message(m["role"], m["content"]) for m in body["messages"])))
        with lock:
            n = next(counter)
            fault = faults[(n // 5) % len(faults)] if n % 5 == 4 else None
            served.append(fault or "ok")
        if fault == "429":
            return ("status", 429, {"retry-after": "0.05"})
        if fault == "500":
            return ("status", 500)
        if fault == "timeout":
            return ("sleep", 1.5)
        if fault == "garbage":
            return ("garbage", b"<html>502 Bad Gateway</html>")
        if fault == "empty":
            return ("empty", None)
        if fault == "cutoff":
            return ("cutoff", reply)
        return ("ok", reply)

    return respond, served


def test_a_run_with_one_call_in_five_failing_completes_and_counts_every_fault(store, tmp_path: Path) -> None:
    faults = ["429", "500", "timeout", "garbage", "empty", "cutoff"]
    respond, served = _responder(Script(), faults)
    with FakeOpenAIServer(responder=respond) as server:
        options = {**TOY_DEFAULTS, "forward_model": "openai:toy", "backward_model": "openai:toy",
                   "optimizer_model": "openai:toy", "timeout": 0.5, "max_error_share": 0.5, "steps": 2}
        run_id = runner.train(store, make_config(**options), run_id="faulty", providers={"openai": OpenAIProvider(None, server.base_url)}, cache_path=tmp_path / "cache.sqlite", retry=QUICK)
        server.wait_idle()
        reported = server.reported_usage()
    assert store.run(run_id).status == "completed"
    calls = store.call_summaries(run_id)
    fresh = [c for c in calls if not c.cached]
    # Every request the server saw is one attempt of a recorded call, and tokens match its count.
    assert sum(c.attempts for c in fresh) == len(server.requests) == len(served)
    assert (sum(c.prompt_tokens for c in fresh), sum(c.completion_tokens for c in fresh)) == reported
    # Retried faults cost attempts, not answers; empty replies are errors; cut-offs are marked.
    assert sum(c.attempts - 1 for c in fresh) == sum(served.count(f) for f in ("429", "500", "timeout", "garbage"))
    assert sum(c.error_kind == "empty" for c in calls) == served.count("empty") > 0
    assert sum(c.finish_reason == "length" for c in calls) == served.count("cutoff") > 0
    rows = step_figures(store, run_id)
    assert sum(r["errors"] for r in rows) == sum(1 for c in calls if c.error)
    # Nothing was decided on an error: errored samples are unscored and never sent backward.
    for e in store.evaluations(run_id):
        assert (e.score is None) == bool(e.error and "Error" in e.error.split(":")[0])
    errored = {(e.step, e.sample_id) for e in store.evaluations(run_id) if e.score is None}
    for step in store.steps(run_id):
        assert not {(step.step, s) for s in step.failed_samples} & errored


def test_a_wrong_model_fails_at_preflight_before_anything_is_spent(store, tmp_path: Path) -> None:
    with FakeOpenAIServer([("status", 404)]) as server:
        options = {**TOY_DEFAULTS, "forward_model": "openai:no-such-model"}
        started = time.monotonic()
        with pytest.raises(LLMFatalError, match="forward model openai:no-such-model") as info:
            runner.train(store, make_config(**options), run_id="wrong", providers={"openai": OpenAIProvider(None, server.base_url)}, cache_path=tmp_path / "cache.sqlite")
    assert time.monotonic() - started < 10
    assert "404" in str(info.value) and store.run("wrong").status == "failed"
    calls = store.call_summaries("wrong")
    assert [c.phase for c in calls] == ["preflight"] and len(server.requests) == 1


def test_a_rejected_option_names_the_role_the_model_and_the_option(store, tmp_path: Path) -> None:
    from tests.http_fakes import OPENAI_UNSUPPORTED_TEMPERATURE_BODY

    with FakeOpenAIServer([("error", 400, OPENAI_UNSUPPORTED_TEMPERATURE_BODY)]) as server:
        options = {**TOY_DEFAULTS, "backward_model": "openai:some-model"}
        with pytest.raises(LLMFatalError) as info:
            runner.train(store, make_config(**options), run_id="option", providers={"openai": OpenAIProvider(None, server.base_url)}, cache_path=tmp_path / "cache.sqlite")
    message = str(info.value)
    assert "backward model openai:some-model" in message and "temperature" in message


def test_a_prompt_too_long_is_an_error_on_its_call_record(store, tmp_path: Path) -> None:
    # The second forward request of step 0's validation overflows the context window.
    script = Script()
    count = iter(range(1000))

    def respond(request: RecordedRequest):
        n = next(count)
        if n == 4:  # after the three preflight probes and one validation sample
            return ("context_window", None)
        body = request.body
        return ("ok", script(Request(tuple(Message(m["role"], m["content"]) for m in body["messages"]))))

    with FakeOpenAIServer(responder=respond) as server:
        options = {**TOY_DEFAULTS, "forward_model": "openai:a", "backward_model": "openai:b",
                   "optimizer_model": "openai:c", "concurrency": 1, "max_error_share": 0.2}
        runner.train(store, make_config(**options), run_id="long", providers={"openai": OpenAIProvider(None, server.base_url)}, cache_path=tmp_path / "cache.sqlite")
    [call] = [c for c in store.call_summaries("long") if c.error_kind == "context_window"]
    assert (call.phase, call.node, call.step, call.attempts) == ("validate", "solver", 0, 1)
    [evaluation] = [e for e in store.evaluations("long") if e.score is None and e.step == 0]
    assert "context" in evaluation.error.lower()


def test_reasoning_whose_opening_tag_was_in_the_prompt_is_kept_apart() -> None:
    with FakeOpenAIServer([("ok", "Let me count: 2 + 3.</think>\nAnswer: 5")]) as server:
        llm, calls = _llm(OpenAIProvider(None, server.base_url))
        reply = llm.complete("q", CTX)
    assert (reply.text, reply.reasoning) == ("Answer: 5", "Let me count: 2 + 3.")


def test_a_reply_cut_off_while_reasoning_is_recorded_as_cut_off() -> None:
    with FakeOpenAIServer([("cutoff", "<think>Counting the apples one by one")]) as server:
        llm, calls = _llm(OpenAIProvider(None, server.base_url))
        with pytest.raises(Exception, match="cut off"):
            llm.complete("q", CTX)
    [call] = calls
    assert call.error_kind == "empty" and call.finish_reason == "length" and call.cut_off
    assert call.reasoning == "Counting the apples one by one"


def test_a_200_reply_without_choices_still_counts_its_tokens() -> None:
    body = b'{"id": "x", "object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34}}'
    with FakeOpenAIServer([("garbage", body), ("ok", "fine")]) as server:
        llm, calls = _llm(OpenAIProvider(None, server.base_url))
        llm.complete("q", CTX)
    assert (calls[0].prompt_tokens, calls[0].completion_tokens) == (30 + 11, 4 + 7)


def test_time_queued_before_the_first_failure_does_not_use_up_the_retry_budget() -> None:
    from autodiff.errors import LLMTransientError
    from autodiff.llm.fake import FakeProvider

    answers = iter([LLMTransientError("HTTP 500", kind="server"), "fine"])

    def slow_then_fine(request):
        reply = next(answers)
        if isinstance(reply, Exception):
            time.sleep(1.0)  # waited its turn at a one-at-a-time server, then failed
        return reply

    llm, calls = _llm(FakeProvider(slow_then_fine), retry=RetryPolicy(budget_s=0.5, initial_wait=0.01, max_wait=0.01))
    assert llm.complete("q", CTX).text == "fine" and calls[0].attempts == 2


def test_a_resume_against_another_server_is_refused(store, tmp_path: Path) -> None:
    from autodiff.config import make_config
    from autodiff.errors import ConfigError
    from conftest import toy_forward

    script = Script(forward=toy_forward)

    def respond(request: RecordedRequest):
        body = request.body
        return ("ok", script(Request(tuple(Message(m["role"], m["content"]) for m in body["messages"]))))

    options = {**TOY_DEFAULTS, "forward_model": "openai:toy", "backward_model": "openai:toy",
               "optimizer_model": "openai:toy"}
    with FakeOpenAIServer(responder=respond) as a, FakeOpenAIServer(responder=respond) as b:
        def stop_at_once(event: str, info: dict) -> None:
            if event == "initial":
                store.request_stop(info["run_id"])

        runner.train(store, make_config(**options), run_id="moved", cache_path=tmp_path / "c.sqlite",
                     providers={"openai": OpenAIProvider(None, a.base_url)}, progress=stop_at_once)
        assert store.run("moved").status == "stopped"
        with pytest.raises(ConfigError, match="another server"):
            runner.resume(store, "moved", providers={"openai": OpenAIProvider(None, b.base_url)},
                          cache_path=tmp_path / "c.sqlite")
        runner.resume(store, "moved", providers={"openai": OpenAIProvider(None, a.base_url)},
                      cache_path=tmp_path / "c.sqlite")
    assert store.run("moved").status == "completed"


def test_a_server_wait_longer_than_the_retry_budget_gives_up_at_once_and_says_so() -> None:
    from autodiff.errors import LLMTransientError

    with FakeOpenAIServer([("status", 429, {"retry-after": "120"}), ("ok", "too late")]) as server:
        llm, calls = _llm(OpenAIProvider(KEY, server.base_url), retry=RetryPolicy(budget_s=20, initial_wait=0.01))
        started = time.monotonic()
        with pytest.raises(LLMTransientError) as info:
            llm.complete("hi", CTX)
    assert time.monotonic() - started < 5 and len(server.requests) == 1
    message = str(info.value)
    assert "the server asked to wait 120 s, more than the 20 s retry budget" in message
    assert "gave up after 1 attempt in" in message and "--retry-budget 150" in message and "HTTP 429" in message


def test_the_endpoint_pause_after_another_calls_429_counts_against_the_retry_budget() -> None:
    from autodiff.errors import LLMTransientError

    limiter = EndpointLimiter(4)
    with FakeOpenAIServer([("status", 429, {"retry-after": "1"}), ("ok", "too late")]) as server:
        llm, calls = _llm(OpenAIProvider(KEY, server.base_url), limiter=limiter,
                          retry=RetryPolicy(budget_s=3, initial_wait=0.01, max_wait=0.01))
        errors: list[Exception] = []

        def call() -> None:
            try:
                llm.complete("hi", CTX)
            except LLMTransientError as exc:
                errors.append(exc)

        worker = threading.Thread(target=call)
        started = time.monotonic()
        worker.start()
        while limiter.paused_until <= time.monotonic():  # until the client has read its 429
            time.sleep(0.01)
        limiter.pause(10)  # another call of the endpoint got a 429 asking for 10 s
        worker.join(timeout=15)
    assert time.monotonic() - started < 3 and len(server.requests) == 1  # never sat out the 10 s
    [error] = errors
    assert "the server asked to wait" in str(error) and "3 s retry budget" in str(error)
    assert "--retry-budget" in str(error) and calls[0].attempts == 1


def test_a_call_that_meets_a_pause_longer_than_its_retry_budget_gives_up_without_waiting() -> None:
    """Another call's 429 paused the endpoint for longer than a new call's whole retry budget: the
    new call gives up at once, sending nothing, and says why (a phase of many calls stops in
    seconds, not after each sat out the pause); a pause within the budget is waited out."""
    from autodiff.errors import LLMTransientError

    limiter = EndpointLimiter(4)
    with FakeOpenAIServer([("ok", "after the pause")]) as server:
        llm, calls = _llm(OpenAIProvider(KEY, server.base_url), limiter=limiter,
                          retry=RetryPolicy(budget_s=3, initial_wait=0.01, max_wait=0.01))
        limiter.pause(60)
        started = time.monotonic()
        with pytest.raises(LLMTransientError) as info:
            llm.complete("hi", CTX)
        assert time.monotonic() - started < 1 and server.requests == []
        message = str(info.value)
        assert "the server asked to wait 60 s, more than the 3 s retry budget" in message, message
        assert "another call's rate limit (HTTP 429)" in message and "--retry-budget 80" in message
        assert info.value.kind == "rate_limit" and calls[-1].attempts == 0 and calls[-1].error
        limiter.paused_until = time.monotonic() + 0.5  # within the budget: sat out, then sent
        assert llm.complete("hi", CTX).text == "after the pause" and len(server.requests) == 1


def test_a_reply_cut_off_before_any_text_names_the_flag_of_the_roles_token_limit() -> None:
    from autodiff.errors import LLMReplyError

    for role, flag in (("optimizer", "--optimizer-max-tokens"), ("backward", "--max-tokens"),
                       ("forward", "the node's max_tokens")):
        with FakeOpenAIServer([("cutoff", "")]) as server:
            llm, calls = _llm(OpenAIProvider(KEY, server.base_url), role=role)
            with pytest.raises(LLMReplyError, match="cut off") as info:
                llm.complete("q", CTX)
        assert flag in str(info.value) and "max_tokens" not in str(info.value).replace("node's max_tokens", "")
        assert calls[0].finish_reason == "length"
