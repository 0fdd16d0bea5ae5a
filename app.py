"""The dashboard's frame: navigation and shared chrome. Each page is a short script in pages/."""

from pathlib import Path

import streamlit as st

from autodiff.errors import StoreError
from dashboard import charts
from dashboard.auth import require_sign_in
from dashboard.common import sidebar, store_unreachable

# A local file, not a material icon name: the browser would fetch that favicon from a font CDN.
st.set_page_config(page_title="autodiff", page_icon=str(Path(__file__).parent / "dashboard" / "icon.png"),
                   layout="wide")

PAGES = [
    # Served at /. Its url_path only names it inside Streamlit (a default page is not reachable by
    # it), so "runs" is left free for `_runs_alias`.
    st.Page("pages/runs.py", title="Runs", icon=":material/list:", default=True, url_path="home"),
    st.Page("pages/graph.py", title="Graph", icon=":material/account_tree:"),
    st.Page("pages/gradients.py", title="Gradients", icon=":material/feedback:"),
    st.Page("pages/prompts.py", title="Prompts", icon=":material/difference:"),
    st.Page("pages/proposals.py", title="Proposals", icon=":material/edit_note:"),
    st.Page("pages/curves.py", title="Curves", icon=":material/show_chart:"),
    st.Page("pages/review.py", title="Review", icon=":material/rate_review:"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare:"),
]


def _runs_alias() -> None:
    """/runs, the Runs page by its name (what people type, and what the page's own name suggests),
    opens the Runs page at its address, /, with the query string kept (?run=...). Without it
    Streamlit answers "Page not found": a default page is served at / only."""
    st.switch_page(PAGES[0], query_params=st.query_params.to_dict())


ALIASES = [st.Page(_runs_alias, title="Runs", url_path="runs", visibility="hidden")]

require_sign_in()  # only when a team configured it: see dashboard/auth.py
navigation = st.navigation(PAGES + ALIASES)
if navigation in ALIASES:  # before the sidebar reads the address (and says what in it is wrong)
    navigation.run()
try:
    sidebar()
    charts.preload(idle=True)  # so that a first visit to Curves or Compare finds plotly.js started
    navigation.run()
except StoreError as exc:  # the database went away under the page (pages handle their own refusals)
    store_unreachable(exc)
