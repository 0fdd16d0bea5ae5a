"""BM25 retrieval over a passage corpus, and de-duplication: the function nodes of the RAG tasks.

The index is built in memory on first use (about 10,000 HotPotQA paragraphs take a second or
two) and kept for the rest of the process, one per corpus file. Nothing is written to disk.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import bm25s

from autodiff.errors import DataError
from autodiff.graph import FunctionNode, function_node


@dataclass(frozen=True)
class Passage:
    title: str
    text: str

    def __str__(self) -> str:
        return f"{self.title}: {self.text}"


def build_corpus(paragraphs: Iterable[tuple[str, str]]) -> list[Passage]:
    """Unique (title, text) paragraphs in order of first appearance."""
    seen: dict[tuple[str, str], None] = {}
    for title, text in paragraphs:
        key = (title.strip(), " ".join(text.split()))
        if key[1]:
            seen.setdefault(key, None)
    return [Passage(title, text) for title, text in seen]


class BM25Index:
    """A BM25 index (bm25s) over passages; `search` returns the top-k passages as 'Title: text'."""

    def __init__(self, passages: Sequence[Passage]):
        if not passages:
            raise DataError("cannot build a retrieval index over an empty corpus")
        self.passages = list(passages)
        tokens = bm25s.tokenize([str(p) for p in self.passages], stopwords="en", show_progress=False)
        self._bm25 = bm25s.BM25()
        self._bm25.index(tokens, show_progress=False)

    def __len__(self) -> int:
        return len(self.passages)

    def search(self, query: str, k: int = 3) -> list[str]:
        """Top-k passages for the query, best first; none for a query with no known word
        (BM25 would otherwise return arbitrary zero-score passages)."""
        words = bm25s.tokenize([str(query)], stopwords="en", show_progress=False, return_ids=False)[0]
        if not words or k < 1:
            return []
        docs, scores = self._bm25.retrieve([words], k=min(k, len(self.passages)), show_progress=False)
        return [str(self.passages[int(d)]) for d, s in zip(docs[0], scores[0]) if s > 0]


_INDEXES: dict[str, BM25Index] = {}
_LOCK = threading.Lock()


class LazyIndex:
    """Stands for `cached_index(key, passages)`, built on the first search: loading a task (to
    register a run from the dashboard, say) then costs no index (about 3 s for HotPotQA)."""

    def __init__(self, key: str, passages: Callable[[], Sequence[Passage]]) -> None:
        self._key, self._passages = key, passages

    def built(self) -> BM25Index:
        return cached_index(self._key, self._passages)

    def search(self, query: str, k: int = 3) -> list[str]:
        return self.built().search(query, k)


def cached_index(key: str, passages: Callable[[], Sequence[Passage]]) -> BM25Index:
    """The index for `key`, built once per process (the lock stops two threads building it twice)."""
    with _LOCK:
        if key not in _INDEXES:
            _INDEXES[key] = BM25Index(passages())
        return _INDEXES[key]


def make_retriever(index: BM25Index | LazyIndex, k: int = 3, name: str = "retriever") -> FunctionNode:
    """A traced function node: query -> top-k passages."""
    if k < 1:
        raise DataError(f"top-k must be at least 1, got {k}")

    def retrieve(query: str) -> list[str]:
        return index.search(query, k)

    return function_node(retrieve, name=name)


def dedupe(passages: Sequence[str], earlier: Sequence[str] = ()) -> list[str]:
    """`earlier` followed by the passages not already in it, each once (case and spacing ignored)."""
    seen: dict[str, str] = {}  # insertion-ordered
    for p in [*earlier, *passages]:
        key = " ".join(str(p).lower().split())
        if key:
            seen.setdefault(key, str(p))
    return list(seen.values())


def make_dedupe(name: str = "dedupe") -> FunctionNode:
    return function_node(dedupe, name=name)
