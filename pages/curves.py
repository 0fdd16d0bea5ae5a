"""Curves: scores, tokens, cost and time by phase, proposals by fate, backward calls saved, money saved,
and LLM calls that errored or were cut off by phase, per step."""

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from autodiff.llm.pricing import format_usd
from autodiff.metrics import FATES, PHASES, step_figures
from dashboard import charts
from dashboard.common import ACTIVE, md, require_run

FATE_LABELS = dict(zip(FATES, ("proposed", "passed mini-batch", "passed validation", "accepted",
                               "rejected by a person")))

store, run_id = require_run()
st.title("Curves")
st.caption(f"Run {md(run_id)}")
live = store.run(run_id)["status"] in ACTIVE


def by_phase(df: pd.DataFrame, prefix: str, unit: str, cumulative: str | None = None) -> go.Figure:
    """Per step, stacked bars by phase; the running total (the `cumulative` column when the
    figures have one, else the bars summed) as a line on the right-hand axis."""
    bars = [go.Bar(x=df["step"], y=df[prefix + p], name=p) for p in PHASES]
    total = df[cumulative] if cumulative else df[[prefix + p for p in PHASES]].sum(axis=1).cumsum()
    line = go.Scatter(x=df["step"], y=total, name="cumulative (right axis)", yaxis="y2", mode="lines",
                      line={"color": "#444444", "dash": "dot"})
    right = {"title": {"text": f"{unit} so far"}, "overlaying": "y", "side": "right", "rangemode": "tozero",
             "showgrid": False}
    return charts.figure(f"{unit[:1].upper()}{unit[1:]} per step by phase, and cumulative", [*bars, line], y=unit,
                         barmode="stack", layout={"yaxis2": right})


@st.fragment(run_every=5 if live else None)
def curves() -> None:
    df = pd.DataFrame(step_figures(store, run_id))
    if df.empty:
        st.info("This run has no steps yet; the curves appear once its first step (the initial evaluation) ends.")
        return
    # A step in progress is summed up in a line that updates on every refresh; the charts show
    # completed steps only, so they are redrawn once a step ends rather than on every refresh.
    for _, row in df[df["status"] != "completed"].iterrows():
        calls = [f"{phase} {row['calls_' + phase]} calls, {row['tokens_' + phase]:,} tokens, "
                 f"{md(format_usd(row['cost_' + phase], row['cost_unknown_' + phase]))}"
                 + (f", {row['errors_' + phase]} errored" if row["errors_" + phase] else "")
                 for phase in PHASES if row["calls_" + phase]]
        state = "in progress" if live else "not finished (redone on resume; its calls below are not in the charts)"
        st.markdown(f"**Step {row['step']} {state}:** {'; '.join(calls) or 'no LLM calls yet'}.")
    df = df[df["status"] == "completed"]
    if df.empty:
        return
    score = [go.Scatter(x=df["step"], y=df[column].astype(float), name=name, mode="lines+markers", connectgaps=True)
             for column, name in (("val_score", "validation"), ("test_score", "test"))]
    proposals = [go.Bar(x=df["step"], y=df[fate], name=name) for fate, name in FATE_LABELS.items()]
    backward = [go.Bar(x=df["step"], y=df["calls_backward"], name="made (failed samples)"),
                go.Bar(x=df["step"], y=df["backward_calls_saved"].astype(float), name="saved (correct samples)")]
    saved = [go.Bar(x=df["step"], y=df["cache_saved_usd"], name="by the response cache"),
             go.Bar(x=df["step"], y=df["backward_saved_usd"].astype(float), name="by selective backward")]
    # Faults: a chart only for what happened; a caption says what did not.
    faults = tuple(by_phase(df, f"{total}_", unit) for total, unit in (("errors", "errored calls"),
                                                                    ("cut_off", "cut-off replies"))
                   if df[total].sum())
    priced = not (df["cost_unknown"].sum() and not df["cost"].sum())
    charts.draw([
        charts.figure("Score per step", score, y="score", y_range=(0, 1.05)),
        (by_phase(df, "tokens_", "tokens", "tokens_cumulative"), by_phase(df, "wall_s_", "seconds")),
        # A run whose calls have no known price draws no cost line at $0: the caption says unknown.
        (*([by_phase(df, "cost_", "US dollars", "cost_cumulative")] if priced else []),
         charts.figure("US dollars saved per step", saved, y="US dollars", barmode="stack")),
        (charts.figure("Proposals per step by how far they got", proposals, y="proposals", barmode="group"),
         charts.figure("Backward calls made, and saved by selective backward", backward, y="calls",
                       barmode="group")),
        *([faults] if faults else []),
    ])
    st.caption("Tokens and cost count fresh calls only (cache hits cost nothing; what they would have cost is "
               "shown as saved, with the backward calls correct samples did not need at the step's cost per "
               "failed sample). Time per phase is the wall-clock span of its calls; phases of one step may overlap.")
    st.caption(cost_note(df))
    st.caption(fault_note(df))


def cost_note(df: pd.DataFrame) -> str:
    """Where the prices come from, and what was not priced."""
    unknown = int(df["cost_unknown"].sum())
    note = (f"Cost of the completed steps: {md(format_usd(df['cost_cumulative'].iloc[-1], unknown))}, each call priced "
            "when it was made (genai-prices' table, your own prices, or 0 for local models).")
    return note + (f" {unknown:,} calls have no known price and are left out of the bars: their model is "
                   "not in the price table (set one with --price)." if unknown else "")


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
