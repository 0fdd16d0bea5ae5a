"""The pipeline graph model, built from stored traces and gradients (drawn by dashboard/graphview.py).

One vertex per node name (not per invocation), one per parameter attached to its LLM node.
Edges go from producer node to consumer node, aggregated over samples; when a node runs more
than once per sample, each edge carries the (producer call, consumer call) index pairs it was
seen with, so query_generator#0 -> retrieve#0 -> query_generator#1 reads off them.
Vertices count the failing samples whose feedback targeted them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import networkx as nx

from autodiff import metrics
from autodiff.records import Gradient, Invocation, ParameterSpec, Step


def node_id(name: str) -> str:
    return f"node:{name}"


def parameter_id(name: str) -> str:
    return f"param:{name}"


def is_failing(gradient: Gradient, tau: float = 1.0) -> bool:
    """Feedback from a sample that scored below tau (human feedback has no score: not counted)."""
    return metrics.is_failing(gradient.score, tau)


run_tau = metrics.run_tau  # one definition of the run's threshold, shared with the figures


# --- the graph ---------------------------------------------------------------------------------

def build_graph(
    invocations: Sequence[Invocation], gradients: Sequence[Gradient] = (), parameters: Sequence[ParameterSpec] = (),
    tau: float = 1.0,
) -> nx.DiGraph:
    """The aggregated pipeline graph of the given invocations, annotated with the given gradients.

    Vertex attributes: kind (llm/function/loss/parameter), name, node (the owning node, for
    parameters), value (a parameter's value as these invocations used it), calls (call indices
    seen), samples, invocations, failing (samples below tau whose feedback targeted it: samples,
    like the loss, not feedback messages), feedback (all gradients that did), and for the loss
    failed_samples (`metrics.is_failing`, as every page counts them). Edge attributes: kind
    (data/parameter), calls ((producer, consumer) call-index pairs), repeated (an end runs more
    than once per sample), samples, inputs.
    """
    g = nx.DiGraph()
    by_id = {inv.id: inv for inv in invocations}
    calls: dict[str, set[int]] = defaultdict(set)
    samples: dict[str, set[str]] = defaultdict(set)
    counts: dict[str, int] = defaultdict(int)
    failed_samples: dict[str, set[str]] = defaultdict(set)
    for inv in invocations:
        name = inv.node
        if not g.has_node(node_id(name)):
            g.add_node(node_id(name), kind=inv.node_type, name=name, node=name)
        calls[name].add(inv.call_index)
        samples[name].add(inv.sample_id)
        counts[name] += 1
        if inv.node_type == "loss" and metrics.is_failing(inv.score, tau):
            failed_samples[name].add(inv.sample_id)
        for ref in inv.inputs:
            producer = by_id.get(ref.source) if ref.source else None
            if producer is not None:
                _add_data_edge(g, producer, inv, ref.name)
        for pname, value in inv.parameters:
            _attach_parameter(g, pname, name)
            g.nodes[parameter_id(pname)]["value"] = value  # as this step ran it
    for p in parameters:
        if p.node and g.has_node(node_id(p.node)):
            _attach_parameter(g, p.name, p.node, trainable=p.trainable)
    for v, data in g.nodes(data=True):
        name = data["name"]
        data.setdefault("failing", 0)
        data.setdefault("feedback", 0)
        if data["kind"] != "parameter":
            data.update(calls=sorted(calls[name]), samples=len(samples[name]), invocations=counts[name])
        if data["kind"] == "loss":
            data["failed_samples"] = len(failed_samples[name])
    failing: dict[str, set] = defaultdict(set)  # vertex -> failing samples whose feedback reached it
    for grad in gradients:
        v = parameter_id(grad.target) if grad.target_type == "parameter" else node_id(grad.target)
        if g.has_node(v):
            g.nodes[v]["feedback"] += 1
            if is_failing(grad, tau):
                failing[v].add(grad.sample_id)
    for v, samples_failing in failing.items():
        g.nodes[v]["failing"] = len(samples_failing)
    for u, v, data in g.edges(data=True):
        if data["kind"] == "data":
            data["repeated"] = len(calls[g.nodes[u]["name"]]) > 1 or len(calls[g.nodes[v]["name"]]) > 1
            data["samples"] = len(data.pop("sample_set"))
            data["calls"] = sorted(data["calls"])
            data["inputs"] = sorted(data["inputs"])
    return g


def _add_data_edge(g: nx.DiGraph, producer: Invocation, consumer: Invocation, input_name: str) -> None:
    u, v = node_id(producer.node), node_id(consumer.node)
    if not g.has_edge(u, v):
        g.add_edge(u, v, kind="data", calls=set(), sample_set=set(), inputs=set())
    data = g.edges[u, v]
    data["calls"].add((producer.call_index, consumer.call_index))
    data["sample_set"].add(consumer.sample_id)
    data["inputs"].add(input_name)


def _attach_parameter(g: nx.DiGraph, name: str, node: str, trainable: bool | None = None) -> None:
    pid = parameter_id(name)
    if not g.has_node(pid):
        g.add_node(pid, kind="parameter", name=name, node=node, trainable=True)
        g.add_edge(pid, node_id(node), kind="parameter")
    if trainable is not None:
        g.nodes[pid]["trainable"] = bool(trainable)


def node_names(g: nx.DiGraph) -> list[str]:
    """Pipeline node names (not parameters), in the order they first ran."""
    return [d["name"] for _v, d in g.nodes(data=True) if d["kind"] != "parameter"]


# --- what the pages choose among ----------------------------------------------------------------

def targets_of(node: str, parameters: Sequence[ParameterSpec]) -> list[str]:
    """What feedback on a node can target: its output and each of its parameters (the `targets` of
    `Store.find_gradients`)."""
    return [node, *(p.name for p in parameters if p.node == node)]


def trained_steps(steps: Sequence[Step]) -> list[int]:
    """Steps that ran a training batch (step 0 only scores the initial prompts)."""
    return [s.step for s in steps if s.batch]
