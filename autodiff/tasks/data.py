"""Reading the bundled datasets, with errors that name the file and line."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from autodiff.errors import DataError

DATA_DIR = Path(__file__).resolve().parents[2] / "sample_data"
SPLIT_SEED = 20250101  # fixed: every run of a task sees the same splits


def read_jsonl(path: str | Path, required: Sequence[str]) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset file {path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise DataError(f"{path}:{lineno}: missing field(s) {missing}")
            rows.append(row)
    if not rows:
        raise DataError(f"dataset file {path} has no rows")
    return rows


def seeded_split(rows: list[dict], sizes: Sequence[int], seed: int = SPLIT_SEED) -> list[list[dict]]:
    if sum(sizes) > len(rows):
        raise DataError(f"asked for {sum(sizes)} samples but the dataset has {len(rows)}")
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    out, start = [], 0
    for size in sizes:
        out.append(shuffled[start: start + size])
        start += size
    return out
