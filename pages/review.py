"""Review: proposals waiting for a person (accept, reject, or edit then accept), and human feedback.

In review mode "all" every proposal waits, including those that cannot be validated: a malformed
reply (no value: dismiss it, or write a value to accept in its place) and a proposal that failed a
check (unscored: accepting it overrides the check). What is accepted without validation scores is
scored on validation first, like an edited value."""

import streamlit as st

from autodiff import review
from autodiff.diffs import word_diff_html
from autodiff.errors import AutodiffError
from autodiff.llm.pricing import format_usd
from dashboard import textfold
from dashboard.auth import reviewer
from dashboard.common import ACTIVE, fmt_score, fmt_time, html_table, md, require_run

store, run_id = require_run()
run = store.run(run_id)
st.title("Review")
st.caption(f"Run {md(run_id)} ({run.status}), review mode: {run.config.get('review', 'off')}")
if run.config.get("review", "off") == "all":
    st.caption("Every proposal waits here, also a malformed reply (it has no value: dismiss it, or write a value to "
               "accept in its place) and one that failed a check before validation (accepting it overrides the "
               "check). A value accepted without scores, like an edited one, is scored on validation first.")
elif run.config.get("review", "off") == "off":
    st.info("This run is not in review mode: the trainer accepts or reverts proposals on its own. Start a run "
            "with review mode *validated* or *all* on the **Runs** page to decide them here.")


def act(action, *args) -> None:
    """Send a decision, recorded under the signed-in user's name (see dashboard/auth.py); the waiting
    trainer picks it up within a second."""
    try:
        action(store, *args, by=reviewer())
    except AutodiffError as exc:
        st.error(md(exc))
    else:
        st.rerun()


def wait_note(item: review.PendingReview, status: str) -> None:
    """How long the trainer still waits for a decision, and what it then does on its own; `status`
    is the run's as this panel refreshes."""
    left = item.seconds_left()
    if left is None:
        return
    fallback = {"accept": "accepts it", "reject": "rejects it"}.get(item.fallback, md(item.fallback))
    if status not in ACTIVE:
        st.caption(f"The run is {status}: nothing waits for this decision now. A resume redoes the step, "
                   "and the proposal comes back here to be decided.")
    elif left > 0:
        st.warning(f"**{_duration(left)} left** to decide (until {fmt_time(item.waits_until)}): then the trainer "
                   f"{fallback} on its own (the run's review fallback).", icon=":material/timer:")
    else:
        st.warning(f"The wait ran out at {fmt_time(item.waits_until)}: the trainer {fallback} on its own now.",
                   icon=":material/timer_off:")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s" if minutes else f"{secs} s"


@st.fragment(run_every=3 if run.status in ACTIVE else None)
def pending() -> None:
    items = review.pending(store, run_id)
    status = store.run(run_id).status
    costs = store.proposal_costs(run_id) if items else {}
    if not items:
        st.info("No proposals are waiting for review." + (" New ones appear here as the trainer makes them."
                                                          if run.status == "running" else ""))
    for item in items:
        p, pid = item.proposal, item.proposal.id
        with st.container(border=True):
            st.subheader(md(p.parameter))
            st.markdown(f"Step {p.step} · method **{md(p.method)}** · mini-batch {fmt_score(p.minibatch_score)} "
                        f"vs {fmt_score(p.minibatch_baseline)} · validation {fmt_score(p.val_score)} vs best "
                        f"{fmt_score(p.val_baseline)}"
                        + (f" · cost to make {md(format_usd(c['make_usd'], c['make_unknown']))}, to validate "
                           f"{md(format_usd(c['validate_usd'], c['validate_unknown']))}"
                           if (c := costs.get(pid)) else ""))
            notes = [f"{name}: {md(text)}" for name, text in (("Reasoning", p.reasoning), ("Trainer's note", p.reason))
                     if text and text.strip()]  # an empty label is left out (a malformed reply has no reasoning)
            if notes:
                st.markdown("  \n".join(notes))
            if item.held == "malformed":
                st.warning(f"Malformed reply: {md(p.reason)}. There is no value to accept: dismiss it, or write "
                           "a value below to accept in its place.")
                call = store.call(p.llm_call_id) if p.llm_call_id else None
                reply = (call.response if call else None) or p.value
                # Folded like feedback (a small model repeats a line to its token limit: 5,000 px of
                # it), the whole reply a click away.
                shown, left_out = textfold.folded_markdown(reply)
                if left_out:
                    st.caption(f"The optimizer's reply ({md(left_out)}):")
                    st.markdown(shown)
                    with st.expander(f"The whole reply ({len(reply):,} characters)"):
                        st.code(reply, language=None, wrap_lines=True)
                else:
                    st.caption("The optimizer's reply")
                    st.code(reply, language=None, wrap_lines=True)
            else:
                if item.held == "rejected_check":
                    st.warning(f"Failed the check before validation: {md(p.reason)}. It was not scored; "
                               "accepting it overrides the check.")
                old, new = word_diff_html(item.current, p.value)
                left, right = st.columns(2)
                left.caption("Current value")
                left.html(old)
                right.caption("Proposed value")
                right.html(new)
            read = "not recorded" if item.gradients is None else len(item.gradients)
            with st.expander(f"Gradients that motivated it ({read})"):
                if item.gradients is None:
                    st.caption("Not recorded: this proposal was stored before proposals kept the ids of the "
                               "feedback they were written from.")
                for g in item.gradients or ():
                    st.markdown(f"**{md(g.origin)}** · sample {md(g.sample_id or '-')} · call "
                                f"{g.call_index if g.call_index is not None else '-'} · score "
                                f"{fmt_score(g.score)}  \n{md(g.text)}")
            with st.expander(f"Peers ({len(item.peers)})"):
                for name, value in item.peers:
                    st.caption(md(name))
                    st.text(value)
            if item.decision:
                st.info(f"Decision sent ({md(item.decision[0])}); waiting for the trainer to apply it.")
                continue
            wait_note(item, status)
            accept_col, reject_col, _ = st.columns([1, 1, 4])
            if item.held != "malformed" and accept_col.button("Accept", key=f"accept-{pid}", type="primary"):
                act(review.accept, pid)
            if reject_col.button("Dismiss" if item.held == "malformed" else "Reject", key=f"reject-{pid}"):
                act(review.reject, pid)
            if item.held == "malformed":
                edited = st.text_area("Write a value in its place (the current value to start from), then accept it",
                                      value=item.current, key=f"edit-{pid}")
            else:
                edited = st.text_area("Edit the proposed value, then accept it", value=p.value, key=f"edit-{pid}")
            if st.button("Accept edited value", key=f"edit-accept-{pid}"):
                act(review.edit, pid, edited)


pending()

decided = review.decisions(store, run_id)
if decided:
    st.subheader("Decisions so far")
    st.html(html_table([{"step": p.step, "parameter": p.parameter, "decision": p.decision, "by": p.decision_by,
                         "fate": p.fate, "value": p.decision_value or p.value} for p in decided],
                       numeric=("step",), fold=("value",)))

# Who reads feedback written now: only a run that trains again has optimizer calls to come.
READER = {
    "running": "the next optimizer call for that parameter reads it (on a node, every trainable parameter of the "
               "node does)",
    "created": "the first optimizer call for that parameter reads it, once the run starts",
    "stopped": "this run is stopped: no optimizer call reads it unless you resume the run (**Runs** page); then the "
               "first optimizer call for that parameter does",
    "failed": "this run failed: no optimizer call reads it unless the run is resumed (**Runs** page, once the cause "
              "at the top of this page is fixed); then the first optimizer call for that parameter does",
    "completed": "this run is completed and will not train again: no optimizer call will read it. It stays "
                 "recorded with the run. To have feedback read, start a new run (**Runs** page, *New run with "
                 "these settings*) and write it there while that run trains",
}
reader = READER.get(run.status, READER["stopped"])
st.subheader("Add feedback")
st.caption(f"Written like a gradient and marked as human: {reader}.")
with st.form("feedback", clear_on_submit=True):
    target = st.selectbox("On node or parameter", review.feedback_targets(store, run_id))
    sample = st.selectbox("About sample (optional)", ["", *review.trained_samples(store, run_id)],
                          format_func=lambda s: s or "(no particular sample)")
    text = st.text_area("Feedback")
    if st.form_submit_button("Add feedback"):
        try:
            review.add_feedback(store, run_id, text, target, sample, by=reviewer())
            (st.success if run.status in ACTIVE else st.warning)(f"Feedback stored: {reader}.")
        except AutodiffError as exc:
            st.error(md(exc))
