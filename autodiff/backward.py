"""Backward: turn a failed sample's trace into textual gradients.

Like micrograd, one reverse walk over the trace (execution order is a topological order, so
its reverse visits every consumer before its producers). Each node kind says here how feedback
flows through it:

- loss:      the backward LLM turns prediction, expected answer and score into the first gradient;
- function:  gradients on its output are handed unchanged to the producers of its inputs,
             tagged with the function's name in their path (no LLM call);
- llm:       the backward LLM writes one gradient per trainable peer parameter and one per
             input that came from an upstream node.
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from autodiff.errors import LLMError, LLMFatalError
from autodiff.llm.client import LLM
from autodiff.llm.types import CallContext, Message
from autodiff.parameter import Parameter
from autodiff.prompts import BACKWARD_SYSTEM, LOSS_FEEDBACK, OUTPUT_FEEDBACK, PARAMETER_FEEDBACK, fill
from autodiff.records import Gradient, Invocation, Trace

MAX_FEEDBACK_CHARS = 1500
_FEEDBACK = re.compile(r"<feedback>(.*?)(?:</feedback>|$)", re.S | re.I)


@dataclass(frozen=True)
class BackwardContext:
    run_id: str | None
    step: int
    parameters: dict[str, Parameter]  # by name; only trainable ones receive gradients
    sample_input: str = ""
    gold: str = ""


def parse_feedback(text: str) -> tuple[str, str | None]:
    """(feedback, error). A reply with no usable text is an empty gradient with a reason."""
    match = _FEEDBACK.search(text or "")
    body = (match.group(1) if match else text or "").strip()
    body = re.sub(r"</?feedback>", "", body, flags=re.I).strip()  # stray tags of a half-formed reply
    if not body:
        return "", "backward reply was empty"
    if not any(ch.isalnum() for ch in body):
        return "", f"backward reply had no usable text: {body[:80]!r}"
    if len(body) > MAX_FEEDBACK_CHARS:
        body = body[:MAX_FEEDBACK_CHARS].rstrip() + " [...]"
    return body, None


def usable(g: Gradient) -> bool:
    """Whether gradient `g` may be read as feedback: by the backward call of the node upstream
    and by the optimizer. A gradient with an error (its backward call failed, its reply was empty
    or cut off at the token limit, so its text, if any, stops mid-sentence) is kept on the record
    and shown with its reason, but never read."""
    return bool(g.text) and not g.error


def backward(trace: Trace, llm: LLM, ctx: BackwardContext, workers: int = 4) -> list[Gradient]:
    """All gradients of one sample, in the order they were written."""
    loss = trace.loss
    if loss is None:
        return []
    on_output: dict[str, list[Gradient]] = defaultdict(list)
    written: list[Gradient] = []
    first = _loss_gradient(trace, loss, llm, ctx)
    written.append(first)
    if first.target_invocation:
        on_output[first.target_invocation].append(first)
    counts = _call_counts(trace)
    node_of = {i.id: i.node for i in trace.invocations}
    call_of = {i.id: i.call_index for i in trace.invocations}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for inv in reversed(trace.invocations):
            incoming = on_output.get(inv.id)
            if not incoming or inv.node_type == "loss":
                continue
            if inv.node_type == "function":
                produced = _pass_through(inv, incoming, node_of)
            else:
                produced = _llm_node_backward(inv, incoming, llm, ctx, trace.score, counts[inv.node], node_of, pool)
            for g in produced:
                written.append(g)
                # Only usable feedback flows on: a failed or cut-off backward reply is kept on the
                # record with its reason, never handed upstream as feedback (see `usable`).
                if g.target_type == "output" and g.target_invocation and usable(g):
                    on_output[g.target_invocation].append(g)
    return [_with_about_call(g, call_of) for g in written]


def _with_about_call(g: Gradient, call_of: dict[str, int]) -> Gradient:
    """`g` with `about_call` set: the call index of the output it is about, else its own call."""
    about = call_of.get(g.target_invocation, g.call_index) if g.target_type == "output" else g.call_index
    return dataclasses.replace(g, about_call=about)


def _call_counts(trace: Trace) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for inv in trace.invocations:
        counts[inv.node] += 1
    return counts


def _loss_gradient(trace: Trace, loss: Invocation, llm: LLM, ctx: BackwardContext) -> Gradient:
    pred_ref = loss.inputs[0]
    producer = next((i for i in trace.invocations if i.id == pred_ref.source), None)
    prompt = fill(
        LOSS_FEEDBACK, score=f"{loss.score:.2f}", sample_input=ctx.sample_input or "(not shown)",
        prediction=pred_ref.text or "(empty)", expected=ctx.gold,
    )
    text, call_id, error = _ask(llm, prompt, ctx, trace.sample_id, loss.node, 0)
    return Gradient(
        id=uuid.uuid4().hex, sample_id=trace.sample_id, node=loss.node, invocation_id=loss.id, call_index=0,
        target_type="output", target=producer.node if producer else "prediction",
        target_invocation=producer.id if producer else None, score=loss.score, text=text,
        source_node=loss.node, path=(), llm_call_id=call_id, origin="loss", error=error, created_at=time.time(),
    )


def _pass_through(inv: Invocation, incoming: Sequence[Gradient], node_of: dict[str, str]) -> list[Gradient]:
    """A function node has nothing to train: hand each gradient on to every input's producer."""
    out = []
    for ref in inv.inputs:
        if ref.source is None:
            continue
        for g in incoming:
            out.append(
                Gradient(
                    id=uuid.uuid4().hex, sample_id=g.sample_id, node=inv.node, invocation_id=inv.id,
                    call_index=inv.call_index, target_type="output", target=node_of.get(ref.source, ref.name),
                    target_invocation=ref.source, score=g.score, text=g.text, source_node=g.source_node,
                    path=(*g.path, inv.node), llm_call_id=g.llm_call_id, origin=g.origin, error=g.error,
                    created_at=time.time(),
                )
            )
    return out


def _llm_node_backward(
    inv: Invocation, incoming: Sequence[Gradient], llm: LLM, ctx: BackwardContext, score: float,
    n_calls: int, node_of: dict[str, str], pool: ThreadPoolExecutor,
) -> list[Gradient]:
    feedback = "\n".join(
        f"- from {g.source_node}{' via ' + ' -> '.join(g.path) if g.path else ''}: {g.text or '(empty)'}"
        for g in incoming
    )
    call_note = (
        f"This is call {inv.call_index} (0-based) of {n_calls} successive calls of this node for one "
        "sample; judge this call only." if n_calls > 1 else "It ran once for this sample."
    )
    peers_of = {name: value for name, value in inv.parameters}
    jobs = []
    for name, value in inv.parameters:
        param = ctx.parameters.get(name)
        if param is None or not param.trainable:
            continue
        peers = "\n".join(
            f'<peer name="{n}">\n{v}\n</peer>' for n, v in peers_of.items() if n != name
        ) or "(none)"
        prompt = fill(
            PARAMETER_FEEDBACK, node=inv.node, call_note=call_note, target=name, kind=param.kind,
            role=param.role, peers=peers, prompt=inv.prompt or "", output=inv.output or "(empty)",
            score=f"{score:.2f}", feedback=feedback,
        )
        jobs.append(("parameter", name, None, prompt))
    for ref in inv.inputs:
        if ref.source is None:
            continue
        prompt = fill(
            OUTPUT_FEEDBACK, node=inv.node, call_note=call_note, input_name=ref.name, source=node_of.get(ref.source, ref.name),
            prompt=inv.prompt or "", output=inv.output or "(empty)", score=f"{score:.2f}", feedback=feedback,
        )
        jobs.append(("output", node_of.get(ref.source, ref.name), ref.source, prompt))

    def run(job: tuple[str, str, str | None, str]) -> Gradient:
        kind, target, source, prompt = job
        text, call_id, error = _ask(llm, prompt, ctx, inv.sample_id, inv.node, inv.call_index)
        return Gradient(
            id=uuid.uuid4().hex, sample_id=inv.sample_id, node=inv.node, invocation_id=inv.id,
            call_index=inv.call_index, target_type=kind, target=target, target_invocation=source, score=score,
            text=text, source_node=inv.node, path=(), llm_call_id=call_id, origin="backward", error=error,
            created_at=time.time(),
        )

    return list(pool.map(run, jobs))


def _ask(llm: LLM, prompt: str, ctx: BackwardContext, sample_id: str, node: str, call_index: int):
    call_ctx = CallContext(
        run_id=ctx.run_id, step=ctx.step, phase="backward", node=node, sample_id=sample_id,
        call_index=call_index, role="backward",
    )
    try:
        reply = llm.complete((Message("system", BACKWARD_SYSTEM), Message("user", prompt)), call_ctx,
                             validate=_require_feedback)
    except LLMFatalError:
        raise
    except LLMError as exc:
        return "", None, f"backward call failed: {exc}"
    text, error = parse_feedback(reply.text)
    if reply.cut_off and not error:
        error = "feedback cut off at the token limit"
    return text, reply.call_id, error


def _require_feedback(text: str) -> None:
    """The client's cache check: a reply with no usable feedback is not kept for a re-run."""
    if parse_feedback(text)[1]:
        raise ValueError("no usable feedback in the reply")
