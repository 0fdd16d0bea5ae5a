"""A run's budget, checked before every call the run sends to a model.

One `Budget` is shared by the LLMs of a run's roles. Before a call is sent (after our response
cache missed: a cached reply costs nothing), the client asks it to `reserve` the most the call
can cost: its prompt at about three characters per token (more tokens than most tokenizers
count for English, so the guess errs high) and its whole completion budget (the reply's max
tokens plus any hidden reasoning allowance), priced like the real call. If what the run has
spent, plus what the calls in flight have reserved, plus this call would pass the budget, the
call is not sent: `BudgetExceeded`, and every later call of the run is refused too. After the
call, `settle` replaces the reservation with the call's recorded tokens and priced cost.

So a run stops at the first call that might not fit, never after spending past its budget
(unless a call costs more than its reservation: a prompt of unusually many tokens per
character). A fresh reply whose server reported no token usage is counted at its reservation,
the worst case the call could have been (tokens, and dollars for a USD budget): never as free;
without a reservation, at its text's length at GUARD_CHARS_PER_TOKEN. Token budgets count prompt and completion tokens of fresh calls, as the rest of
the accounting does.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from autodiff.errors import BudgetExceeded
from autodiff.llm.models import family_of
from autodiff.llm.pricing import Pricing, format_usd_exact as format_usd
from autodiff.llm.types import CallContext, Request
from autodiff.records import LLMCall

# Characters per token assumed when reserving for a prompt (English runs nearer 4).
GUARD_CHARS_PER_TOKEN = 3


@dataclass(frozen=True)
class Reservation:
    tokens: int
    usd: float


class Budget:
    """At most `usd` dollars and/or `tokens` tokens for a run (None: no limit of that kind),
    of which `spent_usd` and `spent_tokens` were spent before this process (a resumed run)."""

    def __init__(self, usd: float | None = None, tokens: int | None = None, *, spent_usd: float = 0.0,
                 spent_tokens: int = 0):
        self.usd, self.tokens = usd, tokens
        self.spent_usd, self.spent_tokens = spent_usd, spent_tokens
        self.reserved_usd, self.reserved_tokens = 0.0, 0
        self._in_flight = 0  # reservations not settled yet
        self.exceeded: BudgetExceeded | None = None
        self._lock = threading.Lock()

    @property
    def limited(self) -> bool:
        return self.usd is not None or self.tokens is not None

    def reserve(self, spec: str, endpoint: str | None, request: Request, ctx: CallContext,
                pricing: Pricing) -> Reservation:
        """Reserve room for one call of model `spec`, or raise BudgetExceeded without sending it."""
        provider, model = spec.split(":", 1)
        prompt = math.ceil(sum(len(m.content) for m in request.messages) / GUARD_CHARS_PER_TOKEN)
        completion = family_of(provider, model).completion_budget(request.max_tokens, request.reasoning_effort)
        usd = pricing.cost(spec, endpoint, prompt_tokens=prompt, completion_tokens=completion) if self.usd is not None \
            else 0.0
        if usd is None:  # checked before the run (`check_prices`); a price cannot vanish mid-run
            usd = math.inf
        want = Reservation(prompt + completion, usd)
        with self._lock:
            if self.exceeded is None:
                self.exceeded = self._over(want, spec, ctx)
            if self.exceeded is not None:
                raise BudgetExceeded(str(self.exceeded), self.exceeded.option)
            self.reserved_usd += want.usd
            self.reserved_tokens += want.tokens
            self._in_flight += 1
        return want

    def _over(self, want: Reservation, spec: str, ctx: CallContext) -> BudgetExceeded | None:
        """Why this call may not be sent, or None when it fits. Caller holds the lock."""
        where = f"{ctx.phase} call of {spec} in step {ctx.step}"
        # (option, limit, spent, reserved, this call, how an amount reads, how the run's total reads)
        for option, limit, spent, reserved, this, show, total in (
            ("budget_usd", self.usd, self.spent_usd, self.reserved_usd, want.usd, format_usd, format_usd),
            ("budget_tokens", self.tokens, self.spent_tokens, self.reserved_tokens, want.tokens,
             "{:,}".format, "{:,} tokens".format),
        ):
            if limit is not None and spent + reserved + this > limit:
                in_flight = f", {show(reserved)} reserved by calls in flight" if reserved else ""
                return BudgetExceeded(
                    f"budget: the next {where} could bring the run to {total(spent + reserved + this)}, past its "
                    f"budget of {show(limit)} (spent {show(spent)}{in_flight}, this call up to {show(this)})", option)
        return None

    def settle(self, reservation: Reservation | None, call: LLMCall | None, *,
               usage_unknown: bool = False) -> None:
        """Release `reservation` and count what the call really spent (its record; None when the
        call was never made). A cached call spends nothing. `usage_unknown`: the server reported
        no tokens for this fresh reply, so it is counted at its reservation (the most it could
        have cost), or without one at its text's length."""
        with self._lock:
            if reservation is not None:
                self._in_flight -= 1
                self.reserved_usd -= reservation.usd
                self.reserved_tokens -= reservation.tokens
                if not self._in_flight:  # exactly nothing reserved, not what float sums leave (3e-22)
                    self.reserved_usd, self.reserved_tokens = 0.0, 0
            if call is not None and not call.cached and usage_unknown:
                if reservation is not None:
                    self.spent_usd += reservation.usd
                    self.spent_tokens += reservation.tokens
                else:
                    text = sum(len(content) for _, content in call.messages) + len(call.response or "") \
                        + len(call.reasoning or "")
                    self.spent_tokens += math.ceil(text / GUARD_CHARS_PER_TOKEN)
            elif call is not None and not call.cached:
                self.spent_usd += call.cost_usd or 0.0
                self.spent_tokens += call.prompt_tokens + call.completion_tokens
