"""The dashboard's frame: navigation and shared chrome. Each page is a short script in pages/."""

from pathlib import Path

import streamlit as st

from dashboard.auth import require_sign_in
from dashboard.common import sidebar

# A local file, not a material icon name: the browser would fetch that favicon from a font CDN.
st.set_page_config(page_title="autodiff", page_icon=str(Path(__file__).parent / "dashboard" / "icon.png"),
                   layout="wide")

PAGES = [
    st.Page("pages/runs.py", title="Runs", icon=":material/list:", default=True),
    st.Page("pages/graph.py", title="Graph", icon=":material/account_tree:"),
    st.Page("pages/gradients.py", title="Gradients", icon=":material/feedback:"),
    st.Page("pages/prompts.py", title="Prompts", icon=":material/difference:"),
    st.Page("pages/proposals.py", title="Proposals", icon=":material/edit_note:"),
    st.Page("pages/curves.py", title="Curves", icon=":material/show_chart:"),
    st.Page("pages/review.py", title="Review", icon=":material/rate_review:"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare:"),
]

require_sign_in()  # only when a team configured it: see dashboard/auth.py
navigation = st.navigation(PAGES)
sidebar()
navigation.run()
