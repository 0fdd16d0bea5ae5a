"""The SQLite backend: one file in WAL mode, a short-lived connection per use (a long-lived one
breaks when a Streamlit rerun lands on another thread), and one anchor connection held open."""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence


class SQLiteBackend:
    """A SQLite store file at `path` (its folder is created)."""

    name = "sqlite"
    no_limit = "-1"  # LIMIT -1: no limit
    insertion_order = "rowid"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.spec = str(path)
        self.display = str(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._anchor: sqlite3.Connection | None = None

    def open(self) -> None:
        """Called once the schema is in place. Holds the anchor open, never queried: while one
        connection stays open, closing a short-lived one does not checkpoint and delete the WAL
        file, which made every store call ~15x slower."""
        self._anchor = sqlite3.connect(self.path, check_same_thread=False)
        self._anchor.execute("PRAGMA journal_mode").fetchone()

    def close(self) -> None:
        """Checkpoint and let go of the file (also happens when the store is garbage-collected)."""
        if self._anchor is not None:
            self._anchor.close()

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection whose rows read by name or position; committed when the block ends
        without error, rolled back otherwise."""
        conn = sqlite3.connect(self.path, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            with conn:
                yield conn
        finally:
            conn.close()

    def migrate(self, conn: sqlite3.Connection, migrations: Sequence[tuple[str, str]]) -> None:
        """Apply the migrations not yet applied, in one transaction taken with the write lock
        first, so processes opening a new store at once apply each migration once."""
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL)")
        done = {row[0] for row in conn.execute("SELECT name FROM migrations")}
        for name, sql in migrations:
            if name in done:
                continue
            for statement in sql.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO migrations VALUES (?, ?)", (name, time.time()))

    def json_elements(self, column: str, alias: str) -> str:
        """A FROM item whose `alias.value` walks the JSON array (text) in `column`."""
        return f"json_each({column}) {alias}"

    def retrying(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """SQLite serialises writers itself (a 30 s busy timeout): nothing to retry."""
        return method(*args, **kwargs)

    def mask(self, text: str) -> str:
        return text
