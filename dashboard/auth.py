"""Who is using the dashboard: Streamlit's built-in OpenID Connect login, when it is configured.

A team deployment puts an `[auth]` section in `.streamlit/secrets.toml` (see the README, "Signing in");
then every page asks for a sign-in first (`st.login`), and review decisions and feedback are
recorded under the signed-in user's name (`autodiff dashboard` warns when served beyond this
machine without one: autodiff/exposure.py). Without it the dashboard is for one person on their
own machine, and its decisions are recorded as "human".

Source: Streamlit's user authentication (`st.login`, `st.user`, the `[auth]` secrets section),
https://docs.streamlit.io/develop/concepts/connections/authentication
"""

from __future__ import annotations

import streamlit as st

ANONYMOUS = "human"  # the reviewer's name when nobody signs in


def _configured() -> bool:
    try:
        return "auth" in st.secrets
    except Exception:  # noqa: BLE001 - no secrets file at all (Streamlit raises its own not-found error)
        return False


def require_sign_in() -> None:
    """When a sign-in is configured and the visitor has not signed in: a sign-in button, and the page
    stops there. Does nothing otherwise."""
    if not _configured() or st.user.is_logged_in:
        return
    st.title("autodiff")
    st.write("This dashboard is shared by a team: sign in to see its runs.")
    if st.button("Sign in", type="primary"):
        st.login()
    st.stop()


def reviewer() -> str:
    """The name review decisions and feedback are recorded under: the signed-in user's name (or
    e-mail), else "human"."""
    if _configured() and st.user.is_logged_in:
        for claim in ("name", "email", "preferred_username", "sub"):
            value = st.user.get(claim)
            if value:
                return str(value)
    return ANONYMOUS
