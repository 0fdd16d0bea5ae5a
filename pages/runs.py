"""Runs: every run in the store, live progress of the running ones, and a form to start a new one."""

import streamlit as st

from autodiff.config import default_model
from autodiff.config import make_config
from autodiff.errors import AutodiffError
from autodiff.llm.pricing import format_usd
from autodiff.runner import launch, resume_background
from autodiff.tasks import task_names
from dashboard.common import (ACTIVE, Link, cache_path, current_store, fmt_score, fmt_time, html_table, md,
                              page_url, summary)

ROLES = ("forward", "backward", "optimizer")

store = current_store()
st.title("Runs")
if started := st.session_state.pop("started_run", None):
    st.success(f"Started run {md(started)} in the background: it goes on if you close this tab.")


def start_form() -> None:
    """Task, models per role and sizes; Start launches the run in the background and follows it."""
    with st.form("new_run"):
        task = st.selectbox("Task", task_names())
        models = {role: col.text_input(f"{role.capitalize()} model", value=default_model(), key=f"model_{role}",
                                       help="provider:model, e.g. local:smollm2, openai:gpt-4o-mini")
                  for role, col in zip(ROLES, st.columns(3))}
        left, middle, right = st.columns(3)
        steps = left.number_input("Steps", min_value=1, max_value=1000, value=3)
        batch_size = middle.number_input("Batch size", min_value=1, max_value=256, value=4)
        review = right.selectbox("Review mode", ["off", "validated", "all"],
                                 help="validated: proposals that pass validation wait for a person; "
                                      "all: every proposal waits")
        left, right = st.columns(2)
        val_limit = left.number_input("Validation samples", min_value=1, max_value=1000, value=20,
                                      help="the first N of the task's validation split (the small local "
                                           "model takes about a second per sample)")
        test_limit = right.number_input("Test samples", min_value=1, max_value=1000, value=20)
        left, right = st.columns(2)
        budget_usd = left.number_input("Budget (US dollars)", min_value=0.0, value=0.0, step=0.5, format="%.4f",
                                       help="stop the run cleanly before a call that could take its cost past "
                                            "this; 0: no budget. It can be resumed with a larger one")
        budget_tokens = right.number_input("Budget (tokens)", min_value=0, value=0, step=10_000,
                                           help="the same, in tokens of fresh calls; 0: no budget")
        submitted = st.form_submit_button("Start", type="primary")
    if not submitted:
        return
    try:
        config = make_config(task=task, steps=steps, batch_size=batch_size, review=review, val_limit=val_limit,
                             test_limit=test_limit, budget_usd=budget_usd or None, budget_tokens=budget_tokens or None,
                             **{f"{role}_model": models[role].strip() for role in ROLES})
        run_id = launch(store, config, cache_path())
    except AutodiffError as exc:
        st.error(md(exc))
    else:
        st.session_state["started_run"] = run_id
        st.session_state["run_picker"] = run_id  # follow the new run in the sidebar
        st.rerun()  # closes the dialog, if the form was in one


# With runs to show, the form opens in a dialog on demand: its widgets (and their code, which the
# browser loads on first use) cost nothing until then. An empty store shows it straight away.
start_dialog = st.dialog("Start a run", width="large")(start_form)
runs = store.runs()
if not runs:
    st.subheader("Start a run")
    start_form()
    st.info("No runs in this store yet. Start one with the form above, or from a shell: "
            "`autodiff train object_counting`.")
    st.stop()
if st.button("Start a run", icon=":material/play_arrow:"):
    start_dialog()

def resume(run: dict) -> None:
    """Resume a run in the background; one its budget stopped, with the new budgets given."""
    new = {key: st.session_state.get(f"{key}-{run['id']}") or None for key in ("budget_usd", "budget_tokens")}
    try:
        resume_background(store, run["id"], cache_path(), **new)
    except AutodiffError as exc:
        st.session_state["resume_error"] = str(exc)


chosen = next((r for r in runs if r["id"] == st.session_state.get("run_id")), runs[0])
if chosen["status"] in ("stopped", "failed"):
    if (chosen["error"] or "").startswith("budget"):
        st.warning(f"{md(chosen['id'])} stopped at its budget. Give it a larger one to go on:")
        left, right = st.columns(2)
        left.number_input("New budget (US dollars)", min_value=0.0, value=chosen["config"].get("budget_usd") or 0.0,
                          step=0.5, format="%.4f", key=f"budget_usd-{chosen['id']}")
        right.number_input("New budget (tokens)", min_value=0, value=chosen["config"].get("budget_tokens") or 0,
                           step=10_000, key=f"budget_tokens-{chosen['id']}")
    st.button(f"Resume {chosen['id']}", on_click=resume, args=(chosen,),
              help="Goes on from its last completed step, in the background.")
    if error := st.session_state.pop("resume_error", None):
        st.error(md(error))


@st.fragment(run_every=3 if any(r["status"] in ACTIVE for r in runs) else None)
def live() -> None:
    rows = store.runs()
    summaries = [summary(store, r) for r in rows]
    if not any(r["status"] in ACTIVE for r in rows) and any(r["status"] in ACTIVE for r in runs):
        st.rerun()  # the last live run ended: refresh the whole page, sidebar included
    for run, s in zip(rows, summaries):
        if run["status"] not in ACTIVE:
            continue
        with st.container(border=True):
            projected = (f", about {md(format_usd(s['to_finish_usd']))} more to finish "
                         f"({md(format_usd(s['projected_usd']))} in all)" if s["projected_usd"] is not None else "")
            budget = (f", budget {md(format_usd(s['budget_usd']))}" if s["budget_usd"] else "") + \
                (f", budget {s['budget_tokens']:,} tokens" if s["budget_tokens"] else "")
            st.markdown(f"**{md(s['id'])}** is {s['status']}: step {s['steps_done']} of {s['steps_planned']} "
                        f"done, best validation {fmt_score(s['best_val'])}, {s['tokens']} tokens, cost "
                        f"{md(format_usd(s['cost_usd'], s['cost_unknown']))}{projected}{budget}, "
                        f"{s['pending']} proposals waiting for review"
                        + (f", {s['errors']} LLM calls failed" if s["errors"] else ""))
            st.progress(min(s["steps_done"] / (s["steps_planned"] or 1), 1.0))
            if run["stop_requested"]:
                st.caption("Stop requested: the run stops at the next step boundary.")
            else:
                st.button("Stop", key=f"stop-{run['id']}", on_click=store.request_stop, args=(run["id"],))
    st.html(html_table(
        # the figures first, so they show without scrolling sideways on a narrow screen
        [{"run": Link(s["id"], page_url("curves", run=s["id"])), "task": s["task"], "status": s["status"],
          "steps": f"{s['steps_done']} / {s['steps_planned']}", "best validation": fmt_score(s["best_val"]),
          "latest test": fmt_score(s["final_test"]), "tokens": f"{s['tokens']:,}",
          "cost": format_usd(s["cost_usd"], s["cost_unknown"]),
          "projected": format_usd(s["projected_usd"]) if s["status"] != "completed" and s["projected_usd"] is not None
          else "",
          "saved": format_usd(s["saved_usd"], s["saved_unknown"]),
          "call errors": f"{s['errors']:,}",
          "wall time (s)": f"{s['wall_s']:,.1f}", "forward model": s["forward_model"],
          "backward model": s["backward_model"], "optimizer model": s["optimizer_model"], "review": s["review"],
          "started": fmt_time(s["created_at"]), "error": s["error"] or ""} for s in summaries],
        numeric=("best validation", "latest test", "tokens", "cost", "projected", "saved", "call errors",
                 "wall time (s)"),
    ))
    st.caption("A run's id opens its curves. Every page names its run in the address (`?run=`), so a reload "
               "or a shared link opens the same view.")


live()
