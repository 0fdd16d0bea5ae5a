"""The real dashboard on a real server, driven by headless Chromium: shared by tests/test_browser.py
and bench/dashboard_load.py.

Playwright cannot download its own browser here, so it drives Debian's chromium.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tests.servers import free_port, stop

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PAGES = ("Runs", "Graph", "Gradients", "Prompts", "Proposals", "Curves", "Review", "Compare")  # sidebar order
PROVIDER_ENV = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL")
# Grey placeholders Streamlit shows while an element's code is still loading.
SKELETONS = '[data-testid="stSkeleton"], [data-testid="stSkeletonElement"], [data-testid="stAppSkeleton"]'


@contextmanager
def dashboard_server(store_path: Path, log: Path, timeout: float = 60.0, app: Path | None = None) -> Iterator[str]:
    """The dashboard's server from the project root on a free local port, with the command
    `autodiff dashboard` runs (`autodiff.cli.dashboard_command`) and no provider key in its
    environment. Yields its URL once /_stcore/health answers ok (a health check opens no session,
    so the first page request is still the server's first).
    `app` runs another script instead, from its own folder (the benchmark's empty reference app)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in PROVIDER_ENV}
    env.update(AUTODIFF_STORE=str(store_path), AUTODIFF_CACHE=str(Path(store_path).parent / "cache.sqlite"))
    if app is None:  # the dashboard, started the way `autodiff dashboard` starts it
        from autodiff.cli import dashboard_command

        app, cmd = ROOT / "app.py", dashboard_command("127.0.0.1", port)
    else:
        cmd = [sys.executable, "-m", "streamlit", "run", app.name, "--server.headless", "true",
               "--server.port", str(port), "--server.address", "127.0.0.1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=app.parent, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the dashboard exited with code {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard did not answer on {url} within {timeout:.0f} s:\n{log.read_text()}")
            time.sleep(0.1)
        yield url
    finally:
        stop(proc)


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def nav_link(page, title: str):
    """A page's link in the sidebar navigation."""
    return page.locator('[data-testid="stSidebarNav"] a', has_text=title)


def wait_rendered(page, title: str) -> None:
    """The page's title heading is shown (so its run has begun), then the script run is over (the
    app says it is not running, the running status widget is gone), and no element is still a
    grey placeholder (Streamlit loads the code of some elements lazily on a fresh page load)."""
    page.locator("h1", has_text=title).first.wait_for(state="visible")
    page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for(state="attached")
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="detached")
    page.wait_for_function(f"() => !document.querySelector({SKELETONS!r})")


def wait_graph_drawn(page) -> None:
    """The Graph page draws the pipeline as SVG in the page itself (dashboard/graphview.py), put in
    place by the element's script: wait until it is there with its text, at a size."""
    page.wait_for_function("""() => {
        const svg = document.querySelector('[data-testid="stMain"] svg.graph');
        return !!svg && !!svg.querySelector("text") && svg.getBoundingClientRect().width > 0;
    }""")


def wait_charts_drawn(page, count: int) -> None:
    """The charts of a page (dashboard/charts.py) are drawn in the page itself; plotly.js marks each
    figure it has drawn with the class js-plotly-plot and draws its axes and traces into SVG. One
    wait in the page: a locator round trip per figure added up to 0.3 s to the benchmark's figures."""
    page.wait_for_function("""n => {
        const figures = document.querySelectorAll('[data-testid="stMain"] .charts .js-plotly-plot');
        return figures.length >= n && [...figures].every(f => {
            const svg = f.querySelector(".main-svg");
            return svg && svg.getBoundingClientRect().width > 0;
        });
    }""", arg=count)
    drawn = page.evaluate("""document.querySelectorAll('[data-testid="stMain"] .charts .js-plotly-plot').length""")
    if drawn != count:
        raise AssertionError(f"{drawn} charts drawn, {count} expected")
