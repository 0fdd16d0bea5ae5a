"""Nodes and tracing. A pipeline is ordinary Python; calling a node inside a traced run records
one invocation (with its call index) in the sample's trace, so loops and branches unroll into
the graph that backward walks.

Each node kind says right here how gradients flow through it (see `autodiff.backward`):
LLM nodes ask the backward engine, function nodes hand gradients on unchanged.

User code is isolated: when a function node, an LLM node's `parse` or the loss's metric raises,
the failing invocation is recorded (its `error` starts with "ExcType: message", then the
traceback) and `UserCodeError` ends that sample only; `autodiff.pipeline.run_sample` turns it
into an errored evaluation (no score), never a 0. `ConfigError` and `LLMError` pass through
unchanged: the first stops the run, the second is a provider fault.
"""

from __future__ import annotations

import contextvars
import decimal
import functools
import inspect
import math
import numbers
import re
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from autodiff.errors import AutodiffError, BudgetExceeded, ConfigError, LLMError, LLMFatalError
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


class UserCodeError(AutodiffError):
    """The user's code raised on one sample: a function node, an LLM node's parser, the metric
    or `forward()` itself. The sample is an error (no score, never a 0); the run goes on until
    more than `max_error_share` of a phase's samples errored, like a provider fault.

    `where` names the code ("function node 'to_int'"), `sample_id` the sample, `cause` the
    exception raised, `details` "ExcType: message" then its traceback (also kept on the failing
    invocation's `error`). The message is one line: sample, code, exception type and message."""

    def __init__(self, where: str, sample_id: str, cause: BaseException, details: str, note: str = ""):
        self.where, self.sample_id, self.cause, self.details = where, sample_id, cause, details
        super().__init__(f"sample {sample_id!r}: {where} raised {describe_exception(cause)}{note}")


# Errors that are not the user's code failing on a sample: a bad configuration stops the run, a
# provider fault is handled as one, a user-code error from a nested node is already recorded, and
# a budget reached stops the run, not the sample.
_PASS_THROUGH = (ConfigError, LLMError, UserCodeError, BudgetExceeded)


def describe_exception(exc: BaseException, limit: int = 300) -> str:
    """ "ExcType: message" on one line, the message shortened to `limit` characters."""
    message = " ".join(str(exc).split())
    if len(message) > limit:
        message = message[: limit - 3] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def failure_details(exc: BaseException, skip: int = 1) -> str:
    """What an invocation's `error` keeps of a user-code exception: "ExcType: message" as the
    first line (what a table shows), then the full traceback without our own `skip` frames."""
    tb = exc.__traceback__
    for _ in range(skip):
        tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb
    return describe_exception(exc) + "\n" + "".join(traceback.format_exception(type(exc), exc, tb)).rstrip()


def call_user_code(where: str, sample_id: str, on_failure: Callable[[str], object], fn: Callable[[], Any], *,
                   skip: int = 1, note: str = "") -> Any:
    """`fn()`; if it raises (anything but `_PASS_THROUGH`), `on_failure(details)` records the
    failing invocation and UserCodeError ends the sample. `skip` is how many of our own frames
    lead to the user's code in the traceback (left out of `details`)."""
    try:
        return fn()
    except _PASS_THROUGH:
        raise
    except Exception as exc:
        details = failure_details(exc, skip)
        on_failure(details)
        raise UserCodeError(where, sample_id, exc, details, note) from exc


# Node calls one sample's forward pass may make (LLM and function nodes, every loop turn): a loop
# that never ends is stopped here, as an error of that sample, instead of calling (and paying) on.
MAX_NODE_CALLS = 500


class NodeCallLimit(RuntimeError):
    """forward() called more nodes on one sample than `Task.max_node_calls` allows."""


@dataclass
class Runtime:
    """Everything one sample's forward pass needs, set explicitly by whoever runs the pipeline.
    `max_node_calls`: node calls the sample may make; the next one raises UserCodeError (the
    sample is an error: a loop in forward() that does not end)."""

    llm: LLM
    sample_id: str
    run_id: str | None = None
    step: int | None = None
    phase: str = "forward"
    overrides: Mapping[str, str] = field(default_factory=dict)
    trace: Trace | None = None
    proposal_id: str | None = None  # the proposal whose value is being scored (validation)
    max_node_calls: int = MAX_NODE_CALLS
    _counts: Counter = field(default_factory=Counter)
    _calls: int = 0

    def value_of(self, parameter: Parameter) -> str:
        return self.overrides.get(parameter.name, parameter.value)

    def admit(self, node: str) -> None:
        """Count a call of `node` about to run; past `max_node_calls`, raise UserCodeError before
        it runs (and before an LLM node sends its request)."""
        self._calls += 1
        if self._calls > self.max_node_calls:
            limit = NodeCallLimit(
                f"forward() called nodes {self.max_node_calls:,} times on this sample, the limit, and then "
                f"{node!r} once more (not run): a loop that does not end? If the pipeline really needs more "
                "calls, raise the limit: Task(..., max_node_calls=N)")
            raise UserCodeError("forward()", self.sample_id, limit, describe_exception(limit))

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
        rt.admit(self.name)
        names = self._arg_names
        refs = [_input_ref(names[i] if i < len(names) else f"arg{i}", a) for i, a in enumerate(args)]
        refs += [_input_ref(k, v) for k, v in kwargs.items()]
        record = functools.partial(rt.record, node=self.name, node_type="function", inputs=tuple(refs))

        def run() -> tuple[Any, str]:
            result = self.fn(*[_raw(a) for a in args], **{k: _raw(v) for k, v in kwargs.items()})
            return result, to_text(result)  # a result whose str() raises is the function's fault too

        result, text = call_user_code(f"function node {self.name!r}", rt.sample_id,
                                      lambda details: record(output="", error=details), run, skip=2)
        inv = record(output=text)
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
    `Name: value`. `parse` turns the reply text into the node's output data; if it raises, the
    sample is an error (UserCodeError naming this node), not a score: write a parser that falls
    back to something for replies it cannot read if such replies should be scored.

    Two parameters of one node may not share a short name (one placeholder could not tell them
    apart), and a parameter belongs to one node only (see `autodiff.pipeline.check_pipeline`).
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
        _check_short_names(name, self.parameters)
        names = [p.name for p in self.parameters]
        for p in self.parameters:
            p.node = name
            p.peers = [n for n in names if n != p.name]
        if template is not None:
            known = {short_name(p.name) for p in self.parameters}
            used = _PLACEHOLDER.findall(template)
            self._inputs = [m for m in used if m not in known]
            # A parameter the template never places would be trained without reaching the model.
            unplaced = [p.name for p in self.parameters if short_name(p.name) not in used]
            if unplaced:
                raise ConfigError(
                    f"node {name!r}: the template has no placeholder for parameters {unplaced}; add "
                    + ", ".join("{{" + short_name(n) + "}}" for n in unplaced) + " to it, or leave them out")

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
        rt.admit(self.name)
        prompt = self.render(rt, inputs)
        ctx = CallContext(
            run_id=rt.run_id, step=rt.step, phase=rt.phase, node=self.name, sample_id=rt.sample_id,
            call_index=rt.next_call_index(self.name), role="forward", proposal_id=rt.proposal_id,
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
        cut = f"reply cut off at the token limit ({self.max_tokens} tokens)" if reply.cut_off else None
        # The parser is user code: if it raises, the sample is an error naming this node (the
        # reply is on the call record), never an empty answer scored 0.
        data = call_user_code(
            f"the parser of LLM node {self.name!r}", rt.sample_id,
            lambda details: record(output="", llm_call_id=reply.call_id,
                                   error=f"{details}\n({cut})" if cut else details),
            lambda: self.parse(reply.text), skip=2,
            note=f"; its reply was cut off at the token limit ({self.max_tokens} tokens)" if cut else "",
        )
        inv = record(output=to_text(data), llm_call_id=reply.call_id, error=cut)
        return Value(data, inv.id, self.name)


def short_name(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _check_short_names(node: str, parameters: Sequence[Parameter]) -> None:
    """Each parameter of a node needs its own placeholder name: the part after the last '.'."""
    for i, p in enumerate(parameters):
        for q in parameters[:i]:
            if q is p:
                raise ConfigError(f"LLM node {node!r}: parameter {p.name!r} is given twice")
            if short_name(q.name) == short_name(p.name):
                raise ConfigError(
                    f"LLM node {node!r}: parameters {q.name!r} and {p.name!r} share the placeholder name "
                    f"{short_name(p.name)!r} (the part after the last '.'): rename one of them"
                )


class Loss:
    """Scores a prediction against the gold answer with an evaluation function `metric(prediction,
    gold)` that returns a number in [0, 1] (int, float; a bool counts as 0 or 1).

    A metric that returns anything else (None, a dict, a tuple, a string, NaN, a number outside
    [0, 1]) is a bug that would score every sample wrongly: ConfigError at the first sample,
    naming the metric and the value. A metric that raises fails only that sample (UserCodeError:
    the sample is an error, not a score)."""

    node_type = "loss"

    def __init__(self, metric: Callable[[Any, Any], float], name: str = "loss"):
        self.metric = metric
        self.name = name

    @property
    def label(self) -> str:
        """How messages name the metric: its function's name, and the loss's if that differs."""
        fn = getattr(self.metric, "__name__", None) or type(self.metric).__name__
        if fn == "<lambda>":
            return f"metric of loss {self.name!r}"
        return f"metric {fn!r}" + (f" (loss {self.name!r})" if fn != self.name else "")

    def __call__(self, prediction: Value, gold: Any) -> float:
        rt = current_runtime()
        record = functools.partial(
            rt.record, node=self.name, node_type="loss",
            inputs=(_input_ref("prediction", prediction), InputRef("gold", to_text(gold))),
        )
        value = call_user_code(self.label, rt.sample_id, lambda details: record(output="", error=details),
                               lambda: self.metric(_raw(prediction), gold), skip=2)
        score = self._check(value, rt.sample_id)
        record(output=f"{score:.3f}", score=score)
        return score

    def _check(self, value: Any, sample_id: str) -> float:
        if not _is_number(value):
            raise ConfigError(
                f"{self.label} returned {_short_repr(value)} ({type(value).__name__}) on sample {sample_id!r}: "
                "a metric must return a number in [0, 1]"
            )
        try:
            score = float(value)
        except (ValueError, OverflowError):  # Decimal("sNaN") and the like
            score = math.nan
        if math.isnan(score) or not 0.0 <= score <= 1.0:
            raise ConfigError(f"{self.label} returned {_short_repr(value)} on sample {sample_id!r}, outside [0, 1]")
        return score


def _is_number(value: Any) -> bool:
    """A real number: int, float, bool, Fraction, Decimal, or a numpy scalar (numpy's bool is
    not a `numbers.Real`, but `pred == gold` on numpy values gives one)."""
    if isinstance(value, (numbers.Real, decimal.Decimal)):
        return True
    return type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and hasattr(value, "__float__")


def _short_repr(value: Any, limit: int = 120) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ still gets named
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
