"""The pipeline graph as the dashboard draws it, built from stored traces and gradients.

One vertex per node name (not per invocation), one per parameter attached to its LLM node.
Edges go from producer node to consumer node, aggregated over samples; when a node runs more
than once per sample, each edge carries the (producer call, consumer call) index pairs it was
seen with, so query_generator#0 -> retrieve#0 -> query_generator#1 reads off the labels.
Vertices count the failing samples whose feedback targeted them.

Rendering uses pyvis with its own in-line copy of vis-network: no CDN, no Bootstrap, and every
string from an LLM or a dataset escaped for where it lands (see `render_html`).
"""

from __future__ import annotations

import functools
import html
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import networkx as nx
from pyvis.network import Network

from autodiff import metrics
from autodiff.errors import AutodiffError

NODE_STYLE = {  # shape and border colour by node kind; fill shows failing feedback
    "llm": ("box", "#1f77b4"),
    "function": ("ellipse", "#2ca02c"),
    "loss": ("diamond", "#7f7f7f"),
    "parameter": ("box", "#b8860b"),
}


def node_id(name: str) -> str:
    return f"node:{name}"


def parameter_id(name: str) -> str:
    return f"param:{name}"


def is_failing(gradient: dict, tau: float = 1.0) -> bool:
    """Feedback from a sample that scored below tau (human feedback has no score: not counted)."""
    return metrics.is_failing(gradient.get("score"), tau)


run_tau = metrics.run_tau  # one definition of the run's threshold, shared with the figures


# --- the graph ---------------------------------------------------------------------------------

def build_graph(
    invocations: Sequence[dict], gradients: Sequence[dict] = (), parameters: Sequence[dict] = (),
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
    by_id = {inv["id"]: inv for inv in invocations}
    calls: dict[str, set[int]] = defaultdict(set)
    samples: dict[str, set[str]] = defaultdict(set)
    counts: dict[str, int] = defaultdict(int)
    failed_samples: dict[str, set[str]] = defaultdict(set)
    for inv in invocations:
        name = inv["node"]
        if not g.has_node(node_id(name)):
            g.add_node(node_id(name), kind=inv["node_type"], name=name, node=name)
        calls[name].add(inv["call_index"])
        samples[name].add(inv["sample_id"])
        counts[name] += 1
        if inv["node_type"] == "loss" and metrics.is_failing(inv.get("score"), tau):
            failed_samples[name].add(inv["sample_id"])
        for input_name, _text, source in inv["inputs"]:
            producer = by_id.get(source) if source else None
            if producer is not None:
                _add_data_edge(g, producer, inv, input_name)
        for pname, value in inv.get("parameters") or ():
            _attach_parameter(g, pname, name)
            g.nodes[parameter_id(pname)]["value"] = value  # as this step ran it
    for p in parameters:
        if p.get("node") and g.has_node(node_id(p["node"])):
            _attach_parameter(g, p["name"], p["node"], trainable=p.get("trainable", True))
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
        v = parameter_id(grad["target"]) if grad["target_type"] == "parameter" else node_id(grad["target"])
        if g.has_node(v):
            g.nodes[v]["feedback"] += 1
            if is_failing(grad, tau):
                failing[v].add(grad["sample_id"])
    for v, samples_failing in failing.items():
        g.nodes[v]["failing"] = len(samples_failing)
    for u, v, data in g.edges(data=True):
        if data["kind"] == "data":
            data["repeated"] = len(calls[g.nodes[u]["name"]]) > 1 or len(calls[g.nodes[v]["name"]]) > 1
            data["samples"] = len(data.pop("sample_set"))
            data["calls"] = sorted(data["calls"])
            data["inputs"] = sorted(data["inputs"])
    return g


def _add_data_edge(g: nx.DiGraph, producer: dict, consumer: dict, input_name: str) -> None:
    u, v = node_id(producer["node"]), node_id(consumer["node"])
    if not g.has_edge(u, v):
        g.add_edge(u, v, kind="data", calls=set(), sample_set=set(), inputs=set())
    data = g.edges[u, v]
    data["calls"].add((producer["call_index"], consumer["call_index"]))
    data["sample_set"].add(consumer["sample_id"])
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


def edge_label(data: dict, limit: int = 6) -> str:
    """Call-index pairs for edges touching a repeated node ('0→0, 1→1'); empty otherwise."""
    pairs = data.get("calls") or []
    if not data.get("repeated") and all(p == (0, 0) for p in pairs):
        return ""
    shown = ", ".join(f"{a}→{b}" for a, b in pairs[:limit])
    return shown if len(pairs) <= limit else f"{shown}, … (+{len(pairs) - limit})"


def call_label(calls: Sequence[int]) -> str:
    if len(calls) <= 1:
        return ""
    return "calls " + ", ".join(str(c) for c in calls)


# --- selections the pages show -----------------------------------------------------------------

def targets_of(node: str, parameters: Sequence[dict]) -> list[str]:
    """What feedback on a node can target: its output and each of its parameters."""
    return [node, *(p["name"] for p in parameters if p.get("node") == node)]


def node_gradients(gradients: Iterable[dict], node: str, parameters: Sequence[dict] = ()) -> list[dict]:
    """Gradients that target the node's output or one of its parameters, in time order."""
    return filter_gradients(gradients, targets=targets_of(node, parameters))


def call_indices(invocations: Iterable[dict]) -> dict[str, int]:
    """Invocation id -> its call index, to say which call of a node a gradient is about."""
    return {inv["id"]: inv["call_index"] for inv in invocations}


def target_call(g: dict, calls: dict[str, int] | None = None) -> int | None:
    """The call index of what the gradient is about: the target invocation for feedback on an
    output (the stored call_index is that of the node that wrote or handed it on), else the call
    of the node whose parameter it is about."""
    if g["target_type"] == "output" and calls and g.get("target_invocation") in calls:
        return calls[g["target_invocation"]]
    return g["call_index"]


def filter_gradients(
    gradients: Iterable[dict], *, step: int | None = None, targets: Sequence[str] | None = None,
    sample: str | None = None, call_index: int | None = None, score: tuple[float, float] | None = None,
    calls: dict[str, int] | None = None,
) -> list[dict]:
    """Gradients matching every filter given, in time order. `targets` are node names (feedback on
    their output) and parameter names; `call_index` is the target's call (see `target_call`,
    which needs `calls` from `call_indices`). Unscored (human) feedback passes the score filter
    only when it spans the whole [0, 1] range."""
    out = []
    for g in gradients:
        if step is not None and g["step"] != step:
            continue
        if targets is not None and g["target"] not in targets:
            continue
        if sample is not None and g["sample_id"] != sample:
            continue
        if call_index is not None and target_call(g, calls) != call_index:
            continue
        if score is not None:
            lo, hi = score
            if g["score"] is None and (lo, hi) != (0.0, 1.0):
                continue
            if g["score"] is not None and not lo <= g["score"] <= hi:
                continue
        out.append(g)
    return sorted(out, key=lambda g: (g["created_at"] or 0.0, g["step"]))


def gradient_origin(g: dict) -> str:
    """Where feedback came from: the downstream node and the function nodes it passed through."""
    source = g.get("source_node") or "?"
    via = " → ".join(g.get("path") or [])
    if g.get("origin") == "human":
        return f"human feedback ({source})"
    return f"{source} (via {via})" if via else source


def trained_steps(steps: Sequence[dict]) -> list[int]:
    """Steps that ran a training batch (step 0 only scores the initial prompts)."""
    return [s["step"] for s in steps if s["batch"]]


def call_rows(invocations: Sequence[dict], node: str) -> list[dict]:
    """One row per invocation of `node`: where each input came from, the output, any error."""
    node_of = {inv["id"]: f"{inv['node']}#{inv['call_index']}" for inv in invocations}
    return [
        {
            "sample": inv["sample_id"], "call": inv["call_index"],
            "inputs": "; ".join(f"{name} ← {node_of.get(src, 'sample') if src else 'sample'}"
                                for name, _text, src in inv["inputs"]),
            "output": inv["output"], "score": inv["score"], "error": inv["error"] or "",
            "prompt": inv["prompt"] or "",
        }
        for inv in invocations if inv["node"] == node
    ]


def gradient_rows(gradients: Iterable[dict], calls: dict[str, int] | None = None) -> list[dict]:
    return [
        {"step": g["step"], "sample": g["sample_id"], "target": g["target"], "call": target_call(g, calls),
         "score": g["score"], "from": gradient_origin(g), "written at": f"{g['node']}#{g['call_index']}",
         "feedback": g["text"], "error": g["error"] or ""}
        for g in gradients
    ]


# --- rendering -----------------------------------------------------------------------------------

class GraphRenderError(AutodiffError):
    """The generated graph page would load something from outside or is malformed."""


_TITLE_CHARS = 300
_COLUMN, _PARAM_GAP, _PARAM_ROW = 260, 120, 130  # layout, in vis-network pixels
_EXTERNAL_TAG = re.compile(
    r"<(?:script|link)\b[^>]*?\b(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//[^>]*>(?:\s*</script>)?", re.I | re.S
)
_EMPTY_HEADING = re.compile(r"<center>\s*<h1>\s*</h1>\s*</center>", re.I)
_DRAW = "network = new vis.Network(container, data, options);"
VIS_VERSION = "vis-9.1.2"  # the vis-network pyvis 0.3.2 in-lines
VIS_FILES = ("vis-network.min.js", "vis-network.css")
_DATA = re.compile(r"new vis\.DataSet\((.*?)\);\n", re.S)
# vis-network shows string titles as plain text; ours are escaped HTML, turned into elements here
# so line breaks and bold survive while the data itself stays inert.
_TITLES_AS_HTML = """
                  [nodes, edges].forEach(function (set) {
                    set.forEach(function (item) {
                      if (typeof item.title === "string") {
                        var el = document.createElement("div");
                        el.innerHTML = item.title;
                        set.update({id: item.id, title: el});
                      }
                    });
                  });
                  """


def external_resources(page: str) -> list[str]:
    """Script or stylesheet tags in `page` that would load from another host."""
    return _EXTERNAL_TAG.findall(page)


def vis_assets() -> dict[str, str]:
    """vis-network's script and stylesheet as pyvis ships them (file name -> text): what static/
    must hold for pages rendered with `assets`."""
    import pyvis

    lib = Path(pyvis.__file__).parent / "lib" / VIS_VERSION
    return {name: (lib / name).read_text(encoding="utf-8") for name in VIS_FILES}


@functools.cache
def _templates(folder: str):
    """One Jinja environment for pyvis's templates, so each is compiled once per process (pyvis
    makes a new environment, and compiles its page template again, for every Network)."""
    from jinja2 import Environment, FileSystemLoader

    return Environment(loader=FileSystemLoader(folder))


def render_html(g: nx.DiGraph, height: int = 560, selected: str | None = None, assets: str | None = None) -> str:
    """An HTML page drawing `g` with vis-network, with no network access.

    vis-network (about 690 KB of script and styles) is in-lined, so the page stands alone; given
    `assets`, the URL of a folder that serves `VIS_FILES` as pyvis ships them (the dashboard's
    /app/static/), the page links them instead and the browser caches them across redraws.

    Escaping: titles are HTML-escaped (they become HTML), labels are plain canvas text, and the
    node/edge JSON goes through Jinja's `tojson`, which writes <, >, & and ' as \\u escapes so a
    "</script>" in the data cannot end the script block."""
    # With assets, pyvis's "remote" template: its CDN tags are stripped below and ours linked, and
    # the 690 KB in-line copy is never rendered (that took most of a render's time).
    net = Network(height=f"{height}px", width="100%", directed=True, cdn_resources="remote" if assets else "in_line")
    net.templateEnv = _templates(net.template_dir)
    worst = max([d["failing"] for _v, d in g.nodes(data=True)] or [0])
    at = _positions(g)
    column = {v: at[v][0] for v in g.nodes}
    for v, d in g.nodes(data=True):
        shape, border = NODE_STYLE.get(d["kind"], NODE_STYLE["function"])
        fill = _heat(d["failing"], worst)
        is_selected = selected is not None and d["name"] == selected and d["kind"] != "parameter"
        net.add_node(
            v, label=_label(d), title=_title(d), shape=shape, x=at[v][0], y=at[v][1], physics=False,
            color={"background": fill, "border": "#000000" if is_selected else border,
                   "highlight": {"background": fill, "border": "#000000"}},
            borderWidth=4 if is_selected else 2, font={"size": 16 if d["kind"] != "parameter" else 12},
            shapeProperties={"borderDashes": [4, 3]} if d["kind"] == "parameter" else {},
        )
    for u, v, d in g.edges(data=True):
        if d["kind"] == "parameter":
            net.add_edge(u, v, color="#b8860b", dashes=True, arrows="to", title=esc("peer parameter of this node"))
            continue
        # An edge back to an earlier node is a loop: it arcs below the row, forward edges arc
        # slightly above it (more when they skip columns), so the two never share a line.
        back = column[v] <= column[u]
        skipped = sum(1 for w in g.nodes if g.nodes[w]["kind"] != "parameter" and column[u] < column[w] < column[v])
        net.add_edge(
            u, v, label=edge_label(d), title=_edge_title(u, v, g, d), arrows="to", width=1 + min(d["samples"], 8) / 2,
            color="#d62728" if back else "#555555",
            smooth={"enabled": True, "type": "curvedCW", "roundness": 0.35 if back else 0.12 + 0.15 * skipped},
        )
    net.set_options(_OPTIONS)
    page = net.generate_html()
    if _DRAW not in page:
        raise GraphRenderError("the pyvis template changed: cannot find where the network is drawn")
    data = _DATA.findall(page)
    if len(data) != 2 or any(c in blob for blob in data for c in "<>&"):  # pyvis must keep using tojson
        raise GraphRenderError("the graph data would be embedded in the page without escaping")
    page = page.replace(_DRAW, _TITLES_AS_HTML + _DRAW, 1)
    page = _EMPTY_HEADING.sub("", _EXTERNAL_TAG.sub("", page))
    if assets:
        page = _link_assets(page, assets.rstrip("/"))
    leftover = external_resources(page)
    if leftover:
        raise GraphRenderError(f"graph page still loads from outside: {leftover[:2]}")
    return page


def _link_assets(page: str, folder: str) -> str:
    if "<head>" not in page or "vis-network" in page:
        raise GraphRenderError("the pyvis template changed: cannot link vis-network from the dashboard")
    links = (f'\n<link rel="stylesheet" href="{esc(folder)}/vis-network.css">'
             f'\n<script src="{esc(folder)}/vis-network.min.js"></script>')
    return page.replace("<head>", "<head>" + links, 1)


_OPTIONS = """{
  "physics": {"enabled": false},
  "interaction": {"hover": true, "tooltipDelay": 120, "navigationButtons": false},
  "edges": {"font": {"size": 15, "strokeWidth": 4}}
}"""


def esc(text: object) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _positions(g: nx.DiGraph) -> dict[str, tuple[int, int]]:
    """Fixed places: pipeline nodes left to right in order of first execution, each node's
    parameters fanned out in a row above it (columns widen to fit them)."""
    nodes = [v for v, d in g.nodes(data=True) if d["kind"] != "parameter"]
    params: dict[str, list[str]] = {v: [] for v in nodes}
    for v, d in g.nodes(data=True):
        if d["kind"] == "parameter" and node_id(d["node"]) in params:
            params[node_id(d["node"])].append(v)
    at: dict[str, tuple[int, int]] = {}
    x = 0
    for v in nodes:
        width = max(_COLUMN, _PARAM_GAP * len(params[v]))
        x += width // 2
        at[v] = (x, 0)
        for i, p in enumerate(params[v]):
            at[p] = (x + round((i - (len(params[v]) - 1) / 2) * _PARAM_GAP), -_PARAM_ROW)
        x += width // 2
    return at


def _heat(failing: int, worst: int) -> str:
    """White for no failing feedback, deepening red up to the most-criticised vertex."""
    if failing <= 0 or worst <= 0:
        return "#ffffff"
    t = 0.25 + 0.75 * failing / worst
    other = round(255 * (1 - 0.7 * t))
    return f"#ff{other:02x}{other:02x}"


def _label(d: dict) -> str:
    if d["kind"] == "parameter":
        short = d["name"].rsplit(".", 1)[-1]
        return f"{short}\n✗ {d['failing']}" if d["failing"] else short
    lines = [d["name"], d["kind"]]
    if call_label(d.get("calls", [])):
        lines.append(call_label(d["calls"]))
    if d["kind"] == "loss":
        lines.append(f"failed {d.get('failed_samples', 0)}/{d.get('samples', 0)}")
    elif d["failing"]:
        lines.append(f"✗ {d['failing']} failing")
    return "\n".join(lines)


def _title(d: dict) -> str:
    rows = [f"<b>{esc(d['name'])}</b> ({esc(d['kind'])})"]
    if d["kind"] == "parameter":
        rows.append(f"parameter of {esc(d['node'])}{'' if d.get('trainable', True) else ', frozen'}")
        if d.get("value") is not None:
            value = d["value"] if len(d["value"]) <= _TITLE_CHARS else d["value"][:_TITLE_CHARS] + " …"
            rows.append(f"<pre style='white-space:pre-wrap;max-width:420px'>{esc(value)}</pre>")
    else:
        rows.append(f"{d.get('invocations', 0)} calls over {d.get('samples', 0)} samples")
        if len(d.get("calls", [])) > 1:
            rows.append(f"call indices: {esc(', '.join(map(str, d['calls'])))}")
    rows.append(f"failing samples whose feedback reached it: {d['failing']} ({d['feedback']} feedback messages)")
    return "<br>".join(rows)


def _edge_title(u: str, v: str, g: nx.DiGraph, d: dict) -> str:
    rows = [
        f"{esc(g.nodes[u]['name'])} → {esc(g.nodes[v]['name'])}",
        f"inputs: {esc(', '.join(d['inputs']))}",
        f"{d['samples']} samples",
    ]
    if edge_label(d):
        rows.append(f"calls (producer→consumer): {esc(edge_label(d, limit=1000))}")
    return "<br>".join(rows)
