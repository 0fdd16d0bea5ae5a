"""The project's errors: one base class and a few that mean something to a user."""

from __future__ import annotations


class AutodiffError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(AutodiffError):
    """A bad option, unknown task or provider, or a missing API key. Fix the input and retry."""


class DataError(AutodiffError):
    """A dataset file that cannot be read as the task expects."""


class StoreError(AutodiffError):
    """The run store cannot do what was asked (unknown run, wrong state)."""


class LLMError(AutodiffError):
    """An LLM call failed after the retries the policy allows."""


class LLMTransientError(LLMError):
    """A fault that may go away on retry: rate limit, server error, time-out, garbage body."""


class LLMFatalError(LLMError):
    """A fault retrying cannot fix (bad key, unknown model or endpoint): the run must stop."""


class ParseError(AutodiffError):
    """An LLM reply that does not have the shape we asked for."""
