"""Prompts: each parameter's versions, a word diff of any two, the peers beside it, why it changed, and
every proposal made for it with what it cost to make and to validate."""

import streamlit as st

from autodiff import proposals as props
from autodiff.diffs import inline_diff_html, word_diff_html
from autodiff.llm.pricing import format_usd
from autodiff.store import NO_PROPOSAL_COST
from dashboard.common import (choose, fmt_score, fmt_time, html_pre, html_table, md, page_url, require_run,
                              unlinked_costs)
from dashboard.graphview import gradient_rows

store, run_id = require_run()
st.title("Prompts")

parameters = {p.name: p for p in store.parameters(run_id)}
if not parameters:
    st.info("This run has no parameters stored yet.")
    st.stop()
every_version = store.parameter_versions(run_id)
counts = {n: sum(v.name == n for v in every_version) for n in parameters}
names = list(parameters)
changed = [n for n in names if counts[n] > 1]
# Opens on the first parameter that changed; the choice is kept in the URL (?parameter=).
name = choose(st, "Parameter", names, key="prompt_param", scope=run_id, url="parameter",
              index=names.index(changed[0]) if changed else 0,
              format_func=lambda n: f"{n} ({counts[n]} version{'' if counts[n] == 1 else 's'})")
param = parameters[name]
st.caption(f"{md(param.kind)} of node {md(param.node)}"
           f"{'' if param.trainable else ' (frozen)'} — {md(param.role)}")

versions = {v.version: v for v in every_version if v.name == name}
if not versions:
    st.info("No version of this parameter is stored yet: the run writes them when it starts.")
    st.stop()
st.html(html_table(  # a handful of rows: a plain table draws faster than a data grid
    [{"version": v.version, "step": v.step, "from": "initial" if v.proposal_id is None else "proposal",
      "proposal": v.proposal_id or "", "chars": len(v.value), "at": fmt_time(v.created_at)}
     for v in versions.values()],
    numeric=("version", "step", "chars"),
))


def label(n: int) -> str:
    return f"v{n} (step {versions[n].step})"


numbers = list(versions)
if len(numbers) == 1:
    old = new = numbers[0]
    st.caption(f"{label(new)} is its only version: this parameter has not changed.")
else:  # the pickers open on the last change, again whenever another run or parameter is chosen
    pick = st.columns(2)
    old = choose(pick[0], "Compare", numbers, index=len(numbers) - 2, format_func=label, key="prompt_old",
                 scope=(run_id, name), url="from")
    new = choose(pick[1], "with", numbers, index=len(numbers) - 1, format_func=label, key="prompt_new",
                 scope=(run_id, name), url="to")
left, right = word_diff_html(versions[old].value, versions[new].value)
peers_at = store.parameter_values_at(run_id, versions[new].step)
cols = st.columns(3)
cols[0].markdown(f"**{label(old)}**")
cols[0].html(left)
cols[1].markdown(f"**{label(new)}**")
cols[1].html(right)
cols[2].markdown(f"**Peers at step {versions[new].step}**")
for peer in param.peers:
    cols[2].caption(md(peer))
    cols[2].html(html_pre(peers_at.get(peer, "(no value stored)")))
if not param.peers:
    cols[2].caption("None: this parameter is its node's whole prompt.")

proposals = {p.id: p for p in store.proposals(run_id, parameter=name)}
st.subheader("Proposals")
if proposals:
    costs = store.proposal_costs(run_id)
    none = NO_PROPOSAL_COST
    # A plain table, long text folded (html_table says why not a data grid). Past a dozen rows it scrolls in a
    # box of its own, as the grid did, so that the versions below stay near.
    (st.container(height=480) if len(proposals) > 12 else st).html(html_table(
        [{"step": p.step, "method": p.method, "fate": p.fate, "mini-batch": fmt_score(p.minibatch_score),
          "validation": fmt_score(p.val_score), "cost to make": format_usd(c["make_usd"], c["make_unknown"]),
          "cost to validate": format_usd(c["validate_usd"], c["validate_unknown"]), "reason": p.reason, "value": p.value}
         for p in proposals.values() for c in [costs.get(p.id, none)]],
        numeric=("step", "mini-batch", "validation", "cost to make", "cost to validate"), words=("method", "fate"),
        fold=("reason", "value"),
    ))
    st.caption("Cost to make: the optimizer call that wrote it, shared by the proposals of that call. Cost to "
               "validate: the calls that scored it on the mini-batch and on validation."
               + unlinked_costs(costs.get(p, none) for p in proposals))
else:
    st.caption("No proposal has been made for this parameter yet.")

st.subheader("How each version came about")
previous = dict(zip(numbers[1:], numbers))
for n, v in versions.items():
    if v.proposal_id is None:
        continue
    p = proposals[v.proposal_id]
    with st.expander(f"{label(n)}: {md(p.method)} proposal, {p.fate}", expanded=n == new):
        st.markdown(
            f"Mini-batch {fmt_score(p.minibatch_score)} vs {fmt_score(p.minibatch_baseline)} · "
            f"validation {fmt_score(p.val_score)} vs {fmt_score(p.val_baseline)} · "
            f"decided by {md(p.decision_by or p.decided_by or 'the trainer')}"
        )
        if p.reasoning and p.reasoning.strip():
            st.markdown("**Reasoning:** " + md(p.reasoning))
        change, why = st.columns(2)
        change.markdown(f"**{label(previous[n])} → {label(n)}**")
        change.html(inline_diff_html(versions[previous[n]].value, v.value))
        # What its optimizer call read, as recorded with the proposal when the call was made.
        feedback = props.feedback_read(store, p)
        why.markdown(f"**Feedback the optimizer read** ({'not recorded' if feedback is None else len(feedback)})")
        if feedback is None:
            why.caption("Not recorded: this proposal was stored before proposals kept the ids of the feedback "
                        "they were written from.")
        elif not feedback:
            why.caption("None: its optimizer call read no feedback.")
        else:
            why.html(html_table(gradient_rows(feedback), numeric=("step", "call", "score"), fold=("feedback",),
                                drop_empty=("error",)))
        st.markdown(f"[Every proposal for {md(name)} at step {v.step}]"
                    f"({page_url('proposals', run=run_id, step=v.step, parameter=name)})")
