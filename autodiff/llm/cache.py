"""Persistent response cache: unchanged prompts cost nothing on a re-run.

The key is a sha256 of canonical JSON (sorted keys) of provider, model and request. Never
Python's hash(), which changes per process, and never the API key.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path

from autodiff.llm.types import Completion, Request


def cache_key(provider: str, model: str, request: Request) -> str:
    payload = {"provider": provider, "model": model, "request": request.as_key_dict()}
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """SQLite-backed cache on the hot path of every call. One connection shared by all threads
    behind a lock: a lookup takes microseconds, while a connection per thread cost milliseconds
    to open (backward starts fresh threads) and concurrent writers fell into SQLite's sleeping
    busy handler."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, text TEXT NOT NULL,"
            " prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL)"
        )

    def get(self, key: str) -> Completion | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT text, prompt_tokens, completion_tokens FROM responses WHERE key = ?", (key,)
            ).fetchone()
        return Completion(*row) if row else None

    def put(self, key: str, completion: Completion) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                (key, completion.text, completion.prompt_tokens, completion.completion_tokens),
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()
