"""Word-level diffs of two texts, as escaped HTML for side-by-side display.

Both texts are untrusted (prompts written by an LLM); every piece is HTML-escaped before it is
wrapped in <del>/<ins>, so the result is safe for st.markdown(..., unsafe_allow_html=True) and
streamlit.components.v1.html.
"""

from __future__ import annotations

import difflib
import html
import re

# Words and the whitespace between them are separate tokens, so whitespace survives the diff.
_TOKENS = re.compile(r"\s+|[^\s]+")

DEL_STYLE = "background:#fdd;color:#900;text-decoration:line-through"
INS_STYLE = "background:#dfd;color:#060;text-decoration:none"
_BLOCK_STYLE = "white-space:pre-wrap;font-family:monospace;font-size:0.9em"


def tokens(text: str) -> list[str]:
    return _TOKENS.findall(text or "")


def _wrap(tag: str, style: str, pieces: list[str]) -> str:
    body = html.escape("".join(pieces), quote=True)
    return f'<{tag} style="{style}">{body}</{tag}>' if body else ""


def word_diff_html(old: str, new: str) -> tuple[str, str]:
    """The old and new text as two escaped HTML blocks, removed words struck out on the left and
    added words highlighted on the right."""
    a, b = tokens(old), tokens(new)
    left: list[str] = []
    right: list[str] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            same = html.escape("".join(a[i1:i2]), quote=True)
            left.append(same)
            right.append(same)
            continue
        left.append(_wrap("del", DEL_STYLE, a[i1:i2]))
        right.append(_wrap("ins", INS_STYLE, b[j1:j2]))
    return (
        f'<div style="{_BLOCK_STYLE}">{"".join(left)}</div>',
        f'<div style="{_BLOCK_STYLE}">{"".join(right)}</div>',
    )


def inline_diff_html(old: str, new: str) -> str:
    """One escaped HTML block with deletions and insertions interleaved."""
    a, b = tokens(old), tokens(new)
    out: list[str] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(html.escape("".join(a[i1:i2]), quote=True))
        else:
            out.append(_wrap("del", DEL_STYLE, a[i1:i2]) + _wrap("ins", INS_STYLE, b[j1:j2]))
    return f'<div style="{_BLOCK_STYLE}">{"".join(out)}</div>'
