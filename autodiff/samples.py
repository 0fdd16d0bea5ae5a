"""Regenerate the bundled sample runs with the embedded local model (`autodiff sample-runs`).

The runs are real: the project's own engine on `local:smollm2` for every role. The review-mode
run is decided by a scripted reviewer that accepts a pending proposal when its validation score
is no worse than the current value's and rejects it otherwise; every decision records that it
came from this script, not a person. Each regeneration starts from an empty response cache, so the
stored token counts and latencies are the model's own, not cache hits.
"""

from __future__ import annotations

import functools
import shutil
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

from autodiff.config import make_config
from autodiff.records import Proposal
from autodiff.runner import train
from autodiff.store import Store

LOCAL = "local:smollm2"
# The bundled sample runs; a new store starts as a copy of this file (autodiff dashboard).
SAMPLE_STORE = Path(__file__).resolve().parents[1] / "sample_data" / "runs" / "sample_runs.sqlite"
REVIEWER = "sample-script reviewer (accepts if validation is no worse)"

# Small on purpose: the 135M model reads ~60 and writes ~40 tokens a second on two cores.
SAMPLE_RUNS: list[dict] = [
    {"task": "object_counting", "steps": 2, "batch_size": 3, "max_failed": 2, "proposals": 1,
     "val_limit": 10, "test_limit": 10},
    {"task": "trec", "steps": 2, "batch_size": 3, "max_failed": 2, "proposals": 1, "val_limit": 10,
     "test_limit": 10},
    {"task": "multihop_rag", "steps": 2, "batch_size": 2, "max_failed": 1, "proposals": 1, "val_limit": 6,
     "test_limit": 6},
    # The 135M optimizer never writes the tagged format, so the review run parses leniently: its
    # untagged replies become candidates, which still face the checks and both validation stages.
    # Short optimizer replies keep its rambling within the length check, so candidates reach review.
    {"task": "object_counting", "steps": 3, "batch_size": 3, "max_failed": 2, "proposals": 1, "val_limit": 6,
     "test_limit": 6, "review": "all", "seed": 7, "lenient_proposals": True, "optimizer_max_tokens": 160},
]


def sample_run_ids(path: Path = SAMPLE_STORE) -> tuple[str, ...]:
    """Ids of the runs in the bundled sample store (so a copy of them can say what it is), read
    without writing to the file; () when it is missing or unreadable."""
    try:
        return _ids(str(path), path.stat().st_mtime)
    except OSError:
        return ()


@functools.lru_cache(maxsize=4)
def _ids(path: str, mtime: float) -> tuple[str, ...]:
    try:
        # immutable: no -wal/-shm files are made beside the bundled store (it is replaced, never edited)
        with sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True) as conn:
            return tuple(row[0] for row in conn.execute("SELECT id FROM runs ORDER BY created_at"))
    except sqlite3.Error:
        return ()


def _same(config: dict, options: dict) -> bool:
    return config["task"] == options["task"] and config.get("review", "off") == options.get("review", "off")


def _verdict(proposal: Proposal) -> str:
    score, baseline = proposal.val_score, proposal.val_baseline
    return "accept" if score is not None and baseline is not None and score >= baseline else "reject"


def _reviewer(store: Store, stop: threading.Event) -> None:
    while not stop.is_set():
        for run in store.runs():
            for p in store.proposals(run.id, fate="pending"):
                if store.decision(p.id) is None:
                    store.decide(p.id, _verdict(p), by=REVIEWER)
        time.sleep(0.2)


def regenerate(target: Path, quiet: bool = False, only: list[int] | None = None) -> list[str]:
    """Train each sample run into a fresh store, then replace `target` with it. With `only` (indexes
    into SAMPLE_RUNS), keep the other runs of `target` and redo just those."""
    work = Path(tempfile.mkdtemp(prefix="autodiff-samples-"))
    runs = [SAMPLE_RUNS[i] for i in only] if only else SAMPLE_RUNS
    if only and target.exists():
        shutil.copyfile(target, work / "runs.sqlite")
    store = Store(work / "runs.sqlite")
    for old in store.runs():
        if any(_same(old.config, options) for options in runs):
            store.delete_run(old.id)
    stop = threading.Event()
    threading.Thread(target=_reviewer, args=(store, stop), daemon=True).start()
    ids = []
    try:
        for options in runs:
            if not quiet:
                print(f"training sample run: {options}", flush=True)
            ids.append(train(store, make_config(forward_model=LOCAL, backward_model=LOCAL, optimizer_model=LOCAL, concurrency=2, max_tokens=256, review_timeout=600, **options), cache_path=work / "cache.sqlite"))
    finally:
        stop.set()
    with store.connect() as conn:
        conn.execute("VACUUM")
    store.close()
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(work / "runs.sqlite", target)
    shutil.rmtree(work, ignore_errors=True)
    return ids
