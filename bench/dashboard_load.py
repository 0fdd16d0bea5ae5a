"""Benchmark: how long each dashboard page takes to render in a browser on a large run.

    .venv/bin/python bench/dashboard_load.py [--reps 7] [--keep DIR]

Builds a fresh store holding one large run, written row by row through the Store API the way the
trainer writes it (50 training steps of an 8-node pipeline, 12 samples a batch of which 10 fail,
10,000 gradients, 20,000 LLM calls with 1-2 KB prompts, ~800 proposals, validation and test
evaluations, on a simulated clock of ~2 minutes a step; stopped with 3 proposals waiting for
review), plus a smaller run (10 steps) so the Compare page has two to compare. `--keep DIR` builds
it in DIR and reuses it on the next call.

Then it starts three servers on that store: the real dashboard (the way `autodiff dashboard` starts
it), an empty Streamlit app that only writes the Runs title, and the dashboard's frame alone (its
navigation and sidebar run menu, pages empty: `frame_app`), the last two with the dashboard's
Streamlit settings. It drives headless Chromium; per repetition, a new tab (a new session, the
browser's cache kept) opens each of the three, in an order that rotates between repetitions, so
the first loads meet the same machine. In the dashboard's tab it then
clicks each page's sidebar link and times from the click until the page has finished rendering
(title heading shown, script run over, running widget gone, no element left as a loading
placeholder; on Graph also the SVG drawing in place, on Curves and Compare every plotly
chart drawn). Tabs are opened a second apart (SETTLE).

Printed: per page, the median and the max over the repetitions, in seconds, against the targets:
every page under 1 s median once the dashboard is open (PAGE_TARGET), and the dashboard's first
load within 1.15x of the empty app's (FIRST_LOAD_TARGET), as the median over the repetitions of
each one's ratio (the loads of a repetition are timed back to back); the frame's ratio is printed
for reference, as the share of the first load that Streamlit's navigation takes before any page's
content. The first repetition is the cold one (a
server that has not imported each page's modules yet, a browser without the dashboard's
JavaScript cached); the max shows it. The machine's load average is printed too: other processes
competing for the CPUs slow every figure.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autodiff.config import make_config  # noqa: E402
from autodiff.records import (Evaluation, Gradient, InputRef, Invocation, LLMCall, ParameterSpec, Proposal,  # noqa: E402
                              Trace)
from autodiff.store import Store  # noqa: E402
from autodiff.store import core as store_core  # noqa: E402
from tests.live_dashboard import (CHROMIUM, PAGES, ROOT, dashboard_server, launch_chromium, nav_link,  # noqa: E402
                                  wait_charts_drawn, wait_graph_drawn, wait_rendered)

# Plotly figures per page. The bench runs' calls carry no price, so Curves draws no cost chart (8 with
# one; Compare draws its cost chart either way, as a note when no call is priced).
CHARTS = {"Curves": 7, "Compare": 4}
# Seconds between closing a tab and opening the next: the browser and the server tear the closed
# tab's pages and session down in that time, which would otherwise count against the next load.
SETTLE = 1.0

# The pipeline: node -> (kind, calls per sample, its parameters). Eight nodes, nine parameters.
NODES = {
    "planner": ("llm", 1, ["planner.instruction", "planner.output_format"]),
    "query_generator": ("llm", 2, ["query_generator.instruction", "query_generator.examples"]),
    "retrieve": ("function", 2, []),
    "dedupe": ("function", 1, []),
    "reranker": ("llm", 1, ["reranker.instruction"]),
    "answer_generator": ("llm", 1, ["answer_generator.instruction", "answer_generator.output_format",
                                    "answer_generator.examples"]),
    "verifier": ("llm", 1, ["verifier.instruction"]),
    "exact_match": ("loss", 1, []),
}
ORDER = [("planner", 0), ("query_generator", 0), ("retrieve", 0), ("query_generator", 1), ("retrieve", 1),
         ("dedupe", 0), ("reranker", 0), ("answer_generator", 0), ("verifier", 0), ("exact_match", 0)]
FROZEN = ("answer_generator.examples",)
WORDS = ("the question asks which city the author was born in and the passages name two places so check "
         "each candidate against the dates given before answering with the name only do not explain why "
         "retrieved evidence must support every hop of the reasoning chain otherwise say unknown").split()


class _Clock:
    """The `time` module with `time()` reading a `Writer`'s simulated clock."""

    def __init__(self, writer: "Writer") -> None:
        self.writer = writer

    def time(self) -> float:
        return self.writer.tick(0.01)

    def __getattr__(self, name: str):
        return getattr(time, name)


class Writer:
    """Writes one synthetic run through the Store API, with seeded random text of realistic sizes."""

    def __init__(self, store: Store, run_id: str, *, steps: int, gradients: int, calls: int, seed: int,
                 batch: int = 12, failing: int = 10, val: int = 100, test: int = 50, waiting: int = 0,
                 ended: float = 0.0) -> None:
        self.store, self.run_id, self.steps, self.waiting = store, run_id, steps, waiting
        self.rng = random.Random(seed)
        self.batch, self.failing = batch, failing
        self.grads_per_sample = gradients // (steps * failing)
        self.train = [f"hp-train-{i:04d}" for i in range(400)]
        self.val = [f"hp-val-{i:04d}" for i in range(val)]
        self.test = [f"hp-test-{i:04d}" for i in range(test)]
        # Each step takes ~150 s of the run's clock; the run ends `ended` seconds ago.
        self.t = time.time() - ended - steps * 150
        self.calls: list[LLMCall] = []
        self.total_calls = calls
        self.params = [p for _kind, _n, ps in NODES.values() for p in ps]
        self.values = {p: self.text(400, 900) for p in self.params}

    def text(self, lo: int, hi: int) -> str:
        n = self.rng.randint(lo, hi)
        out: list[str] = []
        size = 0
        while size < n:
            word = self.rng.choice(WORDS)
            out.append(word)
            size += len(word) + 1
        return " ".join(out)[:n]

    def tick(self, seconds: float = 0.3) -> float:  # ~400 calls a step: ~2 min a step
        self.t += seconds
        return self.t

    def call(self, step: int, phase: str, role: str, node: str | None = None, sample: str | None = None,
             call_index: int | None = None) -> str:
        prompt = self.text(1000, 2000)
        response = self.text(200, 400)
        cid = uuid.uuid4().hex
        self.calls.append(LLMCall(
            id=cid, run_id=self.run_id, step=step, phase=phase, role=role, node=node, sample_id=sample,
            call_index=call_index, model=f"openai:gpt-4o{'-mini' if role == 'forward' else ''}",
            messages=(("system", self.text(200, 400)), ("user", prompt)), response=response,
            prompt_tokens=len(prompt) // 4, completion_tokens=len(response) // 4,
            latency_ms=self.rng.uniform(300, 3000), cached=self.rng.random() < 0.1, error=None,
            created_at=self.tick(),
        ))
        return cid

    def write(self) -> None:
        """The run, written with the store's clock set to this writer's (`_Clock`): steps start
        and end around the calls they hold, as in a real run, so time and tokens per step fall in
        their phases (with the real clock every call would lie before its step began)."""
        with mock.patch.object(store_core, "time", _Clock(self)):
            self._write()

    def _write(self) -> None:
        s = self.store
        config = make_config(task="multihop_rag", forward_model="openai:gpt-4o-mini", backward_model="openai:gpt-4o",
                             optimizer_model="openai:gpt-4o", steps=self.steps, batch_size=self.batch,
                             max_failed=self.failing, review="validated").model_dump()
        s.create_run(self.run_id, "multihop_rag", config, {"train": self.train, "val": self.val, "test": self.test})
        specs = [(node, p, ps) for node, (_kind, _n, ps) in NODES.items() for p in ps]
        s.add_parameters(self.run_id, [
            ParameterSpec(name=p, node=node, kind=p.split(".")[1] if p.split(".")[1] in (
                              "instruction", "output_format", "examples") else "other",
                          role=f"The {p.split('.')[1].replace('_', ' ')} of the {node}.", trainable=p not in FROZEN,
                          peers=tuple(q for q in ps if q != p), position=i)
            for i, (node, p, ps) in enumerate(specs)
        ])
        s.set_run_status(self.run_id, "running", pid=os.getpid())
        s.start_step(self.run_id, 0, [])
        for p in self.params:
            s.add_parameter_version(self.run_id, p, 0, self.values[p], None)
        val_score = 0.30
        self.evaluate(0, "val", val_score)
        self.evaluate(0, "test", val_score - 0.02)
        s.finish_step(self.run_id, 0, val_score, val_score - 0.02, [])
        s.add_calls(self.calls)
        self.calls = []
        per_step = (self.total_calls - len(self.val) - len(self.test)) // self.steps
        for step in range(1, self.steps + 1):
            val_score = self.train_step(step, per_step, val_score)
        if not self.waiting:
            s.set_run_status(self.run_id, "completed")
            return
        # Stopped while proposals of its last step waited for a person: the Review page has work.
        trainable = [p for p in self.params if p not in FROZEN]
        call_id = self.call(self.steps, "propose", "optimizer", None, None, None)
        s.add_calls(self.calls)
        self.calls = []
        for p in trainable[:self.waiting]:
            s.add_proposal(self.run_id, Proposal(
                id=uuid.uuid4().hex, step=self.steps, parameter=p, value=self.text(400, 900), method="rephrase",
                reasoning=self.text(100, 300), llm_call_id=call_id, fate="pending", reason="passed validation",
                minibatch_score=0.6, minibatch_baseline=0.4, val_score=val_score + 0.02, val_baseline=val_score,
                created_at=self.tick(),
            ))
        s.set_run_status(self.run_id, "stopped")

    def evaluate(self, step: int, split: str, score: float) -> None:
        ids = self.val if split == "val" else self.test
        evals = []
        for sid in ids:
            ok = self.rng.random() < score
            self.call(step, "validate" if split == "val" else "test", "forward", "answer_generator", sid, 0)
            evals.append(Evaluation(sid, "Paris" if ok else self.text(5, 30), "Paris", float(ok)))
        self.store.add_evaluations(self.run_id, step, split, "current", evals)

    def train_step(self, step: int, calls_in_step: int, val_score: float) -> float:
        s, rng = self.store, self.rng
        batch = rng.sample(self.train, self.batch)
        s.start_step(self.run_id, step, batch)
        traces = [self.forward(step, sid, failed=i < self.failing) for i, sid in enumerate(batch)]
        s.add_traces(self.run_id, step, traces)
        failed = [t for t in traces if t.score < 1.0]
        for trace in failed:
            s.add_gradients(self.run_id, step, self.backward(step, trace))
        if any(fate == "accepted" for fate in self.propose(step, val_score)):
            val_score = min(0.95, val_score + 0.02)
        self.store.add_evaluations(self.run_id, step, "val", "current", [
            Evaluation(sid, "Paris", "Paris", float(rng.random() < val_score)) for sid in self.val])
        test_score = None
        if step % 10 == 0 or step == self.steps:
            test_score = val_score - 0.03
            self.evaluate(step, "test", test_score)
        for i in range(max(0, calls_in_step - len(self.calls))):  # validation of the proposals
            self.call(step, "validate", "forward", "answer_generator", self.val[i % len(self.val)], 0)
        s.add_calls(self.calls)
        self.calls = []
        s.finish_step(self.run_id, step, val_score, test_score, [t.sample_id for t in failed])
        return val_score

    def forward(self, step: int, sample: str, failed: bool) -> Trace:
        trace = Trace(sample)
        last: dict[str, str] = {}
        for seq, (node, call_index) in enumerate(ORDER):
            kind, _n, params = NODES[node]
            inputs = [InputRef("question", self.text(80, 160))]
            if last:
                upstream = list(last.items())[-1] if node != "dedupe" else None
                if node == "dedupe":
                    inputs = [InputRef(f"passages_{i}", self.text(300, 600), iid)
                              for i, iid in enumerate(v for k, v in last.items() if k.startswith("retrieve"))]
                elif upstream:
                    inputs.append(InputRef("context", self.text(300, 800), upstream[1]))
            iid = uuid.uuid4().hex
            llm = kind == "llm"
            trace.invocations.append(Invocation(
                id=iid, sample_id=sample, node=node, node_type=kind, call_index=call_index, inputs=tuple(inputs),
                output=("0" if failed else "1") if kind == "loss" else self.text(100, 400),
                parameters=tuple((p, self.values[p]) for p in params), prompt=self.text(1000, 2000) if llm else None,
                llm_call_id=self.call(step, "forward", "forward", node, sample, call_index) if llm else None,
                score=(0.0 if failed else 1.0) if kind == "loss" else None, seq=seq,
            ))
            last[f"{node}#{call_index}"] = iid
        return trace

    def backward(self, step: int, trace: Trace) -> list[Gradient]:
        """Feedback on the trace's parameters and outputs, from the loss back, one backward call each."""
        out: list[Gradient] = []
        llm_invocations = [inv for inv in reversed(trace.invocations) if inv.node_type != "function"]
        targets = []
        for inv in llm_invocations:
            targets += [("parameter", p, inv, None) for p, _v in inv.parameters if p not in FROZEN]
            targets += [("output", next((i.node for i in trace.invocations if i.id == ref.source), ref.name), inv,
                         ref.source) for ref in inv.inputs if ref.source]
        for i in range(self.grads_per_sample):
            kind, target, inv, source = targets[i % len(targets)]
            out.append(Gradient(
                id=uuid.uuid4().hex, sample_id=trace.sample_id, node=inv.node, invocation_id=inv.id,
                call_index=inv.call_index, target_type=kind, target=target, target_invocation=source, score=0.0,
                text=self.text(200, 400), source_node=inv.node,
                path=("dedupe", "retrieve") if kind == "output" and target == "retrieve" else (),
                llm_call_id=self.call(step, "backward", "backward", inv.node, trace.sample_id, inv.call_index),
                origin="loss" if inv.node_type == "loss" else "backward", created_at=self.tick(0.01),
            ))
        return out

    def propose(self, step: int, val_score: float) -> list[str]:
        """Two proposals per trainable parameter; now and then one is accepted (by a person, or the
        trainer), the rest fail a check."""
        s, rng = self.store, self.rng
        fates = []
        for p in self.params:
            if p in FROZEN:
                continue
            call_id = self.call(step, "propose", "optimizer", None, None, None)
            for k in range(2):
                pid = uuid.uuid4().hex
                value = self.text(400, 900)
                lucky = k == 0 and rng.random() < 0.04
                fate = "accepted" if lucky else rng.choice(("failed_minibatch", "failed_val", "rejected_check"))
                s.add_proposal(self.run_id, Proposal(
                    id=pid, step=step, parameter=p, value=value, method=rng.choice(("rephrase", "add", "remove")),
                    reasoning=self.text(100, 300), llm_call_id=call_id, fate="pending" if lucky else fate,
                    reason="passed validation" if lucky else "did not beat the current value",
                    minibatch_score=0.6, minibatch_baseline=0.4, val_score=val_score + (0.02 if lucky else -0.05),
                    val_baseline=val_score, created_at=self.tick(),
                ))
                if lucky:
                    by_person = rng.random() < 0.5
                    if by_person:
                        s.decide(pid, "accept")
                    s.update_proposal(pid, fate="accepted", decided_by="human" if by_person else "auto",
                                      decided_at=self.tick(), reason="beat the best validation score")
                    s.add_parameter_version(self.run_id, p, step, value, pid)
                    self.values[p] = value
                fates.append(fate)
        return fates


def build_store(path: Path) -> tuple[Store, str]:
    """The small run, then the large one. Runs are listed newest first by their start, on the
    writers' clocks: the small run ends before the large one starts, so the large run is the newest,
    the one the dashboard opens on and every page is timed on."""
    store = Store(path)
    large_steps = 50
    Writer(store, "bench-small", steps=10, gradients=2000, calls=4000, seed=1, ended=large_steps * 150 + 600).write()
    Writer(store, "bench-large", steps=large_steps, gradients=10_000, calls=20_000, seed=0, waiting=3).write()
    if store.runs()[0].id != "bench-large":
        raise AssertionError("the large run is not the newest: the dashboard would open on the small one")
    return store, "bench-large"


def first_load(context, url: str):
    """A new tab (a new Streamlit session, the browser's cache kept) opens `url`; returns the tab
    and the seconds until the Runs title's page has rendered."""
    page = context.new_page()
    page.set_default_timeout(120_000)
    start = time.perf_counter()
    page.goto(url)
    wait_rendered(page, "Runs")
    return page, time.perf_counter() - start


def click_through(page, times: dict[str, list[float]]) -> None:
    """From the Runs page, each other page's sidebar link in turn and back to Runs, timed from the
    click until the page has rendered (charts and graph drawn)."""
    for title in (*PAGES[1:], "Runs"):
        start = time.perf_counter()
        nav_link(page, title).click()
        wait_rendered(page, title)
        if title == "Graph":
            wait_graph_drawn(page)
        if title in CHARTS:
            wait_charts_drawn(page, CHARTS[title])
        times[title].append(time.perf_counter() - start)
        errors = page.locator('[data-testid="stException"], [data-testid="stAlertContentError"]')
        if errors.count():
            raise RuntimeError(f"{title} page shows an error: {errors.all_inner_texts()}")


def reference_app(home: Path, name: str, source: str) -> Path:
    """A reference Streamlit app `source` in its own folder under `home`, with the dashboard's
    Streamlit settings."""
    folder = home / name
    (folder / ".streamlit").mkdir(parents=True, exist_ok=True)
    (folder / ".streamlit" / "config.toml").write_text((ROOT / ".streamlit" / "config.toml").read_text())
    (folder / "app.py").write_text(source)
    return folder / "app.py"


def empty_app(home: Path) -> Path:
    """A Streamlit app that only writes the Runs title, with the dashboard's Streamlit settings:
    what any page's first load costs before our code runs."""
    return reference_app(home, "empty_app", 'import streamlit as st\n\nst.title("Runs")\n')


def frame_app(home: Path) -> Path:
    """The dashboard's frame with nothing on its pages but their titles: Streamlit's navigation
    with the dashboard's pages (app.py) and the sidebar's run menu, a popover holding a selectbox,
    and caption (dashboard.common.sidebar). Its first load is what the frame #11 asks for costs
    before any page's content: the part of the dashboard's ratio that no page can win back."""
    return reference_app(home, "frame_app", f"""import streamlit as st

PAGES = {list(PAGES)!r}


def page():
    st.title(navigation.title)


navigation = st.navigation([st.Page(page, title=t, url_path=t.lower(), default=i == 0) for i, t in enumerate(PAGES)])
with st.sidebar.popover("Run: bench-large"):
    st.selectbox("Run", ["bench-large", "bench-small"])
st.sidebar.caption("multihop_rag, stopped  \\nStore: runs.sqlite")
navigation.run()
""")


def measure(url: str, empty_url: str, frame_url: str, reps: int) -> dict[str, list[float]]:
    """Per repetition, a new tab's first load of the empty app, of the frame app and of the
    dashboard, in turn (the order rotating between repetitions, so that none always follows
    another), then every page of the dashboard clicked in its tab. The servers run all along: the
    first loads of a repetition meet the same machine, which a comparison of separate series did
    not (their ratio swung from 1.0x to 1.8x between runs as the load changed)."""
    from playwright.sync_api import sync_playwright

    times: dict[str, list[float]] = {FIRST: [], EMPTY: [], FRAME: [], **{title: [] for title in PAGES}}
    with sync_playwright() as p:
        browser = launch_chromium(p)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        for rep in range(reps):
            order = [(EMPTY, empty_url), (FRAME, frame_url), (FIRST, url)]
            for name, address in order[rep % 3:] + order[:rep % 3]:
                page, seconds = first_load(context, address)
                times[name].append(seconds)
                if name == FIRST:
                    click_through(page, times)
                page.close()
                time.sleep(SETTLE)
        browser.close()
    return times


FIRST = "Runs (first load)"
EMPTY = "(empty app, first load)"
FRAME = "(frame only, first load)"
PAGE_TARGET = 1.0  # s, median of each page once the dashboard is open
FIRST_LOAD_TARGET = 1.15  # a new tab's first load, as a multiple of the empty Streamlit app's


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--keep", type=Path, help="build the store in this directory and keep it (or reuse the one there)")
    args = ap.parse_args()
    if not CHROMIUM.exists():
        print(f"needs Debian's chromium at {CHROMIUM}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        home = args.keep or Path(tmp)
        home.mkdir(parents=True, exist_ok=True)
        path = home / "runs.sqlite"
        start = time.perf_counter()
        if path.exists():
            store, run_id = Store(path), "bench-large"
            if store.runs()[0].id != run_id:
                print(f"{path} was built by an older version of this script (its newest run is not {run_id}): "
                      "delete it or give another --keep", file=sys.stderr)
                return 2
            built = "reused"
        else:
            store, run_id = build_store(path)
            built = f"built in {time.perf_counter() - start:.1f} s"
        size = sum(f.stat().st_size for f in home.glob("runs.sqlite*")) / 1e6
        print(f"store {path}: {size:.0f} MB, {built}; "
              f"{run_id}: {len(store.steps(run_id)) - 1} steps, {len(store.gradients(run_id))} gradients, "
              f"{len(store.call_summaries(run_id))} LLM calls, {len(store.proposals(run_id))} proposals, "
              f"{len(store.invocations(run_id))} invocations")
        store.close()
        with dashboard_server(path, home / "dashboard.log") as url, \
                dashboard_server(path, home / "empty_app.log", app=empty_app(home)) as empty_url, \
                dashboard_server(path, home / "frame_app.log", app=frame_app(home)) as frame_url:
            times = measure(url, empty_url, frame_url, args.reps)
    load = os.getloadavg()[0]
    print(f"\n{args.reps} repetitions, load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"{'page':<24} {'median s':>9} {'max s':>7}  target")
    missed = []
    empty = statistics.median(times[EMPTY])
    for title, runs in times.items():
        median, worst = statistics.median(runs), max(runs)
        if title == EMPTY:
            verdict = "Streamlit's own start in a new tab: an app that only writes a title"
        elif title == FRAME:
            ratio = statistics.median(a / b for a, b in zip(runs, times[EMPTY]))
            verdict = f"{ratio:.2f}x the empty app's: the navigation and run menu, pages empty (for reference)"
        elif title == FIRST:
            # Paired: each repetition's two first loads met the same machine, so their ratio is
            # steadier than a ratio of medians when the machine's load drifts between repetitions.
            ratio = statistics.median(a / b for a, b in zip(runs, times[EMPTY]))
            verdict = (f"{ratio:.2f}x the empty app's, median of the repetitions' ratios "
                       f"(ratio of medians {median / empty:.2f}x; target {FIRST_LOAD_TARGET:.2f}x)")
            if ratio > FIRST_LOAD_TARGET:
                missed.append(title)
                verdict += "  MISSED"
        else:
            verdict = f"{PAGE_TARGET:.1f} s"
            if median > PAGE_TARGET:
                missed.append(title)
                verdict += "  MISSED"
        print(f"{title:<24} {median:>9.2f} {worst:>7.2f}  {verdict}")
    print("every target met" if not missed else f"targets missed: {', '.join(missed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
