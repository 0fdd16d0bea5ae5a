"""A task that queued-run tests hand to real `autodiff worker` processes.

A worker loads a run's task by the name the run recorded, so this one is named by its file
(`/abs/path/tests/worker_task.py:make`). Its models are the scripted fake (`fake:...`, which a
worker builds by name and which answers "ok"), so no run needs a real LLM; its forward pass
is BBH object counting followed by a function node that waits `delay` seconds per sample, so a
step lasts long enough for a test to kill or stop a worker in the middle of it.
"""

from __future__ import annotations

import time
from pathlib import Path

from autodiff.graph import Value, function_node
from autodiff.pipeline import Task
from autodiff.tasks import object_counting

PATH = Path(__file__).resolve()
NAME = f"{PATH}:make"


def _wait(answer: str, delay: float) -> str:
    time.sleep(delay)
    return answer


class SlowCounting(object_counting.ObjectCounting):
    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.wait = function_node(_wait)

    def forward(self, sample: dict) -> Value:
        return self.wait(self.counter(question=sample["question"]), delay=self.delay)


def make(delay: str = "0.05") -> Task:
    """Object counting, `delay` seconds slower per forward pass (task args arrive as strings)."""
    base = object_counting.load()
    return Task("slow_counting", SlowCounting(float(delay)), base.loss, base.splits, tau=base.tau)
