"""Prompts: each parameter's versions, a word diff of any two, the peers beside it, why it changed, and
every proposal made for it with what it cost to make and to validate."""

import streamlit as st

from autodiff import graphview as gv
from autodiff import review
from autodiff.diffs import word_diff_html
from autodiff.llm.pricing import format_usd
from dashboard.common import fmt_score, fmt_time, md, require_run

store, run_id = require_run()
st.title("Prompts")

parameters = {p["name"]: p for p in store.parameters(run_id)}
if not parameters:
    st.info("This run has no parameters stored yet.")
    st.stop()
name = st.selectbox("Parameter", list(parameters), key="prompt_param")
param = parameters[name]
st.caption(f"{md(param['kind'])} of node {md(param['node'])}"
           f"{'' if param['trainable'] else ' (frozen)'} — {md(param['role'])}")

versions = {v["version"]: v for v in store.parameter_versions(run_id, name)}
if not versions:
    st.info("No version of this parameter is stored yet: the run writes them when it starts.")
    st.stop()
st.dataframe(
    [{"version": v["version"], "step": v["step"], "from": "initial" if v["proposal_id"] is None else "proposal",
      "proposal": v["proposal_id"] or "", "chars": len(v["value"]), "at": fmt_time(v["created_at"])}
     for v in versions.values()],
    hide_index=True,
)


def label(n: int) -> str:
    return f"v{n} (step {versions[n]['step']})"


numbers = list(versions)
pick = st.columns(2)
old = pick[0].selectbox("Compare", numbers, index=max(0, len(numbers) - 2), format_func=label, key="prompt_old")
new = pick[1].selectbox("with", numbers, index=len(numbers) - 1, format_func=label, key="prompt_new")
left, right = word_diff_html(versions[old]["value"], versions[new]["value"])
peers_at = store.parameter_values_at(run_id, versions[new]["step"])
cols = st.columns(3)
cols[0].markdown(f"**{label(old)}**")
cols[0].html(left)
cols[1].markdown(f"**{label(new)}**")
cols[1].html(right)
cols[2].markdown(f"**Peers at step {versions[new]['step']}**")
for peer in param["peers"]:
    cols[2].caption(md(peer))
    cols[2].code(peers_at.get(peer, "(no value stored)"), language=None, wrap_lines=True)
if not param["peers"]:
    cols[2].caption("None: this parameter is its node's whole prompt.")

proposals = {p["id"]: p for p in store.proposals(run_id, parameter=name)}
st.subheader("Proposals")
if proposals:
    costs = store.proposal_costs(run_id)
    none = {"make_usd": 0.0, "validate_usd": 0.0, "unknown": 0}
    st.dataframe(
        [{"step": p["step"], "method": p["method"], "fate": p["fate"], "mini-batch": fmt_score(p["minibatch_score"]),
          "validation": fmt_score(p["val_score"]), "cost to make": format_usd(c["make_usd"]),
          "cost to validate": format_usd(c["validate_usd"], c["unknown"]), "reason": p["reason"], "value": p["value"]}
         for p in proposals.values() for c in [costs.get(p["id"], none)]],
        hide_index=True,
    )
    st.caption("Cost to make: the optimizer call that wrote it, shared by the proposals of that call. Cost to "
               "validate: the calls that scored it on the mini-batch and on validation.")
else:
    st.caption("No proposal has been made for this parameter yet.")

st.subheader("How each version came about")
gradients = store.gradients(run_id, target=name)
for n, v in versions.items():
    if v["proposal_id"] is None:
        continue
    p = proposals[v["proposal_id"]]
    with st.expander(f"{label(n)}: {md(p['method'])} proposal, {p['fate']}", expanded=n == new):
        st.markdown(
            f"Mini-batch {fmt_score(p['minibatch_score'])} vs {fmt_score(p['minibatch_baseline'])} · "
            f"validation {fmt_score(p['val_score'])} vs {fmt_score(p['val_baseline'])} · "
            f"decided by {md(p['decision_by'] or p['decided_by'] or 'the trainer')}"
        )
        st.markdown("**Reasoning:** " + md(p["reasoning"]))
        feedback = review.parameter_feedback(gradients, name, v["step"])
        st.markdown(f"**Feedback the optimizer read** ({len(feedback)})")
        st.dataframe(gv.gradient_rows(feedback), hide_index=True)
