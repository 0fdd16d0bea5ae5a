"""The real dashboard in a real browser: a `streamlit run app.py` server on a store filled by engine
runs on the scripted fake (whose feedback and proposals carry <script> and <img onerror> text),
driven by headless Chromium the way a person would click through it.

Checked on every page, in Streamlit's light and dark themes at 1024 and 1400 px wide: it finishes
rendering with no exception or error box; no alert ever fires (the hostile text shows as text);
nothing is requested from any host but the dashboard's own (such requests are aborted and
recorded, and the graph must still draw); no script error and no console error from our own code.
The graph is measured as the browser draws it: its text at least 14 px on screen, no two labels or
nodes overlapping, all of it inside its frame, in the theme's colours. Also: a deep link with run,
step and parameter in its query string opens that view inside the frame, even as the very first
request a fresh server gets (the legacy pages mode workaround in dashboard/common.py), and again
after a reload; a gradient's backward call opens on a click; the Proposals page opens on a shared
link to its run, keeps that run across a reload and opens a proposal's optimizer call on a click;
a run's id in the Runs table opens that run; and starting a run with a provider model whose key
is missing says so in the page. Screenshots go to screenshots/<page>[-<theme>-<width>].png.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlparse

import pytest
from playwright.sync_api import expect

from autodiff.store import Store
from dashboard.graphview import palette
from tests.fake_runs import HOSTILE, filled_store
from tests.live_dashboard import (CHROMIUM, PAGES, ROOT, dashboard_server, launch_chromium, nav_link,
                                  wait_charts_drawn, wait_graph_drawn, wait_rendered)

SCREENSHOTS = ROOT / "screenshots"
LOCAL_HOSTS = ("127.0.0.1", "localhost")
RENDER_TIMEOUT_MS = 60_000
THEMES, WIDTHS = ("light", "dark"), (1024, 1400)
# Streamlit's front end, opened on a page's own path (/graph), first asks that path for its health
# and host config to learn whether the server sits under a base path; the two 404s answer that it
# does not. That probe is Streamlit's; any other console error fails the test.
STREAMLIT_PROBE = re.compile(r"^https?://[^/]+/[^/?#]+/_stcore/(?:health|host-config)$")
CHARTS = {"Curves": 8, "Compare": 4}  # plotly figures per page

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"browser tests need Debian's chromium at {CHROMIUM} "
                                                     "(./test.sh installs it when run as root: "
                                                     "apt-get install chromium)"),
]


# --- the server and the browser -------------------------------------------------------------

@pytest.fixture(scope="session")
def filled(tmp_path_factory) -> tuple[Store, list[str]]:
    return filled_store(tmp_path_factory.mktemp("browser_store"))


@pytest.fixture(scope="session")
def dashboard(filled, tmp_path_factory) -> Iterator[str]:
    store, _ids = filled
    with dashboard_server(store.path, tmp_path_factory.mktemp("logs") / "dashboard.log") as url:
        yield url


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        yield browser
        browser.close()


# --- a watched browser tab -----------------------------------------------------------------------

class Tab:
    """A page in a fresh browser context (`width` px wide, the system's colour scheme `theme`, which
    Streamlit's default theme follows) that records alerts, outside requests, script errors and
    console errors."""

    def __init__(self, browser, width: int = 1400, theme: str = "light") -> None:
        self.context = browser.new_context(viewport={"width": width, "height": 1000}, color_scheme=theme,
                                           service_workers="block")
        self.dialogs: list[str] = []
        self.outside: list[str] = []
        self.script_errors: list[str] = []
        self.console_errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.set_default_timeout(RENDER_TIMEOUT_MS)
        self.page.on("dialog", self._dialog)
        self.page.on("pageerror", lambda exc: self.script_errors.append(str(exc)))
        self.page.on("console", self._console)
        self.page.on("websocket", lambda ws: self._check(ws.url))

    def _console(self, message) -> None:
        url = (message.location or {}).get("url", "")
        if message.type != "error" or (message.text.startswith("Failed to load resource") and STREAMLIT_PROBE.match(url)):
            return
        self.console_errors.append(f"{message.text} (at {url or 'the page'})")

    def _route(self, route) -> None:
        if self._check(route.request.url):
            route.continue_()
        else:
            route.abort()

    def _check(self, url: str) -> bool:
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https", "ws", "wss") and parsed.hostname not in LOCAL_HOSTS:
            self.outside.append(url)
            return False
        return True

    def _dialog(self, dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def close(self) -> None:
        self.context.close()

    def assert_safe(self) -> None:
        assert not self.dialogs, f"a dialog fired: {self.dialogs}"
        assert not self.outside, f"requests to outside hosts: {self.outside}"
        assert not self.script_errors, f"uncaught script errors in the page: {self.script_errors}"
        assert not self.console_errors, f"console errors: {self.console_errors}"


@pytest.fixture
def tab(browser) -> Iterator[Tab]:
    t = Tab(browser)
    yield t
    t.close()


def assert_no_errors(page) -> None:
    for testid in ("stException", "stAlertContentError"):
        shown = page.locator(f'[data-testid="{testid}"]')
        assert shown.count() == 0, shown.all_inner_texts()


def assert_frame(page) -> None:
    """The frame drew around the page: every navigation link, the store caption, the run menu.
    Streamlit's front end loads a widget's code on its first use, so the run picker can appear a
    moment after the run that sent it has finished: these checks wait (up to a few seconds)."""
    nav = page.locator('[data-testid="stSidebarNav"]')
    for name in PAGES:
        expect(nav_link(page, name)).to_have_count(1)
    assert "app" not in [t.strip() for t in nav.locator("a").all_inner_texts()]  # no legacy page list
    sidebar = page.locator('[data-testid="stSidebar"]')
    expect(sidebar).to_contain_text("Store:")
    expect(run_picker(page)).to_have_count(1, timeout=RENDER_TIMEOUT_MS)
    assert "No runs in this store yet" not in page.locator('[data-testid="stMain"]').inner_text()


def assert_theme(page, theme: str) -> None:
    """The app is drawn in `theme`: its background is dark or light."""
    rgb = page.locator('[data-testid="stApp"]').evaluate(
        "e => getComputedStyle(e).backgroundColor.match(/\\d+/g).slice(0, 3).map(Number)")
    luminance = (0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]) / 255
    assert (luminance < 0.5) == (theme == "dark"), (theme, rgb)


def rgb(colour: str) -> str:
    """A #rrggbb colour as the browser's computed style writes it."""
    return "rgb({}, {}, {})".format(*(int(colour[i:i + 2], 16) for i in (1, 3, 5)))


def assert_graph_readable(page, theme: str) -> dict:
    """The graph as the browser drew it: every node and edge label at least 14 px on screen, no
    two of them overlapping, all inside the drawing and the drawing inside its frame (no sideways
    scrolling at these widths), its text in the theme's colour."""
    drawn = page.evaluate("""() => {
        const svg = document.querySelector('[data-testid="stMain"] svg.graph');
        const frame = svg.parentElement, box = svg.getBoundingClientRect();
        const items = [...svg.querySelectorAll("g.node, g.label")].map(g => {
            const r = g.getBoundingClientRect(), text = g.querySelector("text"), style = getComputedStyle(text);
            return {id: g.dataset.id || "label:" + text.textContent, px: parseFloat(style.fontSize),
                    color: style.fill, halo: style.stroke, left: r.left - box.left, top: r.top - box.top,
                    right: r.right - box.left, bottom: r.bottom - box.top};
        });
        return {items: items, width: box.width, height: box.height, scale: box.width / svg.width.baseVal.value,
                scrolls: frame.scrollWidth > frame.clientWidth + 1, theme: frame.className};
    }""")
    items = drawn["items"]
    assert items and min(i["px"] for i in items) >= 14, drawn
    assert not drawn["scrolls"], drawn
    for n, a in enumerate(items):
        assert a["left"] >= 0 and a["top"] >= 0 and a["right"] <= drawn["width"] and a["bottom"] <= drawn["height"], a
        for b in items[n + 1:]:
            apart = a["right"] <= b["left"] or b["right"] <= a["left"] or a["bottom"] <= b["top"] or b["bottom"] <= a["top"]
            assert apart, (a, b)
    assert {i["color"] for i in items} == {rgb(palette(theme).text)}
    return drawn


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name.lower()}.png", full_page=True)


# --- tests ---------------------------------------------------------------------------------------

def test_every_page_by_its_sidebar_link(dashboard: str, tab: Tab) -> None:
    page = tab.page
    page.goto(dashboard)
    wait_rendered(page, "Runs")
    for title in PAGES:
        if title != "Runs":
            nav_link(page, title).click()
            wait_rendered(page, title)
        assert_no_errors(page)
        assert_frame(page)
        if title == "Graph":
            wait_graph_drawn(page)
        if title in CHARTS:  # every plotly figure drawn, by the bundle the dashboard serves itself
            wait_charts_drawn(page, CHARTS[title])
        screenshot(page, title)
    tab.assert_safe()


def test_plotly_loads_once_the_first_page_is_drawn(dashboard: str, tab: Tab) -> None:
    """A tab opened on the Runs page starts plotly.js (from the dashboard's own static/) once the
    page is drawn and the browser is idle, so a first visit to Curves finds it there; the page
    itself is drawn without it."""
    page = tab.page
    bundle = []
    page.on("request", lambda r: bundle.append(r.url) if "plotly" in r.url else None)
    page.goto(dashboard)
    wait_rendered(page, "Runs")
    page.wait_for_function("() => !!window.Plotly", timeout=RENDER_TIMEOUT_MS)
    assert len(bundle) == 1 and urlparse(bundle[0]).path == "/app/static/plotly-basic.min.js", bundle
    nav_link(page, "Curves").click()
    wait_rendered(page, "Curves")
    wait_charts_drawn(page, CHARTS["Curves"])
    assert len(bundle) == 1  # the same load served the charts
    assert_no_errors(page)
    tab.assert_safe()


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("theme", THEMES)
def test_every_page_in_each_theme_and_width(dashboard: str, browser, theme: str, width: int) -> None:
    tab = Tab(browser, width=width, theme=theme)
    try:
        page = tab.page
        page.goto(dashboard)
        wait_rendered(page, "Runs")
        for title in PAGES:
            if title != "Runs":
                nav_link(page, title).click()
                wait_rendered(page, title)
            assert_no_errors(page)
            assert_frame(page)
            assert_theme(page, theme)
            if title == "Graph":
                wait_graph_drawn(page)
                assert_graph_readable(page, theme)
            if title in CHARTS:
                wait_charts_drawn(page, CHARTS[title])
            screenshot(page, f"{title}-{theme}-{width}")
        tab.assert_safe()
    finally:
        tab.close()


@pytest.fixture(scope="session")
def multihop_dashboard(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """A dashboard on a run of a multi-hop pipeline: a loop, repeated calls, edge labels."""
    from tests.test_dashboard_graph import multihop_run

    path = tmp_path_factory.mktemp("multihop_store")
    store = Store(path / "runs.sqlite")
    run_id = multihop_run(store, path / "cache.sqlite")
    with dashboard_server(store.path, path / "dashboard.log") as url:
        yield url, run_id


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("theme", THEMES)
def test_a_graph_with_loops_is_readable(multihop_dashboard, browser, theme: str, width: int) -> None:
    url, run_id = multihop_dashboard
    tab = Tab(browser, width=width, theme=theme)
    try:
        page = tab.page
        page.goto(f"{url}/graph?run={run_id}&node=retrieve")
        wait_rendered(page, "Graph")
        wait_graph_drawn(page)
        drawn = assert_graph_readable(page, theme)
        assert drawn["scale"] == 1
        labels = [i for i in drawn["items"] if str(i["id"]).startswith("label:")]
        assert len(labels) >= 3  # call-index pairs of the repeated nodes, each in its own place
        assert_no_errors(page)
        page.locator('[data-testid="stMain"] .graph-drawing').first.screenshot(
            path=SCREENSHOTS / f"graph-loops-{theme}-{width}.png")
        tab.assert_safe()
    finally:
        tab.close()


def test_the_graph_follows_a_theme_switch_without_a_rerun(multihop_dashboard, browser) -> None:
    """The person's system turns dark while Graph is open: the drawing recolours in place (node and
    label text, halos in the app's background), with no click and no rerun."""
    url, run_id = multihop_dashboard
    tab = Tab(browser, theme="light")
    try:
        page = tab.page
        page.goto(f"{url}/graph?run={run_id}&node=retrieve")
        wait_rendered(page, "Graph")
        wait_graph_drawn(page)
        assert_graph_readable(page, "light")
        page.emulate_media(color_scheme="dark")
        page.wait_for_function(
            "text => [...document.querySelectorAll('svg.graph text')].every(t => getComputedStyle(t).fill === text)",
            arg=rgb(palette("dark").text), timeout=5000)
        assert_theme(page, "dark")
        drawn = assert_graph_readable(page, "dark")
        halos = {i["halo"] for i in drawn["items"] if i["id"].startswith("label:")}
        background = page.locator('[data-testid="stApp"]').evaluate("e => getComputedStyle(e).backgroundColor")
        assert halos == {background}
        assert drawn["theme"].split() == ["graph-drawing", "dark"]
        assert_no_errors(page)
        tab.assert_safe()
    finally:
        tab.close()


def test_a_gradients_backward_call_opens_on_click(dashboard: str, tab: Tab) -> None:
    page = tab.page
    page.goto(f"{dashboard}/gradients")
    wait_rendered(page, "Gradients")
    code = page.locator('[data-testid="stMain"] [data-testid="stCode"]')
    assert code.count() == 0  # nothing loaded until a panel is opened
    page.get_by_text("Backward call that wrote it").first.click()
    code.first.wait_for(state="visible")
    wait_rendered(page, "Gradients")
    assert_no_errors(page)
    replies = code.filter(has_text="<feedback>The count missed items written as words.")
    assert replies.count() == 1 and HOSTILE in replies.inner_text()  # the reply, as plain text
    tab.assert_safe()


def test_hostile_text_shows_as_text(dashboard: str, filled, tab: Tab) -> None:
    store, ids = filled
    page = tab.page
    page.goto(f"{dashboard}/gradients")
    wait_rendered(page, "Gradients")
    assert page.get_by_text(HOSTILE).first.is_visible()  # the backward model's feedback, verbatim
    page.goto(f"{dashboard}/prompts?run={ids[0]}")  # this run accepted a proposal for the instruction
    wait_rendered(page, "Prompts")
    assert page.get_by_text(HOSTILE).first.is_visible()  # the accepted value, in the word diff
    newest = store.parameter_versions(ids[0], "counter.instruction")[-1]
    peers = store.parameter_values_at(ids[0], newest.step)
    shown = page.locator('[data-testid="stMain"] pre.plain-text')  # the peers' values, as written
    assert shown.all_inner_texts() == [peers["counter.output_format"], peers["counter.examples"]]
    assert page.locator('[data-testid="stCode"]').count() == 0  # as text, not code to highlight
    for frame in page.frames:
        assert frame.locator("script:has-text('alert(')").count() == 0, frame.url
        assert frame.locator('img[src="x"]').count() == 0, frame.url
    tab.assert_safe()


def run_picker(page):
    """The sidebar's run menu: a button that names the chosen run and opens the run selectbox."""
    return page.locator('[data-testid="stSidebar"]').get_by_role("button", name=re.compile("^Run: "))


def names_run(run_id: str) -> re.Pattern:
    """The run menu's label when `run_id` is chosen (a longer id that starts the same does not match)."""
    return re.compile(rf"Run: {re.escape(run_id)}(?![\w.-])")


def choose_run(page, run_id: str) -> None:
    """Pick `run_id` in the sidebar's run menu, as a person would."""
    run_picker(page).click()
    page.get_by_test_id("stPopoverBody").get_by_role("combobox", name="Run", exact=True).click()
    page.get_by_role("option", name=run_id, exact=True).click()


def test_proposals_page_on_a_shared_link(dashboard: str, filled, tab: Tab) -> None:
    _store, ids = filled
    page = tab.page
    page.goto(f"{dashboard}/proposals?run={ids[0]}&fate=accepted")  # not the newest run
    wait_rendered(page, "Proposals")
    assert_no_errors(page)
    assert_frame(page)
    expect(run_picker(page)).to_have_text(names_run(ids[0]), use_inner_text=True)
    main = page.locator('[data-testid="stMain"]')
    expect(main).to_contain_text("1 of ")
    assert page.get_by_text(HOSTILE).first.is_visible()  # the proposed value, in its word diff, as text
    code = main.locator('[data-testid="stCode"]')
    assert code.count() == 0  # the optimizer call is loaded only when its panel is opened
    page.get_by_text("Optimizer call that wrote it").first.click()
    code.filter(has_text="Target parameter").first.wait_for(state="visible")
    wait_rendered(page, "Proposals")
    assert_no_errors(page)
    screenshot(page, "Proposals-call")

    page.reload()  # the address names the view: the same run and filter after a reload
    wait_rendered(page, "Proposals")
    expect(run_picker(page)).to_have_text(names_run(ids[0]), use_inner_text=True)
    query = parse_qs(urlparse(page.url).query)
    assert query["run"] == [ids[0]] and query["fate"] == ["accepted"]
    for frame in page.frames:
        assert frame.locator("script:has-text('alert(')").count() == 0, frame.url
        assert frame.locator('img[src="x"]').count() == 0, frame.url
    tab.assert_safe()


def test_a_run_in_the_runs_table_opens_that_run(dashboard: str, filled, tab: Tab) -> None:
    _store, ids = filled
    page = tab.page
    page.goto(dashboard)
    wait_rendered(page, "Runs")
    expect(run_picker(page)).to_have_text(names_run(ids[-1]), use_inner_text=True)  # the newest
    page.locator('[data-testid="stMain"] table a', has_text=ids[0]).click()
    wait_rendered(page, "Curves")
    expect(run_picker(page)).to_have_text(names_run(ids[0]), use_inner_text=True)
    assert urlparse(page.url).path == "/curves" and parse_qs(urlparse(page.url).query)["run"] == [ids[0]]
    assert_no_errors(page)
    tab.assert_safe()


def test_the_run_menu_picks_a_run(dashboard: str, filled, tab: Tab) -> None:
    """The run picker sits in a popover (its selectbox is drawn when the menu is opened): a run
    chosen there is the page's run, in the menu's label and the address, on the next page too; the
    menu closes after the pick, and its list shows whole ids."""
    _store, ids = filled
    page = tab.page
    page.goto(dashboard)
    wait_rendered(page, "Runs")
    expect(run_picker(page)).to_have_text(names_run(ids[-1]), use_inner_text=True)
    run_picker(page).click()
    body = page.get_by_test_id("stPopoverBody")
    body.get_by_role("combobox", name="Run", exact=True).click()
    for run_id in ids:  # no id cut short in the list
        option = page.get_by_role("option", name=run_id, exact=True)
        assert option.evaluate("o => o.scrollWidth <= o.clientWidth + 1"), run_id
    page.get_by_role("option", name=ids[0], exact=True).click()
    expect(run_picker(page)).to_have_text(names_run(ids[0]), use_inner_text=True)
    expect(body).to_be_hidden()  # the pick closed the menu
    wait_rendered(page, "Runs")
    assert parse_qs(urlparse(page.url).query)["run"] == [ids[0]]
    nav_link(page, "Graph").click()
    wait_rendered(page, "Graph")
    expect(run_picker(page)).to_have_text(names_run(ids[0]), use_inner_text=True)
    assert parse_qs(urlparse(page.url).query)["run"] == [ids[0]]
    assert_no_errors(page)
    tab.assert_safe()


@pytest.mark.parametrize("title", ["Graph", "Review", "Compare"])
def test_deep_link_opens_inside_the_frame(dashboard: str, tab: Tab, title: str) -> None:
    page = tab.page
    page.goto(f"{dashboard}/{title.lower()}")
    wait_rendered(page, title)
    assert_no_errors(page)
    assert_frame(page)
    assert urlparse(page.url).path == f"/{title.lower()}"
    if title == "Graph":
        wait_graph_drawn(page)
    tab.assert_safe()


def test_runs_by_name_opens_the_runs_page(dashboard: str, filled, tab: Tab) -> None:
    """/runs is the Runs page (the default page, also at /), on the run the address names: not
    Streamlit's "Page not found"."""
    _store, ids = filled
    page = tab.page
    page.goto(f"{dashboard}/runs?run={ids[0]}")  # not the newest run
    wait_rendered(page, "Runs")
    expect(run_picker(page)).to_have_text(names_run(ids[0]), use_inner_text=True)
    assert urlparse(page.url).path in ("/", "/runs") and parse_qs(urlparse(page.url).query)["run"] == [ids[0]]
    expect(page.get_by_text("Page not found")).to_have_count(0)
    assert_no_errors(page)
    assert_frame(page)
    page.goto(f"{dashboard}/runs?run=no-such-run")  # said, as on every other page
    wait_rendered(page, "Runs")
    expect(page.locator('[data-testid="stMain"]')).to_contain_text("'no-such-run' (from the address) is not in this store")
    tab.assert_safe()


def test_deep_link_as_a_fresh_servers_first_request(filled, tab: Tab, tmp_path: Path) -> None:
    """A pages/ folder beside app.py puts a fresh Streamlit server in its legacy multipage mode
    until st.navigation first runs; a first request for /proposals?run=... then ran
    pages/proposals.py without app.py: no sidebar, no run chosen, "No runs". The frame must draw
    it all the same, on the run, step and parameter the link names, and again after a reload
    (this guards `_leave_legacy_pages_mode` in dashboard/common.py)."""
    store, ids = filled
    link = {"run": ids[0], "step": "1", "parameter": "counter.instruction"}  # not the newest run

    def assert_linked_view() -> None:
        wait_rendered(page, "Proposals")
        assert_frame(page)
        assert_no_errors(page)
        assert urlparse(page.url).path == "/proposals"
        assert page.get_by_text("Page not found").count() == 0
        expect(run_picker(page)).to_have_text(names_run(ids[0]), use_inner_text=True)
        main = page.locator('[data-testid="stMain"]')
        expect(main.get_by_role("combobox", name="Step")).to_have_value("1")
        expect(main.get_by_role("combobox", name="Parameter")).to_have_value("counter.instruction")
        query = parse_qs(urlparse(page.url).query)
        assert {k: query[k] for k in link} == {k: [v] for k, v in link.items()}, page.url

    with dashboard_server(store.path, tmp_path / "dashboard.log") as url:
        page = tab.page
        page.goto(f"{url}/proposals?run={ids[0]}&step=1&parameter=counter.instruction")
        page.locator('h1, [data-testid="stAlert"]').first.wait_for(state="visible")  # a title, or "No runs"
        page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for(state="attached")
        assert_linked_view()
        page.reload()
        assert_linked_view()
        nav_link(page, "Graph").click()  # and the session goes on normally, on the same run
        wait_rendered(page, "Graph")
        assert_no_errors(page)
        assert_frame(page)
        expect(run_picker(page)).to_have_text(names_run(ids[0]), use_inner_text=True)
        wait_graph_drawn(page)
    tab.assert_safe()


def test_start_form_says_the_key_is_missing(dashboard: str, filled, tab: Tab) -> None:
    store, _ids = filled
    before = [r.id for r in store.runs()]
    page = tab.page
    page.goto(dashboard)
    wait_rendered(page, "Runs")
    page.get_by_role("button", name="Start a run").click()  # with runs in the store: a dialog
    dialog = page.get_by_role("dialog")
    forward = dialog.get_by_role("textbox", name="Forward model")
    forward.fill("openai:gpt-4o-mini")
    dialog.get_by_role("button", name="Start", exact=True).click()
    error = dialog.locator('[data-testid="stAlertContentError"]')
    error.wait_for(state="visible")
    wait_rendered(page, "Runs")
    assert "no OpenAI API key" in error.inner_text(), error.inner_text()
    assert "OPENAI_API_KEY" in error.inner_text(), error.inner_text()
    assert page.locator('[data-testid="stException"]').count() == 0
    assert [r.id for r in store.runs()] == before  # nothing was registered
    screenshot(page, "runs-missing-key")
    tab.assert_safe()


def open_start_form(page, url: str):
    """The Runs page's start dialog, opened, with scripted fake models in every role."""
    page.goto(url)
    wait_rendered(page, "Runs")
    page.get_by_role("button", name="Start a run").click()
    dialog = page.get_by_role("dialog")
    for role in ("Forward", "Backward", "Optimizer"):
        dialog.get_by_role("textbox", name=f"{role} model").fill(f"fake:{role.lower()}")
    return dialog


def test_start_form_says_why_a_number_is_refused(dashboard: str, filled, tab: Tab) -> None:
    """What is typed in a number field reaches the page as typed: a decimal in a whole-number
    field, a number past what a browser holds exactly and an empty required field are each refused
    by name with the text given, and nothing is registered (the browser's own number field rounded
    2.5 to 2, and turned an empty field into -9007199254740991)."""
    store, _ids = filled
    before = [r.id for r in store.runs()]
    page = tab.page
    dialog = open_start_form(page, dashboard)
    dialog.get_by_role("textbox", name="Steps").fill("2.5")
    dialog.get_by_role("textbox", name="Batch size").fill("99999999999999999999")
    dialog.get_by_role("textbox", name="Failed samples per step").fill("")
    dialog.get_by_role("button", name="Start", exact=True).click()
    error = dialog.locator('[data-testid="stAlertContentError"]')
    expect(error).to_contain_text("Steps: 2.5 is not a whole number")
    expect(error).to_contain_text("Batch size: Input should be less than or equal to 256 (given: 99999999999999999999)")
    expect(error).to_contain_text("Failed samples per step: empty: enter a whole number, 1 to 256")
    expect(dialog.get_by_role("textbox", name="Steps")).to_have_value("2.5")  # as typed, not rewritten
    assert [r.id for r in store.runs()] == before
    tab.assert_safe()


def test_the_start_dialog_stays_open_when_a_live_run_ends(tab: Tab, tmp_path: Path) -> None:
    """A person is typing in the start dialog when the last running run ends: the live table
    shows it ended, and the dialog stays open with what was typed, the focus where it was and
    the last Start's refusal (a rerun of the whole page closed it and lost the input); dismissing
    it then brings the rest of the page up to date."""
    import os

    store, ids = filled_store(tmp_path)
    store.set_run_status(ids[0], "running", pid=os.getpid())  # alive: this test's own process
    with dashboard_server(store.path, tmp_path / "dashboard.log") as url:
        page = tab.page
        page.goto(url)
        wait_rendered(page, "Runs")
        expect(page.get_by_role("button", name=f"Stop {ids[0]}")).to_be_visible()
        page.get_by_role("button", name="Start a run").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_role("textbox", name="Steps").fill("7.5")
        dialog.get_by_role("button", name="Start", exact=True).click()
        refused = dialog.locator('[data-testid="stAlertContentError"]')
        expect(refused).to_contain_text("Steps: 7.5 is not a whole number")
        dialog.get_by_role("textbox", name="Steps").fill("7")
        dialog.get_by_role("textbox", name="Forward model").fill("local:/my/model")
        store.set_run_status(ids[0], "completed")
        expect(page.get_by_role("button", name=f"Stop {ids[0]}")).to_have_count(0, timeout=15_000)  # it saw the end
        page.wait_for_timeout(4000)  # another round of the live table
        page.keyboard.type(".gguf")  # the field still has the focus: typing goes on where it was
        expect(dialog).to_be_visible()
        expect(dialog.get_by_role("textbox", name="Steps")).to_have_value("7")
        expect(dialog.get_by_role("textbox", name="Forward model")).to_have_value("local:/my/model.gguf")
        expect(refused).to_contain_text("Steps: 7.5 is not a whole number")  # the last Start's answer stays
        page.keyboard.press("Escape")
        expect(dialog).to_have_count(0)
        wait_rendered(page, "Runs")
        assert_no_errors(page)
    tab.assert_safe()


def test_a_run_started_in_the_browser_goes_on_in_the_background(tab: Tab, tmp_path: Path) -> None:
    """The start dialog launches a detached run (scripted fake models here); the page follows it
    live and the sidebar shows it completed, with no reload by hand."""
    store, ids = filled_store(tmp_path)
    with dashboard_server(store.path, tmp_path / "dashboard.log") as url:
        page = tab.page
        dialog = open_start_form(page, url)
        dialog.get_by_role("textbox", name="Steps").fill("1")
        dialog.get_by_role("button", name="Start", exact=True).click()
        expect(page.get_by_text("in the background: it goes on if you close this tab")).to_be_visible()
        expect(dialog).to_have_count(0)
        [new] = [r.id for r in store.runs() if r.id not in ids]
        assert store.run(new).config["forward_model"] == "fake:forward" and store.run(new).config["steps"] == 1
        sidebar = page.locator('[data-testid="stSidebar"]')
        expect(run_picker(page)).to_have_text(names_run(new), use_inner_text=True)  # the picker follows it
        expect(sidebar).to_contain_text("object_counting, completed", timeout=120_000)
        assert_no_errors(page)
        screenshot(page, "runs-started")
    assert store.run(new).status == "completed"
    tab.assert_safe()
