"""One run, one trainer (autodiff.holders): a run that a process is training is refused to any
second trainer (resume from the shell, Python, the dashboard, a worker) unless its holder is
known dead (a process of this host that is gone) or, on another host, a takeover is forced;
`autodiff stop` reaches it wherever it runs. Both backends."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autodiff import cli, holders, runner
from autodiff.config import make_config
from autodiff.errors import ConfigError
from autodiff.store import Store
from tests.fake_runs import fake_run
from worker_task import NAME as SLOW_TASK

ROOT = Path(__file__).resolve().parents[1]
ELSEWHERE = "gpu-box-7.example"  # a host that is not this one


def _wait_for(condition, timeout: float, describe=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {describe()}")
        time.sleep(0.05)


def _dead_pid() -> int:
    """The pid of a process of this host that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def stopped_run(store: Store, tmp_path: Path) -> str:
    """A finished fake run made resumable again: stopped after step 1 of 2."""
    run_id = fake_run(store, tmp_path / "cache.sqlite", steps=2)
    store.discard_after(run_id, 1)
    store.set_run_status(run_id, "stopped", error="stopped on request after step 1; resume goes on from step 2")
    return run_id


def _resume(store: Store, run_id: str, tmp_path: Path, **options) -> str:
    from tests.fake_runs import responder
    from autodiff.llm.fake import FakeProvider

    return runner.resume(store, run_id, cache_path=tmp_path / "cache.sqlite",
                         providers={"fake": FakeProvider(responder)}, **options)


def test_a_second_trainer_is_refused_while_a_process_of_this_host_trains_the_run(store, stopped_run, tmp_path):
    """The holder lives (a process of this machine that still runs): the CLI, Python, the
    dashboard and a worker are all refused, the run untouched; once it is gone, it is taken over."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert store.hold_run(stopped_run, holders.this_host(), sleeper.pid)
        before = store.run(stopped_run)
        for attempt in (lambda: _resume(store, stopped_run, tmp_path),
                        lambda: _resume(store, stopped_run, tmp_path, from_queue=True),  # what a worker calls
                        lambda: _resume(store, stopped_run, tmp_path, force=True),  # force: for another host only
                        lambda: runner.resume_background(store, stopped_run, tmp_path / "cache.sqlite")):
            with pytest.raises(ConfigError) as refused:
                attempt()
            message = str(refused.value)
            assert f"process {sleeper.pid} on host {holders.this_host()} (this machine) since " in message
            assert f"autodiff stop {stopped_run}" in message
            assert "--force does not take a run from a process this machine sees alive" in message
        assert store.run(stopped_run) == before and store.last_completed_step(stopped_run) == 1
    finally:
        sleeper.kill()
        sleeper.wait()
    assert _resume(store, stopped_run, tmp_path) == stopped_run  # its holder is gone: taken over
    assert store.run(stopped_run).status == "completed"
    [event] = [e for e in store.run_events(stopped_run) if e.kind == "taken_over"]
    assert f"from process {sleeper.pid} on host {holders.this_host()}" in event.text and "gone" in event.text


def test_a_run_just_interrupted_waits_for_its_process_to_end(store, stopped_run, tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM: the trainer records the run stopped once its calls are over, and its
    process then still has to exit. A resume meanwhile (from a shell, the dashboard, a worker)
    is refused, the run untouched; once that process is gone, or the stop is old, it goes on."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert store.hold_run(stopped_run, holders.this_host(), sleeper.pid)
        store.set_run_status(stopped_run, "stopped", error="interrupted (SIGTERM) after step 1; resume goes on from "
                                                          "step 2, redoing any part of it already done")
        before = store.run(stopped_run)
        for attempt in (lambda: _resume(store, stopped_run, tmp_path),
                        lambda: runner.resume_background(store, stopped_run, tmp_path / "cache.sqlite")):
            with pytest.raises(ConfigError, match=f"just interrupted in process {sleeper.pid} on this machine, which is "
                                                  "still ending"):
                attempt()
        assert store.run(stopped_run) == before
        later = time.time() + holders.STOPPING_GRACE_S + 1
        monkeypatch.setattr(holders.time, "time", lambda: later)
        assert not holders.still_ending(store.run(stopped_run), store.backend)  # an old stop: its process is not ours
        monkeypatch.undo()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not holders.still_ending(store.run(stopped_run), store.backend)
    assert _resume(store, stopped_run, tmp_path) == stopped_run and store.run(stopped_run).status == "completed"


def test_a_holder_on_another_host_is_refused_with_how_to_take_over(store, stopped_run, tmp_path, capsys):
    store.hold_run(stopped_run, ELSEWHERE, 4242)
    since = store.run(stopped_run).held_since
    spec = ["--store", store.spec, "--cache", str(tmp_path / "cache.sqlite")]
    assert cli.main(["resume", stopped_run, *spec]) == 2
    said = capsys.readouterr().err
    assert f"process 4242 on host {ELSEWHERE} since {time.strftime('%Y-%m-%d %H:%M', time.localtime(since))}" in said
    assert f"autodiff resume {stopped_run} --store {store.display} --force" in said and "really gone" in said
    with pytest.raises(ConfigError, match=ELSEWHERE):
        runner.resume_background(store, stopped_run, tmp_path / "cache.sqlite")  # the dashboard's Resume
    assert runner.mark_dead_runs(store) == [] and store.run(stopped_run).status == "running"  # not ours to judge
    assert _resume(store, stopped_run, tmp_path, force=True) == stopped_run
    run = store.run(stopped_run)
    assert run.status == "completed" and run.host == holders.this_host() and run.pid == os.getpid()
    [event] = [e for e in store.run_events(stopped_run) if e.kind == "taken_over"]
    assert f"process 4242 on host {ELSEWHERE}" in event.text and "forced" in event.text


def test_a_run_of_this_host_whose_process_died_is_marked_stopped_on_either_backend(store, stopped_run):
    """mark_dead_runs used to skip PostgreSQL stores; with the host recorded it checks this
    host's runs there too, and leaves other hosts' alone."""
    store.hold_run(stopped_run, holders.this_host(), _dead_pid())
    store.create_run("other", "toy", {}, {})
    store.hold_run("other", ELSEWHERE, _dead_pid())  # a pid that is dead here means nothing there
    assert runner.mark_dead_runs(store) == [stopped_run]
    assert store.run(stopped_run).status == "stopped" and "ended without finishing" in store.run(stopped_run).error
    assert store.run("other").status == "running"


def test_taking_a_run_is_atomic(store, stopped_run):
    """Two processes read the run as stopped and take it: the second write finds it changed."""
    seen = store.run(stopped_run)
    assert store.hold_run(stopped_run, "host-a", 1, expect=seen)
    assert not store.hold_run(stopped_run, "host-b", 2, expect=seen)
    assert (store.run(stopped_run).host, store.run(stopped_run).pid) == ("host-a", 1)
    assert not holders.still_holds(store, stopped_run)  # this process does not hold it: its trainer would stop


def _train_in_another_process(store: Store, run_id: str, tmp_path: Path) -> subprocess.Popen:
    """`autodiff train` of a slow run (a second or so per step), in a process of its own."""
    cmd = [sys.executable, "-m", "autodiff.cli", "--store", store.spec, "--cache", str(tmp_path / "cache-a.sqlite"),
           "--quiet", "train", SLOW_TASK, "--task-arg", "delay=0.4", "--forward-model", "fake:forward",
           "--backward-model", "fake:backward", "--optimizer-model", "fake:optimizer", "--steps", "4",
           "--batch-size", "4", "--val-limit", "6", "--test-limit", "4", "--run-id", run_id]
    env = {k: v for k, v in os.environ.items() if k != "AUTODIFF_STORE"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_resume_is_refused_while_plain_train_runs_and_stop_reaches_it(store, tmp_path, capsys):
    """The tester's case: `autodiff train` runs; `autodiff resume` of the same run from another
    shell is refused (no step done twice, nothing spent twice); `autodiff stop` stops it at a
    step boundary; then resume goes on and each step is completed once."""
    trainer = _train_in_another_process(store, "busy", tmp_path)
    try:
        _wait_for(lambda: trainer.poll() is not None or (store.run_ids_matching("busy") and store.run("busy").status
                  == "running" and store.last_completed_step("busy") is not None), 60)
        assert trainer.poll() is None, trainer.stdout.read().decode()
        calls = len(store.call_summaries("busy"))
        spec = ["--store", store.spec, "--cache", str(tmp_path / "cache-b.sqlite")]
        assert cli.main(["resume", "busy", *spec]) == 2
        said = capsys.readouterr().err
        assert f"process {trainer.pid} on host {holders.this_host()} (this machine)" in said
        assert trainer.poll() is None and store.run("busy").pid == trainer.pid
        assert len(store.call_summaries("busy")) >= calls  # the refused resume neither discarded nor redid anything
        assert cli.main(["stop", "busy", "--store", store.spec]) == 0
        assert "stop requested" in capsys.readouterr().out
        assert trainer.wait(timeout=60) == 3  # stopped, resumable
    finally:
        if trainer.poll() is None:
            trainer.kill()
        trainer.wait()
    stopped = store.run("busy")
    assert stopped.status == "stopped" and stopped.error.startswith("stopped on request after step")
    assert cli.main(["resume", "busy", *spec]) == 0
    steps = store.steps("busy")
    assert [s.step for s in steps] == [0, 1, 2, 3, 4] and all(s.status == "completed" for s in steps)
    assert not [e for e in store.run_events("busy") if e.kind == "taken_over"]


def test_stop_says_what_happens_and_refuses_a_run_that_is_not_active(store, stopped_run, capsys):
    assert cli.main(["stop", stopped_run, "--store", store.spec]) == 2
    assert f"run {stopped_run} is stopped: there is nothing to stop" in capsys.readouterr().err
    store.hold_run(stopped_run, ELSEWHERE, 77)
    assert cli.main(["stop", stopped_run, "--store", store.spec]) == 0
    out = capsys.readouterr().out
    assert "next step boundary" in out and f"process 77 on host {ELSEWHERE}" in out
    assert store.stop_requested(stopped_run)
    assert cli.main(["stop", "nope", "--store", store.spec]) == 2
    assert "no run with id 'nope'" in capsys.readouterr().err
    store.hold_run(stopped_run, holders.this_host(), _dead_pid())  # its process is gone
    assert cli.main(["stop", stopped_run, "--store", store.spec]) == 0
    assert "had no process left to stop" in capsys.readouterr().out and store.run(stopped_run).status == "stopped"


def test_the_holder_migration_keeps_older_runs(tmp_path):
    """A store from before hosts were recorded: its runs read with host None, and a running one
    counts as this machine's on SQLite (one machine's file)."""
    import sqlite3

    from autodiff.store.schema import MIGRATIONS
    from autodiff.store.sqlite import SQLiteBackend

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        SQLiteBackend(path).migrate(conn, MIGRATIONS[:-1])
        conn.execute("INSERT INTO runs (id, task, config, status, created_at, updated_at, pid) "
                     "VALUES ('old', 'toy', '{}', 'running', 1, 1, ?)", (_dead_pid(),))
    store = Store(path)
    run = store.run("old")
    assert (run.host, run.held_since) == (None, None) and holders.liveness(run, "sqlite") == "dead"
    assert holders.liveness(run, "postgresql") == "unknown"
    assert runner.mark_dead_runs(store) == ["old"]
    store.close()


def test_the_stop_and_resume_texts_say_whose_cache_answers(tmp_path):
    from autodiff.recovery import recovery, stop_effect

    effect = stop_effect(make_config(task="object_counting").model_dump())
    assert "same machine" in effect and "another worker" in effect
    run = Store(tmp_path / "r.sqlite")
    run.create_run("r", "toy", {}, {})
    run.set_run_status("r", "stopped", error="stopped on request after step 3; resume redoes step 4")
    assert "machine that made them" in recovery(run.run("r")).advice
    run.set_run_status("r", "stopped", error="stopped on request before a worker took it; resume to start it")
    assert "unfinished" not in recovery(run.run("r")).advice


def test_a_pid_reused_by_a_newer_process_is_not_the_holder(store, stopped_run):
    """The holder's pid names a process of this host again, but one that started long after the
    run was taken: the holder is gone (the pid was reused)."""
    store.hold_run(stopped_run, holders.this_host(), os.getpid())
    with store.connect() as conn:  # as if taken an hour before this process started
        conn.execute("UPDATE runs SET held_since = ? WHERE id = ?",
                     (holders.process_started_at(os.getpid()) - 3600, stopped_run))
    assert holders.liveness(store.run(stopped_run), store.backend) == "dead"
    store.hold_run(stopped_run, holders.this_host(), os.getpid())  # taken now: this process is the holder
    assert holders.liveness(store.run(stopped_run), store.backend) == "alive"


def test_a_trainer_whose_run_was_taken_over_leaves_it_at_the_next_step_boundary(store, tmp_path):
    """A forced takeover of a holder that was alive after all: the old trainer sees the run is no
    longer its own before its next step and ends without writing the run's status or steps."""
    from autodiff.llm.fake import FakeProvider
    from tests.fake_runs import responder

    events = []

    def take_over_after_step_1(event: str, info: dict) -> None:
        events.append(event)
        if event == "step_done" and info["step"] == 1:
            store.hold_run(info["run_id"], ELSEWHERE, 4242)  # what `resume --force` there writes

    config = make_config(task="object_counting", forward_model="fake:forward", backward_model="fake:backward",
                         optimizer_model="fake:optimizer", steps=3, batch_size=4, val_limit=6, test_limit=6)
    run_id = runner.train(store, config, cache_path=tmp_path / "cache.sqlite",
                          providers={"fake": FakeProvider(responder)}, progress=take_over_after_step_1)
    run = store.run(run_id)
    assert (run.status, run.host, run.pid) == ("running", ELSEWHERE, 4242)  # left to its new holder
    assert [s.step for s in store.steps(run_id)] == [0, 1] and events[-1] == "taken_over"


def test_a_trainer_paused_while_its_run_was_taken_over_writes_nothing_more(store, tmp_path):
    """The holder is paused mid-step (a machine asleep, a stopped worker) and another process
    takes the run over meanwhile; when the first wakes, its next write is refused (`Store.fence`):
    it used to finish its step on top of the new holder's, storing that step twice (twice the
    calls, gradients and proposals, and proposals it could accept). Here the takeover happens
    inside the step's first backward call, as another process would write it."""
    from autodiff.llm.fake import FakeProvider
    from tests.fake_runs import responder

    taken: list[float] = []
    events: list[tuple[str, dict]] = []

    def paused_in_backward(request):
        reply = responder(request)
        if "<feedback>" in request.messages[0].content and not taken:
            taken.append(time.time())
            other = Store(store.spec)  # another process's view of the store: not fenced
            assert other.hold_run(run_ids[0], ELSEWHERE, 4242)
            other.close()
        return reply

    run_ids: list[str] = []
    config = make_config(task="object_counting", forward_model="fake:forward", backward_model="fake:backward",
                         optimizer_model="fake:optimizer", steps=2, batch_size=4, val_limit=6, test_limit=6,
                         concurrency=1)
    run_id = runner.create(store, config, cache_path=tmp_path / "cache.sqlite")
    run_ids.append(run_id)
    assert runner.resume(store, run_id, cache_path=tmp_path / "cache.sqlite",
                         providers={"fake": FakeProvider(paused_in_backward)},
                         progress=lambda event, info: events.append((event, info))) == run_id
    assert taken
    run = store.run(run_id)
    assert (run.status, run.host, run.pid) == ("running", ELSEWHERE, 4242)  # left to its new holder
    assert [(s.step, s.status) for s in store.steps(run_id)] == [(0, "completed"), (1, "running")]
    assert not [g for g in store.gradients(run_id) if g.step >= 1]
    assert not [p for p in store.proposals(run_id) if p.step >= 1]
    assert all(v.step == 0 for v in store.parameter_versions(run_id))
    assert all(c.created_at <= taken[0] for c in store.call_summaries(run_id))
    event, info = events[-1]
    assert event == "taken_over" and info["during"] and info["step"] == 1 and info["unrecorded_calls"] >= 1
    assert "held by process 4242 on host " + ELSEWHERE in info["reason"]

    # The new holder (here: this process, forced, as `autodiff resume --force` would) goes on from
    # step 0, redoing step 1 whole: one attempt of it is stored.
    _resume(store, run_id, tmp_path, force=True)
    assert store.run(run_id).status == "completed"
    assert [(s.step, s.status) for s in store.steps(run_id)] == [(0, "completed"), (1, "completed"), (2, "completed")]


def test_a_store_that_stops_answering_mid_run_stops_it_resumably(store, tmp_path, monkeypatch):
    """The store's database goes away mid-run (a PostgreSQL restart longer than the pool waits):
    the run used to end `failed`, its reason telling to check the URL. It stops instead, saying
    the store did not answer and after which step, and a resume goes on from there; a worker
    queues such a run again by itself (autodiff.workers)."""
    from autodiff.errors import StoreUnreachable
    from autodiff.llm.fake import FakeProvider
    from autodiff.trainer import Trainer
    from tests.fake_runs import responder

    real_start_step = Store.start_step
    outage = []

    def start_step(self, run_id, step, batch):
        if step == 2 and not outage:
            outage.append(step)
            raise StoreUnreachable("the PostgreSQL store X did not answer (couldn't get a connection after 60.00 sec)")
        return real_start_step(self, run_id, step, batch)

    monkeypatch.setattr(Store, "start_step", start_step)
    config = make_config(task="object_counting", forward_model="fake:forward", backward_model="fake:backward",
                         optimizer_model="fake:optimizer", steps=3, batch_size=4, val_limit=6, test_limit=6)
    run_id = runner.create(store, config, cache_path=tmp_path / "cache.sqlite")
    with pytest.raises(StoreUnreachable):
        runner.resume(store, run_id, cache_path=tmp_path / "cache.sqlite",
                      providers={"fake": FakeProvider(responder)})
    run = store.run(run_id)
    assert run.status == "stopped" and run.error.startswith(Trainer.OUTAGE + " (the PostgreSQL store X did not answer")
    assert "after step 1; resume it once the database answers" in run.error
    _resume(store, run_id, tmp_path)
    assert store.run(run_id).status == "completed" and store.last_completed_step(run_id) == 3
