"""What a run will cost, before it starts: calls, tokens and USD per phase, without calling a model.

Prompt sizes come from the task itself: forward() runs on a few training samples with scripted
replies (as `check_connected` does), the backward engine writes scripted feedback on those
traces, and the optimizer's prompt is built for each trainable parameter from that feedback, so
every prompt is rendered from the task's real templates, values and samples. Tokens are
counted as four characters each (no tokenizer is at hand for every provider's model). How
many calls each phase makes, and how long replies are, depends on how the run goes, so the
estimate assumes (`Assumptions`, printed with it):

- `failed_share` of each mini-batch fails and goes backward (at most `max_failed`);
- forward and backward replies use `reply_share` of their token budget; an optimizer reply
  holds its `proposals` values, each as long as the parameter's current value, plus a note;
- every proposal is scored on the mini-batch, and `to_validation` of them on the whole
  validation set (no early stop);
- one optimizer call per trainable parameter per step; no reply comes from the response cache
  and no prompt from a provider's prompt cache; `test_each_accept` is not counted.

Besides the expected figures, `step0_worst` is step 0 at its worst case, the case a run's budget
reserves before each call (`autodiff.llm.budget`): every prompt at GUARD_CHARS_PER_TOKEN
characters per token and every reply at its whole budget, plus the hidden reasoning allowance of a
reasoning model (`completion_budget` in `autodiff.llm.models`). A budget below it is refused before
a run starts, so a run that starts cannot be stopped by its reservations in step 0.

Prices are those the run would use (`autodiff.llm.pricing`): a model without a known price
makes its phases' cost unknown.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Sequence

from autodiff.backward import BackwardContext, backward
from autodiff.config import RunConfig
from autodiff.errors import ConfigError
from autodiff.llm.client import LLM, RetryPolicy
from autodiff.llm.budget import GUARD_CHARS_PER_TOKEN
from autodiff.llm.fake import FakeProvider
from autodiff.llm.models import family_of
from autodiff.llm.pricing import Pricing
from autodiff.llm.types import Request
from autodiff.optimizer import HistoryEntry, Optimizer, OptimizerInput
from autodiff.pipeline import CHECK_REPLY, Task, run_sample

CHARS_PER_TOKEN = 4
DRY_RUN_SAMPLES = 3
PREFLIGHT_TOKENS = (8, 16)  # the probe question and its reply budget
PREFLIGHT_QUESTION = "Reply with the word OK."  # as `LLM.preflight` asks it
# An optimizer reply's words besides the proposed values (method, reasoning, tags), in tokens.
PROPOSAL_NOTE_TOKENS = 60
# Providers whose models are checked without a question before a run (see `LLM.preflight`).
CHECKED_WITHOUT_A_CALL = ("local", "fake")


@dataclass(frozen=True)
class Assumptions:
    failed_share: float = 0.5
    reply_share: float = 0.25
    to_validation: float = 0.5

    def __post_init__(self) -> None:
        """Each assumption is a share, 0 to 1: ConfigError naming every one that is not."""
        bad = [f"--{name.replace('_', '-')} {value!r}" for name, value in self.__dict__.items()
               if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1]
        if bad:
            raise ConfigError(f"{', '.join(bad)}: each of --failed-share, --reply-share and --to-validation is a "
                              "share, a number from 0 to 1")

    def describe(self) -> str:
        return (f"{self.failed_share:.0%} of each mini-batch fails; forward and backward replies use "
                f"{self.reply_share:.0%} of their token budget; {self.to_validation:.0%} of proposals pass the "
                f"mini-batch and are scored on all validation samples; no cache hits; "
                f"{CHARS_PER_TOKEN} characters per token")


@dataclass(frozen=True)
class Row:
    """Expected calls and tokens of one phase in one part of the run ("step 0", "each step",
    "final test"), and their cost in USD (None: a model without a known price)."""

    part: str
    phase: str
    calls: float
    prompt_tokens: float
    completion_tokens: float
    usd: float | None

    @property
    def tokens(self) -> float:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Estimate:
    """The expected cost of a run: rows per part and phase, the number of training steps, and
    the assumptions made. Totals: `step0` (what must fit in a budget before step 1),
    `per_step` (one training step), `total` (step 0 + every step + the final test)."""

    rows: list[Row]
    steps: int
    assumptions: Assumptions
    notes: list[str] = field(default_factory=list)
    prices: dict[str, str] = field(default_factory=dict)  # model spec -> where its price comes from, or "unknown"
    # Step 0 at the worst case a budget reserves (see the module doc); None in estimates stored
    # before it was kept.
    step0_worst: Row | None = None
    # Model spec -> hidden reasoning tokens allowed per call on top of the reply budget (reasoning
    # models only): part of `step0_worst`.
    reasoning_allowance: dict[str, int] = field(default_factory=dict)

    def _sum(self, parts: Sequence[str], times: dict[str, int] | None = None) -> Row:
        rows = [r for r in self.rows if r.part in parts]
        times = times or {}
        usd = [r.usd * times.get(r.part, 1) if r.usd is not None else None for r in rows]
        return Row("+".join(parts), "all", sum(r.calls * times.get(r.part, 1) for r in rows),
                   sum(r.prompt_tokens * times.get(r.part, 1) for r in rows),
                   sum(r.completion_tokens * times.get(r.part, 1) for r in rows),
                   None if any(u is None for u in usd) else sum(usd))

    @property
    def step0(self) -> Row:
        return self._sum(["step 0"])

    @property
    def per_step(self) -> Row:
        return self._sum(["each step"])

    @property
    def total(self) -> Row:
        return self._sum(["step 0", "each step", "final test"], {"each step": self.steps})

    def as_dict(self) -> dict:
        """The estimate as plain data (stored with a run as its "estimate" event)."""
        def row(r: Row) -> dict:
            return {"part": r.part, "phase": r.phase, "calls": round(r.calls, 1),
                    "prompt_tokens": round(r.prompt_tokens), "completion_tokens": round(r.completion_tokens),
                    "usd": r.usd}
        return {"steps": self.steps, "assumptions": self.assumptions.__dict__, "rows": [row(r) for r in self.rows],
                "step0": row(self.step0), "per_step": row(self.per_step), "total": row(self.total),
                "prices": self.prices, "notes": self.notes,
                "step0_worst": row(self.step0_worst) if self.step0_worst else None,
                "reasoning_allowance": self.reasoning_allowance}


def tokens_of(text: str) -> float:
    return len(text) / CHARS_PER_TOKEN


def endpoint_of(spec: str) -> str | None:
    """Where a model's calls would go, as far as the environment says (for the price lookup)."""
    provider = spec.split(":", 1)[0]
    if provider == "openai":
        return os.environ.get("OPENAI_BASE_URL") or None
    if provider == "anthropic":
        return os.environ.get("ANTHROPIC_BASE_URL") or None
    return None


@dataclass
class _Calls:
    """Requests seen by a scripted role during the dry run."""

    requests: list[Request] = field(default_factory=list)

    def mean_prompt(self) -> float:
        return _mean([tokens_of(" ".join(m.content for m in r.messages)) for r in self.requests])

    def mean_budget(self) -> float:
        return _mean([r.max_tokens for r in self.requests])


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def estimate(task: Task, config: RunConfig, assumptions: Assumptions = Assumptions(),
             pricing: Pricing | None = None) -> Estimate:
    """The expected calls, tokens and cost per phase of a run of `task` under `config`."""
    pricing = pricing or Pricing(config.prices)
    a = assumptions
    notes: list[str] = []
    params = [p for p in task.pipeline.parameters()]
    trainable = [p for p in params if p.trainable]
    train = task.splits.get("train") or next((s for s in task.splits.values() if s), [])
    dry = list(train[:DRY_RUN_SAMPLES])

    # forward on a few samples, scripted
    fwd_provider = FakeProvider(CHECK_REPLY)
    fwd_llm = LLM("fake:estimate", fwd_provider, retry=RetryPolicy(attempts=1, initial_wait=0, max_wait=0),
                  max_tokens=config.max_tokens)
    traces = []
    for sample in dry:
        trace, _ = run_sample(task, sample, fwd_llm, phase="estimate")
        traces.append((sample, trace))
    fwd = _Calls([r for _, r in fwd_provider.requests])
    fwd_per_sample = len(fwd.requests) / len(dry) if dry else 0.0
    if any(t.error for _, t in traces):
        notes.append("forward() failed on a scripted reply for some dry-run samples: forward calls per sample "
                     "may be undercounted")

    # backward on those traces, with feedback of the expected length
    feedback_tokens = a.reply_share * config.max_tokens
    bwd_provider = FakeProvider("<feedback>" + " ".join(["word"] * max(1, round(feedback_tokens))) + "</feedback>")
    bwd_llm = LLM("fake:estimate", bwd_provider, retry=RetryPolicy(attempts=1, initial_wait=0, max_wait=0),
                  max_tokens=config.max_tokens)
    by_name = {p.name: p for p in params}
    gradients = []
    scored = [(sample, t) for sample, t in traces if t.score is not None]
    for sample, trace in scored:
        ctx = BackwardContext(None, 1, by_name, task.describe_input(sample), str(task.gold(sample)))
        gradients += backward(trace, bwd_llm, ctx)
    scored = [t for _, t in scored]
    bwd = _Calls([r for _, r in bwd_provider.requests])
    bwd_per_failed = len(bwd.requests) / len(scored) if scored else 0.0
    if not scored:
        notes.append("no dry-run sample was scored with scripted replies: backward calls are not counted")

    # the optimizer's prompt for each trainable parameter, from that feedback
    opt_provider = FakeProvider(lambda request: "<proposal></proposal>")
    optimizer = Optimizer(LLM("fake:estimate", opt_provider, retry=RetryPolicy(attempts=1, initial_wait=0,
                                                                                  max_wait=0)),
                          n_proposals=config.proposals, max_tokens=config.optimizer_max_tokens)
    failed = min(config.max_failed, math.ceil(config.batch_size * a.failed_share))
    positives = min(config.positives, config.batch_size - failed)
    shown = [(task.describe_input(s), CHECK_REPLY) for s in dry][:positives]
    opt_replies = []
    for p in trainable:
        peers = [by_name[n] for n in p.peers if n in by_name]
        others = [q for q in trainable if q is not p and q not in peers]
        # feedback on this parameter for `failed` samples: the dry-run samples' feedback, repeated
        per_sample = [[g for g in gradients if g.sample_id == t.sample_id and g.target_type == "parameter"
                       and g.target == p.name and g.text] for t in scored]
        own = [replace(g, sample_id=f"{g.sample_id}#{i}")
               for i in range(failed if per_sample else 0) for g in per_sample[i % len(per_sample)]]
        optimizer.propose(OptimizerInput(p, peers, others, own, shown, [HistoryEntry(p.value, None, 0)]), None, 1)
        opt_replies.append(min(config.optimizer_max_tokens,
                               config.proposals * (tokens_of(p.value) + PROPOSAL_NOTE_TOKENS)))
    opt = _Calls([r for _, r in opt_provider.requests])

    val = len(task.splits.get("val", [])[: config.val_limit])
    test = len(task.splits.get("test", [])[: config.test_limit])
    fwd_reply = a.reply_share * fwd.mean_budget()
    bwd_reply = a.reply_share * (bwd.mean_budget() or config.max_tokens)
    minibatch = failed + positives
    candidates = len(trainable) * config.proposals
    scored_per_candidate = minibatch + a.to_validation * val

    def row(part: str, phase: str, spec: str, calls: float, prompt: float, reply: float) -> Row:
        usd = pricing.cost(spec, endpoint_of(spec), prompt_tokens=round(calls * prompt),
                           completion_tokens=round(calls * reply))
        return Row(part, phase, calls, calls * prompt, calls * reply, usd)

    fm, bm, om = config.forward_model, config.backward_model, config.optimizer_model
    probed = [s for s in dict.fromkeys((fm, bm, om)) if s.split(":", 1)[0] not in CHECKED_WITHOUT_A_CALL]
    rows = [
        *[row("step 0", "preflight", spec, 1, *PREFLIGHT_TOKENS) for spec in probed],
        row("step 0", "validate", fm, val * fwd_per_sample, fwd.mean_prompt(), fwd_reply),
        row("step 0", "test", fm, test * fwd_per_sample, fwd.mean_prompt(), fwd_reply),
        row("each step", "forward", fm, config.batch_size * fwd_per_sample, fwd.mean_prompt(), fwd_reply),
        row("each step", "backward", bm, failed * bwd_per_failed, bwd.mean_prompt(), bwd_reply),
        row("each step", "propose", om, len(trainable), opt.mean_prompt(), _mean(opt_replies)),
        row("each step", "validate", fm, candidates * scored_per_candidate * fwd_per_sample, fwd.mean_prompt(),
            fwd_reply),
        row("final test", "test", fm, test * fwd_per_sample, fwd.mean_prompt(), fwd_reply),
    ]
    prices = {spec: pricing.source(spec, endpoint_of(spec)) if pricing.known(spec, endpoint_of(spec)) else "unknown"
              for spec in dict.fromkeys((fm, bm, om))}

    # Step 0 at the worst case the budget reserves per call: the longest dry-run prompt at
    # GUARD_CHARS_PER_TOKEN, the largest reply budget plus any hidden reasoning allowance.
    def allowance(spec: str, max_tokens: int) -> int:
        provider, model = spec.split(":", 1)
        return family_of(provider, model).completion_budget(max_tokens, config.reasoning_effort)

    def worst(phase: str, spec: str, calls: float, prompt_chars: int, max_tokens: int) -> Row:
        prompt = math.ceil(prompt_chars / GUARD_CHARS_PER_TOKEN)
        reply = allowance(spec, max_tokens)
        usd = pricing.cost(spec, endpoint_of(spec), prompt_tokens=math.ceil(calls * prompt),
                           completion_tokens=math.ceil(calls * reply))
        return Row("step 0", phase, calls, calls * prompt, calls * reply, usd)

    longest = max((sum(len(m.content) for m in r.messages) for r in fwd.requests), default=0)
    budget = max((r.max_tokens for r in fwd.requests), default=config.max_tokens)
    worst_rows = [*[worst("preflight", spec, 1, len(PREFLIGHT_QUESTION), PREFLIGHT_TOKENS[1]) for spec in probed],
                  worst("validate", fm, val * fwd_per_sample, longest, budget),
                  worst("test", fm, test * fwd_per_sample, longest, budget)]
    allowances = {spec: extra for spec in dict.fromkeys((fm, bm, om))
                  if (extra := allowance(spec, config.max_tokens) - config.max_tokens) > 0}
    est = Estimate(_merge(rows), config.steps, a, notes, prices, reasoning_allowance=allowances)
    return replace(est, step0_worst=replace(Estimate(worst_rows, 0, a).step0, part="step 0 worst case"))


def _merge(rows: list[Row]) -> list[Row]:
    """One row per (part, phase): preflight rows of several models summed."""
    merged: dict[tuple[str, str], Row] = {}
    for r in rows:
        key = (r.part, r.phase)
        if key in merged:
            m = merged[key]
            usd = None if m.usd is None or r.usd is None else m.usd + r.usd
            r = replace(m, calls=m.calls + r.calls, prompt_tokens=m.prompt_tokens + r.prompt_tokens,
                        completion_tokens=m.completion_tokens + r.completion_tokens, usd=usd)
        merged[key] = r
    return list(merged.values())


def format_estimate(est: Estimate, config: RunConfig) -> str:
    """The estimate as a table for a terminal."""
    from autodiff.llm.pricing import format_usd

    lines = [f"Estimate for {config.task}: {config.steps} steps, batch {config.batch_size}, models forward "
             f"{config.forward_model}, backward {config.backward_model}, optimizer {config.optimizer_model}",
             f"{'part':12} {'phase':10} {'calls':>9} {'prompt tok':>12} {'reply tok':>11} {'cost':>12}"]

    def line(r: Row) -> str:
        return (f"{r.part:12} {r.phase:10} {r.calls:>9,.0f} {r.prompt_tokens:>12,.0f} {r.completion_tokens:>11,.0f}"
                f" {format_usd(r.usd):>12}")

    lines += [line(r) for r in est.rows]
    lines += [line(replace(est.step0, part="step 0", phase="total")),
              line(replace(est.per_step, part="each step", phase="total")),
              line(replace(est.total, part=f"run ({est.steps} st)", phase="total"))]
    lines.append("prices: " + ", ".join(f"{spec} from {source}" if source != "unknown" else f"{spec} unknown (set "
                                        f"one with --price {spec}=USD_PER_MILLION_TOKENS)"
                                        for spec, source in est.prices.items()))
    if est.step0_worst is not None:
        w = est.step0_worst
        hidden = "".join(f"; {spec}'s replies include up to {extra:,} hidden reasoning tokens per call"
                         for spec, extra in est.reasoning_allowance.items())
        lines.append(f"step 0 worst case (what a budget must allow before the run starts: prompts at "
                     f"{GUARD_CHARS_PER_TOKEN} characters per token, every reply at its whole token budget{hidden}): "
                     f"{w.tokens:,.0f} tokens, {format_usd(w.usd)}")
    lines.append(f"assumed: {est.assumptions.describe()}")
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)
