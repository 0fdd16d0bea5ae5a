"""Graph: the pipeline as traced at one step, marked by the failing feedback each part received."""

import streamlit as st

from autodiff import graphview as gv
from dashboard.common import choose, md, require_run, static_url

store, run_id = require_run()
st.title("Graph")

steps = gv.trained_steps(store.steps(run_id))
if not steps:
    st.info("This run has not traced a training step yet. Come back once step 1 has run.")
    st.stop()
step = choose(st, "Step", steps, index=len(steps) - 1, key="graph_step", scope=run_id, url="step")
invocations = store.invocations(run_id, step)
gradients = store.gradients(run_id, step)
parameters = store.parameters(run_id)
if not invocations:
    st.info(f"No traces stored for step {step} yet.")
    st.stop()
graph = gv.build_graph(invocations, gradients, parameters, gv.run_tau(store.run(run_id)))

names = gv.node_names(graph)
by_failing = max(names, key=lambda n: graph.nodes[gv.node_id(n)]["failing"])
node = choose(st, "Node", names, index=names.index(by_failing), key="graph_node", scope=run_id, url="node",
              help="Clicks inside the drawing cannot reach the page: choose the node here.")

# vis-network comes from static/ (a copy of pyvis's own files), so redraws send only the graph.
st.iframe(gv.render_html(graph, height=520, selected=node, assets=static_url()), height=540)
st.caption(
    "Boxes are LLM nodes, ellipses function nodes, the diamond the loss; dashed boxes are parameters. "
    "Redder means more failing feedback at this step. Edge labels are producer→consumer call indices; "
    "red curved edges go back to an earlier node (a loop)."
)

own = [p for p in parameters if p["node"] == node]
st.subheader(f"Parameters of {md(node)}")
if own:
    st.dataframe([{"parameter": p["name"], "kind": p["kind"], "trainable": p["trainable"],
                   "value in these calls": graph.nodes[gv.parameter_id(p["name"])].get("value", ""),
                   "role": p["role"]} for p in own], hide_index=True)
else:
    st.caption("None: this node has nothing to train.")

st.subheader(f"Calls of {md(node)} at step {step}")
st.dataframe(gv.call_rows(invocations, node), hide_index=True)

st.subheader(f"Gradients on {md(node)} at step {step}")
received = gv.node_gradients(gradients, node, parameters)
if received:
    st.dataframe(gv.gradient_rows(received, gv.call_indices(invocations)), hide_index=True)
    st.caption("The Gradients page shows each one with the backward call that wrote it.")
else:
    st.caption("No feedback reached this node at this step.")
