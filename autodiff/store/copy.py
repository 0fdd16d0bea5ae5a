"""Moving runs between stores (a laptop's SQLite and a team's PostgreSQL, either way) with nothing
lost: every row of every table of a run is copied as stored, and after the copy each table's row
count and content hash, read back from the destination, must match what was read from the source.
A run that something may be writing (queued, running) is not copied, on either side,
unless the source's is asked for as a snapshot (see `copy_runs`)."""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

from autodiff.errors import StoreError
from autodiff.store.core import Store

# Every table that holds a run's records, with the column naming the run. `runs` first: the
# other rows belong to it.
RUN_TABLES: tuple[tuple[str, str], ...] = (
    ("runs", "id"), ("samples", "run_id"), ("parameters", "run_id"), ("parameter_versions", "run_id"),
    ("steps", "run_id"), ("invocations", "run_id"), ("gradients", "run_id"), ("llm_calls", "run_id"),
    ("proposals", "run_id"), ("evaluations", "run_id"), ("run_events", "run_id"),
)
_BATCH = 500


@dataclass(frozen=True)
class TableCheck:
    """One table of one run in both stores: row counts and sha256 of the rows' content."""

    table: str
    source_rows: int
    copied_rows: int
    source_hash: str
    copied_hash: str

    @property
    def equal(self) -> bool:
        return self.source_rows == self.copied_rows and self.source_hash == self.copied_hash


@dataclass(frozen=True)
class RunCopy:
    """What copying one run did: `replaced` (the run was in the destination before) and a
    check per table (see `RUN_TABLES`), all equal once `copy_runs` returns."""

    run_id: str
    replaced: bool
    tables: tuple[TableCheck, ...]
    # When the run replaced one of another task or other models (two people's runs of one name):
    # what that one was, "task trec, models fake:x (every role), completed", else "".
    replaced_other: str = ""


def _what(run) -> str:
    """A run's task, models and status, to tell two runs of one name apart."""
    models = [run.config.get(f"{role}_model") for role in ("forward", "backward", "optimizer")]
    said = models[0] + " (every role)" if len(set(models)) == 1 else ", ".join(map(str, models))
    return f"task {run.task}, models {said}, {run.status}"


def _canonical(value: Any) -> Any:
    """A stored value as both databases give it back: whole floats as ints (SQLite may return a
    REAL column's 1.0 as 1.0 and an INTEGER's 1 as 1; PostgreSQL the same), NaN as a string."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if value.is_integer() and abs(value) < 2**53:
            return int(value)
        return repr(value)
    return value


def _rows(store: Store, conn: Any, table: str, key: str, run_id: str) -> list[dict]:
    order = store.db.insertion_order
    return [dict(r) for r in conn.execute(f"SELECT * FROM {table} WHERE {key} = ? ORDER BY {order}", (run_id,))]


def table_digest(rows: Sequence[dict]) -> str:
    """sha256 of a table's rows, independent of row order and column order."""
    lines = sorted(json.dumps({k: _canonical(v) for k, v in row.items()}, sort_keys=True, ensure_ascii=False)
                   for row in rows)
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def run_digest(store: Store, run_id: str) -> dict[str, tuple[int, str]]:
    """Table -> (rows, content hash) of one run in `store`."""
    with store.connect() as conn:
        return {table: (len(rows), table_digest(rows))
                for table, key in RUN_TABLES for rows in [_rows(store, conn, table, key, run_id)]}


def copy_runs(source: Store, target: Store, run_ids: Sequence[str] | None = None, *,
              replace: bool = False, snapshot: bool = False) -> list[RunCopy]:
    """Copy runs (all of `source`'s when `run_ids` is empty or None) into `target`, each read in
    one snapshot of the source and written in one transaction of the target, then check each
    table of each run: row count and content hash of what was read equal those read back from
    the target. A run already in `target` is replaced only with `replace`.

    A run that is active (queued or running: a worker or a process is, or is about to be,
    writing it) is refused on either side: in `source` it would be taken mid-step, in `target` replacing it
    would pull its rows from under its trainer. With `snapshot`, active runs of `source` are
    copied as they stand in that snapshot, and stored in `target` as stopped, with a run event
    "copied_mid_run" saying so (a resume there redoes the unfinished step); the checks then
    compare the target with the snapshot as written. Active runs of `target` are never replaced.

    Raises StoreError naming the problem: a run not in `source`, an active run on either side,
    a run already in `target` without `replace` (all checked for every run before anything is
    written), the same store as source and target, or a check that failed after the copy."""
    if same_store(source, target):
        raise StoreError(f"source and destination are the same store ({source.display}"
                         + (f" and {target.display}" if source.display != target.display else "")
                         + "): nothing to copy")
    runs = {r.id: r for r in source.runs()}
    wanted = list(dict.fromkeys(run_ids)) if run_ids else list(runs)[::-1]  # oldest first
    missing = [r for r in wanted if r not in runs]
    if missing:
        raise StoreError(f"no run {', '.join(map(repr, missing))} in {source.display}")
    busy = [runs[r] for r in wanted if runs[r].status in ACTIVE]
    if busy and not snapshot:
        raise StoreError(f"{_busy(busy)} in {source.display}: copied now, it would be taken mid-step. Stop it first "
                         f"(autodiff stop RUN --store SRC) and copy it once it says stopped, or pass --snapshot to copy "
                         "it as it stands (stored as stopped in the destination, with a run event saying so)")
    present = {r.id: r for r in target.runs()}
    busy_there = [present[r] for r in wanted if r in present and present[r].status in ACTIVE]
    if busy_there:
        raise StoreError(f"{_busy(busy_there)} in {target.display}: replacing it would pull its rows from under "
                         "whatever trains it. Stop it there first (autodiff stop RUN --store DST) and copy once it "
                         "says stopped")
    clash = [r for r in wanted if r in present]
    if clash and not replace:
        raise StoreError(f"{len(clash)} of these runs already exist in {target.display} "
                         f"({', '.join(clash[:5])}{', ...' if len(clash) > 5 else ''}): "
                         "pass --replace to overwrite them there, or name other runs")
    done = []
    for run_id in wanted:
        written = _copy_run(source, target, run_id, replace=run_id in present, snapshot=snapshot)
        after = run_digest(target, run_id)
        checks = tuple(TableCheck(table, len(written[table]), after[table][0], table_digest(written[table]),
                                  after[table][1]) for table, _ in RUN_TABLES)
        bad = [c.table for c in checks if not c.equal]
        if bad:
            raise StoreError(f"run {run_id} differs after the copy to {target.display} in {', '.join(bad)}")
        before, now = present.get(run_id), source.run(run_id)
        other = (_what(before) if before is not None and (_what(before).rsplit(",", 1)[0] != _what(now).rsplit(",", 1)[0])
                 else "")
        done.append(RunCopy(run_id, run_id in present, checks, other))
    return done


# A process or a worker is writing the run, or is about to. A created run (registered, not started)
# is copied like a stopped one.
ACTIVE = ("queued", "running")


def _busy(runs: Sequence[Any]) -> str:
    """'run r1 is running (process 42 on host a since ...), run r2 is queued'."""
    from autodiff.holders import holder

    def one(run: Any) -> str:
        held = holder(run)
        return f"run {run.id} is {run.status}" + (f" ({held.describe()})" if held else "")
    return ", ".join(one(r) for r in runs[:5]) + (f" and {len(runs) - 5} more" if len(runs) > 5 else "")


def same_store(a: Store, b: Store) -> bool:
    """Whether two stores are one: the same SQLite file (however its path is written: relative,
    through a link), or the same PostgreSQL database (host, port and database name normalized:
    localhost, 127.0.0.1, ::1 and a local socket are one host; default port and database filled)."""
    if a.backend != b.backend:
        return False
    if a.backend == "sqlite":
        try:
            return os.path.samefile(a.path, b.path)
        except OSError:
            return a.path.resolve() == b.path.resolve()
    return _database(a.spec) == _database(b.spec)


_LOCAL_HOSTS = ("", "localhost", "127.0.0.1", "::1")


def _database(url: str) -> tuple[str, int, str]:
    """(host, port, database) a postgresql:// URL reaches, with libpq's defaults (PGHOST,
    PGPORT, PGDATABASE; the user's name as the database) filled in."""
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    host = (query.get("host") or unquote(parts.hostname or "") or os.environ.get("PGHOST", "")).lower()
    host = "localhost" if host in _LOCAL_HOSTS or host.startswith("/") else host
    port = int(query.get("port") or parts.port or os.environ.get("PGPORT") or 5432)
    user = query.get("user") or unquote(parts.username or "") or os.environ.get("PGUSER") or getpass.getuser()
    database = query.get("dbname") or unquote(parts.path.lstrip("/")) or os.environ.get("PGDATABASE") or user
    return host, port, database


def _copy_run(source: Store, target: Store, run_id: str, *, replace: bool, snapshot: bool) -> dict[str, list[dict]]:
    """Copy one run; returns the rows written, by table (for the checks)."""
    with source.connect() as read:
        source.db.begin_snapshot(read)
        tables = {table: _rows(source, read, table, key, run_id) for table, key in RUN_TABLES}
    [run] = tables["runs"]
    if run["status"] in ACTIVE:  # it started since it was checked, or --snapshot
        if not snapshot:
            raise StoreError(f"run {run_id} became {run['status']} in {source.display} while being copied: stop it "
                             "first, or pass --snapshot")
        done = max((s["step"] for s in tables["steps"] if s["status"] == "completed"), default=None)
        where = f"after step {done}" if done is not None else "before any step completed"
        note = (f"a snapshot copied from {source.display} while it was {run['status']}, {where}: stored here as "
                "stopped; resume goes on from its last completed step")
        tables["runs"] = [{**run, "status": "stopped", "error": note, "stop_requested": 0}]
        tables["run_events"] = [*tables["run_events"], {"run_id": run_id, "at": time.time(), "kind": "copied_mid_run",
                                                       "text": note}]
    with target.connect() as write:
        target.db.begin_write(write)
        row = write.execute(f"SELECT status FROM runs WHERE id = ?{target.db.for_update}", (run_id,)).fetchone()
        if row is not None and (row[0] in ACTIVE or not replace):
            raise StoreError(f"run {run_id} is {row[0]} in {target.display} now: "
                             + ("stop it there first" if row[0] in ACTIVE else "pass --replace to overwrite it"))
        if replace:
            for table, key in reversed(RUN_TABLES):
                write.execute(f"DELETE FROM {table} WHERE {key} = ?", (run_id,))
        for table, _ in RUN_TABLES:
            rows = tables[table]
            if not rows:
                continue
            columns = list(rows[0])
            sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            for start in range(0, len(rows), _BATCH):
                write.executemany(sql, [[row[c] for c in columns] for row in rows[start:start + _BATCH]])
    return tables
