"""Every dashboard page on both store backends: the same runs (an auto run and a review run with a
person's decisions, trained by the real engine on the scripted fake) written to a SQLite file and
to a PostgreSQL database, each page opened on each, no exception and no error box, and the run's
figures (from autodiff.metrics, the one source every page uses) the same on both backends."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

from autodiff.metrics import run_summary
from autodiff.store import Store
from tests.fake_runs import alternate_decisions, fake_run
from tests.test_dashboard_pages import assert_clean

APP = "../app.py"
PAGES = ("pages/runs.py", "pages/graph.py", "pages/gradients.py", "pages/prompts.py", "pages/proposals.py",
         "pages/curves.py", "pages/review.py", "pages/compare.py")
# Figures that do not depend on timing (run time and latency do).
STABLE = ("status", "steps_done", "initial_val", "best_val", "initial_test", "final_test", "tokens", "calls", "errors",
          "cost_usd", "backward_saved_usd", "pending")


def fill(store: Store, tmp_path: Path) -> list[str]:
    cache = tmp_path / "cache.sqlite"
    return [fake_run(store, cache, steps=2),
            fake_run(store, cache, steps=2, review="validated", decide=alternate_decisions(), seed=1)]


def test_every_page_on_this_backend(store: Store, tmp_path: Path) -> None:
    run_ids = fill(store, tmp_path)
    for run_id in run_ids:
        for page in PAGES:
            at = AppTest.from_file(APP, default_timeout=60)
            at.session_state["store_path"] = store.spec
            at.query_params["run"] = run_id
            at.run()
            if page != "pages/runs.py":
                at.switch_page(page).run()
            assert_clean(at)
            assert not at.error, (page, [e.value for e in at.error])
    summaries = {run_id: run_summary(store, run_id) for run_id in run_ids}
    assert all(s["steps_done"] == 2 and s["status"] == "completed" for s in summaries.values()), summaries


def test_the_figures_are_the_same_on_both_backends(tmp_path: Path, postgres) -> None:
    url = postgres.new_database()
    stores = {"sqlite": Store(tmp_path / "runs.sqlite"), "postgresql": Store(url)}
    try:
        figures = {}
        for name, store in stores.items():
            (tmp_path / name).mkdir()
            ids = fill(store, tmp_path / name)
            # sums of floats may differ in their last bits with the order each database adds them in
            figures[name] = [{k: round(v, 9) if isinstance(v, float) else v
                              for k, v in ((k, run_summary(store, i).get(k)) for k in STABLE)} for i in ids]
        assert figures["sqlite"] == figures["postgresql"]
    finally:
        stores["postgresql"].close()
        postgres.drop(url)


def test_review_decisions_cross_processes(store: Store, tmp_path: Path) -> None:
    """A trainer in its own process (the CLI) waits in review mode "all"; this process, like a
    dashboard on another machine, decides every waiting proposal through the store; the trainer
    reads each decision and finishes."""
    import subprocess
    import sys
    import time

    from tests.conftest import TOY_TASK

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "autodiff.cli", "--store", store.spec, "--cache", str(tmp_path / "cache.sqlite"),
         "train", TOY_TASK, "--model", "fake:x", "--steps", "1", "--batch-size", "4", "--review", "all",
         "--run-id", "reviewed"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    decided: set[str] = set()
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            for p in store.proposals("reviewed", fate="pending") if store.runs() else []:
                if p.id not in decided:
                    store.decide(p.id, "reject", by="Grace")
                    decided.add(p.id)
            time.sleep(0.2)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert decided, "no proposal waited for review"
    assert store.run("reviewed").status == "completed"
    for pid in decided:
        p = store.proposal(pid)
        assert p.decision == "reject" and p.decided_by == "Grace" and p.fate != "pending"


def test_a_page_says_the_store_did_not_answer_when_its_database_goes_away(postgres, tmp_path: Path) -> None:
    """A PostgreSQL server that stops answering after the dashboard opened its store: every page
    used to stay blank, its running indicator spinning for the pool's whole minute and then an
    exception. Now the page says, within the dashboard's wait, that the store did not answer,
    with nothing stored lost, and shows again once the database does."""
    from urllib.parse import urlsplit

    import time

    url = postgres.new_database()
    name = urlsplit(url).path.lstrip("/")
    store = Store(url)
    run_id = fake_run(store, tmp_path / "cache.sqlite", steps=1)
    store.close()
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["store_path"] = url
    at.query_params["run"] = run_id
    at.run()  # the Runs page, through the frame (app.py), as a browser opens it
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    try:  # the database goes away: open connections ended, no new one allowed
        postgres.admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        postgres.admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        started = time.monotonic()
        at.run()
        assert time.monotonic() - started < 30
        assert not at.exception, [e.value for e in at.exception]
        assert any("The run store did not answer" in e.value and "reload the page" in e.value for e in at.error), \
            [e.value for e in at.error]
    finally:
        postgres.admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
    at.run()
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    assert any("Runs" in t.value for t in at.title)
    postgres.drop(url)
