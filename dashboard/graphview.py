"""The pipeline graph drawn for the dashboard: a layout whose text is readable at 100% zoom, colours
for Streamlit's light and dark themes, the vis-network page (pyvis, nothing from a CDN) and the
rows the Graph page's tables show. The model it draws is `autodiff.graphview.build_graph`.

Layout (`layout`): pipeline nodes top to bottom in the order they first ran, each node's
parameters stacked on its left, edges that loop back or skip a node arcing on its right. Edge
labels (the producer→consumer call indices of repeated nodes) are placed here, not by
vis-network: each is a text item beside its edge whose box is kept clear of every node and every
other label. The page shows the drawing at scale 1, so the font sizes below are the sizes on
screen (an estimate of text width keeps the boxes apart; tests/test_browser.py measures the
boxes vis-network really draws).

Escaping (`render_html`): titles are HTML-escaped (they become HTML), labels are plain canvas
text, and the node/edge JSON goes through Jinja's `tojson`, which writes <, >, & and ' as \\u
escapes so a "</script>" in the data cannot end the script block.
"""

from __future__ import annotations

import functools
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import networkx as nx
from pyvis.network import Network

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
# Text size estimates, checked against what vis-network draws (tests/test_browser.py measures it):
LINE = 1.25  # line height, in font sizes (plus LEADING px)
LEADING = 2.5
# Widths of characters in vis-network's font (Arial), in font sizes, with 10% to spare.
_NARROW, _BROAD, _SYMBOL = frozenset("il.,:;'|!·()[]ftjrI "), frozenset("mwMW@%"), frozenset("→✗…")
SPARE = 1.1
MARGIN = 10  # inside a box, around its text (vis-network's margin option)
TEXT_MARGIN = 5  # vis-network's default margin around a text item
ROW_GAP, PARAM_GAP, STACK_GAP = 64, 48, 10  # between node rows, parameters and their node, stacked parameters
LOOP = 18  # radius of a node's loop onto itself
DIAMOND = 14  # half size of the loss diamond (vis draws its label below the shape)
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
    """Where everything goes, in vis-network coordinates (px at scale 1, y down)."""

    boxes: dict[str, Box] = field(default_factory=dict)  # vertex -> its box (its centre is its place)
    labels: list[EdgeLabel] = field(default_factory=list)
    smooth: dict[tuple[str, str], dict] = field(default_factory=dict)  # edge -> vis-network "smooth"
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
    """The control point vis-network 9.1 uses for a "curvedCW"/"curvedCCW" edge from a to b."""
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


# --- the page ------------------------------------------------------------------------------------

class GraphRenderError(AutodiffError):
    """The generated graph page would load something from outside or is malformed."""


_TITLE_CHARS = 300
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
# Shown at scale 1 around the drawing's centre (vis-network would zoom out to fit the frame, which
# made the text 8 px); only a frame too narrow for the drawing scales it, and never below MIN_SCALE.
MIN_SCALE = 0.86
_VIEW = """
                  (function (view) {
                    function place() {
                      var fit = (container.clientWidth - 2 * view.pad) / view.width;
                      network.moveTo({position: {x: view.x, y: view.y},
                                      scale: Math.max(view.min, Math.min(1, fit))});
                    }
                    place();
                    network.once("afterDrawing", place);
                    window.addEventListener("resize", place);
                  })(VIEW);
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


_SHAPES = {"llm": "box", "function": "ellipse", "loss": "diamond", "parameter": "box"}


def render_html(
    g: nx.DiGraph, selected: str | None = None, assets: str | None = None, theme: str | None = None,
    where: Layout | None = None, background: str | None = None,
) -> str:
    """An HTML page drawing `g` with vis-network, with no network access, in the colours of
    Streamlit's `theme` ("light" or "dark", see `palette`), laid out by `where` (default:
    `layout(g)`; its `height` is the frame height that shows it all). `selected` is a node name
    drawn with a heavy border.

    Both palettes are in the page: shown in the Streamlit frame (st.iframe, same origin), the page
    reads the app's background every second and redraws in the other palette when the person
    switches theme in place, which `theme` (st.context.theme, sent with the last rerun) does not
    follow until the next rerun (https://github.com/streamlit/streamlit/issues/11920). Edge labels
    are haloed in the app's actual background.

    vis-network (about 690 KB of script and styles) is in-lined, so the page stands alone; given
    `assets`, the URL of a folder that serves `VIS_FILES` as pyvis ships them (the dashboard's
    /app/static/), the page links them instead and the browser caches them across redraws.
    Raises GraphRenderError when pyvis's template no longer has the shape this relies on."""
    colours = palette(theme, background)
    where = where or layout(g)
    net = _network(g, where, colours, selected, inline=not assets)
    other = palette("light" if colours.name == "dark" else "dark", background)
    looks = {colours.name: _look(net), other.name: _look(_network(g, where, other, selected, inline=not assets))}
    page = net.generate_html()
    if _DRAW not in page:
        raise GraphRenderError("the pyvis template changed: cannot find where the network is drawn")
    data = _DATA.findall(page)
    if len(data) != 2 or any(c in blob for blob in data for c in "<>&"):  # pyvis must keep using tojson
        raise GraphRenderError("the graph data would be embedded in the page without escaping")
    left, top, right, bottom = where.bounds()
    view = json.dumps({"x": (left + right) / 2, "y": (top + bottom) / 2, "width": right - left, "pad": PAD,
                       "min": MIN_SCALE})
    follow = (_FOLLOW_THEME.replace("CURRENT", json.dumps(colours.name))
              .replace("LOOKS", script_json(json.dumps(looks))))
    page = page.replace(_DRAW, _TITLES_AS_HTML + _DRAW + _VIEW.replace("VIEW", view) + follow, 1)
    page = _EMPTY_HEADING.sub("", _EXTERNAL_TAG.sub("", page))
    if "</head>" not in page or "<html>" not in page:
        raise GraphRenderError("the pyvis template changed: cannot style the graph page")
    page = page.replace("</head>", _style(palette("light", background), palette("dark", background)) + "</head>", 1)
    page = page.replace("<html>", f'<html class="theme-{colours.name}">', 1)
    if assets:
        page = _link_assets(page, assets.rstrip("/"))
    leftover = external_resources(page)
    if leftover:
        raise GraphRenderError(f"graph page still loads from outside: {leftover[:2]}")
    return page


def _network(g: nx.DiGraph, where: Layout, colours: Palette, selected: str | None, *, inline: bool) -> Network:
    """The pyvis network of `g` laid out by `where`, in `colours`. Every edge has an id, so a page
    can recolour it (`_look`)."""
    # Not inline: pyvis's "remote" template, whose CDN tags are stripped by `render_html` and ours
    # linked; the 690 KB in-line copy is then never rendered (that took most of a render's time).
    net = Network(height=f"{where.height}px", width="100%", directed=True, bgcolor="transparent",
                  cdn_resources="in_line" if inline else "remote")
    net.templateEnv = _templates(net.template_dir)
    worst = max([d["failing"] for _v, d in g.nodes(data=True)] or [0])
    for v, d in g.nodes(data=True):
        box = where.boxes[v]
        border = colours.border.get(d["kind"], colours.border["function"])
        fill = heat(d["failing"], worst, colours)
        is_selected = selected is not None and d["name"] == selected and d["kind"] != "parameter"
        is_param = d["kind"] == "parameter"
        # vis-network places a diamond by its centre and draws its label below it
        y = box.y - box.h / 2 + DIAMOND if d["kind"] == "loss" else box.y
        net.add_node(
            v, label=node_label(d), title=_title(d), shape=_SHAPES.get(d["kind"], "ellipse"), x=box.x, y=y,
            physics=False, size=DIAMOND, margin=MARGIN,
            color={"background": fill, "border": colours.selected if is_selected else border,
                   "highlight": {"background": fill, "border": colours.selected},
                   "hover": {"background": fill, "border": colours.selected}},
            borderWidth=4 if is_selected else 2,
            font={"size": PARAM_FONT if is_param else NODE_FONT, "color": colours.text},
            shapeProperties={"borderDashes": [4, 3]} if is_param else {},
        )
    titles = {}
    edge_ids = iter(range(1_000_000))
    for u, v, d in g.edges(data=True):
        if d["kind"] == "parameter":
            net.add_edge(u, v, id=f"edge:{next(edge_ids)}", color=colours.border["parameter"], dashes=True,
                         arrows="to", title=esc("peer parameter of this node"), smooth={"enabled": False})
            continue
        back = u == v or where.boxes[v].y < where.boxes[u].y
        titles[(u, v)] = title = _edge_title(u, v, g, d)
        style = {"title": title, "width": 1 + min(d["samples"], 8) / 4, "color": colours.loop if back else colours.edge}
        ends = [u]
        for x, y in where.routes.get((u, v), []):  # a detour: straight segments through its corners
            corner = f"corner:{len(net.get_nodes())}"
            net.add_node(corner, label=" ", title=title, shape="dot", size=1, x=x, y=y, physics=False, chosen=False,
                         color={"background": style["color"], "border": style["color"]}, borderWidth=0)
            ends.append(corner)
        for end in ends[1:]:
            net.add_edge(ends[ends.index(end) - 1], end, id=f"edge:{next(edge_ids)}", smooth={"enabled": False},
                         arrows={"to": {"enabled": False}}, **style)
        net.add_edge(ends[-1], v, id=f"edge:{next(edge_ids)}", arrows="to", smooth=where.smooth[(u, v)], **style)
    for i, lab in enumerate(where.labels):
        net.add_node(f"label:{i}", label=lab.text, title=titles[lab.edge], shape="text", x=lab.box.x, y=lab.box.y,
                     physics=False, chosen=False,
                     font={"size": EDGE_FONT, "color": colours.text, "strokeWidth": 5,
                           "strokeColor": colours.background})
    net.set_options(json.dumps({
        "physics": {"enabled": False},
        "interaction": {"hover": True, "tooltipDelay": 120, "dragNodes": False, "zoomView": False},
        "edges": {"selfReference": {"size": LOOP, "angle": 0, "renderBehindTheNode": True},
                  "arrows": {"to": {"scaleFactor": 0.8}}},
    }))
    return net


def _look(net: Network) -> dict:
    """What differs between palettes: each node's colours and font, each edge's colour."""
    return {"nodes": [{"id": n["id"], "color": n["color"], "font": n.get("font", {})} for n in net.nodes],
            "edges": [{"id": e["id"], "color": e["color"]} for e in net.edges]}


# Follows the theme the app is drawn in: reads the Streamlit page's background (the frame is the
# same origin) and, when it turns from light to dark or back, recolours the nodes and edges from
# the other palette and labels' halos in the background itself. Stops when the frame is removed.
_FOLLOW_THEME = """
                  (function (looks, current) {
                    var halo = null;
                    function read() {
                      try {
                        var app = window.parent.document.querySelector(".stApp");
                        var bg = app && getComputedStyle(app).backgroundColor;
                        var rgb = (bg || "").match(/[\\d.]+/g);
                        if (!rgb || rgb.length < 3 || bg === "rgba(0, 0, 0, 0)") return null;
                        var lum = (0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]) / 255;
                        return {name: lum < 0.5 ? "dark" : "light", bg: bg};
                      } catch (e) { return null; }  // not inside the dashboard: keep the server's palette
                    }
                    function follow() {
                      var seen = read();
                      if (!seen || (seen.name === current && seen.bg === halo)) return;
                      var look = looks[seen.name];
                      nodes.update(look.nodes.map(function (n) {
                        if (String(n.id).indexOf("label:") !== 0) return n;
                        var font = Object.assign({}, n.font, {strokeColor: seen.bg});
                        return {id: n.id, color: n.color, font: font};
                      }));
                      if (seen.name !== current) edges.update(look.edges);
                      document.documentElement.className = "theme-" + seen.name;
                      current = seen.name;
                      halo = seen.bg;
                    }
                    follow();
                    setInterval(follow, 1000);
                  })(LOOKS, CURRENT);
                  """


def _style(light: Palette, dark: Palette) -> str:
    """The frame transparent over the app's background, and tooltips in the theme's colours (the
    <html> element's class names the theme: `render_html` sets it, the page follows the app's)."""
    themed = "\n".join(f"""html.theme-{c.name} #mynetwork {{ border-color: {c.frame}; }}
html.theme-{c.name} div.vis-tooltip {{ color: {c.text}; background: {c.tooltip}; border-color: {c.frame}; }}"""
                       for c in (light, dark))
    return f"""<style>
html, body {{ margin: 0; padding: 0; background: transparent; }}
.card {{ border: 0; }}
#mynetwork {{ background: transparent; border: 1px solid {light.frame}; border-radius: 0.5rem;
  box-sizing: border-box; }}
div.vis-tooltip {{ font: 14px/1.45 "Source Sans Pro", sans-serif; color: {light.text};
  background: {light.tooltip}; border: 1px solid {light.frame}; border-radius: 0.4rem;
  padding: 0.4rem 0.6rem; max-width: 28rem; white-space: normal; box-shadow: none; }}
div.vis-tooltip pre {{ white-space: pre-wrap; margin: 0.3rem 0 0; font-size: 13px; }}
{themed}
</style>
"""


def _link_assets(page: str, folder: str) -> str:
    if "<head>" not in page or "vis-network" in page:
        raise GraphRenderError("the pyvis template changed: cannot link vis-network from the dashboard")
    links = (f'\n<link rel="stylesheet" href="{esc(folder)}/vis-network.css">'
             f'\n<script src="{esc(folder)}/vis-network.min.js"></script>')
    return page.replace("<head>", "<head>" + links, 1)


def esc(text: object) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _title(d: dict) -> str:
    rows = [f"<b>{esc(d['name'])}</b> ({esc(d['kind'])})"]
    if d["kind"] == "parameter":
        rows.append(f"parameter of {esc(d['node'])}{'' if d.get('trainable', True) else ', frozen'}")
        if d.get("value") is not None:
            value = d["value"] if len(d["value"]) <= _TITLE_CHARS else d["value"][:_TITLE_CHARS] + " …"
            rows.append(f"<pre>{esc(value)}</pre>")
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
