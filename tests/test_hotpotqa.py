"""The HotPotQA pipelines on scripted fakes: traced graphs, gradients through the function nodes,
per-call gradients in the multi-hop loop, the agent's feedback to the planner call that chose a
tool, and no backward work for correct samples."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from autodiff.config import make_config
from autodiff import runner
from autodiff.backward import BackwardContext, backward
from autodiff.evals import exact_match, f1
from autodiff.optimizer import format_gradients
from autodiff.pipeline import Task, run_sample
from autodiff.records import Gradient, Invocation, Trace
from autodiff.tasks import load_task, task_names
from autodiff.tasks.hotpotqa import (
    Action, load_agent_rag, load_multihop_rag, load_rag, load_splits, parse_action, parse_answer, parse_query,
)
from conftest import FAST_RETRY, Script

TASKS = {"rag": load_rag, "multihop_rag": load_multihop_rag, "agent_rag": load_agent_rag}
WRONG = "Chelsea"


def question_of(prompt: str) -> str:
    return re.findall(r"Question: (.*)", prompt)[-1].strip()


def forward_as(answer_for, planner=None):
    """A forward model that answers like each node: queries repeat the question, the answer
    generator (and the planner's finish) give answer_for(question). `planner(prompt, turn)` may
    script the agent instead."""

    def reply(prompt: str) -> str:
        question = question_of(prompt)
        if "Steps so far:" in prompt:
            turn = int(re.search(r"Turn (\d+) of", prompt)[1])
            if planner is not None:
                return planner(prompt, turn)
            return f"Action: retrieve({question})" if turn == 1 else f"Action: finish({answer_for(question)})"
        if "Examples:" in prompt:
            return f"Reasoning: the passages say so.\nAnswer: {answer_for(question)}"
        return f"Query: {question}"

    return reply


def backward_note(prompt: str) -> str:
    """The backward model: feedback that names the node and call it was written for."""
    node = re.search(r"Node `([^`]+)`", prompt)
    call = re.search(r"This is call (\d+) \(0-based\)", prompt)
    where = f"{node[1]} call {call[1] if call else 0}" if node else "loss"
    return f"<feedback>Feedback for {where}.</feedback>"


def sample_of(task: Task) -> dict:
    return task.splits["train"][0]


def run_and_backward(task: Task, sample: dict, make_llm, script: Script) -> tuple[Trace, list[Gradient], object]:
    fake = make_llm(script)
    trace, evaluation = run_sample(task, sample, fake.llm)
    assert evaluation.score == 0.0
    params = {p.name: p for p in task.pipeline.parameters()}
    grads = backward(trace, fake.llm, BackwardContext("r", 1, params, sample["question"], sample["answer"]))
    return trace, grads, fake


def by_node(trace: Trace) -> dict[str, list[Invocation]]:
    out: dict[str, list[Invocation]] = {}
    for inv in trace.invocations:
        out.setdefault(inv.node, []).append(inv)
    return out


def source(inv: Invocation, name: str) -> str | None:
    return next(r.source for r in inv.inputs if r.name == name)


# --- data and registration ------------------------------------------------------------------


def test_tasks_are_registered_with_em_and_f1():
    for name in TASKS:
        assert name in task_names()
    task = load_task("multihop_rag")
    assert task.name == "multihop_rag"
    assert task.metrics == {"exact_match": exact_match, "f1": f1}
    assert task.loss.name == "exact_match" and task.tau == 1.0


def test_splits_are_fixed_disjoint_and_drawn_from_the_upstream_blocks():
    splits = load_splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 100, "val": 100, "test": 200}
    ids = [s["id"] for rows in splits.values() for s in rows]
    assert len(ids) == len(set(ids)) == 400
    assert load_splits() == splits  # seeded: the same every time
    from autodiff.tasks.hotpotqa import read_rows
    rows = read_rows()
    block = {row["id"]: i // 300 if i < 600 else 2 for i, row in enumerate(rows)}
    for n, split in enumerate(("train", "val", "test")):
        assert {block[s["id"]] for s in splits[split]} == {n}
    assert set(splits["train"][0]) == {"id", "question", "answer", "type", "supporting_titles"}


def test_malformed_or_short_data_is_one_clear_error(tmp_path):
    import json

    from autodiff.errors import DataError
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "question": "q", "answer": "a", "context": "not a list"}) + "\n")
    with pytest.raises(DataError, match="'context' must be a list"):
        load_splits(bad)
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"id": "x", "question": "q", "answer": "a", "context": [["T", ["s."]]]}) + "\n")
    with pytest.raises(DataError, match="expect the 1,000-row subset"):
        load_splits(short)


def test_parameters_are_named_by_node():
    names = {name: [p.name for p in factory().pipeline.parameters()] for name, factory in TASKS.items()}
    assert names["rag"] == names["multihop_rag"] == [
        "query_generator.instruction", "query_generator.output_format",
        "answer_generator.instruction", "answer_generator.output_format", "answer_generator.examples",
    ]
    assert names["agent_rag"] == ["planner.instruction", "planner.tool_retrieve", "planner.tool_finish"]
    rag = load_rag().pipeline
    assert rag.answer_generator.parameters[1].peers == ["answer_generator.instruction", "answer_generator.examples"]


# --- parsers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, action", [
    ("Action: retrieve(Old Trafford toll gates)", Action("retrieve", "Old Trafford toll gates")),
    ("Thought: first find the club.\nAction: retrieve[Brooks's Bar]", Action("retrieve", "Brooks's Bar")),
    ("Action: search: Trafford Bar", Action("retrieve", "Trafford Bar")),
    ("Action: finish(Manchester United).", Action("finish", "Manchester United")),
    ("action 2: FINISH(\"yes\")", Action("finish", "yes")),
    ("I will call retrieve(Bob Dylan (singer) birthplace) now", Action("retrieve", "Bob Dylan (singer) birthplace")),
    ("retrieve(query): searches the paragraphs\nThe answer is here.\nAnswer: 1922", Action("finish", "1922")),
    ("Manchester United, I think", Action("finish", "Manchester United, I think")),
    ("", Action("finish", "")),
    ("   \n\n", Action("finish", "")),
])
def test_parse_action_never_fails(reply, action):
    assert parse_action(reply) == action


def test_parse_query_and_answer_fall_back_to_the_first_line():
    assert parse_query("Query: \"Old Trafford toll gates\"\nmore") == "Old Trafford toll gates"
    assert parse_query("\nold trafford toll gates\n") == "old trafford toll gates"
    assert parse_answer("It is the club.\nAnswer: Manchester United.") == "Manchester United"
    assert parse_answer("Answer: a\nAnswer: **b**") == "b"
    assert parse_answer("Manchester United") == "Manchester United"
    assert parse_answer("") == ""


# --- RAG ---------------------------------------------------------------------------------------


def test_rag_graph(make_llm):
    task = load_rag()
    sample = sample_of(task)
    trace, evaluation = run_sample(task, sample, make_llm(Script(forward=forward_as(lambda q: sample["answer"]))).llm)
    assert evaluation.score == 1.0
    assert [i.node for i in trace.invocations] == ["query_generator", "retriever", "dedupe", "answer_generator",
                                                   "exact_match"]
    qg, ret, dd, ag, loss = trace.invocations
    assert [i.node_type for i in trace.invocations] == ["llm", "function", "function", "llm", "loss"]
    assert source(ret, "query") == qg.id
    assert source(dd, "passages") == ret.id
    assert source(ag, "context") == dd.id and source(ag, "question") is None
    assert source(loss, "prediction") == ag.id
    assert qg.output == sample["question"].rstrip(".")
    assert ret.output.startswith("[1] ") and "[3] " in ret.output  # top-3 passages, numbered
    assert "Passages:\n[1] " in ag.prompt


def test_rag_wrong_answer_sends_feedback_through_dedupe_and_retriever_to_the_query_generator(make_llm):
    task = load_rag()
    script = Script(forward=forward_as(lambda q: WRONG), backward=backward_note)
    trace, grads, fake = run_and_backward(task, sample_of(task), make_llm, script)
    inv = by_node(trace)
    at_answer = [g.target for g in grads if g.node == "answer_generator"]
    assert at_answer == ["answer_generator.instruction", "answer_generator.output_format",
                         "answer_generator.examples", "dedupe"]
    reached = [g for g in grads if g.target_invocation == inv["query_generator"][0].id]
    assert len(reached) == 1
    assert reached[0].path == ("dedupe", "retriever")
    assert reached[0].source_node == "answer_generator" and reached[0].text == "Feedback for answer_generator call 0."
    on_qg = [g for g in grads if g.target_type == "parameter" and g.node == "query_generator"]
    assert [g.target for g in on_qg] == ["query_generator.instruction", "query_generator.output_format"]
    # function nodes cost no backward call: loss 1 + answer generator 4 + query generator 2
    assert len(fake.phase("backward")) == 7
    assert {c.node for c in fake.phase("backward")} == {"exact_match", "answer_generator", "query_generator"}
    qg_prompts = [p for p in script.of_kind("backward") if "Node `query_generator`" in p]
    assert all("from answer_generator via dedupe -> retriever: Feedback for answer_generator" in p for p in qg_prompts)


# --- multi-hop RAG -------------------------------------------------------------------------------


def test_multihop_graph_loops_the_query_generator(make_llm):
    task = load_multihop_rag()
    sample = sample_of(task)
    trace, _ = run_sample(task, sample, make_llm(Script(forward=forward_as(lambda q: sample["answer"]))).llm)
    assert [(i.node, i.call_index) for i in trace.invocations] == [
        ("query_generator", 0), ("retriever", 0), ("dedupe", 0),
        ("query_generator", 1), ("retriever", 1), ("dedupe", 1),
        ("answer_generator", 0), ("exact_match", 0),
    ]
    qg0, ret0, dd0, qg1, ret1, dd1, ag, _ = trace.invocations
    assert source(qg0, "context") is None and "(none yet)" in qg0.prompt
    assert source(qg1, "context") == dd0.id  # the second hop sees the first hop's passages
    assert dd0.output in qg1.prompt
    assert source(ret0, "query") == qg0.id and source(ret1, "query") == qg1.id
    assert source(dd1, "passages") == ret1.id and source(dd1, "earlier") == dd0.id
    assert source(ag, "context") == dd1.id
    assert qg0.parameters == qg1.parameters  # one node, one set of parameters, two calls


def test_multihop_gradients_are_per_call_and_in_order(make_llm):
    task = load_multihop_rag()
    script = Script(forward=forward_as(lambda q: WRONG), backward=backward_note)
    trace, grads, fake = run_and_backward(task, sample_of(task), make_llm, script)
    qg = by_node(trace)["query_generator"]
    # the answer's feedback passes through dedupe and retrieval to both calls
    for call in qg:
        handed = [g for g in grads if g.target_invocation == call.id]
        assert handed and all("retriever" in g.path for g in handed)
    # each call writes its own gradients, with its own call index
    on_instruction = [g for g in grads if g.target == "query_generator.instruction"]
    assert [(g.call_index, g.invocation_id, g.text) for g in on_instruction] == [
        (1, qg[1].id, "Feedback for query_generator call 1."),
        (0, qg[0].id, "Feedback for query_generator call 0."),
    ]
    # the backward engine is told these are successive calls
    prompts = [p for p in script.of_kind("backward") if "Node `query_generator`" in p]
    assert any("This is call 0 (0-based) of 2 successive calls" in p for p in prompts)
    assert any("This is call 1 (0-based) of 2 successive calls" in p for p in prompts)
    # the optimizer sees them grouped by sample, call 0 before call 1
    shown = format_gradients(on_instruction)
    assert shown.index("[call 0] Feedback for query_generator call 0.") < shown.index(
        "[call 1] Feedback for query_generator call 1.")


def test_multihop_training_step_shows_the_optimizer_both_calls_in_order(store, tmp_path):
    script = Script(forward=forward_as(lambda q: WRONG), backward=backward_note)
    from autodiff.llm.fake import FakeProvider
    run_id = runner.train(store, make_config(task="multihop_rag", forward_model="fake:x", backward_model="fake:x", optimizer_model="fake:x", steps=1, batch_size=2, max_failed=2, val_limit=2, test_limit=2), cache_path=tmp_path / "c.sqlite", providers={"fake": FakeProvider(script)}, retry=FAST_RETRY)
    stored = store.gradients(run_id, step=1)
    assert {g.call_index for g in stored if g.target == "query_generator.instruction"} == {0, 1}
    prompt = next(p for p in script.of_kind("optimizer") if "Target parameter: `query_generator.instruction`" in p)
    for sample in re.findall(r'<sample id="[^"]+" score="0.00">\n(.*?)</sample>', prompt, re.S):
        assert sample.index("[call 0] Feedback for query_generator call 0.") < sample.index(
            "[call 1] Feedback for query_generator call 1.")
    assert prompt.count("<sample id=") == 2


# --- agentic RAG ---------------------------------------------------------------------------------


def test_agent_graph_runs_planner_tool_planner(make_llm):
    task = load_agent_rag()
    sample = sample_of(task)
    trace, evaluation = run_sample(task, sample, make_llm(Script(forward=forward_as(lambda q: sample["answer"]))).llm)
    assert evaluation.score == 1.0
    assert [(i.node, i.call_index) for i in trace.invocations] == [
        ("planner", 0), ("retrieve", 0), ("planner", 1), ("finish", 0), ("exact_match", 0),
    ]
    p0, r0, p1, fin, loss = trace.invocations
    assert source(r0, "action") == p0.id
    assert source(p1, "history") == r0.id  # planner[0] -> retrieve -> planner[1]
    assert source(fin, "action") == p1.id and source(loss, "prediction") == fin.id
    assert p0.output == f"retrieve({sample['question'].rstrip('.')})"
    assert "Old Trafford" in r0.output and "Old Trafford" in p1.prompt
    assert "Turn 2 of 3." in p1.prompt


def test_agent_planner_call_that_chose_a_bad_query_receives_the_feedback(make_llm):
    task = load_agent_rag()
    sample = sample_of(task)

    def planner(prompt: str, turn: int) -> str:
        return {1: "Action: retrieve(Montenegro rugby club)", 2: "Action: retrieve(Old Trafford toll gates)"}.get(
            turn, f"Action: finish({WRONG})")

    def feedback(prompt: str) -> str:
        if "One of its inputs, `history`" in prompt and "This is call 1 (0-based)" in prompt:
            return "<feedback>The search 'Montenegro rugby club' was off topic: search for the toll gates.</feedback>"
        return backward_note(prompt)

    script = Script(forward=forward_as(lambda q: WRONG, planner=planner), backward=feedback)
    trace, grads, _ = run_and_backward(task, sample, make_llm, script)
    assert [(i.node, i.call_index) for i in trace.invocations] == [
        ("planner", 0), ("retrieve", 0), ("planner", 1), ("retrieve", 1), ("planner", 2), ("finish", 0),
        ("exact_match", 0),
    ]
    planners, tools = by_node(trace)["planner"], by_node(trace)["retrieve"]
    assert source(tools[1], "history") == tools[0].id and source(planners[2], "history") == tools[1].id
    # the final answer's feedback passes through finish to the planner call that chose finish
    to_last = [g for g in grads if g.target_invocation == planners[2].id]
    assert [(g.node, g.path, g.source_node) for g in to_last] == [("finish", ("finish",), "exact_match")]
    # the feedback on the bad search passes through retrieve to the planner call that chose it
    to_first = [g for g in grads if g.target_invocation == planners[0].id and "off topic" in g.text]
    assert [(g.node, g.call_index, g.path, g.source_node) for g in to_first] == [("retrieve", 0, ("retrieve",), "planner")]
    # ... and that call's backward step reads it, writing gradients with call index 0
    call0 = [p for p in script.of_kind("backward") if "This is call 0 (0-based) of 3" in p]
    assert len(call0) == 3 and all("off topic" in p for p in call0)
    assert sorted(g.target for g in grads if g.invocation_id == planners[0].id and g.target_type == "parameter") == [
        "planner.instruction", "planner.tool_finish", "planner.tool_retrieve"]


def test_agent_garbage_reply_finishes_on_its_text(make_llm):
    task = load_agent_rag()
    script = Script(forward=forward_as(lambda q: WRONG, planner=lambda p, t: "I like trains.\nchoo choo"))
    trace, evaluation = run_sample(task, sample_of(task), make_llm(script).llm)
    assert [i.node for i in trace.invocations] == ["planner", "finish", "exact_match"]
    assert evaluation.prediction == "I like trains"
    assert evaluation.error is None


def test_agent_out_of_turns_finishes_with_the_last_search(make_llm):
    task = load_agent_rag()
    script = Script(forward=forward_as(lambda q: WRONG, planner=lambda p, t: f"Action: retrieve(search {t})"))
    trace, evaluation = run_sample(task, sample_of(task), make_llm(script).llm)
    assert [i.node for i in trace.invocations] == ["planner", "retrieve", "planner", "retrieve", "planner", "finish",
                                                   "exact_match"]
    assert "This is the last turn: use finish." in trace.invocations[4].prompt
    assert evaluation.prediction == "search 3"


def test_agent_llm_failure_is_a_failed_sample_not_a_crash(make_llm):
    from autodiff.errors import LLMTransientError
    task = load_agent_rag()
    trace, evaluation = run_sample(task, sample_of(task), make_llm(lambda r: LLMTransientError("down")).llm)
    # The failed call ends the sample: an error, not a 0, and no tool runs on an empty plan.
    assert [i.node for i in trace.invocations] == ["planner"]
    assert evaluation.score is None and "down" in evaluation.error


# --- selective backward in a real training step --------------------------------------------------


@pytest.mark.parametrize("name", list(TASKS))
def test_correct_samples_cause_no_backward_calls(name, store, tmp_path):
    from autodiff.llm.fake import FakeProvider
    answers = {s["question"].strip(): s["answer"] for rows in load_splits().values() for s in rows}
    script = Script(forward=forward_as(lambda q: answers[q]))
    run_id = runner.train(store, make_config(task=name, forward_model="fake:x", backward_model="fake:x", optimizer_model="fake:x", steps=1, val_limit=3, test_limit=3), cache_path=tmp_path / "c.sqlite", providers={"fake": FakeProvider(script)}, retry=FAST_RETRY)
    calls = store.call_summaries(run_id)
    assert [c for c in calls if c.phase in ("backward", "propose")] == []
    assert any(c.phase == "forward" for c in calls)
    assert store.steps(run_id)[-1].val_score == 1.0
    assert store.gradients(run_id) == []


# --- the dashboard's graph of each pipeline ------------------------------------------------------

PAGES = Path(__file__).resolve().parent.parent / "pages"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple:
    """One training step of each pipeline, every answer wrong, in one store: {task: run_id}."""
    from autodiff.llm.fake import FakeProvider
    from autodiff.store import Store

    path = tmp_path_factory.mktemp("hotpotqa_runs")
    store = Store(path / "runs.sqlite")
    planner = lambda prompt, turn: f"Action: finish({WRONG})" if turn == 3 else f"Action: retrieve(hop {turn})"  # noqa: E731
    script = Script(forward=forward_as(lambda q: WRONG, planner=planner), backward=backward_note)
    runs = {
        name: runner.train(store, make_config(task=name, forward_model="fake:x", backward_model="fake:x", optimizer_model="fake:x", steps=1, batch_size=2, val_limit=2, test_limit=2), cache_path=path / "c.sqlite", providers={"fake": FakeProvider(script)}, retry=FAST_RETRY)
        for name in TASKS
    }
    return store, runs


def stored_graph(store, run_id):
    from autodiff import graphview as gv
    return gv.build_graph(store.invocations(run_id, 1), store.gradients(run_id, 1), store.parameters(run_id))


def labelled_edges(g) -> dict[tuple[str, str], str]:
    from dashboard.graphview import edge_label
    return {(g.nodes[u]["name"], g.nodes[v]["name"]): edge_label(d)
            for u, v, d in g.edges(data=True) if d["kind"] == "data"}


def test_stored_graphs_have_the_expected_nodes_and_edges(trained):
    from autodiff import graphview as gv
    store, runs = trained
    rag, hop, agent = (stored_graph(store, runs[n]) for n in TASKS)
    assert gv.node_names(rag) == gv.node_names(hop) == [
        "query_generator", "retriever", "dedupe", "answer_generator", "exact_match"]
    assert labelled_edges(rag) == {
        ("query_generator", "retriever"): "", ("retriever", "dedupe"): "", ("dedupe", "answer_generator"): "",
        ("answer_generator", "exact_match"): ""}
    assert labelled_edges(hop) == {
        ("query_generator", "retriever"): "0→0, 1→1", ("retriever", "dedupe"): "0→0, 1→1",
        ("dedupe", "query_generator"): "0→1", ("dedupe", "dedupe"): "0→1", ("dedupe", "answer_generator"): "1→0",
        ("answer_generator", "exact_match"): ""}
    assert hop.nodes["node:query_generator"]["calls"] == [0, 1]
    assert gv.node_names(agent) == ["planner", "retrieve", "finish", "exact_match"]
    assert labelled_edges(agent) == {
        ("planner", "retrieve"): "0→0, 1→1", ("retrieve", "planner"): "0→1, 1→2", ("retrieve", "retrieve"): "0→1",
        ("planner", "finish"): "2→0", ("finish", "exact_match"): ""}
    for g, node, params in ((rag, "answer_generator", 3), (hop, "query_generator", 2), (agent, "planner", 3)):
        assert sum(1 for u, v in g.in_edges(f"node:{node}") if g.nodes[u]["kind"] == "parameter") == params
    # every sample failed, so feedback reached the first LLM node of each graph
    for g, first in ((rag, "query_generator"), (hop, "query_generator"), (agent, "planner")):
        assert g.nodes[f"node:{first}"]["failing"] > 0


@pytest.mark.parametrize("name", list(TASKS))
def test_graph_page_renders_each_pipeline(name, trained, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from autodiff import graphview as gv
    from dashboard.graphview import external_resources
    from tests.test_dashboard_graph import drawing, drawn_nodes, graph_html
    store, runs = trained
    monkeypatch.setenv("AUTODIFF_STORE", store.spec)
    at = AppTest.from_file(str(PAGES / "graph.py"), default_timeout=60)
    at.session_state["run_id"] = runs[name]
    at.run()
    assert not at.exception
    page = graph_html(at)
    assert external_resources(page) == []
    names = gv.node_names(stored_graph(store, runs[name]))
    assert at.selectbox(key="graph_node").options == names
    assert set(drawn_nodes(drawing(page))) >= {f"node:{node}" for node in names}
    for node in names:
        at.selectbox(key="graph_node").select(node).run()
        assert not at.exception
