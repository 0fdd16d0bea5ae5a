"""What a person can do about a run that stopped or failed: whether resuming, as things stand,
can go on, and what must change first when it cannot.

A resumed run keeps its task, its models and its options (only its budgets, and how calls are
retried and judged, can change: `autodiff.config.RESUME_OPTIONS`), and reads keys and server
addresses from the environment of the process that resumes it. A run stopped by its own retry
settings (a server asking for a longer wait than the retry budget, replies slower than the
time-out) gets the option to resume with (`resume_option`). So a
missing key or a server that was down is fixed outside the run, then the run resumes; a wrong
model name, a model file that is not there or a prompt too long for the model's context window
fail the same way on every resume: those need a new run. The reasons are read from the errors the
engine itself writes (trainer, runner, LLM providers), whose wording tests/test_dashboard_controls.py
holds to these rules.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from autodiff.records import Run

# How far Resume gets: "go" resumes as things stand; "fix_first" fails the same way until
# something outside the run is fixed; "new_run" fails the same way whatever is fixed outside it.
Outlook = Literal["go", "fix_first", "new_run"]


@dataclass(frozen=True)
class Recovery:
    """Why a run ended early and what to do. `outlook`: see `Outlook`; `advice` is one or two
    sentences for a person (plain text, may contain the run id and shell commands)."""

    status: str  # stopped | failed
    error: str  # the run's own error text, as stored
    outlook: Outlook
    advice: str
    budget: bool = False  # stopped by its budget: resume with a larger one
    option: str | None = None  # the resume option that answers it, as typed ("--retry-budget 150")


# (words in the error, outlook, advice), first match wins. The advice says what to change; the
# run's error, shown above it, says what happened.
_RULES: tuple[tuple[tuple[str, ...], Outlook, str], ...] = (
    (("stopped on request before",), "go", "Resume starts it: it has not trained yet."),
    (("stopped on request",), "go",
     "Resume goes on from its last completed step; an unfinished step is redone from its start, its LLM calls "
     "that had finished answered from the response cache of the machine that made them when the resume runs "
     "there (each machine has its own: elsewhere, as on another worker, they are asked and paid again)."),
    (("interrupted (",), "go",
     "It was interrupted (Ctrl-C or SIGTERM) in its process. Resume goes on from its last completed step; an "
     "unfinished step is redone from its start."),
    (("ended without finishing",), "go",
     "Its process ended (killed, or the machine restarted). Resume goes on from its last completed step."),
    (("context window",), "new_run",
     "A prompt does not fit the model's context window, and a resumed run keeps its models and task: "
     "resuming fails the same way. Start a new run with shorter inputs (fewer examples or passages) or a "
     "model with a larger context window."),
    (("local model file not found", "no embedded model is named", "is not a GGUF model file",
      "is a folder, not a GGUF model file",
      "cannot load GGUF model"), "fix_first",
     "A resumed run keeps its models: resuming fails the same way until that GGUF file is back at that "
     "path. Otherwise start a new run with a model that exists (local:smollm2 or local:/path/to/model.gguf)."),
    (("api key", "authentication failed", "permission denied", "quota used up"), "fix_first",
     "Resuming fails the same way until the key or the account is fixed. A resumed run reads the key from "
     "the environment of the process that resumes it: set it where the dashboard was started and restart the "
     "dashboard, then resume; or resume from a shell where it is set: {resume}."),
    (("option:",), "fix_first",
     "The model refused an option the run sends. Resuming fails the same way until that is changed (where "
     "model families are set: autodiff/llm/models.py); or start a new run without that option."),
    (("not found at", "http 404"), "fix_first",
     "A resumed run keeps its model names: if the model name is wrong, resuming fails the same way; start a "
     "new run with the right name. If the server address is wrong (OPENAI_BASE_URL, ANTHROPIC_BASE_URL), fix "
     "it where the dashboard was started, then resume."),
    (("cannot connect",), "fix_first",
     "The model's server could not be reached. Start it (or fix its address), then resume: resuming before "
     "fails the same way."),
    (("cannot load the run's task",), "fix_first",
     "Resuming fails the same way until the task loads again (its file or module, as named in the run)."),
    (("fix the cause, then resume",), "fix_first",
     "Too many LLM calls or samples failed in one phase (the Curves page counts them by kind). Once the cause "
     "is gone (a server back up, a bug in your pipeline fixed), resume: the failed samples are asked again. If "
     "some errors are acceptable, resume with a larger share allowed: {resume} --max-error-share 0.25."),
)


def store_option(store) -> str:
    """' --store STORE' for a command about `store` (a Store), its password masked as ***; ''
    when it is the default store (AUTODIFF_STORE, else runs.sqlite here), which needs no option."""
    from autodiff.errors import AutodiffError
    from autodiff.store.spec import is_url, resolve_spec

    try:
        default = resolve_spec()
    except AutodiffError:  # AUTODIFF_STORE is unusable: name the store
        default = None
    if store.spec == default or (store.backend == "sqlite" and default and not is_url(default)
                                 and Path(default).resolve() == store.path.resolve()):
        return ""
    return f" --store {shlex.quote(store.display)}"


def resume_command(run_id: str, store=None, option: str = "", cache: Path | str | None = None) -> str:
    """The shell command that resumes run `run_id` of `store` (a Store; None: the default store),
    as a person types it: `autodiff resume RUN [--store STORE] [--cache CACHE] [option]`, with
    `--cache` when `cache` (the response cache the run used, where known) is not the default one,
    so that the resume answers the redone step's finished calls from it instead of asking them
    again. Built when shown, never stored with the run, so it names the store the run is read from
    (a run copied to another store included)."""
    from autodiff.runner import default_cache_path

    where = store_option(store) if store is not None else ""
    if cache is not None and Path(cache).resolve() != default_cache_path().resolve():
        where += f" --cache {shlex.quote(str(cache))}"
    return f"autodiff resume {shlex.quote(run_id)}{where}" + (f" {option}" if option else "")


_BUDGET_FLAG = re.compile(r"--budget-(?:usd|tokens)\b")


def budget_option(run: Run) -> str | None:
    """The option of the budget a stopped run reached ("--budget-usd" or "--budget-tokens"), as
    the trainer names it in the stop's reason ("budget: ...; resume it with a larger budget
    (--budget-tokens)"), or None for a run not stopped by its budget."""
    error = run.error or ""
    if run.status != "stopped" or not error.startswith("budget"):
        return None
    return match.group(0) if (match := _BUDGET_FLAG.search(error)) else None


def recovery(run: Run, store=None) -> Recovery | None:
    """What to do about `run` (as `Store.runs`/`Store.run` give it) of `store` (named in the
    commands the advice gives unless it is the default store), or None when it is not stopped or
    failed. A stop without a stored reason is taken as resumable."""
    status, error = run.status, run.error or ""
    if status not in ("stopped", "failed"):
        return None
    if flag := budget_option(run):
        return Recovery(status, error, "go", "The run stopped at its budget: give it a larger one (for the whole "
                                             "run, what it spent included), then resume: "
                                             f"{resume_command(run.id, store, flag + ' N')}.", budget=True)
    if (option := resume_option(run)) is not None:
        return Recovery(status, error, "go", f"{_OPTION_ADVICE[option.split()[0]]} Resume with {option}: "
                        f"{resume_command(run.id, store, option)}, or on the Runs page, whose Resume offers it.",
                        option=option)
    low = error.lower()
    for words, outlook, advice in _RULES:
        if any(w in low for w in words):
            return Recovery(status, error, outlook, advice.format(resume=resume_command(run.id, store)))
    if status == "stopped":
        return Recovery(status, error, "go", "Resume goes on from its last completed step.")
    return Recovery(status, error, "fix_first",
                    "Resuming goes on from its last completed step, and fails the same way until the cause above "
                    f"is fixed (a run started from the dashboard writes its traceback to logs/{run.id}.log beside the "
                    "store).")


ROLES = ("forward", "backward", "optimizer")
_OPTION_ADVICE = {
    "--retry-budget": "Its calls gave up within the run's retry budget (--retry-budget, seconds one call keeps "
                      "retrying): the server asked for a longer wait, or kept failing for longer. Resuming with the "
                      "same budget stops the same way while the server does.",
    "--timeout": "Replies took longer than the run's time-out, so its calls gave up. Resuming with the same "
                 "time-out stops the same way while the server is that slow.",
    **{f"--{role}-timeout": f"{role.capitalize()} replies took longer than the run's {role} time-out, so its calls "
                            "gave up. Resuming with the same time-out stops the same way while the server is that "
                            "slow." for role in ROLES},
}
_ASKED = re.compile(r"--retry-budget (\d+)")
_TIMED_OUT = re.compile(r"timed out \(read limit ([\d.]+)s")
_GAVE_UP = re.compile(r"gave up after \d+ attempts? in \d+s: .*(HTTP 429|HTTP 5\d\d)", re.S)


def resume_option(run: Run) -> str | None:
    """The resume option that answers a run stopped by its own retry settings, as typed on the
    command line, or None: the retry budget the LLM client named when a server asked for a longer
    wait ("--retry-budget 150"); a time-out four times the one replies ran past (at least 30 s),
    under the option that set it ("--timeout 30"); twice the retry budget (at least 60 s) when a
    server kept answering 429 or 5xx for all of it."""
    error, config = run.error or "", run.config or {}
    if match := _ASKED.search(error):
        return f"--retry-budget {match.group(1)}"
    if match := _TIMED_OUT.search(error):
        limit = float(match.group(1))
        flag = next((f"--{role}-timeout" for role in ROLES if config.get(f"{role}_timeout") == limit), "--timeout")
        return f"{flag} {max(30, math.ceil(limit * 4 / 10) * 10)}"
    if _GAVE_UP.search(error):
        return f"--retry-budget {max(60, math.ceil(2 * float(config.get('retry_budget') or 30)))}"
    return None


def stop_effect(config: dict) -> str:
    """What Stop does to a run with `config` (its stored RunConfig as a dict), in words: the
    trainer notices a stop request before each step, before each parameter's optimization, after
    each proposal is settled and while it waits for a review; it never cuts an LLM call or a
    forward and backward pass short. What it left unfinished is dropped on resume and the step
    redone from its start with the same mini-batch, so the calls it had finished are asked
    again with the same prompts: the response cache of the machine that made them answers them
    when the resume runs there (unless the run's cache is off); each machine has its own cache."""
    replay = ("its LLM calls that had finished are asked again and paid again (this run's response cache is off)"
              if config.get("cache") == "off" else
              "its LLM calls that had finished are answered from the response cache, with no new tokens, when the "
              "resume runs on the same machine (each machine has its own cache: on another, as when another worker "
              "takes the run, they are asked and paid again)")
    review = (" A proposal waiting for review is rejected by the stop, and the review decisions of the "
              "unfinished step are asked again." if config.get("review", "off") != "off" else "")
    return ("The run stops after the work in progress: the forward and backward passes of the step, or the "
            "proposal being scored. Every completed step is kept. The unfinished step is redone from its "
            f"start on resume (same samples); {replay}.{review}")
