"""Pipelines and tasks. A pipeline is a class whose forward() is ordinary Python over nodes;
its parameters are found by walking its attributes (named by the parameters themselves)."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from autodiff.errors import BudgetExceeded, ConfigError, DataError, LLMError, LLMFatalError, LLMTransientError
from autodiff.graph import (
    MAX_NODE_CALLS, FunctionNode, LLMNode, Loss, Runtime, UserCodeError, Value, activate, deactivate, failure_details,
    to_text,
)
from autodiff.llm.client import LLM, RetryPolicy
from autodiff.llm.fake import FakeProvider
from autodiff.parameter import Parameter
from autodiff.records import Evaluation, Trace

if TYPE_CHECKING:  # the store imports records only; no cycle at run time
    from autodiff.store import Store


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

    def __call__(self, sample: dict, llm: Any) -> Any:
        """Run the pipeline on one input with its current values and return the output data (not
        a Value). Nothing is traced, scored or stored, so the sample needs no gold answer or id.

        `llm` is an `autodiff.llm.client.LLM`, a provider object (e.g. `autodiff.ScriptedModel`),
        or a model spec such as "local:smollm2" or "openai:gpt-4o-mini" for which a provider is
        built on each call, with no cache (for many inputs build the LLM once and pass it). A provider fault raises its LLMError: there is no
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
        if not isinstance(llm, LLM):  # a provider object, e.g. autodiff.ScriptedModel
            llm = LLM(f"{llm.name}:object", llm, role="forward")
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
    """A pipeline plus its data and metric, checked when built (see `check_pipeline`, `check_data`).

    `splits` maps a split name ("train", "val", "test") to a list of sample dicts. Every sample
    has a string "id", the `gold_key` (the expected answer) and each of `input_keys` (what
    forward() reads; the backward and optimizer prompts show them). Ids are unique within a
    split, and across splits an id means one sample: `sample_index()` merges the splits by id, so
    two different samples sharing an id would be mixed up (the same sample may sit in two splits).
    A problem raises one DataError naming the split, the sample's position and the key.
    """

    name: str
    pipeline: Pipeline
    loss: Loss
    splits: dict[str, list[dict]]
    gold_key: str = "answer"
    input_keys: tuple[str, ...] = ("question",)
    tau: float = 1.0
    metrics: dict[str, Callable[[Any, Any], float]] = field(default_factory=dict)
    # Node calls one sample's forward pass may make; more is an error of that sample (a loop
    # that does not end), not calls paid for ever (graph.MAX_NODE_CALLS).
    max_node_calls: int = MAX_NODE_CALLS

    def __post_init__(self) -> None:
        if isinstance(self.input_keys, str):  # input_keys="question" means one key, not eight letters
            self.input_keys = (self.input_keys,)
        check_pipeline(self.pipeline, self.loss)
        check_data(self)

    def gold(self, sample: dict) -> Any:
        return sample[self.gold_key]

    def describe_input(self, sample: dict) -> str:
        return "\n".join(f"{k}: {to_text(sample[k])}" for k in self.input_keys if k in sample)

    def sample_index(self) -> dict[str, dict]:
        return {s["id"]: s for split in self.splits.values() for s in split}


def run_sample(
    task: Task, sample: dict, llm: LLM, *, run_id: str | None = None, step: int | None = None,
    phase: str = "forward", overrides: dict[str, str] | None = None, proposal_id: str | None = None,
) -> tuple[Trace, Evaluation]:
    """Run the pipeline on one sample with tracing on, then score it with the task's loss.

    A provider fault (LLMError after retries) or an exception of the user's code (UserCodeError:
    a function node, a parser, the metric, forward() itself) makes the sample an error: the
    evaluation has no score and says why, never a 0. LLMFatalError, ConfigError and
    BudgetExceeded propagate: they must stop the run."""
    trace = Trace(sample_id=sample["id"])
    rt = Runtime(llm=llm, sample_id=sample["id"], run_id=run_id, step=step, phase=phase,
                 overrides=overrides or {}, trace=trace, proposal_id=proposal_id, max_node_calls=task.max_node_calls)
    gold = to_text(task.gold(sample))
    prediction: Value | None = None
    token = activate(rt)
    try:
        prediction = _forward(task.pipeline, sample)
        if not isinstance(prediction, Value):
            prediction = Value(prediction)
        score = task.loss(prediction, task.gold(sample))
    except LLMFatalError:
        raise
    except (LLMError, UserCodeError) as exc:
        # A call failed after its retries, or the user's code raised: the sample is an error,
        # never a wrong answer (the failing invocation, traceback included, is in the trace).
        trace.error = str(exc) if isinstance(exc, UserCodeError) else f"{type(exc).__name__}: {exc}"
        shown = to_text(prediction.data) if isinstance(prediction, Value) else ""
        return trace, Evaluation(sample["id"], shown, gold, None, trace.error)
    finally:
        deactivate(token)
    errors = [i.error for i in trace.invocations if i.error]
    return trace, Evaluation(sample["id"], to_text(prediction.data), gold, score, "; ".join(errors) or None)


def may_pass(evaluation: Evaluation) -> bool:
    """Whether `evaluation` (as `run_sample` made it) errored on a fault that may go away when the
    sample is asked again: a provider's rate limit, server error, time-out, dropped connection or
    garbage body that outlasted the call's retries (LLMTransientError). Not an empty reply, a
    prompt too long for the context window or an error of your code: asked again, they come back
    the same (and are paid again)."""
    return evaluation.errored and (evaluation.error or "").startswith(f"{LLMTransientError.__name__}:")


def _forward(pipeline: Pipeline, sample: dict) -> Any:
    """`pipeline.forward(sample)` inside an active runtime. An exception raised by forward()'s
    own code (not by a node, which records its own failure) is a UserCodeError of the sample,
    naming forward() and where it was raised (forward() has no invocation to keep a traceback)."""
    try:
        return pipeline.forward(sample)
    except (ConfigError, LLMError, UserCodeError, BudgetExceeded):
        raise
    except Exception as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        at = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if len(frames) > 1 else ""
        sample_id = str(sample.get("id", "?"))
        raise UserCodeError(f"{type(pipeline).__name__}.forward()", sample_id, exc, failure_details(exc), at) from exc


# --- checks: the pipeline, the data, and that training can reach the output ---------------------

def check_pipeline(pipeline: Pipeline, loss: Loss | None = None) -> None:
    """Refuse names that would mix things up, with a ConfigError naming the clash:

    - two nodes with one name (an LLM node and a function node included, and the loss): calls
      are counted and recorded by node name, so they would share one call counter;
    - two parameters with one name (see `Pipeline.parameters`);
    - a parameter used by two LLM nodes: sharing is refused, as a parameter's gradients, peers
      and proposals belong to one node; give each node its own Parameter.

    (Two parameters of one node sharing a placeholder name are refused when the LLMNode is built.)
    """
    if not isinstance(pipeline, Pipeline):
        raise ConfigError(f"a Task needs an autodiff Pipeline, not {type(pipeline).__name__}")
    if type(pipeline).forward is Pipeline.forward:
        raise ConfigError(f"pipeline {type(pipeline).__name__} does not define forward(sample)")
    if loss is not None and not isinstance(loss, Loss):
        raise ConfigError(f"a Task's loss must be a Loss, not {type(loss).__name__}: wrap your metric, "
                          "e.g. Loss(exact_match, 'exact_match')")
    nodes: list[LLMNode | FunctionNode] = []
    for node in pipeline.nodes():
        if not any(node is n for n in nodes):  # one node held by two attributes is one node
            nodes.append(node)
    named: dict[str, LLMNode | FunctionNode] = {}
    for node in nodes:
        other = named.setdefault(node.name, node)
        if other is not node:
            raise ConfigError(f"two nodes are named {node.name!r}: {_describe_node(other)} and "
                              f"{_describe_node(node)}; a name's calls share one call counter: rename one")
    if loss is not None and loss.name in named:
        raise ConfigError(f"the loss is named {loss.name!r}, like {_describe_node(named[loss.name])}: "
                          "give the loss another name, e.g. Loss(metric, name='score')")
    pipeline.parameters()  # refuses two parameters with one name
    users: dict[int, list[str]] = {}
    for node in nodes:
        for p in getattr(node, "parameters", []):
            users.setdefault(id(p), []).append(node.name)
            if len(users[id(p)]) > 1:
                first, second = users[id(p)][:2]
                raise ConfigError(
                    f"parameter {p.name!r} is used by LLM nodes {first!r} and {second!r}: sharing a parameter "
                    "is refused (its gradients, peers and proposals belong to one node); give each node its own"
                )


def _describe_node(node: LLMNode | FunctionNode) -> str:
    if isinstance(node, FunctionNode):
        fn = getattr(node.fn, "__qualname__", None) or type(node.fn).__name__
        return f"a function node (wrapping {fn})"
    return "an LLM node"


MAX_SHOWN_PROBLEMS = 5


SPLITS = ("train", "val", "test")


def check_splits(task: Task) -> None:
    """A task to train needs non-empty "train", "val" and "test" splits and no others (a "dev"
    split would be silently unused). Raises DataError naming what is missing, empty or unknown."""
    problems = [f"no {name!r} split" for name in SPLITS if name not in task.splits]
    problems += [f"the {name!r} split is empty" for name in SPLITS if name in task.splits and not task.splits[name]]
    unknown = [name for name in task.splits if name not in SPLITS]
    if unknown:
        problems.append(f"unknown splits {unknown} (the splits are {', '.join(SPLITS)})")
    if problems:
        raise DataError(f"task {task.name!r} cannot be trained: {'; '.join(problems)}. Give lists of samples for "
                        f"train (mini-batches), val (choosing proposals) and test (reporting)")


def check_data(task: Task) -> None:
    """Refuse samples the run cannot use, with one DataError listing the first few problems (and
    how many there are in all): a split that is not a list of dicts, a sample without a string
    "id", an id used by two different samples, or a missing `gold_key` or input key."""
    if not isinstance(task.splits, dict):
        raise DataError(f"task {task.name!r}: splits must be a dict of split name -> list of sample dicts, "
                        f"not {type(task.splits).__name__}")
    problems: list[str] = []
    seen: dict[str, tuple[str, int, dict]] = {}
    for split, samples in task.splits.items():
        if not isinstance(samples, (list, tuple)):
            problems.append(f"split {split!r} is a {type(samples).__name__}, not a list of sample dicts")
            continue
        for i, sample in enumerate(samples):
            problems += _sample_problems(task, split, i, sample, seen)
    if problems:
        shown = "\n".join(f"- {p}" for p in problems[:MAX_SHOWN_PROBLEMS])
        more = f"\n(and {len(problems) - MAX_SHOWN_PROBLEMS} more)" if len(problems) > MAX_SHOWN_PROBLEMS else ""
        count = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
        raise DataError(f"task {task.name!r}: {count} in the samples:\n{shown}{more}")


def _sample_problems(task: Task, split: str, i: int, sample: Any, seen: dict[str, tuple[str, int, dict]]) -> list[str]:
    where = f"split {split!r}, sample {i}"
    if not isinstance(sample, dict):
        return [f"{where} is a {type(sample).__name__}, not a dict"]
    keys = ", ".join(map(str, sample)) or "none"
    out = []
    sid = sample.get("id")
    if sid is None:
        out.append(f"{where} has no 'id': give every sample a unique string id (e.g. '{split}-{i}')")
    elif not isinstance(sid, str) or not sid:
        out.append(f"{where}: id {sid!r} is not a non-empty string; runs store ids as text: use str(...)")
    else:
        where = f"{where} (id {sid!r})"
        if sid in seen and seen[sid][2] != sample:
            first_split, first_i, _ = seen[sid]
            out.append(f"{where}: split {first_split!r}, sample {first_i} has the same id but is another sample; "
                       "ids must be unique across all splits (the run looks samples up by id)")
        seen.setdefault(sid, (split, i, sample))
    if task.gold_key not in sample:
        out.append(f"{where} has no {task.gold_key!r} (the gold_key): set gold_key= to the key that holds the "
                   f"expected answer (its keys: {keys})")
    for key in task.input_keys:
        if key not in sample:
            out.append(f"{where} has no {key!r} (one of input_keys): set input_keys= to the keys forward() "
                       f"reads (its keys: {keys})")
    for path, text in _unencodable(sample):
        out.append(f"{where}: {path} is not valid Unicode text ({text!r} holds a lone surrogate, as bytes that "
                   "were not UTF-8 decode to with errors='surrogateescape'): read the file with its real encoding, "
                   "or decode with errors='replace'")
    return out


def _unencodable(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(where, the text) for each string in `value` (a sample: dicts, lists and tuples followed)
    that cannot be written as UTF-8, which the store, the response cache and every provider need;
    where is a key path such as "'passages'[2]" ("key" for a dict key)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            yield path or "the value", value[:40]
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _unencodable(key, f"{path}{key!r} (key)")
            yield from _unencodable(item, f"{path}{key!r}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _unencodable(item, f"{path}[{i}]")


CHECK_REPLY = "ok"  # what every LLM node hears in check_connected's dry run


def check_connected(task: Task) -> None:
    """Refuse, before anything is spent, a task whose forward() output no trainable parameter
    feeds: training could never change its score.

    forward() runs once on the first train sample (or the first sample of any split) with a
    scripted model that answers every call with CHECK_REPLY: no provider, cache or store is
    touched (code of yours that calls a provider directly, not through a node, still would).
    The returned Value's sources are followed back through the trace to an LLM call with a
    trainable parameter. ConfigError when forward() returned a plain value or when no such call
    feeds the output, or when the pipeline has no trainable parameter at all. An error of your
    code during this dry run (a parser or function that cannot handle the scripted reply) means
    "cannot tell": the check passes and the run shows that error on the samples it hits. One
    sample decides, so a branch the first sample does not take is not checked.
    """
    trainable = [p.name for p in task.pipeline.parameters() if p.trainable]
    if not trainable:
        raise ConfigError(f"task {task.name!r}: the pipeline has no trainable parameter, so training has "
                          "nothing to change (Parameter(..., trainable=True) is the default)")
    sample = next((s for split in ("train", *task.splits) for s in task.splits.get(split, [])), None)
    if sample is None:
        return
    llm = LLM("fake:check", FakeProvider(CHECK_REPLY), retry=RetryPolicy(attempts=1, initial_wait=0, max_wait=0))
    trace = Trace(sample_id=sample["id"])
    token = activate(Runtime(llm=llm, sample_id=sample["id"], phase="check", trace=trace,
                             max_node_calls=task.max_node_calls))
    try:
        output = _forward(task.pipeline, sample)
    except LLMFatalError:
        raise
    except (UserCodeError, LLMError):
        return  # cannot tell from a scripted reply; the run will show the error where it happens
    finally:
        deactivate(token)
    problem = _disconnection(output, trace, trainable)
    if problem:
        raise ConfigError(f"task {task.name!r}: {problem} (found by a dry run of forward() on sample "
                          f"{sample['id']!r} with scripted replies)")


def _disconnection(output: Any, trace: Trace, trainable: list[str]) -> str | None:
    """Why no trainable parameter feeds `output`, or None when one does."""
    dropped = "an f-string, str() or .data drops the link to the node that made a value"
    if not isinstance(output, Value):
        return (f"forward() returned a plain {type(output).__name__}, not a node's output, so no feedback can "
                f"reach a parameter: return the Value a node gave back ({dropped})")
    by_id = {inv.id: inv for inv in trace.invocations}
    if output.source not in by_id:
        return "forward() returned a Value that no node made in this call of forward(): return a node's output"
    reached: list[str] = []
    stack, seen = [output.source], []
    while stack:
        inv = by_id.get(stack.pop())
        if inv is None or inv.id in seen:
            continue
        seen.append(inv.id)
        if inv.node_type == "llm":
            if any(name in trainable for name, _ in inv.parameters):
                return None
            reached.append(inv.node)
        stack.extend(ref.source for ref in inv.inputs if ref.source)
    producer = by_id[output.source]
    kind = "LLM node" if producer.node_type == "llm" else "function node"
    why = (f"; the LLM nodes feeding it ({', '.join(dict.fromkeys(reached))}) have no trainable parameter "
           "that Pipeline.parameters() finds" if reached else "")
    unused = [i.node for i in trace.invocations if i.node_type == "llm" and i.node not in reached
              and any(name in trainable for name, _ in i.parameters)]
    hint = (f"; LLM node(s) {', '.join(repr(n) for n in dict.fromkeys(unused))} ran but do not feed it: pass "
            f"their output on as a node input ({dropped})" if unused else "")
    return f"the output comes from {kind} {producer.node!r}, which no trainable parameter feeds{why}{hint}"
