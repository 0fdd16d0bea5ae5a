"""The meta-prompts of the backward engine and the optimizer: our own text, one constant each.

Placeholders are `{{name}}` (filled by `fill`), so braces inside prompt text are safe.
"""

from __future__ import annotations

import re

BACKWARD_SYSTEM = (
    "You review one step of an LLM pipeline that is being tuned. You write short, concrete "
    "feedback that tells the owner of one piece of text how to change it so the pipeline's final "
    "answer becomes correct. Be specific to the evidence shown. Never rewrite the whole prompt; "
    "describe the change. Reply with the feedback only, inside <feedback></feedback>."
)

LOSS_FEEDBACK = """The pipeline produced a final answer that scored {{score}} (1.0 is correct).

<input>
{{sample_input}}
</input>
<prediction>
{{prediction}}
</prediction>
<expected>
{{expected}}
</expected>

In at most three sentences, say what is wrong with the prediction compared with the expected \
answer (content, format, or both) and what the step that produced it should have done instead."""

# What one LLM call saw and said, and what came back from downstream: shown to every backward call.
CALL_EVIDENCE = """<prompt_sent>
{{prompt}}
</prompt_sent>
<output>
{{output}}
</output>
<downstream_feedback score="{{score}}">
{{feedback}}
</downstream_feedback>
"""

PARAMETER_FEEDBACK = """Node `{{node}}` is an LLM call. {{call_note}}
Its prompt is built from several peer texts. Your target is the peer `{{target}}` \
(kind: {{kind}}; role: {{role}}). The other peers are shown read-only so your feedback does not \
duplicate or contradict them; leave their concerns to them.

<peers>
{{peers}}
</peers>
""" + CALL_EVIDENCE + """
In at most three sentences, say how the text of `{{target}}` alone should change so that this \
call would have produced a better output. If `{{target}}` is not to blame, say "No change needed" \
and why."""

OUTPUT_FEEDBACK = """Node `{{node}}` is an LLM call. {{call_note}}
One of its inputs, `{{input_name}}`, was produced upstream by `{{source}}`.

""" + CALL_EVIDENCE + """
In at most three sentences, say how the input `{{input_name}}` should have been different for \
this call to produce a correct output. Speak about the input, not about this node's prompt."""

OPTIMIZER_SYSTEM = (
    "You improve one piece of prompt text in an LLM pipeline, using feedback collected from "
    "samples the pipeline got wrong. You change only your target text: its peers are shown so "
    "that your edit does not repeat or contradict them. Keep the text's purpose. Reply only with "
    "proposal blocks in the exact format asked for."
)

OPTIMIZER_PROMPT = """Target parameter: `{{name}}` in node `{{node}}` (kind: {{kind}}).
Role: {{role}}

<current_value>
{{value}}
</current_value>

Peers in the same prompt (read-only):
<peers>
{{peers}}
</peers>

Other trainable parameters of the pipeline (read-only):
<others>
{{others}}
</others>

Feedback on the current value, grouped by sample and call (lowest scores first):
<feedback>
{{gradients}}
</feedback>

Samples the current prompt already gets right (keep them right):
<working>
{{positives}}
</working>

Earlier values and their validation scores (best first):
<history>
{{history}}
</history>

Proposals that already failed this step, and why (do not repeat them):
<failed>
{{failed}}
</failed>
{{constraints}}
Write {{n}} different proposals. Edit methods: add, rephrase, remove, add_example, \
restructure. Each proposal must have this exact form:

<proposal>
<method>one method</method>
<reasoning>one or two sentences</reasoning>
<value>the complete new text of `{{name}}`</value>
</proposal>"""

# Tags that must never appear inside a proposed value: a value containing them is a fragment
# of our own template, not a prompt.
TEMPLATE_TAGS = (
    "<proposal>", "</proposal>", "<method>", "<reasoning>", "<value>", "</value>", "<current_value>",
    "<peers>", "<others>", "<feedback>", "</feedback>", "<history>", "<failed>", "<working>",
    "<prompt_sent>", "<downstream_feedback", "<expected>", "<prediction>",
)

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def fill(template: str, **values: object) -> str:
    """Fill `{{name}}` placeholders; a missing value is a bug in our code, so fail loudly."""
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


def template_lines(min_length: int = 40) -> tuple[str, ...]:
    """Distinctive lines of the optimizer's own instructions, to catch values that echo them."""
    lines = []
    for text in (OPTIMIZER_SYSTEM, OPTIMIZER_PROMPT):
        for line in text.splitlines():
            line = _PLACEHOLDER.sub("", line).strip()
            if len(line) >= min_length:
                lines.append(line)
    return tuple(lines)
