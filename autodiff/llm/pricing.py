"""What an LLM call cost, in US dollars: one price per recorded call, from a maintained table.

Prices come from the `genai-prices` package (Pydantic's price table for OpenAI, Anthropic and
many other providers), whose data ships inside the package. We read only that shipped table:
the package's optional auto-update (`UpdatePrices`, a background download) is never started, and
even if something else in the process starts it, the table used here is the one built from the
installed package's data, so a run is priced the same offline and online. The table's version
("genai-prices 0.2.3") is stored with every call it priced.

Which price a call gets, in this order:

1. a price the user set for its model (`RunConfig.prices`: USD per million input and output
   tokens; for a rented GPU server, say): source "user";
2. the embedded model and the scripted test models: 0, source "local";
3. a server on this machine or the local network (`is_local` of its endpoint: loopback, private
   address, a one-label name such as a Compose service): a model the table knows is priced from
   the table, as a gateway (LiteLLM and the like) in front of a paid API is the likely case there
   (source: the table's version plus LOCAL_GATEWAY_NOTE); a model the table does not know is a
   local model and costs 0, source "local";
4. the table, by the endpoint's URL when a provider of the table serves it (Groq, Together, ...
   behind the OpenAI-compatible API), else by the provider's name: source the table's version;
5. otherwise unknown: `usd` None, shown as unknown, never as 0.

A fresh reply whose server reported no token usage (no `usage`, or 0 tokens both ways) has an
unknown cost whatever its price (source NO_USAGE_SOURCE says why), unless its model is local
(free whatever it used); a budget counts such a call at its reservation (`autodiff.llm.budget`).

Token counts are the server's: prompt tokens include those served from the provider's prompt
cache (OpenAI cached tokens, Anthropic cache reads), priced at the cache-read rate, and those
written to it (Anthropic), priced at the cache-write rate; completion tokens include hidden
reasoning, priced at the model's reasoning rate where the table has one, else as output.

A call answered from our own response cache cost nothing: its `usd` is 0 and `saved_usd` is
what it would have cost.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from typing import Any, Mapping

from autodiff.llm.sdk_errors import is_local

SOURCE_USER = "user"
SOURCE_LOCAL = "local"
# The price source of a fresh call whose server reported no token usage: its cost is unknown.
NO_USAGE_SOURCE = "unknown: the server reported no token usage"
# Providers whose models run on this machine: the embedded GGUF model and the scripted fakes.
LOCAL_PROVIDERS = ("local", "fake")
MILLION = 1_000_000
# Added to the table's version as the price source of a model the table knows, served at a local
# or private address: most likely a gateway in front of the paid API.
LOCAL_GATEWAY_NOTE = " (local/private endpoint: priced as the hosted model, likely a gateway in front of its API)"


def table_version() -> str:
    """The price table's name and version, as stored with each call it priced."""
    return f"genai-prices {version('genai-prices')}"


@dataclass(frozen=True)
class UserPrice:
    """A price the user set: USD per million input tokens and per million output tokens."""

    input: float
    output: float

    @classmethod
    def parse(cls, value: Any) -> UserPrice:
        """From a number (the same rate both ways), a pair [input, output], or "IN/OUT" text."""
        if isinstance(value, UserPrice):
            return value
        said = value
        try:
            if isinstance(value, str):
                value = [float(v) for v in value.split("/")]
            if isinstance(value, (int, float)):
                value = [value, value]
            numbers = [float(v) for v in value]
        except (TypeError, ValueError):
            numbers = []
        if len(numbers) not in (1, 2) or any(not math.isfinite(v) or v < 0 for v in numbers):
            raise ValueError(f"a price is USD per million tokens, one number or input/output (e.g. 2.5/10); "
                             f"got {said!r}")
        return cls(numbers[0], numbers[-1])


@dataclass(frozen=True)
class Price:
    """What one call cost (`usd`, None when unknown) and, for a call answered from our response
    cache, what it would have cost (`saved_usd`; 0 for other calls, None when unknown). `source`
    says where the price came from: "user", "local", or the table's version."""

    usd: float | None
    saved_usd: float | None
    source: str


class Pricing:
    """Prices calls for one run: the user's prices by model spec ("provider:model" -> USD per
    million tokens, see `UserPrice.parse`), then the local rule, then the table."""

    def __init__(self, user_prices: Mapping[str, Any] | None = None):
        self.user_prices = {spec: UserPrice.parse(v) for spec, v in (user_prices or {}).items()}

    def source(self, spec: str, endpoint: str | None) -> str:
        """Where `spec`'s prices come from: "user", "local", or the table's version."""
        if spec in self.user_prices:
            return SOURCE_USER
        provider = spec.split(":", 1)[0]
        if provider in LOCAL_PROVIDERS:
            return SOURCE_LOCAL
        if endpoint and is_local(endpoint):
            if self._table_knows(spec, endpoint):
                return table_version() + LOCAL_GATEWAY_NOTE
            return SOURCE_LOCAL
        return table_version()

    @staticmethod
    def _table_knows(spec: str, endpoint: str | None) -> bool:
        provider, model = spec.split(":", 1)
        return _table_cost(provider, _table_model(model), endpoint, 1, 1, 0, 0, 0, None) is not None

    def known(self, spec: str, endpoint: str | None) -> bool:
        """Whether calls of `spec` at `endpoint` get a price (not unknown)."""
        return self.cost(spec, endpoint, prompt_tokens=1, completion_tokens=1) is not None

    def cost(self, spec: str, endpoint: str | None, *, prompt_tokens: int, completion_tokens: int,
             cached_prompt_tokens: int = 0, cache_write_tokens: int = 0, reasoning_tokens: int = 0,
             at: float | None = None) -> float | None:
        """USD for these token counts of model `spec` ("provider:model") at `endpoint`, or None
        when the price is unknown. `at` (Unix time) picks the price in force then (default now)."""
        source = self.source(spec, endpoint)
        if source == SOURCE_LOCAL:
            return 0.0
        if source == SOURCE_USER:
            rate = self.user_prices[spec]
            return (prompt_tokens * rate.input + completion_tokens * rate.output) / MILLION
        provider, model = spec.split(":", 1)
        return _table_cost(provider, _table_model(model), endpoint, prompt_tokens, completion_tokens,
                           min(cached_prompt_tokens, prompt_tokens),
                           min(cache_write_tokens, max(prompt_tokens - cached_prompt_tokens, 0)),
                           min(reasoning_tokens, completion_tokens), at)

    def price(self, spec: str, endpoint: str | None, *, cached: bool, prompt_tokens: int,
              completion_tokens: int, cached_prompt_tokens: int = 0, cache_write_tokens: int = 0,
              reasoning_tokens: int = 0, at: float | None = None) -> Price:
        """The price of one recorded call (`cached`: answered from our response cache)."""
        usd = self.cost(spec, endpoint, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        cached_prompt_tokens=cached_prompt_tokens, cache_write_tokens=cache_write_tokens,
                        reasoning_tokens=reasoning_tokens, at=at)
        if cached:
            return Price(0.0, usd, self.source(spec, endpoint))
        return Price(usd, 0.0, self.source(spec, endpoint))


def _table_model(model: str) -> str:
    """The model name the table prices `model` under: the name itself. A fine-tune keeps its
    `ft:` prefix, since the table prices fine-tunes (`ft:gpt-4o-mini-2024-07-18:org::id`) at their
    own, higher rates; a fine-tune the table does not know is unknown, never its base model's price."""
    return model


@functools.cache
def _table():
    """The price table built from the data shipped in the installed package (read-only, built
    once per process). Never the package's auto-updated snapshot: nothing here fetches."""
    from genai_prices.data import providers
    from genai_prices.data_snapshot import DataSnapshot

    return DataSnapshot(providers=providers, from_auto_update=False)


def _table_cost(provider: str, model: str, endpoint: str | None, prompt: int, completion: int, cache_read: int,
                cache_write: int, reasoning: int, at: float | None) -> float | None:
    from genai_prices import Usage

    table = _table()
    usage = Usage(input_tokens=prompt, output_tokens=completion, cache_read_tokens=cache_read or None,
                  cache_write_tokens=cache_write or None, output_reasoning_tokens=reasoning or None)
    when = datetime.fromtimestamp(at, timezone.utc) if at is not None else datetime.now(timezone.utc)
    url = endpoint if endpoint and endpoint.startswith("http") and _serves(table, endpoint) else None
    try:
        calc = table.calc(usage, model, None if url else provider, url, when)
    except (LookupError, ValueError):  # a model or provider the table does not know
        return None
    return float(calc.total_price)


def _serves(table, endpoint: str) -> bool:
    """Whether a provider of the table is known by this API URL."""
    try:
        table.find_provider(None, None, endpoint)
    except LookupError:
        return False
    return True


def format_usd_exact(usd: float | None) -> str:
    """Money where the digits matter (budgets and what was spent against them): like
    `format_usd`, but an amount under a cent shows 6 significant digits ("$0.00312346", never
    "$0.0000"); "unknown" for None."""
    if usd is None:
        return "unknown"
    if usd and abs(usd) < 0.01:
        decimals = 5 - math.floor(math.log10(abs(usd)))
        return f"${usd:.{decimals}f}"
    return format_usd(usd)


def format_usd(usd: float | None, unknown_calls: int = 0) -> str:
    """Money for people: "$0.0123" (four decimals under a dollar, two above), "unknown" when
    nothing is known, and "$0.0123 + unknown" when some calls had no price."""
    if usd is None or (unknown_calls and not usd):
        return "unknown"
    text = f"${usd:,.2f}" if abs(usd) >= 1 else f"${usd:.4f}"
    return text + (" + unknown" if unknown_calls else "")


def count(n: float, word: str, plural: str | None = None) -> str:
    """`n` (thousands separated) and `word` in agreement: count(1, "proposal") is "1 proposal",
    count(2, "proposal") "2 proposals"; `plural` for a word that does not just take an s. Every
    count the engine and the dashboard write in a sentence goes through here."""
    return f"{n:,} {word if n == 1 else plural or word + 's'}"


def format_tokens(tokens: int, unknown_calls: int = 0) -> str:
    """Tokens for people: "12,345", "unknown" when every call's usage is unknown (its server
    reported none), and "12,345 + unknown" when some calls' usage is unknown, as `format_usd`
    writes money."""
    if unknown_calls and not tokens:
        return "unknown"
    return f"{tokens:,}" + (" + unknown" if unknown_calls else "")
