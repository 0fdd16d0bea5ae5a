"""One training step of each HotPotQA pipeline (and the example pipeline) on the scripted fake
provider: LLM calls and tokens by phase, read back from the run store.

    .venv/bin/python bench/pipeline_step.py [--val-limit N] [--test-limit N] [--batch-size N]

The fake answers a fixed third of the questions right (chosen by a hash of the question) and,
once an instruction carries the optimizer's marker, two thirds; so the step has failed samples
to send backward, proposals that pass the mini-batch, and full validation runs. Token counts are
the fake's whitespace word counts, not a real tokenizer's. Step 0 is the initial evaluation on
validation and test; step 1 is the training step, followed by the final test (recorded at step 1;
unchanged prompts hit the response cache there).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autodiff.config import make_config
from autodiff import runner  # noqa: E402
from autodiff.llm.fake import FakeProvider  # noqa: E402
from autodiff.llm.types import Request  # noqa: E402
from autodiff.prompts import BACKWARD_SYSTEM, OPTIMIZER_SYSTEM  # noqa: E402
from autodiff.store import Store  # noqa: E402
from autodiff.tasks.hotpotqa import load_splits  # noqa: E402

TASKS = ("rag", "multihop_rag", "agent_rag", "examples/summarize_then_answer.py:make_task")
PHASES = ("forward", "backward", "propose", "validate", "test")
MARK = "Prefer the exact span from the passages."


def make_responder(answers: dict[str, str]):
    def right(question: str, prompt: str) -> bool:
        bucket = int(hashlib.sha256(question.encode()).hexdigest(), 16) % 3
        return bucket == 0 or (bucket == 1 and MARK in prompt)

    def respond(request: Request) -> str:
        system = request.messages[0].content if len(request.messages) > 1 else ""
        prompt = request.messages[-1].content
        if system == BACKWARD_SYSTEM:
            return "<feedback>The answer named the wrong entity; copy the exact span the passages give.</feedback>"
        if system == OPTIMIZER_SYSTEM:
            current = re.search(r"<current_value>\n(.*?)\n</current_value>", prompt, re.S)
            value = (current[1] if current else "") + " " + MARK
            return f"<proposal><method>add</method><reasoning>feedback asks for spans</reasoning><value>{value}</value></proposal>"
        question = re.findall(r"Question: (.*)", prompt)[-1].strip()
        answer = answers.get(question, "") if right(question, prompt) else "Chelsea"
        if "Steps so far:" in prompt:
            return f"Action: retrieve({question})" if "Turn 1 of" in prompt else f"Action: finish({answer})"
        if "Examples:" in prompt or "Notes:" in prompt:
            return f"Reasoning: the passages name it.\nAnswer: {answer}"
        if "Passages:" in prompt:
            return "Notes: " + question
        return f"Query: {question}"

    return respond


def figures(store: Store, run_id: str) -> dict[tuple[int, str], list[int]]:
    out: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for c in store.call_summaries(run_id):
        row = out[(c.step, c.phase)]
        row[0] += 1
        row[1] += int(c.cached)
        row[2] += c.prompt_tokens
        row[3] += c.completion_tokens
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--val-limit", type=int, default=None, help="validation samples (default: all 100)")
    ap.add_argument("--test-limit", type=int, default=None, help="test samples (default: all 200)")
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    answers = {s["question"].strip(): s["answer"] for rows in load_splits().values() for s in rows}
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "runs.sqlite")
        for task in TASKS:
            started = time.perf_counter()
            run_id = runner.train(store, make_config(task=str(ROOT / task) if task.startswith("examples/") else task, forward_model="fake:fwd", backward_model="fake:bwd", optimizer_model="fake:opt", steps=1, batch_size=args.batch_size, val_limit=args.val_limit, test_limit=args.test_limit), cache_path=Path(tmp) / f"{run_id_safe(task)}.sqlite", providers={"fake": FakeProvider(make_responder(answers))})
            wall = time.perf_counter() - started
            steps = store.steps(run_id)
            proposals = store.proposals(run_id)
            fates = ", ".join(f"{f} {sum(p.fate == f for p in proposals)}" for f in dict.fromkeys(
                p.fate for p in proposals)) or "none"
            print(f"\n== {task}  (wall {wall:.1f}s; val {steps[0].val_score:.2f} -> {steps[-1].val_score:.2f};"
                  f" failed in batch {len(steps[-1].failed_samples)}/{args.batch_size};"
                  f" gradients {len(store.gradients(run_id))}; proposals: {fates})")
            print(f"   {'step':>4} {'phase':<9} {'calls':>6} {'cached':>6} {'prompt_tok':>11} {'compl_tok':>10}")
            table = figures(store, run_id)
            for step in sorted({s for s, _ in table}):
                for phase in PHASES:
                    if (step, phase) in table:
                        calls, cached, pt, ct = table[(step, phase)]
                        print(f"   {step:>4} {phase:<9} {calls:>6} {cached:>6} {pt:>11,} {ct:>10,}")


def run_id_safe(task: str) -> str:
    return re.sub(r"\W", "_", task)


if __name__ == "__main__":
    main()
