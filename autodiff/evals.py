"""Evaluation functions: each maps (prediction, gold) to a score in [0, 1]."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any


def normalize(text: Any) -> str:
    """Lower-case, drop punctuation and articles, squeeze spaces (the usual QA normalisation)."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: Any, gold: Any) -> float:
    return float(normalize(prediction) == normalize(gold))


def f1(prediction: Any, gold: Any) -> float:
    pred, ref = normalize(prediction).split(), normalize(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def accuracy(prediction: Any, gold: Any) -> float:
    """Label accuracy: case and surrounding punctuation do not matter."""
    return float(str(prediction).strip().strip(".:").upper() == str(gold).strip().upper())


def integer_match(prediction: Any, gold: Any) -> float:
    """Exact match on the integer: the prediction must parse to the gold number."""
    try:
        return float(int(str(prediction).strip()) == int(str(gold).strip()))
    except ValueError:
        return 0.0


METRICS = {"exact_match": exact_match, "f1": f1, "accuracy": accuracy, "integer_match": integer_match}
