"""Graph: the pipeline as traced at one step, marked by the failing feedback each part received."""

import streamlit as st

from autodiff import graphview as gv
from dashboard import graphview as draw
from dashboard.common import ACTIVE, choose, html_table, md, require_run
from dashboard.figures import batch_sentence, steps_of

store, run_id = require_run()
st.title("Graph")

steps = gv.trained_steps(store.steps(run_id))
if not steps:
    status = store.run(run_id).status
    st.info("This run has not traced a training step yet. " + (
        "Come back once step 1 has run." if status in ACTIVE else
        "It completed without one (no training steps planned)." if status == "completed" else
        f"It {'failed' if status == 'failed' else 'was ' + status}, so step 1 will not run until it is resumed "
        "(on the **Runs** page)."))
    st.stop()
step = choose(st, "Step", steps, index=len(steps) - 1, key="graph_step", scope=run_id, url="step",
              missing="is not a traced step of this run")
invocations = store.invocations(run_id, step)
gradients = store.gradients(run_id, step)
parameters = store.parameters(run_id)
if not invocations:
    st.info(f"No traces stored for step {step} yet.")
    st.stop()
graph = gv.build_graph(invocations, gradients, parameters, gv.run_tau(store.run(run_id)))
figures = next((r for r in steps_of(store, store.run(run_id)) if r["step"] == step), None)
if figures:  # the same figures as the Curves charts (autodiff.metrics)
    st.caption(f"Step {step}: {batch_sentence(figures)}")

names = gv.node_names(graph)
by_failing = max(names, key=lambda n: graph.nodes[gv.node_id(n)]["failing"])
node = choose(st, "Node", names, index=names.index(by_failing), key="graph_node", scope=run_id, url="node",
              missing="is not a node of this step's graph",
              help="Clicks inside the drawing cannot reach the page: choose the node here.")

# Drawn at scale 1 as SVG in the page itself, in the colours of the app's theme (and following a
# switch in place); a page narrower than the drawing scrolls it sideways.
st.html(draw.render_html(graph, selected=node, theme=st.context.theme.type,
                         background=st.get_option("theme.backgroundColor")), unsafe_allow_javascript=True)
st.caption(
    "Top to bottom in the order the nodes ran. Boxes are LLM nodes, ellipses function nodes, the diamond "
    "the loss; dashed boxes on the left are each node's parameters. Redder means more failing samples whose "
    "feedback reached it at this step. Edge labels are producer→consumer call indices of nodes that ran "
    "more than once per sample; red arcs on the right go back to an earlier node (a loop). Hover over "
    "anything for details."
)

own = [p for p in parameters if p.node == node]
st.subheader(f"Parameters of {md(node)}")
if own:
    st.html(html_table([{"parameter": p.name, "kind": p.kind, "trainable": "yes" if p.trainable else "no",
                         "value in these calls": graph.nodes[gv.parameter_id(p.name)].get("value", ""),
                         "role": p.role} for p in own], fold=("value in these calls", "role")))
else:
    st.caption("None: this node has nothing to train.")

st.subheader(f"Calls of {md(node)} at step {step}")
# Plain tables, long text folded: a few dozen rows, where three data grids doubled the page's time to draw.
st.html(html_table(draw.call_rows(invocations, node), numeric=("call", "score"), fold=("inputs", "output", "prompt"),
                   drop_empty=("error",)))

st.subheader(f"Gradients on {md(node)} at step {step}")
_, received = store.find_gradients(run_id, step=step, targets=gv.targets_of(node, parameters))
if received:
    # the step is this page's (in the heading), and an error column only when a backward call failed
    rows = [{k: v for k, v in row.items() if k != "step"} for row in draw.gradient_rows(received)]
    st.html(html_table(rows, numeric=("call", "score"), fold=("feedback",), drop_empty=("error",)))
    st.caption("The Gradients page shows each one with the backward call that wrote it.")
else:
    st.caption("No feedback reached this node at this step.")
