"""TREC coarse question classification: one LLM node with instruction and format peers."""

from __future__ import annotations

import re
from pathlib import Path

from autodiff.evals import accuracy
from autodiff.graph import LLMNode, Loss, Value
from autodiff.parameter import Parameter
from autodiff.pipeline import Pipeline, Task
from autodiff.tasks.data import DATA_DIR, read_jsonl, seeded_split

LABELS = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
INSTRUCTION = (
    "Classify the question by the kind of answer it expects. Labels: ABBR (abbreviation), "
    "DESC (description or definition), ENTY (entity: thing, animal, product, ...), HUM (person or group), "
    "LOC (location), NUM (number, date, amount)."
)
OUTPUT_FORMAT = "Reply with the label only, e.g. 'Label: LOC'."


def parse_label(text: str) -> str:
    """The first known label in the reply (after 'Label:' if present)."""
    after = re.split(r"label\s*:", text, flags=re.I)[-1]
    for candidate in (after, text):
        match = re.search(r"\b(" + "|".join(LABELS) + r")\b", candidate.upper())
        if match:
            return match.group(1)
    return text.strip()[:30]


class TrecClassifier(Pipeline):
    def __init__(self) -> None:
        self.instruction = Parameter(
            "classifier.instruction", INSTRUCTION, kind="instruction", must_keep=LABELS,
            role="Explains the six labels and how to choose between them.")
        self.output_format = Parameter(
            "classifier.output_format", OUTPUT_FORMAT, kind="output_format",
            role="How the reply must look so that the label can be read from it.")
        self.classifier = LLMNode(
            "classifier", [self.instruction, self.output_format],
            template="{{instruction}}\n{{output_format}}\n\nQuestion: {{question}}", parse=parse_label,
            max_tokens=16,
        )

    def forward(self, sample: dict) -> Value:
        return self.classifier(question=sample["question"])


def _rows(path: Path, prefix: str) -> list[dict]:
    rows = read_jsonl(path, required=("text", "coarse_label"))
    return [{"id": f"{prefix}-{i:04d}", "question": r["text"], "answer": r["coarse_label"]} for i, r in enumerate(rows)]


def load(data_dir: Path = DATA_DIR / "trec") -> Task:
    train_rows = _rows(data_dir / "train.jsonl", "trec-train")
    test_rows = _rows(data_dir / "test.jsonl", "trec-test")
    train, val = seeded_split(train_rows, (120, 166))
    (test,) = seeded_split(test_rows, (334,))
    return Task("trec", TrecClassifier(), Loss(accuracy, "accuracy"),
                {"train": train, "val": val, "test": test}, tau=1.0)
