"""Run configuration: validated on the way in, stored as plain JSON (never with keys)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from autodiff.errors import ConfigError

PROVIDERS = ("openai", "anthropic", "local", "fake")


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
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r} in {spec!r}; known: {', '.join(PROVIDERS)}")
    return spec


class RunConfig(BaseModel):
    model_config = {"extra": "forbid", "frozen": True}

    task: str
    forward_model: str = Field(default_factory=default_model)
    backward_model: str = Field(default_factory=default_model)
    optimizer_model: str = Field(default_factory=default_model)
    steps: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(4, ge=1, le=256)
    tau: float | None = Field(None, ge=0.0, le=1.0)  # None: the task's default
    max_failed: int = Field(4, ge=1, le=256)  # failed samples sent backward per step
    positives: int = Field(2, ge=0, le=32)  # correct samples shown to the optimizer
    proposals: int = Field(2, ge=1, le=10)
    lenient_proposals: bool = False  # weak optimizers: take untagged replies as candidates (still validated)
    rounds: int = Field(1, ge=1, le=5)  # optimizer calls per parameter per step while none is accepted
    concurrency: int = Field(8, ge=1, le=128)
    review: Literal["off", "validated", "all"] = "off"
    review_timeout: float = Field(3600.0, gt=0)
    review_fallback: Literal["reject", "accept"] = "reject"
    min_gain: float = Field(0.01, ge=0.0, le=1.0)
    acceptance: Literal["gain", "paired"] = "gain"
    paired_alpha: float = Field(0.1, gt=0.0, lt=1.0)
    val_limit: int | None = Field(None, ge=1)
    test_limit: int | None = Field(None, ge=1)
    test_each_accept: bool = False
    seed: int = 0
    max_tokens: int = Field(512, ge=16, le=8192)
    optimizer_max_tokens: int = Field(1024, ge=16, le=16384)  # room for several proposals per reply
    # Provider faults: above this share (0..1) of errored samples in one phase of a step, nothing
    # is decided on the comparison and the run stops, resumable (see autodiff.judge).
    max_error_share: float = Field(0.1, ge=0.0, le=1.0)
    # Seconds to wait for one reply once sent; None: no limit for a server on this machine or
    # a private network (a queued request is never abandoned), 600 s for a hosted API.
    timeout: float | None = Field(None, gt=0)
    forward_timeout: float | None = Field(None, gt=0)  # per role; overrides `timeout`
    backward_timeout: float | None = Field(None, gt=0)
    optimizer_timeout: float | None = Field(None, gt=0)
    retry_budget: float = Field(300.0, ge=0)  # seconds one call keeps retrying transient faults
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None  # models that take it
    cache: Literal["use", "refresh", "off"] = "use"  # refresh: read only replies written by this run

    def timeout_for(self, role: str) -> float | None:
        """The reply time-out in seconds for `role` (forward, backward, optimizer)."""
        return getattr(self, f"{role}_timeout") or self.timeout

    @field_validator("forward_model", "backward_model", "optimizer_model")
    @classmethod
    def _model(cls, v: str) -> str:
        return check_model_spec(v)


def make_config(**options) -> RunConfig:
    """Build a RunConfig, turning validation errors into one clear ConfigError."""
    options = {k: v for k, v in options.items() if v is not None}
    try:
        return RunConfig(**options)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise ConfigError(f"invalid run configuration: {problems}") from None
