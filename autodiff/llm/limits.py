"""Concurrency per endpoint that adapts to the server: additive increase, multiplicative decrease.

A local server that serves one request at a time and a hosted API that rate-limits both answer
overload with faults (time-outs, 429, 5xx). Each endpoint (base URL) gets one limiter shared by
every role and thread that calls it: a fault halves its limit (once per round of requests: the
requests already in flight when the limit was cut do not cut it again), every `limit`
successes raise it by one, up to the configured maximum. A 429 also pauses every caller of the
endpoint until the server's Retry-After has passed, so all workers slow down together; a caller
that is retrying gives a deadline (the end of its retry budget) and is told at once, without
waiting, when the pause ends past it.

The scheme is TCP's congestion control (AIMD; Jacobson, "Congestion Avoidance and Control",
SIGCOMM 1988) applied to requests in flight, as in Netflix's concurrency-limits library.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from autodiff.errors import CallCancelled


@dataclass(frozen=True)
class Slot:
    """A held place in an endpoint's queue; `started` is the monotonic time it was granted."""

    started: float


class EndpointLimiter:
    """At most `limit` requests in flight to one endpoint; `limit` moves between 1 and `maximum`.

    Use `acquire()` / `release(slot, outcome)`, outcome one of "ok", "overload" (time-out, 429,
    5xx, connection error) or "other" (any other failure, which says nothing about load)."""

    def __init__(self, maximum: int, start: int | None = None):
        if maximum < 1:
            raise ValueError("an endpoint's concurrency limit must be at least 1")
        self.maximum = maximum
        self.limit = min(start or maximum, maximum)
        self.in_flight = 0
        self.paused_until = 0.0  # monotonic time before which no request may start
        self._successes = 0
        self._last_cut = float("-inf")
        self._cond = threading.Condition()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """The run is interrupted: every call waiting here (for the endpoint's pause, a free
        slot, or between its retries: `sleep`) raises CallCancelled now, and so does every call
        that comes later. A request already sent is not cut short."""
        with self._cond:
            self._cancelled.set()
            self._cond.notify_all()

    def sleep(self, seconds: float) -> None:
        """Wait `seconds` between a call's retries (tenacity's `sleep`); CallCancelled at once
        when the run is interrupted meanwhile (`cancel`)."""
        if self._cancelled.wait(seconds):
            raise CallCancelled("the run was interrupted")

    def acquire(self, deadline: float | None = None, *, longest: float | None = None) -> Slot | None:
        """A slot, once the endpoint's pause has passed and one is free. With a `deadline`
        (monotonic time), None at once when the pause ends after it: a caller out of retry budget
        must not sit out a pause it cannot afford. With `longest` (seconds), None at once when the
        pause, as it stands when seen, has more than that left. Waiting for a free slot is
        queueing, never refused."""
        with self._cond:
            while True:
                if self._cancelled.is_set():
                    raise CallCancelled("the run was interrupted")
                wait = self.paused_until - time.monotonic()
                if deadline is not None and self.paused_until > deadline:
                    return None
                if longest is not None and wait > longest:
                    return None
                if wait > 0:
                    self._cond.wait(wait)
                elif self.in_flight < self.limit:
                    self.in_flight += 1
                    return Slot(time.monotonic())
                else:
                    self._cond.wait()

    def release(self, slot: Slot, outcome: str = "ok", pause: float | None = None) -> None:
        """Give the slot back. On "overload", halve the limit unless it was already cut after
        this request started; `pause` seconds (a server's Retry-After) hold back every caller."""
        with self._cond:
            self.in_flight -= 1
            now = time.monotonic()
            if outcome == "overload":
                if slot.started >= self._last_cut:
                    self.limit = max(1, self.limit // 2)
                    self._last_cut = now
                self._successes = 0
                if pause:
                    self.paused_until = max(self.paused_until, now + pause)
            elif outcome == "ok":
                self._successes += 1
                if self._successes >= self.limit and self.limit < self.maximum:
                    self.limit += 1
                    self._successes = 0
            self._cond.notify_all()

    def pause_left(self) -> float:
        """Seconds until the endpoint's pause (a 429's Retry-After) ends; 0 when not paused."""
        with self._cond:
            return max(0.0, self.paused_until - time.monotonic())

    def pause(self, seconds: float) -> None:
        """Hold back every new request to this endpoint for `seconds` (a 429's Retry-After)."""
        with self._cond:
            self.paused_until = max(self.paused_until, time.monotonic() + seconds)
            self._cond.notify_all()


class Limiters:
    """One `EndpointLimiter` per endpoint, made on first use; shared by a run's roles."""

    def __init__(self, maximum: int):
        self.maximum = maximum
        self._by_endpoint: dict[str, EndpointLimiter] = {}
        self._lock = threading.Lock()

    def for_endpoint(self, endpoint: str) -> EndpointLimiter:
        with self._lock:
            if endpoint not in self._by_endpoint:
                self._by_endpoint[endpoint] = EndpointLimiter(self.maximum)
            return self._by_endpoint[endpoint]
