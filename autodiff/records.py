"""The nouns a run is made of. Frozen records; the run store persists exactly these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class LLMCall:
    id: str
    run_id: str | None
    step: int | None
    phase: str  # forward | backward | propose | validate | test
    role: str  # forward | backward | optimizer
    node: str | None
    sample_id: str | None
    call_index: int | None
    model: str
    messages: tuple[tuple[str, str], ...]
    response: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    cached: bool
    error: str | None
    created_at: float
    # Where the request went (API base URL, or "in-process" for the embedded model).
    endpoint: str | None = None
    # "stop", "length" (cut off by the token limit), "content_filter", or None (not said / failed).
    finish_reason: str | None = None
    reasoning: str | None = None  # reasoning the model wrote, kept apart from `response`
    attempts: int = 1  # requests sent for this call (retries included); 0 when served from the cache
    error_kind: str | None = None  # one of autodiff.errors.ERROR_KINDS when `error` is set
    cached_prompt_tokens: int = 0  # prompt tokens the provider served from its own prompt cache
    cache_write_tokens: int = 0  # prompt tokens written to the provider's prompt cache
    reasoning_tokens: int = 0  # completion tokens spent on hidden reasoning
    # USD the call cost (0 when answered from our response cache; None when its price is unknown),
    # what a call answered from our cache would have cost (0 for other calls), and where the price
    # came from ("user", "local", or the price table's version): see autodiff.llm.pricing.
    cost_usd: float | None = None
    saved_usd: float | None = None
    price_source: str | None = None
    proposal_id: str | None = None  # the proposal a validation call scored

    @property
    def cut_off(self) -> bool:
        """The reply stopped at the token limit, not where the model ended it."""
        return self.finish_reason == "length"


# The fields of an LLMCall that hold its text: what a CallSummary leaves out.
CALL_TEXT_FIELDS = ("messages", "response", "reasoning")


@dataclass(frozen=True)
class CallSummary:
    """An LLMCall as stored, without its text (`CALL_TEXT_FIELDS`): what accounting and the lists
    of faults read (`Store.call_summaries`, `Store.fault_calls`), so a long run's prompts and
    replies are never loaded for a sum. Its fields are LLMCall's others, in the same order, with
    the same meaning (see LLMCall); read the text with `Store.call(id)`."""

    id: str
    run_id: str | None
    step: int | None
    phase: str
    role: str
    node: str | None
    sample_id: str | None
    call_index: int | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    cached: bool
    error: str | None
    created_at: float
    endpoint: str | None = None
    finish_reason: str | None = None
    attempts: int = 1
    error_kind: str | None = None
    cached_prompt_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float | None = None
    saved_usd: float | None = None
    price_source: str | None = None
    proposal_id: str | None = None

    @property
    def cut_off(self) -> bool:
        """The reply stopped at the token limit, not where the model ended it."""
        return self.finish_reason == "length"


@dataclass(frozen=True)
class InputRef:
    """One input of a node invocation: its name, its text, and the invocation that produced it."""

    name: str
    text: str
    source: str | None = None  # invocation id, None for sample fields and constants


@dataclass(frozen=True)
class Invocation:
    """One call of one node for one sample: a vertex of the unrolled graph."""

    id: str
    sample_id: str
    node: str
    node_type: str  # llm | function | loss
    call_index: int
    inputs: tuple[InputRef, ...]
    output: str
    parameters: tuple[tuple[str, str], ...] = ()  # (name, value) of the prompt's parameters
    prompt: str | None = None
    llm_call_id: str | None = None
    score: float | None = None  # set on loss invocations
    error: str | None = None
    seq: int = 0  # order of execution within the sample
    step: int | None = None  # the training step that traced it: set by the store (None until stored)


@dataclass(frozen=True)
class Gradient:
    """Feedback on one target (a parameter, or the output of an upstream invocation)."""

    id: str
    sample_id: str | None
    node: str  # node whose backward step wrote it (or where it was handed on)
    invocation_id: str | None
    call_index: int | None
    target_type: str  # parameter | output
    target: str  # parameter name, or the node whose output it is about
    target_invocation: str | None
    score: float | None
    text: str
    source_node: str | None  # downstream node the feedback came from
    path: tuple[str, ...] = ()  # function nodes it passed through, nearest last
    llm_call_id: str | None = None
    origin: str = "backward"  # backward | loss | human
    error: str | None = None
    created_at: float = 0.0
    # The call index of what the feedback is about, fixed when it is written: for feedback on an
    # output, the call that wrote that output (the target invocation's call index); else the call
    # of the node whose parameter it is about. None for feedback not tied to a call (human).
    about_call: int | None = None
    # Set by the store (None until stored): the step it was written at, and for human feedback
    # the step whose optimizer call read it (None while it waits to be read).
    step: int | None = None
    consumed_step: int | None = None


Decision = Literal["accept", "reject", "edit"]  # what a person can decide on a pending proposal

Fate = Literal["proposed", "malformed", "error", "rejected_check", "failed_minibatch", "failed_val", "pending",
               "accepted", "rejected"]

# A proposal's lifecycle, in the order a proposal can get through it, with what each fate means.
PROPOSAL_FATES: dict[str, str] = {
    "proposed": "written, not yet settled",
    "error": "the optimizer call failed: no reply, so no value",
    "malformed": "the optimizer's reply held no usable proposal (its raw reply is kept as the value)",
    "rejected_check": "refused before validation: empty, a repeat, its parameter's role dropped, or the "
                      "optimizer's own instructions or tags in it",
    "failed_minibatch": "did not beat the current value on the step's mini-batch",
    "failed_val": "did not beat the best validation score",
    "pending": "waiting for a person's decision (review mode)",
    "accepted": "became the parameter's new value",
    "rejected": "rejected by a person, or by the review time-out's fallback",
}


@dataclass(frozen=True)
class Proposal:
    id: str
    step: int
    parameter: str
    value: str
    method: str
    reasoning: str
    llm_call_id: str | None = None
    fate: Fate = "proposed"
    reason: str = ""
    minibatch_score: float | None = None
    minibatch_baseline: float | None = None
    val_score: float | None = None
    val_baseline: float | None = None
    decided_by: str | None = None
    created_at: float = 0.0
    # The ids of the feedback (gradients, human feedback included) its optimizer call read, in
    # the order the prompt gave them: recorded when the call was made, never guessed later.
    feedback_ids: tuple[str, ...] | None = ()
    # Review mode "all" holds for a person a proposal that cannot be validated; this says why
    # ("malformed" or "rejected_check"), and is the fate it gets back if the person rejects it.
    held_fate: Fate | None = None
    # Set by the store (None until stored or decided): the run, when its fate was settled by a
    # decision, and a person's decision on it while pending: "accept", "reject" or "edit", the
    # value an edit wrote, and who decided. `feedback_ids` read back from the store is None for a
    # proposal stored before the feedback a proposal read was recorded (unknown, not "none").
    run_id: str | None = None
    decided_at: float | None = None
    decision: Decision | None = None
    decision_value: str | None = None
    decision_by: str | None = None


@dataclass(frozen=True)
class Evaluation:
    """One sample scored under one set of parameter values. `score` is None when the sample
    could not be scored: a call failed (a provider fault is never a wrong answer) or the user's
    code (a function node, a parser, the metric) raised; then `error` says why. A scored sample
    may still carry an `error` note (e.g. a reply cut off at the token limit)."""

    sample_id: str
    prediction: str
    gold: str
    score: float | None
    error: str | None = None
    # Set by the store (None until stored): the step whose values were scored, the split
    # ("train", "val" or "test") and the subject ("current", or the id of the proposal scored).
    step: int | None = None
    split: str | None = None
    subject: str | None = None

    @property
    def errored(self) -> bool:
        return self.score is None


@dataclass
class Trace:
    """The unrolled graph of one sample's forward pass, in execution order."""

    sample_id: str
    invocations: list[Invocation] = field(default_factory=list)

    @property
    def loss(self) -> Invocation | None:
        losses = [i for i in self.invocations if i.node_type == "loss"]
        return losses[-1] if losses else None

    error: str | None = None  # set when a call failed and the sample could not be scored

    @property
    def score(self) -> float | None:
        """The loss's score, or None when the sample errored before it was scored."""
        loss = self.loss
        return loss.score if loss and loss.score is not None else None


# --- runs: a run, its steps, its parameters as stored, their versions, its events ------------
# What the store gives back for a run (`Store.run`, `steps`, `parameters`, ...). Times are Unix
# seconds (time.time()); scores are fractions in [0, 1].


@dataclass(frozen=True)
class Run:
    """A training run as the store holds it. `config` is the run's options (a
    `RunConfig.model_dump()`, never an API key); `status` is one of created, queued, running,
    completed, stopped, failed; `error` says why a run failed or stopped (or, while queued, a
    note); `pid` and `host` are the process that last trained it and its machine's name, and
    `held_since` when that process took it (all None before any did; `host` also for runs
    trained before hosts were recorded). While the run is running they name its holder (see
    autodiff.holders). `created_at`, `updated_at` (when its status, holder or options last
    changed, or a stop was last requested) and `held_since` are Unix seconds."""

    id: str
    task: str
    config: dict
    status: str
    error: str | None
    created_at: float
    updated_at: float
    stop_requested: bool
    pid: int | None
    host: str | None = None
    held_since: float | None = None


@dataclass(frozen=True)
class Step:
    """One training step of a run (0 is the initial evaluation). `status` is running or
    completed; `started_at`/`finished_at` are Unix seconds (`finished_at` None while running);
    `val_score`/`test_score` are in [0, 1], None when not measured at that step; `batch` holds
    the step's mini-batch sample ids, `failed_samples` those it sent backward."""

    step: int
    status: str
    started_at: float
    finished_at: float | None
    val_score: float | None
    test_score: float | None
    batch: tuple[str, ...]
    failed_samples: tuple[str, ...]


@dataclass(frozen=True)
class ParameterSpec:
    """A parameter as a run stored it (its values are `ParameterVersion`s): `position` is its
    place in the pipeline's order, `peers` the names of the parameters sharing its prompt."""

    name: str
    node: str | None
    kind: str  # instruction | output_format | examples | other
    role: str
    trainable: bool
    peers: tuple[str, ...]
    position: int


@dataclass(frozen=True)
class ParameterVersion:
    """One value a parameter had: `version` counts from 0 (the initial value) per parameter;
    `step` is the step that set it; `proposal_id` the accepted proposal it came from (None for
    the initial value and values set outside a proposal); `created_at` in Unix seconds."""

    name: str
    version: int
    step: int
    value: str
    proposal_id: str | None
    created_at: float


@dataclass(frozen=True)
class RunEvent:
    """Something that happened to a run besides its steps: `at` (Unix seconds), `kind` (e.g.
    "estimate", "budget_changed", "task_changes_accepted") and a free `text`."""

    at: float
    kind: str
    text: str
