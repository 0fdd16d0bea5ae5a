"""Gradients: every piece of feedback, filtered, in the order it was written, with its backward call."""

import streamlit as st

from autodiff import graphview as gv
from dashboard.common import fmt_score, md, require_run

PER_PAGE = 25
ALL = "All"

store, run_id = require_run()
st.title("Gradients")

gradients = store.gradients(run_id)
if not gradients:
    st.info("No gradients yet: the backward pass writes them when a training step has failing samples.")
    st.stop()
parameters = store.parameters(run_id)
calls = store.invocation_call_indices(run_id)


def distinct(values) -> list:
    return sorted({v for v in values if v is not None})


nodes = list(dict.fromkeys([p["node"] for p in parameters if p["node"]] +
                           [g["target"] for g in gradients if g["target_type"] == "output"]))
targets = [gv.node_id(n) for n in nodes] + [gv.parameter_id(p["name"]) for p in parameters]

cols = st.columns([1, 2, 2, 1, 2])
step = cols[0].selectbox("Step", [ALL, *distinct(g["step"] for g in gradients)], key="grad_step")
target = cols[1].selectbox("Node or parameter", [ALL, *targets], key="grad_target",
                           format_func=lambda t: t if t == ALL else t.replace("node:", "node ").replace("param:", ""))
sample = cols[2].selectbox("Sample", [ALL, *distinct(g["sample_id"] for g in gradients)], key="grad_sample")
call_index = cols[3].selectbox("Call index", [ALL, *distinct(gv.target_call(g, calls) for g in gradients)],
                               key="grad_call", help="Which call of the target node the feedback is about.")
score = cols[4].slider("Score", 0.0, 1.0, (0.0, 1.0), step=0.05, key="grad_score")

if target == ALL:
    wanted = None
elif target.startswith("node:"):
    wanted = gv.targets_of(target.removeprefix("node:"), parameters)
else:
    wanted = [target.removeprefix("param:")]
shown = gv.filter_gradients(
    gradients, step=None if step == ALL else step, targets=wanted, sample=None if sample == ALL else sample,
    call_index=None if call_index == ALL else call_index, score=score, calls=calls,
)
pages = max(1, -(-len(shown) // PER_PAGE))
page = st.number_input("Page", 1, pages, 1, key="grad_page") if pages > 1 else 1
st.caption(f"{len(shown)} of {len(gradients)} gradients, in the order they were written.")

for g in shown[(page - 1) * PER_PAGE: page * PER_PAGE]:
    with st.container(border=True):
        kind = "parameter" if g["target_type"] == "parameter" else "output of"
        about = gv.target_call(g, calls)
        st.markdown(
            f"**Step {g['step']} · sample {md(g['sample_id'] or '-')} · call {'-' if about is None else about}** — "
            f"on {kind} **{md(g['target'])}** · score {fmt_score(g['score'])} · {md(g['origin'])}"
        )
        st.markdown(f"From {md(gv.gradient_origin(g))}, written at {md(g['node'])} call {'-' if g['call_index'] is None else g['call_index']}.")
        st.markdown(md(g["text"]) if g["text"] else "*(empty feedback)*")
        if g["error"]:
            st.warning(md(g["error"]))
        if g["llm_call_id"]:
            # Loaded and drawn only when opened: 25 calls' prompts drawn up front made the page slow.
            panel = st.expander("Backward call that wrote it", key=f"grad_call_{g['id']}", on_change="rerun")
            if not panel.open:
                continue
            with panel:
                call = store.call(g["llm_call_id"])
                if call is None:
                    st.caption("The call record is missing from the store.")
                else:
                    st.caption(f"{md(call['model'])} · {call['prompt_tokens']}+{call['completion_tokens']} tokens"
                               f"{' · cached' if call['cached'] else ''}")
                    for role, content in call["messages"]:
                        st.caption(md(role))
                        st.code(content, language=None, wrap_lines=True)
                    st.caption("reply")
                    st.code(call["response"] or "", language=None, wrap_lines=True)
