"""`autodiff store copy`: runs move between a SQLite store and a PostgreSQL one, either way, with
nothing lost (every table's row count and content hash equal), and a run already there is not
overwritten unless asked."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from urllib.parse import urlsplit

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


# --- runs something is writing, stores that are not there, one store named twice ---------------

ELSEWHERE = "gpu-box-7.example"


def test_a_running_or_queued_run_is_refused_on_either_side(store: Store, tmp_path: Path) -> None:
    """Copied from, a run being trained would be taken mid-step; replaced in the destination, it
    would lose its rows under its trainer. Both are refused, on both backends, nothing written."""
    run_id = fake_run(store, tmp_path / "cache.sqlite", steps=1)
    other = Store(tmp_path / "other.sqlite")
    store.hold_run(run_id, ELSEWHERE, 4242)
    with pytest.raises(StoreError) as refused:
        copy_runs(store, other, [run_id])
    assert f"run {run_id} is running (process 4242 on host {ELSEWHERE} since " in str(refused.value)
    assert "--snapshot" in str(refused.value) and other.runs() == []
    store.set_run_status(run_id, "queued", error="waiting for a worker")
    with pytest.raises(StoreError, match=f"run {run_id} is queued in"):
        copy_runs(store, other, [run_id])
    store.set_run_status(run_id, "completed")
    copy_runs(store, other, [run_id])
    before = run_digest(other, run_id)
    other.hold_run(run_id, ELSEWHERE, 4242)  # now something trains the copy
    with pytest.raises(StoreError, match=f"run {run_id} is running .* Stop it there first"):
        copy_runs(store, other, [run_id], replace=True)
    with pytest.raises(StoreError, match="Stop it there first"):
        copy_runs(store, other, [run_id], replace=True, snapshot=True)  # a snapshot is for the source only
    assert {t: v for t, v in run_digest(other, run_id).items() if t != "runs"} == \
        {t: v for t, v in before.items() if t != "runs"}
    other.close()


def test_a_snapshot_of_a_run_mid_step_is_stored_stopped_and_resumes(store: Store, tmp_path: Path) -> None:
    from autodiff import runner
    from autodiff.llm.fake import FakeProvider
    from tests.fake_runs import responder

    run_id = fake_run(store, tmp_path / "cache.sqlite", steps=2)
    store.discard_after(run_id, 1)
    store.start_step(run_id, 2, ["s1"])  # step 2 half-way
    store.hold_run(run_id, ELSEWHERE, 4242)
    copy = Store(tmp_path / "copy.sqlite")
    [done] = copy_runs(store, copy, [run_id], snapshot=True)
    assert all(t.equal for t in done.tables)
    run = copy.run(run_id)
    assert run.status == "stopped" and "a snapshot copied from" in run.error and "after step 1" in run.error
    assert not run.stop_requested
    [event] = [e for e in copy.run_events(run_id) if e.kind == "copied_mid_run"]
    assert "while it was running" in event.text
    assert store.run(run_id).status == "running"  # the source is left as it was
    runner.resume(copy, run_id, cache_path=tmp_path / "cache.sqlite", providers={"fake": FakeProvider(responder)})
    assert copy.run(run_id).status == "completed" and [s.step for s in copy.steps(run_id)] == [0, 1, 2]
    copy.close()


def test_copy_replace_into_a_run_a_trainer_trains_is_refused_and_the_run_finishes(store, tmp_path, capsys) -> None:
    """The tester's case: a trainer trains run `busy` in DST; a snapshot of it goes to SRC and
    back with --replace: refused, and the trainer ends its run whole."""
    from tests.test_run_holders import _train_in_another_process, _wait_for

    trainer = _train_in_another_process(store, "busy", tmp_path)
    side = tmp_path / "side.sqlite"
    try:
        _wait_for(lambda: trainer.poll() is not None or (store.run_ids_matching("busy") and store.run("busy").status
                  == "running" and store.last_completed_step("busy") is not None), 60)
        assert trainer.poll() is None, trainer.stdout.read().decode()
        assert cli.main(["store", "copy", store.spec, str(side), "busy"]) == 2
        assert "busy is running" in capsys.readouterr().err
        assert cli.main(["store", "copy", store.spec, str(side), "busy", "--snapshot"]) == 0
        capsys.readouterr()
        assert cli.main(["store", "copy", str(side), store.spec, "busy", "--replace"]) == 2
        err = capsys.readouterr().err
        assert "busy is running" in err and f"process {trainer.pid}" in err and "Stop it there first" in err
        assert trainer.wait(timeout=120) == 0
    finally:
        if trainer.poll() is None:
            trainer.kill()
        trainer.wait()
    steps = store.steps("busy")
    assert store.run("busy").status == "completed" and [s.status for s in steps] == ["completed"] * 5


def test_a_source_that_does_not_exist_is_an_error_not_a_new_store(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "typo.sqlite"
    assert cli.main(["store", "copy", str(missing), str(tmp_path / "dst.sqlite")]) == 2
    assert "there is no store at" in capsys.readouterr().err
    assert not missing.exists() and not (tmp_path / "dst.sqlite").exists()
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    assert cli.main(["store", "copy", str(empty), str(tmp_path / "dst.sqlite")]) == 2
    assert "holds no run store" in capsys.readouterr().err


def test_a_postgresql_source_without_a_store_is_an_error(pg_url: str) -> None:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        for (table,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall():
            conn.execute(f"DROP TABLE {table}")
    with pytest.raises(StoreError, match="holds no run store"):
        Store(pg_url, create=False)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('runs')").fetchone()[0] is None  # nothing made


def test_a_destination_that_is_a_text_file_or_a_folder_is_named(tmp_path: Path, capsys) -> None:
    source = Store(tmp_path / "source.sqlite")
    source.create_run("r", "toy", {}, {})
    source.close()
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n" * 200)
    assert cli.main(["store", "copy", str(tmp_path / "source.sqlite"), str(notes)]) == 2
    assert "is not a SQLite store" in capsys.readouterr().err and notes.read_text().startswith("my notes")
    assert cli.main(["store", "copy", str(tmp_path / "source.sqlite"), str(tmp_path)]) == 2
    assert "is a folder, not a store file" in capsys.readouterr().err


def test_one_store_written_two_ways_is_the_same_store(tmp_path: Path, monkeypatch, postgres) -> None:
    monkeypatch.chdir(tmp_path)
    a = Store("a.sqlite")
    (tmp_path / "link.sqlite").symlink_to(tmp_path / "a.sqlite")
    for other in ("./a.sqlite", str(tmp_path / "a.sqlite"), "sub/../a.sqlite", "link.sqlite"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(StoreError, match="same store"):
            copy_runs(a, Store(other))
    url = postgres.new_database()
    try:
        parts = urlsplit(url)
        assert parts.hostname == "127.0.0.1"
        first, second = Store(url), Store(url.replace("@127.0.0.1:", "@localhost:", 1))
        with pytest.raises(StoreError, match="same store"):
            copy_runs(first, second)
        elsewhere = postgres.new_database()
        copy_runs(first, Store(elsewhere))  # another database of the same server is another store
        postgres.drop(elsewhere)
    finally:
        postgres.drop(url)


def test_replacing_a_different_run_of_the_same_name_says_what_it_was(tmp_path: Path, capsys) -> None:
    """Two people's runs named alike: --replace used to overwrite another task's run with a bare
    '(replaced)'; it now says what was replaced, so the mistake shows."""
    from autodiff.config import make_config
    from autodiff.llm.fake import FakeProvider
    from autodiff.runner import train
    from tests.fake_runs import responder

    alice, bob = Store(tmp_path / "alice.sqlite"), Store(tmp_path / "bob.sqlite")
    for store, task in ((alice, "object_counting"), (bob, "trec")):
        fakes = {f"{role}_model": "fake:x" for role in ("forward", "backward", "optimizer")}
        train(store, make_config(task=task, **fakes, steps=1, batch_size=2, val_limit=3, test_limit=3),
              run_id="pg1", cache_path=tmp_path / "cache.sqlite", providers={"fake": FakeProvider(responder)})
    assert cli.main(["store", "copy", str(bob.path), str(alice.path), "pg1", "--replace"]) == 0
    out = capsys.readouterr().out
    assert "run pg1 (replaced a different run of that name there: task object_counting, models " in out, out
    assert cli.main(["store", "copy", str(bob.path), str(alice.path), "pg1", "--replace"]) == 0
    assert "run pg1 (replaced):" in capsys.readouterr().out  # the same run again: nothing to warn about
