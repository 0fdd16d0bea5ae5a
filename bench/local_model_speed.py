"""How fast the embedded local model runs on this machine: load time, then prompt and generation
tokens per second measured separately by llama.cpp's own counters.

    python bench/local_model_speed.py [--model smollm2|/path/to/model.gguf] [--calls 5]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from autodiff.llm.local_provider import (
    LocalProvider,
    build_workarounds,
    resolve_model_path,
    start_from_empty_context,
)

# Different prompts; each is read whole from position 0, as the provider reads every prompt.
TOPICS = ("a lighthouse keeper", "a lost robot", "a mountain village", "a caravan", "a diver")
# Background text that makes each prompt a few hundred tokens, so prompt speed is measurable.
NOTES = "The weather changes quickly, the nights are long, and every choice has a cost. " * 20


@dataclass(frozen=True)
class CallTiming:
    prompt_tokens: int
    prompt_ms: float
    generated_tokens: int
    generation_ms: float


def timed_call(llm: object, topic: str, max_tokens: int) -> CallTiming:
    import llama_cpp

    start_from_empty_context(llm)
    llama_cpp.llama_perf_context_reset(llm.ctx)
    llm.create_chat_completion(
        messages=[{"role": "user", "content": f"Notes on {topic}: {NOTES}\nWrite a long story."}],
        temperature=0.7,
        max_tokens=max_tokens,
        seed=0,
    )
    perf = llama_cpp.llama_perf_context(llm.ctx)
    return CallTiming(perf.n_p_eval, perf.t_p_eval_ms, perf.n_eval, perf.t_eval_ms)


def rate(tokens: int, ms: float) -> float:
    return tokens / (ms / 1000) if ms > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--n-threads", type=int, default=None)
    args = parser.parse_args()

    provider = LocalProvider(n_threads=args.n_threads)
    path = resolve_model_path(args.model)
    start = time.perf_counter()
    llm = provider.load(path)
    load_s = time.perf_counter() - start

    print(f"model: {path.name}  n_ctx={llm.n_ctx()}  threads={llm.n_threads}")
    print(f"build workarounds: {build_workarounds() or 'none'}")
    print(f"load time: {load_s:.2f} s")
    timings = [timed_call(llm, TOPICS[i % len(TOPICS)], args.max_tokens) for i in range(args.calls)]
    for i, t in enumerate(timings, 1):
        print(
            f"call {i}: prompt {t.prompt_tokens} tok"
            f" {rate(t.prompt_tokens, t.prompt_ms):6.1f} tok/s"
            f" | generation {t.generated_tokens} tok"
            f" {rate(t.generated_tokens, t.generation_ms):5.1f} tok/s"
        )
    p_tokens, p_ms = sum(t.prompt_tokens for t in timings), sum(t.prompt_ms for t in timings)
    g_tokens, g_ms = sum(t.generated_tokens for t in timings), sum(t.generation_ms for t in timings)
    print(f"prompt:     {p_tokens} tokens, {rate(p_tokens, p_ms):.1f} tok/s")
    print(f"generation: {g_tokens} tokens, {rate(g_tokens, g_ms):.1f} tok/s")


if __name__ == "__main__":
    main()
