"""The run store: where the trainer, the CLI and the dashboard meet.

A store is a SQLite file (one machine: WAL mode, short-lived connections) or a PostgreSQL
database (a team: psycopg 3 with a connection pool), with the same schema, API and behaviour:

    store = open_store("runs.sqlite")                      # or Store("runs.sqlite")
    store = open_store("postgresql://me@db.example/runs")  # password: URL, PGPASSWORD or ~/.pgpass

- `core`: the Store (every query, in SQL both databases accept).
- `schema`: the ordered, named migrations.
- `sqlite`, `postgres`: the backends, each with what only it needs.
- `spec`: store paths and URLs, and `mask_secrets`, the one function that hides a password.
- `copy`: moving runs between stores with row counts and content hashes checked.
"""

from __future__ import annotations

from pathlib import Path

from autodiff.store.core import NO_PROPOSAL_COST, TERMINAL_STATUSES, Store
from autodiff.store.schema import MIGRATIONS
from autodiff.store.spec import is_url, mask_secrets, resolve_spec


def open_store(spec: str | Path | None = None) -> Store:
    """The store at `spec`: a SQLite path or a postgresql:// URL; None means AUTODIFF_STORE, else
    .autodiff/runs.sqlite (under AUTODIFF_HOME). Raises StoreError when it cannot be opened."""
    return Store(resolve_spec(spec))


__all__ = ["MIGRATIONS", "NO_PROPOSAL_COST", "TERMINAL_STATUSES", "Store", "is_url", "mask_secrets", "open_store",
           "resolve_spec"]
