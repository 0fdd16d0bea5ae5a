"""The PostgreSQL backend: psycopg 3 through a psycopg-pool connection pool, for a team sharing one
store (several trainers writing, dashboards reading, on any machine that reaches the database).

Every difference from SQLite lives here: placeholders (`?` -> `%s`), column types (REAL is
DOUBLE PRECISION; text compares byte-wise, as in SQLite), the covering index SQLite needs,
booleans (stored as 0/1 integers, as in SQLite), text holding NUL characters (`escape_text`),
reading JSON text arrays, and numbers that PostgreSQL sums into NUMERIC. Transactions run at
READ COMMITTED (PostgreSQL's default): each store call is one short transaction on rows no other
writer touches, so no serialization failures arise; a deadlock the server breaks is retried
(tenacity) instead of reaching a user. Passwords come from the URL, PGPASSWORD, ~/.pgpass or the
libpq environment and are masked (`spec.mask_secrets`) in everything this backend shows or raises.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlsplit

from autodiff.errors import StoreError, StoreUnreachable
from autodiff.store.schema import due_migrations
from autodiff.store.spec import mask_secrets, url_password

POOL_SIZE = 8  # connections per process at most: a trainer's call buffer, its step and a page or two
CONNECT_TIMEOUT_S = 10
POOL_WAIT_S = 60  # how long a store call waits for a free pooled connection
MIGRATION_LOCK = 7_274_823_002  # pg_advisory_xact_lock key: one process migrates at a time
RETRY_ATTEMPTS = 6


def translate_ddl(statement: str) -> str:
    """A schema statement written for both databases, as PostgreSQL must have it: REAL is 4 bytes
    there (DOUBLE PRECISION is SQLite's REAL); text sorts and compares byte-wise (COLLATE "C",
    SQLite's BINARY), whatever the database's locale; and the covering index SQLite reads call
    totals from would hold whole error messages, which PostgreSQL's B-tree entries (2.7 kB at
    most) cannot, so there it is a plain index on the columns calls are grouped by."""
    if re.match(r"\s*CREATE INDEX llm_calls_accounting\b", statement):
        return "CREATE INDEX llm_calls_accounting ON llm_calls (run_id, step, phase)"
    statement = re.sub(r"\bREAL\b", "DOUBLE PRECISION", statement)
    return re.sub(r"\bTEXT\b", 'TEXT COLLATE "C"', statement)


@functools.lru_cache(maxsize=1024)
def translate_query(sql: str) -> str:
    """A query with `?` placeholders in psycopg's form (`%s`, a literal % doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


# PostgreSQL text cannot hold NUL ("\x00"); SQLite's can, and an LLM reply, a dataset or a user's
# code may carry one. So every text value this backend writes is escaped, one character at a time
# and reversibly, and every text value it reads is unescaped: NUL becomes ESC "0" and ESC itself
# ESC "e", where ESC is U+E000 (a private-use character, next to never in text). The store's API,
# `store copy` and its content hashes see the text as written, on both backends; equality and
# prefixes (`=`, `IN`, `LIKE 'x%'`) hold on the escaped text as on the original. Only SQL run
# outside the store (psql) sees the escapes, and text with NUL or ESC in it may sort differently
# there than in SQLite.
ESC = "\ue000"
_ESCAPES = {"\x00": ESC + "0", ESC: ESC + "e"}
_UNESCAPES = {"0": "\x00", "e": ESC}
_ESCAPED = re.compile("[\x00\ue000]")
_ESCAPE_PAIR = re.compile("\ue000(.)", re.DOTALL)


def escape_text(text: str) -> str:
    """`text` as this backend stores it: with no NUL (see ESC above)."""
    return _ESCAPED.sub(lambda m: _ESCAPES[m.group()], text) if "\x00" in text or ESC in text else text


def unescape_text(text: str) -> str:
    """The text `escape_text` was given. A lone ESC (a row written by something else) is kept."""
    return _ESCAPE_PAIR.sub(lambda m: _UNESCAPES.get(m.group(1), m.group()), text) if ESC in text else text


def _adapt(params: Sequence[Any]) -> tuple:
    """Booleans are stored as 0/1 integers, as in SQLite; text is escaped (`escape_text`)."""
    return tuple(int(v) if isinstance(v, bool) else escape_text(v) if isinstance(v, str) else v for v in params)


class Row:
    """A result row that reads like sqlite3.Row: by column name or position, `keys()`, `dict(row)`;
    text values come back unescaped (`unescape_text`), when read."""

    __slots__ = ("_values", "_index")

    def __init__(self, values: Sequence[Any], index: dict[str, int]):
        self._values = values
        self._index = index

    def __getitem__(self, key: int | str) -> Any:
        value = self._values[self._index[key]] if isinstance(key, str) else self._values[key]
        return unescape_text(value) if value.__class__ is str else value

    def keys(self) -> list[str]:
        return list(self._index)

    def __iter__(self) -> Iterator[Any]:
        return (unescape_text(v) if v.__class__ is str else v for v in self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._index, self._values))!r})"


def _row_factory(cursor: Any) -> Callable[[Sequence[Any]], Row]:
    index = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: Row(values, index)


class PgConnection:
    """One pooled connection inside one transaction, with sqlite3's `execute`/`executemany` and
    `?` placeholders, so the store's SQL is written once."""

    def __init__(self, raw: Any):
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        if not params:  # sent as written: no placeholders, a % is a literal
            return self.raw.execute(sql)
        return self.raw.execute(translate_query(sql), _adapt(params))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        rows = [_adapt(r) for r in rows]
        if rows:
            with self.raw.cursor() as cursor:
                cursor.executemany(translate_query(sql), rows)


class PostgresBackend:
    """A PostgreSQL store at `url` (postgresql://user[:password]@host[:port]/database)."""

    name = "postgresql"
    no_limit = "ALL"  # LIMIT ALL: no limit
    insertion_order = "ctid"

    def __init__(self, url: str, wait_s: float | None = None):
        try:  # installed with the project; a clear word if not
            import psycopg  # noqa: F401
            import psycopg_pool  # noqa: F401
        except ImportError:
            raise StoreError("a PostgreSQL store needs psycopg 3 and psycopg-pool: "
                             "pip install 'psycopg[binary]' psycopg-pool") from None
        self.spec = url
        try:
            raw_password = urlsplit(url).password
        except ValueError:
            raw_password = None
        self._secrets = (raw_password, url_password(url))
        self.display = self.mask(url)
        self.wait_s = POOL_WAIT_S if wait_s is None else wait_s
        self._pool: Any = None

    def mask(self, text: str) -> str:
        return mask_secrets(text, self._secrets)

    def _unreachable(self, exc: BaseException) -> StoreError:
        reason = self.mask(str(exc).strip()).rstrip(".?!") or type(exc).__name__  # the sentence ends here
        return StoreError(f"cannot use the PostgreSQL store {self.display}: {reason}. Check the URL, that the "
                          "server runs and lets this user in; a password goes in the URL, PGPASSWORD or ~/.pgpass")

    def open(self) -> None:
        """Connect once (so a wrong URL, password or host fails here with the server's reason,
        not later as a pool time-out), then open the pool."""
        import psycopg
        from psycopg_pool import ConnectionPool

        try:
            with psycopg.connect(self.spec, connect_timeout=CONNECT_TIMEOUT_S):
                pass
        except psycopg.Error as exc:
            raise self._unreachable(exc) from None
        self._pool = ConnectionPool(
            self.spec, min_size=1, max_size=POOL_SIZE, timeout=self.wait_s, open=True, configure=_configure,
            check=ConnectionPool.check_connection, kwargs={"connect_timeout": CONNECT_TIMEOUT_S},
            name="autodiff-store")

    def close(self) -> None:
        """Close the pool's connections (a store not closed keeps them until the process ends)."""
        if self._pool is not None:
            self._pool.close()

    @contextmanager
    def connect(self) -> Iterator[PgConnection]:
        """A pooled connection in a transaction: committed when the block ends without error,
        rolled back otherwise."""
        import psycopg
        from psycopg_pool import PoolTimeout

        if self._pool is None:
            raise StoreError(f"the PostgreSQL store {self.display} is not open")
        try:
            conn = self._pool.getconn()
        except (PoolTimeout, psycopg.OperationalError) as exc:  # it opened before: the server went away
            reason = self.mask(str(exc).strip()) or type(exc).__name__
            raise StoreUnreachable(f"the PostgreSQL store {self.display} did not answer ({reason}): its server is down "
                                   "or restarting, or the network to it is cut") from None
        try:
            yield PgConnection(conn)
            conn.commit()
        except BaseException as exc:
            with contextlib.suppress(psycopg.Error):
                conn.rollback()
            if isinstance(exc, psycopg.errors.InsufficientPrivilege):
                raise self._not_allowed(conn, exc) from None
            raise
        finally:
            self._pool.putconn(conn)

    def _not_allowed(self, conn: Any, exc: BaseException) -> StoreError:
        user = conn.info.user
        return StoreError(f"the database user {user!r} lacks a right the store {self.display} needs "
                          f"({self.mask(str(exc).strip().splitlines()[0])}): have an administrator grant it, e.g. "
                          f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {user}")

    def migrate(self, conn: PgConnection, migrations: Sequence[tuple[str, str]], create: bool = True) -> None:
        """Apply the migrations not yet applied, in one transaction, one process at a time. When
        every migration is applied (read first) nothing is written and no DDL runs, so a user
        who may use the tables but not create any opens the store. Raises StoreError when a
        migration is due but the user may not create tables (naming the right and what to do),
        and, when not `create`, for a database that holds no store."""
        import psycopg

        due = due_migrations(self._applied(conn), migrations, create=create,
                             no_store=f"the database of {self.display} holds no run store (no migrations table): "
                                      "check the URL's database name")
        if not due:
            return
        try:
            conn.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            conn.execute(translate_ddl("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL)"))
            done = {row[0] for row in conn.execute("SELECT name FROM migrations")}
            for name, sql in migrations:
                if name in done:
                    continue
                for statement in sql.split(";"):
                    if statement.strip():
                        conn.execute(translate_ddl(statement))
                conn.execute("INSERT INTO migrations VALUES (?, ?)", (name, time.time()))
        except psycopg.errors.InsufficientPrivilege as exc:
            user = conn.raw.info.user
            raise StoreError(
                f"the store {self.display} needs {len(due)} schema migration{'s' if len(due) != 1 else ''} "
                f"({', '.join(due)}), but the database user {user!r} may not make or change its tables "
                f"({self.mask(str(exc).strip().splitlines()[0])}). Open the store once as a user who may (the owner of the database and its "
                f"tables: any autodiff command migrates it), or have an administrator grant the right: GRANT CREATE "
                f"ON SCHEMA public TO {user} (changing a table also takes owning it)") from None

    def _applied(self, conn: PgConnection) -> list[str] | None:
        """The names of the migrations applied, or None before the migrations table exists."""
        if conn.execute("SELECT to_regclass('migrations') IS NULL").fetchone()[0]:
            return None
        return [row[0] for row in conn.execute("SELECT name FROM migrations")]

    for_update = " FOR UPDATE"  # a row read to be written is locked until the transaction ends

    def begin_write(self, conn: PgConnection) -> None:
        """Nothing to do: PostgreSQL locks the rows read `FOR UPDATE`."""

    def begin_snapshot(self, conn: PgConnection) -> None:
        """Read every following query of this transaction from one snapshot of the database
        (REPEATABLE READ; the default, READ COMMITTED, takes a new one per statement)."""
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def json_elements(self, column: str, alias: str) -> str:
        """A FROM item whose `alias.value` walks the JSON array (text) in `column`."""
        return f"jsonb_array_elements_text(CAST({column} AS jsonb)) AS {alias}(value)"

    # A fenced write reads its run's row FOR SHARE: a takeover (an UPDATE of that row) waits until
    # the write commits, or the write, coming second, reads the new holder and writes nothing.
    share_lock = " FOR SHARE"

    def retrying(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a store call (one transaction), again after a deadlock or serialization failure."""
        from psycopg import errors
        from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

        for attempt in Retrying(retry=retry_if_exception_type((errors.DeadlockDetected, errors.SerializationFailure)),
                                stop=stop_after_attempt(RETRY_ATTEMPTS), wait=wait_random_exponential(0.02, max=1.0),
                                reraise=True):
            with attempt:
                return method(*args, **kwargs)
        raise AssertionError("unreachable: tenacity re-raises the last error")


def _configure(conn: Any) -> None:
    """Each pooled connection: rows like sqlite3.Row, and NUMERIC (what SUM over integers gives)
    read as int or float as SQLite returns them, not Decimal."""
    from psycopg.adapt import Loader

    class NumberLoader(Loader):
        def load(self, data: Any) -> int | float:
            text = bytes(data).decode()
            return int(text) if text.lstrip("-").isdigit() else float(text)

    conn.row_factory = _row_factory
    conn.adapters.register_loader("numeric", NumberLoader)
    conn.commit()
