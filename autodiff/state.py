"""A pipeline's state: the value of each of its parameters, by name, in pipeline order.

One mechanism reads and writes it, whatever the source (a dict, a state file, a run in the store):
the new values are checked whole against the pipeline first, and only then applied, so a bad
input raises one `ConfigError` naming every problem and changes nothing. The `Pipeline` methods
(`state`, `load_state`, `save`, `load`, `load_run`) are thin wrappers over these functions.

A state file is UTF-8 JSON, parameters in pipeline order:

    {"format": "autodiff.pipeline-state/1",
     "parameters": {"toy.instruction": "Add the two numbers ...", "toy.output_format": "..."}}

`autodiff prompts RUN > best.json` prints the same document for a run's best step.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Mapping

from autodiff.errors import ConfigError, StoreError

if TYPE_CHECKING:  # pipeline.py imports this module; only the type is needed here
    from autodiff.pipeline import Pipeline
    from autodiff.store import Store

FORMAT = "autodiff.pipeline-state/1"
Step = int | Literal["best", "last"]


def state(pipeline: Pipeline) -> dict[str, str]:
    """{parameter name: value} of every parameter of `pipeline` (trainable or not), in pipeline order."""
    return {p.name: p.value for p in pipeline.parameters()}


def check_state(pipeline: Pipeline, values: Mapping[str, str], *, partial: bool = False,
                source: str | None = None) -> dict[str, str]:
    """The pipeline's state with `values` applied, computed on a copy: nothing is changed.

    Raises one ConfigError naming every problem: names the pipeline has no parameter for,
    parameters missing from `values` (unless `partial`), values that are not strings.
    `source` (a file, a run and step) starts the message, so the user knows where to look."""
    current = state(pipeline)
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source or 'state'}: expected a mapping of parameter name to value, "
                          f"got {type(values).__name__}")
    problems = []
    if unknown := [name for name in values if name not in current]:
        problems.append(f"not parameters of this pipeline: {unknown}")
    if not partial and (missing := [name for name in current if name not in values]):
        hint = "" if source else " (pass partial=True to set only some)"
        problems.append(f"missing parameters: {missing}{hint}")
    if not_text := [f"{name!r} is {type(v).__name__}" for name, v in values.items() if not isinstance(v, str)]:
        problems.append(f"values must be strings: {', '.join(not_text)}")
    if problems:
        known = ", ".join(current) or "none"
        raise ConfigError(f"{source or 'state'}: {'; '.join(problems)}. The pipeline's parameters: {known}")
    return {**current, **values}


def load_state(pipeline: Pipeline, values: Mapping[str, str], *, partial: bool = False,
               source: str | None = None) -> None:
    """Set the pipeline's parameters to `values`, all or (on any problem) none; see `check_state`.
    The values are assigned as they are (a load is not a training step: no history entry)."""
    new = check_state(pipeline, values, partial=partial, source=source)
    for p in pipeline.parameters():
        p.value = new[p.name]


# --- state files ---------------------------------------------------------------------------

def to_json(values: Mapping[str, str]) -> str:
    """The state file text for `values` (order kept, non-ASCII written as is, ending in a newline)."""
    return json.dumps({"format": FORMAT, "parameters": dict(values)}, indent=2, ensure_ascii=False) + "\n"


def save(pipeline: Pipeline, path: str | Path) -> Path:
    """Write the pipeline's state to `path` (see the module doc), atomically: a temporary file in
    the same folder replaces `path` only once it is complete. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(to_json(state(pipeline)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_file(path: str | Path) -> dict[str, str]:
    """The parameters of a state file. Raises ConfigError naming the file when it cannot be read,
    is not JSON, or is not an `autodiff.pipeline-state/1` document."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read state file {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"state file {path} is not JSON: {exc}") from None
    found = doc.get("format") if isinstance(doc, dict) else None
    if found != FORMAT:
        raise ConfigError(f"state file {path}: format is {found!r}, expected {FORMAT!r} "
                          f"(write one with pipeline.save(path) or `autodiff prompts RUN`)")
    if not isinstance(doc.get("parameters"), dict):
        raise ConfigError(f"state file {path}: 'parameters' must be an object of parameter name to value")
    return doc["parameters"]


def load(pipeline: Pipeline, path: str | Path) -> None:
    """Set every parameter from the state file at `path`: all of them or, on any problem, none.
    Raises one ConfigError naming the file and the problem (see `read_file`, `check_state`)."""
    load_state(pipeline, read_file(path), source=f"state file {path}")


# --- runs in the store ---------------------------------------------------------------------

def resolve_step(store: Store, run_id: str, step: Step = "best") -> int:
    """The completed step of run `run_id` that `step` names.

    "best": the completed step with the highest validation score (the earliest on ties);
    "last": the last completed step; an int: that step, if it completed. Raises ConfigError
    naming the run or step asked for and what exists."""
    try:
        store.run(run_id)
    except StoreError:
        runs = [r.id for r in store.runs()]
        shown = ", ".join(runs[:10]) + (f" and {len(runs) - 10} more" if len(runs) > 10 else "")
        raise ConfigError(f"no run {run_id!r} in {store.display}; runs there: {shown or 'none'}") from None
    done = [s for s in store.steps(run_id) if s.status == "completed"]
    if not done:
        raise ConfigError(f"run {run_id!r} has no completed step yet")
    numbers = [s.step for s in done]
    if step == "last":
        return numbers[-1]
    if step == "best":
        scored = [s for s in done if s.val_score is not None]
        if not scored:
            raise ConfigError(f"run {run_id!r}: no completed step has a validation score; "
                              f"ask for a step number (completed: {numbers})")
        return max(scored, key=lambda s: (s.val_score, -s.step)).step
    if isinstance(step, bool) or not isinstance(step, int):
        raise ConfigError(f"step {step!r}: use 'best', 'last' or a step number")
    if step not in numbers:
        raise ConfigError(f"run {run_id!r} has no completed step {step}; completed steps: {numbers}")
    return step


def run_state(store: Store, run_id: str, step: Step = "best") -> tuple[int, dict[str, str]]:
    """(step number, {parameter name: value}) of run `run_id` at the end of `step` (see
    `resolve_step`), parameters in the order the run registered them."""
    number = resolve_step(store, run_id, step)
    values = store.parameter_values_at(run_id, number)
    order = [p.name for p in store.parameters(run_id)]
    names = [n for n in order if n in values] + [n for n in values if n not in order]
    return number, {n: values[n] for n in names}


def load_run(pipeline: Pipeline, store: Store, run_id: str, step: Step = "best") -> int:
    """Set every parameter to its value in run `run_id` at `step`; returns the step number loaded.
    The run's parameter names must be exactly the pipeline's; otherwise one ConfigError names
    the run, the step and every name that differs, and nothing changes."""
    number, values = run_state(store, run_id, step)
    load_state(pipeline, values, source=f"run {run_id!r} step {number}")
    return number


# --- display -------------------------------------------------------------------------------

def to_markdown(values: Mapping[str, str], title: str | None = None) -> str:
    """A heading per parameter and its value in a fenced block; each fence is longer than any
    run of backticks in its value, so a value holding ``` stays one block."""
    parts = [f"# {title}\n"] if title else []
    for name, value in values.items():
        fence = "`" * max(3, _longest_backtick_run(value) + 1)
        parts.append(f"## {name}\n\n{fence}\n{value}\n{fence}\n")
    return "\n".join(parts)


def _longest_backtick_run(text: str) -> int:
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return longest
