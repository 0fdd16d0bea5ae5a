"""Backward: pass-through of function nodes, per-call gradients, one gradient per trainable peer."""

from __future__ import annotations

from autodiff.backward import BackwardContext, backward, parse_feedback
from autodiff.evals import exact_match
from autodiff.graph import LLMNode, Loss, Value, function_node
from autodiff.optimizer import format_gradients
from autodiff.parameter import Parameter
from autodiff.pipeline import Pipeline, Task, run_sample
from conftest import kind_of, user_text

LOSS_TEXT = "The answer should be Paris, not Lyon."
INPUT_TEXT = "The context never mentions the capital: search for the capital of France."


def _context(pipeline: Pipeline, sample: dict) -> BackwardContext:
    return BackwardContext("run", 1, {p.name: p for p in pipeline.parameters()}, sample["question"],
                           sample["answer"])


def _task(pipeline: Pipeline, sample: dict) -> Task:
    return Task("t", pipeline, Loss(exact_match, "exact_match"), {"train": [sample], "val": [sample],
                                                                  "test": [sample]})


def _backward_reply(prompt: str) -> str:
    """A distinct, recognisable gradient for each kind of backward prompt."""
    if "One of its inputs" in prompt:
        return f"<feedback>{INPUT_TEXT}</feedback>"
    if "Your target is the peer `" in prompt:
        target = prompt.split("Your target is the peer `", 1)[1].split("`", 1)[0]
        return f"<feedback>Change {target}.</feedback>"
    return f"<feedback>{LOSS_TEXT}</feedback>"


# --- 1. pass-through ---------------------------------------------------------------------------

def clean_query(query: str) -> str:
    return query.strip().rstrip("?")


def format_context(query: str) -> str:
    return f"Search results for: {query}"


class QueryThenAnswer(Pipeline):
    """LLM -> function -> function -> LLM."""

    def __init__(self) -> None:
        self.query_instruction = Parameter("query.instruction", "Write a search query.", role="Query writing.")
        self.answer_instruction = Parameter("answer.instruction", "Answer from the context.", role="Answering.")
        self.answer_format = Parameter("answer.format", "Reply with the answer only.", kind="output_format",
                                       role="Reply layout.")
        self.query = LLMNode("query", [self.query_instruction])
        self.clean = function_node(clean_query)
        self.format = function_node(format_context)
        self.answer = LLMNode("answer", [self.answer_instruction, self.answer_format])

    def forward(self, sample: dict) -> Value:
        query = self.query(question=sample["question"])
        context = self.format(self.clean(query))
        return self.answer(question=sample["question"], context=context)


def test_gradients_pass_through_function_nodes_unchanged(make_llm) -> None:
    def reply(request):
        if kind_of(request) == "backward":
            return _backward_reply(user_text(request))
        return "weather in Lyon?" if "Write a search query" in user_text(request) else "Lyon"

    fake = make_llm(reply)
    pipeline = QueryThenAnswer()
    sample = {"id": "s1", "question": "What is the capital of France?", "answer": "Paris"}
    trace, evaluation = run_sample(_task(pipeline, sample), sample, fake.llm, run_id="run", step=1)
    assert evaluation.score == 0.0
    inv = {i.node: i for i in trace.invocations}

    grads = backward(trace, fake.llm, _context(pipeline, sample))

    # The answer node's gradient on its `context` input is aimed at the formatter's output.
    [on_context] = [g for g in grads if g.node == "answer" and g.target_type == "output"]
    assert on_context.text == INPUT_TEXT and on_context.target_invocation == inv["format_context"].id
    # Each function node hands it on with the same text and call link, its own name added to the path.
    [through_format] = [g for g in grads if g.node == "format_context"]
    [through_clean] = [g for g in grads if g.node == "clean_query"]
    assert through_format.target_invocation == inv["clean_query"].id
    assert through_clean.target_invocation == inv["query"].id and through_clean.target == "query"
    for g in (through_format, through_clean):
        assert g.text == on_context.text and g.llm_call_id == on_context.llm_call_id
        assert g.source_node == "answer"
    assert through_format.path == ("format_context",)
    assert through_clean.path == ("format_context", "clean_query")
    # ... and reaches the query generator's parameter, whose backward prompt shows where it came from.
    [on_query] = [g for g in grads if g.target == "query.instruction"]
    assert on_query.text == "Change query.instruction." and on_query.invocation_id == inv["query"].id
    query_prompt = fake.provider.requests[-1][1]
    assert "Your target is the peer `query.instruction`" in user_text(query_prompt)
    assert f"from answer via format_context -> clean_query: {INPUT_TEXT}" in user_text(query_prompt)

    # Function nodes cost no backward calls: loss + 2 answer peers + 1 answer input + 1 query peer.
    backward_calls = fake.phase("backward")
    assert len(backward_calls) == 5
    assert sorted(c.node for c in backward_calls) == ["answer", "answer", "answer", "exact_match", "query"]
    assert {g.llm_call_id for g in grads} == {c.id for c in backward_calls}


# --- 2. repeated calls -------------------------------------------------------------------------

class ThreeHops(Pipeline):
    def __init__(self) -> None:
        self.instruction = Parameter("hop.instruction", "Improve the notes.", role="How one hop refines notes.")
        self.hop = LLMNode("hop", [self.instruction])

    def forward(self, sample: dict) -> Value:
        notes = "start"
        for _ in range(3):
            notes = self.hop(question=sample["question"], notes=notes)
        return notes


def _hop_reply(request) -> str:
    prompt = user_text(request)
    if kind_of(request) == "backward":
        return _backward_reply(prompt) if "Your target" not in prompt else (
            "<feedback>Hop output " + prompt.split("<output>\n", 1)[1].split("\n", 1)[0] + " was weak.</feedback>")
    for previous, nxt in (("Notes: hop-1", "hop-2"), ("Notes: hop-0", "hop-1")):
        if previous in prompt:
            return nxt
    return "hop-0"


def test_repeated_node_gets_one_gradient_per_call_in_order(make_llm, store) -> None:
    fake = make_llm(_hop_reply)
    pipeline = ThreeHops()
    sample = {"id": "s1", "question": "Who?", "answer": "Ada"}
    trace, _ = run_sample(_task(pipeline, sample), sample, fake.llm, run_id="run", step=1)
    hops = [i for i in trace.invocations if i.node == "hop"]
    assert [h.call_index for h in hops] == [0, 1, 2] and [h.output for h in hops] == ["hop-0", "hop-1", "hop-2"]

    grads = backward(trace, fake.llm, _context(pipeline, sample))

    on_param = [g for g in grads if g.target == "hop.instruction"]
    assert sorted(g.call_index for g in on_param) == [0, 1, 2]
    for g in on_param:  # each gradient belongs to its own call, and says so
        assert g.invocation_id == hops[g.call_index].id
        assert g.text == f"Hop output hop-{g.call_index} was weak."
    # Each call's output gradient goes to the call before it.
    chained = [g for g in grads if g.node == "hop" and g.target_type == "output"]
    assert sorted((g.call_index, g.target_invocation) for g in chained) == [(1, hops[0].id), (2, hops[1].id)]
    # What each gradient is about is fixed when it is written: feedback on an output is about the
    # call that wrote it, feedback on a parameter about its own call.
    assert sorted((g.call_index, g.about_call) for g in chained) == [(1, 0), (2, 1)]
    assert all(g.about_call == g.call_index for g in on_param)

    # The backward prompt says the calls are successive and which one is being judged.
    param_prompts = [user_text(r) for _, r in fake.provider.requests if "Your target is the peer" in user_text(r)]
    assert len(param_prompts) == 3
    for k in range(3):
        assert any(f"This is call {k} (0-based) of 3 successive calls" in p and f"<output>\nhop-{k}\n" in p
                   for p in param_prompts)

    # Stored and handed to the optimizer per call index, in order.
    store.create_run("run", "t", {}, {})
    store.add_gradients("run", 1, grads)
    stored = [g for g in store.gradients("run", 1) if g.target == "hop.instruction"]
    assert sorted(g.call_index for g in stored) == [0, 1, 2]
    total, about_first = store.find_gradients("run", call_index=0)
    assert {g.id for g in about_first} == {g.id for g in grads if g.about_call == 0} and total == len(about_first)
    text = format_gradients(on_param)
    assert text.index("[call 0]") < text.index("[call 1]") < text.index("[call 2]")


# --- 3. peers ----------------------------------------------------------------------------------

class ThreePeers(Pipeline):
    def __init__(self) -> None:
        self.instruction = Parameter("solve.instruction", "Solve it.", role="The task.")
        self.output_format = Parameter("solve.format", "Answer: <x>", kind="output_format", role="Layout.")
        self.examples = Parameter("solve.examples", "Q: 1+1 A: 2", kind="examples", trainable=False, role="Demo.")
        self.solve = LLMNode("solve", [self.instruction, self.output_format, self.examples])

    def forward(self, sample: dict) -> Value:
        return self.solve(question=sample["question"])


def test_each_trainable_peer_gets_its_own_backward_call(make_llm) -> None:
    fake = make_llm(lambda r: _backward_reply(user_text(r)) if kind_of(r) == "backward" else "3")
    pipeline = ThreePeers()
    sample = {"id": "s1", "question": "1+1?", "answer": "2"}
    trace, _ = run_sample(_task(pipeline, sample), sample, fake.llm, run_id="run", step=1)

    grads = backward(trace, fake.llm, _context(pipeline, sample))

    on_params = [g for g in grads if g.target_type == "parameter"]
    assert sorted(g.target for g in on_params) == ["solve.format", "solve.instruction"]
    assert len({g.llm_call_id for g in on_params}) == 2  # one call each
    for g in on_params:
        assert g.text == f"Change {g.target}."
    prompts = [user_text(r) for _, r in fake.provider.requests if "Your target is the peer" in user_text(r)]
    assert len(prompts) == 2 and not any("peer `solve.examples`" in p for p in prompts)
    # The peers are shown read-only: every other peer's value, and not the target's own.
    [for_instruction] = [p for p in prompts if "peer `solve.instruction`" in p]
    peers_block = for_instruction.split("<peers>", 1)[1].split("</peers>", 1)[0]
    assert '<peer name="solve.format">\nAnswer: <x>\n</peer>' in peers_block
    assert '<peer name="solve.examples">\nQ: 1+1 A: 2\n</peer>' in peers_block
    assert 'name="solve.instruction"' not in peers_block


def test_garbage_backward_replies_give_empty_gradients_with_a_reason(make_llm) -> None:
    # A garbage backward reply gives an empty gradient with a reason, never an exception.
    for reply, reason in (("", "empty"), ("<feedback>  </feedback>", "empty"), ("</feedback>", "empty"),
                          ("%%% ### !!!", "no usable text")):
        text, error = parse_feedback(reply)
        assert text == "" and reason in error
    assert parse_feedback("<feedback>Count the apples.</feedback> extra") == ("Count the apples.", None)
    assert parse_feedback("Count the apples.") == ("Count the apples.", None)  # lenient with no tags
    assert parse_feedback("<feedback>Count the apples.") == ("Count the apples.", None)

    fake = make_llm(lambda r: "%%%" if kind_of(r) == "backward" else "3")
    pipeline = ThreePeers()
    sample = {"id": "s1", "question": "1+1?", "answer": "2"}
    trace, _ = run_sample(_task(pipeline, sample), sample, fake.llm)
    grads = backward(trace, fake.llm, _context(pipeline, sample))
    assert grads and all(g.text == "" and "no usable text" in g.error for g in grads)
