"""Compare: two or more runs side by side: curves, cost, final prompts and test samples that differ."""

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from autodiff import compare
from autodiff.diffs import inline_diff_html
from autodiff.llm.pricing import format_tokens, format_usd
from dashboard import charts
from dashboard.common import fmt_score, html_table, html_tables, md, require_run, reset_when, summary
from dashboard.figures import steps_of

store, run_id = require_run()
charts.preload()  # plotly.js loads in the browser while the figures are built here
st.title("Compare")
by_id = {r.id: r for r in store.runs()}
ids = list(by_id)
if len(ids) < 2:
    st.info("Comparing needs at least two runs and this store has one. Start another on the **Runs** page.")
    st.stop()
# Opens on the runs the address names (?compare=a&compare=b: a reload or a shared link opens the
# same comparison), else on the run and the newest other run of its task, again whenever another
# run is chosen.
default = compare.default_runs(list(by_id.values()), run_id)
wanted = st.query_params.get_all("compare")
if wanted and wanted != st.session_state.get("_url:compare"):  # a reload or a shared link, as `from_url`
    st.session_state["compare_runs"] = [w for w in dict.fromkeys(wanted) if w in by_id] or default
    st.session_state["_scope:compare_runs"] = run_id
    if unknown := [w for w in wanted if w not in by_id]:
        st.warning(f"Run{'s' if len(unknown) > 1 else ''} {', '.join(repr(md(w)) for w in unknown)} (from the "
                   "address) not in this store: left out.", icon=":material/warning:")
else:
    reset_when("compare_runs", run_id, default)
chosen = st.multiselect("Runs", ids, key="compare_runs",
                        help="The first run is the baseline the others' prompts are diffed against.")
st.session_state["_url:compare"] = list(chosen)
if st.query_params.get_all("compare") != list(chosen):
    st.query_params["compare"] = list(chosen)
if len(chosen) < 2:
    task = by_id[run_id].task
    st.info("Pick two or more runs." + ("" if len(default) > 1 else
            f" No other run in this store is of task {md(task)}; runs of other tasks share no samples with "
            "it, but their curves and prompts can still be set side by side."))
    st.stop()
shared = compare.shared_test_samples(store, chosen)
if not shared:
    st.warning("These runs share no test samples (their tasks or test splits differ): no sample's outcome can be "
               "compared between them, only their curves and prompts.")

summaries = [summary(store, by_id[r]) for r in chosen]
# One row per run: a plain table (a data grid cost the browser more than this page's charts to lay out).
# Two tables in one element, the figures and then the task and models (as on the Runs page), so
# that each fits the page at 1024 px wide instead of one of 16 columns cutting words and columns.
st.html(html_tables(html_table(
    [{"run": s["id"], "initial validation": fmt_score(s["initial_val"]), "best validation": fmt_score(s["best_val"]),
      "initial test": fmt_score(s["initial_test"]), "latest test": fmt_score(s["final_test"]),
      "tokens": format_tokens(s["tokens"], s["tokens_unknown"]), "cost": format_usd(s["cost_usd"], s["cost_unknown"]),
      "saved": format_usd(s["saved_usd"], s["saved_unknown"]), "LLM calls": f"{s['calls']:,}",
      "run time (s)": f"{s['wall_s']:,.1f}"}  # formatted as on the Runs page
     for s in summaries],
    numeric=("initial validation", "best validation", "initial test", "latest test", "tokens", "cost", "saved",
             "LLM calls", "run time (s)"),
), html_table(
    [{"run": s["id"], "status": s["status"], "steps": s["steps_done"],
      # Faults beside the scores they may have thinned (a sample whose call failed is not scored).
      "call errors": f"{s['errors']:,}", "cut off": f"{s['cut_off']:,}", "task": s["task"],
      "forward model": s["forward_model"], "backward model": s["backward_model"],
      "optimizer model": s["optimizer_model"]} for s in summaries],
    numeric=("steps", "call errors", "cut off"), words=("status", "task"))))  # model names wrap anywhere

steps = pd.DataFrame([{**row, "run": r} for r in chosen for row in steps_of(store, by_id[r])])
if not steps.empty:
    # A step where the cost so far is unknown (no call of it priced) is left out: a gap, never $0.
    steps["cost_cumulative"] = steps["cost_cumulative"].astype(float).where(
        (steps["cost_cumulative"] > 0) | (steps["cost_unknown_cumulative"] == 0))
    runs = [(charts.label(r), steps[steps["run"] == r]) for r in chosen]
    scores = [go.Scatter(x=rows["step"], y=rows[column].astype(float), name=f"{name} {split}", legendgroup=name,
                         mode="lines+markers", connectgaps=False, line={"dash": dash, "color": colour},
                         marker={"color": colour})
              for (name, rows), colour in zip(runs, charts.COLOURS * 4)
              for column, split, dash in (("val_score", "validation", "solid"), ("test_score", "test", "dot"))]
    charts.draw([
        charts.figure("Scores per step (solid: validation, dotted: test, only where measured)", scores,
                      y="score (%)", unit="score", y_range=(0, 1.05)),
        *[tuple(charts.figure(title, [go.Scatter(x=rows["step"], y=rows[column], name=name, mode="lines+markers")
                                      for name, rows in runs], y=y, unit=unit, empty=empty)
                for title, column, y, unit, empty in pair)
          for pair in ((("Cumulative tokens", "tokens_cumulative", "tokens", "tokens", charts.EMPTY),
                        ("Cumulative cost", "cost_cumulative", "cost (USD)", "usd",
                         "No cost to draw: no call of these runs has a known price.")),
                       (("Run time so far", "wall_s_cumulative", "run time (s)", "seconds", charts.EMPTY),))],
    ])
    st.caption("Call errors: LLM calls with no usable reply after their retries (a sample whose call failed is "
               "not scored, so it is in no score); cut off: replies cut off at the token limit. "
               "Run time: each completed step's time from its start to its end, summed (a step in progress or "
               "stopped part-way, time between a stop and a resume and a redone attempt left out), as on the Runs "
               "and Curves pages. "
               "Cumulative cost: steps whose cost so far is unknown (calls of a model without a price, none "
               "priced) are left out, a gap in the line, never drawn as $0; where only some calls have a price, "
               "the line counts the priced ones.")

st.subheader("Final prompts")
st.caption(f"Each run's final value against the baseline {md(chosen[0])}: struck out was removed, green was added.")
for name, values in compare.final_prompts(store, chosen):
    st.markdown(f"**{md(name)}**")
    if all(v == values[0] for v in values):
        st.caption("The same in every run.")
        continue
    for other, value in zip(chosen[1:], values[1:]):
        st.caption(md(other))
        st.html(inline_diff_html(values[0] or "", value or ""))

st.subheader("Test samples whose outcome differs")
differing = compare.differing_samples(store, chosen)
if differing:
    # A plain table, not a data grid: a grid's script loads on a browser tab's first grid (see html_table).
    scores = [c for c in differing[0] if c.endswith(" score")]
    st.html(html_table([{k: fmt_score(v) if k in scores else v for k, v in row.items()} for row in differing],
                       numeric=scores, fold=[c for c in differing[0] if c not in scores]))
elif not shared:
    st.caption("None to compare: the runs share no test samples.")
else:
    st.caption(f"None: every one of the {len(shared)} test samples the runs share scored the same, or was not "
               "scored in all of them (latest test evaluation of each run).")
