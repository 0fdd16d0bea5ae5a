"""Where a store is: a SQLite file's path or a `postgresql://` URL, and the one function that
masks a database password wherever a store is shown (pages, logs, error messages).

A spec that looks meant as a database URL but is not a valid `postgresql://` one (a mistyped
scheme, a driver suffix, a raw "@" in a password) is refused by `check_spec` with what to write
instead: it must never become a SQLite file named after the URL, password and all."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable
from urllib.parse import quote, unquote, urlsplit

from autodiff.errors import StoreError

URL_SCHEMES = ("postgresql://", "postgres://")
MASK = "***"

# A scheme as people mistype it: postgres, postgresql, pgsql, with a driver suffix or not, any
# case, followed by ":" and up to three slashes, or by slashes alone.
_SCHEME = r"(?:postgres(?:ql)?|pgsql)(?:\+[\w.\-]+)?(?::/{0,3}|/{1,3})"
# user:password@ in a URL: everything between the user's ":" and the LAST "@" of the URL, so a
# password holding a raw "@", "/" or ":" (which the URL should have percent-encoded) is masked whole.
_URL_PASSWORD = re.compile(rf"(?i)(\b{_SCHEME}[^:/@\s]*:)(\S*)(@)")
# password=... in libpq's key=value form, quoted ('...' with \' escapes) or not.
_KV_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s'\"]+)")
# What looks meant as a URL rather than a file path: a scheme of two or more letters and a slash
# ("pgsql://", "postgresql:/x"; "C:/" is a Windows drive), a driver suffix ("postgresql+psycopg:"),
# or a PostgreSQL-ish name followed by ":" or "//".
_URL_LIKE = re.compile(r"(?i)^\s*(?:[a-z][a-z0-9+.\-]+:/|[a-z][\w.\-]*\+[\w.\-]+:|(?:postgres(?:ql)?|pgsql)(?::|//))")
# The scheme part of a URL-like spec, however it was typed, to put the right one in its place.
_ANY_SCHEME = re.compile(r"(?i)^\s*[a-z][\w+.\-]*(?::/{0,3}|/{1,3})")
# libpq's key=value connection string ("host=db port=5432 dbname=runs user=me password=..."): one
# or more key=value pairs of which one names a libpq keyword. A file may hold "=" in its name, but
# not in this shape.
_KV_KEYWORDS = ("host", "hostaddr", "port", "dbname", "user", "password", "passfile", "sslmode", "service",
                "connect_timeout", "options", "application_name")
_KV_LIKE = re.compile(r"(?i)^\s*(?:[a-z_]+\s*=\s*(?:'(?:[^'\\]|\\.)*'|[^\s']*)\s*)+$")
_KV_KEY = re.compile(r"(?i)(?:^|\s)(%s)\s*=" % "|".join(_KV_KEYWORDS))
# A URL's authority with a password and no scheme ("alice:secret@db.example.org:5432/runs"): never a
# file name anyone means, and made one, it would carry the password.
_BARE_AUTHORITY = re.compile(r"^[^/:@\s]+:[^/@\s]*@[^@\s]+$")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ENCODING_HINT = ("percent-encode special characters in the user name and password (@ as %40, / as %2F, : as %3A, "
                  "% as %25, # as %23, ? as %3F), or leave the password out of the URL and set PGPASSWORD "
                  "(or ~/.pgpass)")
URL_FORM = "postgresql://user@host:port/database"


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


def mask_url(spec: str) -> str:
    """`spec` (one store URL, well-formed or not) with its password masked: everything between
    the ":" after the user name and the last "@" becomes ***. A spec without "@" is returned as is."""
    at = spec.rfind("@")
    if at < 0:
        return spec
    scheme = _ANY_SCHEME.match(spec)
    colon = spec.find(":", scheme.end() if scheme else 0, at)
    return spec if colon < 0 else spec[:colon + 1] + MASK + spec[at:]


def mask_secrets(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with every database password replaced by ***: the password part of postgresql://
    URLs (mistyped schemes and raw "@" in the password included), `password=...` in key=value
    connection strings, and each of `secrets` (a password known to be in play, raw or
    percent-encoded) wherever it appears, e.g. echoed by a driver's error message. The one masking
    function: anything that may show a store, a connection string or a database error passes
    through here."""
    text = _URL_PASSWORD.sub(rf"\1{MASK}\3", text)
    text = _KV_PASSWORD.sub(rf"\1{MASK}", text)
    for secret in secrets:
        if secret and len(secret) >= 3:  # a one- or two-letter password would mask half the text
            text = text.replace(secret, MASK)
    return text


def check_spec(spec: str | Path, source: str = "") -> str:
    """`spec` if it is a well-formed postgresql:// (or postgres://) URL or a file path; raises
    StoreError otherwise, naming the problem and what to write, with the password masked.
    Refused: anything that looks meant as a URL (`word:/`, `word+driver:`, a `postgres` or
    `pgsql` prefix with ":" or "//") but is not a lowercase postgresql:// or postgres:// URL;
    such a URL with spaces around it; one that does not parse (port, brackets); one whose user
    name or password holds a raw "@" or "/" or a "%" that is not a percent-escape. `source` says
    where the spec came from (e.g. "AUTODIFF_STORE"), for the message."""
    if not isinstance(spec, str):
        return spec
    where = f" (from {source})" if source else ""
    stripped = spec.strip()
    if _KV_LIKE.match(spec) and _KV_KEY.search(spec):
        raise StoreError(f"the store {mask_secrets(stripped)!r}{where} is a key=value connection string; give a "
                         f"PostgreSQL store as a URL instead: {_kv_as_url(stripped)!r} ({URL_FORM}; the password "
                         "percent-encoded in the URL, or left out and set in PGPASSWORD or ~/.pgpass)")
    if not _URL_LIKE.match(spec):
        if _BARE_AUTHORITY.match(stripped):  # user:password@host[:port]/db, the scheme left out
            meant = mask_url("postgresql://" + stripped)
            raise StoreError(f"the store {meant[len('postgresql://'):]!r}{where} looks like a PostgreSQL URL without "
                             f"its scheme: did you mean {meant!r}? ({URL_FORM})")
        return spec
    shown = mask_url(stripped)
    if not stripped.startswith(URL_SCHEMES):
        rest = _ANY_SCHEME.sub("", stripped, count=1)
        if re.match(r"(?i)\s*(sqlite\d?|file)\b", stripped):  # a SQLite URL as other tools write it
            # sqlite:///runs.sqlite is relative, sqlite:////abs/runs.sqlite absolute; file:///abs/runs.sqlite
            path = re.sub(r"(?i)^\s*(sqlite\d?[\w+.\-]*:(///?)?|file:(//)?)", "", stripped)
            raise StoreError(f"the store {shown!r}{where} is a URL, but a SQLite store is given as a plain file path: "
                             f"did you mean {path!r}?")
        raise StoreError(f"the store {shown!r}{where} is not a valid PostgreSQL URL: did you mean "
                         f"{mask_url('postgresql://' + rest)!r}? A PostgreSQL store is {URL_FORM} (postgres:// also "
                         "works, nothing else: no driver suffix such as +psycopg); a SQLite store is a file path "
                         "such as runs.sqlite")
    if stripped != spec:
        raise StoreError(f"the store URL {shown!r}{where} has spaces around it: remove them")
    problem = _url_problem(stripped)
    if problem:
        raise StoreError(f"cannot use the PostgreSQL store {shown}{where}: {problem}. The form is {URL_FORM}")
    return spec


def _kv_as_url(spec: str) -> str:
    """The postgresql:// URL a key=value connection string means, as far as its host, port, user
    and database go, with any password shown as *** (for a message)."""
    pairs = {k.lower(): v.strip("'") for k, v in re.findall(r"(?i)([a-z_]+)\s*=\s*('(?:[^'\\]|\\.)*'|[^\s']*)", spec)}
    user = pairs.get("user", "")
    auth = (user + (f":{MASK}" if "password" in pairs else "") + "@") if user or "password" in pairs else ""
    port = f":{pairs['port']}" if pairs.get("port") else ""
    host = pairs.get("host") or pairs.get("hostaddr") or "localhost"
    host = quote(host, safe="") if host.startswith("/") else host  # a socket folder, percent-encoded in a URL
    return f"postgresql://{auth}{host}{port}/{pairs.get('dbname', '')}"


def _url_problem(url: str) -> str | None:
    """What is wrong with a postgresql:// URL that libpq would misread or refuse, or None."""
    if any(c.isspace() for c in url):
        return "it holds a space; percent-encode it (%20)"
    try:
        parts = urlsplit(url)
    except ValueError:  # its text may hold the password: not shown
        return f"the URL does not parse (an unclosed [ of an IPv6 address?); {_ENCODING_HINT}"
    after = url[len(parts.scheme) + 3 + len(parts.netloc):]  # path, query, fragment
    # A raw "@", "/", "?" or "#" in a password cuts the authority short: the "@" lands later.
    if parts.netloc.count("@") > 1 or "@" in after.split("?", 1)[0] or ("@" in after and "@" not in parts.netloc):
        return f"its user name or password holds a raw '@', '/', '?' or '#'; {_ENCODING_HINT}"
    if _BAD_PERCENT.search(url):
        return f"it holds a '%' that is not a percent-escape (% and two hex digits); {_ENCODING_HINT}"
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:  # its text may hold the password: not shown
        return f"its port is not a number from 1 to 65535 (or a ':' in the password is not encoded); {_ENCODING_HINT}"
    return None


def resolve_spec(spec: str | Path | None = None, home: Path | None = None) -> str:
    """The store to open: `spec`, else AUTODIFF_STORE, else runs.sqlite under `home` (default
    AUTODIFF_HOME or .autodiff). A URL is returned as given; a path is not resolved. Raises
    StoreError for a spec that looks meant as a URL but is not a valid one (see `check_spec`)."""
    source = ""
    if spec is None or spec == "":
        home = home or Path(os.environ.get("AUTODIFF_HOME", ".autodiff"))
        source = "AUTODIFF_STORE" if os.environ.get("AUTODIFF_STORE") else ""
        spec = os.environ.get("AUTODIFF_STORE") or home / "runs.sqlite"
    spec = check_spec(spec, source)
    return spec if is_url(spec) else str(spec)
