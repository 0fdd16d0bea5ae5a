"""Moving runs between stores (a laptop's SQLite and a team's PostgreSQL, either way) with nothing
lost: every row of every table of a run is copied as stored, and after the copy each table's row
count and content hash are read back from both stores and must match."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

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
              replace: bool = False) -> list[RunCopy]:
    """Copy runs (all of `source`'s when `run_ids` is empty or None) into `target`, each in one
    transaction of the target, then check each table of each run (row count and content hash
    equal in both stores). A run already in `target` is replaced only with `replace`.

    Raises StoreError naming the problem: a run not in `source`, a run already in `target`
    without `replace` (checked for every run before anything is written), the same store as
    source and target, or a check that failed after the copy."""
    if source.spec == target.spec:
        raise StoreError(f"source and destination are the same store ({source.display}): nothing to copy")
    known = [r.id for r in source.runs()]
    wanted = list(dict.fromkeys(run_ids)) if run_ids else known[::-1]  # oldest first
    missing = [r for r in wanted if r not in known]
    if missing:
        raise StoreError(f"no run {', '.join(map(repr, missing))} in {source.display}")
    present = {r.id for r in target.runs()}
    clash = [r for r in wanted if r in present]
    if clash and not replace:
        raise StoreError(f"{len(clash)} of these runs already exist in {target.display} "
                         f"({', '.join(clash[:5])}{', ...' if len(clash) > 5 else ''}): "
                         "pass --replace to overwrite them there, or name other runs")
    done = []
    for run_id in wanted:
        _copy_run(source, target, run_id, replace=run_id in present)
        before, after = run_digest(source, run_id), run_digest(target, run_id)
        checks = tuple(TableCheck(table, before[table][0], after[table][0], before[table][1], after[table][1])
                       for table, _ in RUN_TABLES)
        bad = [c.table for c in checks if not c.equal]
        if bad:
            raise StoreError(f"run {run_id} differs after the copy to {target.display} in {', '.join(bad)}")
        done.append(RunCopy(run_id, run_id in present, checks))
    return done


def _copy_run(source: Store, target: Store, run_id: str, *, replace: bool) -> None:
    with source.connect() as read:
        tables = [(table, key, _rows(source, read, table, key, run_id)) for table, key in RUN_TABLES]
    with target.connect() as write:
        if replace:
            for table, key in reversed(RUN_TABLES):
                write.execute(f"DELETE FROM {table} WHERE {key} = ?", (run_id,))
        for table, _, rows in tables:
            if not rows:
                continue
            columns = list(rows[0])
            sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            for start in range(0, len(rows), _BATCH):
                write.executemany(sql, [[row[c] for c in columns] for row in rows[start:start + _BATCH]])
