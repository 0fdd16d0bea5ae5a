"""Progress of a run for people: a bar in a terminal or a notebook (tqdm's auto mode)."""

from __future__ import annotations

import sys
from typing import Callable

Progress = Callable[[str, dict], None]


def step_line(info: dict) -> str:
    """The progress line after a step: validation score, failed samples, cost so far, and the
    projected cost to finish and of the whole run (from what its steps cost so far)."""
    from autodiff.llm.pricing import format_usd

    parts = [f"val={_score(info['val'])}", f"failed={info['failed']}"]
    if "cost_usd" in info:
        parts.append(f"cost={format_usd(info['cost_usd'], info.get('cost_unknown', 0))}")
        if info.get("projected_usd") is not None:
            parts.append(f"to finish={format_usd(info['to_finish_usd'])}")
            parts.append(f"projected={format_usd(info['projected_usd'])}")
    return ", ".join(parts)


def progress_bar(total_steps: int, quiet: bool = False, also: Progress | None = None) -> Progress:
    """A progress callback drawing one bar of `total_steps` steps (on stderr in a terminal, a
    widget in a notebook), made on the first event so a bad input prints no empty bar. `also`
    receives every event too. Events: initial, step, backward, accepted, pending, step_done,
    resumed, stopped, completed, taken_over, interrupting; each with a dict of details."""
    from tqdm.auto import tqdm

    bars: list = []

    def on(event: str, info: dict) -> None:
        if also is not None:
            also(event, info)
        if not bars:
            bars.append(tqdm(total=total_steps, unit="step", disable=quiet, file=sys.stderr))
        bar = bars[0]
        if event == "step":
            bar.set_description(f"step {info['step']}")
        elif event == "step_done":
            bar.update(1)
            bar.set_postfix_str(step_line(info))
        elif event == "resumed":
            bar.update(info["step"])
        elif event == "pending":
            bar.write(f"proposal {info['proposal']} for {info['parameter']} is waiting for review")
        elif event == "initial":
            bar.write(f"initial validation score {_score(info['val'])}")
        elif event == "stopped" and info.get("reason"):
            bar.write(f"stopped: {info['reason']}")
        elif event == "taken_over":
            bar.write(taken_over_line(info))
        elif event == "interrupting":
            bar.write(f"stopping ({info['how']}): waiting for the LLM calls already sent to end, so that their "
                      "replies are recorded (interrupt again, Ctrl-C or SIGTERM, to stop without them)")
        if event in ("completed", "stopped", "taken_over"):
            bar.close()

    return on


def taken_over_line(info: dict) -> str:
    """What a "taken_over" event says: the run was taken over by another process, at a step
    boundary or, while this process was paused, during a step (`during`; then how many calls of
    this process went unrecorded)."""
    if not info.get("during"):
        return f"another process took the run over before step {info['step']}: this one leaves it"
    lost = info.get("unrecorded_calls") or 0
    return (f"another process took the run over while this one was in step {info['step']} ({info.get('reason')}), "
            "probably while this one was paused or cut off: this one stopped without writing anything more"
            + (f"; {lost} LLM call{'s' if lost != 1 else ''} it made since its last write are not recorded"
               if lost else ""))


def announce_changes(progress: Progress | None) -> Progress:
    """`progress`, and the options a resume changed said on stderr ("run R: retry_budget 20.0 ->
    150.0 (stored in the run)") from its "options_changed" event, even when `progress` is None
    (a quiet resume still says what it changed). The CLI and `autodiff.resume` both use it."""
    def on(event: str, info: dict) -> None:
        if event == "options_changed":
            print(f"run {info['run_id']}: {'; '.join(info['changes'])} (stored in the run)", file=sys.stderr)
        if progress is not None:
            progress(event, info)

    return on


def _score(value: float | None) -> str:
    return "unscored" if value is None else f"{value:.3f}"
