"""Plotly figures drawn in one frame with plotly.js's basic bundle, served once as a static file.

Figures are built with plotly's graph objects (`figure`); `draw` lays a page's
figures out in rows inside a single iframe. Why not `st.plotly_chart`: Streamlit's chart element
ships the full plotly.js (4.7 MB, every trace type) inside its own code, and a browser tab parses
and starts it on the first chart it meets; with seven charts the Curves page took 4.6 s to render
on this project's benchmark run (`bench/dashboard_load.py`). The basic bundle (scatter, bar and pie,
all these pages draw; 1.2 MB) starts in about a quarter of that time, and the browser caches it
across pages and tabs.

The bundle is `static/plotly-basic.min.js`, the npm package `plotly.js-basic-dist-min` at the
plotly.js version that the installed plotly package bundles (a test checks the two agree). Streamlit
serves it at /app/static/ (`enableStaticServing` in .streamlit/config.toml): nothing is fetched
from outside.

Untrusted text: labels that came from the store pass through `label` (plotly.js renders a few HTML
tags in text; escaped, they show as written); the figures' JSON sits in a JSON script block with
<, > and & written as \\u escapes, so no string can end the block.
"""

from __future__ import annotations

import functools
import html
import json
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
import streamlit as st
from plotly.utils import PlotlyJSONEncoder

from dashboard.common import static_url

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
          "legend": {"title": {"text": ""}, "orientation": "h", "x": 0, "y": -0.22, "yanchor": "top"}}


def figure(title: str, traces: Sequence, *, y: str, x: str = "step", barmode: str | None = None,
           y_range: tuple[float, float] | None = None, layout: dict | None = None) -> go.Figure:
    """A figure of graph-object traces with its title and axis names; `layout` adds to (or
    overrides) the rest of the layout. Colours come from the template `page_html` applies (plotly
    express is not used: under Streamlit its default template holds placeholder colours that only
    Streamlit's own chart element fills in)."""
    traces = list(traces)
    steps = {v for t in traces for v in (t.x if t.x is not None else ())}
    xaxis = {"title": {"text": x}, "rangemode": "tozero"}
    if len(steps) <= 20:  # whole steps only; with many steps plotly's own spacing reads better
        xaxis["dtick"] = 1
    yaxis = {"title": {"text": y}}
    if y_range:
        yaxis["range"] = list(y_range)
    return go.Figure(traces, layout={
        **LAYOUT, "template": {},  # the page's one template applies (page_html)
        "title": {"text": title}, "barmode": barmode, "xaxis": xaxis, "yaxis": yaxis, **(layout or {}),
    })


def label(text: object) -> str:
    """Text from the store (a run id, a parameter name) as a plotly label that shows as written."""
    return html.escape("" if text is None else str(text), quote=False)


def bundle_url() -> str:
    return static_url(BUNDLE.name)


def _json(obj: go.Figure | go.layout.Template) -> str:
    return obj.to_json() if isinstance(obj, go.Figure) else json.dumps(obj.to_plotly_json(), cls=PlotlyJSONEncoder)


def _script_json(text: str) -> str:
    """JSON that is safe inside a <script> block: no <, > or & appear in it literally."""
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@functools.cache
def _template() -> str:
    """plotly's plotly_white template, serialised once and given to every figure in the browser
    (assigning it to each figure in Python cost more than building the figures). Axes keep the
    margins `LAYOUT` gives them: plotly's automatic margins measure the tick labels and lay each
    figure out a second time, a fifth of the drawing time of the Curves page."""
    template = go.layout.Template(pio.templates["plotly_white"])  # a copy: the registered one stays as it is
    template.layout.xaxis.automargin = False
    template.layout.yaxis.automargin = False
    return _json(template)


def page_html(rows: Sequence[Row], *, height: int = 380, bundle: str | None = None) -> str:
    """One HTML document drawing every figure; a row is a figure or a tuple shown side by side."""
    rows = [r if isinstance(r, tuple) else (r,) for r in rows]
    divs, figures = [], []
    for row in rows:
        cells = []
        for fig in row:
            cells.append(f'<div class="fig" id="fig{len(figures)}"></div>')
            figures.append(_json(fig))
        divs.append(f'<div class="row">{"".join(cells)}</div>')
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><style>
body {{ margin: 0; font-family: sans-serif; }}
.row {{ display: flex; gap: 16px; margin-bottom: {ROW_GAP}px; }}
.fig {{ flex: 1 1 0; min-width: 0; height: {height}px; }}
</style></head><body>
{"".join(divs)}
<script type="application/json" id="figures">[{_script_json(",".join(figures))}]</script>
<script type="application/json" id="template">{_script_json(_template())}</script>
<script src="{html.escape(bundle or bundle_url())}"></script>
<script>
if (window.Plotly) {{
  const figures = JSON.parse(document.getElementById("figures").textContent);
  const template = JSON.parse(document.getElementById("template").textContent);
  figures.forEach((f, i) => Plotly.newPlot("fig" + i, f.data, {{...f.layout, height: {int(height)}, template}},
                                         {{responsive: true, displaylogo: false}}));
}} else {{
  document.body.textContent = "The charts need plotly.js from this dashboard's /app/static/ folder, and it "
    + "did not load: start the dashboard from the project folder (its .streamlit/config.toml turns on "
    + "static serving).";
}}
</script>
</body></html>"""


def draw(rows: Sequence[Row], *, height: int = 380) -> None:
    """Draw the figures in the page, in one frame sized to fit them."""
    n = len(rows)
    st.iframe(page_html(rows, height=height), height=n * (height + ROW_GAP) + 8)
