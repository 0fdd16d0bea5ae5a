"""Pipelines and tasks. A pipeline is a class whose forward() is ordinary Python over nodes;
its parameters are found by walking its attributes (named by the parameters themselves)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from autodiff.errors import ConfigError, LLMError, LLMFatalError
from autodiff.graph import FunctionNode, LLMNode, Loss, Runtime, Value, activate, deactivate, to_text
from autodiff.llm.client import LLM
from autodiff.parameter import Parameter
from autodiff.records import Evaluation, Trace


class Pipeline:
    """Subclass it: build nodes in __init__, write forward(sample) -> Value."""

    def forward(self, sample: dict) -> Value:  # pragma: no cover - abstract
        raise NotImplementedError

    def nodes(self) -> list[LLMNode | FunctionNode]:
        return list(_walk_nodes(vars(self)))

    def parameters(self) -> list[Parameter]:
        seen: list[Parameter] = []
        for node in self.nodes():
            for p in getattr(node, "parameters", []):
                if p not in seen:
                    seen.append(p)
        for value in vars(self).values():
            if isinstance(value, Parameter) and value not in seen:
                seen.append(value)
        names = [p.name for p in seen]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"parameter names must be unique in a pipeline; repeated: {dupes}")
        return seen


def _walk_nodes(values: dict) -> Iterator[LLMNode | FunctionNode]:
    for value in values.values():
        if isinstance(value, (LLMNode, FunctionNode)):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _walk_nodes(dict(enumerate(value)))
        elif isinstance(value, dict):
            yield from _walk_nodes(value)


@dataclass
class Task:
    """A pipeline plus its data and metric. Samples are dicts with a unique "id"."""

    name: str
    pipeline: Pipeline
    loss: Loss
    splits: dict[str, list[dict]]
    gold_key: str = "answer"
    input_keys: tuple[str, ...] = ("question",)
    tau: float = 1.0
    metrics: dict[str, Callable[[Any, Any], float]] = field(default_factory=dict)

    def gold(self, sample: dict) -> Any:
        return sample[self.gold_key]

    def describe_input(self, sample: dict) -> str:
        return "\n".join(f"{k}: {to_text(sample[k])}" for k in self.input_keys if k in sample)

    def sample_index(self) -> dict[str, dict]:
        return {s["id"]: s for split in self.splits.values() for s in split}


def run_sample(
    task: Task, sample: dict, llm: LLM, *, run_id: str | None = None, step: int | None = None,
    phase: str = "forward", overrides: dict[str, str] | None = None,
) -> tuple[Trace, Evaluation]:
    """Run the pipeline on one sample with tracing on, then score it with the task's loss."""
    trace = Trace(sample_id=sample["id"])
    rt = Runtime(llm=llm, sample_id=sample["id"], run_id=run_id, step=step, phase=phase,
                 overrides=overrides or {}, trace=trace)
    gold = to_text(task.gold(sample))
    token = activate(rt)
    try:
        prediction = task.pipeline.forward(sample)
        if not isinstance(prediction, Value):
            prediction = Value(prediction)
        score = task.loss(prediction, task.gold(sample))
    except LLMFatalError:
        raise
    except LLMError as exc:
        # A call failed after its retries: the sample is an error, never a wrong answer.
        trace.error = f"{type(exc).__name__}: {exc}"
        return trace, Evaluation(sample["id"], "", gold, None, trace.error)
    finally:
        deactivate(token)
    errors = [i.error for i in trace.invocations if i.error]
    return trace, Evaluation(sample["id"], to_text(prediction.data), gold, score, "; ".join(errors) or None)
