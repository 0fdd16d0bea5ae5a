"""The PostgreSQL server the tests use: the one AUTODIFF_TEST_POSTGRES names (CI starts it with
scripts/postgres.sh), else one this test session starts with that script and stops at the end.
Each test gets its own database, copied from a migrated template (CREATE DATABASE ... TEMPLATE,
a few milliseconds), dropped after the test."""

from __future__ import annotations

import itertools
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "postgres.sh"
ENV_URL = "AUTODIFF_TEST_POSTGRES"


def with_database(url: str, name: str) -> str:
    """`url` pointing at database `name` instead (user, password, host, port and options kept)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


class Unavailable(Exception):
    """No PostgreSQL server could be had: the reason."""


class Server:
    """A reachable server: `url` of its maintenance database, and databases made per test."""

    def __init__(self, url: str):
        import psycopg

        self.url = url
        try:
            self.admin = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise Unavailable(f"cannot connect to {ENV_URL}'s server: {exc}") from None
        self._names = (f"autodiff_test_{os.getpid()}_{n}" for n in itertools.count())
        self.template = f"autodiff_template_{os.getpid()}"
        self.admin.execute(f"DROP DATABASE IF EXISTS {self.template}")
        self.admin.execute(f"CREATE DATABASE {self.template}")
        from autodiff.store import Store

        Store(with_database(url, self.template)).close()  # migrated once; every test's copy starts migrated

    def new_database(self) -> str:
        """The URL of a fresh, migrated, empty database."""
        name = next(self._names)
        self.admin.execute(f"CREATE DATABASE {name} TEMPLATE {self.template}")
        return with_database(self.url, name)

    def drop(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        self.admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def close(self) -> None:
        self.admin.execute(f"DROP DATABASE IF EXISTS {self.template} WITH (FORCE)")
        self.admin.close()


def server() -> Iterator[Server]:
    """A server for the session: the given one, or one started here (stopped when done)."""
    url = os.environ.get(ENV_URL)
    folder = None
    if not url:
        folder = tempfile.mkdtemp(prefix="autodiff-pg-")
        try:
            started = subprocess.run(["bash", str(SCRIPT), "start", folder], capture_output=True, text=True,
                                     timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Unavailable(f"scripts/postgres.sh could not start a server: {exc}") from None
        if started.returncode != 0:
            subprocess.run(["bash", str(SCRIPT), "stop", folder], capture_output=True, timeout=120)
            raise Unavailable(f"scripts/postgres.sh could not start a server: {started.stderr.strip()[-500:]}")
        url = started.stdout.strip().splitlines()[-1]
    try:
        db = Server(url)
        try:
            yield db
        finally:
            db.close()
    finally:
        if folder:
            subprocess.run(["bash", str(SCRIPT), "stop", folder], capture_output=True, timeout=120)
