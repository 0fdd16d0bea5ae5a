"""HotPotQA pipelines: RAG, multi-hop RAG (one query generator called in a loop) and a ReAct agent.

All three search a BM25 index over the context paragraphs of the whole bundled subset, so the
retriever really searches (about 10,000 passages) instead of looking up the gold paragraphs.
Splits are fixed: the subset keeps the upstream train / dev / test blocks (rows 0-299, 300-599,
600-999); we draw 100 train, 100 validation and 200 test questions from them with a fixed seed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from autodiff.errors import DataError
from autodiff.evals import exact_match, f1
from autodiff.graph import LLMNode, Loss, Value, function_node
from autodiff.parameter import Parameter
from autodiff.pipeline import Pipeline, Task
from autodiff.tasks.data import DATA_DIR, read_jsonl, seeded_split
from autodiff.tasks.retrieval import BM25Index, LazyIndex, Passage, build_corpus, make_dedupe, make_retriever

DATA_FILE = DATA_DIR / "hotpotqa" / "dev_subset.jsonl"
BLOCKS = {"train": (0, 300, 100), "val": (300, 600, 100), "test": (600, 1000, 200)}  # start, end, size
METRICS = {"exact_match": exact_match, "f1": f1}

# --- data ---------------------------------------------------------------------------------------


def read_rows(path: Path = DATA_FILE) -> list[dict]:
    rows = read_jsonl(path, required=("id", "question", "answer", "context"))
    for lineno, row in enumerate(rows, 1):
        ctx = row["context"]
        if not isinstance(ctx, list) or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], list) for p in ctx
        ):
            raise DataError(f"{path}: row {lineno}: 'context' must be a list of [title, [sentence, ...]]")
    return rows


def paragraphs(row: dict) -> list[tuple[str, str]]:
    return [(title, "".join(sentences).strip()) for title, sentences in row["context"]]


def load_splits(path: Path = DATA_FILE, with_passages: bool = False) -> dict[str, list[dict]]:
    """The fixed splits. A sample has id, question, answer, type and the titles of its supporting
    paragraphs; `with_passages` adds the question's own ten context paragraphs as 'Title: text'."""
    rows = read_rows(path)
    if len(rows) < max(end for _, end, _ in BLOCKS.values()):
        raise DataError(f"{path} has {len(rows)} rows; the HotPotQA tasks expect the 1,000-row subset")
    splits = {}
    for split, (start, end, size) in BLOCKS.items():
        (chosen,) = seeded_split(rows[start:end], (size,))
        splits[split] = [_sample(row, with_passages) for row in chosen]
    return splits


def _sample(row: dict, with_passages: bool) -> dict:
    sample = {
        "id": row["id"], "question": row["question"], "answer": row["answer"], "type": row.get("type", ""),
        "supporting_titles": list(dict.fromkeys(t for t, _ in row.get("supporting_facts", []))),
    }
    if with_passages:
        sample["passages"] = [str(Passage(t, p)) for t, p in paragraphs(row)]
    return sample


def corpus_index(path: Path = DATA_FILE) -> BM25Index:
    """BM25 over every context paragraph of the subset; built on first use, then kept per process."""
    return lazy_corpus_index(path).built()


def lazy_corpus_index(path: Path = DATA_FILE) -> LazyIndex:
    """The same index, built on the pipeline's first search rather than when the task loads."""
    path = Path(path).resolve()
    return LazyIndex(str(path), lambda: build_corpus(p for row in read_rows(path) for p in paragraphs(row)))


# --- parsers: weak models reply with anything, so each has a fallback and never raises ----------


def _clean(text: str, limit: int = 200) -> str:
    return text.strip().strip("*`\"' ").rstrip(".").strip()[:limit]


def _first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


def parse_query(text: str) -> str:
    """The search words after the first 'Query:', else the first non-empty line."""
    marked = re.search(r"query\s*:\s*(.+)", text, re.I)
    return _clean(marked.group(1) if marked else _first_line(text))


def parse_answer(text: str) -> str:
    """The short answer after the last 'Answer:', else the first non-empty line."""
    marked = re.findall(r"answer\s*:\s*(.+)", text, re.I)
    return _clean(marked[-1] if marked else _first_line(text))


@dataclass(frozen=True)
class Action:
    """One planner decision: a tool name and its argument."""

    tool: str  # retrieve | finish
    argument: str

    def __str__(self) -> str:
        return f"{self.tool}({self.argument})"


_TOOL_ALIASES = {"retrieve": "retrieve", "search": "retrieve", "finish": "finish", "answer": "finish"}
_AFTER_MARKER = re.compile(r"^\W*(retrieve|search|finish|answer)\b\s*[(\[:]?\s*(.*)$", re.I)
_CALL = re.compile(r"\b(retrieve|search|finish)\s*[(\[]\s*(.*)$", re.I)
_PLACEHOLDERS = ("query", "answer", "<query>", "<answer>", "argument", "<argument>", "...", "")


def _argument(raw: str) -> str:
    """The text inside the call's brackets (up to the last closing one, if any)."""
    close = max(raw.rfind(")"), raw.rfind("]"))
    return _clean(raw[:close] if close >= 0 else raw)


def parse_action(text: str) -> Action:
    """Read 'Action: tool(argument)'. A reply with no recognisable action becomes finish() on its
    first line (or its 'Answer:'), so garbage ends the loop instead of crashing it."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    for line in lines:
        if "action" in line.lower():
            after = re.split(r"action\s*\d*\s*:", line, flags=re.I)[-1]
            m = _AFTER_MARKER.match(after)
            if m and _argument(m.group(2)).lower() not in _PLACEHOLDERS:
                return Action(_TOOL_ALIASES[m.group(1).lower()], _argument(m.group(2)))
    for line in lines:
        m = _CALL.search(line)
        if m and _argument(m.group(2)).lower() not in _PLACEHOLDERS:  # skip echoes like "retrieve(query)"
            return Action(_TOOL_ALIASES[m.group(1).lower()], _argument(m.group(2)))
    if re.search(r"answer\s*:", text or "", re.I):
        return Action("finish", parse_answer(text))
    return Action("finish", _clean(lines[0]) if lines else "")


# --- prompts (our own text) ---------------------------------------------------------------------

QUERY_INSTRUCTION = (
    "Write a search query that finds the Wikipedia paragraphs needed to answer the question. "
    "Use the names, titles and key terms the question mentions."
)
HOP_QUERY_INSTRUCTION = (
    "You search a collection of Wikipedia paragraphs in two hops to answer a question that links two facts. "
    "If no passages are shown yet, search for the entity the question names first. If passages are shown, "
    "search for the fact that is still missing, using the names found in them."
)
QUERY_FORMAT = "Reply with one line of the form 'Query: <search words>'."
ANSWER_INSTRUCTION = (
    "Answer the question using only the passages. Many questions need two facts from different passages: "
    "find both and combine them."
)
ANSWER_FORMAT = (
    "Reason in one or two short sentences, then write a last line of the form 'Answer: <answer>'. "
    "The answer is a short span, such as a name, a date, a number, or yes or no, with no other words."
)
ANSWER_EXAMPLES = (
    "Passages:\n"
    "[1] Lake Tahoe: Lake Tahoe is a large freshwater lake in the Sierra Nevada.\n"
    "[2] Sierra Nevada: The Sierra Nevada is a mountain range in the western United States, mostly in California.\n"
    "Question: Lake Tahoe lies in a mountain range that is mostly in which state?\n"
    "Reasoning: [1] puts Lake Tahoe in the Sierra Nevada and [2] says that range is mostly in California.\n"
    "Answer: California\n\n"
    "Passages:\n"
    "[1] Danube: The Danube is a river of Central and Eastern Europe, about 2,850 km long.\n"
    "[2] Rhine: The Rhine is a European river about 1,230 km long.\n"
    "Question: Is the Danube longer than the Rhine?\n"
    "Reasoning: 2,850 km [1] is more than 1,230 km [2].\n"
    "Answer: yes"
)
PLANNER_INSTRUCTION = (
    "You answer a question by searching a collection of Wikipedia paragraphs, one action per turn. "
    "Search for each fact the question needs, read the results, then finish with the answer. "
    "Reply with exactly one line of the form 'Action: <tool>(<argument>)'."
)
TOOL_RETRIEVE = (
    "retrieve(query): searches the paragraphs for the query words and returns the best matches. "
    "Use names and key terms; search again with other words if the results miss the fact."
)
TOOL_FINISH = (
    "finish(answer): ends the task with the final answer, a short span such as a name, a date, "
    "a number, or yes or no."
)
NO_PASSAGES = "(none yet)"
NO_STEPS = "(none yet)"


def query_parameters(instruction: str) -> list[Parameter]:
    return [
        Parameter("query_generator.instruction", instruction, kind="instruction",
                  role="Tells the model what search query to write for the question."),
        Parameter("query_generator.output_format", QUERY_FORMAT, kind="output_format", must_keep=("Query:",),
                  role="Layout of the reply; the parser reads the search words after 'Query:'."),
    ]


def answer_generator() -> LLMNode:
    return LLMNode(
        "answer_generator",
        [
            Parameter("answer_generator.instruction", ANSWER_INSTRUCTION, kind="instruction",
                      role="Tells the model how to answer the question from the retrieved passages."),
            Parameter("answer_generator.output_format", ANSWER_FORMAT, kind="output_format", must_keep=("Answer:",),
                      role="Layout of the reply and the shape of the answer; the parser reads the text after "
                           "the last 'Answer:' and scores it by exact match."),
            Parameter("answer_generator.examples", ANSWER_EXAMPLES, kind="examples",
                      role="Worked examples: passages, a question, short reasoning and the answer line."),
        ],
        template="{{instruction}}\n{{output_format}}\n\nExamples:\n{{examples}}\n\n"
                 "Passages:\n{{context}}\nQuestion: {{question}}",
        parse=parse_answer,
    )


# --- pipelines ----------------------------------------------------------------------------------


class RAG(Pipeline):
    """query generator -> retriever -> dedupe -> answer generator."""

    def __init__(self, index: BM25Index | LazyIndex, k: int = 3) -> None:
        self.query_generator = LLMNode(
            "query_generator", query_parameters(QUERY_INSTRUCTION),
            template="{{instruction}}\n{{output_format}}\n\nQuestion: {{question}}", parse=parse_query, max_tokens=64,
        )
        self.retriever = make_retriever(index, k)
        self.dedupe = make_dedupe()
        self.answer_generator = answer_generator()

    def forward(self, sample: dict) -> Value:
        query = self.query_generator(question=sample["question"])
        context = self.dedupe(self.retriever(query))
        return self.answer_generator(context=context, question=sample["question"])


class MultiHopRAG(Pipeline):
    """The same query generator called once per hop; each hop sees the passages found so far."""

    def __init__(self, index: BM25Index | LazyIndex, k: int = 3, hops: int = 2) -> None:
        self.query_generator = LLMNode(
            "query_generator", query_parameters(HOP_QUERY_INSTRUCTION),
            template="{{instruction}}\n{{output_format}}\n\nPassages found so far:\n{{context}}\n\n"
                     "Question: {{question}}",
            parse=parse_query, max_tokens=64,
        )
        self.retriever = make_retriever(index, k)
        self.dedupe = make_dedupe()
        self.answer_generator = answer_generator()
        self.hops = hops

    def forward(self, sample: dict) -> Value:
        question = sample["question"]
        context: Value | str = NO_PASSAGES
        for hop in range(self.hops):
            found = self.retriever(self.query_generator(question=question, context=context))
            context = self.dedupe(found, earlier=context) if hop else self.dedupe(found)
        return self.answer_generator(context=context, question=question)


class AgentRAG(Pipeline):
    """A ReAct loop: the planner picks retrieve(query) or finish(answer), up to `max_turns` times.

    Each retrieve call returns the history so far plus its own step, and that history is the
    next planner call's input: the trace holds planner[k] -> retrieve -> planner[k+1], so feedback
    on the answer passes through the tools back to the planner call that chose each of them.
    """

    def __init__(self, index: BM25Index | LazyIndex, k: int = 3, max_turns: int = 3) -> None:
        self.planner = LLMNode(
            "planner",
            [
                Parameter("planner.instruction", PLANNER_INSTRUCTION, kind="instruction", must_keep=("Action:",),
                          role="Tells the agent how to work through the question and how to write each action; "
                               "the parser reads 'Action: tool(argument)'."),
                Parameter("planner.tool_retrieve", TOOL_RETRIEVE, kind="other", must_keep=("retrieve(",),
                          role="Describes the retrieve tool to the agent: what it does and when to use it."),
                Parameter("planner.tool_finish", TOOL_FINISH, kind="other", must_keep=("finish(",),
                          role="Describes the finish tool to the agent: it ends the task with the final answer."),
            ],
            template="{{instruction}}\n\nTools:\n{{tool_retrieve}}\n{{tool_finish}}\n\nQuestion: {{question}}\n\n"
                     "Steps so far:\n{{history}}\n\n{{turn}}",
            parse=parse_action, max_tokens=96,
        )

        def retrieve(action: Action, history: tuple[str, ...] | str) -> tuple[str, ...]:
            found = index.search(action.argument, k)
            shown = "\n".join(f"  - {p}" for p in found) or "  (nothing found)"
            earlier = history if isinstance(history, tuple) else ()
            return (*earlier, f"{action} returned:\n{shown}")

        def finish(action: Action) -> str:
            return action.argument

        self.retrieve = function_node(retrieve, name="retrieve")
        self.finish = function_node(finish, name="finish")
        self.max_turns = max_turns

    def forward(self, sample: dict) -> Value:
        history: Value | str = NO_STEPS
        for turn in range(1, self.max_turns + 1):
            last = turn == self.max_turns
            note = f"Turn {turn} of {self.max_turns}." + (" This is the last turn: use finish." if last else "")
            action = self.planner(question=sample["question"], history=history, turn=note)
            if action.data.tool != "retrieve" or last:
                break  # out of turns, a retrieve's words are the best answer text there is
            history = self.retrieve(action, history)
        return self.finish(action)


# --- tasks --------------------------------------------------------------------------------------


def _task(name: str, pipeline: Pipeline, path: Path) -> Task:
    return Task(name, pipeline, Loss(exact_match, "exact_match"), load_splits(path), tau=1.0, metrics=dict(METRICS))


def load_rag(k: int = 3, path: Path = DATA_FILE) -> Task:
    return _task("rag", RAG(lazy_corpus_index(path), k), path)


def load_multihop_rag(k: int = 3, hops: int = 2, path: Path = DATA_FILE) -> Task:
    return _task("multihop_rag", MultiHopRAG(lazy_corpus_index(path), k, hops), path)


def load_agent_rag(k: int = 3, max_turns: int = 3, path: Path = DATA_FILE) -> Task:
    return _task("agent_rag", AgentRAG(lazy_corpus_index(path), k, max_turns), path)
