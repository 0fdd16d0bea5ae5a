"""The custom pipeline in examples/: loaded by path like a user's own file, traced, trained."""

from __future__ import annotations

import re
from pathlib import Path

from autodiff.config import make_config
from autodiff import runner
from autodiff.backward import BackwardContext, backward
from autodiff.llm.fake import FakeProvider
from autodiff.pipeline import run_sample
from autodiff.tasks import load_task
from conftest import FAST_RETRY, Script

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "examples/summarize_then_answer.py:make_task"


def answers(task) -> dict[str, str]:
    return {s["question"]: s["answer"] for rows in task.splits.values() for s in rows}


def forward_as(answer_for):
    def reply(prompt: str) -> str:
        question = re.findall(r"Question: (.*)", prompt)[-1].strip()
        if "Notes:" in prompt:
            return f"The notes point to it.\nAnswer: {answer_for(question)}"
        return "Notes: " + " ".join(f"fact{i}" for i in range(200))  # long: the clip node shortens it
    return reply


def test_example_is_short_and_loads_by_path(monkeypatch):
    source = (ROOT / EXAMPLE.split(":")[0]).read_text()
    assert len(source.splitlines()) < 40
    monkeypatch.chdir(ROOT)
    task = load_task(EXAMPLE)
    assert task.name == EXAMPLE
    nodes = [(n.name, n.node_type) for n in task.pipeline.nodes()]
    assert nodes == [("summarizer", "llm"), ("clip", "function"), ("answerer", "llm")]
    assert [p.name for p in task.pipeline.parameters()] == ["summarizer.instruction", "answerer.instruction"]
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 100, "val": 100, "test": 200}
    assert len(task.splits["train"][0]["passages"]) >= 2
    assert set(task.metrics) == {"exact_match", "f1"}


def test_example_graph_and_feedback_through_the_function(monkeypatch, make_llm):
    monkeypatch.chdir(ROOT)
    task = load_task(EXAMPLE)
    sample = task.splits["train"][0]
    script = Script(forward=forward_as(lambda q: "Chelsea"),
                    backward=lambda p: "<feedback>Keep the fact that names the club.</feedback>")
    fake = make_llm(script)
    trace, evaluation = run_sample(task, sample, fake.llm)
    summ, clip, ans, loss = trace.invocations
    assert [i.node for i in trace.invocations] == ["summarizer", "clip", "answerer", "exact_match"]
    assert clip.inputs[0].source == summ.id and ans.inputs[0].source == clip.id
    assert len(clip.output.split()) == 80 and sample["passages"][0] in summ.prompt
    assert evaluation.score == 0.0
    params = {p.name: p for p in task.pipeline.parameters()}
    grads = backward(trace, fake.llm, BackwardContext("r", 1, params, sample["question"], sample["answer"]))
    handed = [g for g in grads if g.target_invocation == summ.id]
    assert [(g.node, g.path) for g in handed] == [("clip", ("clip",))]
    assert [g.target for g in grads if g.target_type == "parameter"] == ["answerer.instruction",
                                                                        "summarizer.instruction"]


def test_example_trains_with_the_same_trainer(monkeypatch, store, tmp_path):
    monkeypatch.chdir(ROOT)
    gold = answers(load_task(EXAMPLE))
    right = set(list(gold)[::2])  # half the questions right, so some go backward
    script = Script(forward=forward_as(lambda q: gold[q] if q in right else "Chelsea"))
    run_id = runner.train(store, make_config(task=EXAMPLE, forward_model="fake:x", backward_model="fake:x", optimizer_model="fake:x", steps=1, val_limit=4, test_limit=4), cache_path=tmp_path / "c.sqlite", providers={"fake": FakeProvider(script)}, retry=FAST_RETRY)
    run = store.run(run_id)
    # A task file is stored by its absolute path, so the run resumes from any folder.
    assert run.task == str(ROOT / EXAMPLE.split(":")[0]) + ":make_task" and run.status == "completed"
    phases = {c.phase for c in store.call_summaries(run_id)}
    assert {"forward", "backward", "propose", "validate", "test"} <= phases
    assert {g.target for g in store.gradients(run_id)} >= {"summarizer.instruction", "answerer.instruction"}


def test_dashboard_graph_page_shows_the_example_like_a_built_in(monkeypatch, store, tmp_path):
    from streamlit.testing.v1 import AppTest

    from autodiff import graphview as gv
    from dashboard.graphview import external_resources
    from tests.test_dashboard_graph import drawing, drawn_nodes, graph_html
    monkeypatch.chdir(ROOT)
    script = Script(forward=forward_as(lambda q: "Chelsea"))
    run_id = runner.train(store, make_config(task=EXAMPLE, forward_model="fake:x", backward_model="fake:x", optimizer_model="fake:x", steps=1, batch_size=2, val_limit=2, test_limit=2), cache_path=tmp_path / "c.sqlite", providers={"fake": FakeProvider(script)}, retry=FAST_RETRY)
    g = gv.build_graph(store.invocations(run_id, 1), store.gradients(run_id, 1), store.parameters(run_id))
    assert gv.node_names(g) == ["summarizer", "clip", "answerer", "exact_match"]
    assert g.nodes["node:summarizer"]["failing"] > 0  # feedback passed through clip
    monkeypatch.setenv("AUTODIFF_STORE", store.spec)
    at = AppTest.from_file(str(ROOT / "pages" / "graph.py"), default_timeout=60)
    at.session_state["run_id"] = run_id
    at.run()
    assert not at.exception
    page = graph_html(at)
    assert "node:clip" in drawn_nodes(drawing(page)) and external_resources(page) == []
