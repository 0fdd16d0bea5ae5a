"""BBH object counting: one LLM node whose prompt has three peers."""

from __future__ import annotations

import re
from pathlib import Path

from autodiff.evals import integer_match
from autodiff.graph import LLMNode, Loss, Value
from autodiff.parameter import Parameter
from autodiff.pipeline import Pipeline, Task
from autodiff.tasks.data import DATA_DIR, read_jsonl, seeded_split

INSTRUCTION = "Read the list of items and count how many of them belong to the category the question asks about."
OUTPUT_FORMAT = "Explain your count briefly, then end with a last line of the form 'Answer: <number>' using digits."
EXAMPLES = (
    "Question: I have a carrot, two potatoes, and a violin. How many vegetables do I have?\n"
    "Reasoning: carrot (1) + two potatoes (2) = 3. The violin is not a vegetable.\n"
    "Answer: 3"
)


def parse_count(text: str) -> str:
    """The number after the last 'Answer:', else the last number in the reply."""
    marked = re.findall(r"answer\s*[:=]\s*\**\s*(-?\d+)", text, re.I)
    if marked:
        return marked[-1]
    numbers = re.findall(r"-?\d+", text)
    return numbers[-1] if numbers else text.strip()[:50]


class ObjectCounting(Pipeline):
    def __init__(self) -> None:
        self.instruction = Parameter(
            "counter.instruction", INSTRUCTION, kind="instruction",
            role="The task instruction: tells the model what to count and how.")
        self.output_format = Parameter(
            "counter.output_format", OUTPUT_FORMAT, kind="output_format", must_keep=("Answer:",),
            role="How the reply must be laid out; the parser reads the number after 'Answer:'.")
        self.examples = Parameter(
            "counter.examples", EXAMPLES, kind="examples",
            role="Worked examples showing a correct count and the reply layout.")
        self.counter = LLMNode(
            "counter", [self.instruction, self.output_format, self.examples],
            template="{{instruction}}\n{{output_format}}\n\nExample:\n{{examples}}\n\nQuestion: {{question}}\nReasoning:",
            parse=parse_count,
        )

    def forward(self, sample: dict) -> Value:
        return self.counter(question=sample["question"])


def load(data_dir: Path = DATA_DIR / "object_counting") -> Task:
    rows = read_jsonl(data_dir / "object_counting.jsonl", required=("question", "answer"))
    for i, row in enumerate(rows):
        row["id"] = f"oc-{i:03d}"
    train, val, test = seeded_split(rows, (50, 100, 100))
    return Task("object_counting", ObjectCounting(), Loss(integer_match, "integer_match"),
                {"train": train, "val": val, "test": test}, tau=1.0)
