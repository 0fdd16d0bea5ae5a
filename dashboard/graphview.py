"""The pipeline graph drawn for the dashboard: a layout whose text is readable at 100% zoom, an SVG
drawing of it in Streamlit's light and dark themes, and the rows the Graph page's tables show.
The model it draws is `autodiff.graphview.build_graph`.

Layout (`layout`): pipeline nodes top to bottom in the order they first ran, each node's
parameters stacked on its left, edges that loop back or skip a node arcing on its right. Edge
labels (the producer→consumer call indices of repeated nodes) are text items beside their edges
whose boxes are kept clear of every node and every other label. The page shows the drawing at
scale 1, so the font sizes below are the sizes on screen (an estimate of text width keeps the
boxes apart; tests/test_browser.py measures the boxes the browser really draws).

Drawing (`render_html`): SVG the browser draws itself, no library. The page used to hand the
layout to vis-network in an iframe, whose start on every visit was most of the Graph page's time:
on the store bench/dashboard_load.py builds, the page took 2.3 s that way against 0.4 s drawn as
SVG (the two served side by side, median of 7 visits each). Escaping: text is XML-escaped into <text> and <title> elements, and the SVG travels as
JSON with <, >, & and U+2028/9 written as \\u escapes, so a "</script>" in the data cannot end
its block."""

from __future__ import annotations

import hashlib
import html
import json
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import networkx as nx

from autodiff.errors import AutodiffError
from autodiff.graphview import node_id
from autodiff.records import Gradient, Invocation
from dashboard.common import script_json

# --- colours -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Palette:
    """Colours of one Streamlit theme. `background` is the page's own (the drawing is transparent
    over it; edge labels are haloed in it); a vertex's fill goes from `cold` (no failing samples)
    to `hot` (the most criticised vertex), with `text` readable on both."""

    name: str
    background: str
    text: str
    edge: str
    loop: str
    selected: str
    frame: str
    tooltip: str
    border: dict[str, str]
    cold: tuple[int, int, int]
    hot: tuple[int, int, int]


LIGHT = Palette(
    "light", background="#ffffff", text="#31333f", edge="#6b6f7b", loop="#c62828", selected="#000000",
    frame="#d5dae5", tooltip="#f0f2f6",
    border={"llm": "#1f77b4", "function": "#2e7d32", "loss": "#6b6f7b", "parameter": "#9a6b00"},
    cold=(255, 255, 255), hot=(255, 120, 120),  # text on it: 4.9:1 (WCAG AA asks 4.5:1)
)
DARK = Palette(
    # Streamlit's dark background as Chromium draws it (a theme's own backgroundColor wins, see `palette`)
    "dark", background="#171614", text="#fafafa", edge="#a3a8b8", loop="#ff6c6c", selected="#ffffff",
    frame="#3d3f4a", tooltip="#262730",
    border={"llm": "#6cb4ee", "function": "#6fcf73", "loss": "#a3a8b8", "parameter": "#e0b040"},
    cold=(38, 39, 48), hot=(160, 32, 40),
)


def palette(theme: str | None, background: str | None = None) -> Palette:
    """The colours for Streamlit's theme type ("light", "dark"; None, before the browser has said,
    is light), on `background` when the app's theme sets one."""
    chosen = DARK if theme == "dark" else LIGHT
    if background and re.fullmatch(r"#[0-9a-fA-F]{6}", background):
        chosen = Palette(**{**chosen.__dict__, "background": background})
    return chosen


def heat(failing: int, worst: int, colours: Palette = LIGHT) -> str:
    """A vertex's fill: `cold` for no failing samples, deepening towards `hot` for the worst."""
    t = 0.0 if failing <= 0 or worst <= 0 else 0.25 + 0.75 * failing / worst
    r, g, b = (round(c + (h - c) * t) for c, h in zip(colours.cold, colours.hot))
    return f"#{r:02x}{g:02x}{b:02x}"


# --- labels --------------------------------------------------------------------------------------

def edge_label(data: dict, limit: int = 6) -> str:
    """Call-index pairs for edges touching a repeated node ('0→0, 1→1'); empty otherwise."""
    pairs = data.get("calls") or []
    if not data.get("repeated") and all(p == (0, 0) for p in pairs):
        return ""
    shown = ", ".join(f"{a}→{b}" for a, b in pairs[:limit])
    return shown if len(pairs) <= limit else f"{shown}, … (+{len(pairs) - limit})"


def call_label(calls: Sequence[int]) -> str:
    return "" if len(calls) <= 1 else "calls " + ", ".join(str(c) for c in calls)


_KIND = {"llm": "LLM", "function": "function", "loss": "loss"}


def node_label(d: dict) -> str:
    """The text drawn in a vertex, one short line per fact."""
    if d["kind"] == "parameter":
        short = d["name"].rsplit(".", 1)[-1]
        return f"{short}\n✗ {d['failing']}" if d["failing"] else short
    kind = _KIND.get(d["kind"], d["kind"])
    lines = [d["name"], f"{kind} · {call_label(d['calls'])}" if call_label(d.get("calls", [])) else kind]
    if d["kind"] == "loss":
        lines.append(f"failed {d.get('failed_samples', 0)}/{d.get('samples', 0)}")
    elif d["failing"]:
        lines.append(f"✗ {d['failing']} failing")
    return "\n".join(lines)


# --- layout --------------------------------------------------------------------------------------

NODE_FONT, PARAM_FONT, EDGE_FONT = 16, 14, 14  # px on screen: the drawing is shown at scale 1
# Text size estimates, checked against what the browser draws (tests/test_browser.py measures it):
LINE = 1.25  # line height, in font sizes (plus LEADING px)
LEADING = 2.5
# Widths of characters in the drawing's font (Arial, or a font with its metrics), in font sizes, with
# 10% to spare.
_NARROW, _BROAD, _SYMBOL = frozenset("il.,:;'|!·()[]ftjrI "), frozenset("mwMW@%"), frozenset("→✗…")
SPARE = 1.1
MARGIN = 10  # inside a box, around its text
TEXT_MARGIN = 5  # around an edge label's text
ROW_GAP, PARAM_GAP, STACK_GAP = 64, 48, 10  # between node rows, parameters and their node, stacked parameters
LOOP = 18  # radius of a node's loop onto itself
DIAMOND = 14  # half size of the loss diamond (its label is drawn below the shape)
PAD = 16  # around the drawing, in the frame
CLEAR = 6  # the least gap between two boxes
ROUNDNESS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def text_size(text: str, font: int) -> tuple[float, float]:
    """Estimated width and height (px) of `text` drawn at `font` px."""
    lines = text.split("\n") or [""]
    return max(map(_em, lines)) * font * SPARE, len(lines) * (font * LINE + LEADING)


def _em(line: str) -> float:
    return sum(0.3 if c in _NARROW else 0.85 if c in _BROAD else 1.0 if c in _SYMBOL
               else 0.68 if c.isupper() else 0.56 for c in line)


@dataclass(frozen=True)
class Box:
    x: float  # centre
    y: float
    w: float
    h: float

    def overlaps(self, other: Box, gap: float = CLEAR) -> bool:
        return (abs(self.x - other.x) * 2 < self.w + other.w + 2 * gap
                and abs(self.y - other.y) * 2 < self.h + other.h + 2 * gap)

    def contains(self, x: float, y: float, gap: float = 0.0) -> bool:
        return abs(x - self.x) <= self.w / 2 + gap and abs(y - self.y) <= self.h / 2 + gap


@dataclass(frozen=True)
class EdgeLabel:
    edge: tuple[str, str]
    text: str
    box: Box


@dataclass
class Layout:
    """Where everything goes, in px at scale 1, y down."""

    boxes: dict[str, Box] = field(default_factory=dict)  # vertex -> its box (its centre is its place)
    labels: list[EdgeLabel] = field(default_factory=list)
    # edge -> its shape: {"enabled": False} straight, else an arc {"type": "curvedCW"/"curvedCCW", "roundness"}
    smooth: dict[tuple[str, str], dict] = field(default_factory=dict)
    curves: dict[tuple[str, str], list[tuple[float, float]]] = field(default_factory=dict)  # sampled arcs
    routes: dict[tuple[str, str], list[tuple[float, float]]] = field(default_factory=dict)  # detour corners

    def bounds(self) -> tuple[float, float, float, float]:
        """left, top, right, bottom of every box, label and arc."""
        xs, ys = [], []
        for b in [*self.boxes.values(), *(lab.box for lab in self.labels)]:
            xs += [b.x - b.w / 2, b.x + b.w / 2]
            ys += [b.y - b.h / 2, b.y + b.h / 2]
        for points in self.curves.values():
            xs += [x for x, _ in points]
            ys += [y for _, y in points]
        return (min(xs), min(ys), max(xs), max(ys)) if xs else (0.0, 0.0, 0.0, 0.0)

    @property
    def width(self) -> int:
        left, _, right, _ = self.bounds()
        return math.ceil(right - left + 2 * PAD)

    @property
    def height(self) -> int:
        """The frame's height (px) that shows the whole drawing at scale 1."""
        _, top, _, bottom = self.bounds()
        return math.ceil(bottom - top + 2 * PAD)


def _box_size(d: dict) -> tuple[float, float]:
    """The estimated box a vertex draws: its label plus margins (the loss: diamond and label below)."""
    font = PARAM_FONT if d["kind"] == "parameter" else NODE_FONT
    w, h = text_size(node_label(d), font)
    if d["kind"] == "loss":
        return max(w, 2 * DIAMOND), h + 2 * DIAMOND + 6
    if d["kind"] == "function":  # an ellipse around the text box
        return w + 2 * MARGIN + 4, (h + 2 * MARGIN) * 1.2
    return w + 2 * MARGIN, h + 2 * MARGIN


def layout(g: nx.DiGraph) -> Layout:
    """Places for every vertex and edge label of `g` (see the module docstring), with no two boxes
    overlapping and no arc crossing a node."""
    out = Layout()
    nodes = [v for v, d in g.nodes(data=True) if d["kind"] != "parameter"]
    order = {v: i for i, v in enumerate(nodes)}
    params: dict[str, list[str]] = {v: [] for v in nodes}
    for v, d in g.nodes(data=True):
        if d["kind"] == "parameter" and node_id(d["node"]) in params:
            params[node_id(d["node"])].append(v)
    sizes = {v: _box_size(d) for v, d in g.nodes(data=True)}
    half = max((sizes[v][0] / 2 for v in nodes), default=0.0)
    y = 0.0
    for v in nodes:
        stack = sum(sizes[p][1] for p in params[v]) + STACK_GAP * max(0, len(params[v]) - 1)
        row = max(sizes[v][1], stack)
        centre = y + row / 2
        out.boxes[v] = Box(0.0, centre, *sizes[v])
        top = centre - stack / 2
        for p in params[v]:  # right edges in one column, left of the widest node
            w, h = sizes[p]
            out.boxes[p] = Box(-half - PARAM_GAP - w / 2, top + h / 2, w, h)
            top += h + STACK_GAP
        y += row + ROW_GAP
    data_edges = [(u, v, d) for u, v, d in g.edges(data=True) if d["kind"] == "data"]
    # Straight edges (to the next node) first: their labels sit in the gap between the two rows.
    for u, v, d in data_edges:
        if order.get(v) == order.get(u, -2) + 1:
            out.smooth[(u, v)] = {"enabled": False}
            if text := edge_label(d):
                a, b = out.boxes[u], out.boxes[v]
                gap_mid = ((a.y + a.h / 2) + (b.y - b.h / 2)) / 2
                _place(out, (u, v), text, lambda w: (0.0, gap_mid))
    for u, v, d in data_edges:
        if u == v:
            out.smooth[(u, v)] = {"enabled": False}
            b = out.boxes[u]
            out.curves[(u, v)] = [(b.x + b.w / 2 + LOOP * (1 + math.cos(a)), b.y - LOOP * math.sin(a))
                                  for a in (i * math.pi / 8 for i in range(16))]
            if text := edge_label(d):
                _place(out, (u, v), text, lambda w: (b.x + b.w / 2 + 2 * LOOP + CLEAR + w / 2, b.y))
    # Then arcs, shortest first: loops back up and edges skipping a node, all bulging right.
    arcs = [(u, v, d) for u, v, d in data_edges if (u, v) not in out.smooth]
    for u, v, d in sorted(arcs, key=lambda e: abs(order[e[1]] - order[e[0]])):
        _place_arc(out, u, v, edge_label(d), clockwise=order[v] > order[u])
    return out


def _place(out: Layout, edge: tuple[str, str], text: str, where) -> None:
    """Put `text` at where(width) -> centre, moved right until its box is clear."""
    w, h = (size + 2 * TEXT_MARGIN for size in text_size(text, EDGE_FONT))
    x, y = where(w)
    box = Box(x, y, w, h)
    while _blocked(out, box):
        box = Box(box.x + 8, box.y, box.w, box.h)
    out.labels.append(EdgeLabel(edge, text, box))


def _blocked(out: Layout, box: Box) -> bool:
    return any(box.overlaps(b) for b in out.boxes.values()) or any(box.overlaps(lab.box) for lab in out.labels)


def _via(a: Box, b: Box, roundness: float, clockwise: bool) -> tuple[float, float]:
    """The control point of a quadratic Bézier arc from a to b bending clockwise or not, as
    vis-network 9.1 places it for its "curvedCW"/"curvedCCW" edges (the shape this layout was
    first drawn with)."""
    dx, dy = b.x - a.x, a.y - b.y
    length = math.hypot(dx, dy)
    turn = (0.5 * roundness if clockwise else -0.5 * roundness) + 0.5
    angle = (math.atan2(dy, dx) + turn * math.pi) % (2 * math.pi)
    reach = (0.5 * roundness + 0.5) * length
    return a.x + reach * math.sin(angle), a.y + reach * math.cos(angle)


def _bezier(a: Box, via: tuple[float, float], b: Box, t: float) -> tuple[float, float]:
    s = 1 - t
    return (s * s * a.x + 2 * s * t * via[0] + t * t * b.x, s * s * a.y + 2 * s * t * via[1] + t * t * b.y)


def _place_arc(out: Layout, u: str, v: str, text: str, clockwise: bool) -> None:
    """The least roundness whose arc misses every other node and whose label (right of the arc's
    middle) is clear; else the least that misses every node, its label moved right until clear;
    else (an arc from node to node cannot bulge past a wide node between them) a detour."""
    a, b = out.boxes[u], out.boxes[v]
    others = [box for w, box in out.boxes.items() if w not in (u, v)]
    w, h = (size + 2 * TEXT_MARGIN for size in text_size(text, EDGE_FONT)) if text else (0.0, 0.0)
    chosen = None
    for roundness in ROUNDNESS:
        points = [_bezier(a, _via(a, b, roundness, clockwise), b, i / 32) for i in range(33)]
        if any(box.contains(x, y, CLEAR) for box in others for x, y in points):
            continue
        chosen = chosen or (roundness, points)
        if not text or not _blocked(out, Box(points[16][0] + CLEAR + w / 2, points[16][1], w, h)):
            chosen = (roundness, points)
            break
    if chosen is None:
        _detour(out, u, v, text)
        return
    roundness, points = chosen
    out.smooth[(u, v)] = {"enabled": True, "type": "curvedCW" if clockwise else "curvedCCW", "roundness": roundness}
    out.curves[(u, v)] = points
    if text:
        _place(out, (u, v), text, lambda _w: (points[16][0] + CLEAR + w / 2, points[16][1]))


def _detour(out: Layout, u: str, v: str, text: str) -> None:
    """Route u -> v through two corners right of everything drawn between them: out of u into the
    gap beside it, down (or up) past the nodes between, into v from the gap beside v."""
    a, b = out.boxes[u], out.boxes[v]
    down = b.y > a.y
    step = 1 if down else -1
    start = a.y + step * (a.h / 2 + ROW_GAP / 2)
    end = b.y - step * (b.h / 2 + ROW_GAP / 2)
    top, bottom = min(start, end), max(start, end)
    beside = [box for box in [*out.boxes.values(), *(lab.box for lab in out.labels)]
              if box.y + box.h / 2 >= top and box.y - box.h / 2 <= bottom]
    beside += [Box(x, y, 0, 0) for points in out.curves.values() for x, y in points if top <= y <= bottom]
    x = max(box.x + box.w / 2 for box in beside) + 3 * CLEAR
    corners = [(x, start), (x, end)]
    out.smooth[(u, v)] = {"enabled": False}
    out.routes[(u, v)] = corners
    path = [(a.x, a.y), *corners, (b.x, b.y)]
    out.curves[(u, v)] = [(x0 + (x1 - x0) * i / 16, y0 + (y1 - y0) * i / 16)
                          for (x0, y0), (x1, y1) in zip(path, path[1:]) for i in range(17)]
    if text:
        w, _h = (size + 2 * TEXT_MARGIN for size in text_size(text, EDGE_FONT))
        _place(out, (u, v), text, lambda _w: (x + CLEAR + w / 2, (start + end) / 2))


# --- the drawing -----------------------------------------------------------------------------------

_TITLE_CHARS = 300
_EXTERNAL_TAG = re.compile(
    r"<(?:script|link|img|image|use)\b[^>]*?\b(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//[^>]*>(?:\s*</script>)?",
    re.I | re.S)


def external_resources(page: str) -> list[str]:
    """Tags in `page` that would load something from another host (a script, stylesheet, image)."""
    return _EXTERNAL_TAG.findall(page)


# Follows the theme the app is drawn in: reads the page's background once a second and, when it
# turns from light to dark or back, switches the drawing's class (every colour of both palettes is
# in its style sheet); labels are haloed in the background itself. Streamlit's theme as the server
# knows it (st.context.theme) changes only with the next rerun
# (https://github.com/streamlit/streamlit/issues/11920). Stops when Streamlit removes the element.
_FOLLOW_JS = """
(() => {
  const root = document.getElementById(%(root)s);
  if (!root) return;
  if (!root.querySelector("svg")) root.innerHTML = JSON.parse(root.nextElementSibling.textContent);
  const follow = () => {
    if (!root.isConnected) { clearInterval(timer); return; }
    const app = document.querySelector(".stApp");
    const bg = app ? getComputedStyle(app).backgroundColor : "";
    const rgb = (bg || "").match(/[\\d.]+/g);
    if (!rgb || rgb.length < 3 || bg === "rgba(0, 0, 0, 0)") return;
    const dark = (0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]) / 255 < 0.5;
    root.classList.toggle("dark", dark);
    root.classList.toggle("light", !dark);
    root.style.setProperty("--halo", bg);
  };
  const timer = setInterval(follow, 1000);
  follow();
})();
"""


def render_html(
    g: nx.DiGraph, selected: str | None = None, theme: str | None = None, where: Layout | None = None,
    background: str | None = None,
) -> str:
    """HTML for st.html (scripts allowed) that draws `g` as an SVG at scale 1, laid out by `where`
    (default: `layout(g)`), in the colours of Streamlit's `theme` ("light" or "dark", see
    `palette`), on the app's `background` when its theme sets one. `selected` is a node name
    drawn with a heavy border. A frame narrower than the drawing scrolls it sideways rather than
    shrinking its text (16 px nodes, 14 px parameters and edge labels).

    Boxes are LLM nodes, ellipses function nodes, the diamond the loss, dashed boxes parameters;
    each carries a <title> the browser shows on hover. Both palettes are in the style sheet and a
    small script follows a theme switched in place (`_FOLLOW_JS`). Nothing is loaded from
    anywhere.

    Escaping: every text from the graph (names, values, inputs) is XML-escaped into <text> and
    <title> elements, where it stays text; the drawing travels as a JSON string in a script block
    that is never run (<, > and & written as \\u escapes); the one script that runs is this
    module's own, with nothing from the graph in it."""
    where = where or layout(g)
    light, dark = palette("light", background), palette("dark", background)
    current = palette(theme, background)
    # The element's id names its arrow markers too: the same drawing gives the same id.
    seen = repr((list(g.nodes(data=True)), list(g.edges(data=True)), where, selected, current.name, background))
    root = "graph-" + hashlib.sha1(seen.encode()).hexdigest()[:16]
    body = _svg(g, where, light, dark, selected, root)
    script = _FOLLOW_JS % {"root": json.dumps(root)}
    # Streamlit's HTML element keeps no SVG markup (its sanitiser's profile is HTML only): the
    # script puts the drawing in place from a JSON string, never run as code.
    return (f'{_style(root, light, dark)}<div id="{root}" class="graph-drawing {current.name}"></div>'
            f'<script type="application/json">{script_json(json.dumps(body))}</script><script>{script}</script>')


_STROKES = ("llm", "function", "loss", "parameter")


def _style(root: str, light: Palette, dark: Palette) -> str:
    """The drawing's style sheet: each palette's colours as custom properties under the class
    that names it; every shape and text takes its colour from them."""
    def variables(c: Palette) -> str:
        kinds = "".join(f"--{k}: {c.border[k]};" for k in _STROKES)
        return (f"--text: {c.text}; --edge: {c.edge}; --loop: {c.loop}; --selected: {c.selected}; "
                f"--frame: {c.frame}; --bg: {c.background}; {kinds}")

    r = f"#{root}"
    return f"""<style>
{r} {{ overflow-x: auto; border: 1px solid var(--frame); border-radius: 0.5rem; }}
{r}.light {{ {variables(light)} }}
{r}.dark {{ {variables(dark)} }}
{r} svg {{ display: block; margin: 0 auto; }}
{r} text {{ fill: var(--text); font-family: arial, sans-serif; text-anchor: middle; dominant-baseline: central; }}
{r} .label text {{ stroke: var(--halo, var(--bg)); stroke-width: 5px; stroke-linejoin: round; paint-order: stroke; }}
{r}.light .vertex {{ fill: var(--fill-light); }}
{r}.dark .vertex {{ fill: var(--fill-dark); }}
{r} .vertex {{ stroke-width: 2px; }}
{"".join(f"{r} .k-{k} .vertex {{ stroke: var(--{k}); }}" for k in _STROKES)}
{r} .k-parameter .vertex {{ stroke-dasharray: 4 3; }}
{r} .selected .vertex {{ stroke: var(--selected); stroke-width: 4px; }}
{r} .edge {{ fill: none; }}
{r} .e-data {{ stroke: var(--edge); }} {r} .e-loop {{ stroke: var(--loop); }}
{r} .e-parameter {{ stroke: var(--parameter); stroke-dasharray: 5 4; }}
{r} .tip-data {{ fill: var(--edge); }} {r} .tip-loop {{ fill: var(--loop); }} {r} .tip-parameter {{ fill: var(--parameter); }}
{r} .hit {{ fill: none; stroke: transparent; stroke-width: 10px; pointer-events: stroke; }}
</style>"""


def _svg(g: nx.DiGraph, where: Layout, light: Palette, dark: Palette, selected: str | None, root: str) -> str:
    left, top, right, bottom = where.bounds()
    width, height = where.width, where.height
    marker = ('<marker id="{id}-{kind}" viewBox="0 0 10 10" refX="10" refY="5" markerUnits="userSpaceOnUse" '
              'markerWidth="11" markerHeight="11" orient="auto"><path class="tip-{kind}" d="M0,0 L10,5 L0,10 z"/>'
              '</marker>')
    arrows = "".join(marker.format(id=root, kind=k) for k in ("data", "loop", "parameter"))
    parts = [f'<svg class="graph" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="{_n(left - PAD)} {_n(top - PAD)} {width} {height}" role="img" '
             f'aria-label="The pipeline graph"><defs>{arrows}</defs>']
    worst = max([d["failing"] for _v, d in g.nodes(data=True)] or [0])
    edges, labels = [], []
    titles: dict[tuple[str, str], str] = {}
    for u, v, d in g.edges(data=True):
        if d["kind"] == "parameter":
            kind, title, width_px = "parameter", "peer parameter of this node", 1.5
            points = [(where.boxes[u].x, where.boxes[u].y), (where.boxes[v].x, where.boxes[v].y)]
        else:
            back = u == v or where.boxes[v].y < where.boxes[u].y
            kind, width_px = "loop" if back else "data", 1 + min(d["samples"], 8) / 4
            titles[(u, v)] = title = _edge_title(u, v, g, d)
            points = where.curves.get((u, v)) or [(where.boxes[u].x, where.boxes[u].y),
                                                  (where.boxes[v].x, where.boxes[v].y)]
        if u == v:
            path = _self_loop(where.boxes[u])
        else:
            points = _clip(points, g.nodes[u]["kind"], where.boxes[u], from_end=False)
            points = _clip(points, g.nodes[v]["kind"], where.boxes[v], from_end=True)
            path = "M" + " L".join(f"{_n(x)},{_n(y)}" for x, y in points)
        edges.append(f'<g><title>{esc(title)}</title><path class="edge e-{kind}" d="{path}" '
                     f'style="stroke-width: {_n(width_px)}px" marker-end="url(#{root}-{kind})"/>'
                     f'<path class="hit" d="{path}"/></g>')
    for lab in where.labels:
        labels.append(f'<g class="label"><title>{esc(titles.get(lab.edge, ""))}</title>'
                      f'{_text(lab.text, lab.box.x, lab.box.y, EDGE_FONT)}</g>')
    vertices = []
    for v, d in g.nodes(data=True):
        box = where.boxes[v]
        is_param = d["kind"] == "parameter"
        chosen = selected is not None and d["name"] == selected and not is_param
        fills = f"--fill-light: {heat(d['failing'], worst, light)}; --fill-dark: {heat(d['failing'], worst, dark)}"
        kind = d["kind"] if d["kind"] in _STROKES else "function"
        label = node_label(d)
        font = PARAM_FONT if is_param else NODE_FONT
        if d["kind"] == "loss":  # the diamond on top, its label below it
            cy = box.y - box.h / 2 + DIAMOND
            shape = (f'<polygon class="vertex" points="{_n(box.x)},{_n(cy - DIAMOND)} {_n(box.x + DIAMOND)},{_n(cy)} '
                     f'{_n(box.x)},{_n(cy + DIAMOND)} {_n(box.x - DIAMOND)},{_n(cy)}"/>')
            lines = _text(label, box.x, cy + DIAMOND + 6 + text_size(label, font)[1] / 2, font)
        elif d["kind"] == "function":
            shape = f'<ellipse class="vertex" cx="{_n(box.x)}" cy="{_n(box.y)}" rx="{_n(box.w / 2)}" ry="{_n(box.h / 2)}"/>'
            lines = _text(label, box.x, box.y, font)
        else:
            shape = (f'<rect class="vertex" x="{_n(box.x - box.w / 2)}" y="{_n(box.y - box.h / 2)}" '
                     f'width="{_n(box.w)}" height="{_n(box.h)}" rx="{4 if is_param else 6}"/>')
            lines = _text(label, box.x, box.y, font)
        vertices.append(f'<g class="node k-{kind}{" selected" if chosen else ""}" data-id="{esc(v)}" style="{fills}">'
                        f'<title>{esc(_title(d))}</title>{shape}{lines}</g>')
    parts += edges + vertices + labels + ["</svg>"]
    return "".join(parts)


def _n(x: float) -> str:
    """A coordinate as SVG text: at most one decimal."""
    return f"{x:.1f}".rstrip("0").rstrip(".")


def _text(text: str, x: float, y: float, font: int) -> str:
    """`text`'s lines centred on (x, y), `font` px, spaced as `text_size` estimates them."""
    lines = text.split("\n")
    step = font * LINE + LEADING
    first = y - step * (len(lines) - 1) / 2
    spans = "".join(f'<tspan x="{_n(x)}" y="{_n(first + i * step)}">{esc(line)}</tspan>' for i, line in enumerate(lines))
    return f'<text style="font-size: {font}px">{spans}</text>'


def _inside(kind: str, box: Box, x: float, y: float) -> bool:
    """Whether (x, y) is inside the shape a vertex of `kind` draws in `box`."""
    if kind == "function":
        return ((x - box.x) / (box.w / 2)) ** 2 + ((y - box.y) / (box.h / 2)) ** 2 <= 1
    if kind == "loss":
        cy = box.y - box.h / 2 + DIAMOND
        return abs(x - box.x) + abs(y - cy) <= DIAMOND or box.contains(x, y) and y > cy
    return box.contains(x, y)


def _clip(points: list[tuple[float, float]], kind: str, box: Box, *, from_end: bool) -> list[tuple[float, float]]:
    """`points` cut where they leave (from_end: enter) the shape of the vertex at that end, so that
    an edge starts and ends on its vertices' outlines (an arrow's tip touching the shape)."""
    pts = points[::-1] if from_end else list(points)
    i = 0
    while i + 1 < len(pts) and _inside(kind, box, *pts[i + 1]):
        i += 1
    if i + 1 >= len(pts):
        return points
    (x0, y0), (x1, y1) = pts[i], pts[i + 1]
    if _inside(kind, box, x0, y0):  # bisect the segment for the outline
        lo, hi = 0.0, 1.0
        for _ in range(24):
            mid = (lo + hi) / 2
            if _inside(kind, box, x0 + (x1 - x0) * mid, y0 + (y1 - y0) * mid):
                lo = mid
            else:
                hi = mid
        pts = [(x0 + (x1 - x0) * hi, y0 + (y1 - y0) * hi), *pts[i + 1:]]
    return pts[::-1] if from_end else pts


def _self_loop(box: Box) -> str:
    """A circle of radius LOOP on the right of `box`, leaving and re-entering its right side."""
    gap = LOOP * 0.6
    edge = box.x + box.w / 2
    return f"M{_n(edge)},{_n(box.y - gap)} A{LOOP},{LOOP} 0 1 1 {_n(edge)},{_n(box.y + gap)}"


def esc(text: object) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _title(d: dict) -> str:
    """A vertex's hover text (plain text; the caller escapes it)."""
    rows = [f"{d['name']} ({d['kind']})"]
    if d["kind"] == "parameter":
        rows.append(f"parameter of {d['node']}{'' if d.get('trainable', True) else ', frozen'}")
        if d.get("value") is not None:
            rows.append(d["value"] if len(d["value"]) <= _TITLE_CHARS else d["value"][:_TITLE_CHARS] + " …")
    else:
        rows.append(f"{d.get('invocations', 0)} calls over {d.get('samples', 0)} samples")
        if len(d.get("calls", [])) > 1:
            rows.append(f"call indices: {', '.join(map(str, d['calls']))}")
    rows.append(f"failing samples whose feedback reached it: {d['failing']} ({d['feedback']} feedback messages)")
    return "\n".join(rows)


def _edge_title(u: str, v: str, g: nx.DiGraph, d: dict) -> str:
    """An edge's hover text (plain text; the caller escapes it)."""
    rows = [f"{g.nodes[u]['name']} → {g.nodes[v]['name']}", f"inputs: {', '.join(d['inputs'])}",
            f"{d['samples']} samples"]
    if edge_label(d):
        rows.append(f"calls (producer→consumer): {edge_label(d, limit=1000)}")
    return "\n".join(rows)


# --- the Graph page's tables ---------------------------------------------------------------------

def gradient_origin(g: Gradient) -> str:
    """Where feedback came from: the downstream node and the function nodes it passed through."""
    source = g.source_node or "?"
    via = " → ".join(g.path)
    if g.origin == "human":
        return f"human feedback ({source})"
    return f"{source} (via {via})" if via else source


def call_rows(invocations: Sequence[Invocation], node: str) -> list[dict]:
    """One table row per invocation of `node`: where each input came from, the output, any error."""
    node_of = {inv.id: f"{inv.node}#{inv.call_index}" for inv in invocations}
    return [
        {
            "sample": inv.sample_id, "call": inv.call_index,
            "inputs": "; ".join(f"{ref.name} ← {node_of.get(ref.source, 'sample') if ref.source else 'sample'}"
                                for ref in inv.inputs),
            "output": inv.output, "score": inv.score, "error": inv.error or "", "prompt": inv.prompt or "",
        }
        for inv in invocations if inv.node == node
    ]


def gradient_rows(gradients: Iterable[Gradient]) -> list[dict]:
    """One table row per stored gradient (as `Store.find_gradients` or `Store.gradients_by_id`
    give them); "call" is the call index of what it is about."""
    return [
        {"step": g.step, "sample": g.sample_id, "target": g.target, "call": g.about_call,
         "score": g.score, "from": gradient_origin(g), "written at": f"{g.node}#{g.call_index}",
         "feedback": g.text, "error": g.error or ""}
        for g in gradients
    ]
