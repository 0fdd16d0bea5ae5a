"""Judging a proposal: is the candidate value better than the current one on these samples?

Only samples scored on both sides are compared (a provider fault is never a wrong answer). A
judgement with more errored samples than the allowed share is no judgement at all: `decided`
is False and nothing may be concluded from it. The optional paired test is a one-sided exact
sign test over the per-sample differences (Dixon and Mood, "The Statistical Sign Test", JASA
1946): on a small validation set a one-sample gain is usually chance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

from autodiff.records import Evaluation


@dataclass(frozen=True)
class Rule:
    """When a candidate counts as better.

    `min_gain`: the mean score over paired samples must rise by at least this much (and by more
    than 0 in any case). `acceptance`: "gain" (the mean alone) or "paired" (also a sign test at
    level `alpha`). `max_error_share`: above this share (0..1) of errored candidate samples the
    comparison is not decided."""

    min_gain: float = 0.0
    acceptance: Literal["gain", "paired"] = "gain"
    alpha: float = 0.1
    max_error_share: float = 0.1


@dataclass(frozen=True)
class Judgement:
    """The outcome of one comparison. Scores are means over the `paired` samples scored on both
    sides (None when there were none); `errors` of the `asked` candidate samples errored."""

    decided: bool
    better: bool
    reason: str
    score: float | None
    baseline: float | None
    paired: int
    errors: int
    asked: int


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided exact sign test: chance of at least `wins` wins among wins+losses fair coin flips."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def judge(candidate: Sequence[Evaluation], baseline: Mapping[str, float | None], rule: Rule, *,
          stage: str, expected: int | None = None) -> Judgement:
    """Compare the candidate's evaluations with the current value's scores by sample id.

    `stage` names the comparison in the reason ("mini-batch", "validation"). `expected` is how
    many samples the comparison was meant to cover; fewer means it stopped early because the
    candidate could no longer win, which the reason says."""
    asked = len(candidate)
    errors = sum(e.errored for e in candidate)
    pairs = [(e.score, baseline[e.sample_id]) for e in candidate
             if e.score is not None and baseline.get(e.sample_id) is not None]
    score = sum(c for c, _ in pairs) / len(pairs) if pairs else None
    base = sum(b for _, b in pairs) / len(pairs) if pairs else None

    def result(decided: bool, better: bool, reason: str) -> Judgement:
        return Judgement(decided, better, reason, score, base, len(pairs), errors, asked)

    if asked and errors > rule.max_error_share * asked:
        return result(False, False, f"{errors} of {asked} {stage} samples errored (more than "
                                    f"{rule.max_error_share:.0%}): not judged on errors")
    if not pairs:
        return result(False, False, f"no {stage} sample was scored on both sides: not judged")
    gain = score - base
    on = f"on {len(pairs)} samples scored on both sides"
    if expected is not None and asked < expected:
        return result(True, False, f"{stage} stopped after {asked} of {expected} samples: could not gain "
                                   f"{max(rule.min_gain, 0):.3f} over {base:.3f} ({on})")
    if gain <= 0 or gain < rule.min_gain:
        return result(True, False, f"{stage} {score:.3f} did not beat the current value's {base:.3f} "
                                   f"+ min gain {rule.min_gain:g} ({on})")
    if rule.acceptance == "paired":
        wins = sum(c > b for c, b in pairs)
        losses = sum(c < b for c, b in pairs)
        p = sign_test_p(wins, losses)
        if p > rule.alpha:
            return result(True, False, f"{stage} paired sign test: {wins} better, {losses} worse, "
                                       f"p={p:.3f} > {rule.alpha}")
    return result(True, True, f"{stage} {score:.3f} beat the current value's {base:.3f} ({on})")


def out_of_reach(done: Sequence[Evaluation], pending: Sequence[str], baseline: Mapping[str, float | None],
                 rule: Rule, total: int) -> bool:
    """True once the candidate can no longer be judged better, whatever the `pending` samples
    score: its errors already pass the allowed share of `total`, or even perfect scores on every
    pending sample (and errors on the ones that would pull the mean down) cannot reach the
    minimum gain over the paired samples."""
    if sum(e.errored for e in done) > rule.max_error_share * total:
        return True
    diff = sum(e.score - baseline[e.sample_id] for e in done
               if e.score is not None and baseline.get(e.sample_id) is not None)
    n = sum(1 for e in done if e.score is not None and baseline.get(e.sample_id) is not None)
    headroom = sorted((1.0 - baseline[s] for s in pending if baseline.get(s) is not None), reverse=True)
    best = diff / n if n else None
    for room in headroom:  # add the samples that raise the mean gain, best first
        if best is not None and room <= best:
            break
        diff, n = diff + room, n + 1
        best = diff / n
    need = max(rule.min_gain, 0.0)
    return best is not None and (best < need or best <= 0)
