"""Where a store is: a SQLite file's path or a `postgresql://` URL, and the one function that
masks a database password wherever a store is shown (pages, logs, error messages)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable
from urllib.parse import unquote, urlsplit

URL_SCHEMES = ("postgresql://", "postgres://")
MASK = "***"

# user:password@ in a URL (a password cannot hold a raw "@": URLs percent-encode it).
_URL_PASSWORD = re.compile(r"(?i)(\bpostgres(?:ql)?://[^:/@\s]*:)([^@\s]*)(@)")
# password=... in libpq's key=value form, quoted ('...' with \' escapes) or not.
_KV_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s'\"]+)")


def is_url(spec: str | Path) -> bool:
    """True for a PostgreSQL URL (postgresql:// or postgres://), False for a path."""
    return isinstance(spec, str) and spec.lower().startswith(URL_SCHEMES)


def url_password(url: str) -> str | None:
    """The password written in a PostgreSQL URL, decoded, or None."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


def mask_secrets(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with every database password replaced by ***: the password part of postgresql://
    URLs, `password=...` in key=value connection strings, and each of `secrets` (a password
    known to be in play, raw or percent-encoded) wherever it appears, e.g. echoed by a driver's
    error message. The one masking function: anything that may show a store, a connection string
    or a database error passes through here."""
    text = _URL_PASSWORD.sub(rf"\1{MASK}\3", text)
    text = _KV_PASSWORD.sub(rf"\1{MASK}", text)
    for secret in secrets:
        if secret and len(secret) >= 3:  # a one- or two-letter password would mask half the text
            text = text.replace(secret, MASK)
    return text


def resolve_spec(spec: str | Path | None = None, home: Path | None = None) -> str:
    """The store to open: `spec`, else AUTODIFF_STORE, else runs.sqlite under `home` (default
    AUTODIFF_HOME or .autodiff). A URL is returned as given; a path is not resolved."""
    if spec is None or spec == "":
        home = home or Path(os.environ.get("AUTODIFF_HOME", ".autodiff"))
        spec = os.environ.get("AUTODIFF_STORE") or home / "runs.sqlite"
    return spec if is_url(spec) else str(spec)
