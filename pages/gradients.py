"""Gradients: every piece of feedback, filtered, in the order it was written (and when), with its
backward call and the proposals whose optimizer call read it. Repeated and long text is folded."""

import streamlit as st

from autodiff import graphview as gv
from autodiff import proposals as props
from autodiff.records import Gradient, Proposal
from dashboard import textfold
from dashboard.common import ALL, choose, count, fmt_score, fmt_time, md, page_url, require_run, reset_when, show_call
from dashboard.graphview import gradient_origin

PER_PAGE = 15

store, run_id = require_run()
st.title("Gradients")

facets = store.gradient_facets(run_id)
if not facets["total"]:
    st.info("No gradients yet: the backward pass writes them when a training step has failing samples.")
    st.stop()
parameters = store.parameters(run_id)
nodes = list(dict.fromkeys([p.node for p in parameters if p.node] + facets["outputs"]))
targets = [gv.node_id(n) for n in nodes] + [gv.parameter_id(p.name) for p in parameters]

# Step and target are kept in the URL; every filter goes back to "All" when another run is chosen.
# Two rows of filters: five in one row left each too narrow to show its choice at 1024 px.
cols = st.columns([1, 2, 2]) + st.columns([1, 2, 2])
step = choose(cols[0], "Step", [ALL, *facets["steps"]], key="grad_step", scope=run_id, url="step",
              missing="is not a step with gradients")
target = choose(cols[1], "Node or parameter", [ALL, *targets], key="grad_target", scope=run_id, url="target",
                missing="is not a node or parameter of this run",
                format_func=lambda t: t if t == ALL else t.replace("node:", "node ").replace("param:", ""))
sample = choose(cols[2], "Sample", [ALL, *facets["samples"]], key="grad_sample", scope=run_id, url="sample")
call_index = choose(cols[3], "Call index", [ALL, *facets["call_indices"]], key="grad_call", scope=run_id,
                    url="call", help="Which call of the target node the feedback is about.")
score = cols[4].slider("Score", 0.0, 1.0, (0.0, 1.0), step=0.05, key="grad_score")

if target == ALL:
    wanted = None
elif target.startswith("node:"):
    wanted = gv.targets_of(target.removeprefix("node:"), parameters)
else:
    wanted = [target.removeprefix("param:")]
filters = {"step": None if step == ALL else step, "targets": wanted, "sample": None if sample == ALL else sample,
           "call_index": None if call_index == ALL else call_index, "score": score}
# Only the page shown is read from the store (a large run holds tens of thousands of gradients).
matching, _ = store.find_gradients(run_id, **filters, limit=0)
pages = max(1, -(-matching // PER_PAGE))
page = 1
if pages > 1:
    reset_when("grad_page", (run_id, step, target, sample, call_index, score), 1)
    page = st.number_input("Page", 1, pages, key="grad_page")
st.caption(f"{matching:,} of {count(facets['total'], 'gradient')}, in the order they were written.")
_, shown = store.find_gradients(run_id, **filters, limit=PER_PAGE, offset=(page - 1) * PER_PAGE)
read_by = props.readers(store, run_id, [g.id for g in shown])
step_span = {s.step: (s.started_at, s.finished_at) for s in store.steps(run_id)}


def reader_link(p: Proposal) -> str:
    return (f"[step {p.step} · {md(p.parameter)} · {md(p.fate)}]"
            f"({page_url('proposals', run=run_id, step=p.step, parameter=p.parameter)})")


def written(g: Gradient) -> str:
    """When the gradient was stored, and how far into its step when it was written within the
    step as last recorded (from its start to its end; a step not finished: from its start). A time
    outside it (before a resumed step started again, after the step ended: feedback a person wrote
    later) is shown plain, never as an offset into a step it was not in."""
    when = fmt_time(g.created_at)
    start, end = step_span.get(g.step, (None, None))
    if g.created_at and start and start <= g.created_at <= (end if end is not None else g.created_at):
        return f"{when} (+{g.created_at - start:.1f} s into step {g.step})"
    return when


for g in shown:
    with st.container(border=True):
        kind = "parameter" if g.target_type == "parameter" else "output of"
        about = g.about_call
        st.markdown(
            f"**Step {g.step} · sample {md(g.sample_id or '-')} · call {'-' if about is None else about}** — "
            f"on {kind} **{md(g.target)}** · score {fmt_score(g.score)} · {md(g.origin)}"
        )
        read = "" if read_by.get(g.id) or not (g.text and g.target_type == "parameter") \
            else " No recorded proposal read it."
        st.caption(f"From {md(gradient_origin(g))}, written at {md(g.node)} call "
                   f"{'-' if g.call_index is None else g.call_index}, at {written(g)}.{read}")
        text, left_out = textfold.folded_markdown(g.text or "")
        st.markdown(text or "*(empty feedback)*")
        if g.error:
            st.warning(md(g.error))
        if readers := read_by.get(g.id):
            st.markdown(f"Read by {len(readers)} proposal{'s' if len(readers) > 1 else ''}: "
                        + ", ".join(reader_link(p) for p in readers))
        # One panel, loaded and drawn only when opened (25 calls' prompts drawn up front made the
        # page slow): the full text when the card shows less of it, and the backward call.
        if not (g.llm_call_id or left_out):
            continue
        full = f"full text ({len(g.text):,} characters, {left_out})" if left_out else ""
        label = " · ".join(x for x in ("Backward call that wrote it" if g.llm_call_id else "", full) if x)
        label = label[0].upper() + label[1:]
        panel = st.expander(label, key=f"grad_call_{g.id}", on_change="rerun")
        if not panel.open:
            continue
        with panel:
            if left_out:
                st.caption("Full text")
                st.code(g.text, language=None, wrap_lines=True)
            if g.llm_call_id:
                show_call(store.call(g.llm_call_id))
