"""Human review: what a person needs to judge a pending proposal, their decisions, their feedback.

A decision is only written to the store; the trainer waiting on the proposal polls for it and goes
on (see Trainer.wait_for_decision), so the dashboard and the trainer can be different processes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from autodiff.errors import StoreError
from autodiff.proposals import feedback_read
from autodiff.records import Gradient, Proposal
from autodiff.store import Store

REVIEW_WAIT = "review_wait"  # run event the trainer writes as a wait begins: JSON proposal, until, fallback


@dataclass(frozen=True)
class PendingReview:
    proposal: Proposal
    current: str  # the parameter's value the proposal would replace
    peers: tuple[tuple[str, str], ...]  # (name, current value) of the parameter's peers
    gradients: tuple[Gradient, ...] | None  # the feedback its optimizer call read (None: not recorded)
    decision: tuple[str, str | None, str] | None  # written but not yet applied by the trainer
    waits_until: float | None = None  # Unix time the trainer stops waiting (None: not recorded)
    fallback: str | None = None  # what it then does: "accept" or "reject"

    def seconds_left(self, now: float | None = None) -> float | None:
        """Seconds until the wait's fallback decides (0 once past), None when not recorded."""
        if self.waits_until is None:
            return None
        return max(0.0, self.waits_until - (time.time() if now is None else now))

    @property
    def held(self) -> str | None:
        """Why it could not be validated, for a proposal review mode "all" held for a person:
        "malformed" (a reply with no usable value: reject it, or write a value to accept) or
        "rejected_check" (it failed a check: accepting it overrides the check); None otherwise."""
        return self.proposal.held_fate


def pending(store: Store, run_id: str) -> list[PendingReview]:
    """The run's proposals waiting for a person, oldest first, with their context."""
    proposals = store.proposals(run_id, fate="pending")
    if not proposals:
        return []
    peers_of = {p.name: p.peers for p in store.parameters(run_id)}
    waits = {w["proposal"]: w for w in (json.loads(e.text) for e in store.run_events(run_id)
                                        if e.kind == REVIEW_WAIT)}  # a later wait (a resume) wins
    values_at: dict[int, dict[str, str]] = {}
    out = []
    for p in proposals:
        if p.step not in values_at:
            values_at[p.step] = store.parameter_values_at(run_id, p.step)
        values = values_at[p.step]
        name = p.parameter
        read = feedback_read(store, p)
        out.append(PendingReview(
            proposal=p, current=values.get(name, ""),
            peers=tuple((peer, values.get(peer, "")) for peer in peers_of.get(name, ())),
            gradients=None if read is None else tuple(read),
            decision=(p.decision, p.decision_value, p.decision_by) if p.decision else None,
            waits_until=waits.get(p.id, {}).get("until"), fallback=waits.get(p.id, {}).get("fallback"),
        ))
    return out


def accept(store: Store, proposal_id: str, by: str = "human") -> None:
    store.decide(proposal_id, "accept", by=by)


def reject(store: Store, proposal_id: str, by: str = "human") -> None:
    store.decide(proposal_id, "reject", by=by)


def edit(store: Store, proposal_id: str, value: str, by: str = "human") -> None:
    """Accept the proposal with `value` in place of what the optimizer wrote."""
    store.decide(proposal_id, "edit", value=value, by=by)


def decisions(store: Store, run_id: str) -> list[Proposal]:
    """Proposals a decision was written for, oldest first."""
    return [p for p in store.proposals(run_id) if p.decision]


def feedback_targets(store: Store, run_id: str) -> list[str]:
    """What a person can write feedback on: each node with trainable parameters, then each of them."""
    params = [p for p in store.parameters(run_id) if p.trainable]
    nodes = list(dict.fromkeys(p.node for p in params if p.node))
    return nodes + [p.name for p in params]


def trained_samples(store: Store, run_id: str) -> list[str]:
    """Training samples the run has seen, latest step first (failed ones of a step before the rest)."""
    seen: dict[str, None] = {}
    for s in reversed(store.steps(run_id)):
        for sid in [*s.failed_samples, *s.batch]:
            seen.setdefault(sid, None)
    return list(seen)


def add_feedback(store: Store, run_id: str, text: str, target: str, sample_id: str | None = None,
                 by: str = "human") -> list[str]:
    """Feedback on a parameter, or on a node (then every trainable parameter of it reads it), optionally
    about one sample, written by `by` (the signed-in user on a shared dashboard). The next optimizer
    call for each parameter reads it like a gradient."""
    params = [p for p in store.parameters(run_id) if p.trainable]
    chosen = [p for p in params if p.name == target] or [p for p in params if p.node == target]
    if not chosen:
        raise StoreError(f"run {run_id} has no trainable parameter or node named {target!r}")
    return [
        store.add_human_feedback(run_id, text, node=p.node or p.name, target=p.name,
                                 sample_id=sample_id or None, author=by)
        for p in chosen
    ]
