"""Your own pipeline: two LLM nodes and a function, trained like a built-in task.

    autodiff train examples/summarize_then_answer.py:make_task --model fake:x --steps 1
"""
from autodiff import LLMNode, Loss, Parameter, Pipeline, Task, function_node
from autodiff.evals import exact_match, f1
from autodiff.tasks.hotpotqa import load_splits, parse_answer


def clip(notes: str) -> str:
    """Plain code between the LLM calls: keep the notes short."""
    return " ".join(notes.split()[:80])


class SummarizeThenAnswer(Pipeline):
    def __init__(self) -> None:
        self.summarizer = LLMNode("summarizer", [Parameter(
            "summarizer.instruction", "Write brief notes with only the facts from the passages that the question needs.",
            role="Tells the model which facts to keep from the passages.")],
            template="{{instruction}}\n\nPassages:\n{{passages}}\n\nQuestion: {{question}}")
        self.clip = function_node(clip)
        self.answerer = LLMNode("answerer", [Parameter(
            "answerer.instruction", "Answer the question from the notes. End with a line 'Answer: <short answer>'.",
            role="Tells the model how to answer and lay out its reply.", must_keep=("Answer:",))],
            template="{{instruction}}\n\nNotes: {{notes}}\n\nQuestion: {{question}}", parse=parse_answer)

    def forward(self, sample: dict):
        notes = self.clip(self.summarizer(passages=sample["passages"], question=sample["question"]))
        return self.answerer(notes=notes, question=sample["question"])


def make_task() -> Task:
    return Task("summarize_then_answer", SummarizeThenAnswer(), Loss(exact_match, "exact_match"),
                load_splits(with_passages=True), metrics={"exact_match": exact_match, "f1": f1})
