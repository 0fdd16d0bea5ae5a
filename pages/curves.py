"""Curves: per step, scores, the mini-batch's outcome, tokens, time and cost by phase, money saved,
proposals by the stage they reached, backward calls made and saved, and LLM calls that errored or
were cut off. Every figure comes from `autodiff.metrics.step_figures` (its docstring defines them)."""

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from autodiff.llm.pricing import format_usd
from autodiff.metrics import FATES, PHASES, STAGE_LABELS
from dashboard import charts
from dashboard.common import ACTIVE, count, md, require_run
from dashboard.figures import steps_of

REDONE = "redone"  # calls of an attempt stopped part-way and redone on resume: spent, not the step's work
OTHER = "other"  # step time with no LLM call running

store, run_id = require_run()
charts.preload()  # plotly.js loads in the browser while the figures are built here
st.title("Curves")
st.caption(f"Run {md(run_id)}")
live = store.run(run_id).status in ACTIVE


def by_phase(df: pd.DataFrame, prefix: str, title: str, y: str, unit: charts.Unit, cumulative: str | None = None,
             extra: tuple[str, ...] = (REDONE,), right: str = "cumulative", unknown: tuple[str, str] | None = None
             ) -> go.Figure:
    """Per step, stacked bars by phase (and the `extra` parts that are not phases, when any is
    non-zero); the running total (the `cumulative` column, else the bars summed) as a line on the
    right-hand axis. `unknown` is (column, what): a step whose `column` counts calls left out of
    its bars (no reported usage, no known price) gets a "+?" mark on top of its bar, whose hover
    text says how many: the bar is a lower bound there, not the step's whole amount."""
    parts = [*PHASES, *(e for e in extra if f"{prefix}{e}" in df and df[f"{prefix}{e}"].any())]
    bars = [go.Bar(x=df["step"], y=df[prefix + p], name=p) for p in parts]
    if unknown is not None and df[unknown[0]].any():
        column, what = unknown
        marked = df[df[column] > 0]
        bars.append(go.Scatter(
            x=marked["step"], y=marked[[prefix + p for p in parts]].sum(axis=1), name=f"+? {what} unknown",
            mode="text", text=["+?"] * len(marked), textposition="top center", cliponaxis=False,
            hovertext=[f"step {step}: at least this; {count(int(n), 'call')} left out ({what} unknown)"
                       for step, n in zip(marked["step"], marked[column])], hoverinfo="text"))
    total = df[cumulative] if cumulative else df[[prefix + p for p in parts]].sum(axis=1).cumsum()
    line = go.Scatter(x=df["step"], y=total, name=f"{right} (right axis)", yaxis="y2", mode="lines",
                      line={"dash": "dot"}, meta=charts.FOREGROUND)
    # The right axis's unit is in its ticks, its name in the line's legend entry.
    y2 = {"overlaying": "y", "side": "right", "showgrid": False, "tickmode": "auto", **charts.axis(unit, list(total))}
    return charts.figure(title, [*bars, line], y=y, unit=unit, barmode="stack",
                         layout={"yaxis2": y2, "legend": {**charts.LAYOUT["legend"], "x": 1.16}})


@st.fragment(run_every=5 if live else None)
def curves() -> None:
    df = pd.DataFrame(steps_of(store, store.run(run_id)))
    if df.empty:
        st.info("This run has no steps yet; the curves appear once its first step (the initial evaluation) ends.")
        return
    # A step in progress is summed up in a line that updates on every refresh; the charts show
    # completed steps only, so they are redrawn once a step ends rather than on every refresh.
    for _, row in df[df["status"] != "completed"].iterrows():
        calls = [f"{phase} {count(row['calls_' + phase], 'call')}, {count(row['tokens_' + phase], 'token')}, "
                 f"{md(format_usd(row['cost_' + phase], row['cost_unknown_' + phase]))}"
                 + (f", {row['errors_' + phase]} errored" if row["errors_" + phase] else "")
                 for phase in PHASES if row["calls_" + phase]]
        state = "in progress" if live else "not finished (redone on resume; its calls below are not in the charts)"
        st.markdown(f"**Step {row['step']} {state}:** {'; '.join(calls) or 'no LLM calls yet'}; "
                    f"{row['wall_s']:,.1f} s so far, not in the run time (which counts completed steps only).")
    df = df[df["status"] == "completed"]
    if df.empty:
        return
    steps = df["step"]
    # cliponaxis off: a point at step 0 or at 100% is drawn whole, not cut by the axis
    score = [go.Scatter(x=steps, y=df[column].astype(float), name=name, mode="lines+markers", connectgaps=False,
                        cliponaxis=False)
             for column, name in (("val_score", "validation"), ("test_score", "test"))]
    samples = [go.Bar(x=steps, y=df[column], name=name) for column, name in (
        ("correct", "correct"), ("sent_backward", "failing, sent backward"),
        ("over_cap", "failing, over the per-step cap"), ("errored_batch", "errored (no score)"))]
    proposals = [go.Bar(x=steps, y=df[fate], name=STAGE_LABELS[fate]) for fate in FATES]
    backward = [go.Bar(x=steps, y=df["calls_backward"], name="made (failing samples sent)"),
                go.Bar(x=steps, y=df["backward_calls_saved"].astype(float), name="saved (correct samples)"),
                go.Bar(x=steps, y=df["backward_calls_over_cap"].astype(float),
                       name="not made (failing samples over the cap)")]
    # A saving whose price is unknown is a gap, never a $0 bar (the Runs page says "unknown" too).
    saved = [go.Bar(x=steps, y=[None if unknown and not usd else usd for usd, unknown in
                                zip(df[column].astype(float), df[unknown_column])], name=name)
             for column, unknown_column, name in (
                 ("cache_saved_usd", "cache_saved_unknown", "by the response cache"),
                 ("backward_saved_usd", "backward_saved_unknown", "by selective backward"))]
    if (df["cache_saved_unknown"].any() or df["backward_saved_unknown"].any()) and not (
            df["cache_saved_usd"].sum() or df["backward_saved_usd"].fillna(0).sum()):
        saved = []  # nothing known was saved, and what was saved has no price: the chart says unknown
    # Faults: a chart only for what happened; a caption says what did not.
    faults = tuple(by_phase(df, f"{total}_", f"{what.capitalize()} per step by phase, and cumulative", what,
                            "count")
                   for total, what in (("errors", "errored calls"), ("cut_off", "cut-off replies"))
                   if df[total].sum())
    priced = not (df["cost_unknown"].sum() and not df["cost"].sum())
    charts.draw([
        (charts.figure("Score per step (test: only where it was measured)", score, y="score (%)", unit="score",
                       y_range=(0, 1.05)),
         charts.figure("Mini-batch samples per step", samples, y="samples", unit="count", barmode="stack")),
        (by_phase(df, "tokens_", "Tokens per step by phase, and cumulative", "tokens", "tokens", "tokens_cumulative",
                  unknown=("tokens_unknown", "tokens")),
         by_phase(df, "wall_s_", "Time per step by phase, and run time", "time (s)", "seconds", "wall_s_cumulative",
                  extra=(OTHER,), right="run time so far")),
        # A run whose calls have no known price draws no cost line at $0: the caption says unknown.
        (*([by_phase(df, "cost_", "Cost per step by phase, and cumulative", "cost (USD)", "usd", "cost_cumulative",
                     unknown=("cost_unknown", "price"))]
           if priced else []),
         charts.figure("Money saved per step", saved, y="saved (USD)", unit="usd", barmode="stack",
                       empty="Unknown: the calls saved have no known price (see the note below).")),
        (charts.figure("Proposals per step by the stage they reached", proposals, y="proposals", unit="count",
                       barmode="group"),
         charts.figure("Backward calls per step: made, saved, over the cap", backward, y="calls", unit="count",
                       barmode="group")),
        *([faults] if faults else []),
    ])
    st.caption("Tokens and cost count fresh calls only (cache hits cost nothing; what they would have cost is "
               "shown as saved). Saved by selective backward: the backward calls the correct samples of the "
               "mini-batch did not need, at the step's calls (and cost) per failing sample sent backward; failing "
               "samples beyond the per-step cap got no call either, and are not a saving. Time per phase: the part "
               "of the step during which a call of that phase was running; other: no call running (the trainer's "
               "own work, a wait for review); run time: the completed steps' times summed (a step in progress, or "
               "stopped part-way and to be redone, is not in it), as on the Runs and Compare pages. "
               "Proposal stages count the proposals that reached them, so no stage is higher than the one "
               "before.")
    st.caption(redone_note(df))
    st.caption(cost_note(df))
    st.caption(fault_note(df))


def redone_note(df: pd.DataFrame) -> str:
    """Which steps were stopped part-way and redone on resume, and what their first attempts spent."""
    redone = df[df["calls_redone"] > 0]
    if redone.empty:
        return "No step was redone after a stop: every call counts in its step as shown."
    parts = [f"step {r['step']}: {count(r['calls_redone'], 'call')}, {count(r['tokens_redone'], 'token')}, "
             f"{md(format_usd(r['cost_redone'], r['cost_unknown_redone']))}" for _, r in redone.iterrows()]
    return ("Redone after a stop (the attempt stopped part-way, then redone whole on resume): "
            + "; ".join(parts) + ". Its calls were really made, so their tokens and cost are in the bars (as "
            "'redone') and the totals; the step's calls by phase, backward counts and time are its final attempt's.")


def cost_note(df: pd.DataFrame) -> str:
    """Where the prices come from, and what was not priced."""
    unknown = int(df["cost_unknown"].sum())
    note = (f"Cost of the completed steps: {md(format_usd(df['cost_cumulative'].iloc[-1], unknown))}, each call priced "
            "when it was made (genai-prices' table, your own prices, or 0 for local models).")
    no_usage = int(df["tokens_unknown"].sum())
    note += (f" {count(no_usage, 'reply', 'replies')} came from a server that reported no token usage: "
             f"{'its' if no_usage == 1 else 'their'} tokens are unknown, not in the token bars or totals (a step "
             "with such a reply has +? on its bar)."
             if no_usage else "")
    return note + (f" {count(unknown, 'call')} {'has' if unknown == 1 else 'have'} no known price and "
                   f"{'is' if unknown == 1 else 'are'} left out of the bars (+? on the step's bar): a model the price "
                   "table lacks (set its price with --price), or a server that reported no token usage." if unknown else "") + saved_note(df)


def saved_note(df: pd.DataFrame) -> str:
    """Which savings could not be priced (left out of the money-saved bars), if any."""
    cache, backward = int(df["cache_saved_unknown"].sum()), int(df["backward_saved_unknown"].sum())
    if not cache and not backward:
        return ""
    parts = ([f"{count(cache, 'cache hit')} with no known price (its model not in the price table, or its reply "
              "made without reported token usage)"] if cache else []) + \
        ([f"the backward calls saved at {count(backward, 'step')}, whose backward calls have no known price"]
         if backward else [])
    return f" Money saved leaves out {' and '.join(parts)}: unknown, not \\$0."


def fault_note(df: pd.DataFrame) -> str:
    """What the fault charts count, or that there was nothing to count, and the samples left unscored."""
    errors, cut_off = int(df["errors"].sum()), int(df["cut_off"].sum())
    val, test = int(df["samples_errored_val"].sum()), int(df["samples_errored_test"].sum())
    parts = [
        f"LLM calls that errored (no usable reply after their retries): {errors:,}" if errors
        else "No LLM call errored in the completed steps",
        f"replies cut off at the token limit: {cut_off:,}" if cut_off else "no reply was cut off at the token limit",
    ]
    unscored = (f" Samples left unscored because a call failed, summed over the steps: {val:,} validation, "
                f"{test:,} test (the scores leave them out)." if val or test else "")
    return "; ".join(parts) + "." + unscored


curves()
