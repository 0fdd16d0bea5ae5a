"""GDPO: gradient-driven prompt optimization. The optimizer *proposes*; it never edits a parameter."""

from __future__ import annotations

import re
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

from autodiff.errors import LLMError, LLMFatalError, LLMTransientError
from autodiff.llm.client import LLM
from autodiff.llm.types import CallContext, Message
from autodiff.parameter import Parameter
from autodiff.prompts import OPTIMIZER_PROMPT, OPTIMIZER_SYSTEM, TEMPLATE_TAGS, fill, template_lines
from autodiff.records import Gradient, Proposal

METHODS = ("add", "rephrase", "remove", "add_example", "restructure")  # plus "untagged" (lenient parsing)
_BLOCK = re.compile(r"<proposal>(.*?)(?:</proposal>|(?=<proposal>)|$)", re.S | re.I)


def _tag(block: str, name: str) -> str | None:
    # An unclosed field ends where the next field of ours opens, not at any <word>: values
    # often hold placeholders such as 'Answer: <number>'.
    m = re.search(rf"<{name}>(.*?)(?:</{name}>|(?=<(?:method|reasoning|value)>)|$)", block, re.S | re.I)
    return m.group(1).strip() if m else None


@dataclass(frozen=True)
class HistoryEntry:
    value: str
    val_score: float | None
    step: int


@dataclass
class OptimizerInput:
    """Everything one optimizer call sees for one parameter."""

    parameter: Parameter
    peers: Sequence[Parameter]
    others: Sequence[Parameter]
    gradients: Sequence[Gradient]  # the feedback on the parameter: from the backward pass and from people
    positives: Sequence[tuple[str, str]] = ()  # (input, prediction) samples that are right
    history: Sequence[HistoryEntry] = ()
    failed: Sequence[tuple[str, str]] = ()  # (value, reason) of this step's failed proposals
    constraints: Sequence[str] = ()


FEEDBACK_CHARS = 6000  # the feedback an optimizer prompt holds; more is cut


def _feedback(gradients: Sequence[Gradient], limit_chars: int) -> tuple[str, list[Gradient]]:
    """The feedback as the optimizer reads it (grouped by sample and call index, lowest scores
    first, calls of one sample in order, cut at `limit_chars`), and the gradients that made it into
    that text, in its order (one cut part-way counts as read)."""
    by_sample: dict[str, list[Gradient]] = defaultdict(list)
    for g in gradients:
        by_sample[g.sample_id or "(no sample)"].append(g)
    order = sorted(by_sample, key=lambda s: (min((g.score or 0.0) for g in by_sample[s]), s))
    lines: list[tuple[str, Gradient | None]] = []
    for sample in order:
        items = sorted(by_sample[sample], key=lambda g: (g.call_index or 0))
        score = min((g.score or 0.0) for g in items)
        lines.append((f'<sample id="{sample}" score="{score:.2f}">', None))
        for g in items:
            who = "human" if g.origin == "human" else f"call {g.call_index or 0}"
            lines.append((f"- [{who}] {g.text}", g))
        lines.append(("</sample>", None))
    text = "\n".join(line for line, _ in lines)
    read, at = [], 0
    for line, g in lines:
        if at >= limit_chars:
            break
        if g is not None:
            read.append(g)
        at += len(line) + 1
    return (text if len(text) <= limit_chars else text[:limit_chars] + "\n[... more feedback cut ...]"), read


def format_gradients(gradients: Sequence[Gradient], limit_chars: int = FEEDBACK_CHARS) -> str:
    """Group by sample and call index, lowest scores first, calls of one sample in order."""
    return _feedback(gradients, limit_chars)[0]


def feedback_read(gradients: Sequence[Gradient], limit_chars: int = FEEDBACK_CHARS) -> tuple[str, ...]:
    """The ids of the gradients an optimizer prompt made from `gradients` holds, in its order:
    what a proposal records as the feedback it was written from."""
    return tuple(g.id for g in _feedback(gradients, limit_chars)[1] if g.id)


def build_prompt(inp: OptimizerInput, n: int) -> str:
    p = inp.parameter
    peers = "\n".join(f'<peer name="{q.name}" kind="{q.kind}">\n{q.value}\n</peer>' for q in inp.peers) or "(none)"
    others = "\n".join(f'<param name="{q.name}" node="{q.node}">\n{q.value}\n</param>' for q in inp.others) or "(none)"
    positives = "\n".join(f"- input: {i}\n  output: {o}" for i, o in inp.positives) or "(none)"
    history = "\n".join(
        f'<entry score="{h.val_score:.3f}" step="{h.step}">\n{h.value}\n</entry>' if h.val_score is not None
        else f'<entry step="{h.step}">\n{h.value}\n</entry>'
        for h in inp.history
    ) or "(none)"
    failed = "\n".join(f"<tried reason=\"{r}\">\n{v}\n</tried>" for v, r in inp.failed) or "(none)"
    constraints = "".join(f"Constraint from the user: {c}\n" for c in inp.constraints)
    return fill(
        OPTIMIZER_PROMPT, name=p.name, node=p.node or "?", kind=p.kind, role=p.role, value=p.value, peers=peers,
        others=others, gradients=format_gradients(inp.gradients) or "(none)", positives=positives,
        history=history, failed=failed, constraints=constraints, n=n,
    )


@dataclass(frozen=True)
class Parsed:
    method: str
    reasoning: str
    value: str


def parse_proposals(text: str, lenient: bool = False) -> tuple[list[Parsed], str | None]:
    """Proposal blocks of a reply, and the reason if there are none usable.

    `lenient` is for weak models that ignore the format: bare <value> tags count, and a reply with
    no tags at all becomes one candidate (method "untagged"). Such candidates still face every
    check and both validation stages, so leniency costs validation calls, never safety."""
    found = []
    for block in _BLOCK.findall(text or ""):
        value = _tag(block, "value")
        if value is None:
            continue
        method = (_tag(block, "method") or "rephrase").strip().lower().replace(" ", "_")
        found.append(Parsed(method if method in METHODS else "rephrase", _tag(block, "reasoning") or "", value))
    if found:
        return found, None
    if not (text or "").strip():
        return [], "optimizer reply was empty"
    if lenient:
        values = [v.strip() for v in re.findall(r"<value>(.*?)(?:</value>|$)", text, re.S | re.I)]
        if any(values):
            return [Parsed("rephrase", "", v) for v in values if v], None
        if "<" not in text:
            return [Parsed("untagged", "reply had no proposal tags; the whole reply is the value", text.strip())], None
    return [], "optimizer reply had no <proposal> block with a <value>"


@dataclass
class Optimizer:
    llm: LLM
    n_proposals: int = 2
    max_tokens: int = 1024
    lenient: bool = False
    _template_lines: tuple[str, ...] = field(default_factory=template_lines)

    def propose(self, inp: OptimizerInput, run_id: str | None, step: int) -> list[Proposal]:
        """One optimizer call; returns proposals (a malformed reply gives one failed proposal)."""
        prompt = build_prompt(inp, self.n_proposals)
        ctx = CallContext(run_id=run_id, step=step, phase="propose", node=inp.parameter.node, role="optimizer")
        now = time.time()
        try:
            reply = self.llm.complete(
                (Message("system", OPTIMIZER_SYSTEM), Message("user", prompt)), ctx, max_tokens=self.max_tokens,
                validate=self._require_proposals,
            )
        except (LLMFatalError, LLMTransientError):
            raise  # the trainer records it (see `failed`) and stops the run: the provider is failing
        except LLMError as exc:  # an empty reply or an over-long prompt: an error, never a bad proposal
            return [self.failed(inp, step, f"optimizer call failed: {exc}", now)]
        if reply.cut_off:  # a value cut off mid-way is no candidate, however well-formed its start
            return [self._failed(inp, step, reply.call_id, reply.text,
                                 f"optimizer reply cut off at the token limit ({self.max_tokens} tokens): "
                                 "raise it (--optimizer-max-tokens)", now)]
        parsed, reason = parse_proposals(reply.text, self.lenient)
        if not parsed:
            return [self._failed(inp, step, reply.call_id, reply.text, reason or "", now)]
        return [
            Proposal(
                id=uuid.uuid4().hex, step=step, parameter=inp.parameter.name, value=p.value, method=p.method,
                reasoning=p.reasoning, llm_call_id=reply.call_id, created_at=now,
                feedback_ids=feedback_read(inp.gradients),
            )
            for p in parsed[: self.n_proposals]
        ]

    def failed(self, inp: OptimizerInput, step: int, reason: str, now: float | None = None) -> Proposal:
        """The record of an optimizer call that failed (fate "error"): no value was proposed."""
        return self._failed(inp, step, None, "", reason, now or time.time(), fate="error")

    def _require_proposals(self, text: str) -> None:
        """The client's cache check: a reply with no usable proposal is not kept for a re-run."""
        if not parse_proposals(text, self.lenient)[0]:
            raise ValueError("no proposal in the reply")

    def _failed(self, inp: OptimizerInput, step: int, call_id, raw: str, reason: str, now: float,
                fate: str = "malformed") -> Proposal:
        return Proposal(
            id=uuid.uuid4().hex, step=step, parameter=inp.parameter.name, value=(raw or "")[:2000],
            method="none", reasoning="", llm_call_id=call_id, fate=fate, reason=reason, created_at=now,
            feedback_ids=feedback_read(inp.gradients),
        )

    def check(self, proposal: Proposal, parameter: Parameter, tried: Sequence[str]) -> str | None:
        """Why a proposal must be rejected before it costs a validation run, or None."""
        value = proposal.value.strip()
        current = parameter.value.strip()
        if not value:
            return "empty value"
        if value == current:
            return "same as the current value"
        if value in tried:
            return "repeats a value that was already tried"
        lowered = value.lower()
        for tag in TEMPLATE_TAGS:
            if tag in lowered:
                return f"contains the optimizer's own tag {tag}"
        for line in self._template_lines:
            if line.lower() in lowered:
                return "contains the optimizer's own instructions"
        missing = [s for s in parameter.must_keep if s not in value]
        if missing:
            return f"drops what the parameter's role needs: {missing}"
        if current and len(value) < 0.2 * len(current):
            return "too short to keep the parameter's role"
        if current and len(value) > 8 * len(current) + 400:
            return "far longer than the parameter it replaces"
        return None
