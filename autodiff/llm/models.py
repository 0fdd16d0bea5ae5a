"""What each model family accepts: the one table the providers consult instead of `if`s.

Sources: OpenAI's reasoning guide and API reference (o-series and gpt-5 reasoning models take
`max_completion_tokens`, not `max_tokens`, reject any temperature but the default, take
`reasoning_effort`, and spend hidden reasoning tokens out of the completion budget); Anthropic's
extended-thinking guide (Claude 3.7 and the Claude 4 families take `thinking.budget_tokens` of at
least 1,024, which counts against `max_tokens`; from Claude Opus 4.6 on, adaptive thinking with
`output_config.effort` replaces the fixed budget). Unknown models, which includes every model of
an OpenAI-compatible local server, get the plain chat-completions options every server accepts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")

# Completion tokens added for hidden reasoning, by effort (None: the provider's default effort,
# which is medium for OpenAI). Unused budget costs nothing; too little leaves an empty reply.
REASONING_ALLOWANCE = {"none": 0, "minimal": 1024, "low": 4096, "medium": 8192, "high": 16384, None: 8192}

# Anthropic thinking budget by effort; None and "none" leave extended thinking off.
THINKING_BUDGET = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384}


@dataclass(frozen=True)
class Family:
    """Options a family of models accepts.

    - `token_param`: the request field that caps the reply ("max_tokens" or "max_completion_tokens").
    - `temperature`: whether a temperature other than the default may be sent.
    - `reasoning_effort`: whether `reasoning_effort` may be sent (OpenAI reasoning models).
    - `hidden_reasoning`: the completion budget must leave room for reasoning the reply does not show.
    - `thinking`: how Anthropic extended thinking is switched on: "enabled" (a fixed
      `budget_tokens`), "adaptive" (the model decides; the effort goes in `output_config`), or
      None (no thinking).
    """

    name: str
    provider: str
    pattern: str  # regular expression matched against the model name from its start
    token_param: str = "max_tokens"
    temperature: bool = True
    reasoning_effort: bool = False
    hidden_reasoning: bool = False
    thinking: str | None = None

    def completion_budget(self, max_tokens: int, effort: str | None) -> int:
        """Tokens to allow for the whole completion: the visible reply plus hidden reasoning."""
        if self.hidden_reasoning:
            return max_tokens + REASONING_ALLOWANCE.get(effort, REASONING_ALLOWANCE[None])
        if self.thinking and effort in THINKING_BUDGET:  # adaptive thinking may use as much
            return max_tokens + THINKING_BUDGET[effort]
        return max_tokens


_OPENAI_REASONING = dict(token_param="max_completion_tokens", temperature=False, reasoning_effort=True,
                         hidden_reasoning=True)

FAMILIES: tuple[Family, ...] = (
    # gpt-5-chat-* is the non-reasoning chat model of the gpt-5 family.
    Family("gpt-5-chat", "openai", r"gpt-5(\.\d+)?-chat", token_param="max_completion_tokens"),
    Family("gpt-5", "openai", r"gpt-5", **_OPENAI_REASONING),
    Family("o-series", "openai", r"o[1-9](-|$)", **_OPENAI_REASONING),
    # Claude Opus 4.6 and later take adaptive thinking; their SDK calls a fixed budget deprecated.
    Family("claude-adaptive", "anthropic", r"claude-((opus|sonnet|haiku)-(4-[6-9]|[5-9])(-|$)|mythos)",
           temperature=False, thinking="adaptive"),
    Family("claude-thinking", "anthropic", r"claude-(3-7|(opus|sonnet|haiku)-4|4)", temperature=False,
           thinking="enabled"),
    Family("claude", "anthropic", r"claude", temperature=False),
)

DEFAULT = {provider: Family(f"{provider}-default", provider, "")
           for provider in ("openai", "anthropic", "local", "fake")}


def takes_reasoning_effort(spec: str) -> bool:
    """Whether a request to model `spec` ("provider:model") carries the run's reasoning effort:
    OpenAI's reasoning models (`reasoning_effort`) and Anthropic's models with extended thinking
    do; any other model (another server's behind the OpenAI API, a local one) is asked without it."""
    provider, _, model = spec.partition(":")
    family = family_of(provider, model)
    return family.reasoning_effort or family.thinking is not None


def family_of(provider: str, model: str) -> Family:
    """The first family of `provider` whose pattern matches `model` (a dated or fine-tuned name
    such as "ft:gpt-5-mini:org::id" or "o3-2025-04-16" matches its base), else the provider's
    default family."""
    name = model.removeprefix("ft:").rsplit("/", 1)[-1].lower()
    for family in FAMILIES:
        if family.provider == provider and re.match(family.pattern, name):
            return family
    return DEFAULT.get(provider, Family(f"{provider}-default", provider, ""))
