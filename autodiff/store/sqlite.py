"""The SQLite backend: one file in WAL mode, a short-lived connection per use (a long-lived one
breaks when a Streamlit rerun lands on another thread), and one anchor connection held open."""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from autodiff.errors import StoreError
from autodiff.store.schema import due_migrations


class SQLiteBackend:
    """A SQLite store file at `path` (its folder is created, unless `create` is False: then the
    file must exist). Raises StoreError for a path that is a folder, or whose folder cannot be made."""

    name = "sqlite"
    no_limit = "-1"  # LIMIT -1: no limit
    insertion_order = "rowid"

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        self.spec = str(path)
        self.display = str(path)
        if self.path.is_dir():
            raise StoreError(f"the store {self.display} is a folder, not a store file: name a file, e.g. "
                             f"{self.path / 'runs.sqlite'}")
        if not create and not self.path.is_file():
            raise StoreError(f"there is no store at {self.display}: check the path (a store to read from must exist)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot make the folder of the store {self.display}: {exc.strerror or exc}") from None
        self._anchor: sqlite3.Connection | None = None

    def open(self) -> None:
        """Called once the schema is in place. Holds the anchor open, never queried: while one
        connection stays open, closing a short-lived one does not checkpoint and delete the WAL
        file, which made every store call ~15x slower."""
        with self._explained():
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
            _use_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            with conn:
                yield conn
        finally:
            conn.close()

    def migrate(self, conn: sqlite3.Connection, migrations: Sequence[tuple[str, str]], create: bool = True) -> None:
        """Apply the migrations not yet applied, in one transaction taken with the write lock
        first, so processes opening a new store at once apply each migration once. Nothing is
        written (no lock taken) when every migration is applied, so a store file this process
        may only read opens. Raises StoreError for a file that is not a SQLite database, and, when
        not `create`, for a database that holds no store."""
        with self._explained():
            due = due_migrations(self._applied(conn), migrations, create=create,
                                 no_store=f"{self.display} holds no run store (a SQLite database without the store's "
                                          "tables): check the path")
            if due:
                self._apply(conn, migrations)

    @contextmanager
    def _explained(self) -> Iterator[None]:
        """sqlite3's errors about the file itself as a StoreError that says what to do."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            text = str(exc)
            if "not a database" in text or "malformed" in text:
                raise StoreError(f"{self.display} is not a SQLite store ({text}): name a store file, or a new path "
                                 "for a new store") from None
            if "readonly" in text:
                raise StoreError(f"the store {self.display} needs its schema updated, but this process may not write "
                                 "to it: open it once as a user who may (any autodiff command does it)") from None
            if "unable to open" in text:
                raise StoreError(f"cannot open the store {self.display} ({text}): check that its folder exists and "
                                 "this user may read and write there") from None
            raise

    @staticmethod
    def _applied(conn: sqlite3.Connection) -> list[str] | None:
        """The names of the migrations applied, or None before the migrations table exists."""
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'migrations'").fetchone():
            return None
        return [row[0] for row in conn.execute("SELECT name FROM migrations")]

    def _apply(self, conn: sqlite3.Connection, migrations: Sequence[tuple[str, str]]) -> None:
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

    for_update = ""  # SQLite locks the whole file instead: see `begin_write`

    def begin_write(self, conn: sqlite3.Connection) -> None:
        """Take the write lock now, so what this transaction reads stays true until it commits."""
        conn.execute("BEGIN IMMEDIATE")

    def begin_snapshot(self, conn: sqlite3.Connection) -> None:
        """Read every following query of this transaction from one snapshot of the file."""
        conn.execute("BEGIN")

    def json_elements(self, column: str, alias: str) -> str:
        """A FROM item whose `alias.value` walks the JSON array (text) in `column`."""
        return f"json_each({column}) {alias}"

    share_lock = ""  # a fenced write holds the whole database's write lock instead (`begin_write`)

    def retrying(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """SQLite serialises writers itself (a 30 s busy timeout): nothing to retry."""
        return method(*args, **kwargs)

    def mask(self, text: str) -> str:
        return text


def _use_wal(conn: sqlite3.Connection, timeout: float = 30.0) -> None:
    """Put the database in WAL mode unless it is already. Switching needs the file to itself, and
    SQLite answers "database is locked" at once, not after its busy time-out, when several
    processes open a new store together: the switch is tried again until `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
