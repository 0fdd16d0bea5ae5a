"""The `autodiff` command: runs, show, export (its JSON schema), bad input, store seeding."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path

import pytest

from autodiff import cli
from autodiff.export import export_run
from autodiff.store import NO_PROPOSAL_COST, Store
from tests.fake_runs import fake_run


@pytest.fixture
def one_run(tmp_path: Path) -> tuple[Path, str]:
    store = Store(tmp_path / "runs.sqlite")
    run_id = fake_run(store, tmp_path / "cache.sqlite", steps=2)
    return store.path, run_id


def test_runs_show_and_export(one_run, capsys) -> None:
    path, run_id = one_run
    assert cli.main(["--store", str(path), "runs"]) == 0
    assert run_id in capsys.readouterr().out
    assert cli.main(["--store", str(path), "show", run_id]) == 0
    assert "step   1" in capsys.readouterr().out
    assert cli.main(["--store", str(path), "export", run_id]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) >= {"run", "steps", "proposals", "gradients"}
    assert {"id", "task", "config", "status"} <= set(doc["run"])
    step = doc["steps"][1]
    assert {"step", "parameters", "val_score", "test_score", "tokens_by_phase"} <= set(step)
    assert set(step["tokens_by_phase"]) == {"preflight", "forward", "backward", "propose", "validate", "test"}
    proposal = doc["proposals"][0]
    assert {"parameter", "step", "value", "method", "reasoning", "scores", "fate", "decided_by"} <= set(proposal)
    assert {"minibatch", "validation"} <= set(proposal["scores"])
    gradient = doc["gradients"][0]
    assert {"id", "step", "sample", "node", "target", "call_index", "score", "text"} <= set(gradient)
    # Why each proposal was made: the ids of the gradients its optimizer call read.
    ids = {g["id"] for g in doc["gradients"]}
    assert all(p["feedback_ids"] and set(p["feedback_ids"]) <= ids for p in doc["proposals"])


def test_bad_input_is_one_clear_error_and_exit_code_2(tmp_path: Path, capsys) -> None:
    store = str(tmp_path / "runs.sqlite")
    assert cli.main(["--store", store, "train", "no_such_task", "--model", "fake:x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown task 'no_such_task'") and "Traceback" not in err
    assert cli.main(["--store", store, "train", "trec", "--model", "fake:x", "--batch-size", "0"]) == 2
    assert "--batch-size: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert cli.main(["--store", store, "show", "missing-run"]) == 2
    assert "no run with id 'missing-run'" in capsys.readouterr().err


def test_a_new_store_starts_from_the_sample_runs(tmp_path: Path, monkeypatch) -> None:
    sample = tmp_path / "sample.sqlite"
    Store(sample)
    monkeypatch.setattr(cli, "SAMPLE_STORE", sample)
    target = tmp_path / "home" / "runs.sqlite"
    cli.seed_store(target)
    assert target.exists()
    tables = {r[0] for r in sqlite3.connect(target).execute("SELECT name FROM sqlite_master")}
    assert "runs" in tables
    target.write_bytes(b"keep me")  # an existing store is never overwritten
    cli.seed_store(target)
    assert target.read_bytes() == b"keep me"


def test_bundled_sample_runs_say_which_models_made_them(tmp_path: Path) -> None:
    if not cli.SAMPLE_STORE.exists():
        pytest.skip("no bundled sample runs in this checkout")
    copy = tmp_path / "samples.sqlite"
    copy.write_bytes(cli.SAMPLE_STORE.read_bytes())  # opening a store may write; never touch the bundled one
    store = Store(copy)
    runs = store.runs()
    assert {r.task for r in runs} >= {"object_counting", "trec", "multihop_rag"}
    for run in runs:
        assert run.status == "completed"
        assert run.config["forward_model"].startswith("local:")
    decided = [p for r in runs for p in store.proposals(r.id) if p.decided_by not in (None, "auto")]
    assert {p.fate for p in decided} >= {"accepted", "rejected"}


def test_show_says_a_proposals_calls_are_not_linked_rather_than_unpriced(tmp_path: Path, capsys) -> None:
    """The bundled stores predate call links: their validation cost is unknown because the calls
    are not linked to the proposal, although every call has a price."""
    if not cli.SAMPLE_STORE.exists():
        pytest.skip("no bundled sample runs in this checkout")
    copy = tmp_path / "samples.sqlite"
    copy.write_bytes(cli.SAMPLE_STORE.read_bytes())
    store = Store(copy)
    run_id = next(r.id for r in store.runs() if r.config.get("review") == "all")
    assert all(c.cost_usd is not None for c in store.call_summaries(run_id))
    assert cli.main(["--store", str(copy), "show", run_id]) == 0
    out = capsys.readouterr().out
    assert "validated for unknown (its calls are not linked to it in this store)" in out
    assert "unpriced" not in out


def test_dashboard_command_starts_streamlit_with_the_pages_preloaded() -> None:
    cmd = cli.dashboard_command("localhost", 8555)
    assert cmd[1:5] == ["-m", "dashboard.serve", "run", str(cli.ROOT / "app.py")]
    flags = dict(zip(cmd[5::2], cmd[6::2]))
    assert flags["--server.port"] == "8555" and flags["--server.enableStaticServing"] == "true"
    assert flags["--server.fileWatcherType"] == "none"
    assert flags["--runner.postScriptGC"] == flags["--runner.magicEnabled"] == "false"
    reload = cli.dashboard_command("localhost", 8555, reload=True)
    assert dict(zip(reload[5::2], reload[6::2]))["--server.fileWatcherType"] == "poll"


def test_no_page_relies_on_streamlit_magic() -> None:
    """The dashboard runs with magic off (.streamlit/config.toml): a bare expression in a page,
    which magic would have written to the page, would now show nothing."""
    import ast

    for path in [cli.ROOT / "app.py", *sorted((cli.ROOT / "pages").glob("*.py"))]:
        tree = ast.parse(path.read_text())
        docstring = tree.body[0] if tree.body and isinstance(tree.body[0], ast.Expr) else None
        for node in ast.walk(tree):
            if isinstance(node, ast.Expr) and node is not docstring and not isinstance(node.value, ast.Call) \
                    and not (isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
                raise AssertionError(f"{path.name}:{node.lineno}: {ast.unparse(node)} relies on magic to be shown")


def test_the_server_preloads_what_the_pages_import() -> None:
    from dashboard import serve

    names = serve.page_imports()
    for wanted in ("streamlit", "dashboard.common", "dashboard.charts", "autodiff.graphview", "autodiff.metrics",
                   "plotly.graph_objects", "pandas"):
        assert wanted in names
    loaded = serve.preload(names)
    assert "plotly.graph_objects" in loaded and "autodiff.graphview" in loaded
    assert "autodiff.metrics.step_figures" not in loaded  # a function, not a module: skipped


def test_dashboard_stops_its_server_on_sigterm(tmp_path) -> None:
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.servers import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "autodiff.cli", "--store", str(tmp_path / "runs.sqlite"),
                             "dashboard", "--port", str(port)], cwd=cli.ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("the dashboard did not answer")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) is not None
        time.sleep(0.5)
        with socket.socket() as s:  # nothing listens any more: no server left behind
            assert s.connect_ex(("127.0.0.1", port)) != 0
        with socket.socket() as s:  # and the port can be listened on again
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
    finally:
        if proc.poll() is None:
            proc.kill()


def test_exported_proposals_and_gradients_are_the_stored_rows(one_run) -> None:
    """The export's proposals and gradients, key for key and byte for byte as the README's schema
    lays them out, built here from the stored rows by plain SQL (not through the store's records),
    including a proposal whose feedback was not recorded (null, not [])."""
    path, run_id = one_run
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO proposals (id, run_id, step, parameter, value, method, reasoning, fate, reason,"
                     " created_at, decision, decision_value, feedback_ids, held_fate) VALUES ('old', ?, 1, 'x', 'v',"
                     " 'edit', '', 'accepted', 'edited', 1e12, 'edit', 'edited value', NULL, 'malformed')", (run_id,))
    store = Store(path)
    doc = export_run(store, run_id)
    costs = store.proposal_costs(run_id)
    with sqlite3.connect(path) as conn:
        conn.row_factory = sqlite3.Row
        proposals = conn.execute("SELECT * FROM proposals WHERE run_id = ? ORDER BY step, created_at",
                                 (run_id,)).fetchall()
        gradients = conn.execute("SELECT * FROM gradients WHERE run_id = ? ORDER BY step, created_at, sample_id,"
                                 " call_index", (run_id,)).fetchall()
    want_proposals = [{
        "id": p["id"], "parameter": p["parameter"], "step": p["step"], "value": p["value"], "method": p["method"],
        "reasoning": p["reasoning"],
        "scores": {"minibatch": p["minibatch_score"], "minibatch_baseline": p["minibatch_baseline"],
                   "validation": p["val_score"], "validation_baseline": p["val_baseline"]},
        "fate": p["fate"], "reason": p["reason"], "decided_by": p["decided_by"],
        "edited_value": p["decision_value"] if p["decision"] == "edit" else None, "held_fate": p["held_fate"],
        "feedback_ids": None if p["feedback_ids"] is None else json.loads(p["feedback_ids"]),
        "cost": costs.get(p["id"], NO_PROPOSAL_COST)} for p in proposals]
    want_gradients = [{
        "id": g["id"], "step": g["step"], "sample": g["sample_id"], "node": g["node"], "target_type": g["target_type"],
        "target": g["target"], "call_index": g["call_index"], "score": g["score"], "text": g["text"],
        "source_node": g["source_node"], "path": json.loads(g["path"]), "origin": g["origin"], "error": g["error"],
        "llm_call_id": g["llm_call_id"]} for g in gradients]
    assert json.dumps(doc["proposals"]) == json.dumps(want_proposals)
    assert json.dumps(doc["gradients"]) == json.dumps(want_gradients)
    [old] = [p for p in doc["proposals"] if p["id"] == "old"]
    assert (old["feedback_ids"], old["edited_value"], old["held_fate"]) == (None, "edited value", "malformed")
    assert all(p["feedback_ids"] for p in doc["proposals"] if p["id"] != "old") and doc["gradients"]
    store.close()


def test_a_run_stopped_by_its_retry_budget_says_so_and_resumes_with_a_larger_one(tmp_path: Path, capsys,
                                                                                monkeypatch) -> None:
    """A server asking for a longer wait than the retry budget stops the run with that wait, the
    budget and the option to resume with; `resume` takes the option, stores it and says so."""
    from autodiff.llm.types import Message, Request
    from autodiff.recovery import recovery
    from tests.conftest import TOY_TASK, Script
    from tests.http_fakes import FakeOpenAIServer

    script, limited = Script(), [True]

    def respond(request):
        messages = tuple(Message(m["role"], m["content"]) for m in request.body["messages"])
        if limited[0] and "Reply with the word OK." not in messages[-1].content:
            return ("status", 429, {"retry-after": "3"})  # every later call sits it out
        return ("ok", script(Request(messages)))

    store_path = tmp_path / "runs.sqlite"
    common = ["--store", str(store_path), "--cache", str(tmp_path / "cache.sqlite"), "--quiet"]
    with FakeOpenAIServer(responder=respond) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789abcdef")
        code = cli.main([*common, "train", TOY_TASK, "--model", "openai:toy", "--steps", "1", "--retry-budget", "1",
                         "--run-id", "limited"])
        err = capsys.readouterr().err
        assert code == 3, err
        assert "the server asked to wait 3 s, more than the 1 s retry budget" in err
        assert "gave up after 1 attempt in" in err and "1 attempts" not in err
        # with the run's response cache (not the default one), so the resume answers the redone calls from it
        assert (f"continue with: autodiff resume limited --store {store_path} --cache {tmp_path / 'cache.sqlite'} "
                "--retry-budget 10") in err
        what = recovery(Store(store_path).run("limited"))
        assert what.option == "--retry-budget 10" and "autodiff resume limited --retry-budget 10" in what.advice
        assert "rate limits passed" not in what.advice

        assert cli.main([*common, "resume", "limited", "--retry-budget", "-1"]) == 2  # RunConfig's limits
        assert "--retry-budget" in capsys.readouterr().err
        limited[0] = False
        assert cli.main([*common, "resume", "limited", "--retry-budget", "10", "--timeout", "10"]) == 0
    err = capsys.readouterr().err
    assert "retry_budget 1.0 -> 10.0" in err and "timeout None -> 10.0" in err
    store = Store(store_path)
    run = store.run("limited")
    assert run.status == "completed" and (run.config["retry_budget"], run.config["timeout"]) == (10.0, 10.0)
    assert [e.text for e in store.run_events("limited") if e.kind == "options_changed"] == [
        "timeout None -> 10.0; retry_budget 1.0 -> 10.0"]


@pytest.mark.parametrize("how", ["Ctrl-C", "SIGTERM"])
def test_an_interrupted_training_is_stopped_and_names_the_command_to_resume_it(how: str, tmp_path: Path, capsys,
                                                                              monkeypatch) -> None:
    import os
    import signal

    from autodiff.recovery import recovery
    from tests.conftest import TOY_TASK

    def progress_bar(total: int, quiet: bool):
        def on(event: str, info: dict) -> None:
            if event == "backward" and info["step"] == 2:
                if how == "SIGTERM":
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)  # the handler interrupts this
                raise KeyboardInterrupt

        return on

    monkeypatch.setattr(cli, "_progress_bar", progress_bar)
    store_path = tmp_path / "runs.sqlite"
    common = ["--store", str(store_path), "--cache", str(tmp_path / "cache.sqlite")]
    assert cli.main([*common, "train", TOY_TASK, "--model", "fake:cli", "--steps", "3", "--run-id", "cut"]) == 130
    err = capsys.readouterr().err
    assert f"continue with: autodiff resume cut --store {store_path} --cache {tmp_path / 'cache.sqlite'}" in err
    assert "RUN_ID" not in err
    run = Store(store_path).run("cut")
    assert run.status == "stopped" and f"interrupted ({how}) after step 1" in run.error
    what = recovery(run)
    assert what.outlook == "go" and "KeyboardInterrupt" not in what.error
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the CLI's handler is gone with the run
    monkeypatch.setattr(cli, "_progress_bar", lambda total, quiet: lambda event, info: None)
    assert cli.main([*common, "resume", "cut"]) == 0
    assert Store(store_path).run("cut").status == "completed"


def test_show_says_unknown_for_tokens_a_server_never_reported(tmp_path: Path, capsys) -> None:
    from autodiff import runner
    from autodiff.config import make_config
    from autodiff.llm.openai_provider import OpenAIProvider
    from autodiff.llm.types import Message, Request
    from tests.conftest import TOY_DEFAULTS, Script
    from tests.http_fakes import FakeOpenAIServer

    script = Script()

    def respond(request):  # a well-formed reply without `usage`, as some local servers send
        text = script(Request(tuple(Message(m["role"], m["content"]) for m in request.body["messages"])))
        body = {"id": "x", "object": "chat.completion", "created": 0, "model": "toy",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
        return ("garbage", json.dumps(body).encode())

    store = Store(tmp_path / "runs.sqlite")
    with FakeOpenAIServer(responder=respond) as server:
        options = {**TOY_DEFAULTS, "forward_model": "openai:toy", "steps": 1}
        runner.train(store, make_config(**options), run_id="nousage", cache_path=tmp_path / "cache.sqlite",
                     providers={"openai": OpenAIProvider(None, server.base_url)})
    assert cli.main(["--store", str(store.path), "show", "nousage"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and " tokens unknown " in lines[0], lines  # step 0: forward calls alone
    assert re.search(r" tokens [\d,]+ \+ unknown ", lines[1]), lines  # the fake backward and optimizer report theirs


def test_a_reasoning_effort_a_model_is_not_sent_is_said(tmp_path: Path, capsys) -> None:
    """--reasoning-effort with a model that is asked without it (another server's model behind the
    OpenAI API, a local one) used to be stored and silently never sent."""
    common = ["--store", str(tmp_path / "runs.sqlite"), "estimate", "object_counting", "--reasoning-effort", "high"]
    assert cli.main([*common, "--model", "openai:llama3.1", "--optimizer-model", "openai:o3"]) == 0
    err = capsys.readouterr().err
    assert "note: --reasoning-effort high is sent only to reasoning models" in err
    assert "openai:llama3.1 is asked without it" in err and "o3" not in err.split("reasoning models")[1].split(";")[1]
    assert cli.main([*common, "--model", "openai:o3"]) == 0
    assert "note:" not in capsys.readouterr().err
