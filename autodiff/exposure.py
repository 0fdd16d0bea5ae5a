"""Is the dashboard exposed beyond this machine without a sign-in? Read by `autodiff dashboard`
before it starts the server (no Streamlit import here: the command runs from any folder, where
only the `autodiff` package is importable).

Source of the settings read: Streamlit's user authentication (the `[auth]` section of
`.streamlit/secrets.toml`), https://docs.streamlit.io/develop/concepts/connections/authentication
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path

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
