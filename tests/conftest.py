"""Shared fixtures for the engine tests: a temporary store per test, a scripted fake LLM, and a
tiny task that a whole training run can be driven through in a fraction of a second.

The toy task: add two numbers. Each sample carries a difficulty; the scripted forward model
answers a sample correctly when the prompt's `LEVEL=<n>` is at least that difficulty; the
marker `TRAINONLY` makes it right on training samples and wrong elsewhere (a value that
over-fits the mini-batch). So a test picks the optimizer's proposals and knows exactly how each
one scores on the mini-batch and on validation.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest

from autodiff.config import make_config
from autodiff.evals import exact_match
from autodiff.graph import LLMNode, Loss, Value
from autodiff.llm.client import LLM, RetryPolicy
from autodiff.llm.fake import FakeProvider
from autodiff.llm.types import Request
from autodiff.parameter import Parameter
from autodiff.pipeline import Pipeline, Task
from autodiff.prompts import BACKWARD_SYSTEM, OPTIMIZER_SYSTEM
from autodiff.records import CallSummary, LLMCall, Proposal, Run
from autodiff.store import Store

# The toy task by name, as `load_task` (and so `runner.resume`) finds it: file.py:factory.
TOY_TASK = f"{Path(__file__).resolve()}:toy_task"
FAST_RETRY = RetryPolicy(attempts=3, initial_wait=0, max_wait=0)

INSTRUCTION = "Add the two numbers in the question. LEVEL=1"
OUTPUT_FORMAT = "End with a line 'Answer: <number>'."
EXAMPLES = "Question: What is 1 + 1?\nAnswer: 2"

# Difficulties: at LEVEL=1 the model gets 3 of 8 train, 5 of 10 val, 3 of 6 test samples right.
TRAIN_DIFFICULTY = (1, 2, 1, 2, 3, 1, 2, 3)
VAL_DIFFICULTY = (1, 1, 1, 1, 1, 2, 2, 2, 3, 3)
TEST_DIFFICULTY = (1, 1, 1, 2, 2, 3)


class ToyAdder(Pipeline):
    def __init__(self, examples_trainable: bool = False) -> None:
        self.instruction = Parameter("toy.instruction", INSTRUCTION, kind="instruction",
                                     role="Tells the model what to compute.")
        self.output_format = Parameter("toy.output_format", OUTPUT_FORMAT, kind="output_format",
                                       must_keep=("Answer:",), role="The reply layout the parser reads.")
        self.examples = Parameter("toy.examples", EXAMPLES, kind="examples", trainable=examples_trainable,
                                  role="One worked example.")
        self.solver = LLMNode(
            "solver", [self.instruction, self.output_format, self.examples],
            template="{{instruction}}\n{{output_format}}\n\n{{examples}}\n\nQuestion: {{question}}",
            parse=parse_answer,
        )

    def forward(self, sample: dict) -> Value:
        return self.solver(question=sample["question"])


def parse_answer(text: str) -> str:
    found = re.findall(r"Answer:\s*(-?\d+)", text)
    return found[-1] if found else text.strip()


def toy_samples(split: str, difficulties: Sequence[int]) -> list[dict]:
    out = []
    for i, d in enumerate(difficulties):
        a, b = 3 * i + 2, 5 * i + len(split)
        out.append({"id": f"{split}-{i:02d}", "question": f"What is {a} + {b}? [difficulty {d}] [split {split}]",
                    "answer": str(a + b)})
    return out


def toy_task(examples_trainable: bool = False) -> Task:
    return Task(
        "toy", ToyAdder(examples_trainable), Loss(exact_match, "exact_match"),
        {"train": toy_samples("train", TRAIN_DIFFICULTY), "val": toy_samples("val", VAL_DIFFICULTY),
         "test": toy_samples("test", TEST_DIFFICULTY)},
        tau=1.0,
    )


# --- the scripted model ------------------------------------------------------------------------

def kind_of(request: Request) -> str:
    """Which role a request is for: 'backward', 'optimizer' or 'forward'."""
    system = next((m.content for m in request.messages if m.role == "system"), "")
    if system == BACKWARD_SYSTEM:
        return "backward"
    if system == OPTIMIZER_SYSTEM:
        return "optimizer"
    return "forward"


def user_text(request: Request) -> str:
    return "\n".join(m.content for m in request.messages if m.role == "user")


def proposal(value: str, method: str = "rephrase", reasoning: str = "The feedback asks for it.") -> str:
    """One well-formed proposal block, as the optimizer is asked to write it."""
    return f"<proposal>\n<method>{method}</method>\n<reasoning>{reasoning}</reasoning>\n<value>{value}</value>\n</proposal>"


def toy_forward(prompt: str) -> str:
    question = prompt.rsplit("Question: ", 1)[-1]
    m = re.search(r"What is (\d+) \+ (\d+)\? \[difficulty (\d+)\] \[split (\w+)\]", question)
    if not m:
        return "Answer: 0"
    a, b, difficulty, split = int(m[1]), int(m[2]), int(m[3]), m[4]
    level = int(re.search(r"LEVEL=(\d+)", prompt)[1]) if "LEVEL=" in prompt else 0
    right = difficulty <= level
    if "TRAINONLY" in prompt:
        right = split == "train"
    return f"The sum is computed.\nAnswer: {a + b if right else a + b + 1}"


def target_parameter(prompt: str) -> str:
    m = re.search(r"Target parameter: `([^`]+)`", prompt)
    return m[1] if m else "?"


def current_value(prompt: str) -> str:
    m = re.search(r"<current_value>\n(.*?)\n</current_value>", prompt, re.S)
    return m[1] if m else ""


@dataclass
class Script:
    """A responder for FakeProvider that plays all three roles.

    `proposals` maps a parameter name to the optimizer replies for it, used one per optimizer
    call; once they run out (or for a parameter not named) the optimizer echoes the current value,
    which the pre-validation check rejects. `backward` is the backward model's reply (text or a
    function of the prompt); `forward` answers the pipeline's own calls. Every prompt is kept in
    `prompts` as (kind, text), in the order received.
    """

    proposals: dict[str, list[str]] = field(default_factory=dict)
    backward: str | Callable[[str], str] = "<feedback>The sum is off by one; add the numbers carefully.</feedback>"
    forward: Callable[[str], str] = toy_forward
    prompts: list[tuple[str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, request: Request) -> str:
        kind, prompt = kind_of(request), user_text(request)
        with self._lock:
            self.prompts.append((kind, prompt))
        if kind == "backward":
            return self.backward(prompt) if callable(self.backward) else self.backward
        if kind == "optimizer":
            queue = self.proposals.get(target_parameter(prompt))
            with self._lock:
                if queue:
                    return queue.pop(0)
            return proposal(current_value(prompt))
        return self.forward(prompt)

    def of_kind(self, kind: str) -> list[str]:
        return [p for k, p in self.prompts if k == kind]


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """No real key or endpoint may reach a test; the tests that need one set it themselves."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def postgres() -> Iterator["postgres_server.Server"]:  # noqa: F821 - imported here, see below
    """The session's PostgreSQL server (see tests/postgres_server.py). Without one the tests that
    need it are skipped, with the reason; in CI (CI=true) they fail instead."""
    # Imported here: this file is also loaded on its own, as the toy task's module, by processes
    # that have no `tests` package on their path.
    from tests import postgres_server

    try:
        yield from postgres_server.server()
    except postgres_server.Unavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required in CI: {exc}")
        pytest.skip(f"no PostgreSQL server: {exc}")


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh, empty store of this test's own, once on each backend: a SQLite file in tmp_path,
    and a database of its own on the session's PostgreSQL server."""
    if request.param == "sqlite":
        yield Store(tmp_path / "runs.sqlite")
        return
    server = request.getfixturevalue("postgres")
    url = server.new_database()
    opened = Store(url)
    try:
        yield opened
    finally:
        opened.close()
        server.drop(url)


@dataclass
class FakeLLM:
    llm: LLM
    provider: FakeProvider
    calls: list[LLMCall]

    def phase(self, phase: str) -> list[LLMCall]:
        return [c for c in self.calls if c.phase == phase]


@pytest.fixture
def make_llm() -> Callable[..., FakeLLM]:
    """make_llm(responder, latency=0.0, cache=None) -> FakeLLM: an LLM over a scripted fake that
    records every call it makes in `.calls`."""

    def make(responder=None, latency: float = 0.0, cache=None, spec: str = "fake:test") -> FakeLLM:
        provider = FakeProvider(responder if responder is not None else Script(), latency=latency)
        calls: list[LLMCall] = []
        lock = threading.Lock()

        def record(call: LLMCall) -> None:
            with lock:
                calls.append(call)

        llm = LLM(spec, provider, cache=cache, recorder=record, retry=FAST_RETRY)
        return FakeLLM(llm, provider, calls)

    return make


@dataclass
class ToyRun:
    store: Store
    run_id: str
    provider: FakeProvider
    script: Script
    error: BaseException | None = None

    @property
    def record(self) -> Run:
        return self.store.run(self.run_id)

    def calls(self, phase: str | None = None, step: int | None = None) -> list[CallSummary]:
        return [c for c in self.store.call_summaries(self.run_id)
                if (phase is None or c.phase == phase) and (step is None or c.step == step)]

    def proposals(self, parameter: str | None = None, step: int | None = None) -> list[Proposal]:
        return [p for p in self.store.proposals(self.run_id, step=step)
                if parameter is None or p.parameter == parameter]

    def values(self, step: int | None = None) -> dict[str, str]:
        last = self.store.last_completed_step(self.run_id) if step is None else step
        return self.store.parameter_values_at(self.run_id, last)


TOY_DEFAULTS = dict(
    task=TOY_TASK, forward_model="fake:fwd", backward_model="fake:bwd", optimizer_model="fake:opt",
    steps=1, batch_size=8, max_failed=4, positives=2, proposals=1, concurrency=4, min_gain=0.01,
)


@pytest.fixture
def run_toy(tmp_path: Path, store: Store) -> Callable[..., ToyRun]:
    """run_toy(script=None, *, latency=0.0, raises=True, provider=None, **config) -> ToyRun.

    Trains the toy task end to end through `autodiff.runner.train` against a scripted fake, with
    this test's store and a cache in tmp_path. Config options override TOY_DEFAULTS. With
    `raises=False` an error ends the run but is returned in `.error` instead of raised.
    """
    from autodiff import runner

    counter = iter(range(1_000_000))

    def run(script: Script | None = None, *, latency: float = 0.0, raises: bool = True,
            provider: FakeProvider | None = None, cache_path: Path | None = None, **config) -> ToyRun:
        script = script or Script()
        provider = provider or FakeProvider(script, latency=latency)
        run_id = config.pop("run_id", None) or f"toy-{next(counter)}"
        progress = config.pop("progress", None)
        options = {**TOY_DEFAULTS, **config}
        result = ToyRun(store, run_id, provider, script)
        try:
            runner.train(store, make_config(**options), run_id=run_id, providers={"fake": provider},
                         cache_path=cache_path or tmp_path / "cache.sqlite", retry=FAST_RETRY, progress=progress)
        except BaseException as exc:  # noqa: BLE001 - tests inspect what stopped the run
            if raises:
                raise
            result.error = exc
        return result

    return run
