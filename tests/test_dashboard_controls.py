"""Errors and controls that tell the truth (issue 11, item 5): a stopped or failed run's reason and
what to do on every page of the run; a Start form that checks model specs and ranges before a run
exists; Stop that says what it keeps, and keeps it; a review wait's time left; feedback that says
who will read it; sample runs that say what they are. AppTests against stores filled by real
engine runs on the scripted fake LLM (tests/fake_runs.py)."""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from autodiff import runner
from autodiff.config import RunConfig, describe_limits, make_config
from autodiff.errors import LLMFatalError
from autodiff.llm.fake import FakeProvider
from autodiff.llm.types import Request
from autodiff.records import Run
from autodiff.recovery import recovery, stop_effect
from autodiff.review import pending
from autodiff.samples import SAMPLE_STORE
from autodiff.store import Store
from dashboard.common import md
from tests.fake_runs import fake_run, responder
from tests.test_dashboard_pages import open_page as pages_open_page

RUN_PAGES = ("pages/graph.py", "pages/gradients.py", "pages/prompts.py", "pages/proposals.py", "pages/curves.py",
             "pages/review.py", "pages/compare.py")
FAKES = dict(forward_model="fake:forward", backward_model="fake:backward", optimizer_model="fake:optimizer")


def open_page(store_path: Path, page: str = "pages/runs.py", run_id: str | None = None) -> AppTest:
    """The page as tests/test_dashboard_pages.py opens it, with no exception shown."""
    at = pages_open_page(store_path, page, run_id)
    assert not at.exception, [e.value for e in at.exception]
    return at


def button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


def labels(at: AppTest) -> list[str]:
    return [b.label for b in at.button]


def number(at: AppTest, label: str):
    """A number field of the Start form (a text field: what is typed reaches the page as typed)."""
    return next(n for n in at.text_input if n.label == label)


# --- a failed or stopped run says why, on every page, with what to do ----------------------------

KEY_ERROR = "openai model 'gpt-x': HTTP 401: authentication failed at https://api.openai.com/v1: check OPENAI_API_KEY"


def _failing(request: Request):
    """The forward model's key is refused; the other roles would answer."""
    return LLMFatalError(KEY_ERROR) if "proposal blocks" not in request.messages[0].content and \
        "feedback" not in request.messages[0].content else responder(request)


@pytest.fixture(scope="module")
def ended(tmp_path_factory) -> tuple[Store, dict[str, str]]:
    """A run failed on a refused key, one failed on a prompt too long for the model, and one a
    person stopped in the middle of step 1."""
    path = tmp_path_factory.mktemp("ended")
    store = Store(path / "runs.sqlite")
    ids = {}
    with pytest.raises(LLMFatalError):
        runner.train(store, make_config(task="object_counting", **FAKES, steps=1, val_limit=4, test_limit=4),
                     run_id="keyfail", cache_path=path / "cache.sqlite", providers={"fake": FakeProvider(_failing)})
    ids["key"] = "keyfail"
    too_long = LLMFatalError("openai model 'tiny': the prompt does not fit the model's context window (4096 tokens)")
    with pytest.raises(LLMFatalError):
        runner.train(store, make_config(task="object_counting", **FAKES, steps=1, val_limit=4, test_limit=4),
                     run_id="ctxfail", cache_path=path / "cache.sqlite",
                     providers={"fake": FakeProvider(lambda request: too_long)})
    ids["context"] = "ctxfail"

    def stop_in_step_1(event: str, info: dict) -> None:
        if event == "backward":
            store.request_stop(info["run_id"])

    runner.train(store, make_config(task="object_counting", **FAKES, steps=2, val_limit=4, test_limit=4),
                 run_id="stopped", cache_path=path / "cache.sqlite", providers={"fake": FakeProvider(responder)},
                 progress=stop_in_step_1)
    ids["stopped"] = "stopped"
    return store, ids


def test_the_engine_reads_its_own_errors_into_what_to_do(ended) -> None:
    store, ids = ended
    key = recovery(store.run(ids["key"]))
    assert key.status == "failed" and key.outlook == "fix_first" and KEY_ERROR in key.error
    assert "environment" in key.advice and f"autodiff resume {ids['key']}" in key.advice
    context = recovery(store.run(ids["context"]))
    assert context.outlook == "new_run" and "new run" in context.advice
    stopped = recovery(store.run(ids["stopped"]))
    assert stopped.status == "stopped" and stopped.outlook == "go"
    assert stopped.error.startswith("stopped on request after step 0; resume redoes step 1 from its start")
    # the reasons other parts of the engine write
    assert recovery(_run("r", "running", None, pid=2 ** 22 + 12345)) is None  # a running run needs nothing
    store.create_run("dead", "object_counting", {}, {"train": [], "val": [], "test": []})
    store.set_run_status("dead", "running", pid=2 ** 22 + 12345)
    runner.mark_dead_runs(store)
    assert recovery(store.run("dead")).outlook == "go"
    assert recovery(_run("m", "failed", "forward model local:/x.gguf is not usable: local model file not found: "
                         "/x.gguf. Use local:smollm2 or local:/path/to/model.gguf")).outlook == "fix_first"
    assert recovery(_run("c", "completed", None)) is None


def _run(run_id: str, status: str, error: str | None, pid: int | None = None) -> Run:
    """A run record as the store would give it, with only what `recovery` reads chosen."""
    return Run(id=run_id, task="object_counting", config={}, status=status, error=error, created_at=0.0,
               updated_at=0.0, stop_requested=False, pid=pid)


@pytest.mark.parametrize("page", RUN_PAGES)
def test_every_page_of_a_failed_run_opens_on_its_error_and_what_to_do(ended, page: str) -> None:
    store, ids = ended
    at = open_page(store.path, page, ids["key"])
    first = next(iter(at.main.children.values()))  # before the title: the first thing on the page
    [error] = [e for e in at.error if "What to do" in e.value]
    assert getattr(first, "value", None) == error.value, first
    assert "HTTP 401" in error.value and "OPENAI\\_API\\_KEY" in error.value
    assert "Resume is on the **Runs** page." in error.value
    # the shell command it gives names the page's store, not the default one a shell would open
    assert f"autodiff resume {md(ids['key'])} \\-\\-store {md(str(store.path))}" in error.value, error.value


def test_the_runs_page_offers_resume_only_where_it_can_help(ended) -> None:
    store, ids = ended
    at = open_page(store.path, "pages/runs.py", ids["key"])
    assert any("What to do" in e.value and "HTTP 401" in e.value for e in at.error)
    assert f"Resume {ids['key']} after the fix" in labels(at) and f"Resume {ids['key']}" not in labels(at)

    at = open_page(store.path, "pages/runs.py", ids["context"])
    assert any("a resume would fail the same way" in e.value for e in at.error)
    assert not [b for b in labels(at) if b.startswith("Resume")]  # resuming cannot help
    button(at, "New run with these settings").click().run()
    # the form opens with the run's settings, to change them
    assert at.text_input(key="model_forward").value == "fake:forward" and number(at, "Steps").value == "1"

    at = open_page(store.path, "pages/runs.py", ids["stopped"])
    assert any("stopped on request" in w.value and "What to do" in w.value for w in at.warning)
    assert f"Resume {ids['stopped']}" in labels(at)


# --- the Start form checks before it registers a run ---------------------------------------------

def _models(at: AppTest, spec: str) -> None:
    for role in ("forward", "backward", "optimizer"):
        at.text_input(key=f"model_{role}").input(spec)


@pytest.mark.parametrize("spec, says", [
    ("local:/nonexistent/model.gguf", "local model file not found: /nonexistent/model.gguf"),
    ("local:smollm3", "no embedded model is named 'smollm3'"),
    ("mystery:model", "unknown provider 'mystery'"),
])
def test_start_form_refuses_a_model_that_cannot_work_without_creating_a_run(tmp_path: Path, spec: str,
                                                                           says: str) -> None:
    at = open_page(tmp_path / "runs.sqlite")
    _models(at, spec)
    button(at, "Start").click().run()
    assert not at.exception
    [error] = at.error
    plain = error.value.replace("\\", "")
    assert says in plain and "fake" not in plain  # the test-only provider is never offered
    assert Store(tmp_path / "runs.sqlite").runs() == []


def test_start_form_refuses_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    impostor = tmp_path / "model.gguf"
    impostor.write_text("not a model")
    at = open_page(tmp_path / "runs.sqlite")
    _models(at, f"local:{impostor}")
    button(at, "Start").click().run()
    assert any("is not a GGUF model file" in e.value for e in at.error)
    assert Store(tmp_path / "runs.sqlite").runs() == []
    _models(at, f"local:{tmp_path}")  # a folder that exists is said to be one, not "not found"
    button(at, "Start").click().run()
    assert any("is a folder, not a GGUF model file" in e.value.replace("\\", "") for e in at.error)
    assert Store(tmp_path / "runs.sqlite").runs() == []


def test_start_form_names_every_out_of_range_number_with_its_limits(tmp_path: Path) -> None:
    at = open_page(tmp_path / "runs.sqlite")
    for label, name in (("Steps", "steps"), ("Batch size", "batch_size"), ("Failed samples per step", "max_failed"),
                        ("Tau (pass score)", "tau"), ("Validation samples", "val_limit")):
        assert f"({describe_limits(name)})" in number(at, label).help  # the range, from RunConfig
    _models(at, "fake:x")
    number(at, "Steps").input("5000")
    number(at, "Batch size").input("0")
    number(at, "Tau (pass score)").input("3.0")
    number(at, "Failed samples per step").input("0")
    number(at, "Budget (tokens)").input("-5")
    button(at, "Start").click().run()
    [error] = at.error
    lines = error.value.replace("\\", "").splitlines()
    expected = {"Steps": "less than or equal to 1000 (given: 5000)", "Batch size": "greater than or equal to 1 (given: 0)",
                "Tau (pass score)": "less than or equal to 1 (given: 3.0)",
                "Failed samples per step": "greater than or equal to 1 (given: 0)",
                "Budget (tokens)": "greater than 0 (given: -5) (empty or 0 means no budget)"}
    for label, text in expected.items():
        assert any(f"**{label}**" in line and text in line for line in lines), (label, lines)
    assert RunConfig.model_fields["steps"].metadata[1].le == 1000  # the one source of the limit shown
    assert Store(tmp_path / "runs.sqlite").runs() == []


def test_start_form_refuses_what_is_not_a_number_as_typed_never_rewritten(tmp_path: Path, monkeypatch) -> None:
    """What a person types reaches the form as typed: a decimal in a whole-number field, an empty
    required field, a number too large for a float, text, and a huge count are each refused by
    the field's label with the text given, never rounded, clipped or swapped for another value."""
    started = []
    monkeypatch.setattr(runner, "launch", lambda store, config, cache: started.append(config) or "new")
    at = open_page(tmp_path / "runs.sqlite")
    _models(at, "fake:x")
    typed = {"Steps": "2.5", "Batch size": "", "Tau (pass score)": "1e400", "Validation samples": "ten",
             "Failed samples per step": "99999999999999999999", "Budget (US dollars)": "nan"}
    for label, text in typed.items():
        number(at, label).input(text)
    button(at, "Start").click().run()
    [error] = at.error
    lines = error.value.replace("\\", "").splitlines()
    expected = {"Steps": "2.5 is not a whole number", "Batch size": "empty: enter a whole number, 1 to 256",
                "Tau (pass score)": "less than or equal to 1 (given: 1e400)", "Validation samples": "ten is not a whole number",
                "Failed samples per step": "less than or equal to 256 (given: 99999999999999999999)",
                "Budget (US dollars)": "nan is not a finite number"}
    for label, text in expected.items():
        assert any(f"**{label}**" in line and text in line for line in lines), (label, lines)
    assert Store(tmp_path / "runs.sqlite").runs() == []
    # Empty where the option has a default of its own: that default, as the field's placeholder says.
    for label in typed:
        number(at, label).input("")
    number(at, "Steps").input("1e0")
    number(at, "Batch size").input("2.0")
    number(at, "Failed samples per step").input("1")
    button(at, "Start").click().run()
    assert not at.error, [e.value for e in at.error]
    [config] = started
    assert (config.steps, config.batch_size, config.max_failed) == (1, 2, 1)
    assert (config.tau, config.val_limit, config.budget_usd) == (None, None, None)
    assert number(at, "Tau (pass score)").placeholder == "the task's"
    assert number(at, "Validation samples").placeholder == "all"


def test_start_form_takes_the_options_a_small_local_model_needs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AUTODIFF_CACHE", str(tmp_path / "cache.sqlite"))
    at = open_page(tmp_path / "runs.sqlite")
    _models(at, "fake:x")
    number(at, "Steps").input("1")
    number(at, "Validation samples").input("4")
    number(at, "Test samples").input("4")
    number(at, "Failed samples per step").input("2")
    number(at, "Tau (pass score)").input("0.5")
    next(c for c in at.checkbox if c.label == "Lenient proposals").check()
    button(at, "Start").click().run()
    assert not at.error, [e.value for e in at.error]
    store = Store(tmp_path / "runs.sqlite")
    [run] = store.runs()
    assert (run.config["max_failed"], run.config["tau"], run.config["lenient_proposals"]) == (2, 0.5, True)
    deadline = time.monotonic() + 120
    while store.run(run.id).status not in ("completed", "failed", "stopped") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert store.run(run.id).status == "completed", store.run(run.id).error


# --- Stop says what it keeps, and keeps it ----------------------------------------------------------

def _calls(store: Store, run_id: str) -> list[dict]:
    return store.call_summaries(run_id)


def test_stop_keeps_the_finished_calls_and_a_resume_does_not_pay_for_them_again(tmp_path: Path) -> None:
    store, cache = Store(tmp_path / "runs.sqlite"), tmp_path / "cache.sqlite"

    def stop_after_first_accept(event: str, info: dict) -> None:
        if event == "accepted" and info["step"] == 1:
            store.request_stop(info["run_id"])

    config = make_config(task="object_counting", **FAKES, steps=2, batch_size=4, val_limit=12, test_limit=12)
    run_id = runner.train(store, config, cache_path=cache, providers={"fake": FakeProvider(responder)},
                          progress=stop_after_first_accept)
    run = store.run(run_id)
    # What the button said is what happened: stopped after the proposal in progress, step 1 unfinished.
    effect = stop_effect(run.config)
    assert "answered from the response cache, with no new tokens" in effect
    assert run.status == "stopped" and store.last_completed_step(run_id) == 0
    assert ("resume redoes step 1 from its start, its finished LLM calls answered from this machine's response cache "
            "(a resume on another machine asks them again)") in run.error
    before = _calls(store, run_id)
    step1 = Counter(c.phase for c in before if c.step == 1)
    assert step1["forward"] and step1["backward"] and step1["propose"] == 1 and step1["validate"]  # all kept
    assert [p.fate for p in store.proposals(run_id, step=1)] == ["accepted"]

    runner.resume(store, run_id, cache_path=cache, providers={"fake": FakeProvider(responder)})
    assert store.run(run_id).status == "completed"
    redone = [c for c in _calls(store, run_id)[len(before):] if c.step == 1]
    replayed = Counter(c.phase for c in redone if c.cached)
    for phase, n in step1.items():  # every call the stopped step had finished came from the cache
        assert replayed[phase] >= n, (phase, replayed, step1)
    fresh = [c for c in redone if not c.cached]
    assert all(c.phase in ("propose", "validate") for c in fresh)  # only the parameters left to optimize
    # and the redone step reached the same decision as before the stop
    assert store.proposals(run_id, step=1)[0].fate == "accepted"


def test_a_stop_during_forward_lets_the_passes_finish_and_says_so_without_a_cache(tmp_path: Path) -> None:
    store, cache = Store(tmp_path / "runs.sqlite"), tmp_path / "cache.sqlite"

    def stop_at_step_1(event: str, info: dict) -> None:
        if event == "step" and info["step"] == 1:
            store.request_stop(info["run_id"])

    config = make_config(task="object_counting", **FAKES, steps=2, batch_size=4, val_limit=6, test_limit=6,
                         cache="off")
    run_id = runner.train(store, config, cache_path=cache, providers={"fake": FakeProvider(responder)},
                          progress=stop_at_step_1)
    phases = Counter(c.phase for c in _calls(store, run_id) if c.step == 1)
    assert phases["forward"] == 4 and phases["backward"] and not phases["propose"]  # the passes finished
    assert "asked again and paid again" in stop_effect(store.run(run_id).config)
    assert "its calls asked again (the run's response cache is off)" in store.run(run_id).error


def test_the_stop_button_says_what_is_kept_and_what_is_redone(tmp_path: Path) -> None:
    store = Store(tmp_path / "runs.sqlite")
    run_id = fake_run(store, tmp_path / "cache.sqlite", steps=1, review="validated",
                      decide=lambda store, proposal: ("reject", None))
    store.set_run_status(run_id, "running", pid=__import__("os").getpid())  # as if it were still training
    at = open_page(store.path, "pages/runs.py", run_id)
    stop = button(at, f"Stop {run_id}")  # named: with two running, each button says which it stops
    effect = stop_effect(store.run(run_id).config)
    assert stop.help == effect and "review decisions of the unfinished step are asked again" in effect
    assert any(c.value.replace("\\", "") == f"Stop: {effect}" for c in at.caption)
    stop.click().run()
    assert store.run(run_id).stop_requested
    assert any(c.value.replace("\\", "").startswith("Stop requested. The run stops after the work in progress")
               for c in at.caption)


# --- a review wait shows its time left -------------------------------------------------------------

def test_a_waiting_review_shows_the_time_left_before_its_fallback(tmp_path: Path) -> None:
    store, cache = Store(tmp_path / "runs.sqlite"), tmp_path / "cache.sqlite"
    config = make_config(task="object_counting", **FAKES, steps=1, batch_size=4, val_limit=6, test_limit=6,
                         review="all", review_timeout=600, review_fallback="accept")
    done: list[str] = []
    worker = threading.Thread(target=lambda: done.append(runner.train(
        store, config, run_id="waiting", cache_path=cache, providers={"fake": FakeProvider(responder)})), daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while not pending(store, "waiting") and time.monotonic() < deadline:
            time.sleep(0.05)
        [item] = pending(store, "waiting")[:1]
        # A loaded machine (CI runs other work) can take many seconds between the wait starting and
        # this read: a minute of slack, the fallback time is still far off.
        assert item.fallback in ("accept", "reject") and 540 < item.seconds_left() <= 600
        at = open_page(store.path, "pages/review.py", "waiting")
        [note] = [w.value for w in at.warning if "left** to decide" in w.value]
        assert "then the trainer" in note and ("accepts it" in note or "rejects it" in note)
        minutes = int(note.split("**")[1].split(" min")[0])
        assert minutes in (8, 9, 10)
        time.sleep(1.2)
        later = pending(store, "waiting")[0].seconds_left()
        assert later < item.seconds_left(now=time.time() - 1.0)  # it counts down as it waits
    finally:
        for p in store.proposals("waiting", fate="pending"):
            store.decide(p.id, "reject", by="test")
        deadline = time.monotonic() + 60
        while worker.is_alive() and time.monotonic() < deadline:
            for p in store.proposals("waiting", fate="pending"):
                if store.decision(p.id) is None:
                    store.decide(p.id, "reject", by="test")
            time.sleep(0.05)
    assert done == ["waiting"]


def test_a_held_proposal_waits_for_a_reject_fallback_whatever_the_run_says(tmp_path: Path) -> None:
    """A malformed reply or a failed check cannot be accepted by a time-out: the page says reject."""
    store, cache = Store(tmp_path / "runs.sqlite"), tmp_path / "cache.sqlite"

    def malformed(request: Request) -> str:
        return "no tags at all" if "proposal blocks" in request.messages[0].content else responder(request)

    config = make_config(task="object_counting", **FAKES, steps=1, batch_size=4, val_limit=4, test_limit=4,
                         review="all", review_timeout=0.5, review_fallback="accept")
    runner.train(store, config, run_id="held", cache_path=cache, providers={"fake": FakeProvider(malformed)})
    waits = [e for e in store.run_events("held") if e.kind == "review_wait"]
    assert waits and all('"fallback": "reject"' in e.text for e in waits)
    assert {p.fate for p in store.proposals("held")} <= {"malformed", "rejected_check"}


# --- feedback says who will read it -------------------------------------------------------------

@pytest.mark.parametrize("status, says, kind", [
    ("completed", "will not train again: no optimizer call will read it", "warning"),
    ("stopped", "no optimizer call reads it unless you resume the run", "warning"),
    ("running", "the next optimizer call for that parameter reads it", "success"),
])
def test_feedback_says_who_will_read_it(tmp_path: Path, status: str, says: str, kind: str) -> None:
    store = Store(tmp_path / "runs.sqlite")
    run_id = fake_run(store, tmp_path / "cache.sqlite", steps=1)
    if status != "completed":
        store.set_run_status(run_id, status, pid=__import__("os").getpid())
    at = open_page(store.path, "pages/review.py", run_id)
    assert any(says in c.value for c in at.caption)  # said before anything is written
    at.text_area[-1].input("Count number words too.")
    button(at, "Add feedback").click().run()
    assert any("Feedback stored" in e.value and says in e.value for e in getattr(at, kind))
    assert store.pending_human_feedback(run_id, [p.name for p in store.parameters(run_id)])


# --- the sample runs say what they are ------------------------------------------------------------

def test_the_sample_runs_say_what_they_show_and_how_to_get_more(tmp_path: Path) -> None:
    if not SAMPLE_STORE.exists():
        pytest.skip("no bundled sample runs in this checkout")
    copy = tmp_path / "runs.sqlite"
    shutil.copyfile(SAMPLE_STORE, copy)  # as `autodiff dashboard` seeds a new store
    at = open_page(copy)
    [note] = [i.value for i in at.info if "sample runs" in i.value]
    plain = note.replace("\\", "")
    assert "135M" in plain and "local:smollm2" in plain and "mechanics" in plain
    assert "provider model" in plain and "local:/path/to/model.gguf" in plain
    for run in Store(copy).runs():
        assert run.id.replace("-", "\\-") in note

    other = Store(tmp_path / "other.sqlite")
    fake_run(other, tmp_path / "cache.sqlite", steps=1)
    assert not [i for i in open_page(other.path).info if "sample runs" in i.value]
    # Reading the bundled store's ids leaves nothing beside it (no -wal or -shm of a reader).
    assert sorted(p.name for p in SAMPLE_STORE.parent.iterdir()) == [SAMPLE_STORE.name]


def test_a_stop_caused_by_the_runs_own_retry_settings_names_the_option_to_resume_with() -> None:
    from dataclasses import replace

    first = "step 0: 4 of 4 validation samples errored (more than 10%); first: LLMTransientError: openai:m: "
    tail = "; fix the cause, then resume: failed samples are asked again"
    slow = replace(_run("slow", "stopped", f"{first}gave up after 3 attempts in 5s: openai model 'm' at "
                                           f"http://h/v1: timed out (read limit 1s, connect 1s){tail}"),
                   config={"timeout": 1.0})
    what = recovery(slow)
    assert what.option == "--timeout 30" and "autodiff resume slow --timeout 30" in what.advice
    per_role = replace(slow, config={"forward_timeout": 1.0, "timeout": 5.0})
    assert recovery(per_role).option == "--forward-timeout 30"
    storm = replace(_run("storm", "stopped", f"{first}gave up after 4 attempts in 20s: openai model 'm' at "
                                             f"http://h/v1: HTTP 429: Rate limit reached{tail}"),
                    config={"retry_budget": 20.0})
    assert recovery(storm).option == "--retry-budget 60"
    ctrl_c = recovery(_run("c", "stopped", "interrupted (Ctrl-C) after step 2; resume goes on from step 3"))
    assert ctrl_c.outlook == "go" and ctrl_c.option is None
    plain = recovery(_run("p", "stopped", f"{first}HTTP 400 in your code{tail}"))
    assert plain.option is None and "--max-error-share" in plain.advice and "rate limits passed" not in plain.advice


def test_the_runs_page_resumes_a_run_its_own_time_out_stopped_with_the_option_raised(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    """A run whose replies ran past its time-out fails the same way on a resume with the same
    options: the Runs page offers the option its recovery names, at the value suggested, and
    Resume passes what the person set."""
    store = Store(tmp_path / "runs.sqlite")
    run_id = fake_run(store, tmp_path / "cache.sqlite", steps=1, timeout=1.0)
    store.set_run_status(run_id, "stopped", error=(
        "step 1: 4 of 4 validation samples errored (more than 30%); first: LLMTransientError: openai:m: gave up "
        "after 3 attempts in 5s: openai model 'm' at http://h/v1: timed out (read limit 1s, connect 1s); fix the "
        "cause, then resume: failed samples are asked again"))
    resumed = {}
    monkeypatch.setattr(runner, "resume_background", lambda store, run_id, cache, **options: resumed.update(options))
    at = open_page(store.path, "pages/runs.py", run_id)
    [field] = [n for n in at.text_input if "(--timeout)" in n.label]
    assert field.value == "30" and "now 1.0" in field.help
    assert any("--timeout 30" in w.value.replace("\\", "") for w in at.warning)  # md() escapes the dashes
    field.input("soon").run()
    button(at, f"Resume {run_id}").click().run()
    assert any("Resume refused" in e.value and "soon is not a number" in e.value for e in at.error)
    assert resumed == {}  # nothing resumed on text that is not a number
    field = next(n for n in at.text_input if "(--timeout)" in n.label)
    field.input("45").run()
    button(at, f"Resume {run_id}").click().run()
    assert resumed["timeout"] == 45.0 and not at.error
