"""Stores filled by real engine runs on a scripted fake LLM, for dashboard tests and benchmarks.

The fake answers like each role would: the counter node answers wrong for some questions, the
backward engine writes feedback that contains hostile HTML (to prove it is escaped everywhere),
and the optimizer proposes values that get better, so proposals reach every stage.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from pathlib import Path

from autodiff.config import make_config
from autodiff.llm.fake import FakeProvider
from autodiff.llm.types import Request
from autodiff.runner import train
from autodiff.store import Store

# Prices for the scripted models (USD per million input and output tokens), so runs have costs to show.
FAKE_PRICES = {"fake:forward": (0.15, 0.6), "fake:backward": (2.5, 10.0), "fake:optimizer": (2.5, 10.0)}
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
BETTER = "Count every item, including items written as number words like 'two'."
_versions = itertools.count(1)


def responder(request: Request) -> str:
    system = request.messages[0].content if len(request.messages) > 1 else ""
    text = request.messages[-1].content
    if "proposal blocks" in system:
        n = next(_versions)
        return (
            "<proposal><method>add</method><reasoning>count number words</reasoning>"
            f"<value>{BETTER} Version {n}. {HOSTILE}</value></proposal>"
            "<proposal><method>rephrase</method><reasoning>shorter</reasoning>"
            "<value>Count things.</value></proposal>"
        )
    if "<feedback>" in system or "feedback only" in system:
        return f"<feedback>The count missed items written as words. {HOSTILE}</feedback>"
    question = text.rsplit("Question:", 1)[-1]
    numbers = {"two": 2, "three": 3, "four": 4, "five": 5}
    if BETTER in text:
        return "Answer: " + str(_true_count(question, numbers))
    return "Answer: " + str(len(re.findall(r",", question)) + 1)


def _true_count(question: str, numbers: dict[str, int]) -> int:
    items = re.split(r",\s*(?:and\s+)?|\s+and\s+", question.split("How many")[0].replace("I have", ""))
    total = 0
    for item in items:
        words = item.strip().split()
        if words:
            total += numbers.get(words[0], 1)
    return total


def fake_run(store: Store, cache: Path, *, steps: int = 2, review: str = "off", task: str = "object_counting",
             decide=None, **options) -> str:
    """Run the real trainer on the scripted fake. With `decide`, a thread answers review requests:
    decide(store, proposal) -> (decision, value)."""
    stop = threading.Event()
    if decide is not None:
        threading.Thread(target=_reviewer, args=(store, decide, stop), daemon=True).start()
    options.setdefault("prices", FAKE_PRICES)
    try:
        return train(store, make_config(task=task, forward_model="fake:forward", backward_model="fake:backward", optimizer_model="fake:optimizer", steps=steps, batch_size=4, val_limit=12, test_limit=12, review=review, review_timeout=30, **options), cache_path=cache, providers={"fake": FakeProvider(responder)})
    finally:
        stop.set()


def _reviewer(store: Store, decide, stop: threading.Event) -> None:
    while not stop.is_set():
        for run in store.runs():
            for p in store.proposals(run.id, fate="pending"):
                if store.decision(p.id) is None:
                    decision, value = decide(store, p)
                    store.decide(p.id, decision, value)
        time.sleep(0.05)


def alternate_decisions():
    """Reject the first pending proposal, accept the next, and so on."""
    count = {"n": 0}

    def decide(store, proposal):
        count["n"] += 1
        return ("reject" if count["n"] % 2 else "accept"), None

    return decide


def filled_store(path: Path) -> tuple[Store, list[str]]:
    """A store with an auto run and a review run (accept and reject decisions recorded)."""
    store = Store(path / "runs.sqlite")
    cache = path / "cache.sqlite"
    auto = fake_run(store, cache, steps=2)
    reviewed = fake_run(store, cache, steps=2, review="validated", decide=alternate_decisions(), seed=1)
    return store, [auto, reviewed]
