"""Queued runs and the workers that train them, on a PostgreSQL store.

The queue is procrastinate's (a maintained job queue that lives in PostgreSQL and runs on
psycopg 3), in the store's own database: a queued run is one job on the queue `autodiff_runs`
whose only argument is the run id; the run's task, config and progress are in the store. Any
number of workers (`autodiff worker --store postgresql://...`), on any machine that reaches the
database, take jobs (`concurrency` at a time each) and train them with `runner.resume`, which goes
on from a run's last completed step. How a run moves:

- queued (`queue_run`): the run says "queued" until a worker takes it. A job's lock is its run
  id, so two workers never train one run at once, and its queueing lock is the run id too, so a
  run is queued at most once.
- a stop asked for in the dashboard reaches the worker through the store's stop flag, which the
  trainer reads at every step boundary, wherever it runs; the run ends "stopped", its job done.
- SIGTERM or SIGINT to a worker: it takes no new job, its runs stop at their next boundary, and
  each goes back on the queue ("queued", saying after which step) for another worker.
- a worker killed outright (SIGKILL, a machine gone) stops sending heartbeats; after
  `stalled_s` seconds without one, any other worker puts its runs back on the queue, and the
  next worker resumes them from their last completed step (the unfinished step is redone).

The queue's tables are made once, idempotently, by the first `queue_run` or worker start on a
database (`ensure_queue_schema`), not by the store's migrations: a team that never queues a run
never gets them. Job arguments hold only the run id; the database URL (and any password in it)
stays in the processes that were given it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autodiff.errors import AutodiffError, ConfigError, StoreError
from autodiff.holders import this_host
from autodiff.trainer import Trainer

QUEUE = "autodiff_runs"
TASK = "autodiff.train_run"
QUEUED = "queued"
# Both ends of the queue agree on the schema's version: the last migration procrastinate ships.
_SCHEMA_NOTE = "autodiff: procrastinate schema up to migration "
_SCHEMA_LOCK = 0x6175746f64696666  # "autodiff": serializes schema set-up and stalled-job sweeps
_SWEEP_LOCK = _SCHEMA_LOCK + 1

log = logging.getLogger("autodiff.worker")


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker runs. Times in seconds. A run counts as abandoned when its worker has sent
    no heartbeat for `stalled_s`: keep it several heartbeats long (a busy machine or a slow
    network must not look dead)."""

    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    concurrency: int = 1  # runs trained at once (each in its own thread)
    heartbeat_s: float = 10.0
    stalled_s: float = 60.0
    poll_s: float = 5.0  # how often to look for jobs when no notification came (a fallback)
    cache_path: Path | None = None  # this machine's response cache; None: the default one

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"a worker trains at least one run at a time; got --concurrency {self.concurrency}")
        for name in ("heartbeat_s", "stalled_s", "poll_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be a positive number of seconds; got {getattr(self, name)}")
        if self.stalled_s < 2 * self.heartbeat_s:
            raise ConfigError(f"a worker is taken as dead after {self.stalled_s:g} s without a heartbeat, but it "
                              f"sends one only every {self.heartbeat_s:g} s: give at least two heartbeats' time "
                              f"(--stalled-after {2 * self.heartbeat_s:g} or more)")


# --- the store's database -------------------------------------------------------------------

def shared(store) -> bool:
    """Whether `store` is a PostgreSQL store, whose runs are queued for workers."""
    return store.backend == "postgresql"


def database_url(store) -> str:
    """The connection URL of a PostgreSQL store (it may hold the password: pass it on, never
    show it). Raises ConfigError for any other store: queues need the shared database that
    workers on other machines reach."""
    if not shared(store):
        raise ConfigError(f"queued runs and workers need a PostgreSQL store (--store postgresql://user@host/db or "
                          f"AUTODIFF_STORE), not {store.display}: on a SQLite store a run trains in this process, or "
                          "from the dashboard in a background process on this machine")
    return store.spec


class MaskPasswords(logging.Filter):
    """Masks the store's password (see autodiff.store.mask_secrets) in every record a handler
    writes: a driver's or procrastinate's error text included."""

    def __init__(self, store):
        super().__init__()
        self.mask = store.db.mask

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.mask(record.getMessage()), None
        if record.exc_info:
            record.exc_text = self.mask(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def _procrastinate():
    try:
        import procrastinate
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        raise ConfigError(f"queued runs need the procrastinate package ({exc}): reinstall the project") from None
    return procrastinate


def _app(url: str, **pool):
    procrastinate = _procrastinate()
    return procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url, **pool))


def _latest_migration() -> str:
    from procrastinate.schema import SchemaManager

    names = sorted(p.stem for p in Path(SchemaManager.get_migrations_path()).glob("*.sql"))
    return names[-1] if names else "none"


def ensure_queue_schema(url: str) -> None:
    """Make procrastinate's tables in the database of `url` unless they are there (one process
    at a time, under an advisory lock), and check that they match the installed procrastinate.
    Raises ConfigError when they were made by an older procrastinate, saying what to do."""
    import psycopg
    from procrastinate.schema import SchemaManager

    want = _latest_migration()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK,))
        try:
            (exists,) = conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL").fetchone()
            if not exists:
                with conn.transaction():
                    conn.execute(SchemaManager.get_schema())
                    conn.execute(f"COMMENT ON TABLE procrastinate_jobs IS '{_SCHEMA_NOTE}{want}'")
                log.info("made the queue's tables (procrastinate, up to migration %s)", want)
                return
            (note,) = conn.execute("SELECT obj_description('procrastinate_jobs'::regclass, 'pg_class')").fetchone()
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_SCHEMA_LOCK,))
    if note and note.startswith(_SCHEMA_NOTE) and note[len(_SCHEMA_NOTE):] != want:
        have = note[len(_SCHEMA_NOTE):]
        raise ConfigError(
            f"the queue's tables in this database were made by a procrastinate whose last migration is {have}; the "
            f"installed one expects {want}. Stop every worker, apply procrastinate's migration files after {have} "
            f"from {SchemaManager.get_migrations_path()} in order (psql -f), then run: COMMENT ON TABLE "
            f"procrastinate_jobs IS '{_SCHEMA_NOTE}{want}'")


# --- queueing -------------------------------------------------------------------------------

def check_queue(store) -> None:
    """Before a run is registered to be queued: the store is PostgreSQL and its queue's tables
    are there (made if not) and fit the installed procrastinate. Raises ConfigError otherwise."""
    ensure_queue_schema(database_url(store))


def queue_run(store, run_id: str, note: str = "waiting for a worker") -> None:
    """Put a registered run on the queue: it says "queued" (with `note`) until a worker takes it.
    Queuing a run that is already queued does nothing. Raises ConfigError on a store that is not
    PostgreSQL (see `database_url`)."""
    procrastinate = _procrastinate()
    url = database_url(store)
    ensure_queue_schema(url)
    store.set_run_status(run_id, QUEUED, error=note)
    with _app(url, min_size=1, max_size=1).open() as app:
        try:
            _defer(app, run_id)
        except procrastinate.exceptions.AlreadyEnqueued:
            pass  # queued twice (a double click, two people): one job is enough


def _defer(app, run_id: str) -> None:
    app.configure_task(TASK, queue=QUEUE, lock=run_id, queueing_lock=run_id).defer(run_id=run_id)


async def _defer_async(app, run_id: str) -> bool:
    """`_defer` from the worker's event loop; False when the run has a waiting job already."""
    try:
        await app.configure_task(TASK, queue=QUEUE, lock=run_id, queueing_lock=run_id).defer_async(run_id=run_id)
    except _procrastinate().exceptions.AlreadyEnqueued:
        return False
    return True


# --- the worker -----------------------------------------------------------------------------

class Worker:
    """Takes queued runs from the store's database and trains them; see the module's doc.
    `store` is the PostgreSQL store to train in (its URL also reaches the queue); any other
    store raises ConfigError."""

    def __init__(self, store, options: WorkerOptions | None = None):
        self.store = store
        self.url = database_url(store)
        self.options = options or WorkerOptions()
        self.app = _app(self.url, min_size=1, max_size=4 + 2 * self.options.concurrency)
        self.app.task(name=TASK, queue=QUEUE, pass_context=True)(self._job)
        self._running: set[str] = set()  # runs this worker is training
        self._handing_back: set[str] = set()  # runs it stopped to shut down: they go back on the queue
        self._shutting_down = False
        self._lock = threading.Lock()  # a run is either in _running or seen by the shut-down, never neither

    def serve(self) -> None:
        """Work until SIGTERM or SIGINT, then stop the runs in hand at their next step boundary
        and queue them again before exiting."""
        ensure_queue_schema(self.url)
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        procrastinate = _procrastinate()
        try:
            await self._work()
        except procrastinate.exceptions.ProcrastinateException as exc:  # the database went away under it
            raise self._lost(f"{type(exc).__name__}: {exc.__cause__ or exc}") from None
        if not self._shutting_down:  # procrastinate stopped on its own: its heartbeat or listener failed
            raise self._lost("see the log above")
        log.info("worker %s stopped", self.options.name)

    def _lost(self, why: str) -> StoreError:
        return StoreError(f"worker {self.options.name} stopped: it lost its connection to the queue's database "
                          f"({self.store.db.mask(why)}); its runs go back on the queue once it is seen as dead. Start "
                          "it again when the database answers")

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        async with self.app.open_async():
            work = asyncio.create_task(self.app.run_worker_async(
                queues=[QUEUE], name=self.options.name, concurrency=self.options.concurrency,
                install_signal_handlers=False, update_heartbeat_interval=self.options.heartbeat_s,
                stalled_worker_timeout=self.options.stalled_s, fetch_job_polling_interval=self.options.poll_s,
                abort_job_polling_interval=self.options.poll_s, delete_jobs="successful"))
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._shut_down, work)
            sweeper = asyncio.create_task(self._sweep_forever())
            log.info("worker %s taking runs from the queue of %s (%d at a time)", self.options.name,
                     self.store.display, self.options.concurrency)
            try:
                await work
            except asyncio.CancelledError:
                pass  # the graceful stop asked for in _shut_down: the runs in hand have ended
            finally:
                sweeper.cancel()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

    def _shut_down(self, work: asyncio.Task) -> None:
        with self._lock:
            if self._shutting_down:
                log.info("already stopping: the runs in hand end at their next step boundary")
                return
            self._shutting_down = True
            running = sorted(self._running)
        for run_id in running:
            try:
                if self.store.stop_requested(run_id):
                    continue  # a person's stop: it stays stopped, it does not go back on the queue
                self._handing_back.add(run_id)
                self.store.request_stop(run_id)
            except AutodiffError as exc:
                log.error("could not ask run %s to stop: %s", run_id, exc)
        log.info("stopping: %s", f"runs {', '.join(running)} stop at their next step boundary and go back on the "
                 "queue" if running else "no run in hand")
        work.cancel()  # procrastinate takes no new job and waits for the ones running

    # --- one job: one run ---

    def _job(self, context, run_id: str) -> str:
        """Train run `run_id` (in a thread of its own). Returns what became of it."""
        try:
            run = self.store.run(run_id)
        except StoreError:
            log.warning("run %s is not in the store any more; its job is dropped", run_id)
            return "gone"
        if run.status != QUEUED:  # trained meanwhile (a resume by hand), or requeued after it ended
            log.info("run %s is %s, not queued: nothing to do", run_id, run.status)
            return run.status
        if self.store.stop_requested(run_id):
            self.store.set_run_status(run_id, "stopped", error=stopped_while_queued(self.store, run_id))
            return "stopped"
        with self._lock:
            if not self._shutting_down:
                self._running.add(run_id)
        if run_id not in self._running:  # taken in the moment the worker was told to stop
            _defer(self.app, run_id)  # runs after this job ends: the lock holds it back till then
            return "handed back"
        try:
            self.store.add_run_event(run_id, "worker", f"trained by worker {self.options.name}"
                                     + (f" (attempt {context.job.attempts + 1})" if context.job.attempts else ""))
            log.info("run %s: taken", run_id)
            self._train(run_id)
        finally:
            self._running.discard(run_id)
        ended = self.store.run(run_id)
        status = ended.status
        if status == "stopped" and (ended.error or "").startswith(Trainer.OUTAGE) and not ended.stop_requested:
            # The database went away under the run (and came back): it goes on, as after a worker's death.
            return self._hand_back(run_id, f"the store's database went away while worker {self.options.name} "
                                           "trained it, after step {done}; waiting for a worker, which goes on from "
                                           "there")
        if run_id in self._handing_back:
            self._handing_back.discard(run_id)
            if status == "stopped":
                self.store.clear_stop(run_id)
                return self._hand_back(run_id, f"worker {self.options.name} shut down after step {{done}}; waiting for "
                                               "another worker, which goes on from there")
        log.info("run %s: %s", run_id, status)
        return status

    def _hand_back(self, run_id: str, why: str) -> str:
        """Put run `run_id` back on the queue, `why` (with "{done}", its last completed step)
        said in its status and history."""
        why = why.replace("{done}", str(self.store.last_completed_step(run_id) or 0))
        self.store.set_run_status(run_id, QUEUED, error=why)
        self.store.add_run_event(run_id, "requeued", why)
        _defer(self.app, run_id)  # runs after this job ends: the lock holds it back till then
        log.info("run %s: back on the queue: %s", run_id, why)
        return "handed back"

    def _train(self, run_id: str) -> None:
        from autodiff.progress import taken_over_line
        from autodiff.runner import default_cache_path, resume

        def progress(event: str, info: dict) -> None:
            if event == "step_done":
                log.info("run %s: step %s done", run_id, info.get("step"))
            elif event == "taken_over":
                log.warning("run %s: %s", run_id, taken_over_line(info))

        try:
            # clear_stop=False: a stop asked for since the run was queued must still stop it.
            resume(self.store, run_id, clear_stop=False, cache_path=self.options.cache_path or default_cache_path(),
                   progress=progress, from_queue=True)
        except AutodiffError as exc:  # the run is marked failed with the reason; the job ends here
            log.error("run %s: %s", run_id, exc)

    # --- runs whose worker died ---

    async def _sweep_forever(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.options.heartbeat_s)
            try:
                await self.requeue_stalled()
            except Exception as exc:  # noqa: BLE001 - a database hiccup: the next sweep tries again
                if not failing:  # said once per outage, not at every heartbeat
                    log.warning("looking for runs of dead workers failed (trying again every %g s): %s: %s",
                                self.options.heartbeat_s, type(exc).__name__, exc)
                failing = True
            else:
                if failing:
                    log.info("looking for runs of dead workers works again")
                failing = False

    async def requeue_stalled(self) -> list[str]:
        """Put back on the queue the runs of workers that sent no heartbeat for `stalled_s`
        seconds (killed, or their machine gone); returns their ids. One worker at a time sweeps
        (an advisory lock), so a job is never handed back twice."""
        import psycopg

        procrastinate = _procrastinate()
        requeued: list[str] = []
        async with await psycopg.AsyncConnection.connect(self.url) as conn:
            # The lock is the transaction's, and the server ends a transaction left idle longer than
            # the stall time: a worker paused in the middle of a sweep (SIGSTOP, a machine asleep)
            # would otherwise hold the lock, with its connection, until it woke, and no other worker
            # could ever hand its runs on.
            idle_ms = int(max(self.options.stalled_s, 1) * 1000)
            await conn.execute(f"SET idle_in_transaction_session_timeout = {idle_ms}")
            (locked,) = await (await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (_SWEEP_LOCK,))).fetchone()
            if not locked:
                return requeued  # another worker is sweeping right now
            try:
                stalled = await self.app.job_manager.get_stalled_jobs(
                    queue=QUEUE, task_name=TASK, seconds_since_heartbeat=self.options.stalled_s)
                for job in stalled:
                    run_id = job.task_kwargs["run_id"]
                    if run_id in self._running:
                        # This worker is training it: its own heartbeat is what went stale (a
                        # database outage), not the worker. Procrastinate stops a worker whose
                        # heartbeat fails; until then the run stays here.
                        continue
                    # The run first, the job second: once the job is back, a worker may take it at once.
                    await asyncio.to_thread(self._mark_abandoned, run_id)
                    # A new job, not the stalled one again: its worker may only be paused, and when it
                    # wakes procrastinate ends that job by its id (deleting it), which must not be the
                    # job the next worker trains the run under.
                    await self.app.job_manager.finish_job(job, status=procrastinate.jobs.Status.FAILED,
                                                          delete_job=False)
                    await _defer_async(self.app, run_id)  # False: queued again by someone else meanwhile
                    requeued.append(run_id)
                    log.info("run %s: its worker stopped answering; back on the queue", run_id)
                requeued += await self.requeue_jobless(conn)
            finally:
                await conn.rollback()  # ends the transaction, and with it the lock
        return requeued

    async def requeue_jobless(self, conn) -> list[str]:
        """Give a job back to the runs that say queued but have none on the queue, for longer than
        `stalled_s` (a run's status and its job are written in two steps, and a database outage
        between them, or a job that ended while the database was away, left a run waiting for a
        worker that would never come), and to the runs this worker holds but no longer trains;
        returns their ids. Called by `requeue_stalled`, under its lock."""
        rows: list[tuple] = await (await conn.execute(
            "SELECT r.id FROM runs r WHERE r.status = %s AND r.updated_at < %s AND NOT EXISTS ("
            "SELECT 1 FROM procrastinate_jobs j WHERE j.queue_name = %s AND j.args->>'run_id' = r.id "
            "AND j.status IN ('todo', 'doing')) ORDER BY r.updated_at",
            (QUEUED, time.time() - self.options.stalled_s, QUEUE))).fetchall()
        # Runs this worker holds (its host and process) but is not training: a trainer of it that
        # ended without writing how (the database was away when it failed) left them running.
        held = await (await conn.execute(
            "SELECT id FROM runs WHERE status = 'running' AND host = %s AND pid = %s",
            (this_host(), os.getpid()))).fetchall()
        for (run_id,) in held:
            if run_id in self._running:
                continue
            done = await asyncio.to_thread(lambda r=run_id: self.store.last_completed_step(r) or 0)
            why = (f"its trainer in worker {self.options.name} ended after step {done} without saying how (the "
                   "database was away?); waiting for a worker, which goes on from there")
            await asyncio.to_thread(self.store.set_run_status, run_id, QUEUED, why)
            rows.append((run_id, why))
        requeued = []
        for run_id, *why in rows:
            if not await _defer_async(self.app, run_id):
                continue  # queued by someone else meanwhile
            said = why[0] if why else "it said queued but had no job on the queue (lost in a database outage?)"
            await asyncio.to_thread(self.store.add_run_event, run_id, "requeued", f"{said}: queued again")
            log.warning("run %s: %s: queued again", run_id, said)
            requeued.append(run_id)
        return requeued

    def _mark_abandoned(self, run_id: str) -> None:
        try:
            run = self.store.run(run_id)
        except StoreError:
            return
        if run.status not in ("running", QUEUED, "created"):
            return  # it ended before its worker died; the next worker sees that and drops the job
        done = self.store.last_completed_step(run_id) or 0
        why = (f"its worker stopped answering (killed, or its machine went down) after step {done}; waiting for "
               "another worker, which goes on from there")
        self.store.set_run_status(run_id, QUEUED, error=why)
        self.store.add_run_event(run_id, "requeued", why)


def stopped_while_queued(store, run_id: str) -> str:
    """The reason of a run stopped on request while it waited on the queue: before any training,
    or (handed back by a worker that shut down or died) after the steps it had done."""
    done = store.last_completed_step(run_id)
    if done is None:
        return "stopped on request before a worker took it; resume to start it"
    return (f"stopped on request while it waited on the queue for a worker, after step {done}; resume goes on "
            f"from step {done + 1}")


def serve(store, options: WorkerOptions | None = None) -> None:
    """Run a worker on `store` (PostgreSQL) until SIGTERM or SIGINT; see `Worker`."""
    Worker(store, options).serve()


def open_job(store, run_id: str) -> tuple[int, str] | None:
    """The id and status of run `run_id`'s job while it is on the queue: "todo" while it waits,
    "doing" while a worker holds it (or held it, until a sweep hands it back); else None (never
    queued, or its job is over)."""
    import psycopg

    with psycopg.connect(database_url(store)) as conn:
        if not conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL").fetchone()[0]:
            return None
        row = conn.execute("SELECT id, status::text FROM procrastinate_jobs WHERE queue_name = %s AND "
                           "args->>'run_id' = %s AND status IN ('todo', 'doing') ORDER BY id DESC LIMIT 1",
                           (QUEUE, run_id)).fetchone()
    return (row[0], row[1]) if row else None


def take_off_queue(store, run_id: str) -> bool:
    """Cancel run `run_id`'s waiting job, so no worker takes it. False when there is none
    waiting (a worker took it meanwhile, or it was never queued)."""
    job = open_job(store, run_id)
    if job is None or job[1] != "todo":
        return False
    with _app(database_url(store), min_size=1, max_size=1).open() as app:
        return app.job_manager.cancel_job_by_id(job[0])


def queued_jobs(store) -> dict[str, Any]:
    """Counts of this queue's jobs by procrastinate status ("todo", "doing", "failed",
    "cancelled"; succeeded jobs are deleted), e.g. {"todo": 2, "doing": 1}; {} before the queue's
    tables exist."""
    import psycopg

    with psycopg.connect(database_url(store)) as conn:
        if not conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL").fetchone()[0]:
            return {}
        rows = conn.execute("SELECT status::text, COUNT(*) FROM procrastinate_jobs WHERE queue_name = %s "
                            "GROUP BY 1 ORDER BY 1", (QUEUE,)).fetchall()
    return dict(rows)
