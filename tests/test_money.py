"""Money: prices per call from the shipped price table (never fetched), cost per phase and step
summed from the calls, budgets that stop a run before the call that could pass them and resume
with a larger one, the estimate before a run and the projection during it."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from autodiff import runner
from autodiff.cli import main
from autodiff.config import make_config
from autodiff.errors import ConfigError
from autodiff.estimate import estimate
from autodiff.export import export_run
from autodiff.llm.cache import ResponseCache
from autodiff.llm.client import LLM
from autodiff.llm.fake import FakeProvider
from autodiff.llm.pricing import Pricing, _table, format_usd, table_version
from autodiff.llm.types import CallContext, Completion, Request
from autodiff.metrics import PHASES, projection, run_summary, step_figures
from autodiff.records import CallSummary, Run
from autodiff.store import Store
from tests.conftest import FAST_RETRY, TOY_DEFAULTS, Script, proposal, toy_task
from tests.fake_runs import fake_run

OPENAI = "https://api.openai.com/v1/"
# Fixed prices for the scripted models: USD per million input and output tokens.
PRICES = {"fake:fwd": (1000.0, 2000.0), "fake:bwd": (3000.0, 4000.0), "fake:opt": (5000.0, 6000.0)}


def rates(provider: str, model: str):
    """The table's prices for a model, as genai-prices holds them now."""
    _, info = _table().find_provider_model(model, None, provider, None)
    return info.get_prices(datetime.now(timezone.utc))


class UsageProvider:
    """Answers "ok" and reports the usage it was given, like a provider's server would."""

    name = "openai"
    endpoint = OPENAI

    def __init__(self, **usage: int):
        self.usage = usage

    def complete(self, model: str, request: Request) -> Completion:
        return Completion("ok", **self.usage)


# --- prices -------------------------------------------------------------------------------------

def test_cached_prompt_tokens_are_priced_at_the_cached_rate() -> None:
    price = rates("openai", "gpt-4o")
    assert price.cache_read_mtok < price.input_mtok
    pricing = Pricing()
    full = pricing.cost("openai:gpt-4o", OPENAI, prompt_tokens=1000, completion_tokens=100)
    cached = pricing.cost("openai:gpt-4o", OPENAI, prompt_tokens=1000, completion_tokens=100, cached_prompt_tokens=800)
    assert full == pytest.approx(float(1000 * price.input_mtok + 100 * price.output_mtok) / 1e6)
    assert cached == pytest.approx(float(200 * price.input_mtok + 800 * price.cache_read_mtok
                                         + 100 * price.output_mtok) / 1e6)


def test_anthropic_cache_reads_and_writes_have_their_own_rates() -> None:
    price = rates("anthropic", "claude-sonnet-4-5")
    got = Pricing().cost("anthropic:claude-sonnet-4-5", "https://api.anthropic.com", prompt_tokens=1000,
                         completion_tokens=50, cached_prompt_tokens=500, cache_write_tokens=300)
    assert got == pytest.approx(float(200 * price.input_mtok.base + 500 * price.cache_read_mtok.base
                                      + 300 * price.cache_write_mtok.base + 50 * price.output_mtok.base) / 1e6)


def test_a_recorded_call_carries_its_price_and_a_cache_hit_records_what_it_saved(tmp_path: Path) -> None:
    calls = []
    provider = UsageProvider(prompt_tokens=1000, completion_tokens=100, cached_prompt_tokens=800)
    llm = LLM("openai:gpt-4o", provider, cache=ResponseCache(tmp_path / "cache.sqlite"), recorder=calls.append,
              retry=FAST_RETRY)
    llm.complete("question", CallContext(phase="forward"))
    llm.complete("question", CallContext(phase="forward"))
    fresh, hit = calls
    expected = Pricing().cost("openai:gpt-4o", OPENAI, prompt_tokens=1000, completion_tokens=100,
                              cached_prompt_tokens=800)
    assert fresh.cost_usd == pytest.approx(expected) and fresh.saved_usd == 0.0
    assert fresh.price_source == table_version() and fresh.price_source.startswith("genai-prices ")
    assert hit.cached and hit.cost_usd == 0.0 and hit.saved_usd == pytest.approx(expected)


def test_a_cache_hit_of_a_reply_without_usage_saved_an_unknown_amount(tmp_path: Path) -> None:
    """The reply was cached with the usage its server reported: none. A hit on it costs nothing,
    and what it saved is unknown (never $0, which the Runs page would show as a saving of $0)."""
    from autodiff.llm.pricing import NO_USAGE_SOURCE

    calls = []
    llm = LLM("openai:gpt-4o", UsageProvider(prompt_tokens=0, completion_tokens=0),
              cache=ResponseCache(tmp_path / "cache.sqlite"), recorder=calls.append, retry=FAST_RETRY)
    llm.complete("question", CallContext(phase="forward"))
    llm.complete("question", CallContext(phase="forward"))
    fresh, hit = calls
    assert fresh.cost_usd is None and fresh.saved_usd == 0.0
    assert hit.cached and hit.cost_usd == 0.0 and hit.saved_usd is None and hit.price_source == NO_USAGE_SOURCE
    # and a hit on a reply whose usage was reported is still priced
    priced = LLM("openai:gpt-4o", UsageProvider(prompt_tokens=10, completion_tokens=5),
                 cache=ResponseCache(tmp_path / "cache2.sqlite"), recorder=calls.append, retry=FAST_RETRY)
    priced.complete("question", CallContext(phase="forward"))
    priced.complete("question", CallContext(phase="forward"))
    assert calls[-1].cached and calls[-1].saved_usd > 0


def test_an_unknown_model_costs_unknown_never_zero() -> None:
    pricing = Pricing()
    assert pricing.cost("openai:no-such-model-xyz", OPENAI, prompt_tokens=10, completion_tokens=10) is None
    assert not pricing.known("openai:no-such-model-xyz", OPENAI)
    assert format_usd(None) == "unknown" and format_usd(0.0, unknown_calls=3) == "unknown"
    assert format_usd(0.5, unknown_calls=1) == "$0.5000 + unknown"


def test_local_models_cost_nothing_unless_priced() -> None:
    pricing = Pricing({"openai:llama3.1": "0.5/1.5"})
    assert Pricing().cost("local:smollm2", "in-process", prompt_tokens=10**6, completion_tokens=10**6) == 0.0
    assert Pricing().cost("openai:llama3.1", "http://localhost:11434/v1", prompt_tokens=10**6,
                          completion_tokens=0) == 0.0  # a server on this machine
    assert pricing.cost("openai:llama3.1", "http://gpu.example.com/v1", prompt_tokens=10**6,
                        completion_tokens=10**6) == pytest.approx(2.0)
    assert pricing.source("openai:llama3.1", None) == "user"


def test_prices_never_come_from_a_network_update(monkeypatch: pytest.MonkeyPatch) -> None:
    import genai_prices
    from genai_prices import data_snapshot, update_prices

    def no_network(*args, **kwargs):
        raise AssertionError("genai-prices tried to fetch prices")

    monkeypatch.setattr(update_prices.UpdatePrices, "fetch", no_network)
    monkeypatch.setattr(update_prices.httpx2, "get", no_network)
    # Even a snapshot someone else's code installed (as auto-update does) is not what we read.
    monkeypatch.setattr(data_snapshot, "_custom_snapshot", data_snapshot.DataSnapshot([], from_auto_update=True))
    with pytest.raises(LookupError):
        genai_prices.calc_price(genai_prices.Usage(input_tokens=1), "gpt-4o", provider_id="openai")
    assert Pricing().cost("openai:gpt-4o", OPENAI, prompt_tokens=1000, completion_tokens=0) > 0


# --- cost per phase, step and run -----------------------------------------------------------------

def test_a_priced_runs_cost_per_phase_is_the_sum_of_its_calls(run_toy, store: Store) -> None:
    script = Script(proposals={"toy.instruction": [proposal("Add the two numbers. LEVEL=3")]})
    run = run_toy(script, prices=PRICES, steps=2)
    calls = store.call_summaries(run.run_id)
    for c in calls:
        rate_in, rate_out = PRICES[c.model]
        expected = 0.0 if c.cached else (c.prompt_tokens * rate_in + c.completion_tokens * rate_out) / 1e6
        assert c.cost_usd == pytest.approx(expected) and c.price_source == "user"
    rows = step_figures(store, run.run_id)
    for row in rows:
        for phase in PHASES:
            mine = [c for c in calls if c.step == row["step"] and c.phase == phase]
            assert row[f"cost_{phase}"] == pytest.approx(sum(c.cost_usd for c in mine))
        assert row["cost"] == pytest.approx(sum(row[f"cost_{p}"] for p in PHASES))
    assert rows[-1]["cost_cumulative"] == pytest.approx(sum(r["cost"] for r in rows))
    summary = run_summary(store, run.run_id)
    assert summary["cost_usd"] == pytest.approx(sum(c.cost_usd for c in calls))
    assert summary["cost_usd"] > 0
    assert summary["cost_unknown"] == 0
    # What each proposal cost to make and to validate: every validation call is tagged with its proposal.
    costs = store.proposal_costs(run.run_id)
    made = sum(r["cost_propose"] for r in rows)
    validated = sum(r["cost_validate"] for r in rows if r["step"] > 0)
    assert sum(c["make_usd"] for c in costs.values()) == pytest.approx(made)
    assert sum(c["validate_usd"] for c in costs.values()) == pytest.approx(validated)
    exported = export_run(store, run.run_id)
    assert exported["run"]["cost_usd"] == pytest.approx(summary["cost_usd"])
    assert sum(s["cost_by_phase"]["validate"] for s in exported["steps"]) == pytest.approx(
        sum(r["cost_validate"] for r in rows))
    assert {"make_usd", "validate_usd"} <= set(exported["proposals"][0]["cost"])


def test_selective_backward_and_the_cache_savings_are_in_money(run_toy, store: Store) -> None:
    first = run_toy(prices=PRICES)
    again = run_toy(prices=PRICES)  # the same prompts: every reply from the cache
    row = step_figures(store, first.run_id)[1]
    assert 0 < row["correct"] < row["batch"]
    # Saved: the correct samples only, at the cost per sample sent backward (not the samples
    # over the per-step cap: they failed, and no call was made for them).
    assert row["backward_saved_usd"] == pytest.approx(row["cost_backward"] / row["sent_backward"] * row["correct"])
    summary = run_summary(store, again.run_id)
    assert summary["cost_usd"] == 0.0
    before = run_summary(store, first.run_id)  # its repeated prompts were cache hits already
    assert summary["cache_saved_usd"] == pytest.approx(before["cost_usd"] + before["cache_saved_usd"])


def test_a_run_with_an_unknown_model_shows_its_cost_as_unknown(run_toy, store: Store) -> None:
    provider = FakeProvider(Script())
    run = run_toy(provider=provider, forward_model="openai:no-such-model-xyz")
    # run_toy maps the provider name "fake"; give the openai spec the same scripted provider
    assert run.record.status == "completed"
    summary = run_summary(store, run.run_id)
    assert summary["cost_unknown"] == len([c for c in run.calls() if c.model == "openai:no-such-model-xyz"
                                           and not c.cached]) > 0
    assert format_usd(summary["cost_usd"], summary["cost_unknown"]).endswith("unknown")


@pytest.fixture
def run_toy(tmp_path: Path, store: Store):
    """Like conftest's run_toy, with the scripted provider also standing in for openai:* models."""
    def run(script: Script | None = None, *, provider: FakeProvider | None = None, run_id: str | None = None,
            budget_error: bool = False, **config):
        provider = provider or FakeProvider(script or Script())
        options = {**TOY_DEFAULTS, **config}
        run_id = run_id or f"toy-{len(store.runs())}"
        runner.train(store, make_config(**options), run_id=run_id, retry=FAST_RETRY,
                     providers={"fake": provider, "openai": provider}, cache_path=tmp_path / "cache.sqlite")
        return _Run(store, run_id)
    return run


class _Run:
    def __init__(self, store: Store, run_id: str):
        self.store, self.run_id = store, run_id

    @property
    def record(self) -> Run:
        return self.store.run(self.run_id)

    def calls(self) -> list[CallSummary]:
        return self.store.call_summaries(self.run_id)


# --- budgets --------------------------------------------------------------------------------------

def test_a_token_budget_stops_before_the_call_that_could_pass_it_and_resumes_with_a_larger_one(
        run_toy, store: Store, tmp_path: Path) -> None:
    script = Script(proposals={"toy.instruction": [proposal("Add the two numbers. LEVEL=3")]})
    run = run_toy(script, steps=4, budget_tokens=5100, concurrency=2)
    record = run.record
    assert record.status == "stopped" and record.error.startswith("budget: ")
    assert "--budget-tokens" in record.error
    spent = run_summary(store, run.run_id)["tokens"]
    assert spent <= 5100
    assert store.last_completed_step(run.run_id) is not None  # what was done is kept
    assert not any("Budget" in (c.error or "") for c in run.calls())  # the refused call was never made
    assert all(e.score is not None for e in store.evaluations(run.run_id, subject="current"))

    runner.resume(store, run.run_id, budget_tokens=100_000, retry=FAST_RETRY,
                  providers={"fake": FakeProvider(script), "openai": FakeProvider(script)},
                  cache_path=tmp_path / "cache.sqlite")
    assert run.record.status == "completed"
    assert run.record.config["budget_tokens"] == 100_000
    [change] = [e for e in store.run_events(run.run_id) if e.kind == "budget_changed"]
    assert change.text == "budget_tokens 5100 -> 100000"
    assert run_summary(store, run.run_id)["tokens"] <= 100_000


def test_a_usd_budget_counts_priced_calls_and_stops_cleanly(run_toy, store: Store) -> None:
    run = run_toy(steps=4, prices=PRICES, budget_usd=9.5, concurrency=2)
    assert run.record.status == "stopped" and run.record.error.startswith("budget: ")
    assert "--budget-usd" in run.record.error
    assert run_summary(store, run.run_id)["cost_usd"] <= 9.5


def test_a_budget_too_small_for_step_0_is_refused_before_anything_is_spent(run_toy, store: Store) -> None:
    with pytest.raises(ConfigError, match=r"too small: step 0 .* may take up to .*tokens"):
        run_toy(budget_tokens=50)
    with pytest.raises(ConfigError, match=r"budget of \$0\.0100 is too small"):
        run_toy(prices=PRICES, budget_usd=0.01)
    assert store.runs() == []


def test_a_usd_budget_needs_a_price_for_every_model(run_toy, store: Store) -> None:
    with pytest.raises(ConfigError, match="no-such-model-xyz.*--price"):
        run_toy(forward_model="openai:no-such-model-xyz", budget_usd=1.0)
    assert store.runs() == []


# --- estimate and projection ----------------------------------------------------------------------

def test_the_estimate_counts_calls_from_the_configuration_without_calling_a_model() -> None:
    config = make_config(**{**TOY_DEFAULTS, "prices": PRICES, "steps": 3, "val_limit": 10, "test_limit": 6})
    forecast = estimate(toy_task(), config)
    rows = {(r.part, r.phase): r for r in forecast.rows}
    assert rows[("step 0", "validate")].calls == 10 and rows[("step 0", "test")].calls == 6
    assert rows[("each step", "forward")].calls == 8
    assert rows[("each step", "propose")].calls == 2  # the toy task's trainable parameters
    assert rows[("each step", "backward")].calls > 0 and rows[("each step", "backward")].usd > 0
    assert forecast.total.calls == pytest.approx(forecast.step0.calls + 3 * forecast.per_step.calls + 6)
    assert forecast.prices == {"fake:fwd": "user", "fake:bwd": "user", "fake:opt": "user"}


def test_autodiff_estimate_prints_the_phases_and_the_total(capsys, tmp_path: Path) -> None:
    code = main(["--store", str(tmp_path / "runs.sqlite"), "estimate", "object_counting", "--model",
                 "openai:gpt-4o-mini", "--val-limit", "10", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total"]["usd"] > 0 and out["prices"]["openai:gpt-4o-mini"] == table_version()
    assert [r["phase"] for r in out["rows"] if r["part"] == "each step"] == ["forward", "backward", "propose",
                                                                            "validate"]
    assert not (tmp_path / "runs.sqlite").exists()  # nothing stored, nothing run


def test_the_projection_follows_what_the_steps_cost(store: Store, tmp_path: Path) -> None:
    events = []
    script = Script()
    provider = FakeProvider(script)
    config = make_config(**{**TOY_DEFAULTS, "prices": PRICES, "steps": 3})
    runner.train(store, config, run_id="proj", providers={"fake": provider}, retry=FAST_RETRY,
                 cache_path=tmp_path / "cache.sqlite", progress=lambda event, info: events.append((event, info)))
    done = [info for event, info in events if event == "step_done"]
    assert [d["step"] for d in done] == [1, 2, 3]
    assert all(d["projected_usd"] is not None and d["cost_usd"] > 0 for d in done), done
    assert done[-1]["projected_usd"] == pytest.approx(done[-1]["cost_usd"]
                                                      + step_figures(store, "proj")[0]["cost_test"])
    assert done[-1]["to_finish_usd"] == pytest.approx(step_figures(store, "proj")[0]["cost_test"])
    from autodiff.progress import step_line

    line = step_line(done[0])
    assert "cost=$" in line and "to finish=$" in line and "projected=$" in line
    final = projection(store, "proj")
    assert final["to_finish_usd"] == 0.0 and final["remaining"] == 0


def test_the_cli_stops_at_a_budget_and_resumes_with_a_larger_one(tmp_path: Path, capsys) -> None:
    from tests.conftest import TOY_TASK

    common = ["--store", str(tmp_path / "runs.sqlite"), "--cache", str(tmp_path / "cache.sqlite")]
    code = main([*common, "train", TOY_TASK, "--model", "fake:cli", "--steps", "4", "--batch-size", "8",
                 "--budget-tokens", "5100", "--run-id", "cli-budget", "--price", "fake:cli=1000/2000"])
    err = capsys.readouterr().err
    assert code == 3 and "stopped: budget: " in err and "--budget-tokens" in err
    store = Store(tmp_path / "runs.sqlite")
    assert store.run("cli-budget").config["prices"] == {"fake:cli": [1000.0, 2000.0]}
    assert main([*common, "runs"]) == 0
    listing = capsys.readouterr().out
    assert "cli-budget" in listing and "$" in listing
    assert main([*common, "resume", "cli-budget", "--budget-tokens", "200000"]) == 0
    out = capsys.readouterr().out
    assert "completed" in out and "cost $" in out
    assert main([*common, "show", "cli-budget"]) == 0
    shown = capsys.readouterr().out
    assert "step   1:" in shown and " cost $" in shown and "validate $" in shown


def test_a_budget_reached_at_preflight_is_a_budget_stop_not_a_bad_model() -> None:
    from autodiff.errors import BudgetExceeded
    from autodiff.llm.budget import Budget

    budget = Budget(tokens=10)  # less than the probe's reply budget
    llm = LLM("openai:gpt-4o", UsageProvider(prompt_tokens=5, completion_tokens=1), retry=FAST_RETRY,
              budget=budget, recorder=lambda call: None)
    with pytest.raises(BudgetExceeded, match="^budget: the next preflight call of openai:gpt-4o"):
        llm.preflight(CallContext(phase="preflight", step=0))
    assert budget.spent_tokens == 0 and budget.reserved_tokens == 0


def test_the_budget_reserves_for_calls_in_flight_and_settles_with_what_they_spent() -> None:
    from autodiff.errors import BudgetExceeded
    from autodiff.llm.budget import GUARD_CHARS_PER_TOKEN, Budget

    budget = Budget(tokens=800)
    request = Request(messages=(), max_tokens=300)
    ctx = CallContext(phase="validate", step=1)
    first = budget.reserve("fake:x", None, request, ctx, Pricing())
    second = budget.reserve("fake:x", None, request, ctx, Pricing())
    assert budget.reserved_tokens == 600 and first.tokens == 300
    with pytest.raises(BudgetExceeded, match="600 reserved by calls in flight"):
        budget.reserve("fake:x", None, request, ctx, Pricing())  # 600 in flight + 300 > 800
    with pytest.raises(BudgetExceeded):  # and every later call too, even a smaller one
        budget.reserve("fake:x", None, Request(messages=(), max_tokens=1), ctx, Pricing())
    from autodiff.records import LLMCall

    spent = LLMCall("c", None, 1, "validate", "forward", None, None, None, "fake:x", (), "ok", 40, 10, 1.0,
                    False, None, 0.0)
    budget.settle(first, spent)
    budget.settle(second, None)
    assert (budget.spent_tokens, budget.reserved_tokens) == (50, 0)
    assert GUARD_CHARS_PER_TOKEN < 4  # prompts are reserved at more tokens than English text usually takes


def test_a_budget_with_no_call_in_flight_reserves_exactly_nothing() -> None:
    """Dollar reservations added and released in another order leave float dust (3e-22) that a
    budget stop then printed as "$0.000000000000000000325261 reserved by calls in flight"."""
    from autodiff.errors import BudgetExceeded
    from autodiff.llm.budget import Budget, Reservation

    budget = Budget(usd=1.0)
    amounts = [0.1, 0.2, 0.3, 0.000123, 0.07]
    reservations = [Reservation(0, usd) for usd in amounts]
    budget.reserved_usd = sum(amounts)  # as reserve() adds them, with one counted in flight each
    budget._in_flight = len(amounts)
    for r in reversed(reservations):
        budget.settle(r, None)
    assert budget.reserved_usd == 0.0 and budget.reserved_tokens == 0
    budget.spent_usd = 0.99
    request, ctx = Request(messages=(), max_tokens=10_000), CallContext(phase="validate", step=1)
    with pytest.raises(BudgetExceeded) as stop:
        budget.reserve("fake:x", None, request, ctx, Pricing({"fake:x": [1000.0, 10000.0]}))
    assert "reserved by calls in flight" not in str(stop.value)


def test_a_reply_without_usage_costs_unknown_and_budgets_still_count_it() -> None:
    """A server that answers but reports no usage: the call's cost is unknown (with the reason),
    never $0, and a budget counts it at its reservation (the most it could have cost)."""
    from autodiff.errors import BudgetExceeded
    from autodiff.llm.budget import Budget
    from autodiff.llm.pricing import NO_USAGE_SOURCE

    calls = []
    budget = Budget(tokens=1000)
    llm = LLM("openai:gpt-4o", UsageProvider(prompt_tokens=0, completion_tokens=0), retry=FAST_RETRY,
              budget=budget, recorder=calls.append)
    llm.complete("question", CallContext(phase="forward", step=0), max_tokens=300)
    assert calls[0].cost_usd is None and calls[0].price_source == NO_USAGE_SOURCE
    assert budget.spent_tokens >= 300 and budget.reserved_tokens == 0
    llm.complete("question", CallContext(phase="forward", step=0), max_tokens=300)
    with pytest.raises(BudgetExceeded):  # the budget binds although the server never counted a token
        for _ in range(3):
            llm.complete("question", CallContext(phase="forward", step=0), max_tokens=300)

    usd = Budget(usd=1.0)
    llm = LLM("openai:gpt-4o", UsageProvider(prompt_tokens=0, completion_tokens=0), retry=FAST_RETRY,
              budget=usd, recorder=lambda call: None)
    llm.complete("question", CallContext(phase="forward", step=0), max_tokens=300)
    assert usd.spent_usd > 0  # not free
    # A local model stays free whatever it reported.
    local = []
    provider = UsageProvider(prompt_tokens=0, completion_tokens=0)
    provider.endpoint = "http://localhost:11434/v1"
    LLM("openai:llama3", provider, retry=FAST_RETRY, recorder=local.append).complete(
        "q", CallContext(phase="forward"))
    assert local[0].cost_usd == 0.0


@pytest.mark.parametrize("endpoint", ["http://llm-gateway:4000/v1", "http://10.1.2.3/v1", "http://localhost:4000/v1"])
def test_a_hosted_model_behind_a_local_gateway_is_priced_from_the_table(endpoint: str) -> None:
    """On a local or private endpoint a model the table knows is priced (a gateway in front of the
    paid API), a model it does not know is a local model (0), and the user's price still wins."""
    from autodiff.llm.pricing import LOCAL_GATEWAY_NOTE

    pricing = Pricing()
    hosted = pricing.cost("openai:gpt-4o-mini", endpoint, prompt_tokens=10**6, completion_tokens=10**6)
    assert hosted == pytest.approx(Pricing().cost("openai:gpt-4o-mini", OPENAI, prompt_tokens=10**6,
                                                  completion_tokens=10**6)) and hosted > 0
    assert pricing.source("openai:gpt-4o-mini", endpoint) == table_version() + LOCAL_GATEWAY_NOTE
    assert "gateway" in pricing.source("openai:gpt-4o-mini", endpoint)
    assert pricing.cost("openai:qwen2.5-7b-instruct-local", endpoint, prompt_tokens=10**6,
                        completion_tokens=10**6) == 0.0
    assert pricing.source("openai:qwen2.5-7b-instruct-local", endpoint) == "local"
    mine = Pricing({"openai:gpt-4o-mini": 1.0})
    assert mine.cost("openai:gpt-4o-mini", endpoint, prompt_tokens=10**6, completion_tokens=0) == pytest.approx(1.0)
    assert mine.source("openai:gpt-4o-mini", endpoint) == "user"


def test_the_step_0_check_refuses_what_the_reservations_would_stop(run_toy, store: Store, capsys) -> None:
    """The step-0 check uses the worst case the run reserves (every reply at its whole budget), so a
    budget between the expected and the worst case is refused up front, and a run that passes the
    check is never stopped by a reservation in step 0."""
    config = make_config(**TOY_DEFAULTS)
    forecast = estimate(toy_task(), config)
    worst = forecast.step0_worst
    assert worst.tokens > forecast.step0.tokens
    between = round((worst.tokens + forecast.step0.tokens) / 2)
    with pytest.raises(ConfigError, match=r"too small: step 0 .* may take up to"):
        run_toy(budget_tokens=between)
    run = run_toy(budget_tokens=round(worst.tokens) + 1, steps=1)
    assert store.last_completed_step(run.run_id) is not None  # step 0 finished
    # a reasoning model's hidden reasoning is in the worst case, and the estimate says so
    reasoning = make_config(**{**TOY_DEFAULTS, "forward_model": "openai:o4-mini", "reasoning_effort": "low"})
    est = estimate(toy_task(), reasoning)
    from autodiff.llm.models import family_of

    extra = family_of("openai", "o4-mini").completion_budget(reasoning.max_tokens, "low") - reasoning.max_tokens
    assert est.reasoning_allowance["openai:o4-mini"] == extra > 0
    assert est.step0_worst.completion_tokens > est.step0_worst.calls * extra  # every call, reasoning allowed
    from autodiff.estimate import format_estimate

    assert f"up to {extra:,} hidden reasoning tokens per call" in format_estimate(est, reasoning)


def test_a_proposal_made_by_an_unpriced_optimizer_costs_unknown_to_make(run_toy, store: Store, capsys) -> None:
    """Making and validating keep their own unknown counts: an optimizer without a price makes
    each proposal's cost to make unknown (never $0.0000), while its validation stays priced."""
    from tests.test_dashboard_graph import tables
    from tests.test_dashboard_pages import assert_clean, open_page

    script = Script(proposals={"toy.instruction": [proposal("Add the two numbers. LEVEL=3")]})
    run = run_toy(script, optimizer_model="openai:no-such-model-xyz", prices=PRICES)
    costs = store.proposal_costs(run.run_id)
    validated = [c for c in costs.values() if c["validate_usd"] > 0]
    assert costs and validated
    for c in costs.values():
        assert c["make_unknown"] == 1 and c["make_usd"] == 0.0 and c["validate_unknown"] == 0
        assert c["unknown"] == 1
        assert format_usd(c["make_usd"], c["make_unknown"]) == "unknown"
    assert main(["--store", store.spec, "show", run.run_id]) == 0
    shown = capsys.readouterr().out
    assert "made for unknown, validated for $" in shown and "made for $0.0000" not in shown
    exported = export_run(store, run.run_id)["proposals"]
    assert all(p["cost"]["make_unknown"] == 1 and p["cost"]["validate_unknown"] == 0 for p in exported)
    for page in ("pages/proposals.py", "pages/prompts.py"):
        at = open_page(store.spec, page, run.run_id)
        at.session_state["props_table"] = True  # the Proposals page's table, as a click on its panel would
        at.run()
        assert_clean(at)
        texts = [m.value for m in at.markdown] + [str(d.value) for d in at.dataframe]
        assert not any("cost to make \\$0.0000" in t for t in texts), page
    [made] = [rows for rows in tables(at) if "cost to make" in rows[0]]  # Prompts: the parameter's proposals
    assert {row["cost to make"] for row in made} == {"unknown"}
    assert all(row["cost to validate"].startswith("$") for row in made)  # validation stays priced
    at = open_page(store.spec, "pages/proposals.py", run.run_id)
    at.session_state["props_table"] = True
    at.run()
    assert set(at.dataframe[0].value["cost to make"]) == {"unknown"}
    assert any("cost to make unknown, to validate \\$" in m.value for m in at.markdown)


def test_a_proposal_cost_whose_calls_were_not_recorded_is_unknown_never_zero(run_toy, store: Store) -> None:
    """A store written without the links from calls to proposals (or without a proposal's
    optimizer call) shows those costs as unknown, not $0.0000; a proposal that was never scored
    cost nothing to validate."""
    from autodiff.records import Proposal

    script = Script(proposals={"toy.instruction": [proposal("Add the two numbers. LEVEL=3")]})
    run = run_toy(script, prices=PRICES)
    [scored, *_] = [p for p in store.proposals(run.run_id) if p.minibatch_score is not None]
    with store.connect() as conn:
        conn.execute("UPDATE llm_calls SET proposal_id = NULL WHERE proposal_id = ?", (scored.id,))
    store.add_proposal(run.run_id, Proposal(
        id="written-by-hand", step=1, parameter="toy.instruction", value="x", method="rephrase", reasoning="",
        llm_call_id="a-call-the-store-lacks", fate="rejected_check", reason="empty"))
    costs = store.proposal_costs(run.run_id)
    assert set(costs) == {p.id for p in store.proposals(run.run_id)}  # one entry for every proposal
    assert costs[scored.id]["validate_usd"] is None and costs[scored.id]["validate_unknown"] == 1
    assert format_usd(costs[scored.id]["validate_usd"], costs[scored.id]["validate_unknown"]) == "unknown"
    assert costs[scored.id]["make_usd"] > 0  # its optimizer call is there and priced
    by_hand = costs["written-by-hand"]
    assert by_hand["make_usd"] is None and by_hand["make_unknown"] == 1
    assert by_hand["validate_usd"] == 0.0 and by_hand["validate_unknown"] == 0  # never scored: nothing spent
    assert format_usd(by_hand["make_usd"], by_hand["make_unknown"]) == "unknown"


def test_an_unpriced_run_draws_no_cost_line_and_its_cache_savings_are_unknown(run_toy, store: Store) -> None:
    """Compare leaves the unknown points of the cumulative cost out (a gap, said in the caption),
    never a flat $0 line; the Runs table's "saved" is unknown for cache hits of an unpriced model."""
    import math

    from tests.test_dashboard_pages import assert_clean, chart_figures, html_table_rows, open_page, values

    unpriced = dict(forward_model="openai:no-such-model-xyz", backward_model="openai:no-such-model-xyz",
                    optimizer_model="openai:no-such-model-xyz")
    first = run_toy(run_id="unpriced-a", **unpriced)
    second = run_toy(run_id="unpriced-b", **unpriced)  # answered from the response cache
    assert run_summary(store, second.run_id)["saved_unknown"] > 0
    at = open_page(store.spec, "pages/compare.py", first.run_id)
    assert_clean(at)
    [cost] = [f for f in chart_figures(at) if f["layout"]["title"]["text"] == "Cumulative cost"]
    lines = {t["name"]: values(t["y"]) for t in cost["data"]}
    assert all(y is None or math.isnan(y) for y in lines[first.run_id]), lines  # no flat $0 line
    assert lines[second.run_id] == [0.0, 0.0]  # answered from the cache: really nothing spent
    assert any("left out, a gap" in c.value for c in at.caption)
    runs = open_page(store.spec, "pages/runs.py")
    rows = {r["run"]: r for r in html_table_rows(runs.get("html")[0].proto.body)}
    assert rows[second.run_id]["saved"] == "unknown"
    assert rows[first.run_id]["cost"] == "unknown"


@pytest.mark.parametrize("option,value", [("--failed-share", "2"), ("--reply-share", "5"), ("--to-validation", "1.5"),
                                          ("--failed-share", "-0.5"), ("--reply-share", "nan"),
                                          ("--to-validation", "inf")])
def test_autodiff_estimate_refuses_a_share_outside_0_to_1(option: str, value: str, capsys, tmp_path: Path) -> None:
    code = main(["--store", str(tmp_path / "runs.sqlite"), "estimate", "object_counting", "--model",
                 "openai:gpt-4o-mini", f"{option}={value}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("error:") == 1 and option in err and "from 0 to 1" in err and "Traceback" not in err


def test_a_fine_tuned_model_is_priced_as_the_table_prices_fine_tunes() -> None:
    spec = "openai:ft:gpt-4o-mini-2024-07-18:org::id"
    price = rates("openai", "ft:gpt-4o-mini-2024-07-18:org::id")
    usd = Pricing().cost(spec, OPENAI, prompt_tokens=10**6, completion_tokens=10**6)
    assert usd == pytest.approx(float(price.input_mtok + price.output_mtok))
    assert usd != Pricing().cost("openai:gpt-4o-mini", OPENAI, prompt_tokens=10**6, completion_tokens=10**6)
    assert Pricing().known(spec, OPENAI)


def test_after_a_budget_stop_the_cli_says_how_to_go_on_with_a_larger_budget(tmp_path: Path, capsys) -> None:
    """The stop names a resume that can go on (a larger budget, and --store for a store that is
    not the default); a resume with a budget below what was spent is refused up front, with the
    spent figure; money in budget messages has its digits."""
    from autodiff.llm.pricing import format_usd_exact
    from tests.conftest import TOY_TASK

    store_path = tmp_path / "runs.sqlite"
    common = ["--store", str(store_path), "--cache", str(tmp_path / "cache.sqlite")]
    code = main([*common, "train", TOY_TASK, "--model", "fake:cli", "--steps", "4", "--batch-size", "8",
                 "--budget-tokens", "5100", "--run-id", "cli-budget"])
    err = capsys.readouterr().err
    assert code == 3
    hint = next(line for line in err.splitlines() if line.startswith("continue with: "))
    assert hint.startswith(f"continue with: autodiff resume cli-budget --store {store_path} --cache "
                           f"{store_path.parent / 'cache.sqlite'} --budget-tokens ")
    larger = int(hint.rsplit(" ", 1)[1])
    assert larger > 5100
    # The stored reason names no command (a store copied elsewhere would carry a wrong --store);
    # the advice every page shows builds it for the store the run is read from.
    stopped = Store(store_path).run("cli-budget")
    assert "autodiff resume" not in stopped.error and stopped.error.endswith("larger budget (--budget-tokens)")
    from autodiff.recovery import recovery
    assert f"autodiff resume cli-budget --store {store_path} --budget-tokens N" in \
        recovery(stopped, Store(store_path)).advice
    spent = run_summary(Store(store_path), "cli-budget")["tokens"]
    assert main([*common, "resume", "cli-budget", "--budget-tokens", str(spent - 1)]) == 2
    err = capsys.readouterr().err
    assert f"already spent, {spent:,} tokens" in err
    assert Store(store_path).run("cli-budget").status == "stopped"  # nothing ran
    # Without raising the budget it stopped at, a resume would stop again at once: refused, nothing written.
    events = Store(store_path).run_events("cli-budget")
    need = int(re.search(r"could bring the run to ([\d,]+) tokens", Store(store_path).run("cli-budget").error)
               .group(1).replace(",", ""))
    assert need > 5101
    for same in ([], ["--budget-tokens", "5100"], ["--budget-tokens", str(max(spent, 5000))],
                 ["--budget-tokens", "5101"]):  # raised, but not to what the call it stopped at needs
        assert main([*common, "resume", "cli-budget", *same]) == 2
        err = capsys.readouterr().err
        assert "stopped at its budget of 5,100 tokens" in err and "give a larger --budget-tokens" in err, err
        assert f"at least {need:,} tokens, what the call it stopped at needed" in err, err
    store = Store(store_path)
    assert store.run("cli-budget").status == "stopped" and store.run("cli-budget").config["budget_tokens"] == 5100
    assert store.run_events("cli-budget") == events
    assert main([*common, "resume", *hint.split()[4:]]) == 0  # the suggested resume goes on to the end
    capsys.readouterr()

    assert format_usd_exact(0.0031234567) == "$0.00312346" and format_usd_exact(0.5) == "$0.5000"
    assert format_usd_exact(0.0000123456789) == "$0.0000123457"


def test_a_usd_budget_stop_suggests_a_larger_usd_budget_and_refuses_one_below_the_spent(tmp_path: Path,
                                                                                      capsys) -> None:
    from tests.conftest import TOY_TASK

    common = ["--store", str(tmp_path / "runs.sqlite"), "--cache", str(tmp_path / "cache.sqlite")]
    code = main([*common, "train", TOY_TASK, "--model", "fake:cli", "--steps", "4", "--batch-size", "8",
                 "--budget-usd", "0.0012", "--price", "fake:cli=1/0", "--run-id", "usd"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "$0.0000 " not in err and "$0.00120000" in err  # the budget, with its digits
    hint = next(line for line in err.splitlines() if line.startswith("continue with: "))
    assert float(hint.split("--budget-usd ")[1]) > 0.0012
    assert main([*common, "resume", "usd", "--budget-usd", "0.0000001"]) == 2
    assert "already spent, $0.00" in capsys.readouterr().err
    from tests.test_dashboard_pages import assert_clean, open_page

    at = open_page(tmp_path / "runs.sqlite", "pages/runs.py", "usd")
    assert_clean(at)
    field = next(n for n in at.text_input if n.label == "New budget (US dollars)")
    assert field.value == "0.0012"  # as stored, not rounded to "0.00"


def test_replies_without_usage_make_the_token_count_unknown_not_smaller(tmp_path: Path, capsys) -> None:
    """A server that reports no token usage is counted as 0 tokens by the call record; every place
    that shows a run's tokens says "+ unknown" (or "unknown") instead of a total that looks whole."""
    from autodiff.llm.pricing import format_tokens
    from tests.test_dashboard_pages import html_table_rows, open_page

    store = Store(tmp_path / "runs.sqlite")
    run_id = fake_run(store, tmp_path / "cache.sqlite", steps=1)
    before = run_summary(store, run_id)
    assert before["tokens_unknown"] == 0 and before["tokens"] > 0
    with store.connect() as conn:  # as if the forward model's server had reported no usage
        conn.execute("UPDATE llm_calls SET prompt_tokens = 0, completion_tokens = 0"
                     " WHERE run_id = ? AND cached = 0 AND role = 'forward' AND error IS NULL", (run_id,))
        no_usage = conn.execute("SELECT COUNT(*) FROM llm_calls WHERE run_id = ? AND cached = 0 AND role = 'forward'"
                                " AND error IS NULL", (run_id,)).fetchone()[0]
    s = run_summary(store, run_id)
    assert s["tokens_unknown"] == no_usage > 0 and 0 < s["tokens"] < before["tokens"]
    assert sum(r["tokens_unknown"] for r in step_figures(store, run_id)) == no_usage
    shown = format_tokens(s["tokens"], s["tokens_unknown"])
    assert shown == f"{s['tokens']:,} + unknown" and format_tokens(0, 3) == "unknown" and format_tokens(5) == "5"

    runs = open_page(store.path, "pages/runs.py")
    [row] = html_table_rows(runs.get("html")[0].proto.body)
    assert row["tokens"] == shown
    curves = open_page(store.path, "pages/curves.py", run_id)
    assert any(f"{no_usage} replies came from a server that reported no token usage" in c.value for c in curves.caption)
    # The tokens chart marks each step with such replies: its bar is a lower bound there.
    from tests.test_dashboard_pages import chart_figures, values
    tokens = next(f for f in chart_figures(curves) if f["layout"]["title"]["text"].startswith("Tokens per step"))
    [mark] = [t for t in tokens["data"] if t["name"] == "+? tokens unknown"]
    marked = {r["step"]: r["tokens_unknown"] for r in step_figures(store, run_id) if r["tokens_unknown"]}
    assert values(mark["x"]) == list(marked) and mark["text"] == ["+?"] * len(marked)
    assert mark["hovertext"] == [f"step {step}: at least this; {n} call{'' if n == 1 else 's'} left out (tokens unknown)"
                                 for step, n in marked.items()]
    exported = export_run(store, run_id)
    assert (exported["run"]["tokens"], exported["run"]["tokens_unknown"]) == (s["tokens"], no_usage)
    by_phase = [s_["tokens_unknown_by_phase"] for s_ in exported["steps"]]
    assert sum(sum(p.values()) for p in by_phase) == no_usage and all(set(p) == set(PHASES) for p in by_phase)
    main(["--store", str(store.path), "show", run_id])
    assert f'"tokens_unknown": {no_usage}' in capsys.readouterr().out
    main(["--store", str(store.path), "runs"])
    assert shown in capsys.readouterr().out


@pytest.mark.parametrize("price", ["openai:foo=abc", "openai:foo=1/2/3", "openai:foo=-1", "openai:foo="])
def test_a_malformed_price_names_the_option_as_typed_and_its_form(price: str, tmp_path: Path, capsys) -> None:
    """It used to say '--prices: could not convert string to float', a flag that does not exist."""
    code = main(["--store", str(tmp_path / "runs.sqlite"), "estimate", "object_counting", "--model", "fake:x",
                 "--price", price])
    err = capsys.readouterr().err
    assert code == 2 and "--price PROVIDER:MODEL=USD[/USD]: a price is USD per million tokens" in err, err
    assert "--prices" not in err and "could not convert" not in err and "Traceback" not in err
