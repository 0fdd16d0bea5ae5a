"""The run store: migrations, WAL, no secrets, decisions only on pending proposals."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from autodiff.errors import StoreError
from autodiff.records import (CALL_TEXT_FIELDS, CallSummary, Evaluation, Gradient, InputRef, Invocation, LLMCall,
                              ParameterSpec, Proposal, Trace)
from autodiff.store import MIGRATIONS, Store
from autodiff.store.copy import RUN_TABLES
from autodiff.store.core import _STEP_COLUMNS
from autodiff.store.sqlite import SQLiteBackend
from tests.postgres_server import with_database


def every_row(store: Store) -> str:
    """Every row of every table of the store, as text."""
    with store.connect() as conn:
        return "\n".join(repr(tuple(row)) for table in TABLES for row in conn.execute(f"SELECT * FROM {table}"))


TABLES = ("migrations", *(table for table, _ in RUN_TABLES))


def _proposal(pid: str, fate: str) -> Proposal:
    return Proposal(id=pid, step=1, parameter="p", value="v", method="rephrase", reasoning="r", fate=fate,
                    created_at=time.time())


def test_migrations_are_idempotent_and_data_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite"
    first = Store(path)
    first.create_run("r1", "toy", {"steps": 1}, {"val": ["a", "b"]})
    second = Store(path)  # migrates again: nothing applied twice, nothing lost
    Store(path)
    with sqlite3.connect(path) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM migrations ORDER BY name")]
    assert names == [name for name, _ in MIGRATIONS]
    assert [r.id for r in second.runs()] == ["r1"] and second.sample_ids("r1", "val") == ["a", "b"]
    for store in (first, second):
        store.close()


def test_sqlite_store_uses_wal_and_short_connections(tmp_path: Path) -> None:
    store = Store(tmp_path / "runs.sqlite")
    with store.connect() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with sqlite3.connect(store.path) as raw:  # the mode is persistent in the file itself
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_stored_config_never_holds_an_api_key(run_toy, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-live-DO-NOT-STORE-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.setenv("ANTHROPIC_API_KEY", secret + "-ant")
    run = run_toy()
    assert run.record.status == "completed"
    assert "key" not in " ".join(run.record.config).lower()
    assert secret not in every_row(store)
    if store.backend == "sqlite":
        store.close()  # checkpoint, so every row is in the main file too
        files = [p for p in store.path.parent.iterdir() if p.is_file()]
        assert files and all(secret.encode() not in p.read_bytes() for p in files)


def test_decide_only_on_a_pending_proposal(store: Store) -> None:
    store.create_run("r", "toy", {}, {})
    store.add_proposal("r", _proposal("pending", "pending"))
    store.add_proposal("r", _proposal("done", "accepted"))
    with pytest.raises(StoreError, match="accepted, not pending"):
        store.decide("done", "accept")
    with pytest.raises(StoreError, match="no proposal"):
        store.decide("missing", "accept")
    with pytest.raises(StoreError, match="unknown decision"):
        store.decide("pending", "maybe")
    with pytest.raises(StoreError, match="non-empty value"):
        store.decide("pending", "edit", value="  ")
    assert store.decision("pending") is None
    store.decide("pending", "edit", value="new text")
    assert store.decision("pending") == ("edit", "new text", "human")
    store.decide("pending", "reject")  # the first decision stands
    assert store.decision("pending") == ("edit", "new text", "human")


def test_unknown_run_and_empty_feedback_are_store_errors(store: Store) -> None:
    with pytest.raises(StoreError, match="no run with id 'nope'"):
        store.run("nope")
    store.create_run("r", "toy", {}, {})
    with pytest.raises(StoreError, match="empty"):
        store.add_human_feedback("r", "   ", node="n", target="p")
    with pytest.raises(StoreError, match="cannot update"):
        store.update_proposal("x", decision="accept")


def test_discard_after_drops_partial_steps_only(store: Store) -> None:
    store.create_run("r", "toy", {}, {})
    for step in (0, 1, 2):
        store.start_step("r", step, [])
        store.add_parameter_version("r", "p", step, f"v{step}", None)
    store.finish_step("r", 0, 0.5, None, [])
    store.finish_step("r", 1, 0.6, None, [])
    assert store.last_completed_step("r") == 1
    store.discard_after("r", 1)
    assert [s.step for s in store.steps("r")] == [0, 1]
    assert store.parameter_values_at("r", 5) == {"p": "v1"}


def test_an_older_sqlite_store_migrates_to_the_current_schema(tmp_path: Path) -> None:
    """A store made by an earlier version (only the first migrations applied, rows in it) takes
    the remaining ones on opening, its rows kept."""
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        SQLiteBackend(path).migrate(conn, MIGRATIONS[:2])
        conn.execute("INSERT INTO runs (id, task, config, status, created_at, updated_at) "
                     "VALUES ('old', 'toy', '{}', 'completed', 1, 1)")
        conn.execute("INSERT INTO evaluations VALUES ('old', 0, 'val', 'current', 's1', 'p', 'g', 1.0, NULL)")
    store = Store(path)
    with store.connect() as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM migrations ORDER BY name")] == [n for n, _ in MIGRATIONS]
    assert store.run("old").status == "completed"
    assert [(e.sample_id, e.score) for e in store.evaluations("old")] == [("s1", 1.0)]
    store.close()


def test_the_bundled_sample_store_opens(tmp_path: Path) -> None:
    """The sample store shipped in sample_data/ opens (on a copy: the bundled file is never written)."""
    bundled = Path(__file__).resolve().parents[1] / "sample_data" / "runs" / "sample_runs.sqlite"
    copy = tmp_path / "sample.sqlite"
    shutil.copyfile(bundled, copy)
    store = Store(copy)
    runs = store.runs()
    assert runs and all(store.steps(r.id) for r in runs)
    assert all(store.call_totals(r.id) for r in runs)
    store.close()


def _fields(record: type, *added: str) -> tuple[str, ...]:
    """The columns a record is written to: its fields, and those the store adds (the run)."""
    return (*added, *(f.name for f in dataclasses.fields(record)))


@pytest.mark.parametrize("table, columns", [
    ("steps", _STEP_COLUMNS), ("invocations", _fields(Invocation, "run_id")),
    ("gradients", _fields(Gradient, "run_id")), ("proposals", _fields(Proposal)),
    ("evaluations", _fields(Evaluation, "run_id")), ("llm_calls", _fields(LLMCall)),
])
def test_a_replacing_write_names_every_column(store: Store, table: str, columns: tuple[str, ...]) -> None:
    """An upsert replaces a whole row (as SQLite's INSERT OR REPLACE did) only when it names every
    column: inserts name their columns from the record's fields, so a column added by a migration
    must be added to its record too (and a record's field to its table)."""
    with store.connect() as conn:
        stored = list(conn.execute(f"SELECT * FROM {table} LIMIT 0").description)
    assert sorted(c[0] for c in stored) == sorted(columns)


def test_replacing_a_step_resets_what_the_earlier_attempt_wrote(store: Store) -> None:
    store.create_run("r", "toy", {}, {})
    store.start_step("r", 0, ["a"])
    store.finish_step("r", 0, 0.5, 0.25, ["a"])
    store.start_step("r", 0, ["b"])  # redone on resume
    [step] = store.steps("r")
    assert (step.status, step.batch, step.val_score, step.failed_samples) == ("running", ("b",), None, ())


def test_readers_agree_on_both_backends(run_toy, store: Store) -> None:
    """The store's SQL gives the same figures on both databases: the sums the pages read are
    checked against the call records themselves."""
    run = run_toy(steps=2, proposals=2)
    calls = store.call_summaries(run.run_id)
    totals = store.call_totals(run.run_id)
    assert sum(t["calls"] for t in totals) == len(calls)
    assert sum(t["cached"] for t in totals) == sum(1 for c in calls if c.cached)
    assert all(isinstance(t["calls"], int) and isinstance(t["cost_usd"], float) for t in totals)
    assert sum(t["prompt_tokens"] for t in totals) == sum(c.prompt_tokens for c in calls if not c.cached)
    made = store.proposals(run.run_id)
    assert sum(t["proposed"] for t in store.proposal_totals(run.run_id)) == len(made)
    read = [g for p in made for g in p.feedback_ids or []]
    readers = store.proposals_reading(run.run_id, read)
    assert read and set(readers) == set(read)
    total, page = store.find_gradients(run.run_id, limit=None, offset=1)
    assert total == len(store.gradients(run.run_id)) and len(page) == total - 1
    assert store.find_gradients(run.run_id, targets=[])[0] == 0
    facets = store.gradient_facets(run.run_id)
    assert facets["total"] == total and facets["steps"] == sorted(facets["steps"])


def test_text_sorts_by_code_point_on_both_backends(store: Store) -> None:
    """Sample ids sort as SQLite sorts them (byte-wise), whatever the PostgreSQL server's locale."""
    store.create_run("r", "toy", {}, {})
    ids = ["b", "B", "a_1", "a-2", "Ä", "a10", "a9"]
    store.add_evaluations("r", 0, "val", "current", [Evaluation(i, "p", "g", 1.0) for i in ids])
    assert [e.sample_id for e in store.evaluations("r")] == sorted(ids)


def test_booleans_are_stored_as_integers(store: Store) -> None:
    store.create_run("r", "toy", {}, {})
    store.add_parameters("r", [ParameterSpec("p", "n", "instruction", "r", trainable=True, peers=(), position=0)])
    store.request_stop("r")
    assert store.parameters("r")[0].trainable is True and store.stop_requested("r") is True
    with store.connect() as conn:
        assert conn.execute("SELECT trainable FROM parameters").fetchone()[0] == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_processes_opening_a_new_store_at_once_migrate_it_once(backend: str, tmp_path: Path, request) -> None:
    """Trainers, workers and a dashboard started together on a new store: each migration is
    applied once, none fails on tables another process just made."""
    if backend == "sqlite":
        spec, drop = str(tmp_path / "new.sqlite"), None
    else:
        server = request.getfixturevalue("postgres")
        name = f"autodiff_fresh_{os.getpid()}"
        server.admin.execute(f"DROP DATABASE IF EXISTS {name}")
        server.admin.execute(f"CREATE DATABASE {name}")  # empty: not from the migrated template
        spec = with_database(server.url, name)
        drop = lambda: server.admin.execute(f"DROP DATABASE {name} WITH (FORCE)")  # noqa: E731
    code = ("import sys, time; from autodiff.store import Store; time.sleep(max(0, float(sys.argv[2]) - time.time()));"
            " Store(sys.argv[1]).close()")
    at = str(time.time() + 4)  # all imported by then: they open the store together
    procs = [subprocess.Popen([sys.executable, "-c", code, spec, at], stderr=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1]) for _ in range(6)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errors
    store = Store(spec)
    with store.connect() as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM migrations ORDER BY name")] == [n for n, _ in MIGRATIONS]
    store.close()
    if drop:
        drop()


def test_writers_and_readers_at_once_lose_nothing(store: Store) -> None:
    """Several trainers (threads here, sharing the store's connections) write their runs while a
    page reads: every row each writer saw committed is there, no write or read raised."""
    def calls(run_id: str, n: int, start: int) -> list[LLMCall]:
        return [LLMCall(id=f"{run_id}-{i}", run_id=run_id, step=i % 5, phase="forward", role="forward", node="n",
                        sample_id=f"s{i}", call_index=0, model="fake:m", messages=(("user", "q" * 500),),
                        response="a", prompt_tokens=10, completion_tokens=2, latency_ms=1.0, cached=i % 3 == 0,
                        error=None, created_at=time.time()) for i in range(start, start + n)]

    failures: list[BaseException] = []
    done = threading.Event()

    def write(run_id: str) -> None:
        try:
            store.create_run(run_id, "toy", {}, {"val": ["a"]})
            for batch in range(10):
                store.add_calls(calls(run_id, 20, batch * 20))
                store.add_run_event(run_id, "batch", str(batch))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    def read() -> None:
        try:
            while not done.is_set():
                for run in store.runs():
                    store.call_totals(run.id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(f"w{i}",)) for i in range(6)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    reader.join()
    assert not failures, failures
    for i in range(6):
        assert sum(t["calls"] for t in store.call_totals(f"w{i}")) == 200
        assert len(store.run_events(f"w{i}")) == 10


def test_a_postgresql_deadlock_is_retried_other_errors_are_not(postgres) -> None:
    """A store call the server aborted to break a deadlock runs again; any other error is raised."""
    from psycopg import errors

    url = postgres.new_database()
    store = Store(url)

    tries: list[int] = []

    def deadlocked_once() -> str:
        tries.append(1)
        if len(tries) == 1:
            raise errors.DeadlockDetected("deadlock detected")
        return "done"

    assert store.db.retrying(deadlocked_once) == "done" and len(tries) == 2
    tries.clear()

    def duplicate() -> None:
        tries.append(1)
        raise errors.UniqueViolation("duplicate key")

    with pytest.raises(errors.UniqueViolation):
        store.db.retrying(duplicate)
    assert len(tries) == 1
    store.close()
    postgres.drop(url)


def test_a_retried_write_writes_rows_given_as_a_generator(postgres) -> None:
    """The second attempt of a write the server aborted (a deadlock) still has its rows."""
    from psycopg import errors

    url = postgres.new_database()
    store = Store(url)
    store.create_run("r", "toy", {}, {})
    real, attempts = store.db.retrying, []

    def deadlock_first(method, *args, **kwargs):
        def once(*a, **k):
            attempts.append(1)
            if len(attempts) == 1:
                list(a[-1])  # the first attempt read its rows, then the server aborted it
                raise errors.DeadlockDetected("deadlock detected")
            return method(*a, **k)
        return real(once, *args, **kwargs)

    store.db.retrying = deadlock_first
    store.add_evaluations("r", 0, "val", "current", (Evaluation(f"s{i}", "p", "g", 1.0) for i in range(3)))
    assert len(attempts) == 2 and [e.sample_id for e in store.evaluations("r")] == ["s0", "s1", "s2"]
    store.close()
    postgres.drop(url)


# --- records in, records out: traces, gradients, proposals, calls, evaluations ---------------------

HOSTILE_TEXT = "nul \x00 here, esc \ue000 and \ue0000 there, </script> <b>&amp;\x00"


def _call(cid: str, run_id: str, response: str | None = "ok", **kw) -> LLMCall:
    return LLMCall(cid, run_id, 1, "backward", "backward", "counter", "s1", 1, "fake:m",
                   (("system", "sys"), ("user", "ask")), response, 12, 3, 40.0, False, None, 1000.0,
                   endpoint="in-process", finish_reason="stop", cost_usd=0.25, saved_usd=0.0, price_source="user",
                   **kw)


def _traced_records(text: str = "text", run_id: str = "r") -> tuple[Trace, list[Gradient], Proposal, list[Evaluation],
                                                                 LLMCall]:
    """A sample's trace (an LLM node and its loss), its feedback, a proposal, two evaluations and
    the call that wrote the feedback, `text` in every text field."""
    source = Invocation("i1", "s1", "counter", "llm", 0, (InputRef("question", text),), text,
                        (("counter.instruction", text),), prompt=text, llm_call_id="c1", seq=0)
    loss = Invocation("i2", "s1", "exact_match", "loss", 0, (InputRef("prediction", text, "i1"),), "0", score=0.0,
                      error=text, seq=1)
    gradients = [Gradient("g1", "s1", "exact_match", "i2", 0, "output", "counter", "i1", 0.0, text, "exact_match",
                          ("tidy", "dedupe"), "c1", "loss", None, 1001.0, about_call=0),
                 Gradient("g2", "s1", "counter", "i1", 0, "parameter", "counter.instruction", None, 0.0, text,
                          "counter", (), "c1", error=text, created_at=1002.0, about_call=0)]
    proposal = Proposal("p1", 1, "counter.instruction", text, "rephrase", text, "c1", "failed_val", text, 0.5, 0.25,
                        0.5, 0.75, "auto", 1003.0, ("g2", "g1"), None)
    evals = [Evaluation("s1", text, "3", 1.0), Evaluation("s2", "", "3", None, text)]
    return Trace("s1", [source, loss]), gradients, proposal, evals, _call("c1", run_id, response=text)


def test_readers_give_back_the_records_written(store: Store) -> None:
    """Each reader returns the records its insert was given, with the fields the store sets (the
    step, the run, the split and subject) filled in; nothing else changed, on both backends."""
    store.create_run("r", "toy", {}, {})
    trace, gradients, proposal, evals, call = _traced_records()
    store.add_traces("r", 1, [trace])
    store.add_gradients("r", 1, gradients)
    store.add_proposal("r", proposal)
    store.add_evaluations("r", 1, "val", "current", evals)
    store.add_calls([call])
    assert store.invocations("r", 1) == [replace(i, step=1) for i in trace.invocations]
    stored = [replace(g, step=1) for g in gradients]
    assert store.gradients("r") == stored and store.find_gradients("r") == (2, stored)
    assert store.gradients_by_id("r", ["g2", "g1"]) == stored[::-1]
    assert store.proposals("r") == [store.proposal("p1")] == [replace(proposal, run_id="r")]
    assert store.proposals_reading("r", ["g1", "g9"]) == {"g1": [replace(proposal, run_id="r")]}
    assert store.evaluations("r") == [replace(e, step=1, split="val", subject="current") for e in evals]
    assert store.call("c1") == call and store.call("missing") is None
    store.add_human_feedback("r", "shorter", node="counter", target="counter.instruction")
    [human] = store.pending_human_feedback("r", ["counter.instruction"])
    assert (human.origin, human.text, human.step, human.consumed_step, human.path) == ("human", "shorter", 0, None, ())
    store.mark_feedback_consumed([human.id], 2)
    assert store.pending_human_feedback("r", ["counter"]) == []
    assert store.gradients_by_id("r", [human.id])[0].consumed_step == 2


def test_call_summaries_are_calls_without_their_text(store: Store) -> None:
    """A CallSummary has every field of LLMCall but its text, in the same order; the store fills
    each from the same column."""
    names = [f.name for f in dataclasses.fields(LLMCall) if f.name not in CALL_TEXT_FIELDS]
    assert [f.name for f in dataclasses.fields(CallSummary)] == names
    store.create_run("r", "toy", {}, {})
    fault = replace(_call("c2", "r"), response=None, error="HTTP 429", error_kind="rate_limit", created_at=1001.0)
    store.add_calls([_call("c1", "r"), fault])
    summaries = store.call_summaries("r")
    assert summaries == [CallSummary(**{n: getattr(c, n) for n in names}) for c in (_call("c1", "r"), fault)]
    assert store.fault_calls("r") == summaries[1:] and not any(hasattr(s, "messages") for s in summaries)


def test_a_proposal_whose_feedback_was_not_recorded_reads_none(store: Store) -> None:
    """`feedback_ids` None (stored before the feedback a proposal read was recorded) stays None,
    apart from () (it read none)."""
    store.create_run("r", "toy", {}, {})
    store.add_proposal("r", replace(_proposal("old", "failed_val"), feedback_ids=None))
    store.add_proposal("r", _proposal("new", "failed_val"))
    assert [(p.id, p.feedback_ids) for p in store.proposals("r")] == [("old", None), ("new", ())]
    with store.connect() as conn:
        assert [r[0] for r in conn.execute("SELECT feedback_ids FROM proposals ORDER BY created_at")] == [None, "[]"]


def test_text_with_nul_characters_is_stored_on_both_backends(store: Store) -> None:
    """PostgreSQL text cannot hold NUL, SQLite's can: a reply, a trace, feedback, a proposal and a
    prediction holding NUL (and the character the PostgreSQL backend escapes with) are written and
    read back unchanged on both, and equality on such text still finds them."""
    store.create_run("r", "toy", {}, {})
    trace, gradients, proposal, evals, call = _traced_records(HOSTILE_TEXT)
    call = replace(call, messages=(("user", HOSTILE_TEXT),), reasoning=HOSTILE_TEXT, error=HOSTILE_TEXT)
    store.add_calls([call])
    store.add_traces("r", 1, [trace])
    store.add_gradients("r", 1, gradients)
    store.add_proposal("r", replace(proposal, parameter=HOSTILE_TEXT))
    store.add_evaluations("r", 1, "val", "current", evals)
    store.add_run_event("r", "note", HOSTILE_TEXT)
    assert store.call("c1") == call and store.fault_calls("r")[0].error == HOSTILE_TEXT
    assert [i.output for i in store.invocations("r")] == [HOSTILE_TEXT, "0"]
    assert store.invocations("r")[1].inputs == (InputRef("prediction", HOSTILE_TEXT, "i1"),)
    assert [g.text for g in store.gradients("r")] == [HOSTILE_TEXT] * 2
    assert [p.value for p in store.proposals("r", parameter=HOSTILE_TEXT)] == [HOSTILE_TEXT]
    assert [e.prediction for e in store.evaluations("r")] == [HOSTILE_TEXT, ""]
    with store.connect() as conn:  # what SQL gives back is unescaped too
        assert conn.execute("SELECT response FROM llm_calls WHERE response = ?", (HOSTILE_TEXT,)).fetchone()[0] \
            == HOSTILE_TEXT


def test_the_postgresql_text_escape_is_reversible() -> None:
    """Whatever the text, escaping leaves no NUL and unescaping gives it back; text with neither
    NUL nor the escape character is stored as it is."""
    from autodiff.store.postgres import ESC, escape_text, unescape_text

    for text in ["", "plain", "\x00", ESC, ESC + "0", ESC + "e", ESC + ESC, "\x00" + ESC + "0\x00", "end" + ESC,
                 ESC + "x", "a\x00b" * 50]:
        escaped = escape_text(text)
        assert "\x00" not in escaped and unescape_text(escaped) == text, repr(text)
    assert escape_text("plain </script> ü") == "plain </script> ü"
