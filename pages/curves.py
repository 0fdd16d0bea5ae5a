"""Curves: scores, tokens and time by phase, proposals by fate, and backward calls saved, per step."""

import pandas as pd
import plotly.express as px
import streamlit as st

from autodiff.metrics import FATES, PHASES, step_figures
from dashboard.common import md, require_run

FATE_LABELS = dict(zip(FATES, ("proposed", "passed mini-batch", "passed validation", "accepted",
                               "rejected by a person")))

store, run_id = require_run()
st.title("Curves")
st.caption(f"Run {md(run_id)}")
live = store.run(run_id)["status"] in ("created", "running")


def by_phase(df: pd.DataFrame, prefix: str, cumulative: bool = False) -> pd.DataFrame:
    """Long form (step, phase, value) of the per-phase columns `prefix + phase`."""
    wide = df.set_index("step")[[prefix + p for p in PHASES]].rename(columns=lambda c: c.removeprefix(prefix))
    return (wide.cumsum() if cumulative else wide).reset_index().melt("step", var_name="phase", value_name="value")


@st.fragment(run_every=5 if live else None)
def curves() -> None:
    df = pd.DataFrame(step_figures(store, run_id))
    if df.empty:
        st.info("This run has no steps yet; the curves appear once its first step (the initial evaluation) ends.")
        return
    scores = df[["step", "val_score", "test_score"]].astype(float).rename(
        columns={"val_score": "validation", "test_score": "test"})
    fig = px.line(scores, x="step", y=["validation", "test"], markers=True, title="Score per step",
                  labels={"value": "score", "variable": "split"})
    st.plotly_chart(fig.update_traces(connectgaps=True).update_yaxes(range=[0, 1.05]).update_xaxes(dtick=1))

    for prefix, unit in (("tokens_", "tokens"), ("wall_s_", "seconds")):
        left, right = st.columns(2)
        left.plotly_chart(px.bar(by_phase(df, prefix), x="step", y="value", color="phase",
                                 title=f"{unit.capitalize()} per step by phase", labels={"value": unit}))
        right.plotly_chart(px.area(by_phase(df, prefix, cumulative=True), x="step", y="value", color="phase",
                                   title=f"Cumulative {unit} by phase", labels={"value": unit}))
    st.caption("Tokens count fresh calls only (cache hits cost nothing). Time per phase is the wall-clock span "
               "of its calls; phases of one step may overlap.")

    fates = df.set_index("step")[list(FATES)].rename(columns=FATE_LABELS).reset_index()
    st.plotly_chart(px.bar(fates.melt("step", var_name="fate", value_name="proposals"), x="step", y="proposals",
                           color="fate", barmode="group", title="Proposals per step by how far they got"))

    backward = df[["step", "calls_backward", "backward_calls_saved"]].astype(float).rename(
        columns={"calls_backward": "backward calls made", "backward_calls_saved": "backward calls saved"})
    st.plotly_chart(px.bar(backward, x="step", y=["backward calls made", "backward calls saved"], barmode="group",
                           title="Backward calls: made for failed samples, saved on correct ones",
                           labels={"value": "calls", "variable": ""}))


curves()
