"""Run configuration: validated on the way in, stored as plain JSON (never with keys)."""

from __future__ import annotations

import decimal
import math
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from autodiff.errors import ConfigError

PROVIDERS = ("openai", "anthropic", "local")  # what a user names, and what messages offer
TEST_PROVIDERS = ("fake",)  # scripted replies for tests: accepted, never offered


def default_model() -> str:
    """A provider model when a key is set, else the embedded local model."""
    if os.environ.get("OPENAI_API_KEY"):
        return "openai:gpt-4o-mini"
    if os.environ.get("ANTHROPIC_API_KEY"):
        return "anthropic:claude-sonnet-4-5"
    return "local:smollm2"


def check_model_spec(spec: str) -> str:
    provider, sep, model = spec.partition(":")
    if not sep or not model:
        raise ValueError(f"model {spec!r} must be written provider:model, e.g. openai:gpt-4o-mini")
    if provider not in PROVIDERS + TEST_PROVIDERS:
        raise ValueError(f"unknown provider {provider!r} in {spec!r}; known: {', '.join(PROVIDERS)}")
    return spec


def canonical_task_name(name: str) -> str:
    """A task name as it is stored: a task file by its absolute path (so a run resumes from any
    folder); built-in and module names unchanged."""
    where, sep, attr = name.rpartition(":")
    if sep and where.endswith(".py"):
        return f"{Path(where).expanduser().resolve()}:{attr}"
    return name


def _opt(default, description: str, **limits):
    """A run option: its default, its help text (the CLI's too) and its limits."""
    return Field(default, description=description, **limits)


class RunConfig(BaseModel):
    """Every option of a run, validated on the way in and stored with the run as plain JSON
    (never with keys). The CLI's `train` options are made from these fields (`cli_options`)."""

    model_config = {"extra": "forbid", "frozen": True, "allow_inf_nan": False}  # no --timeout inf

    task: str = Field(description="built-in task name, file.py:factory or module:factory")
    task_args: dict[str, str] = Field(default_factory=dict, description="keyword arguments of the task factory")
    task_in_memory: bool = Field(False, description="trained from Python with a Task object")
    forward_model: str = Field(default_factory=default_model, description="provider:model that runs the pipeline")
    backward_model: str = Field("", description="provider:model that writes gradients (default: the forward model)")
    optimizer_model: str = Field("", description="provider:model that proposes new values (default: the forward model)")
    steps: int = _opt(3, "training steps", ge=1, le=1000)
    batch_size: int = _opt(4, "training samples per step (the mini-batch)", ge=1, le=256)
    tau: float | None = _opt(None, "samples scoring below this go backward (default: the task's)", ge=0.0, le=1.0)
    max_failed: int = _opt(4, "failed samples sent backward per step", ge=1, le=256)
    positives: int = _opt(2, "correct samples shown to the optimizer", ge=0, le=32)
    proposals: int = _opt(2, "proposals per optimizer call", ge=1, le=10)
    lenient_proposals: bool = _opt(False, "weak optimizer models: take untagged replies as candidates "
                                          "(still checked and validated)")
    rounds: int = _opt(1, "optimizer calls per parameter per step while none is accepted", ge=1, le=5)
    concurrency: int = _opt(8, "most requests in flight per endpoint (it adapts below this)", ge=1, le=128)
    review: Literal["off", "validated", "all"] = _opt("off", "proposals wait for a person: those that passed "
                                                             "validation, or all")
    review_timeout: float = _opt(3600.0, "seconds to wait for a review decision", gt=0)
    review_fallback: Literal["reject", "accept"] = _opt("reject", "decision when the review wait runs out")
    min_gain: float = _opt(0.01, "validation gain a proposal needs over the current value", ge=0.0, le=1.0)
    acceptance: Literal["gain", "paired"] = _opt("gain", "gain alone, or also a paired sign test")
    paired_alpha: float = _opt(0.1, "level of the paired sign test", gt=0.0, lt=1.0)
    val_limit: int | None = _opt(None, "use only the first N validation samples", ge=1)
    test_limit: int | None = _opt(None, "use only the first N test samples", ge=1)
    test_each_accept: bool = _opt(False, "score the test set after each step that accepted a proposal")
    seed: int = _opt(0, "seed of the mini-batch sampling")
    max_tokens: int = _opt(512, "reply budget in tokens of backward calls (and nodes without their own)",
                           ge=16, le=8192)
    optimizer_max_tokens: int = _opt(1024, "reply budget in tokens of optimizer calls", ge=16, le=16384)
    max_error_share: float = _opt(0.1, "share (0-1) of a phase's samples that may error (provider faults, "
                                       "errors in your code) before nothing is decided and the run stops, "
                                       "resumable", ge=0.0, le=1.0)
    timeout: float | None = _opt(None, "seconds to wait for one reply, every role (default: no limit for a "
                                       "server on this machine or a private network, 600 for a hosted API)", gt=0)
    forward_timeout: float | None = _opt(None, "seconds to wait for one forward reply", gt=0)
    backward_timeout: float | None = _opt(None, "seconds to wait for one backward reply", gt=0)
    optimizer_timeout: float | None = _opt(None, "seconds to wait for one optimizer reply", gt=0)
    retry_budget: float = _opt(300.0, "seconds one call keeps retrying rate limits, server errors and "
                                      "time-outs", ge=0)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = _opt(
        None, "for reasoning models that take it (OpenAI o-series and gpt-5, Claude with thinking)")
    cache: Literal["use", "refresh", "off"] = _opt("use", "response cache: use it; refresh (ask anew once, "
                                                          "then reuse this run's replies); off (ask every call)")
    budget_usd: float | None = _opt(None, "stop the run cleanly (resumable) before a call that could take its "
                                          "cost past this many US dollars", gt=0)
    budget_tokens: int | None = _opt(None, "stop the run cleanly (resumable) before a call that could take its "
                                           "tokens (fresh calls, prompt and completion) past this many", gt=0)
    prices: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="your prices in USD per million input and output tokens, by provider:model (a rented GPU "
                    "server, a model the price table lacks); local models cost 0 otherwise")

    @model_validator(mode="before")
    @classmethod
    def _roles_default_to_forward(cls, data):
        """A role not given takes the forward model, never silently a different default."""
        if isinstance(data, dict):
            data = dict(data)
            data.setdefault("forward_model", default_model())
            for role in ("backward_model", "optimizer_model"):
                if not data.get(role):
                    data[role] = data["forward_model"]
        return data

    def timeout_for(self, role: str) -> float | None:
        """The reply time-out in seconds for `role` (forward, backward, optimizer)."""
        return getattr(self, f"{role}_timeout") or self.timeout

    @field_validator("prices", mode="before")
    @classmethod
    def _prices(cls, v):
        from autodiff.llm.pricing import UserPrice

        if not isinstance(v, dict):
            raise ValueError("prices map provider:model to USD per million tokens")
        parsed = {}
        for spec, price in v.items():
            check_model_spec(spec)
            rate = UserPrice.parse(price)
            parsed[spec] = (rate.input, rate.output)
        return parsed

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        return canonical_task_name(v)

    @field_validator("forward_model", "backward_model", "optimizer_model")
    @classmethod
    def _model(cls, v: str) -> str:
        return check_model_spec(v)


# Options a resume may change (CLI `resume`, `autodiff.resume`): how calls are retried and judged,
# never what a model replies, so the steps before and after stay comparable. The CLI's flags,
# their help and their limits come from the fields above.
RESUME_OPTIONS = ("timeout", "forward_timeout", "backward_timeout", "optimizer_timeout", "retry_budget",
                  "max_error_share")


def limits(name: str) -> tuple[float | None, float | None, bool, bool]:
    """The bounds RunConfig sets on a numeric option: (low, high, low_strict, high_strict), None
    where open; strict when the bound itself is refused (gt, lt). For forms that say the range."""
    low = high = None
    low_strict = high_strict = False
    for rule in RunConfig.model_fields[name].metadata:
        if getattr(rule, "ge", None) is not None:
            low = rule.ge
        if getattr(rule, "gt", None) is not None:
            low, low_strict = rule.gt, True
        if getattr(rule, "le", None) is not None:
            high = rule.le
        if getattr(rule, "lt", None) is not None:
            high, high_strict = rule.lt, True
    return low, high, low_strict, high_strict


def describe_limits(name: str) -> str:
    """The range of a numeric option in words ("1 to 1000", "more than 0"), "" when open."""
    low, high, low_strict, high_strict = limits(name)
    if low is not None and high is not None and not (low_strict or high_strict):
        return f"{low:g} to {high:g}"
    parts = []
    if low is not None:
        parts.append(f"more than {low:g}" if low_strict else f"at least {low:g}")
    if high is not None:
        parts.append(f"less than {high:g}" if high_strict else f"at most {high:g}")
    return " and ".join(parts)


# The largest whole number an option may take: the stores' 64-bit integers (SQLite, PostgreSQL's
# bigint), and far below Python's 4,300-digit limit on turning an int into text (JSON).
MAX_INT = 2**63 - 1


def parse_option(name: str, text: str, *, zero_is_none: bool = False) -> int | float | None:
    """Numeric option `name`'s value from `text` as a person typed it (a form field): a whole
    number for an int option ("12", "1e3" and "12.0" too), a finite number for a float one, in
    ASCII as Python writes numbers (underscores only between digits, PEP 515). Empty text is
    None, the option's default, where the option may be None (a budget, tau, a sample limit).

    The text is read exactly (`decimal.Decimal`) and checked against RunConfig's limits before
    it becomes a number, so nothing is clipped or guessed into range: "3.0000000000000001" is not
    a whole number, tau "1.00000000000000001" is over 1, and "1e-400", which a float would hold as
    0, is refused rather than read as 0 ("no budget"). A whole number stays exact, up to MAX_INT;
    a fraction becomes the nearest float (as "0.1" does in Python). Raises ConfigError naming what is
    wrong with the text as given, in `make_config`'s words for a range. `zero_is_none`: 0 is
    None too (a form's "0: no budget")."""
    field = RunConfig.model_fields[name]
    whole = field.annotation in (int, int | None)
    kind = "a whole number" if whole else "a number"
    text = said = text.strip()
    if not text:
        if field.default is None:
            return None
        limits_ = describe_limits(name)
        raise ConfigError(f"empty: enter {kind}" + (f", {limits_}" if limits_ else ""))
    if len(text) > 40:  # quoted in part: the message stays readable
        said = f"{text[:12]}…{text[-6:]} ({len(text):,} characters)"
    try:
        if not text.isascii() or re.search(r"(^|[^0-9])_|_($|[^0-9])", text):  # Decimal allows "_1", "1__0"
            raise decimal.InvalidOperation
        exact = decimal.Decimal(text)
    except decimal.InvalidOperation:
        raise ConfigError(f"{said} is not {kind}") from None
    if not exact.is_finite():
        raise ConfigError(f"{said} is not a finite number")
    if zero_is_none and exact == 0:
        return None
    if whole and exact != exact.to_integral_value():
        raise ConfigError(f"{said} is not a whole number")
    low, high, low_strict, high_strict = limits(name)
    for bound, strict, above, words in ((low, low_strict, False, "greater than"),
                                        (high, high_strict, True, "less than")):
        if bound is None:
            continue
        outside = (exact > bound if above else exact < bound) or (strict and exact == bound)
        if outside:
            raise ConfigError(f"Input should be {words}{'' if strict else ' or equal to'} {bound:g} (given: {said})")
    if whole:
        if abs(exact) > MAX_INT:
            raise ConfigError(f"{said} is too large: at most {MAX_INT:,}")
        return int(exact)  # exact ("99999999999999999999", "9007199254740993.0")
    value = float(exact)
    if math.isinf(value):
        raise ConfigError(f"{said} is too large to be a number")
    if value == 0 and exact != 0:
        raise ConfigError(f"{said} is too close to 0: it would be taken as 0")
    return value


def make_config(**options) -> RunConfig:
    """Build a RunConfig, turning validation errors into one clear ConfigError. Its message names
    every bad option, what it takes and the value given; `problems` lists them as (option, text)."""
    options = {k: v for k, v in options.items() if v is not None}
    huge = [(k, f"Input should be at most {MAX_INT:,}")  # before pydantic, which would print all its digits
            for k, v in options.items() if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT]
    if huge:
        error = ConfigError("invalid run configuration: " + "; ".join(f"{name}: {text}" for name, text in huge))
        error.problems = huge
        raise error
    try:
        return RunConfig(**options)
    except ValidationError as exc:
        problems = [(".".join(str(p) for p in e["loc"]) or "config", _problem(e)) for e in exc.errors()]
        error = ConfigError("invalid run configuration: " + "; ".join(f"{name}: {text}" for name, text in problems))
        error.problems = problems
        raise error from None


def _problem(error: dict) -> str:
    text = error["msg"].removeprefix("Value error, ")
    given = error.get("input")
    if error["loc"] and error["loc"][0] in RunConfig.model_fields and isinstance(given, (int, float)) \
            and not isinstance(given, bool):
        shown = f"{given:g}" if isinstance(given, float) and float(f"{given:g}") == given else repr(given)
        text += f" (given: {shown})"  # as given: an int exact, a float in full where :g would round it
    return text
