"""Provider faults counted from the stored records, per step and phase, and shown everywhere: metrics,
the export, `autodiff show`/`runs`, and the dashboard's Runs and Curves pages. The runs are written
record by record through the Store API, so every count is known exactly."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest

from autodiff import cli, compare
from autodiff.export import export_run
from autodiff.metrics import (PHASES, context_window_failures, error_kinds, fault_calls, run_summary,
                              step_figures)
from autodiff.records import Evaluation, Invocation, LLMCall, Trace
from autodiff.store import Store
from tests.test_dashboard_pages import assert_clean, chart_figures, heights, html_table_rows, open_page

OVERFLOW = "LLMContextWindowError: the prompt has 9,000 tokens and local:smollm2 reads at most 8,192"
STOP_REASON = "TooManyErrors: 3 of 10 validation samples errored at step 1 (limit 20%)"
VAL = [f"val-{i}" for i in range(10)]
TEST = [f"test-{i}" for i in range(5)]
BATCH = ["train-0", "train-1", "train-2", "train-3"]


def call(run_id: str, step: int | None, phase: str, n: int, *, kind: str | None = None, error: str | None = None,
         node: str | None = "counter", sample: str | None = None, finish: str | None = "stop") -> LLMCall:
    """One call record; with `kind` (or `error`) it failed and has no reply."""
    failed = kind is not None or error is not None
    role = {"backward": "backward", "propose": "optimizer"}.get(phase, "forward")
    return LLMCall(
        id=f"{run_id}-{step}-{phase}-{n}", run_id=run_id, step=step, phase=phase, role=role, node=node,
        sample_id=sample, call_index=0, model="openai:gpt-4o-mini", messages=(("user", "question"),),
        response=None if failed else "Answer: 3", prompt_tokens=10, completion_tokens=0 if failed else 5,
        latency_ms=5.0, cached=False, error=(error or f"LLMError: {kind} fault") if failed else None,
        created_at=time.time() + n / 1000, endpoint="https://api.openai.com/v1",
        finish_reason=None if failed else finish, attempts=3 if failed else 1, error_kind=kind,
    )


def evaluations(ids: list[str], errored: int) -> list[Evaluation]:
    """Samples scored 1.0 and 0.0 in turn, the last `errored` of them left unscored."""
    return [Evaluation(sid, "", "3", None, "LLMTransientError: gave up after 3 attempts") if i >= len(ids) - errored
            else Evaluation(sid, "3", "3", float(i % 2 == 0)) for i, sid in enumerate(ids)]


def write_run(store: Store, run_id: str, *, faults: bool = True) -> str:
    """A two-step run (step 0 the initial evaluation, step 1 one training step). With `faults`:

    step 0: validate 2 errors (rate_limit, timeout), test 1 error (server); 2 val and 1 test sample
    unscored. Step 1: forward 1 context-window failure, backward 1 error recorded without a kind
    and 1 cut-off reply, propose 1 error (garbage), validate 3 errors (rate_limit 2, timeout 1) and
    1 cut-off reply; 3 val samples unscored. The run stopped on too many errors."""
    store.create_run(run_id, "object_counting", {"forward_model": "openai:gpt-4o-mini", "steps": 1},
                     {"train": BATCH, "val": VAL, "test": TEST})
    store.set_run_status(run_id, "running")
    n = itertools.count()
    store.start_step(run_id, 0, [])
    calls = [call(run_id, 0, "preflight", next(n), node=None) for _ in range(3)]
    calls += [call(run_id, 0, "validate", next(n), sample=s) for s in VAL]
    calls += [call(run_id, 0, "test", next(n), sample=s) for s in TEST]
    if faults:
        calls += [call(run_id, 0, "validate", next(n), kind="rate_limit", sample="val-8"),
                  call(run_id, 0, "validate", next(n), kind="timeout", sample="val-9"),
                  call(run_id, 0, "test", next(n), kind="server", sample="test-4")]
    store.add_calls(calls)
    store.add_evaluations(run_id, 0, "val", "current", evaluations(VAL, 2 if faults else 0))
    store.add_evaluations(run_id, 0, "test", "current", evaluations(TEST, 1 if faults else 0))
    store.finish_step(run_id, 0, 0.5, 0.6, [])

    store.start_step(run_id, 1, BATCH)
    calls = [call(run_id, 1, "forward", next(n), sample=s) for s in BATCH[:3]]
    calls += [call(run_id, 1, "backward", next(n), sample="train-0"),
              call(run_id, 1, "propose", next(n), node="counter")]
    calls += [call(run_id, 1, "validate", next(n), sample=s) for s in VAL[:7]]
    if faults:
        calls += [
            call(run_id, 1, "forward", next(n), kind="context_window", error=OVERFLOW, sample="train-3"),
            call(run_id, 1, "backward", next(n), error="LLMError: recorded before kinds were", sample="train-1"),
            call(run_id, 1, "backward", next(n), finish="length", sample="train-2"),
            call(run_id, 1, "propose", next(n), kind="garbage"),
            call(run_id, 1, "validate", next(n), kind="rate_limit", sample="val-7"),
            call(run_id, 1, "validate", next(n), kind="rate_limit", sample="val-8"),
            call(run_id, 1, "validate", next(n), kind="timeout", sample="val-9"),
            call(run_id, 1, "validate", next(n), finish="length", sample="val-6"),
        ]
    store.add_calls(calls)
    store.add_evaluations(run_id, 1, "val", "current", evaluations(VAL, 3 if faults else 0))
    # The mini-batch's losses: the first two samples failing (sent backward), the rest correct;
    # with `faults`, train-3's forward call failed, so it has no loss: errored.
    store.add_traces(run_id, 1, [
        Trace(sid, [Invocation(f"{run_id}-{sid}-loss", sid, "exact_match", "loss", 0, (), "1" if i >= 2 else "0",
                               score=float(i >= 2))])
        for i, sid in enumerate(BATCH) if not (faults and sid == "train-3")])
    store.finish_step(run_id, 1, 0.6, None, BATCH[:2])
    store.set_run_status(run_id, "stopped" if faults else "completed", STOP_REASON if faults else None)
    return run_id


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Store, str, str]:
    """A store holding a clean run and, newer, a faulty one: (store, faulty id, clean id)."""
    store = Store(tmp_path_factory.mktemp("faults") / "runs.sqlite")
    clean = write_run(store, "clean-run", faults=False)
    time.sleep(0.01)  # the faulty run is the newest: the dashboard opens on it
    faulty = write_run(store, "faulty-run")
    return store, faulty, clean


# --- metrics ------------------------------------------------------------------------------------

def test_step_figures_count_faults_by_step_and_phase(runs) -> None:
    store, faulty, _ = runs
    first, second = step_figures(store, faulty)
    assert {p: first[f"errors_{p}"] for p in PHASES} == dict.fromkeys(PHASES, 0) | {"validate": 2, "test": 1}
    assert {p: second[f"errors_{p}"] for p in PHASES} == dict.fromkeys(PHASES, 0) | {
        "forward": 1, "backward": 1, "propose": 1, "validate": 3}
    assert {p: second[f"cut_off_{p}"] for p in PHASES} == dict.fromkeys(PHASES, 0) | {"backward": 1, "validate": 1}
    assert (first["errors"], first["cut_off"], first["context_window"]) == (3, 0, 0)
    assert (second["errors"], second["cut_off"], second["context_window"]) == (6, 2, 1)
    assert (first["samples_errored_val"], first["samples_errored_test"], first["samples_errored"]) == (2, 1, 3)
    assert (second["samples_errored_val"], second["samples_errored_test"], second["samples_errored"]) == (3, 0, 3)
    assert first["calls_preflight"] == 3 and first["tokens_preflight"] == 45  # preflight counts like any phase


def test_error_kinds_and_context_window_failures(runs) -> None:
    store, faulty, clean = runs
    assert error_kinds(store, faulty) == {
        (0, "validate"): {"rate_limit": 1, "timeout": 1}, (0, "test"): {"server": 1},
        (1, "forward"): {"context_window": 1}, (1, "backward"): {"unknown": 1}, (1, "propose"): {"garbage": 1},
        (1, "validate"): {"rate_limit": 2, "timeout": 1},
    }
    assert list(error_kinds(store, faulty)[(1, "validate")]) == ["rate_limit", "timeout"]  # most frequent first
    [overflow] = context_window_failures(store, faulty)
    assert (overflow.step, overflow.phase, overflow.node, overflow.sample_id, overflow.error) == (
        1, "forward", "counter", "train-3", OVERFLOW)
    assert len(fault_calls(store, faulty)) == 9 + 2  # errors, and cut-off replies that did not error
    assert error_kinds(store, clean) == {} and context_window_failures(store, clean) == []


def test_run_summary_totals(runs) -> None:
    store, faulty, clean = runs
    s = run_summary(store, faulty)
    assert (s["errors"], s["cut_off"], s["status"], s["error"]) == (9, 2, "stopped", STOP_REASON)
    assert s["calls"] == 3 + 10 + 5 + 3 + 3 + 2 + 7 + 8
    assert (run_summary(store, clean)["errors"], run_summary(store, clean)["cut_off"]) == (0, 0)


# --- export and CLI -----------------------------------------------------------------------------

def test_export_carries_the_fault_counts(runs) -> None:
    store, faulty, clean = runs
    doc = json.loads(json.dumps(export_run(store, faulty)))
    assert (doc["run"]["errors"], doc["run"]["cut_off"], doc["run"]["error"]) == (9, 2, STOP_REASON)
    first, second = doc["steps"]
    zeros = dict.fromkeys(PHASES, 0)
    assert first["errors_by_phase"] == zeros | {"validate": 2, "test": 1}
    assert second["errors_by_phase"] == zeros | {"forward": 1, "backward": 1, "propose": 1, "validate": 3}
    assert first["cut_off_by_phase"] == zeros
    assert second["cut_off_by_phase"] == zeros | {"backward": 1, "validate": 1}
    assert first["error_kinds_by_phase"] == {"validate": {"rate_limit": 1, "timeout": 1}, "test": {"server": 1}}
    assert list(second["error_kinds_by_phase"]) == ["forward", "backward", "propose", "validate"]  # PHASES order
    assert second["error_kinds_by_phase"]["validate"] == {"rate_limit": 2, "timeout": 1}
    assert first["samples_errored"] == {"val": 2, "test": 1}
    assert second["samples_errored"] == {"val": 3, "test": 0}
    assert set(first["tokens_by_phase"]) == set(PHASES) and first["tokens_by_phase"]["preflight"] == 45

    tidy = export_run(store, clean)
    assert tidy["steps"][1]["errors_by_phase"] == zeros and tidy["steps"][1]["error_kinds_by_phase"] == {}
    assert (tidy["run"]["errors"], tidy["run"]["cut_off"]) == (0, 0)


def test_show_prints_errors_by_phase_cut_offs_overflows_and_the_stop_reason(runs, capsys) -> None:
    store, faulty, _ = runs
    assert cli.main(["--store", str(store.path), "show", faulty]) == 0
    out = capsys.readouterr().out
    lines = {line.split(":")[0]: line for line in out.splitlines() if line.startswith("step ")}
    assert lines["step   0"].startswith("step   0: val 0.500 (2 errored) test 0.600 (1 errored) failed 0/0")
    assert lines["step   0"].endswith("; errors: validate 2 (rate_limit 1, timeout 1), test 1 (server 1)")
    assert lines["step   1"].startswith("step   1: val 0.600 (3 errored) test - failed 2/4")
    assert lines["step   1"].endswith(
        "; errors: forward 1 (context_window 1), backward 1 (unknown 1), propose 1 (garbage 1),"
        " validate 3 (rate_limit 2, timeout 1); cut off: backward 1, validate 1")
    assert ("calls that failed because the prompt did not fit the model's context window:\n"
            f"  step 1 forward node counter sample train-3: {OVERFLOW}\n") in out
    assert out.rstrip().endswith(f"run stopped: {STOP_REASON}")
    assert '"errors": 9' in out and '"cut_off": 2' in out  # the summary


def test_show_of_a_clean_run_mentions_no_faults(runs, capsys) -> None:
    store, _, clean = runs
    assert cli.main(["--store", str(store.path), "show", clean]) == 0
    out = capsys.readouterr().out
    assert "errors:" not in out and "cut off" not in out and "errored)" not in out
    assert "context window" not in out and "run completed" not in out


def test_show_names_faults_of_a_run_that_failed_before_its_first_step(tmp_path: Path, capsys) -> None:
    store = Store(tmp_path / "runs.sqlite")
    store.create_run("early", "object_counting", {"steps": 1}, {"val": VAL})
    store.add_calls([call("early", 0, "preflight", 0, kind="fatal", node=None),
                     call("early", 0, "preflight", 1, node=None)])
    store.set_run_status("early", "failed", "LLMFatalError: forward model openai:gpt-4o-mini: bad key")
    assert step_figures(store, "early") == [] and run_summary(store, "early")["errors"] == 1
    assert cli.main(["--store", str(store.path), "show", "early"]) == 0
    out = capsys.readouterr().out
    assert "step   0 (no step record): errors: preflight 1 (fatal 1)\n" in out
    assert out.rstrip().endswith("run failed: LLMFatalError: forward model openai:gpt-4o-mini: bad key")


def test_runs_has_an_errors_column_and_the_summary_line_counts_faults(runs, capsys) -> None:
    store, faulty, clean = runs
    assert cli.main(["--store", str(store.path), "runs"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[-1] == "errors"
    errors = {row.split()[0]: row.split()[-1] for row in rows}
    assert errors == {faulty: "9", clean: "0"}

    cli._print_summary(store, faulty)
    # hand-written call records carry no price: their cost is unknown, never 0
    assert "calls, 9 failed, 2 cut off; cost unknown" in capsys.readouterr().out
    cli._print_summary(store, clean)
    assert " calls; cost unknown" in capsys.readouterr().out


def test_compare_skips_samples_that_errored(runs) -> None:
    store, faulty, clean = runs
    # Test at step 0: the faulty run's test-4 errored; the others score the same in both runs.
    assert compare.final_test(store, faulty)[1]["test-4"].score is None
    assert compare.differing_samples(store, [faulty, clean]) == []
    assert compare.differing_samples(store, [clean, faulty]) == []


# --- dashboard ----------------------------------------------------------------------------------

def test_runs_page_shows_call_errors(runs) -> None:
    store, faulty, clean = runs
    at = open_page(store.path, "pages/runs.py")
    assert_clean(at)
    table = {row["run"]: row for row in html_table_rows(at.get("html")[0].proto.body)}
    assert (table[faulty]["call errors"], table[clean]["call errors"]) == ("9", "0")
    settings = {row["run"]: row for row in html_table_rows(at.get("html")[0].proto.body, table=1)}  # settings and errors
    assert settings[faulty]["error"] == STOP_REASON


def test_compare_page_shows_call_errors_and_cut_offs_as_the_runs_page_does(runs) -> None:
    store, faulty, clean = runs
    at = open_page(store.path, "pages/compare.py", faulty)
    assert_clean(at)
    at.multiselect[0].set_value([faulty, clean]).run()
    body = next(h.proto.body for h in at.get("html") if "call errors" in h.proto.body)
    table = {row["run"]: row for row in html_table_rows(body, table=1)}
    assert (table[faulty]["call errors"], table[clean]["call errors"]) == ("9", "0")
    assert (table[faulty]["cut off"], table[clean]["cut off"]) == ("2", "0")  # replies cut off at the token limit


def test_curves_page_charts_errors_and_cut_offs_by_phase(runs) -> None:
    store, faulty, _ = runs
    at = open_page(store.path, "pages/curves.py", faulty)
    assert_clean(at)
    figures = {f["layout"]["title"]["text"]: f for f in chart_figures(at)}
    errors = {t["name"]: heights(t) for t in figures["Errored calls per step by phase, and cumulative"]["data"]}
    assert errors == {p: [0, 0] for p in PHASES} | {
        "forward": [0, 1], "backward": [0, 1], "propose": [0, 1], "validate": [2, 3], "test": [1, 0],
        "cumulative (right axis)": [3, 9]}
    cut = {t["name"]: heights(t) for t in figures["Cut-off replies per step by phase, and cumulative"]["data"]}
    assert cut["backward"] == [0, 1] and cut["validate"] == [0, 1] and cut["cumulative (right axis)"] == [0, 2]
    note = next(c.value for c in at.caption if "errored" in c.value)
    assert "LLM calls that errored (no usable reply after their retries): 9" in note
    assert "replies cut off at the token limit: 2" in note
    assert "5 validation, 1 test" in note


def test_curves_page_says_a_clean_run_had_no_errors(runs) -> None:
    store, _, clean = runs
    at = open_page(store.path, "pages/curves.py", clean)
    assert_clean(at)
    titles = [f["layout"]["title"]["text"] for f in chart_figures(at)]
    # 7 charts: no fault charts, and no cost line (these hand-written calls have no known price)
    assert not [t for t in titles if "Errored" in t or "Cut-off" in t] and len(titles) == 7
    assert any("No LLM call errored in the completed steps; no reply was cut off at the token limit." in c.value
               for c in at.caption)


def test_error_kinds_count_the_calls_the_phase_figures_count_after_a_step_is_redone(tmp_path: Path) -> None:
    """A step stopped part-way and redone on resume: the first attempt's failed calls are its
    `redone`, in no phase; the kinds by phase (show, export, Curves) leave them out as well."""
    store = Store(tmp_path / "runs.sqlite")
    run_id = write_run(store, "redone-run")
    time.sleep(0.1)  # past the last call's time stamp (`call` spreads them over the next 50 ms)
    store.start_step(run_id, 1, BATCH)  # the resume redoes step 1 from its start
    [row] = [r for r in step_figures(store, run_id) if r["step"] == 1]
    assert {p: row[f"errors_{p}"] for p in PHASES} == dict.fromkeys(PHASES, 0) and row["calls_redone"] > 0
    assert not [key for key in error_kinds(store, run_id) if key[0] == 1]
    assert error_kinds(store, run_id)[(0, "validate")] == {"rate_limit": 1, "timeout": 1}  # step 0 is kept
    [step1] = [s for s in export_run(store, run_id)["steps"] if s["step"] == 1]
    assert step1["error_kinds_by_phase"] == {} and step1["errors_by_phase"] == dict.fromkeys(PHASES, 0)
    # The redone attempt's faults are its own figures, so a step's errors sum to the run's; `show`
    # says the same (it used to print the first attempt's errors under their phases).
    doc = export_run(store, run_id)
    assert step1["redone"]["errors"] == row["errors_redone"] > 0
    assert step1["redone"]["cut_off"] == row["cut_off_redone"]
    assert sum(sum(s["errors_by_phase"].values()) + s["redone"]["errors"] for s in doc["steps"]) == doc["run"]["errors"]
    assert cli.main(["--store", str(store.path), "show", run_id]) == 0
    [line] = [line for line in capsys_lines(store, run_id) if line.startswith("step   1:")]
    assert line.endswith(f"; errors: redone {row['errors_redone']}" + (f"; cut off: redone {row['cut_off_redone']}"
                                                                           if row["cut_off_redone"] else ""))


def capsys_lines(store: Store, run_id: str) -> list[str]:
    """The lines `autodiff show RUN` prints."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["--store", str(store.path), "show", run_id]) == 0
    return out.getvalue().splitlines()
