"""Folding degenerate repetition in text an LLM wrote, so a page shows it once with a count.

A small model often repeats a line, a sentence or a block of lines until its token limit ("The
input should have been different.\\n\\nThe input should have been different.\\n\\n..." 37 times):
printed in full, one page of 24 gradients was 9,000 px tall. `fold` splits a text into plain
pieces and runs of one repeated unit; the page draws each run once with its count, and the full
text stays a click away.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dashboard.common import md

MIN_UNIT, MAX_UNIT = 12, 600  # characters in a repeated unit
MIN_REPEATS = 3  # fewer is ordinary writing (a phrase said twice), not degenerate repetition
# A unit (starting at a word, not inside one) that follows itself at least twice more, whitespace apart.
_REPEAT = re.compile(rf"(?<!\w)(\S[\s\S]{{{MIN_UNIT - 1},{MAX_UNIT - 1}}}?)(?:\s*\1){{{MIN_REPEATS - 1},}}")
PREVIEW_CHARS, PREVIEW_LINES = 600, 10  # a text longer than this shows a preview first


@dataclass(frozen=True)
class Piece:
    """`text` once (`times` == 1), or `text` repeated `times` times in a row; `cut_off`: the text
    then ends partway through one more repeat (the reply ran out of tokens)."""

    text: str
    times: int = 1
    cut_off: bool = False


def fold(text: str) -> list[Piece]:
    """`text` as plain pieces and runs of a repeated unit (each at least MIN_REPEATS in a row),
    in order; joining each piece's text `times` times (with the whitespace between dropped) gives
    back the text's words, but for a cut-off last repeat. A text with no run is one plain piece."""
    pieces: list[Piece] = []
    at = 0
    for found in _REPEAT.finditer(text):
        unit = found[1]
        times = len(re.findall(r"\s*" + re.escape(unit), found[0]))
        if found.start() > at:
            pieces.append(Piece(text[at:found.start()]))
        rest = text[found.end():].strip()
        cut_off = bool(rest) and unit.startswith(rest)
        pieces.append(Piece(unit.strip(), times, cut_off))
        at = len(text) if cut_off else found.end()
    if at < len(text):
        pieces.append(Piece(text[at:]))
    return pieces or [Piece(text)]


def folded_chars(pieces: list[Piece]) -> int:
    """How many characters folding hides (the repeats beyond the first of each run)."""
    return sum(len(p.text) * (p.times - 1) for p in pieces)


def is_long(text: str) -> bool:
    """Whether `text` is shown as a preview with the full text behind a click."""
    return len(text) > PREVIEW_CHARS or text.count("\n") >= PREVIEW_LINES


def preview(text: str) -> str:
    """The start of a long text, cut at a word (or line) boundary, with an ellipsis."""
    head = "\n".join(text.splitlines()[:PREVIEW_LINES])[:PREVIEW_CHARS]
    if len(head) < len(text):
        cut = max(head.rfind(" "), head.rfind("\n"))
        head = (head[:cut] if cut > PREVIEW_CHARS // 2 else head).rstrip() + " …"
    return head


def folded_markdown(text: str) -> tuple[str, str]:
    """`text` an LLM wrote as escaped markdown (never markup), each run of a repeated line or sentence
    drawn once with its count, a long text as its start; and what was left out ("" for nothing)."""
    pieces = fold(text)
    if not (hidden := folded_chars(pieces)):
        return (md(preview(text)), "shortened") if is_long(text) else (md(text), "")
    lines = []
    for piece in pieces:
        if piece.times > 1:
            cut = ", the last cut off" if piece.cut_off else ""
            lines.append(f"{md(piece.text)} :gray-badge[↻ repeated ×{piece.times} in a row{cut}]")
        elif piece.text.strip():
            lines.append(md(piece.text.strip()))
    return "  \n".join(lines), f"{hidden:,} repeated characters folded"
