"""Who is using the dashboard: Streamlit's built-in OpenID Connect login, when it is configured.

A team deployment puts an `[auth]` section in `.streamlit/secrets.toml` (see the README, "Signing in");
then every page asks for a sign-in first (`st.login`), and review decisions and feedback are
recorded under the signed-in user's name. Without it the dashboard is for one person on their
own machine, and its decisions are recorded as "human".

Source: Streamlit's user authentication (`st.login`, `st.user`, the `[auth]` secrets section),
https://docs.streamlit.io/develop/concepts/connections/authentication
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path

import streamlit as st

ANONYMOUS = "human"  # the reviewer's name when nobody signs in

# Where Streamlit reads secrets from when started from the project root (its default paths).
SECRETS_FILES = (Path(".streamlit") / "secrets.toml", Path.home() / ".streamlit" / "secrets.toml")


def auth_section(root: Path = Path(".")) -> dict | None:
    """The `[auth]` section of the first secrets file that has one, or None. Raises ValueError
    naming the file when a secrets file is not valid TOML (Streamlit would fail on it too)."""
    for path in (root / SECRETS_FILES[0], SECRETS_FILES[1]):
        if not path.is_file():
            continue
        try:
            secrets = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML ({exc}); fix it or remove it") from None
        if isinstance(secrets.get("auth"), dict):
            return secrets["auth"]
    return None


def is_loopback(address: str) -> bool:
    """True for addresses only this machine can reach: localhost, 127.0.0.0/8, ::1."""
    if address in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume others can reach it


def exposure_warning(address: str, root: Path = Path(".")) -> str | None:
    """A warning for serving the dashboard beyond this machine with no sign-in configured, or None.
    Anyone who can reach such a dashboard can read every prompt and reply in the store, start runs
    that spend your provider budget, and accept proposals."""
    if is_loopback(address):
        return None
    try:
        if auth_section(root) is not None:
            return None
    except ValueError as exc:
        return f"warning: {exc}; the dashboard would be served at {address} with no sign-in"
    return (f"warning: the dashboard is served at {address}, beyond this machine, and no sign-in is configured: "
            "anyone who reaches it can read every prompt and reply in the store, start runs on your API keys "
            "and accept proposals. Configure Streamlit's OpenID Connect login ([auth] in .streamlit/secrets.toml; "
            "see the README, \"Signing in\") or serve on localhost behind your own authenticating proxy.")


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
