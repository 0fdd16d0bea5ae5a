"""Judging a proposal: is the candidate value better than the current one on these samples?

A provider fault is never a wrong answer, and never decides a comparison: a sample errored on
either side counts with its unknown score at both extremes, and a judgement is made only when
both give the same outcome (`judge`). A judgement with more errored samples than the allowed
share is no judgement at all: `decided` is False and nothing may be concluded from it. The
optional paired test is a one-sided exact sign test over the per-sample differences (Dixon and
Mood, "The Statistical Sign Test", JASA 1946): on a small validation set a one-sample gain is
usually chance.
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

    A sample errored on either side (a call that failed, asked twice: see `Trainer.evaluate`) has
    an unknown score in [0, 1]. The comparison is made twice, with every such score at the
    extreme that favours the candidate most and at the one that favours it least; both rules
    (mean gain, sign test) only move one way as a sample's difference grows, so when the two
    agree, the fault-free outcome is that one too, and it is the judgement. When they disagree,
    the errors could decide it: not decided. `score` and `baseline` are the means over the samples
    scored on both sides.

    `stage` names the comparison in the reason ("mini-batch", "validation"). `expected` is how
    many samples the comparison was meant to cover; fewer means it stopped early because the
    candidate could no longer win (`out_of_reach`, which counts errored samples at their best),
    which the reason says."""
    asked = len(candidate)
    errors = sum(e.errored for e in candidate)
    pairs = [(e.score, baseline[e.sample_id]) for e in candidate
             if e.score is not None and baseline.get(e.sample_id) is not None]
    unknown = [(e.score, baseline.get(e.sample_id)) for e in candidate
               if e.score is None or baseline.get(e.sample_id) is None]
    score = sum(c for c, _ in pairs) / len(pairs) if pairs else None
    base = sum(b for _, b in pairs) / len(pairs) if pairs else None

    def result(decided: bool, better: bool, reason: str) -> Judgement:
        return Judgement(decided, better, reason, score, base, len(pairs), errors, asked)

    if asked and errors > rule.max_error_share * asked:
        return result(False, False, f"{errors} of {asked} {stage} samples errored (more than "
                                    f"{rule.max_error_share:.0%}): not judged on errors")
    if not pairs and not unknown:
        return result(False, False, f"no {stage} sample was scored: not judged")
    on = f"on {len(pairs)} samples scored on both sides"
    if expected is not None and asked < expected:
        return result(True, False, f"{stage} stopped after {asked} of {expected} samples: could not gain "
                                   f"{max(rule.min_gain, 0):.3f} over the current value ({on}"
                                   + (f", {len(unknown)} errored counted at their best" if unknown else "") + ")")
    if not unknown:
        better, why = _better(pairs, rule, stage, on)
        return result(True, better, why)
    best, _ = _better(pairs + [(1.0 if c is None else c, 0.0 if b is None else b) for c, b in unknown], rule, stage, on)
    worst, _ = _better(pairs + [(0.0 if c is None else c, 1.0 if b is None else b) for c, b in unknown], rule, stage,
                       on)
    shown = (f"{score:.3f} against the current value's {base:.3f} {on}" if pairs else "no sample scored on both sides")
    if best != worst:
        return result(False, False, f"{len(unknown)} of {asked} {stage} samples errored and their scores "
                                    f"could decide it either way ({shown}): not judged")
    return result(True, best, f"{stage}: {'better' if best else 'not better'} whatever its {len(unknown)} errored "
                              f"samples would have scored (judged with them at both extremes; {shown})")


def _better(pairs: Sequence[tuple[float, float]], rule: Rule, stage: str, on: str) -> tuple[bool, str]:
    """Whether the candidate's scores beat the current value's over `pairs` (candidate, current),
    under `rule`, and why in words (`on` says over which samples)."""
    score = sum(c for c, _ in pairs) / len(pairs)
    base = sum(b for _, b in pairs) / len(pairs)
    gain = score - base
    if gain <= 0 or gain < rule.min_gain:
        return False, (f"{stage} {score:.3f} did not beat the current value's {base:.3f} "
                       f"+ min gain {rule.min_gain:g} ({on})")
    if rule.acceptance == "paired":
        wins = sum(c > b for c, b in pairs)
        losses = sum(c < b for c, b in pairs)
        p = sign_test_p(wins, losses)
        if p > rule.alpha:
            return False, f"{stage} paired sign test: {wins} better, {losses} worse, p={p:.3f} > {rule.alpha}"
    return True, f"{stage} {score:.3f} beat the current value's {base:.3f} ({on})"


def out_of_reach(done: Sequence[Evaluation], pending: Sequence[str], baseline: Mapping[str, float | None],
                 rule: Rule, total: int) -> bool:
    """True once the candidate can no longer be judged better, whatever the `pending` samples
    score: its errors already pass the allowed share of `total`, or even the best case cannot
    reach the minimum gain in mean score: every pending sample, and every sample errored on
    either side, at the difference that favours the candidate most (its score 1, or as scored;
    the current value's 0, or as scored), each added only where it raises the mean."""
    if sum(e.errored for e in done) > rule.max_error_share * total:
        return True
    known = [e.score - baseline[e.sample_id] for e in done
             if e.score is not None and baseline.get(e.sample_id) is not None]
    diff, n = sum(known), len(known)
    rooms = [(1.0 if e.score is None else e.score) - (baseline.get(e.sample_id) or 0.0) for e in done
             if e.score is None or baseline.get(e.sample_id) is None]
    rooms += [1.0 - (baseline.get(s) or 0.0) for s in pending]
    best = diff / n if n else None
    for room in sorted(rooms, reverse=True):  # add the samples that raise the mean gain, best first
        if best is not None and room <= best:
            break
        diff, n = diff + room, n + 1
        best = diff / n
    need = max(rule.min_gain, 0.0)
    return best is not None and (best < need or best <= 0)
