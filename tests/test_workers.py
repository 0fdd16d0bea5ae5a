"""Queued runs and workers on a PostgreSQL store (autodiff.workers): real `autodiff worker`
processes take runs from the queue and train them; none is lost or trained twice at once, a
worker killed mid-run leaves its run to another, SIGTERM hands a run back, and a stop asked for
in the store reaches whichever worker holds the run.

The runs use the scripted fake models by name (`fake:...`) and tests/worker_task.py, whose
forward pass waits `delay` seconds per sample so a step lasts long enough to kill a worker in.
Heartbeats and the stalled-worker time are a fraction of a second here (defaults: 10 s and 60 s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from autodiff import runner, workers
from autodiff.config import make_config
from autodiff.errors import ConfigError
from autodiff.store import Store
from worker_task import NAME as SLOW_TASK

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT, STALLED, POLL = 0.3, 1.5, 0.2
PROVIDER_ENV = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "AUTODIFF_STORE")


def config(steps: int = 2, delay: float = 0.05, **options):
    return make_config(task=SLOW_TASK, task_args={"delay": str(delay)}, forward_model="fake:forward",
                       backward_model="fake:backward", optimizer_model="fake:optimizer", steps=steps, batch_size=4,
                       val_limit=6, test_limit=4, **options)


class Workers:
    """Real `autodiff worker` processes on one store, each logging to a file; all stopped at the end."""

    def __init__(self, url: str, tmp_path: Path):
        self.url, self.tmp_path = url, tmp_path
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k not in PROVIDER_ENV}
        cmd = [sys.executable, "-m", "autodiff.cli", "worker", "--store", self.url, "--name", name,
               "--cache", str(self.tmp_path / f"cache-{name}.sqlite"), "--heartbeat", str(HEARTBEAT),
               "--stalled-after", str(STALLED), "--poll", str(POLL)]
        with open(self.log_path(name), "ab") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def log_path(self, name: str) -> Path:
        return self.tmp_path / f"worker-{name}.log"

    def log(self, name: str) -> str:
        return self.log_path(name).read_text()

    def wait_ready(self, name: str, timeout: float = 30.0) -> None:
        wait_for(lambda: "taking runs from the queue" in self.log(name), timeout, lambda: self.log(name))

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for(condition: Callable[[], bool], timeout: float, describe: Callable[[], object] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {describe()}")
        time.sleep(0.05)


@pytest.fixture
def pg_store(postgres) -> Iterator[Store]:
    """A store in a fresh database of the session's PostgreSQL server (queues need one)."""
    url = postgres.new_database()
    store = Store(url)
    try:
        yield store
    finally:
        store.close()
        postgres.drop(url)


@pytest.fixture
def pool(pg_store, tmp_path) -> Iterator[Workers]:
    w = Workers(workers.database_url(pg_store), tmp_path)
    yield w
    w.stop_all()


def queue(store, **options) -> str:
    run_id = runner.create(store, config(**options))
    workers.queue_run(store, run_id)
    return run_id


def takers(store, run_id: str) -> list[str]:
    """The workers that took run `run_id`, in order, from its history."""
    return [e.text.split("trained by worker ", 1)[1].split(" ", 1)[0] for e in store.run_events(run_id)
            if e.kind == "worker"]


def calls_by_step(store, run_id: str) -> Counter:
    return Counter((c.step, c.phase) for c in store.call_summaries(run_id))


def test_two_workers_train_three_queued_runs_each_once(pg_store, pool) -> None:
    for name in ("a", "b"):
        pool.start(name)
    for name in ("a", "b"):
        pool.wait_ready(name)
    ids = [queue(pg_store, steps=2, delay=0.1) for _ in range(3)]
    assert {pg_store.run(r).status for r in ids} <= {"queued", "running", "completed"}
    wait_for(lambda: all(pg_store.run(r).status == "completed" for r in ids), 90,
             lambda: [(pg_store.run(r).status, pg_store.run(r).error) for r in ids])
    for run_id in ids:
        assert len(takers(pg_store, run_id)) == 1, pg_store.run_events(run_id)  # trained once
        assert [s.status for s in pg_store.steps(run_id)] == ["completed"] * 3
    assert sorted({takers(pg_store, r)[0] for r in ids}) == ["a", "b"]  # both took work
    assert workers.queued_jobs(pg_store).get("todo", 0) == 0
    assert workers.queued_jobs(pg_store).get("doing", 0) == 0
    pool.stop_all()
    assert [p.returncode for p in pool.procs.values()] == [0, 0]


def test_a_worker_killed_mid_run_leaves_it_to_another(pg_store, pool) -> None:
    doomed = pool.start("doomed")
    pool.wait_ready("doomed")
    run_id = queue(pg_store, steps=4, delay=0.4)
    wait_for(lambda: pg_store.last_completed_step(run_id) == 1, 60, lambda: pg_store.run(run_id))
    before = calls_by_step(pg_store, run_id)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    assert pg_store.run(run_id).status == "running"  # nobody has noticed yet
    pool.start("heir")
    wait_for(lambda: pg_store.run(run_id).status == "completed", 90,
             lambda: (pg_store.run(run_id), pool.log("heir")))
    assert takers(pg_store, run_id) == ["doomed", "heir"]
    requeued = [e.text for e in pg_store.run_events(run_id) if e.kind == "requeued"]
    assert len(requeued) == 1 and "stopped answering" in requeued[0], requeued
    after = calls_by_step(pg_store, run_id)
    # Resumed from the last completed step: the steps done before the kill were not asked again.
    assert {k: v for k, v in after.items() if k[0] is not None and k[0] <= 1 and k[1] != "preflight"} == \
        {k: v for k, v in before.items() if k[0] is not None and k[0] <= 1 and k[1] != "preflight"}
    assert [s.status for s in pg_store.steps(run_id)] == ["completed"] * 5


def test_a_stop_asked_for_in_the_store_reaches_the_worker(pg_store, pool) -> None:
    pool.start("w")
    pool.wait_ready("w")
    run_id = queue(pg_store, steps=30, delay=0.2)
    wait_for(lambda: pg_store.last_completed_step(run_id) == 1, 60, lambda: pg_store.run(run_id))
    pg_store.request_stop(run_id)  # what the dashboard's Stop does
    wait_for(lambda: pg_store.run(run_id).status == "stopped", 30, lambda: pg_store.run(run_id))
    assert pg_store.run(run_id).error.startswith("stopped on request")
    assert workers.queued_jobs(pg_store).get("todo", 0) == 0  # a person's stop is not handed on
    # Resume (the Runs page's button) queues it again; the same worker goes on with it.
    done = pg_store.last_completed_step(run_id)
    runner.resume_background(pg_store, run_id)
    wait_for(lambda: (pg_store.last_completed_step(run_id) or 0) > done, 60, lambda: pg_store.run(run_id))
    pg_store.request_stop(run_id)
    wait_for(lambda: pg_store.run(run_id).status == "stopped", 30, lambda: pg_store.run(run_id))
    assert takers(pg_store, run_id) == ["w", "w"]


def test_sigterm_hands_the_run_back_for_another_worker(pg_store, pool) -> None:
    first = pool.start("first")
    pool.wait_ready("first")
    run_id = queue(pg_store, steps=3, delay=0.4)
    wait_for(lambda: pg_store.last_completed_step(run_id) == 1, 60, lambda: pg_store.run(run_id))
    first.terminate()
    assert first.wait(timeout=30) == 0
    run = pg_store.run(run_id)
    assert run.status == "queued" and "shut down after step" in run.error, run
    assert not run.stop_requested
    assert workers.queued_jobs(pg_store).get("todo", 0) == 1
    pool.start("second")
    wait_for(lambda: pg_store.run(run_id).status == "completed", 60, lambda: pool.log("second"))
    assert takers(pg_store, run_id) == ["first", "second"]


def test_a_paused_worker_whose_run_was_handed_on_writes_nothing_more(pg_store, pool) -> None:
    """A worker paused mid-step (SIGSTOP: a machine asleep, a frozen VM) stops answering; another
    worker takes its run and goes on. When the first wakes it must not finish its step on top of
    the new holder's: a tester saw step 1 stored twice (twice the calls, gradients and proposals)
    and step times out of order. Its first write is refused instead (`Store.fence`)."""
    paused = pool.start("paused")
    pool.wait_ready("paused")
    run_id = queue(pg_store, steps=6, delay=0.4)
    wait_for(lambda: any(s.step == 1 for s in pg_store.steps(run_id)), 60, lambda: pg_store.run(run_id))
    paused.send_signal(signal.SIGSTOP)
    try:
        pool.start("heir")
        wait_for(lambda: "heir" in takers(pg_store, run_id) and (pg_store.last_completed_step(run_id) or 0) >= 1, 90,
                 lambda: (pg_store.run(run_id), pool.log("heir")))
    finally:
        paused.send_signal(signal.SIGCONT)
    wait_for(lambda: "took the run over while this one was in step" in pool.log("paused"), 30,
             lambda: pool.log("paused"))
    time.sleep(1.0)  # the paused worker's job has ended by now
    if pg_store.run(run_id).status != "completed":
        # The heir still trains under a job of its own: the paused worker, ending its job, used to
        # delete that very job, so the run would have been lost if the heir died next.
        assert workers.open_job(pg_store, run_id) is not None and workers.open_job(pg_store, run_id)[1] == "doing"
    wait_for(lambda: pg_store.run(run_id).status == "completed", 90, lambda: (pg_store.run(run_id), pool.log("heir")))
    assert "Traceback" not in pool.log("heir"), pool.log("heir")
    steps = pg_store.steps(run_id)
    assert [s.status for s in steps] == ["completed"] * 7
    assert all(a.finished_at <= b.started_at for a, b in zip(steps, steps[1:])), steps  # in order, none redone after
    forward = Counter(c.step for c in pg_store.call_summaries(run_id) if c.phase == "forward")
    assert forward[1] == forward[2] == forward[3] == forward[6], forward  # step 1's mini-batch forward calls once, like the others
    proposals = Counter(p.step for p in pg_store.proposals(run_id))
    assert proposals[1] == proposals[2] == proposals[6] > 0, proposals  # the same number each step


def test_a_queued_run_without_a_job_is_queued_again(pg_store, pool) -> None:
    """A run that says queued with no job on the queue (its job lost in a database outage) used
    to wait for a worker forever; a worker's sweep gives it a job again."""
    run_id = runner.create(pg_store, config(steps=1))
    pg_store.set_run_status(run_id, "queued", error="waiting for a worker")  # and no job deferred
    with pg_store.connect() as conn:
        conn.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (time.time() - 60, run_id))
    assert workers.queued_jobs(pg_store) == {}
    pool.start("w")
    wait_for(lambda: pg_store.run(run_id).status == "completed", 60, lambda: (pg_store.run(run_id), pool.log("w")))
    assert [e.kind for e in pg_store.run_events(run_id) if e.kind == "requeued"] == ["requeued"]
    assert "had no job on the queue (lost in a database outage?): queued again" in pool.log("w")


def test_a_run_a_worker_holds_but_no_longer_trains_is_queued_again(pg_store, pool) -> None:
    """A trainer that failed while the database was away could not write how it ended: its run
    said running, held by a live worker that was not training it, and no one would ever take it.
    The worker's sweep finds such runs of its own and queues them again."""
    import socket

    worker = pool.start("w")
    pool.wait_ready("w")
    run_id = runner.create(pg_store, config(steps=1))
    assert pg_store.hold_run(run_id, socket.gethostname(), worker.pid)  # as its trainer left it, with no job
    wait_for(lambda: pg_store.run(run_id).status == "completed", 60, lambda: (pg_store.run(run_id), pool.log("w")))
    [requeued] = [e.text for e in pg_store.run_events(run_id) if e.kind == "requeued"]
    assert requeued.startswith("its trainer in worker w ended after step 0 without saying how") and \
        requeued.endswith(": queued again"), requeued


def test_a_stop_asked_for_while_queued_stops_it_when_taken(pg_store, pool) -> None:
    run_id = queue(pg_store)
    pg_store.request_stop(run_id)
    pool.start("w")
    wait_for(lambda: pg_store.run(run_id).status == "stopped", 30, lambda: pool.log("w"))
    assert pg_store.steps(run_id) == []


def test_a_stop_while_handed_back_says_how_far_the_run_got(pg_store, pool) -> None:
    """A run whose worker was killed after some steps waits for another; stopped meanwhile
    (`autodiff stop`, as the dashboard's Stop), its reason says after which step it stopped,
    not that it never started."""
    from autodiff import cli
    from autodiff.recovery import recovery

    first = pool.start("first")
    pool.wait_ready("first")
    run_id = queue(pg_store, steps=30, delay=0.2)
    wait_for(lambda: (pg_store.last_completed_step(run_id) or 0) >= 2, 60, lambda: pg_store.run(run_id))
    first.kill()
    first.wait()
    done = pg_store.last_completed_step(run_id)
    assert cli.main(["stop", run_id, "--store", workers.database_url(pg_store)]) == 0
    pool.start("second")  # hands the dead worker's run back to the queue, takes it, finds the stop
    wait_for(lambda: pg_store.run(run_id).status == "stopped", 60, lambda: pool.log("second"))
    run = pg_store.run(run_id)
    assert run.error == (f"stopped on request while it waited on the queue for a worker, after step {done}; "
                         f"resume goes on from step {done + 1}")
    assert recovery(run).outlook == "go" and "redone" in recovery(run).advice
    assert pg_store.last_completed_step(run_id) == done  # nothing trained after the stop


def test_queueing_twice_makes_one_job(pg_store) -> None:
    run_id = queue(pg_store)
    workers.queue_run(pg_store, run_id)
    assert workers.queued_jobs(pg_store) == {"todo": 1}


def test_the_password_reaches_no_log_history_or_job(pg_store, tmp_path) -> None:
    """A password in the store's URL (the test server trusts loopback, so any password does)
    stays out of `train --queue`'s output, the worker's log, the run's config, history and error,
    and the job, whose only argument is the run id."""
    import psycopg

    secret = "Pa55-w0rd-never-shown"
    parts = urlsplit(workers.database_url(pg_store))
    url = urlunsplit(parts._replace(netloc=f"{parts.username}:{secret}@{parts.hostname}:{parts.port}"))
    store = Store(url)
    pool = Workers(url, tmp_path)
    try:
        result = subprocess.run([sys.executable, "-m", "autodiff.cli", "--store", url, "train",
                                 "tests/worker_task.py:make", "--model", "fake:x", "--steps", "1", "--val-limit", "3",
                                 "--test-limit", "2", "--queue"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        [run_id] = [r.id for r in store.runs()]
        assert store.run(run_id).config["task"] == SLOW_TASK  # a relative task file, made absolute for workers
        assert secret not in result.stdout + result.stderr
        # how to follow it names the store (masked), and says what its *** is
        assert f"follow it with autodiff show {run_id} --store 'postgresql://{parts.username}:***@" in result.stdout
        assert "*** stands for the store's password" in result.stdout
        with psycopg.connect(url) as conn:
            [(args,)] = conn.execute("SELECT args::text FROM procrastinate_jobs").fetchall()
        assert args == f'{{"run_id": "{run_id}"}}'
        pool.start("w")
        wait_for(lambda: store.run(run_id).status == "completed", 60, lambda: pool.log("w"))
    finally:
        pool.stop_all()
        store.close()
    log = pool.log("w")
    assert "taking runs from the queue of postgresql://" in log and "***" in log, log
    run = pg_store.run(run_id)
    for text in (log, str(run), str(pg_store.run_events(run_id))):
        assert secret not in text


def test_queue_needs_a_postgresql_store(tmp_path) -> None:
    store_path = tmp_path / "runs.sqlite"
    result = subprocess.run([sys.executable, "-m", "autodiff.cli", "--store", str(store_path), "train", SLOW_TASK,
                             "--model", "fake:x", "--queue"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: queued runs and workers need a PostgreSQL store"), result.stderr
    assert Store(store_path).runs() == []


def test_a_queued_run_is_resumed_here_only_once_stopped(pg_store, tmp_path) -> None:
    """`autodiff resume` of a run on the queue would race the worker that takes it: refused,
    until a stop was asked for; then the run comes off the queue and trains here."""
    run_id = queue(pg_store, steps=1)
    with pytest.raises(ConfigError, match="waits on the queue for a worker"):
        runner.resume(pg_store, run_id, cache_path=tmp_path / "cache.sqlite")
    pg_store.request_stop(run_id)
    runner.resume(pg_store, run_id, cache_path=tmp_path / "cache.sqlite")
    assert pg_store.run(run_id).status == "completed"
    assert workers.queued_jobs(pg_store) == {"cancelled": 1}  # no worker will take it again


def test_a_run_a_worker_holds_is_not_resumed_elsewhere(pg_store, pool, tmp_path) -> None:
    pool.start("w")
    pool.wait_ready("w")
    run_id = queue(pg_store, steps=30, delay=0.2)
    wait_for(lambda: pg_store.run(run_id).status == "running", 60, lambda: pg_store.run(run_id))
    with pytest.raises(ConfigError, match="a worker holds run"):
        runner.resume(pg_store, run_id, cache_path=tmp_path / "cache.sqlite")
    with pytest.raises(ConfigError, match="is running"):
        runner.resume_background(pg_store, run_id)  # the Runs page's Resume
    assert takers(pg_store, run_id) == ["w"]


def test_the_runs_page_queues_a_run_and_shows_it_waiting(pg_store, pool, tmp_path, monkeypatch) -> None:
    """Start on the Runs page of a PostgreSQL store queues the run (it is not trained in a
    process of the dashboard's); the page says it waits for a worker; a worker then trains it."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("AUTODIFF_CACHE", str(tmp_path / "cache.sqlite"))
    at = AppTest.from_file("../app.py", default_timeout=30)
    at.session_state["store_path"] = workers.database_url(pg_store)
    at.run()
    for role in ("forward", "backward", "optimizer"):
        at.text_input(key=f"model_{role}").input(f"fake:{role}")
    at.text_input(key="opt_steps").input("1")
    next(b for b in at.button if b.label == "Start").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Queued run" in s.value and "autodiff worker" in s.value for s in at.success), at.success
    [run] = pg_store.runs()
    assert run.status == "queued" and run.pid is None  # nothing started on this machine
    assert workers.open_job(pg_store, run.id)[1] == "todo"
    waiting = [c.value for c in at.caption if "waiting for a worker" in c.value.lower()]
    assert waiting and all(c.lower().count("waiting for a worker") == 1 for c in waiting), waiting  # said once
    pool.start("w")
    wait_for(lambda: pg_store.run(run.id).status == "completed", 60, lambda: pool.log("w"))


def test_a_worker_refuses_a_sqlite_store_and_a_stall_time_shorter_than_two_heartbeats(tmp_path) -> None:
    def worker(*options: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "autodiff.cli", "worker", "--store", str(tmp_path / "runs.sqlite"),
                               *options], cwd=ROOT, capture_output=True, text=True, timeout=60)

    result = worker()
    assert result.returncode == 2 and "need a PostgreSQL store" in result.stderr, result.stderr
    result = worker("--heartbeat", "5", "--stalled-after", "6")
    assert result.returncode == 2 and "--stalled-after 10 or more" in result.stderr, result.stderr


def test_queue_tables_of_another_procrastinate_are_named_not_used(pg_store) -> None:
    """The queue's tables carry the last migration of the procrastinate that made them; another
    one refuses them with what to do instead of failing later on a missing column."""
    import psycopg

    queue(pg_store)  # makes the tables
    with psycopg.connect(workers.database_url(pg_store), autocommit=True) as conn:
        conn.execute("COMMENT ON TABLE procrastinate_jobs IS 'autodiff: procrastinate schema up to migration "
                     "02.00.00_01_pre_old'")
    before = pg_store.runs()
    with pytest.raises(ConfigError, match="02.00.00_01_pre_old.*apply procrastinate's migration files"):
        runner.launch(pg_store, config())  # the Runs page's Start
    assert pg_store.runs() == before  # refused before a run was registered
