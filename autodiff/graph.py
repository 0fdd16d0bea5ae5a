"""Nodes and tracing. A pipeline is ordinary Python; calling a node inside a traced run records
one invocation (with its call index) in the sample's trace, so loops and branches unroll into
the graph that backward walks.

Each node kind says right here how gradients flow through it (see `autodiff.backward`):
LLM nodes ask the backward engine, function nodes hand gradients on unchanged.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from autodiff.errors import ConfigError, LLMError, LLMFatalError
from autodiff.llm.client import LLM
from autodiff.llm.types import CallContext
from autodiff.parameter import Parameter
from autodiff.records import InputRef, Invocation, Trace


@dataclass(frozen=True)
class Value:
    """What a node returns: the data plus the invocation that produced it (the graph edge)."""

    data: Any
    source: str | None = None
    node: str | None = None

    def __str__(self) -> str:
        return to_text(self.data)


def to_text(data: Any) -> str:
    if isinstance(data, Value):
        return to_text(data.data)
    if isinstance(data, str):
        return data
    if isinstance(data, (list, tuple)):
        return "\n".join(f"[{i + 1}] {to_text(x)}" for i, x in enumerate(data))
    return str(data)


@dataclass
class Runtime:
    """Everything one sample's forward pass needs, set explicitly by whoever runs the pipeline."""

    llm: LLM
    sample_id: str
    run_id: str | None = None
    step: int | None = None
    phase: str = "forward"
    overrides: Mapping[str, str] = field(default_factory=dict)
    trace: Trace | None = None
    _counts: Counter = field(default_factory=Counter)

    def value_of(self, parameter: Parameter) -> str:
        return self.overrides.get(parameter.name, parameter.value)

    def record(self, **fields: Any) -> Invocation:
        node = fields["node"]
        inv = Invocation(
            id=uuid.uuid4().hex, sample_id=self.sample_id, call_index=self._counts[node],
            seq=len(self.trace.invocations) if self.trace else 0, **fields,
        )
        self._counts[node] += 1
        if self.trace is not None:
            self.trace.invocations.append(inv)
        return inv

    def next_call_index(self, node: str) -> int:
        return self._counts[node]


_RUNTIME: contextvars.ContextVar[Runtime | None] = contextvars.ContextVar("autodiff_runtime", default=None)


def current_runtime() -> Runtime:
    rt = _RUNTIME.get()
    if rt is None:
        raise ConfigError("a node was called outside a run: use autodiff.run_sample(pipeline, sample, llm)")
    return rt


def activate(runtime: Runtime) -> contextvars.Token:
    return _RUNTIME.set(runtime)


def deactivate(token: contextvars.Token) -> None:
    _RUNTIME.reset(token)


def _input_ref(name: str, arg: Any) -> InputRef:
    if isinstance(arg, Value):
        return InputRef(name, to_text(arg.data), arg.source)
    return InputRef(name, to_text(arg), None)


def _raw(arg: Any) -> Any:
    return arg.data if isinstance(arg, Value) else arg


class FunctionNode:
    """Plain code in the graph: nothing to train, gradients pass through it unchanged."""

    node_type = "function"

    def __init__(self, fn: Callable[..., Any], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        functools.update_wrapper(self, fn)
        self._arg_names = _positional_names(fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Value:
        rt = current_runtime()
        names = self._arg_names
        refs = [_input_ref(names[i] if i < len(names) else f"arg{i}", a) for i, a in enumerate(args)]
        refs += [_input_ref(k, v) for k, v in kwargs.items()]
        result = self.fn(*[_raw(a) for a in args], **{k: _raw(v) for k, v in kwargs.items()})
        inv = rt.record(node=self.name, node_type="function", inputs=tuple(refs), output=to_text(result))
        return Value(result, inv.id, self.name)


def _positional_names(fn: Callable[..., Any]) -> list[str]:
    """Names of the arguments a call can pass by position (no `self` for a bound method, and
    partials and callable objects work too)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some built-ins have no signature
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def function_node(fn: Callable[..., Any] | None = None, *, name: str | None = None):
    """`@function_node` turns any callable into a traced function node."""
    if fn is None:
        return lambda f: FunctionNode(f, name)
    return FunctionNode(fn, name)


_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.]*)\s*\}\}")


class LLMNode:
    """An LLM call whose prompt is built from peer parameters plus inputs.

    `template` uses `{{name}}` placeholders for parameters (by their short name, the part after
    the last '.') and for inputs. Without a template the peers come first, then each input as
    `Name: value`. `parse` turns the reply text into the node's output data.
    """

    node_type = "llm"

    def __init__(
        self,
        name: str,
        parameters: Sequence[Parameter],
        template: str | None = None,
        parse: Callable[[str], Any] | None = None,
        max_tokens: int = 256,
    ):
        self.name = name
        self.parameters = list(parameters)
        self.template = template
        self.parse = parse or (lambda text: text.strip())
        self.max_tokens = max_tokens
        names = [p.name for p in self.parameters]
        for p in self.parameters:
            p.node = name
            p.peers = [n for n in names if n != p.name]
        if template is not None:
            known = {short_name(p.name) for p in self.parameters}
            self._inputs = [m for m in _PLACEHOLDER.findall(template) if m not in known]

    def render(self, rt: Runtime, inputs: Mapping[str, Any]) -> str:
        values = {short_name(p.name): rt.value_of(p) for p in self.parameters}
        texts = {k: to_text(v) for k, v in inputs.items()}
        if self.template is None:
            peers = "\n\n".join(values.values())
            fields = "\n".join(f"{k.replace('_', ' ').capitalize()}: {v}" for k, v in texts.items())
            return f"{peers}\n\n{fields}".strip()
        missing = [m for m in self._inputs if m not in texts]
        if missing:
            raise ConfigError(f"node {self.name!r}: template needs inputs {missing} that were not given")
        merged = {**texts, **values}
        return _PLACEHOLDER.sub(lambda m: merged[m.group(1)], self.template)

    def __call__(self, **inputs: Any) -> Value:
        rt = current_runtime()
        prompt = self.render(rt, inputs)
        ctx = CallContext(
            run_id=rt.run_id, step=rt.step, phase=rt.phase, node=self.name, sample_id=rt.sample_id,
            call_index=rt.next_call_index(self.name), role="forward",
        )
        record = functools.partial(
            rt.record, node=self.name, node_type="llm", inputs=tuple(_input_ref(k, v) for k, v in inputs.items()),
            parameters=tuple((p.name, rt.value_of(p)) for p in self.parameters), prompt=prompt,
        )
        try:
            reply = rt.llm.complete(prompt, ctx, max_tokens=self.max_tokens, validate=self.parse)
        except LLMFatalError:
            raise
        except LLMError as exc:
            # A provider fault is not the model's answer: the sample stops here, unscored, and the
            # run goes on (see autodiff.pipeline.run_sample).
            record(output="", error=str(exc))
            raise
        error = None
        try:
            data = self.parse(reply.text)
        except Exception as exc:  # a parser fault is the model's garbage, not ours: scored as given
            data, error = "", f"could not parse reply: {exc}"
        if reply.cut_off:
            note = f"reply cut off at the token limit ({self.max_tokens} tokens)"
            error = f"{error}; {note}" if error else note
        inv = record(output=to_text(data), llm_call_id=reply.call_id, error=error)
        return Value(data, inv.id, self.name)


def short_name(name: str) -> str:
    return name.rsplit(".", 1)[-1]


class Loss:
    """Scores a prediction against the gold answer with an evaluation function returning [0, 1]."""

    node_type = "loss"

    def __init__(self, metric: Callable[[Any, Any], float], name: str = "loss"):
        self.metric = metric
        self.name = name

    def __call__(self, prediction: Value, gold: Any) -> float:
        rt = current_runtime()
        score = float(self.metric(_raw(prediction), gold))
        if not 0.0 <= score <= 1.0:
            raise ConfigError(f"metric {getattr(self.metric, '__name__', self.metric)!r} returned {score}, outside [0, 1]")
        rt.record(
            node=self.name, node_type="loss",
            inputs=(_input_ref("prediction", prediction), InputRef("gold", to_text(gold))),
            output=f"{score:.3f}", score=score,
        )
        return score
