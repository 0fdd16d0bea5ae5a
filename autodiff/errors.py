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
    """An LLM call that gave no usable reply. `kind` names the fault for counting and display
    (one of `ERROR_KINDS`); `usage` holds the tokens the server reported for the failed attempts
    that had a body, as (prompt, completion), so accounting matches the server."""

    kind = "error"

    def __init__(self, message: str, *, kind: str | None = None, usage: tuple[int, int] | None = None):
        super().__init__(message)
        if kind is not None:
            self.kind = kind
        self.usage = usage


class LLMTransientError(LLMError):
    """A fault that may go away on retry: rate limit, server error, time-out, connection error,
    garbage body. `retry_after` is the wait in seconds the server asked for (Retry-After), if any."""

    kind = "server"

    def __init__(self, message: str, *, kind: str | None = None, retry_after: float | None = None,
                 usage: tuple[int, int] | None = None):
        super().__init__(message, kind=kind, usage=usage)
        self.retry_after = retry_after


class LLMReplyError(LLMError):
    """The server answered, but with nothing usable (no text at all). Asking the same again would
    pay for the same reply, so it is not retried; the sample or proposal fails with the reason."""

    kind = "empty"


class LLMContextWindowError(LLMError):
    """The prompt does not fit the model's context window. Never cut silently, never retried:
    the call fails with the sizes, on the record of its node and phase."""

    kind = "context_window"


class LLMFatalError(LLMError):
    """A fault retrying cannot fix (bad key, unknown model or endpoint, an option the model
    rejects): the run must stop."""

    kind = "fatal"


class CallCancelled(BaseException):
    """A call given up because its run was interrupted (Ctrl-C, SIGTERM): raised in the call's
    thread from a retry wait or a wait for the endpoint (`EndpointLimiter.cancel`), so that the
    process ends at once, not when the longest Retry-After is over. Not an error of the call or of
    its sample (a BaseException: nothing catches it as one); the interrupted step is redone on
    resume."""


class StoreUnreachable(StoreError):
    """A store that was open stopped answering: its PostgreSQL server is down or restarting, or
    the network to it is cut. Nothing stored is lost; what was being written is not written."""


class RunTakenOver(BaseException):
    """A write of a trainer refused by the store because its run is no longer held by the process
    that fenced it (`Store.fence`): another process took the run over while this one was paused
    (a machine asleep, a stopped process, a network partition long enough for a worker's heartbeat
    to go stale). Nothing of the write reaches the store; the trainer leaves the run to the new
    holder. A BaseException, like CallCancelled: no handler of a sample's or a call's errors may
    record it as one of theirs. `run_id` is the run, `now` who holds it now (or its state)."""

    def __init__(self, run_id: str, now: str):
        super().__init__(f"run {run_id} was taken over by another process ({now}): this process writes nothing "
                         "more to it")
        self.run_id, self.now = run_id, now


class TooManyErrors(AutodiffError):
    """The share of samples whose calls failed in one phase of a step passed the run's limit
    (`max_error_share`). The run stops cleanly with this reason and can be resumed; the failed
    calls are asked again then (failures are never cached)."""


class BudgetExceeded(AutodiffError):
    """The next LLM call would take the run past its budget (`budget_usd`, `budget_tokens`),
    counting what the run has spent and the calls already in flight. Raised before the call is
    sent; the run stops cleanly (status stopped, its error starting with "budget"), keeps
    everything done so far and can be resumed with a larger budget. Not an LLMError: no sample
    is marked errored for it. `option` names the budget reached: "budget_usd" or "budget_tokens"."""

    def __init__(self, message: str, option: str = "budget_usd"):
        super().__init__(message)
        self.option = option


class ParseError(AutodiffError):
    """An LLM reply that does not have the shape we asked for."""


# What an LLM call's `error_kind` can say: rate_limit (429), timeout, server (5xx), connection,
# garbage (an unparseable body), empty (no text), context_window, fatal (4xx that retrying cannot fix),
# interrupted (Ctrl-C or SIGTERM before its reply: the run stopped, the call has no reply).
ERROR_KINDS = ("rate_limit", "timeout", "server", "connection", "garbage", "empty", "context_window", "fatal",
               "interrupted")
