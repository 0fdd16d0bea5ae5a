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

    # --- state: the parameters' values (logic in autodiff.state; imported here, as it imports us) ---

    def state(self) -> dict[str, str]:
        """{parameter name: value} of every parameter, trainable or not, in pipeline order."""
        from autodiff import state

        return state.state(self)

    def load_state(self, values: Mapping[str, str], *, partial: bool = False) -> "Pipeline":
        """Set parameters from {name: value}; returns the pipeline.

        Everything is checked before anything changes: names the pipeline lacks, parameters
        missing from `values` (unless `partial=True`) and non-string values raise one ConfigError
        naming all of them, and every parameter keeps its value.

            pipeline.load_state({"toy.instruction": "Add carefully."}, partial=True)
        """
        from autodiff import state

        state.load_state(self, values, partial=partial)
        return self

    def save(self, path: str | Path) -> Path:
        """Write the state to a JSON file, atomically; returns the path. The file is
        `{"format": "autodiff.pipeline-state/1", "parameters": {name: value}}`, UTF-8, in pipeline
        order: the same document `autodiff prompts RUN` prints."""
        from autodiff import state

        return state.save(self, path)

    def load(self, path: str | Path) -> "Pipeline":
        """Set every parameter from a file written by `save` (or `autodiff prompts RUN`); returns
        the pipeline, so building and loading is one expression:

            pipeline = MyPipeline().load("best.json")

        A file that cannot be read, is not JSON, has another format, or whose names differ from
        the pipeline's raises one ConfigError naming the file and the problem; nothing changes."""
        from autodiff import state

        state.load(self, path)
        return self

    def load_run(self, store: "Store", run_id: str, step: int | str = "best") -> "Pipeline":
        """Set every parameter to its value in a run of the store at the end of `step`: "best"
        (the completed step with the highest validation score, the earliest on ties), "last" (the
        last completed step) or a step number. Returns the pipeline.

            pipeline = MyPipeline().load_run(Store(".autodiff/runs.sqlite"), "toy-20250101-1200-ab12")

        An unknown run or step raises ConfigError naming it and what exists; a run whose parameter
        names differ from the pipeline's raises one ConfigError naming every difference. Nothing
        changes on an error."""
        from autodiff import state

        state.load_run(self, store, run_id, step)
        return self

    def __call__(self, sample: dict, llm: LLM | str) -> Any:
        """Run the pipeline on one input with its current values and return the output data (not
        a Value). Nothing is traced, scored or stored, so the sample needs no gold answer or id.

        `llm` is an `autodiff.llm.client.LLM`, or a model spec such as "local:smollm2" or
        "openai:gpt-4o-mini" for which a provider is built on each call, with no cache (for many
        inputs build the LLM once and pass it). A provider fault raises its LLMError: there is no
        made-up answer. An exception in your code propagates too (a node's as UserCodeError, the
        original as its cause).

            pipeline = MyPipeline().load("best.json")
            answer = pipeline({"question": "What is 2 + 3?"}, "openai:gpt-4o-mini")

        Inside another pipeline's forward, call `sub.forward(sample)` instead, so its nodes are
        traced with the outer run.
        """
        if isinstance(llm, str):
            from autodiff.llm.registry import make_provider, provider_of

            llm = LLM(llm, make_provider(provider_of(llm)), role="forward")
        token = activate(Runtime(llm=llm, sample_id=str(sample.get("id", "input"))))
        try:
            output = self.forward(sample)
        finally:
            deactivate(token)
        return output.data if isinstance(output, Value) else output


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
