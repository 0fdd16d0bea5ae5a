"""Every proposal of a run and why it was made: the value it would have replaced, the feedback its
optimizer call read (recorded with the proposal when the call was made), and, the other way round,
the proposals a piece of feedback was read by."""

from __future__ import annotations

from typing import Sequence

from autodiff.records import PROPOSAL_FATES, Gradient, Proposal
from autodiff.store import Store


def feedback_read(store: Store, proposal: Proposal) -> list[Gradient] | None:
    """The feedback (gradients, human feedback included) the optimizer call that wrote `proposal`
    (as the store gave it back) read, in the order its prompt gave them; None for a proposal stored
    before that was recorded."""
    ids = proposal.feedback_ids
    return None if ids is None else store.gradients_by_id(proposal.run_id, ids)


def readers(store: Store, run_id: str, gradient_ids: Sequence[str]) -> dict[str, list[Proposal]]:
    """Gradient id -> the proposals whose optimizer call read it (ids no proposal read are absent)."""
    return store.proposals_reading(run_id, gradient_ids)


def replaced_values(store: Store, run_id: str, proposals: Sequence[Proposal]) -> list[str]:
    """For each proposal, the value of its parameter it would have replaced: the value at the end
    of the step before its own (a parameter changes within a step only by accepting one of its
    proposals, after which the step makes no more for it)."""
    at: dict[int, dict[str, str]] = {}
    out = []
    for p in proposals:
        if p.step - 1 not in at:
            at[p.step - 1] = store.parameter_values_at(run_id, p.step - 1)
        out.append(at[p.step - 1].get(p.parameter, ""))
    return out


def fates_in(proposals: Sequence[Proposal]) -> list[str]:
    """The fates the proposals have, in lifecycle order (any unknown fate last)."""
    present = list(dict.fromkeys(p.fate for p in proposals))
    order = list(PROPOSAL_FATES)
    return sorted(present, key=lambda f: (order.index(f) if f in order else len(order), f))


def select(proposals: Sequence[Proposal], *, step: int | None = None, parameter: str | None = None,
           fate: str | None = None) -> list[Proposal]:
    """The proposals matching every filter given (None: any)."""
    return [p for p in proposals if (step is None or p.step == step)
            and (parameter is None or p.parameter == parameter) and (fate is None or p.fate == fate)]
