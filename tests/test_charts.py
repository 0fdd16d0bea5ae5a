"""The charts' HTML (dashboard/charts.py): the bundle it serves, and untrusted labels kept as text."""

from __future__ import annotations

import json
import re

import plotly.graph_objects as go
import plotly.offline
import pytest
from dashboard import charts, common

HOSTILE = '</script><script>alert("x")</script><img src=x onerror=alert(1)>'


def scripts(page: str) -> list[tuple[str, str]]:
    return re.findall(r"<script([^>]*)>(.*?)</script>", page, re.S)


def test_the_served_bundle_is_the_plotly_js_that_plotly_targets() -> None:
    """Figures are written by the installed plotly package for the plotly.js it bundles; the
    static bundle must be that same version, to the minor (pyproject pins plotly to match; update
    static/ when moving the pin)."""
    head = charts.BUNDLE.read_text(encoding="utf-8")[:200]
    found = re.search(r"plotly\.js (?:\(basic - minified\) )?v(\S+)", head)
    assert found, head
    major_minor = lambda version: version.split(".")[:2]  # noqa: E731
    assert major_minor(found.group(1)) == major_minor(plotly.offline.get_plotlyjs_version())
    assert (charts.BUNDLE.parent / "plotly-basic.LICENSE").read_text().startswith("MIT License")


def test_hostile_labels_stay_inside_their_json_blocks() -> None:
    fig = charts.figure(f"Score {HOSTILE}", [go.Scatter(x=[0, 1], y=[0.2, 0.4], name=charts.label(HOSTILE))],
                        y="score")
    page = charts.page_html([fig, (fig, fig)], bundle="/app/static/plotly-basic.min.js")
    blocks = scripts(page)
    # Exactly the element's own three scripts: figures and template (data, never run), the drawing code.
    assert [attrs.strip() for attrs, _ in blocks] == ['type="application/json" class="figures"',
                                                      'type="application/json" class="template"', ""]
    figures = json.loads(blocks[0][1])
    assert len(figures) == 3
    assert figures[0]["layout"]["title"]["text"] == f"Score {HOSTILE}"  # the title: plotly shows it as text
    assert figures[0]["data"][0]["name"] == charts.label(HOSTILE)  # a store label: escaped for plotly
    assert "<img" not in page and "<script>alert" not in page
    assert HOSTILE not in blocks[2][1] and "Score" not in blocks[2][1]  # nothing from the store in the code
    assert '"/app/static/plotly-basic.min.js"' in blocks[2][1]  # the bundle it loads, once per browser tab
    assert re.search(r"https?://", page) is None  # nothing is fetched from outside


def test_the_same_figures_make_the_same_element() -> None:
    """A redraw with nothing new (a live page's refresh) gives Streamlit the same HTML, which it
    leaves as drawn; new figures get an element of their own."""
    one = charts.figure("t", [go.Bar(x=[0, 1], y=[1, 2])], y="v")
    two = charts.figure("t", [go.Bar(x=[0, 1], y=[1, 3])], y="v")
    assert charts.page_html([one], bundle="/b.js") == charts.page_html([one], bundle="/b.js")
    assert charts.page_html([one], bundle="/b.js") != charts.page_html([two], bundle="/b.js")


def test_label_escapes_the_tags_plotly_would_render() -> None:
    assert charts.label('run <b>1</b> & <a href="javascript:x">') == 'run &lt;b&gt;1&lt;/b&gt; &amp; &lt;a href="javascript:x"&gt;'
    assert charts.label(None) == ""


@pytest.mark.parametrize("base,url", [("", "/app/static/plotly-basic.min.js"),
                                      ("/tools/autodiff/", "/tools/autodiff/app/static/plotly-basic.min.js")])
def test_bundle_url_follows_the_base_path(monkeypatch, base, url) -> None:
    monkeypatch.setattr(common.st, "get_option", lambda name: base if name == "server.baseUrlPath" else None)
    assert charts.bundle_url() == url


def test_steps_get_whole_ticks() -> None:
    few = charts.figure("t", [go.Bar(x=[0, 1, 2], y=[1, 2, 3])], y="v")
    many = charts.figure("t", [go.Bar(x=list(range(50)), y=list(range(50)))], y="v")
    assert few.layout.xaxis.dtick == 1 and many.layout.xaxis.dtick == 10
    assert few.layout.xaxis.tickformat == many.layout.xaxis.tickformat == "d"


@pytest.mark.parametrize("unit,values,expected", [
    ("score", [0.5, 1.0], {"tickformat": ".0%"}),
    ("seconds", [3.5], {"ticksuffix": " s", "rangemode": "tozero"}),
    ("usd", [0.0012], {"tickprefix": "$", "tickformat": ",.4f"}),
    ("usd", [12.5], {"tickprefix": "$", "tickformat": ",.2f"}),
    ("count", [0, 3], {"tickformat": ",d", "dtick": 1}),
    ("tokens", [0, 0], {"range": [0, 1], "rangemode": "tozero"}),  # all zeros: from 0, never -1..1
])
def test_axes_carry_their_units(unit, values, expected) -> None:
    fig = charts.figure("t", [go.Bar(x=list(range(len(values))), y=values)], y="axis title", unit=unit)
    yaxis = fig.layout.yaxis.to_plotly_json()
    assert yaxis["title"]["text"] == "axis title"
    assert expected.items() <= yaxis.items(), yaxis


def test_a_figure_with_nothing_to_draw_says_so_instead_of_empty_axes() -> None:
    fig = charts.figure("Score per step", [go.Scatter(x=[0, 1], y=[None, float("nan")])], y="score",
                        empty="No test score yet.")
    assert fig.layout.xaxis.visible is False and fig.layout.yaxis.visible is False
    assert [a.text for a in fig.layout.annotations] == ["No test score yet."]
    assert not fig.data


def test_the_charts_follow_the_app_theme_and_force_no_white() -> None:
    """Transparent backgrounds and no text, grid or axis colour of their own: the drawing code takes
    them from the app's theme when it draws (and again when the theme changes), falling back on the
    theme Streamlit reported for the session."""
    template = json.loads(charts._template())["layout"]
    assert template["paper_bgcolor"] == template["plot_bgcolor"] == charts.TRANSPARENT
    assert "color" not in template.get("font", {})
    for name in ("xaxis", "yaxis"):
        assert not {"gridcolor", "linecolor", "zerolinecolor"} & set(template[name])
    fig = charts.figure("t", [go.Bar(x=[0, 1], y=[1, 2])], y="v")
    for theme, (fg, bg) in charts.THEMES.items():
        page = charts.page_html([fig], bundle="/app/static/plotly-basic.min.js", theme=theme)
        assert "white" not in page.lower()
        assert json.dumps({"fg": fg, "bg": bg, "dark": theme == "dark"}) in page
        assert "getComputedStyle" in page and "Plotly.react" in page  # read, and redrawn on a switch


def test_zero_bars_are_left_out_and_the_rest_kept() -> None:
    fig = charts.figure("t", [go.Bar(x=[0, 1, 2, 3], y=[0, 2, 0.0, None], name="b"),
                              go.Scatter(x=[0, 1], y=[0, 1], name="line")], y="n", unit="count")
    assert list(fig.data[0].y) == [None, 2, None, None]  # nothing drawn where nothing would show
    assert list(fig.data[1].y) == [0, 1]  # a line's zero is a point on it
    only_zeros = charts.figure("t", [go.Bar(x=[0, 1], y=[0, 0])], y="n", unit="count")
    assert only_zeros.layout.yaxis.range == (0, 1) and not only_zeros.layout.annotations  # axes, not "nothing"


def test_preload_loads_only_the_local_bundle(monkeypatch) -> None:
    drawn = []
    monkeypatch.setattr(charts.st.sidebar, "html", lambda body, **kw: drawn.append((body, kw)))
    charts.preload()
    charts.preload(idle=True)
    [(body, kw), (idle, idle_kw)] = drawn
    assert kw == idle_kw == {"unsafe_allow_javascript": True} and body == charts.preload_html()
    assert idle == charts.preload_html(idle=True) and "requestIdleCallback" in idle and "requestIdle" not in body
    for script in (body, idle):
        assert re.findall(r"https?://", script) == [] and json.dumps(charts.bundle_url()) in script
        assert "loadPlotly" in script and script.count("<script>") == 1
    # the charts' own script waits for the same load: one <script src> per tab
    page = charts.page_html([charts.figure("t", [go.Bar(x=[1], y=[1])], y="n")])
    assert "window.autodiffPlotly" in page and "loadPlotly(" in page
