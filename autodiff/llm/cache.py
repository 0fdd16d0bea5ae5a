"""Persistent response cache: unchanged prompts cost nothing on a re-run.

The key is a sha256 of canonical JSON (sorted keys) of provider, endpoint, model and request.
Never Python's hash(), which changes per process, and never the API key. The endpoint (an API's
base URL) is part of the key: two servers that both call their model "llama3.1" never share
replies. Only complete replies are stored: the client never puts a failure, an empty reply, a
reply cut off at the token limit or one its caller could not parse (see `LLM.complete`).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from autodiff.llm.types import Completion, Request

# Columns after the key, in Completion's field order, then the time the entry was written.
_FIELDS = ("text", "prompt_tokens", "completion_tokens", "finish_reason", "reasoning", "cached_prompt_tokens",
           "cache_write_tokens", "reasoning_tokens")


def normalise_endpoint(endpoint: str | None) -> str | None:
    """`HTTP://Host:8080/v1/` and `http://host:8080/v1` are one endpoint."""
    if not endpoint:
        return None
    parts = urlsplit(endpoint)
    if not parts.scheme:
        return endpoint
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


def cache_key(provider: str, model: str, request: Request, endpoint: str | None = None) -> str:
    payload = {"provider": provider, "model": model, "request": request.as_key_dict()}
    if endpoint:
        payload["endpoint"] = normalise_endpoint(endpoint)
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
        have = {row[1] for row in self._conn.execute("PRAGMA table_info(responses)")}
        for column, kind in (("finish_reason", "TEXT"), ("reasoning", "TEXT NOT NULL DEFAULT ''"),
                             ("cached_prompt_tokens", "INTEGER NOT NULL DEFAULT 0"),
                             ("cache_write_tokens", "INTEGER NOT NULL DEFAULT 0"),
                             ("reasoning_tokens", "INTEGER NOT NULL DEFAULT 0"),
                             ("created_at", "REAL NOT NULL DEFAULT 0")):
            if column not in have:
                self._conn.execute(f"ALTER TABLE responses ADD COLUMN {column} {kind}")

    def get(self, key: str, newer_than: float | None = None) -> Completion | None:
        """The stored reply for `key`, or None. With `newer_than` (a Unix time), entries written
        before it count as absent (a run that refreshes the cache reads only its own replies)."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {', '.join(_FIELDS)} FROM responses WHERE key = ? AND created_at >= ?",
                (key, newer_than or 0.0),
            ).fetchone()
        return Completion(*row) if row else None

    def put(self, key: str, completion: Completion) -> None:
        values = [getattr(completion, name) for name in _FIELDS]
        with self._lock:
            self._conn.execute(
                f"INSERT OR REPLACE INTO responses (key, {', '.join(_FIELDS)}, created_at)"
                f" VALUES (?, {', '.join('?' * len(_FIELDS))}, ?)",
                (key, *values, time.time()),
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()
