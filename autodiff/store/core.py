"""The Store: every read and write of runs, in SQL that SQLite and PostgreSQL both accept.

The trainer and the dashboard may be different processes (on a PostgreSQL store, different
machines); this is where they meet. Every figure the dashboard shows is derived from the rows
here. API keys and database passwords never enter it. The backend (`sqlite.SQLiteBackend`,
`postgres.PostgresBackend`) holds the connections and every difference between the two
databases; this class holds no dialect of its own beyond `?` placeholders, portable SQL and the
upsert below.

Records in, records out: readers return the project's records (`autodiff.records`), each made
from its row in one place (`_record`, with the fields a table keeps encoded, JSON text or 0/1,
decoded there), and inserts name their columns from the records' fields (`_row`). The fields the
engine leaves unset when it makes a record (a gradient's step, a proposal's run, an evaluation's
split) are the columns the store writes besides it, and come back filled. `CallSummary` is an
`LLMCall` without its text, for the readers that sum calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from autodiff.errors import RunTakenOver, StoreError
from autodiff.records import (CallSummary, Evaluation, Gradient, InputRef, Invocation, LLMCall, ParameterSpec,
                              ParameterVersion, Proposal, Run, RunEvent, Step, Trace)
from autodiff.store.schema import MIGRATIONS
from autodiff.store.spec import check_spec, is_url

TERMINAL_STATUSES = ("completed", "failed", "stopped")

# Every column of the tables written by upsert, in table order (see `_upsert`).
_STEP_COLUMNS = ("run_id", *(f.name for f in dataclasses.fields(Step)))


def _writes(method: Callable[..., Any]) -> Callable[..., Any]:
    """A store call that writes (one transaction): the backend may run it again after a
    conflict it resolved by aborting it (a PostgreSQL deadlock), so none reaches the caller.
    A write to a run this Store fences (`Store.fence`) happens only while the fencing process
    still holds the run, checked in the write's own transaction (`Store.connect`)."""
    names = list(inspect.signature(method).parameters)
    takes_run_id = len(names) > 1 and names[1] == "run_id"

    @functools.wraps(method)
    def call(self: "Store", *args: Any, **kwargs: Any) -> Any:
        # A generator of rows is read once: kept as a list, so a second attempt writes them too.
        args = tuple(list(a) if isinstance(a, Iterator) else a for a in args)
        kwargs = {k: list(v) if isinstance(v, Iterator) else v for k, v in kwargs.items()}
        if not self._fences or method.__name__ in _UNFENCED:
            return self.db.retrying(method, self, *args, **kwargs)
        if takes_run_id:
            runs = {args[0] if args else kwargs["run_id"]}
        else:
            runs = _RUNS_WRITTEN[method.__name__](self, *args, **kwargs)
        held = {r: self._fences[r] for r in runs if r in self._fences}
        if not held:
            return self.db.retrying(method, self, *args, **kwargs)
        outer, self._pending.held = getattr(self._pending, "held", None), held
        try:
            return self.db.retrying(method, self, *args, **kwargs)
        finally:
            self._pending.held = outer
    return call


# Writes never fenced: registering a run, and taking one (`autodiff.holders.take` checks itself).
_UNFENCED = ("create_run", "hold_run")
# The runs a write touches, for the writes whose first argument is not a run id.
_RUNS_WRITTEN: dict[str, Callable[..., set[str]]] = {
    "add_calls": lambda store, calls: {c.run_id for c in calls},
    "mark_feedback_consumed": lambda store, ids, step: store._runs_of("gradients", ids),
    "update_proposal": lambda store, proposal_id, **fields: store._runs_of("proposals", [proposal_id]),
    "decide": lambda store, proposal_id, *args, **kwargs: store._runs_of("proposals", [proposal_id]),
}


def _count(condition: str) -> str:
    """SQL counting the rows of a group where `condition` holds (NULL counts as false)."""
    return f"SUM(CASE WHEN {condition} THEN 1 ELSE 0 END)"


def _flag(condition: str) -> str:
    """SQL for 1 where `condition` holds, else 0 (NULL too): SQLite's value of a comparison."""
    return f"(CASE WHEN {condition} THEN 1 ELSE 0 END)"


def _upsert(table: str, columns: Sequence[str], key: Sequence[str]) -> str:
    """INSERT of one row that replaces the row with the same `key`. Give every column of the
    table, so a replaced row keeps nothing of the old one (SQLite's INSERT OR REPLACE)."""
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            f" ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}")


def _row(record: Any, **columns: Any) -> dict[str, Any]:
    """The columns a record is stored in, by name: the columns given that are not fields (the run
    it belongs to) first, then the record's fields in order, each as is or, where given in
    `columns`, as the table keeps it (JSON text, 0/1)."""
    names = [f.name for f in dataclasses.fields(record)]
    row = {k: v for k, v in columns.items() if k not in names}
    row.update((name, columns[name] if name in columns else getattr(record, name)) for name in names)
    return row


def _insert(table: str, row: dict[str, Any]) -> str:
    """INSERT of one row with `row`'s columns (give its values in the same order)."""
    return f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})"


def _record(cls: Any, row: Any, **decoded: Any) -> Any:
    """A record of type `cls` from a row read by column name: every field from the column of its
    name, except those given in `decoded` (already turned back from JSON text, 0/1, ...)."""
    values = dict(zip(row.keys(), row))  # one pass: a sqlite3.Row read by name scans its columns each time
    values.update(decoded)
    return cls(**{name: values[name] for name in _field_names(cls)})


@functools.cache
def _field_names(cls: Any) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


# What `call_totals` and `attempt_totals` sum over a group of call records (see `call_totals`).
_CALL_SUMS = (
    "COUNT(*) AS calls, SUM(cached) AS cached,"
    " COUNT(error) AS errors, " + _count("finish_reason = 'length' AND phase != 'preflight'") + " AS cut_off, "
    + _count("error_kind = 'context_window'") + " AS context_window,"
    " SUM(CASE WHEN cached <> 0 THEN 0 ELSE prompt_tokens END) AS prompt_tokens,"
    " SUM(CASE WHEN cached <> 0 THEN 0 ELSE completion_tokens END) AS completion_tokens,"
    " SUM(latency_ms) / 1000.0 AS latency_s,"
    " MAX(created_at) - MIN(created_at - latency_ms / 1000.0) AS wall_s,"
    " COALESCE(SUM(cost_usd), 0.0) AS cost_usd,"
    f" {_count('cost_usd IS NULL AND cached = 0')} AS cost_unknown,"
    " COALESCE(SUM(saved_usd), 0.0) AS saved_usd,"
    f" {_count('cached <> 0 AND saved_usd IS NULL')} AS saved_unknown,"
    # Fresh replies whose server reported no token usage (0 both ways): their tokens are unknown.
    f" {_count('cached = 0 AND error IS NULL AND prompt_tokens = 0 AND completion_tokens = 0')} AS tokens_unknown"
)
# A call (alias c) belongs to the kept attempt of its step (alias s, LEFT JOINed): see `attempt_totals`.
_KEPT = "(c.phase = 'preflight' OR (s.started_at IS NOT NULL AND c.created_at >= s.started_at))"


def _call_sums(row: Any) -> dict:
    return dict(row, tokens=row["prompt_tokens"] + row["completion_tokens"], cut_off=row["cut_off"] or 0,
                context_window=row["context_window"] or 0, cost_unknown=row["cost_unknown"] or 0,
                saved_unknown=row["saved_unknown"] or 0, tokens_unknown=row["tokens_unknown"] or 0)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# A proposal's cost when no call of it was recorded (see `Store.proposal_costs`).
NO_PROPOSAL_COST = {"make_usd": 0.0, "make_unknown": 0, "validate_usd": 0.0, "validate_unknown": 0, "unknown": 0}


class Store:
    """A run store: a SQLite file's path, or a PostgreSQL URL (postgresql://user@host/db; the
    password, if any, in the URL, PGPASSWORD or ~/.pgpass). Open one per process: SQLite opens a
    short-lived connection per use, PostgreSQL borrows one from the store's pool. The schema is
    migrated on opening. `spec` opens the same store again (it may hold the password: pass it
    on, never show it); `display` is what to show (password masked); `backend` is "sqlite" or
    "postgresql". With `create` False the store must exist already (a SQLite file, a database
    holding the store's tables): a source to read from is never made. Raises StoreError when the
    database cannot be reached, for a spec that looks meant as a URL but is not a valid one
    (`spec.check_spec`), for a path that is a folder or not a SQLite store, and for a schema
    update this database user may not make. `wait_s`: on PostgreSQL, how long a store call waits
    for a connection while the server does not answer before it raises StoreError (default
    `postgres.POOL_WAIT_S`, 60 s: a trainer rides out a short outage; the dashboard waits less, so
    a page says the store is unreachable rather than stay blank)."""

    def __init__(self, spec: str | Path, *, create: bool = True, wait_s: float | None = None):
        spec = check_spec(spec)
        self._fences: dict[str, tuple[str | None, int | None, float | None]] = {}
        self._pending = threading.local()  # the fence the write running in this thread checks
        if is_url(spec):
            from autodiff.store.postgres import PostgresBackend

            self.db: Any = PostgresBackend(str(spec), wait_s=wait_s)
        else:
            from autodiff.store.sqlite import SQLiteBackend

            self.db = SQLiteBackend(spec, create=create)
        self.spec: str = self.db.spec
        self.display: str = self.db.display
        self.backend: str = self.db.name
        self.db.open()
        try:
            self.migrate(create=create)
        except BaseException:
            self.db.close()
            raise

    @property
    def path(self) -> Path:
        """A SQLite store's file. A PostgreSQL store has none: use `spec` (to reopen) or `display`."""
        if self.backend != "sqlite":
            raise StoreError(f"the store {self.display} is a PostgreSQL database, not a file: use its spec")
        return self.db.path

    def close(self) -> None:
        """Let go of the database: SQLite checkpoints the file (also done when the Store is
        garbage-collected); PostgreSQL closes the pool's connections."""
        self.db.close()

    def connect(self) -> Any:
        """A context manager: a connection in one transaction (committed when the block ends
        without error), with sqlite3's `execute(sql, params)`, `?` placeholders and rows read by
        name or position. For the store's own methods and tests; nothing else holds SQL. Inside
        a write to a fenced run (see `fence`), the transaction first checks the fence."""
        held = getattr(self._pending, "held", None)
        return self._fenced(held) if held else self.db.connect()

    # --- fencing: one trainer writes a run ----------------------------------------------------

    def fence(self, run_id: str) -> None:
        """From now on, every write of this Store to run `run_id` (its steps, traces, gradients,
        proposals, parameter versions, evaluations, calls, status, events) happens only while the
        run is still held as it is now (status running, the same host, process and time taken;
        see autodiff.holders), checked in the write's own transaction: on PostgreSQL the run's
        row is read FOR SHARE, so a takeover waits for the write or the write sees the takeover;
        on SQLite the write takes the database's write lock first (`begin_write`). A write that
        finds the run taken over raises RunTakenOver and writes nothing. The trainer fences the run it took:
        a paused process (a machine asleep, a stopped worker) whose run another process took
        meanwhile cannot add a second attempt of a step over the new holder's, or accept a
        proposal, when it wakes. Call after taking the run; `unfence` ends it."""
        run = self.run(run_id)
        self._fences[run_id] = (run.host, run.pid, run.held_since)

    def unfence(self, run_id: str) -> None:
        """End `fence(run_id)`; nothing happens for a run not fenced."""
        self._fences.pop(run_id, None)

    def _runs_of(self, table: str, ids: Sequence[str]) -> set[str]:
        """The runs the rows `ids` of `table` (proposals, gradients) belong to."""
        if not ids:
            return set()
        with self.db.connect() as conn:
            rows = conn.execute(f"SELECT DISTINCT run_id FROM {table} WHERE id IN ({', '.join('?' * len(ids))})",
                                list(ids)).fetchall()
        return {r[0] for r in rows}

    @contextlib.contextmanager
    def _fenced(self, held: dict[str, tuple[str | None, int | None, float | None]]) -> Iterator[Any]:
        with self.db.connect() as conn:
            self.db.begin_write(conn)
            for run_id, (host, pid, since) in held.items():
                row = conn.execute("SELECT status, host, pid, held_since FROM runs WHERE id = ?"
                                   + self.db.share_lock, (run_id,)).fetchone()
                if row is None:
                    raise RunTakenOver(run_id, "it is gone from the store")
                if (row["status"], row["host"], row["pid"], row["held_since"]) != ("running", host, pid, since):
                    now = (f"now held by process {row['pid']} on host {row['host']}" if row["status"] == "running"
                           else f"it is {row['status']} now")
                    raise RunTakenOver(run_id, now)
            yield conn

    def migrate(self, create: bool = True) -> None:
        """Apply the schema migrations this store has not had yet (see `schema.MIGRATIONS`); with
        `create` False, a database without the store's tables raises StoreError."""
        with self.connect() as conn:
            self.db.migrate(conn, MIGRATIONS, create=create)

    # --- runs -------------------------------------------------------------------------------

    @_writes
    def create_run(self, run_id: str, task: str, config: dict, splits: dict[str, Sequence[str]]) -> None:
        """Register run `run_id` (status "created") with its options and the sample ids of each split."""
        now = time.time()
        run = Run(id=run_id, task=task, config=config, status="created", error=None, created_at=now, updated_at=now,
                  stop_requested=False, pid=None)
        row = _row(run, config=_json(run.config), stop_requested=int(run.stop_requested))
        with self.connect() as conn:
            conn.execute(_insert("runs", row), list(row.values()))
            conn.executemany(
                "INSERT INTO samples VALUES (?, ?, ?, ?)",
                [(run_id, split, i, sid) for split, ids in splits.items() for i, sid in enumerate(ids)],
            )

    @_writes
    def set_run_status(self, run_id: str, status: str, error: str | None = None, pid: int | None = None) -> None:
        with self.connect() as conn:
            conn.execute(
                "UPDATE runs SET status = ?, error = ?, updated_at = ?, pid = COALESCE(?, pid) WHERE id = ?",
                (status, error, time.time(), pid, run_id),
            )

    @_writes
    def hold_run(self, run_id: str, host: str, pid: int, expect: Run | None = None) -> bool:
        """Mark run `run_id` running, held by process `pid` on `host` since now (see
        autodiff.holders). With `expect` (the run as the caller read it), only if its status,
        pid and host are still those: False when another process changed them meanwhile."""
        now = time.time()
        sql = "UPDATE runs SET status = 'running', error = NULL, pid = ?, host = ?, held_since = ?, updated_at = ? " \
              "WHERE id = ?"
        params: list[Any] = [pid, host, now, now, run_id]
        if expect is not None:
            sql += " AND status = ? AND COALESCE(pid, -1) = ? AND COALESCE(host, '') = ?"
            params += [expect.status, expect.pid or -1, expect.host or ""]
        with self.connect() as conn:
            return conn.execute(sql, params).rowcount == 1

    @_writes
    def request_stop(self, run_id: str) -> None:
        self.run(run_id)
        with self.connect() as conn:
            conn.execute("UPDATE runs SET stop_requested = 1, updated_at = ? WHERE id = ?", (time.time(), run_id))

    def stop_requested(self, run_id: str) -> bool:
        with self.connect() as conn:
            row = conn.execute("SELECT stop_requested FROM runs WHERE id = ?", (run_id,)).fetchone()
        return bool(row and row[0])

    @_writes
    def clear_stop(self, run_id: str) -> None:
        with self.connect() as conn:
            conn.execute("UPDATE runs SET stop_requested = 0 WHERE id = ?", (run_id,))

    def run(self, run_id: str) -> Run:
        """Run `run_id`; raises StoreError when the store has no such run."""
        with self.connect() as conn:
            row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise StoreError(f"no run with id {run_id!r} in {self.display}")
        return _run(row)

    def runs(self) -> list[Run]:
        """Every run of the store, newest first."""
        with self.connect() as conn:
            rows = conn.execute("SELECT * FROM runs ORDER BY created_at DESC").fetchall()
        return [_run(r) for r in rows]

    @_writes
    def delete_run(self, run_id: str) -> None:
        """Remove a run and every record of it."""
        self.run(run_id)
        with self.connect() as conn:
            for table in ("samples", "parameters", "parameter_versions", "steps", "invocations", "gradients",
                          "llm_calls", "proposals", "evaluations", "run_events"):
                conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
            conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))

    @_writes
    def set_run_config(self, run_id: str, config: dict) -> None:
        """Replace a stopped run's stored options (e.g. a larger budget on resume)."""
        self.run(run_id)
        with self.connect() as conn:
            conn.execute("UPDATE runs SET config = ?, updated_at = ? WHERE id = ?", (_json(config), time.time(), run_id))

    @_writes
    def add_run_event(self, run_id: str, kind: str, text: str) -> None:
        """Note something that happened to a run (e.g. "task_changes_accepted"), with the time."""
        row = _row(RunEvent(at=time.time(), kind=kind, text=text), run_id=run_id)
        with self.connect() as conn:
            conn.execute(_insert("run_events", row), list(row.values()))

    def run_events(self, run_id: str) -> list[RunEvent]:
        """A run's events in time order."""
        with self.connect() as conn:
            rows = conn.execute("SELECT * FROM run_events WHERE run_id = ? ORDER BY at", (run_id,)).fetchall()
        return [_record(RunEvent, r) for r in rows]

    def run_ids_matching(self, prefix: str) -> list[str]:
        with self.connect() as conn:
            return [r[0] for r in conn.execute("SELECT id FROM runs WHERE id LIKE ?", (prefix + "%",))]

    @_writes
    def replace_samples(self, run_id: str, split: str, ids: Sequence[str]) -> None:
        """A run's sample ids of one split, replaced (a task change accepted on resume)."""
        with self.connect() as conn:
            conn.execute("DELETE FROM samples WHERE run_id = ? AND split = ?", (run_id, split))
            conn.executemany("INSERT INTO samples VALUES (?, ?, ?, ?)",
                             [(run_id, split, i, sid) for i, sid in enumerate(ids)])

    def sample_ids(self, run_id: str, split: str) -> list[str]:
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT sample_id FROM samples WHERE run_id = ? AND split = ? ORDER BY position", (run_id, split)
            ).fetchall()
        return [r[0] for r in rows]

    # --- parameters -------------------------------------------------------------------------

    @_writes
    def add_parameters(self, run_id: str, parameters: Iterable[ParameterSpec]) -> None:
        """Register a run's parameters (`Parameter.spec`); one the run already has is replaced."""
        rows = [_row(p, run_id=run_id, trainable=int(p.trainable), peers=_json(list(p.peers))) for p in parameters]
        if not rows:
            return
        with self.connect() as conn:
            conn.executemany(_upsert("parameters", list(rows[0]), ("run_id", "name")), [list(r.values()) for r in rows])

    def parameters(self, run_id: str) -> list[ParameterSpec]:
        """A run's parameters in the pipeline's order."""
        with self.connect() as conn:
            rows = conn.execute("SELECT * FROM parameters WHERE run_id = ? ORDER BY position", (run_id,)).fetchall()
        return [_record(ParameterSpec, r, trainable=bool(r["trainable"]), peers=tuple(json.loads(r["peers"])))
                for r in rows]

    @_writes
    def add_parameter_version(self, run_id: str, name: str, step: int, value: str, proposal_id: str | None) -> int:
        """Record parameter `name`'s new value, set at `step`; returns its version (0 for the first)."""
        with self.connect() as conn:
            row = conn.execute(
                "SELECT COALESCE(MAX(version), -1) AS last FROM parameter_versions WHERE run_id = ? AND name = ?",
                (run_id, name),
            ).fetchone()
            new = _row(ParameterVersion(name=name, version=row[0] + 1, step=step, value=value, proposal_id=proposal_id,
                                        created_at=time.time()), run_id=run_id)
            conn.execute(_insert("parameter_versions", new), list(new.values()))
        return new["version"]

    def parameter_versions(self, run_id: str, name: str | None = None) -> list[ParameterVersion]:
        """A run's parameter values (of parameter `name`, or of all), by name then version."""
        return [_record(ParameterVersion, r) for r in self._select("parameter_versions", run_id, "name, version",
                                                                   name=name)]

    def parameter_values_at(self, run_id: str, step: int) -> dict[str, str]:
        """The value of every parameter as it stood at the end of `step`."""
        values: dict[str, str] = {}
        for version in self.parameter_versions(run_id):
            if version.step <= step:
                values[version.name] = version.value
        return values

    # --- steps ------------------------------------------------------------------------------

    @_writes
    def start_step(self, run_id: str, step: int, batch: Sequence[str]) -> None:
        """Begin `step` (status "running") on the mini-batch `batch` (sample ids); a step begun
        before (an attempt redone on resume) is replaced whole."""
        record = Step(step=step, status="running", started_at=time.time(), finished_at=None, val_score=None,
                      test_score=None, batch=tuple(batch), failed_samples=())
        row = _row(record, run_id=run_id, batch=_json(list(record.batch)), failed_samples=_json([]))
        with self.connect() as conn:
            conn.execute(_upsert("steps", list(row), ("run_id", "step")), list(row.values()))

    @_writes
    def finish_step(
        self, run_id: str, step: int, val_score: float | None, test_score: float | None, failed: Sequence[str]
    ) -> None:
        """Mark `step` completed with its scores (None: not measured) and the sample ids it sent backward."""
        with self.connect() as conn:
            conn.execute(
                "UPDATE steps SET status = 'completed', finished_at = ?, val_score = ?, test_score = ?,"
                " failed_samples = ? WHERE run_id = ? AND step = ?",
                (time.time(), val_score, test_score, _json(list(failed)), run_id, step),
            )

    @_writes
    def set_step_test_score(self, run_id: str, step: int, test_score: float) -> None:
        with self.connect() as conn:
            conn.execute("UPDATE steps SET test_score = ? WHERE run_id = ? AND step = ?", (test_score, run_id, step))

    def steps(self, run_id: str) -> list[Step]:
        """A run's stored steps in order (a step discarded on resume and not yet redone is absent)."""
        with self.connect() as conn:
            rows = conn.execute("SELECT * FROM steps WHERE run_id = ? ORDER BY step", (run_id,)).fetchall()
        return [_record(Step, r, batch=tuple(json.loads(r["batch"])),
                        failed_samples=tuple(json.loads(r["failed_samples"]))) for r in rows]

    def last_completed_step(self, run_id: str) -> int | None:
        with self.connect() as conn:
            row = conn.execute(
                "SELECT MAX(step) FROM steps WHERE run_id = ? AND status = 'completed'", (run_id,)
            ).fetchone()
        return row[0]

    @_writes
    def discard_after(self, run_id: str, step: int) -> None:
        """Drop the partial records of steps after `step` so a resumed run redoes them cleanly.
        LLM calls are kept: they were really made, and their replies are in the cache. Feedback a
        person wrote during a dropped step is kept (it is not the step's work), and waits to be
        read again by the redone step's optimizer calls."""
        with self.connect() as conn:
            for table in ("steps", "invocations", "proposals", "evaluations", "parameter_versions"):
                conn.execute(f"DELETE FROM {table} WHERE run_id = ? AND step > ?", (run_id, step))
            conn.execute("DELETE FROM gradients WHERE run_id = ? AND step > ? AND COALESCE(origin, '') <> 'human'",
                         (run_id, step))
            conn.execute("UPDATE gradients SET consumed_step = NULL WHERE run_id = ? AND consumed_step > ?",
                         (run_id, step))

    # --- traces, gradients, calls -----------------------------------------------------------

    @_writes
    def add_traces(self, run_id: str, step: int, traces: Iterable[Trace]) -> None:
        """Store the invocations of `traces` as traced at `step` (an invocation's id replaces the
        row with that id: a step redone on resume writes its traces again)."""
        rows = [_row(inv, run_id=run_id, step=step, inputs=_json([[r.name, r.text, r.source] for r in inv.inputs]),
                     parameters=_json([list(p) for p in inv.parameters]))
                for trace in traces for inv in trace.invocations]
        _upsert_rows(self, "invocations", ("id",), rows)

    def _select(self, table: str, run_id: str, order: str, **filters: Any) -> list[Any]:
        """Rows of one run, filtered by the given columns (None means any), in `order`."""
        used = {k: v for k, v in filters.items() if v is not None}
        where = "".join(f" AND {column} = ?" for column in used)
        with self.connect() as conn:
            return conn.execute(
                f"SELECT * FROM {table} WHERE run_id = ?{where} ORDER BY {order}", [run_id, *used.values()]
            ).fetchall()

    def invocations(self, run_id: str, step: int | None = None) -> list[Invocation]:
        """A run's invocations (of one step, or all), by step, sample and order of execution."""
        return [_invocation(r) for r in self._select("invocations", run_id, "step, sample_id, seq", step=step)]

    def invocation_call_indices(self, run_id: str) -> dict[str, int]:
        """Invocation id -> call index for a whole run, without the traces' text."""
        with self.connect() as conn:
            rows = conn.execute("SELECT id, call_index FROM invocations WHERE run_id = ?", (run_id,)).fetchall()
        return {r[0]: r[1] for r in rows}

    @_writes
    def add_gradients(self, run_id: str, step: int, gradients: Iterable[Gradient]) -> None:
        """Store gradients written at `step`, not consumed (a gradient's id replaces the row with
        that id); a `created_at` of 0 is taken as now."""
        rows = [_row(g, run_id=run_id, step=step, path=_json(list(g.path)), created_at=g.created_at or time.time(),
                     consumed_step=None)
                for g in gradients]
        _upsert_rows(self, "gradients", ("id",), rows)

    def gradients(self, run_id: str, step: int | None = None, target: str | None = None) -> list[Gradient]:
        """A run's gradients (of one step, on one target, or all), by step, time, sample and call."""
        rows = self._select("gradients", run_id, "step, created_at, sample_id, call_index", step=step, target=target)
        return [_gradient(r) for r in rows]

    def gradients_by_id(self, run_id: str, ids: Sequence[str]) -> list[Gradient]:
        """The run's gradients with these ids, in the order of `ids` (ids not found are left out)."""
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        with self.connect() as conn:
            rows = conn.execute(
                f"SELECT g.* FROM gradients g WHERE g.run_id = ? AND g.id IN ({marks})",
                [run_id, *ids]).fetchall()
        found = {r["id"]: _gradient(r) for r in rows}
        return [found[i] for i in dict.fromkeys(ids) if i in found]

    def find_gradients(
        self, run_id: str, *, step: int | None = None, targets: Sequence[str] | None = None,
        sample: str | None = None, call_index: int | None = None, score: tuple[float, float] | None = None,
        limit: int | None = None, offset: int = 0,
    ) -> tuple[int, list[Gradient]]:
        """Gradients of a run matching every filter given, in time order: how many match, and the
        gradients from `offset` (at most `limit` of them; `call_index` filters on `about_call`, the
        call index of what each is about). Filtered in SQL, so a page of a large run reads only the rows it shows.
        `targets` are node names (feedback on their output) and parameter names. Unscored (human)
        feedback passes the score filter only when it spans the whole [0, 1] range."""
        where, args = ["g.run_id = ?"], [run_id]
        if step is not None:
            where.append("g.step = ?")
            args.append(step)
        if targets is not None:
            where.append(f"g.target IN ({','.join('?' * len(targets))})" if targets else "1 = 0")
            args += list(targets)
        if sample is not None:
            where.append("g.sample_id = ?")
            args.append(sample)
        if call_index is not None:
            where.append("g.about_call = ?")
            args.append(call_index)
        if score is not None:
            lo, hi = score
            where.append("(g.score BETWEEN ? AND ?" + (" OR g.score IS NULL)" if (lo, hi) == (0.0, 1.0) else ")"))
            args += [lo, hi]
        body = f" FROM gradients g WHERE {' AND '.join(where)}"
        with self.connect() as conn:
            total = conn.execute(f"SELECT COUNT(*){body}", args).fetchone()[0]
            if limit == 0:  # only the count wanted
                return total, []
            rows = conn.execute(
                f"SELECT g.*{body} ORDER BY g.created_at, g.step, g.sample_id, g.call_index"
                f" LIMIT {self.db.no_limit if limit is None else '?'} OFFSET ?",
                [*args, *([] if limit is None else [limit]), offset],
            ).fetchall()
        return total, [_gradient(r) for r in rows]

    def gradient_facets(self, run_id: str) -> dict[str, Any]:
        """How many gradients a run has ("total") and what they can be filtered by, each sorted:
        steps, samples, the call indices they are about, and the nodes whose output received feedback."""
        def distinct(conn: Any, column: str, where: str = "") -> list:
            return [r[0] for r in conn.execute(
                f"SELECT DISTINCT {column} AS v FROM gradients g WHERE g.run_id = ? AND {column} IS NOT NULL{where}"
                " ORDER BY v", (run_id,))]

        with self.connect() as conn:
            total = conn.execute("SELECT COUNT(*) FROM gradients WHERE run_id = ?", (run_id,)).fetchone()[0]
            return {"total": total, "steps": distinct(conn, "g.step"), "samples": distinct(conn, "g.sample_id"),
                    "call_indices": distinct(conn, "g.about_call"),
                    "outputs": distinct(conn, "g.target", " AND g.target_type = 'output'")}

    @_writes
    def add_human_feedback(
        self, run_id: str, text: str, *, node: str, target: str, sample_id: str | None = None, author: str = "human"
    ) -> str:
        """Feedback a person wrote on a node or parameter (and optionally a sample). It waits, unconsumed,
        until the next optimizer call for that target reads it. Its `step` is the step it was
        written during: on a running run, the step in progress (the highest stored step); on a run
        not running (stopped, failed, completed, not started), its last completed step (0 before
        any). The step whose optimizer call read it is `consumed_step`, set when that step ends."""
        import uuid

        if not text.strip():
            raise StoreError("feedback is empty: write what should change")
        run = self.run(run_id)
        if run.status == "running":
            with self.connect() as conn:
                step = conn.execute("SELECT MAX(step) FROM steps WHERE run_id = ?", (run_id,)).fetchone()[0] or 0
        else:
            step = self.last_completed_step(run_id) or 0
        gid = uuid.uuid4().hex
        with self.connect() as conn:
            conn.execute(
                "INSERT INTO gradients (id, run_id, step, sample_id, node, target_type, target, text, source_node,"
                " path, origin, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (gid, run.id, step, sample_id, node, "parameter", target, text.strip(), author, "[]", "human",
                 time.time()),
            )
        return gid

    def pending_human_feedback(self, run_id: str, targets: Sequence[str]) -> list[Gradient]:
        """Human feedback on any of `targets` (parameter or node names) that no optimizer call has
        read yet, oldest first."""
        if not targets:
            return []
        marks = ",".join("?" * len(targets))
        with self.connect() as conn:
            rows = conn.execute(
                f"SELECT * FROM gradients WHERE run_id = ? AND origin = 'human' AND consumed_step IS NULL"
                f" AND (target IN ({marks}) OR node IN ({marks})) ORDER BY created_at",
                [run_id, *targets, *targets],
            ).fetchall()
        return [_gradient(r) for r in rows]

    @_writes
    def mark_feedback_consumed(self, ids: Sequence[str], step: int) -> None:
        with self.connect() as conn:
            conn.executemany("UPDATE gradients SET consumed_step = ? WHERE id = ?", [(step, i) for i in ids])

    @_writes
    def add_calls(self, calls: Iterable[LLMCall]) -> None:
        """Store call records (a call's id replaces the row with that id)."""
        rows = [_row(c, messages=_json([list(m) for m in c.messages]), cached=int(c.cached)) for c in calls]
        _upsert_rows(self, "llm_calls", ("id",), rows)

    def call(self, call_id: str) -> LLMCall | None:
        """One call with its text, or None when no call has that id."""
        with self.connect() as conn:
            row = conn.execute("SELECT * FROM llm_calls WHERE id = ?", (call_id,)).fetchone()
        return _record(LLMCall, row, messages=tuple(tuple(m) for m in json.loads(row["messages"])),
                       cached=bool(row["cached"])) if row else None

    def call_summaries(self, run_id: str) -> list[CallSummary]:
        """Every call of a run without its text, in the order made: what accounting needs."""
        return self._call_summaries(run_id, "")

    def fault_calls(self, run_id: str, kept_only: bool = False) -> list[CallSummary]:
        """Calls of a run that errored or were cut off (the preflight probe's cut-off is by
        design and left out), in the order made, without prompt or reply. `kept_only`: only the
        calls of the attempts the store keeps (see `attempt_totals`): what a step's per-phase
        figures count, without an attempt stopped part-way and redone on resume."""
        return self._call_summaries(
            run_id, " AND (c.error IS NOT NULL OR (c.finish_reason = 'length' AND c.phase != 'preflight'))"
            + (f" AND {_KEPT}" if kept_only else ""))

    def _call_summaries(self, run_id: str, where: str) -> list[CallSummary]:
        columns = ", ".join(f"c.{f.name}" for f in dataclasses.fields(CallSummary))
        with self.connect() as conn:
            rows = conn.execute(f"SELECT {columns} FROM llm_calls c LEFT JOIN steps s ON s.run_id = c.run_id"
                                f" AND s.step = c.step WHERE c.run_id = ?{where} ORDER BY c.created_at",
                                (run_id,)).fetchall()
        return [_record(CallSummary, r, cached=bool(r["cached"])) for r in rows]

    def errored_sample_counts(self, run_id: str) -> dict[tuple[int, str], int]:
        """(step, split) -> evaluations of the current values at that step with no score (the
        sample errored), for the pairs that have any. Counted in SQL: no prediction text read."""
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT step, split, COUNT(*) - COUNT(score) AS errored FROM evaluations"
                " WHERE run_id = ? AND subject = 'current' GROUP BY step, split",
                (run_id,),
            ).fetchall()
        return {(r["step"], r["split"]): r["errored"] for r in rows if r["errored"]}

    def call_totals(self, run_id: str) -> list[dict]:
        """Per (step, phase) of a run, in that order: calls, cached calls, failed calls, tokens of
        fresh calls, summed latency, and the wall-clock span from the first call's start to the
        last one's end; money: `cost_usd` (USD of the calls with a known price; cached calls cost
        0), `cost_unknown` (fresh calls whose price is unknown, left out of `cost_usd`) and
        `saved_usd` (what the calls answered from our response cache would have cost, where
        known) with `saved_unknown` (cache hits whose price is unknown, left out of it);
        `tokens_unknown`: fresh replies whose server reported no token usage (counted as 0 tokens,
        so `prompt_tokens` and `completion_tokens` leave them out). Summed in SQL over the
        accounting index (no call text is read). Calls without a
        step count under step -1."""
        with self.connect() as conn:
            rows = conn.execute(
                f"SELECT COALESCE(step, -1) AS step, phase, {_CALL_SUMS}"
                " FROM llm_calls WHERE run_id = ? GROUP BY 1, 2 ORDER BY 1, 2",
                (run_id,),
            ).fetchall()
        return [_call_sums(r) for r in rows]

    def attempt_totals(self, run_id: str) -> list[dict]:
        """`call_totals` split by attempt: per (step, phase, kept), in that order, the same
        figures, where `kept` (1 or 0) says whether the calls belong to the attempt of their step
        that the store keeps. A step redone on resume starts again (`start_step` replaces its row),
        so a call belongs to the kept attempt when it ended after that attempt started; the calls
        of an attempt that was stopped part-way and redone, and of a step with no stored row (a
        step discarded and not yet redone), have kept 0. The preflight probe, asked at every start,
        belongs to no attempt and is always kept. Calls without a step count under step -1 (kept
        0). Summed in SQL from the accounting index and the steps' start times."""
        with self.connect() as conn:
            rows = conn.execute(
                f"SELECT COALESCE(c.step, -1) AS step, c.phase, {_flag(_KEPT)} AS kept, {_CALL_SUMS}"
                " FROM llm_calls c LEFT JOIN steps s ON s.run_id = c.run_id AND s.step = c.step"
                " WHERE c.run_id = ? GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
                (run_id,),
            ).fetchall()
        return [_call_sums(r) for r in rows]

    def kept_call_spans(self, run_id: str) -> list[tuple[int, str, float, float]]:
        """(step, phase, start, end) of every call of a run that belongs to its step's kept attempt
        (see `attempt_totals`), in that order; times in seconds since the epoch (a call's record
        is written when it ends, `latency_ms` after it started). Read from the accounting index."""
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT c.step, c.phase, c.created_at - c.latency_ms / 1000.0 AS start, c.created_at AS end"
                " FROM llm_calls c JOIN steps s ON s.run_id = c.run_id AND s.step = c.step"
                f" WHERE c.run_id = ? AND {_KEPT} ORDER BY 1, 2, 3",
                (run_id,),
            ).fetchall()
        return [(r["step"], r["phase"], r["start"], r["end"]) for r in rows]

    def loss_scores(self, run_id: str) -> dict[int, dict[str, float | None]]:
        """Step -> {sample id: the score its loss gave it at that step (None: no score)}, for the
        training samples traced at each stored step (a step's mini-batch as the kept attempt ran
        it). Samples that errored before their loss are absent. No trace text is read."""
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT step, sample_id, MIN(score) AS score FROM invocations"
                " WHERE run_id = ? AND node_type = 'loss' GROUP BY step, sample_id ORDER BY step, sample_id",
                (run_id,),
            ).fetchall()
        scores: dict[int, dict[str, float | None]] = {}
        for r in rows:
            scores.setdefault(r["step"], {})[r["sample_id"]] = r["score"]
        return scores

    def proposal_costs(self, run_id: str) -> dict[str, dict]:
        """Proposal id -> what it cost in USD, for every proposal of the run: `make_usd` (its
        optimizer call, shared equally by the proposals that call made) and `make_unknown` (1 when
        that call's price is unknown, left out of `make_usd`), `validate_usd` (the calls that
        scored it on the mini-batch and on validation) and `validate_unknown` (those calls whose
        price is unknown, left out), and `unknown` (both unknown counts). Show them with
        `format_usd(make_usd, make_unknown)`: "unknown", or "$x + unknown".

        A figure is None (shown "unknown"), never $0, when the calls it sums were not recorded:
        `make_usd` for a proposal whose optimizer call is not in the store, `validate_usd` for a
        proposal that has a mini-batch or validation score but no call linked to it (a store
        written without those links). A proposal never scored cost nothing to validate ($0)."""
        with self.connect() as conn:
            made = conn.execute(
                "SELECT p.id, p.llm_call_id, c.id AS call_id, c.cost_usd, c.cached,"
                " COUNT(*) OVER (PARTITION BY p.llm_call_id) AS shared,"
                " p.minibatch_score IS NOT NULL OR p.val_score IS NOT NULL AS scored"
                " FROM proposals p LEFT JOIN llm_calls c ON c.id = p.llm_call_id WHERE p.run_id = ?",
                (run_id,)).fetchall()
            scored = conn.execute(
                "SELECT c.proposal_id AS id, COALESCE(SUM(c.cost_usd), 0.0) AS usd,"
                f" {_count('c.cost_usd IS NULL AND c.cached = 0')} AS unknown FROM llm_calls c"
                " WHERE c.run_id = ? AND c.proposal_id IS NOT NULL GROUP BY c.proposal_id", (run_id,)).fetchall()
        validated = {r["id"]: r for r in scored}
        costs: dict[str, dict] = {}
        for r in made:
            if r["llm_call_id"] is None:  # no optimizer call wrote it
                make, make_unknown = 0.0, 0
            elif r["call_id"] is None:  # its call is not in the store: what it cost is not known
                make, make_unknown = None, 1
            else:
                make_unknown = int(r["cost_usd"] is None and not r["cached"])
                make = (r["cost_usd"] or 0.0) / r["shared"]
            v = validated.get(r["id"])
            if v is not None:
                validate, validate_unknown = v["usd"], v["unknown"] or 0
            elif r["scored"]:  # scored, but by calls the store does not link to it
                validate, validate_unknown = None, 1
            else:
                validate, validate_unknown = 0.0, 0
            costs[r["id"]] = {"make_usd": make, "make_unknown": make_unknown, "validate_usd": validate,
                              "validate_unknown": validate_unknown, "unknown": make_unknown + validate_unknown}
        return costs

    # --- proposals and decisions ------------------------------------------------------------

    @_writes
    def add_proposal(self, run_id: str, p: Proposal) -> None:
        """Store a proposal of run `run_id` as given (its id replaces the row with that id); a
        `created_at` of 0 is taken as now."""
        feedback = None if p.feedback_ids is None else _json(list(p.feedback_ids))
        _upsert_rows(self, "proposals", ("id",),
                     [_row(p, run_id=run_id, created_at=p.created_at or time.time(), feedback_ids=feedback)])

    @_writes
    def update_proposal(self, proposal_id: str, **fields: Any) -> None:
        allowed = {"fate", "reason", "minibatch_score", "minibatch_baseline", "val_score", "val_baseline",
                   "decided_by", "decided_at", "value"}
        bad = set(fields) - allowed
        if bad:
            raise StoreError(f"cannot update proposal fields {sorted(bad)}")
        assignments = ", ".join(f"{k} = ?" for k in fields)
        with self.connect() as conn:
            conn.execute(f"UPDATE proposals SET {assignments} WHERE id = ?", [*fields.values(), proposal_id])

    def proposals(self, run_id: str, step: int | None = None, fate: str | None = None,
                  parameter: str | None = None) -> list[Proposal]:
        """A run's proposals (of one step, fate or parameter, or all) in the order they were made;
        `feedback_ids` is None for one stored before the feedback a proposal read was recorded."""
        return [_proposal(r) for r in self._select("proposals", run_id, "step, created_at", step=step,
                                                        fate=fate, parameter=parameter)]

    def proposals_reading(self, run_id: str, gradient_ids: Sequence[str]) -> dict[str, list[Proposal]]:
        """Gradient id -> the proposals whose optimizer call read it, in the order they were made
        (only ids some proposal read are keys)."""
        if not gradient_ids:
            return {}
        marks = ",".join("?" * len(gradient_ids))
        with self.connect() as conn:
            rows = conn.execute(
                f"SELECT j.value AS gradient_id, p.* FROM proposals p, {self.db.json_elements('p.feedback_ids', 'j')}"
                f" WHERE p.run_id = ? AND p.feedback_ids IS NOT NULL AND j.value IN ({marks})"
                " ORDER BY p.step, p.created_at",
                [run_id, *gradient_ids]).fetchall()
        readers: dict[str, list[Proposal]] = {}
        for r in rows:
            readers.setdefault(r["gradient_id"], []).append(_proposal(r))
        return readers

    def proposal_totals(self, run_id: str) -> list[dict]:
        """Per step of a run, in step order, the proposals that reached each stage: made
        (`proposed`), past the mini-batch (`passed_minibatch`: beat their baseline there, or got
        further), past validation (`passed_validation`: beat the best validation score, or were
        accepted), `accepted`; so the stages never grow from one to the next (a value a person
        accepted without the checks counts as past them: the person stood in for them). Besides
        the stages: rejected by a person's decision, malformed, rejected by a check, and
        `accepted_unchecked`: accepted without having beaten both baselines (a person's decision
        in review mode, or an edit), which the stages count as past both. Counted in SQL (no
        proposal text is read)."""
        passed_val = "(fate = 'accepted' OR COALESCE(val_score > val_baseline, FALSE))"
        accepted, malformed = _count("fate = 'accepted'"), _count("fate = 'malformed'")
        rejected_check = _count("fate = 'rejected_check'")
        by_person = _count("fate = 'rejected' AND COALESCE(decision = 'reject', FALSE)")
        unchecked = _count("fate = 'accepted' AND NOT (COALESCE(minibatch_score > minibatch_baseline, FALSE)"
                           " AND COALESCE(val_score > val_baseline, FALSE))")
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT step, COUNT(*) AS proposed,"
                f" {_count(passed_val + ' OR COALESCE(minibatch_score > minibatch_baseline, FALSE)')}"
                f" AS passed_minibatch, {_count(passed_val)} AS passed_validation,"
                f" {accepted} AS accepted, {by_person} AS rejected_by_person, {unchecked} AS accepted_unchecked,"
                f" {malformed} AS malformed, {rejected_check} AS rejected_check"
                " FROM proposals WHERE run_id = ? GROUP BY step ORDER BY step",
                (run_id,),
            ).fetchall()
        return [dict(r) for r in rows]

    def proposal(self, proposal_id: str) -> Proposal:
        """One proposal. Raises StoreError when no proposal has that id."""
        with self.connect() as conn:
            row = conn.execute("SELECT * FROM proposals WHERE id = ?", (proposal_id,)).fetchone()
        if row is None:
            raise StoreError(f"no proposal with id {proposal_id!r}")
        return _proposal(row)

    @_writes
    def decide(self, proposal_id: str, decision: str, value: str | None = None, by: str = "human") -> None:
        """Write a person's decision on a pending proposal. The waiting trainer reads it and goes on.
        A malformed reply held for review has no value: it can be rejected, or edited (a value written
        in its place), not accepted."""
        if decision not in ("accept", "reject", "edit"):
            raise StoreError(f"unknown decision {decision!r}: use accept, reject or edit")
        if decision == "edit" and not (value and value.strip()):
            raise StoreError("an edit needs the new, non-empty value")
        p = self.proposal(proposal_id)
        if p.fate != "pending":
            raise StoreError(f"proposal {proposal_id} is {p.fate}, not pending: nothing to decide")
        if decision == "accept" and p.held_fate == "malformed":
            raise StoreError(f"proposal {proposal_id} is a malformed reply with no value to accept: "
                             "reject it, or write a value and accept that")
        with self.connect() as conn:
            conn.execute(
                "UPDATE proposals SET decision = ?, decision_value = ?, decision_by = ? WHERE id = ? AND decision IS NULL",
                (decision, value, by, proposal_id),
            )

    def decision(self, proposal_id: str) -> tuple[str, str | None, str] | None:
        with self.connect() as conn:
            row = conn.execute(
                "SELECT decision, decision_value, decision_by FROM proposals WHERE id = ?", (proposal_id,)
            ).fetchone()
        return (row[0], row[1], row[2]) if row and row[0] else None

    # --- evaluations ------------------------------------------------------------------------

    @_writes
    def add_evaluations(self, run_id: str, step: int, split: str, subject: str, evals: Iterable[Evaluation]) -> None:
        """Store samples scored at `step` on `split` for `subject` ("current" or a proposal id),
        replacing earlier scores of the same sample, step, split and subject."""
        rows = [_row(e, run_id=run_id, step=step, split=split, subject=subject) for e in evals]
        _upsert_rows(self, "evaluations", ("run_id", "step", "split", "subject", "sample_id"), rows)

    def evaluations(self, run_id: str, split: str | None = None, subject: str | None = None) -> list[Evaluation]:
        """A run's scored samples (of one split and subject, or all), by step and sample."""
        rows = self._select("evaluations", run_id, "step, sample_id", split=split or None, subject=subject or None)
        return [_record(Evaluation, r) for r in rows]


def _upsert_rows(store: Store, table: str, key: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    """Insert `rows` (from `_row`: every column of `table`, by name), each replacing the row with
    the same `key`."""
    if rows:
        columns = tuple(rows[0])
        with store.connect() as conn:
            conn.executemany(_upsert(table, columns, key), [tuple(r[c] for c in columns) for r in rows])


def _invocation(row: Any) -> Invocation:
    return _record(Invocation, row, inputs=tuple(InputRef(*i) for i in json.loads(row["inputs"])),
                   parameters=tuple(tuple(p) for p in json.loads(row["parameters"])))


def _gradient(row: Any) -> Gradient:
    return _record(Gradient, row, path=tuple(json.loads(row["path"])))


def _proposal(row: Any) -> Proposal:
    feedback = row["feedback_ids"]
    return _record(Proposal, row, feedback_ids=None if feedback is None else tuple(json.loads(feedback)))


def _run(row: Any) -> Run:
    return _record(Run, row, config=json.loads(row["config"]), stop_requested=bool(row["stop_requested"]))
