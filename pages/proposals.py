"""Proposals: every proposal of the run, whatever became of it: its scores at each stage, the word diff
against the value it would have replaced, the feedback its optimizer call read, and that call."""

import html

import streamlit as st

from autodiff import proposals as props
from autodiff.diffs import inline_diff_html, word_diff_html
from autodiff.llm.pricing import format_usd
from autodiff.metrics import funnel, proposal_figures
from autodiff.store import NO_PROPOSAL_COST
from autodiff.records import PROPOSAL_FATES, Proposal
from dashboard.common import (ALL, choose, count, fmt_score, md, page_url, require_run, reset_when, show_call,
                              unlinked_costs)
from dashboard.figures import funnel_sentence

PER_PAGE = 10

store, run_id = require_run()
st.title("Proposals")
every = store.proposals(run_id)
if not every:
    st.info("No proposals yet: the optimizer writes them for each trainable parameter from the feedback of a "
            "training step's failing samples.")
    st.stop()

cols = st.columns([1, 3, 2])
step = choose(cols[0], "Step", [ALL, *dict.fromkeys(p.step for p in every)], key="props_step", scope=run_id,
              url="step")
parameter = choose(cols[1], "Parameter", [ALL, *dict.fromkeys(p.parameter for p in every)], key="props_param",
                   scope=run_id, url="parameter")
fate = choose(cols[2], "Fate", [ALL, *props.fates_in(every)], key="props_fate", scope=run_id, url="fate",
              help="; ".join(f"{name}: {meaning}" for name, meaning in PROPOSAL_FATES.items()))
shown = props.select(every, step=None if step == ALL else step, parameter=None if parameter == ALL else parameter,
                     fate=None if fate == ALL else fate)
st.caption(f"{len(shown)} of {count(len(every), 'proposal')}, in the order they were made.")
stages = funnel(r for r in proposal_figures(store, run_id) if step == ALL or r["step"] == step)
st.caption(f"{'Every step' if step == ALL else f'Step {step}'}, by the stage each proposal reached (each stage "
           f"counts those that got at least that far, as on the Curves page): {funnel_sentence(stages)}.")
if not shown:
    st.stop()
costs = store.proposal_costs(run_id)  # what each cost to make (its optimizer call) and to validate
NO_COST = NO_PROPOSAL_COST
# The table of every proposal shown is drawn only when opened: a data grid's script (about 1.6 MB)
# loads on a browser tab's first grid, and with it a first visit to this page took about 0.3 s longer
# (bench/dashboard_load.py's large run, 803 proposals); the cards below say the same of each.
table = st.expander(f"Table of the {count(len(shown), 'proposal')} shown (sortable)", key="props_table",
                    on_change="rerun")
if table.open:
    table.dataframe([{"step": p.step, "parameter": p.parameter, "method": p.method, "fate": p.fate,
                      # a missing score reads "-" here as on the cards (fmt_score), not the grid's "None"
                      "mini-batch": fmt_score(p.minibatch_score), "its baseline": fmt_score(p.minibatch_baseline),
                      "validation": fmt_score(p.val_score), "best before": fmt_score(p.val_baseline),
                      "cost to make": format_usd(c["make_usd"], c["make_unknown"]),
                      "cost to validate": format_usd(c["validate_usd"], c["validate_unknown"]), "reason": p.reason}
                     for p in shown for c in [costs.get(p.id, NO_COST)]], hide_index=True)
if unlinked := unlinked_costs(costs.get(p.id, NO_COST) for p in shown):
    st.caption(unlinked.strip())

pages = max(1, -(-len(shown) // PER_PAGE))
page = 1
if pages > 1:
    reset_when("props_page", (run_id, step, parameter, fate), 1)
    page = st.number_input("Page", 1, pages, key="props_page")
current = shown[(page - 1) * PER_PAGE: page * PER_PAGE]


def scores(p: Proposal) -> str:
    stages = [f"{name} {fmt_score(score)} vs {fmt_score(base)}" for name, score, base in
              (("mini-batch", p.minibatch_score, p.minibatch_baseline), ("validation", p.val_score, p.val_baseline))
              if score is not None]
    return " · ".join(stages) or "not scored"


def side_by_side(titles: tuple[str, str], blocks: tuple[str, str]) -> str:
    """Two HTML blocks (escaped already: `word_diff_html`'s) under their titles, side by side where
    the page is wide enough, else one under the other: one element for the browser to draw where
    two columns of a caption and a block each were seven."""
    cells = "".join(f'<div><div style="font-size: 0.875rem; opacity: 0.6; margin-bottom: 0.25rem">'
                    f"{html.escape(title)}</div>{block}</div>" for title, block in zip(titles, blocks))
    return f'<div style="display: grid; grid-template-columns: repeat(auto-fit, minmax(18rem, 1fr)); gap: 1rem">' \
           f"{cells}</div>"


def cost(p: Proposal) -> str:
    c = costs.get(p.id, NO_COST)
    return (f"cost to make {md(format_usd(c['make_usd'], c['make_unknown']))}, to validate "
            f"{md(format_usd(c['validate_usd'], c['validate_unknown']))}")


for p, old in zip(current, props.replaced_values(store, run_id, current)):
    with st.container(border=True):
        held = f" (held for review as {md(p.held_fate)})" if p.held_fate else ""
        st.markdown(f"**Step {p.step} · {md(p.parameter)}** · method {md(p.method)} · "
                    f"**{md(p.fate)}**{held} · {scores(p)} · {cost(p)}"
                    + (f" · decided by {md(p.decision_by or p.decided_by)}" if p.decided_by else ""))
        st.markdown(f"Why: {md(p.reason) or '-'}")
        if p.reasoning:
            st.markdown(f"Optimizer's reasoning: {md(p.reasoning)}")
        if p.fate == "error":
            st.caption("No value: the optimizer call gave no reply.")
        elif p.method == "none":  # a malformed reply: what the optimizer wrote, as it wrote it
            st.caption("The optimizer's reply, which held no usable proposal")
            st.code(p.value, language=None, wrap_lines=True)
        else:
            st.html(side_by_side(("The value it would have replaced", "Proposed value"), word_diff_html(old, p.value)))
        if p.decision == "edit" and p.decision_value:
            st.caption("Edited by a person before accepting: their value against the proposed one")
            st.html(inline_diff_html(p.value if p.method != "none" else old, p.decision_value))

        # Drawn only when opened, like the call below: a card's feedback is often a dozen long texts.
        feedback = props.feedback_read(store, p)
        read = "not recorded" if feedback is None else len(feedback)
        panel = st.expander(f"Feedback its optimizer call read ({read})", key=f"prop_feedback_{p.id}", on_change="rerun")
        if panel.open:
            if feedback is None:
                panel.caption("Not recorded: this proposal was stored before proposals kept the ids of the feedback "
                              "they were written from.")
            for g in feedback or ():
                about = "-" if g.about_call is None else g.about_call
                panel.markdown(f"**{md(g.origin)}** · step {g.step} · sample {md(g.sample_id or '-')} · "
                               f"call {about} · score {fmt_score(g.score)}  \n{md(g.text)}")
            if feedback:
                panel.markdown(f"[Every gradient of step {p.step} on the Gradients page]"
                               f"({page_url('gradients', run=run_id, step=p.step)})")

        if not p.llm_call_id:
            continue
        # Loaded and drawn only when opened: optimizer prompts are long.
        panel = st.expander("Optimizer call that wrote it", key=f"prop_call_{p.id}", on_change="rerun")
        if not panel.open:
            continue
        with panel:
            show_call(store.call(p.llm_call_id))
