"""`autodiff store copy`: runs move between a SQLite store and a PostgreSQL one, either way, with
nothing lost (every table's row count and content hash equal), and a run already there is not
overwritten unless asked."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from autodiff import cli
from autodiff.errors import StoreError
from autodiff.store import Store
from autodiff.store.copy import RUN_TABLES, copy_runs, run_digest
from tests.fake_runs import fake_run

BUNDLED = Path(__file__).resolve().parents[1] / "sample_data" / "runs" / "sample_runs.sqlite"


@pytest.fixture
def pg_url(postgres) -> str:
    url = postgres.new_database()
    yield url
    postgres.drop(url)


def _every_row(store: Store, run_id: str) -> dict[str, list[tuple]]:
    with store.connect() as conn:
        return {table: sorted((tuple(map(repr, row)) for row in conn.execute(
            f"SELECT * FROM {table} WHERE {key} = ?", (run_id,))), key=repr) for table, key in RUN_TABLES}


def _close(left: list[dict], right: list[dict]) -> bool:
    """Equal rows, floats to 12 significant digits."""
    return len(left) == len(right) and all(
        a.keys() == b.keys() and all(
            math.isclose(a[k], b[k], rel_tol=1e-12) if isinstance(a[k], float) else a[k] == b[k] for k in a)
        for a, b in zip(left, right))


def test_round_trip_sqlite_postgresql_sqlite_is_equal(tmp_path: Path, pg_url: str) -> None:
    """The bundled sample runs (the local model's real text) and a fake run with hostile text go
    SQLite -> PostgreSQL -> SQLite; every row comes back as it was, value for value."""
    source_path = tmp_path / "source.sqlite"
    shutil.copyfile(BUNDLED, source_path)
    source = Store(source_path)
    fake_run(source, tmp_path / "cache.sqlite", steps=1)
    ids = [r.id for r in source.runs()]
    team, back = Store(pg_url), Store(tmp_path / "back.sqlite")
    there = copy_runs(source, team, [])
    assert sorted(r.run_id for r in there) == sorted(ids) and all(t.equal for r in there for t in r.tables)
    assert all(t.source_rows for r in there for t in r.tables if t.table in ("runs", "steps", "llm_calls"))
    copy_runs(team, back)
    for run_id in ids:
        assert _every_row(back, run_id) == _every_row(source, run_id)
        assert run_digest(back, run_id) == run_digest(team, run_id) == run_digest(source, run_id)
    # what the pages read is the same in all three (sums of floats to the last bits: the order differs)
    for run_id in ids:
        for store in (team, back):
            assert _close(store.call_totals(run_id), source.call_totals(run_id))
            assert store.proposal_totals(run_id) == source.proposal_totals(run_id)
            assert store.find_gradients(run_id) == source.find_gradients(run_id)
    assert [r.id for r in back.runs()] == [r.id for r in source.runs()]
    for store in (source, team, back):
        store.close()


def test_a_run_already_there_is_refused_unless_replaced(tmp_path: Path, pg_url: str, capsys) -> None:
    source = Store(tmp_path / "source.sqlite")
    run_id = fake_run(source, tmp_path / "cache.sqlite", steps=1)
    assert cli.main(["store", "copy", str(source.path), pg_url, run_id]) == 0
    out = capsys.readouterr().out
    assert f"run {run_id}:" in out and "1 run copied" in out
    assert all(f"  {table} " in out for table, _ in RUN_TABLES) and "DIFFERENT" not in out
    team = Store(pg_url)
    copied = team.run_events(run_id)
    source.add_run_event(run_id, "note", "written after the first copy")
    assert cli.main(["store", "copy", str(source.path), pg_url, run_id]) == 2
    err = capsys.readouterr().err
    assert "already exist" in err and run_id in err and "--replace" in err
    assert team.run_events(run_id) == copied  # nothing written by the refused copy
    assert cli.main(["store", "copy", str(source.path), pg_url, run_id, "--replace"]) == 0
    assert "(replaced)" in capsys.readouterr().out
    texts = [e.text for e in team.run_events(run_id)]
    assert texts == [e.text for e in copied] + ["written after the first copy"]
    assert run_digest(team, run_id) == run_digest(source, run_id)
    team.close()
    source.close()


def test_copy_names_what_is_wrong(tmp_path: Path) -> None:
    source = Store(tmp_path / "a.sqlite")
    with pytest.raises(StoreError, match="no run 'nope' in"):
        copy_runs(source, Store(tmp_path / "b.sqlite"), ["nope"])
    with pytest.raises(StoreError, match="same store"):
        copy_runs(source, Store(tmp_path / "a.sqlite"))


def test_text_with_nul_characters_survives_the_round_trip(tmp_path: Path, pg_url: str) -> None:
    """A run whose reply, trace, feedback and prediction hold NUL (which PostgreSQL text cannot
    hold: its backend escapes it) goes SQLite -> PostgreSQL -> SQLite with every row unchanged."""
    from tests.test_store import HOSTILE_TEXT, _traced_records

    source = Store(tmp_path / "source.sqlite")
    source.create_run("nul", "toy", {}, {"val": ["s1", "s2"]})
    trace, gradients, proposal, evals, call = _traced_records(HOSTILE_TEXT, "nul")
    source.add_calls([call])
    source.add_traces("nul", 1, [trace])
    source.add_gradients("nul", 1, gradients)
    source.add_proposal("nul", proposal)
    source.add_evaluations("nul", 1, "val", "current", evals)
    team, back = Store(pg_url), Store(tmp_path / "back.sqlite")
    copy_runs(source, team, ["nul"])
    copy_runs(team, back, ["nul"])
    assert _every_row(back, "nul") == _every_row(source, "nul")
    assert run_digest(back, "nul") == run_digest(team, "nul") == run_digest(source, "nul")
    assert team.call(call.id) == call and team.proposals("nul") == source.proposals("nul")
    for store in (source, team, back):
        store.close()
