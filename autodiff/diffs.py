"""Word-level diffs of two texts, as escaped HTML for side-by-side display.

Both texts are untrusted (prompts written by an LLM); every piece is HTML-escaped before it is
wrapped in <del>/<ins>, so the result is safe for st.markdown(..., unsafe_allow_html=True) and
streamlit.components.v1.html.
"""

from __future__ import annotations

import difflib
import html
import os
import re

# A token is a word with the whitespace after it (and any leading whitespace its own token), so
# whitespace survives the diff. Attached, not separate: a run of single spaces as tokens gave the
# matcher one very common token, which made diffing prompts about ten times slower.
_TOKENS = re.compile(r"\S+\s*|\s+")

DEL_STYLE = "background:#fdd;color:#900;text-decoration:line-through"
INS_STYLE = "background:#dfd;color:#060;text-decoration:none"
_BLOCK_STYLE = "white-space:pre-wrap;font-family:monospace;font-size:0.9em"


def tokens(text: str) -> list[str]:
    return _TOKENS.findall(text or "")


def _trailing_space(text: str) -> str:
    return text[len(text.rstrip()):]


def segments(old: str, new: str) -> list[tuple[str, str, str]]:
    """The two texts as (kind, old piece, new piece) in order: kind "equal" (both pieces the same),
    or "change" (either piece may be empty); equal pieces may differ in whitespace only. Whitespace a change ends with on both sides is given
    back as equal, so a changed word is marked without the space after it."""
    a, b = tokens(old), tokens(new)
    out: list[tuple[str, str, str]] = []
    # Matched by their words: a word whose following whitespace changed (the last word of a text
    # that then grew) is not marked as changed; each side keeps its own whitespace.
    keys = difflib.SequenceMatcher(None, [t.strip() or t for t in a], [t.strip() or t for t in b], autojunk=False)
    for op, i1, i2, j1, j2 in keys.get_opcodes():
        left, right = "".join(a[i1:i2]), "".join(b[j1:j2])
        if op == "equal":
            out.append(("equal", left, right))
            continue
        space = os.path.commonprefix([_trailing_space(left)[::-1], _trailing_space(right)[::-1]])[::-1]
        if space and left.strip() and right.strip():
            out += [("change", left[: -len(space)], right[: -len(space)]), ("equal", space, space)]
        else:
            out.append(("change", left, right))
    return out


def _wrap(tag: str, style: str, text: str) -> str:
    body = html.escape(text, quote=True)
    return f'<{tag} style="{style}">{body}</{tag}>' if body else ""


def word_diff_html(old: str, new: str) -> tuple[str, str]:
    """The old and new text as two escaped HTML blocks, removed words struck out on the left and
    added words highlighted on the right."""
    left: list[str] = []
    right: list[str] = []
    for kind, a, b in segments(old, new):
        if kind == "equal":
            left.append(html.escape(a, quote=True))
            right.append(html.escape(b, quote=True))
        else:
            left.append(_wrap("del", DEL_STYLE, a))
            right.append(_wrap("ins", INS_STYLE, b))
    return (
        f'<div style="{_BLOCK_STYLE}">{"".join(left)}</div>',
        f'<div style="{_BLOCK_STYLE}">{"".join(right)}</div>',
    )


def inline_diff_html(old: str, new: str) -> str:
    """One escaped HTML block with deletions and insertions interleaved."""
    out = [html.escape(b, quote=True) if kind == "equal" else _wrap("del", DEL_STYLE, a) + _wrap("ins", INS_STYLE, b)
           for kind, a, b in segments(old, new)]
    return f'<div style="{_BLOCK_STYLE}">{"".join(out)}</div>'
