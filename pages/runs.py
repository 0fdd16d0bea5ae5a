"""Runs: every run in the store, live progress of the running ones, and a form to start a new one."""

import streamlit as st

from autodiff.config import (RESUME_OPTIONS, RunConfig, default_model, describe_limits, make_config,
                             parse_option)
from autodiff.errors import AutodiffError, ConfigError
from autodiff.llm.registry import check_model
from autodiff.llm.pricing import format_tokens, format_usd
from autodiff.recovery import stop_effect
from autodiff.records import Run
from autodiff.runner import launch, resume_background
from autodiff.workers import shared
from autodiff.samples import LOCAL, sample_run_ids
from autodiff.tasks import task_names
from dashboard.common import (ACTIVE, Link, cache_path, count, current_store, fmt_score, fmt_time, html_table,
                              html_tables, md, page_url, run_problem, summary)

ROLES = ("forward", "backward", "optimizer")
# The form's fields: RunConfig option -> label. Each says its range, taken from RunConfig (the one
# source of limits), and an out-of-range value is named by its label when Start refuses it.
LABELS = {"task": "Task", "forward_model": "Forward model", "backward_model": "Backward model",
          "optimizer_model": "Optimizer model", "steps": "Steps", "batch_size": "Batch size", "review": "Review mode",
          "val_limit": "Validation samples", "test_limit": "Test samples", "max_failed": "Failed samples per step",
          "tau": "Tau (pass score)", "lenient_proposals": "Lenient proposals", "budget_usd": "Budget (US dollars)",
          "budget_tokens": "Budget (tokens)"}
FORM_DEFAULTS = {"steps": 3, "batch_size": 4, "review": "off", "val_limit": 20, "test_limit": 20,
                 "max_failed": RunConfig.model_fields["max_failed"].default, "tau": None, "lenient_proposals": False,
                 "budget_usd": None, "budget_tokens": None}
NUMBERS = ("steps", "batch_size", "val_limit", "test_limit", "max_failed", "tau", "budget_usd", "budget_tokens")
NO_BUDGET = ("budget_usd", "budget_tokens")  # empty or 0: no budget
# What an empty number field means, shown in it.
EMPTY = {"val_limit": "all", "test_limit": "all", "tau": "the task's", "budget_usd": "none",
         "budget_tokens": "none"}

store = current_store()
st.title("Runs")
if started := st.session_state.pop("started_run", None):
    if shared(store):
        st.success(f"Queued run {md(started)}: the next free worker (`autodiff worker`) trains it.")
    else:
        st.success(f"Started run {md(started)} in the background: it goes on if you close this tab.")


def key_of(name: str) -> str:
    """The form field of RunConfig option `name`: model_forward, ..., else opt_<name>."""
    return f"model_{name.removesuffix('_model')}" if name.endswith("_model") else f"opt_{name}"


def explain(name: str, extra: str = "") -> str:
    """A field's help: RunConfig's description of the option, its range, and `extra`."""
    limits = describe_limits(name) if RunConfig.model_fields[name].metadata else ""
    return RunConfig.model_fields[name].description + (f" ({limits})" if limits else "") + extra


def number(where, name: str, extra: str = "") -> None:
    """The form's field for numeric option `name` in column `where`, labelled, keyed (`key_of`)
    and explained (`explain`, with `extra`). A text field, not Streamlit's number field: that one
    rewrites what the browser cannot keep as typed (2.5 in a whole-number field became 2, an empty
    field or 1e400 became -9007199254740991, a number past 2**53 kept the previous value) and Start
    then sent the rewritten value. Here the text reaches `read_form` as typed and is refused by name."""
    where.text_input(LABELS[name], key=key_of(name), help=explain(name, extra), placeholder=EMPTY.get(name))


def as_text(value: object) -> str:
    """A number as its field shows it ("" for None: the option's default)."""
    return "" if value is None else str(value)


def prefill(config: dict | None = None) -> None:
    """Put `config`'s values (a stored run's) in the form's fields, or the defaults for the ones
    not filled yet; the fields then take their values from here, never from a default of their own."""
    values = {"task": task_names()[0], **FORM_DEFAULTS,
              **{f"{role}_model": default_model() for role in ROLES}}
    if config is not None:
        values |= {k: config.get(k) for k in values if config.get(k) is not None or k in EMPTY}
    values |= {k: as_text(values[k]) for k in NUMBERS}
    for name, value in values.items():
        if config is not None or key_of(name) not in st.session_state:
            st.session_state[key_of(name)] = value


def like(run: Run) -> None:
    """Open the form filled with `run`'s settings."""
    prefill(run.config)
    st.session_state["open_start"] = True


def read_form(fields: dict) -> tuple[dict, list[tuple[str, str]]]:
    """The options the form's `fields` (option -> value, numbers as the text typed) ask for, and
    every problem at once as (option, text) in the form's order: numbers that are not numbers
    (`parse_option`), out of range or otherwise refused by `make_config`, and, for a model spec
    those leave alone, what `check_model` finds (a GGUF file that does not exist or is not GGUF).
    An empty or 0 budget is no budget."""
    options = dict(fields)
    problems = []
    for name in NUMBERS:
        try:
            options[name] = parse_option(name, options[name], zero_is_none=name in NO_BUDGET)
        except ConfigError as exc:
            problems.append((name, str(exc)))
            options[name] = None
    options |= {f"{role}_model": (options[f"{role}_model"] or "").strip() for role in ROLES}
    try:
        make_config(**options)
    except AutodiffError as exc:
        problems += list(getattr(exc, "problems", None) or [("config", str(exc))])
    named = {name for name, _ in problems}
    for name in (f"{role}_model" for role in ROLES if f"{role}_model" not in named):
        try:
            check_model(options[name])
        except AutodiffError as exc:
            problems.append((name, str(exc)))
    order = list(LABELS)
    return options, sorted(problems, key=lambda p: order.index(p[0]) if p[0] in order else len(order))


def problems_text(problems: list[tuple[str, str]]) -> str:
    """A refusal as markdown: one line per bad field, by its label in the form."""
    return "Start refused:  \n" + "  \n".join(
        f"- **{md(LABELS.get(name, name))}**: {md(text)}"
        + (" (empty or 0 means no budget)" if name in NO_BUDGET else "") for name, text in problems)


def start_form() -> None:
    """Task, models per role, sizes and the options a small local model needs; Start checks all
    of them (model names and files included) before it registers a run, then launches it in the
    background and follows it."""
    prefill()
    with st.form("new_run"):
        st.selectbox("Task", task_names(), key="opt_task")
        for role, col in zip(ROLES, st.columns(3)):
            col.text_input(LABELS[f"{role}_model"], key=key_of(f"{role}_model"),
                           help="provider:model: local:smollm2 (the embedded 135M model), local:/path/to/model.gguf, "
                                "openai:gpt-4o-mini, anthropic:claude-sonnet-4-5, or a model of an OpenAI-compatible "
                                "server (set OPENAI_BASE_URL). Checked before the run is created.")
        left, middle, right = st.columns(3)
        number(left, "steps")
        number(middle, "batch_size")
        right.selectbox(LABELS["review"], ["off", "validated", "all"], key="opt_review",
                        help="validated: proposals that pass validation wait for a person; all: every proposal waits")
        left, right = st.columns(2)
        number(left, "val_limit", "; empty: all. The small local model takes about a second per sample")
        number(right, "test_limit", "; empty: all")
        st.caption(f"For a small optimizer model such as {LOCAL}: lenient proposals takes its untagged replies as "
                   "candidates, and fewer failed samples per step keep each step short.")
        left, middle, right = st.columns(3)
        number(left, "max_failed")
        number(middle, "tau", "; empty: the task's")
        right.checkbox(LABELS["lenient_proposals"], key="opt_lenient_proposals", help=explain("lenient_proposals"))
        left, right = st.columns(2)
        number(left, "budget_usd", "; empty or 0: no budget. It can be resumed with a larger one")
        number(right, "budget_tokens", "; empty or 0: no budget")
        submitted = st.form_submit_button("Start", type="primary")
    if not submitted:  # the last refusal stays until the next Start, though the page reruns meanwhile
        if refused := st.session_state.get(REFUSED):
            st.error(refused)
        return
    options, problems = read_form({name: st.session_state[key_of(name)] for name in LABELS})
    st.session_state[REFUSED] = problems_text(problems) if problems else None
    if not problems:
        try:
            run_id = launch(store, make_config(**options), cache_path())
        except AutodiffError as exc:  # a budget step 0 would not fit in names its field; anything else as said
            st.session_state[REFUSED] = problems_text(exc.problems) if getattr(exc, "problems", None) else md(exc)
    if st.session_state[REFUSED]:
        st.error(st.session_state[REFUSED])
    else:
        st.session_state["started_run"] = run_id
        st.session_state["run_picker"] = run_id  # follow the new run in the sidebar
        st.session_state[START_OPEN] = False
        st.rerun()  # closes the dialog, if the form was in one


def close_start() -> None:
    st.session_state[START_OPEN] = False
    st.session_state[REFUSED] = None


# With runs to show, the form opens in a dialog on demand: its widgets (and their code, which the
# browser loads on first use) cost nothing until then. An empty store shows it straight away. The
# dialog is open until it is dismissed or starts a run (START_OPEN), so a rerun of the page (the
# live table's, when the last live run ends) draws it again instead of closing it: what is typed
# in it, which reaches the server only on Start, stays in the browser.
START_OPEN = "start_open"
REFUSED = "start_refused"  # the last Start's refusal, shown until the next Start or the dialog closes
start_dialog = st.dialog("Start a run", width="large", on_dismiss=close_start)(start_form)
runs = store.runs()
if not runs:
    st.subheader("Start a run")
    start_form()
    st.info("No runs in this store yet. Start one with the form above, or from a shell: "
            "`autodiff train object_counting`.")
    st.stop()
if st.button("Start a run", icon=":material/play_arrow:") or st.session_state.pop("open_start", False):
    st.session_state[START_OPEN] = True
if st.session_state.get(START_OPEN):
    start_dialog()

samples = [r.id for r in runs if r.id in sample_run_ids()]
if samples:
    st.info(f"**The bundled sample runs** ({', '.join(md(r) for r in samples)}) were made by the embedded "
            f"135M-parameter model ({md(LOCAL)}) in every role. They show the mechanics (gradients, proposals, "
            "checks, validation, review), not the gains a stronger backward and optimizer model brings: that small "
            "model writes weak feedback and mostly malformed proposals. To see those gains, start a run with a "
            "provider model as backward and optimizer (e.g. openai:gpt-4o), or a larger GGUF file "
            "(local:/path/to/model.gguf).", icon=":material/info:")


def resume(run: Run) -> None:
    """Resume a run in the background; one its budget stopped, with the new budgets given, and
    one its own retry settings stopped with the option its recovery names. The fields' text is read
    as typed (`parse_option`): one that is not a number refuses the resume by name."""
    new, problems = {}, []
    for key in (*NO_BUDGET, *RESUME_OPTIONS):
        text = st.session_state.get(f"{key}-{run.id}")
        if text is None:  # no such field on the page
            continue
        try:
            new[key] = parse_option(key, text, zero_is_none=key in NO_BUDGET)
        except ConfigError as exc:
            problems.append(f"{resume_label(key)}: {exc}")
    if problems:
        st.session_state["resume_error"] = "Resume refused: " + "; ".join(problems)
        return
    try:  # an empty or 0 budget is None: the run's stays
        resume_background(store, run.id, cache_path(), **{k: v for k, v in new.items() if v is not None})
    except AutodiffError as exc:  # the engine's words name flags; here the fields are what a person sees
        said = str(exc)
        for key in (*NO_BUDGET, *RESUME_OPTIONS):
            said = said.replace(f"--{key.replace('_', '-')}", resume_label(key))
        st.session_state["resume_error"] = f"Resume refused: {said}"


def resume_label(name: str) -> str:
    """The label of a field that changes option `name` on resume."""
    label = {"budget_usd": "New budget (US dollars)", "budget_tokens": "New budget (tokens)"}.get(name)
    return label or f"New {LABELS.get(name, name.replace('_', ' '))} (--{name.replace('_', '-')})"


chosen = next((r for r in runs if r.id == st.session_state.get("run_id")), runs[0])
if what := run_problem(chosen, here=True):
    if what.budget:
        for where, name in zip(st.columns(2), NO_BUDGET):
            where.text_input(resume_label(name), value=as_text(chosen.config.get(name)), key=f"{name}-{chosen.id}",
                             placeholder="the run's", help=explain(name, "; empty: the run's stays"))
    if what.option:  # a stop its own retry settings caused: the option to raise, at the value suggested
        flag, suggested = what.option.split()
        name = flag.removeprefix("--").replace("-", "_")
        st.text_input(resume_label(name), value=suggested, key=f"{name}-{chosen.id}",
                      help=explain(name, f"; now {chosen.config.get(name)}. Only options of how calls are retried "
                                         "and judged can change on resume; models and prompts stay."))
    row = st.container(horizontal=True)  # side by side, each as wide as its label
    if what.outlook != "new_run":
        row.button(f"Resume {chosen.id}" if what.outlook == "go" else f"Resume {chosen.id} after the fix",
                   on_click=resume, args=(chosen,), type="primary" if what.outlook == "go" else "secondary",
                   help="Goes on from its last completed step, in the background, with the run's own models and "
                        "options (only budgets, and the option named above, change).")
    row.button("New run with these settings", on_click=like, args=(chosen,), key="like-chosen",
               help="Opens the Start form filled with this run's task, models and options, to change and start.")
    if error := st.session_state.pop("resume_error", None):
        st.error(md(error))


def models(s: dict) -> str:
    """A run's models: one name when every role has the same, else each role's."""
    names = [s[f"{role}_model"] for role in ROLES]
    if len(set(names)) == 1:
        return f"{names[0]} (every role)"
    return ", ".join(f"{role} {name}" for role, name in zip(ROLES, names))


def progress(run: Run, s: dict) -> str:
    """Where a live run is: the step in progress (step 0 is the initial evaluation), else the last
    step done, of the steps planned."""
    going = [step.step for step in store.steps(run.id) if step.status != "completed"]
    if going:
        return ("step 0 (the initial evaluation) in progress" if going[-1] == 0
                else f"step {going[-1]} of {s['steps_planned']} in progress")
    return f"step {s['steps_done']} of {s['steps_planned']} done"


@st.fragment(run_every=3 if any(r.status in ACTIVE for r in runs) else None)
def live() -> None:
    rows = store.runs()
    summaries = [summary(store, r) for r in rows]
    if not any(r.status in ACTIVE for r in rows) and any(r.status in ACTIVE for r in runs) \
            and not st.session_state.get(START_OPEN):  # not under the open start dialog: it would lose focus
        st.rerun()  # the last live run ended: refresh the whole page, sidebar included
    for run, s in zip(rows, summaries):
        if run.status not in ACTIVE:
            continue
        with st.container(border=True):
            projected = (f", about {md(format_usd(s['to_finish_usd']))} more to finish "
                         f"({md(format_usd(s['projected_usd']))} in all)" if s["projected_usd"] is not None else "")
            budget = (f", budget {md(format_usd(s['budget_usd']))}" if s["budget_usd"] else "") + \
                (f", budget {count(s['budget_tokens'], 'token')}" if s["budget_tokens"] else "")
            st.markdown(f"**{md(s['id'])}** is {s['status']}: {progress(run, s)}, best validation "
                        f"{fmt_score(s['best_val'])}, {md(format_tokens(s['tokens'], s['tokens_unknown']))} tokens, cost "
                        f"{md(format_usd(s['cost_usd'], s['cost_unknown']))}{projected}{budget}, "
                        f"{count(s['pending'], 'proposal')} waiting for review"
                        + (f", {count(s['errors'], 'LLM call')} failed" if s["errors"] else ""))
            st.progress(min(s["steps_done"] / (s["steps_planned"] or 1), 1.0))
            if run.status == "queued":
                st.caption(f"Queued: {md(run.error or 'waiting for a worker')}. A worker is `autodiff worker` "
                           "on any machine that reaches this store's database (AUTODIFF_STORE set to it).")
            effect = stop_effect(run.config)
            if run.stop_requested:
                st.caption(f"Stop requested. {md(effect)}")
            else:
                st.button(f"Stop {run.id}", key=f"stop-{run.id}", on_click=store.request_stop, args=(run.id,),
                          help=effect)
                st.caption(f"Stop: {md(effect)}")
    # Two tables, the figures and then the settings and errors, so that each fits the page at
    # 1024 px wide (sidebar open) instead of one table of 18 columns scrolling sideways; a column
    # empty in every row (nothing projected, no error) is left out.
    st.html(html_tables(html_table(
        [{"run": Link(s["id"], page_url("curves", run=s["id"])), 
          "status": f"{s['status']} ({s['steps_done']}/{s['steps_planned']} steps)", "best validation": fmt_score(s["best_val"]),
          "latest test": fmt_score(s["final_test"]), "tokens": format_tokens(s["tokens"], s["tokens_unknown"]),
          "cost": format_usd(s["cost_usd"], s["cost_unknown"]),
          "projected": format_usd(s["projected_usd"]) if s["status"] != "completed" and s["projected_usd"] is not None
          else "",
          "saved": format_usd(s["saved_usd"], s["saved_unknown"]),
          "call errors": f"{s['errors']:,}",
          "run time (s)": f"{s['wall_s']:,.1f}"} for s in summaries],
        numeric=("best validation", "latest test", "tokens", "cost", "projected", "saved", "call errors",
                 "run time (s)"), drop_empty=("projected",), words=("status",),
    ), html_table(
        [{"run": s["id"], "task": s["task"], "models": models(s), "review": s["review"],
          "started": fmt_time(s["created_at"]), "error": s["error"] or ""} for s in summaries], drop_empty=("error",))))
    st.caption("A run's id opens its curves. Every page names its run in the address (?run=), so a reload "
               "or a shared link opens the same view.")


live()
