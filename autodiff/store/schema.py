"""The store's schema: ordered, named migrations, each applied once (the `migrations` table says
which). Written once in SQL that SQLite and PostgreSQL both accept; the few type and index
differences are translated by the PostgreSQL backend (`postgres.translate_ddl`). This list is
history: never edit an applied migration, add the next one.
"""

from __future__ import annotations

from typing import Sequence

from autodiff.errors import StoreError

MIGRATIONS: list[tuple[str, str]] = [
    (
        "001_initial",
        """
        CREATE TABLE runs (
            id TEXT PRIMARY KEY, task TEXT NOT NULL, config TEXT NOT NULL, status TEXT NOT NULL,
            error TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,
            stop_requested INTEGER NOT NULL DEFAULT 0, pid INTEGER
        );
        CREATE TABLE samples (
            run_id TEXT NOT NULL, split TEXT NOT NULL, position INTEGER NOT NULL, sample_id TEXT NOT NULL,
            PRIMARY KEY (run_id, split, position)
        );
        CREATE TABLE parameters (
            run_id TEXT NOT NULL, name TEXT NOT NULL, node TEXT, kind TEXT NOT NULL, role TEXT NOT NULL,
            trainable INTEGER NOT NULL, peers TEXT NOT NULL, position INTEGER NOT NULL,
            PRIMARY KEY (run_id, name)
        );
        CREATE TABLE parameter_versions (
            run_id TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, step INTEGER NOT NULL,
            value TEXT NOT NULL, proposal_id TEXT, created_at REAL NOT NULL,
            PRIMARY KEY (run_id, name, version)
        );
        CREATE TABLE steps (
            run_id TEXT NOT NULL, step INTEGER NOT NULL, status TEXT NOT NULL,
            started_at REAL NOT NULL, finished_at REAL, val_score REAL, test_score REAL,
            batch TEXT NOT NULL DEFAULT '[]', failed_samples TEXT NOT NULL DEFAULT '[]',
            PRIMARY KEY (run_id, step)
        );
        CREATE TABLE invocations (
            id TEXT PRIMARY KEY, run_id TEXT NOT NULL, step INTEGER NOT NULL, sample_id TEXT NOT NULL,
            seq INTEGER NOT NULL, node TEXT NOT NULL, node_type TEXT NOT NULL, call_index INTEGER NOT NULL,
            inputs TEXT NOT NULL, output TEXT NOT NULL, parameters TEXT NOT NULL, prompt TEXT,
            llm_call_id TEXT, score REAL, error TEXT
        );
        CREATE INDEX invocations_run_step ON invocations (run_id, step);
        CREATE TABLE gradients (
            id TEXT PRIMARY KEY, run_id TEXT NOT NULL, step INTEGER NOT NULL, sample_id TEXT,
            node TEXT NOT NULL, invocation_id TEXT, call_index INTEGER, target_type TEXT NOT NULL,
            target TEXT NOT NULL, target_invocation TEXT, score REAL, text TEXT NOT NULL,
            source_node TEXT, path TEXT NOT NULL, llm_call_id TEXT, origin TEXT NOT NULL,
            error TEXT, created_at REAL NOT NULL, consumed_step INTEGER
        );
        CREATE INDEX gradients_run_step ON gradients (run_id, step);
        CREATE TABLE llm_calls (
            id TEXT PRIMARY KEY, run_id TEXT, step INTEGER, phase TEXT NOT NULL, role TEXT NOT NULL,
            node TEXT, sample_id TEXT, call_index INTEGER, model TEXT NOT NULL, messages TEXT NOT NULL,
            response TEXT, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
            latency_ms REAL NOT NULL, cached INTEGER NOT NULL, error TEXT, created_at REAL NOT NULL
        );
        CREATE INDEX llm_calls_run_step ON llm_calls (run_id, step);
        CREATE TABLE proposals (
            id TEXT PRIMARY KEY, run_id TEXT NOT NULL, step INTEGER NOT NULL, parameter TEXT NOT NULL,
            value TEXT NOT NULL, method TEXT NOT NULL, reasoning TEXT NOT NULL, llm_call_id TEXT,
            fate TEXT NOT NULL, reason TEXT NOT NULL, minibatch_score REAL, minibatch_baseline REAL,
            val_score REAL, val_baseline REAL, decided_by TEXT, created_at REAL NOT NULL,
            decided_at REAL, decision TEXT, decision_value TEXT, decision_by TEXT
        );
        CREATE INDEX proposals_run_step ON proposals (run_id, step);
        CREATE TABLE evaluations (
            run_id TEXT NOT NULL, step INTEGER NOT NULL, split TEXT NOT NULL, subject TEXT NOT NULL,
            sample_id TEXT NOT NULL, prediction TEXT NOT NULL, gold TEXT NOT NULL, score REAL NOT NULL,
            error TEXT, PRIMARY KEY (run_id, step, split, subject, sample_id)
        );
        """,
    ),
    (
        # Per-step accounting (tokens, time, calls by phase) reads only these columns; from the
        # index alone it never touches the calls' long message text.
        "002_llm_calls_accounting_index",
        """
        CREATE INDEX llm_calls_accounting ON llm_calls (
            run_id, step, phase, cached, prompt_tokens, completion_tokens, latency_ms, created_at, error
        );
        """,
    ),
    (
        # Provider faults are never scores: an evaluation that errored has no score. Calls record
        # where they went, how they ended, how many requests they took and the usage details.
        "003_errors_and_reply_shapes",
        """
        CREATE TABLE evaluations_new (
            run_id TEXT NOT NULL, step INTEGER NOT NULL, split TEXT NOT NULL, subject TEXT NOT NULL,
            sample_id TEXT NOT NULL, prediction TEXT NOT NULL, gold TEXT NOT NULL, score REAL,
            error TEXT, PRIMARY KEY (run_id, step, split, subject, sample_id)
        );
        INSERT INTO evaluations_new SELECT * FROM evaluations;
        DROP TABLE evaluations;
        ALTER TABLE evaluations_new RENAME TO evaluations;
        ALTER TABLE llm_calls ADD COLUMN endpoint TEXT;
        ALTER TABLE llm_calls ADD COLUMN finish_reason TEXT;
        ALTER TABLE llm_calls ADD COLUMN reasoning TEXT;
        ALTER TABLE llm_calls ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1;
        ALTER TABLE llm_calls ADD COLUMN error_kind TEXT;
        ALTER TABLE llm_calls ADD COLUMN cached_prompt_tokens INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE llm_calls ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE llm_calls ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0;
        DROP INDEX llm_calls_accounting;
        CREATE INDEX llm_calls_accounting ON llm_calls (
            run_id, step, phase, cached, prompt_tokens, completion_tokens, latency_ms, created_at, error,
            error_kind, finish_reason
        );
        """,
    ),
    (
        # What happened to a run besides its steps: task changes accepted on resume, and the like.
        "004_run_events",
        """
        CREATE TABLE run_events (
            run_id TEXT NOT NULL, at REAL NOT NULL, kind TEXT NOT NULL, text TEXT NOT NULL
        );
        CREATE INDEX run_events_run ON run_events (run_id, at);
        """,
    ),
    (
        # Money: each call's cost in USD (NULL: unknown price), what a call answered from our
        # response cache would have cost, where the price came from, and the proposal a validation
        # call scored. Calls recorded before prices were: local and scripted models cost 0, the
        # others stay unknown (NULL), never 0.
        "005_money",
        """
        ALTER TABLE llm_calls ADD COLUMN cost_usd REAL;
        ALTER TABLE llm_calls ADD COLUMN saved_usd REAL;
        ALTER TABLE llm_calls ADD COLUMN price_source TEXT;
        ALTER TABLE llm_calls ADD COLUMN proposal_id TEXT;
        UPDATE llm_calls SET cost_usd = 0, saved_usd = 0, price_source = 'local'
            WHERE model LIKE 'local:%' OR model LIKE 'fake:%';
        DROP INDEX llm_calls_accounting;
        CREATE INDEX llm_calls_accounting ON llm_calls (
            run_id, step, phase, cached, prompt_tokens, completion_tokens, latency_ms, created_at, error,
            error_kind, finish_reason, cost_usd, saved_usd
        );
        CREATE INDEX llm_calls_proposal ON llm_calls (proposal_id, cost_usd, cached) WHERE proposal_id IS NOT NULL;
        """,
    ),
    (
        # Why a proposal was written: the ids of the feedback its optimizer call read (a JSON list;
        # NULL for proposals stored before this was recorded: unknown, not "none"), and for a
        # proposal review mode "all" held for a person though it could not be validated, the fate
        # it had (malformed, rejected_check).
        "006_proposal_feedback",
        """
        ALTER TABLE proposals ADD COLUMN feedback_ids TEXT;
        ALTER TABLE proposals ADD COLUMN held_fate TEXT;
        """,
    ),
    (
        # The call index a gradient is about, stored when the gradient is written (see
        # `Gradient.about_call`) instead of joined from the invocations on every read. Older rows
        # are filled by that same join, once.
        "007_gradient_about_call",
        """
        ALTER TABLE gradients ADD COLUMN about_call INTEGER;
        UPDATE gradients SET about_call = CASE
            WHEN target_type = 'output' AND target_invocation IS NOT NULL THEN COALESCE(
                (SELECT t.call_index FROM invocations t WHERE t.id = gradients.target_invocation), call_index)
            ELSE call_index END;
        CREATE INDEX gradients_run_about ON gradients (run_id, about_call);
        """,
    ),
    (
        # Who holds a running run: the host besides the pid (a pid means nothing on another
        # machine) and since when, so a second trainer is refused while the holder may live and
        # a holder on this host that is gone is seen as dead (see autodiff.holders).
        "008_run_holder",
        """
        ALTER TABLE runs ADD COLUMN host TEXT;
        ALTER TABLE runs ADD COLUMN held_since REAL;
        """,
    ),
]


def due_migrations(applied: Sequence[str] | None, migrations: Sequence[tuple[str, str]], *, create: bool,
                   no_store: str) -> list[str]:
    """The names of `migrations` not in `applied` (the names a store's migrations table holds, None
    before it exists), in order; empty when the store is current. Raises StoreError with `no_store`
    for a database that holds no store when it may not be created (`create` False)."""
    if applied is None and not create:
        raise StoreError(no_store)
    return [name for name, _ in migrations if name not in (applied or ())]
