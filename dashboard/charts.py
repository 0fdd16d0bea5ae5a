"""Plotly figures drawn in the page with plotly.js's basic bundle, served as a static file and
loaded once per browser tab.

Figures are built with plotly's graph objects (`figure`); `draw` lays a page's figures out in rows
in one st.html element whose own script draws them. Why not `st.plotly_chart`: Streamlit's chart
element ships the full plotly.js (4.7 MB, every trace type) inside its own code, and a browser tab
parses and starts it on the first chart it meets; with seven charts the Curves page took 4.6 s to
render on this project's benchmark run (`bench/dashboard_load.py`). The basic bundle (scatter, bar
and pie, all these pages draw; 1.2 MB) starts in about a quarter of that time. Why not an iframe
(`st.iframe`, as these charts were drawn before): a frame loads and starts the bundle again on every
visit to a page; drawn in the page, the tab keeps plotly.js from its first chart on, and the Curves
page's second visit in a tab took 1.1 s instead of 1.9 s (same benchmark, loaded machine; first
visits 1.8 s against 2.3 s).

The bundle is `static/plotly-basic.min.js`, the npm package `plotly.js-basic-dist-min` at the
plotly.js version that the installed plotly package bundles (a test checks the two agree). Streamlit
serves it at /app/static/ (`enableStaticServing` in .streamlit/config.toml): nothing is fetched
from outside.

Untrusted text: st.html runs this element's scripts (`unsafe_allow_javascript`), so nothing from the
store is ever code. Labels that came from the store pass through `label` (plotly.js renders a few
HTML tags in text; escaped, they show as written); the figures' JSON sits in JSON script blocks,
which the browser never runs, with <, > and & written as \\u escapes, so no string can end a block;
the one script that runs is `_DRAW_JS`, given only the element's id, the bundle's address, a height
and the fallback colours.

Themes: Streamlit's own chart element would follow the app's light or dark theme
(`theme="streamlit"`); drawn by our script, the figures follow it themselves. Their template has
transparent backgrounds and no colour of its own for text, grid or axes: the script reads the app's
text and background colours when it draws, and again whenever the person switches theme, so no
chart stays white in dark mode. Where the page cannot be read, the theme Streamlit reported for the
session (`st.context.theme`) decides.

Axes carry units (`Unit`: a score as %, seconds, tokens, US dollars, counts) and whole-step ticks;
a figure with nothing to draw yet shows a message instead of plotly's empty -1..1 axes.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import math
from collections.abc import Sequence
from typing import Literal
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
import streamlit as st
from plotly.utils import PlotlyJSONEncoder

from dashboard.common import script_json, static_url

BUNDLE = Path(__file__).resolve().parents[1] / "static" / "plotly-basic.min.js"
ROW_GAP = 12
# plotly's own qualitative palette (the plotly_white template's colorway), for traces that must
# share a colour (one run's validation and test lines).
COLOURS = ("#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3", "#FF6692", "#B6E880",
           "#FF97FF", "#FECB52")

Row = go.Figure | tuple[go.Figure, ...]


# Every figure's layout, given to its constructor: each update_layout call on a built figure
# re-validates property paths, and five of them cost more than building the figure.
LAYOUT = {"margin": {"l": 60, "r": 60, "t": 40, "b": 40},
          "font": {"family": "'Source Sans Pro', 'Source Sans', sans-serif"},
          # The legend sits to the right of the plot, one entry a line (plotly's own place for it): under
          # the plot, a long legend grew the bottom margin, shrank the plot and rode up over the step
          # axis's title.
          "legend": {"title": {"text": ""}, "x": 1.02, "xanchor": "left", "y": 1, "yanchor": "top"}}
HEIGHT = 380  # px of each figure (`page_html`, `draw`)
# px a figure needs beside another (legend on the right included); a narrower page stacks a row's figures
MIN_WIDTH = 440


Unit = Literal["score", "seconds", "tokens", "usd", "count"]
# Axis formats by unit: a score in [0, 1] reads as a percentage; money in dollars; counts in whole
# numbers. d3-format strings, as plotly.js takes them.
UNITS: dict[str, dict] = {
    "score": {"tickformat": ".0%"},
    "seconds": {"ticksuffix": " s", "tickformat": ",.3~r"},
    "tokens": {"tickformat": ",.3~s"},
    "usd": {"tickprefix": "$"},
    "count": {"tickformat": ",d"},
}
EMPTY = "Nothing to draw yet."


def _finite(values) -> list[float]:
    out = []
    for v in values if values is not None else ():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def _nice_step(span: float, ticks: int = 8) -> int:
    """A whole tick spacing (1, 2, 5, 10, 20, ...) giving about `ticks` ticks over `span`."""
    raw = max(span / ticks, 1.0)
    power = 10 ** math.floor(math.log10(raw))
    return int(next(m * power for m in (1, 2, 5, 10) if m * power >= raw))


def axis(unit: Unit | None, values: Sequence[float] = ()) -> dict:
    """Tick format for an axis of `unit` holding `values` (for the money's decimals and whole
    count ticks)."""
    out = dict(UNITS.get(unit, {})) if unit else {}
    top = max((abs(v) for v in values), default=0.0)
    if unit == "usd":
        # enough decimals that the largest value shows two significant digits ($0.0012, $1.50, $120)
        decimals = 2 if top >= 1 or top == 0 else min(-math.floor(math.log10(top)) + 1, 8)
        out["tickformat"] = f",.{decimals}f"
    if unit == "count" and top <= 10:
        out["dtick"] = 1  # no half calls
    if unit in ("seconds", "tokens", "usd", "count"):
        out["rangemode"] = "tozero"
        if top == 0:
            out["range"] = [0, 1]  # all zeros: an axis from 0, not plotly's -1..1
    return out


def figure(title: str, traces: Sequence, *, y: str, x: str = "step", unit: Unit | None = None,
           barmode: str | None = None, y_range: tuple[float, float] | None = None, layout: dict | None = None,
           empty: str = EMPTY) -> go.Figure:
    """A figure of graph-object traces with its title and axis names; `y` names the y axis with its
    unit in words ("time (s)"), `unit` formats its ticks (see `UNITS`). `layout` adds to (or
    overrides) the rest of the layout. A figure none of whose traces has a value to draw shows
    `empty` in its place, with no axes. Colours come from the template `page_html` applies and
    the page's theme (plotly express is not used: under Streamlit its default template holds
    placeholder colours that only Streamlit's own chart element fills in)."""
    traces = list(traces)
    ys = [v for t in traces for v in _finite(t.y)]
    for t in traces:
        # A bar of height 0 shows nothing, yet plotly.js draws an SVG path for it: on the benchmark
        # run's Curves page, 590 of 1,380 bars. Left out, they cost the browser nothing (hover is
        # by closest point: a zero bar could not be pointed at either).
        if t.type == "bar" and t.y is not None:
            t.y = [None if v == 0 else v for v in t.y]
    if not ys:
        return go.Figure(layout={
            **LAYOUT, "template": {}, "title": {"text": title},
            "xaxis": {"visible": False}, "yaxis": {"visible": False},
            "annotations": [{"text": html.escape(empty, quote=False), "showarrow": False,
                             "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5}]})
    steps = _finite(v for t in traces for v in (t.x if t.x is not None else ()))
    xaxis = {"title": {"text": x}, "rangemode": "tozero"}
    if x == "step":
        span = (max(steps) - min(steps)) if steps else 0
        xaxis.update(dtick=1 if span <= 20 else _nice_step(span), tickformat="d")  # whole steps only
    yaxis = {"title": {"text": y}, **axis(unit, ys)}
    if y_range:
        yaxis["range"] = list(y_range)
    return go.Figure(traces, layout={
        **LAYOUT, "template": {},  # the page's one template applies (page_html)
        "title": {"text": title}, "barmode": barmode, "xaxis": xaxis, "yaxis": yaxis, **(layout or {}),
    })


FOREGROUND = "foreground"  # a trace whose `meta` says this is drawn in the theme's text colour


def label(text: object) -> str:
    """Text from the store (a run id, a parameter name) as a plotly label that shows as written."""
    return html.escape("" if text is None else str(text), quote=False)


def bundle_url() -> str:
    return static_url(BUNDLE.name)


def _json(obj: go.Figure | go.layout.Template) -> str:
    return obj.to_json() if isinstance(obj, go.Figure) else json.dumps(obj.to_plotly_json(), cls=PlotlyJSONEncoder)


@functools.cache
def _template() -> str:
    """plotly's plotly_white template without its colours for backgrounds, text, grid and axes
    (the page's theme gives them, see `page_html`), serialised once and given to every figure in
    the browser (assigning it to each figure in Python cost more than building the figures). Axes
    keep the margins `LAYOUT` gives them: plotly's automatic margins measure the tick labels and
    lay each figure out a second time, a fifth of the drawing time of the Curves page."""
    white = pio.templates["plotly_white"]
    layout = white.layout.to_plotly_json()
    # Only what cartesian scatter, bar and pie charts use (no geo, polar, 3-D or ternary layout,
    # each with a white background of its own).
    keep = ("annotationdefaults", "autotypenumbers", "colorway", "font", "hoverlabel", "hovermode",
            "shapedefaults", "title", "xaxis", "yaxis")
    template = go.layout.Template(layout={k: v for k, v in layout.items() if k in keep},
                                  data={kind: white.data[kind] for kind in ("scatter", "bar", "pie")})
    template.layout.paper_bgcolor = template.layout.plot_bgcolor = TRANSPARENT
    template.layout.font.color = None
    for name in ("xaxis", "yaxis"):
        ax = template.layout[name]
        ax.automargin = False
        # Tick labels are neither hidden where they pass the figure's edge nor turned to fit: both
        # make plotly.js measure every label on the screen, about 0.13 s of drawing the Curves
        # page (Chrome profile, benchmark run). The ticks are few and short (whole steps, units).
        ax.ticklabeloverflow = "allow"
        ax.tickangle = 0
        ax.gridcolor = ax.linecolor = ax.zerolinecolor = None
    for bar in template.data.bar:
        bar.marker.line.color = TRANSPARENT  # white outlines would ring each bar in dark mode
    return _json(template)


TRANSPARENT = "rgba(0,0,0,0)"
# Streamlit's default theme colours (text, background), for when the page cannot be read.
THEMES = {"light": ("rgb(49, 51, 63)", "rgb(255, 255, 255)"), "dark": ("rgb(250, 250, 250)", "rgb(14, 17, 23)")}


def theme_type() -> str:
    """"dark" or "light": the theme Streamlit reported for this session (light when unknown)."""
    try:
        kind = st.context.theme.type
    except Exception:  # outside a Streamlit session (tests building pages directly)
        kind = None
    return kind if kind in THEMES else "light"


# Draws the figures of one `draw` call in the app's theme, in the page itself: text in the theme's
# text colour, grid and axes a faint shade of it, backgrounds transparent over the app's own; redrawn
# when the person switches theme, resized with their container. plotly.js is loaded by the first
# chart of a browser tab and kept by the tab, so a page's charts are drawn straight away on later
# visits. Everything stops when Streamlit removes the element (another page, a redraw).
_DRAW_JS = """
(() => {
  const root = document.getElementById(%(root)s);
  if (!root) return;
  const FALLBACK = %(fallback)s;
  const HEIGHT = %(height)d;
  const readTheme = () => {
    const el = document.querySelector(".stApp") || document.body;
    const cs = getComputedStyle(el);
    if (cs.color && cs.backgroundColor && cs.backgroundColor !== "rgba(0, 0, 0, 0)") {
      return {fg: cs.color, bg: cs.backgroundColor};
    }
    return FALLBACK;
  };
  const shade = (colour, alpha) => {
    const n = (colour.match(/[\\d.]+/g) || []).slice(0, 3);
    return n.length === 3 ? `rgba(${n[0]}, ${n[1]}, ${n[2]}, ${alpha})` : colour;
  };
  const themed = (layout, t, template) => {
    const out = {...layout, paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
                 font: {...(layout.font || {}), color: t.fg}, height: HEIGHT, template};
    for (const key of Object.keys(layout)) {
      if (/^[xy]axis\\d*$/.test(key)) {
        out[key] = {...layout[key], gridcolor: shade(t.fg, 0.12), zerolinecolor: shade(t.fg, 0.3),
                    linecolor: shade(t.fg, 0.3)};
      }
    }
    return out;
  };
  const themedData = (data, t) => data.map(tr => tr.meta === "%(foreground)s"
    ? {...tr, line: {...(tr.line || {}), color: t.fg}, marker: {...(tr.marker || {}), color: t.fg}} : tr);
  const draw = () => {
    if (!root.isConnected) return;
    const figures = JSON.parse(root.querySelector("script.figures").textContent);
    const template = JSON.parse(root.querySelector("script.template").textContent);
    const divs = root.querySelectorAll(".fig");
    let current = readTheme();
    figures.forEach((f, i) => Plotly.newPlot(divs[i], themedData(f.data, current), themed(f.layout, current, template),
                                             {displaylogo: false}));
    const resize = new ResizeObserver(() => divs.forEach(d => d.isConnected && Plotly.Plots.resize(d)));
    resize.observe(root);
    const watch = setInterval(() => {
      if (!root.isConnected) { clearInterval(watch); resize.disconnect(); return; }
      const next = readTheme();
      if (next.fg === current.fg && next.bg === current.bg) return;
      current = next;
      figures.forEach((f, i) => Plotly.react(divs[i], themedData(f.data, current), themed(f.layout, current, template)));
    }, 1000);
  };
  const failed = () => {
    root.textContent = "The charts need plotly.js from this dashboard's /app/static/ folder, and it did not "
      + "load: start the dashboard from the project folder (its .streamlit/config.toml turns on static serving).";
  };
  if (window.Plotly) { draw(); return; }
  %(loader)s
  loadPlotly(%(bundle)s).then(draw, failed);
})();
"""


# `loadPlotly(src)`: a promise that resolves once window.Plotly is there. One <script> per tab,
# however many callers ask before it arrives (`preload`, every `draw`); a failed load is forgotten,
# so a later call tries again.
LOADER_JS = """
const loadPlotly = (src) => {
  if (window.Plotly) return Promise.resolve();
  window.autodiffPlotly = window.autodiffPlotly || new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = src;
    script.onload = resolve;
    script.onerror = () => { window.autodiffPlotly = null; reject(); };
    document.head.appendChild(script);
  });
  return window.autodiffPlotly;
};
""".strip()  # no line of spaces in the element: Streamlit trims those, and tests compare the code


def preload(idle: bool = False) -> None:
    """Start loading plotly.js in this browser tab, so that a page's charts need not wait for it;
    `draw` waits for the same load. Nothing happens in a tab that has plotly.js already. Drawn in
    the sidebar, where it takes no room.

    At once (the top of a page that draws charts): the bundle's fetch and start (~0.2 s) begin
    while the server builds the figures. On the benchmark run's Curves page
    (`bench/dashboard_load.py`'s store, 5 new tabs) the request went out 0.11-0.17 s after the
    click, against 0.15-0.25 s when the charts' own script asked for it.

    `idle` (every page, from app.py): once the page has finished drawing and the browser is idle
    (`IDLE_JS`), so that a tab's first visit to Curves or Compare finds plotly.js started
    (measured on the benchmark's Curves page: ~0.35 s of a first visit's time was the bundle's
    start) without the load competing with the page the tab opened on."""
    st.sidebar.html(preload_html(idle=idle), unsafe_allow_javascript=True)


# Waits for Streamlit's script run to end (the app marks it in the DOM), then for an idle moment
# of the browser, and loads plotly.js; gives up waiting after 20 s and loads it anyway.
IDLE_JS = """
  let tries = 0;
  const wait = setInterval(() => {
    const done = document.querySelector('[data-testid="stApp"][data-test-script-state="notRunning"]');
    if (!done && ++tries < 80) return;
    clearInterval(wait);
    const load = () => loadPlotly(%s).catch(() => {});
    if (window.requestIdleCallback) requestIdleCallback(load, {timeout: 3000}); else setTimeout(load, 500);
  }, 250);
""".strip("\n")


def preload_html(bundle: str | None = None, idle: bool = False) -> str:
    """The element `preload` draws: one script, with nothing in it but the bundle's address."""
    address = json.dumps(bundle or bundle_url())
    start = IDLE_JS % address if idle else f"  loadPlotly({address}).catch(() => {{}});"
    return "<script>(() => {%s\n  if (window.Plotly) return;\n%s\n})();</script>" % (LOADER_JS, start)


def page_html(rows: Sequence[Row], *, height: int = HEIGHT, bundle: str | None = None, theme: str = "light") -> str:
    """The HTML that draws every figure of `rows` in the page (for st.html with its scripts
    allowed); a row is a figure or a tuple shown side by side. `theme` ("light" or "dark")
    colours the figures where the app's own colours cannot be read.

    Untrusted text stays data: the figures and the template sit in JSON script blocks (never run)
    with <, > and & written as \\u escapes, and the one script that runs is this module's own,
    with nothing from the store in it but the bundle's address."""
    rows = [r if isinstance(r, tuple) else (r,) for r in rows]
    divs, figures = [], []
    for row in rows:
        cells = []
        for fig in row:
            cells.append('<div class="fig"></div>')
            figures.append(_json(fig))
        divs.append(f'<div class="row">{"".join(cells)}</div>')
    data = script_json(",".join(figures))
    # The element's id: the same figures give the same id, so a redraw with nothing new is left be.
    root = "charts-" + hashlib.sha1(f"{theme}{height}{data}".encode()).hexdigest()[:16]
    fg, bg = THEMES.get(theme, THEMES["light"])
    fallback = json.dumps({"fg": fg, "bg": bg, "dark": theme == "dark"})
    script = _DRAW_JS % {"root": json.dumps(root), "fallback": fallback, "foreground": FOREGROUND,
                         "height": int(height), "bundle": json.dumps(bundle or bundle_url()),
                         "loader": LOADER_JS}
    return f"""<style>
#{root} .row {{ display: flex; flex-wrap: wrap; gap: {ROW_GAP}px 16px; margin-bottom: {ROW_GAP}px; }}
#{root} .fig {{ flex: 1 1 {MIN_WIDTH}px; min-width: 0; height: {height}px; }}
</style><div id="{root}" class="charts">
{"".join(divs)}
<script type="application/json" class="figures">[{data}]</script>
<script type="application/json" class="template">{script_json(_template())}</script>
</div>
<script>{script}</script>"""


def draw(rows: Sequence[Row], *, height: int = HEIGHT) -> None:
    """Draw the figures in the page (figures of a row go one under the other where the page is too
    narrow for them side by side)."""
    st.html(page_html(rows, height=height, theme=theme_type()), unsafe_allow_javascript=True)
