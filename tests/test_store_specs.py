"""Where a store is, said wrong: a mistyped PostgreSQL URL is one clear error (never a SQLite file
named after it, password and all), a password is masked in every malformed URL, a path that is a
folder or not a store is named as such, and a database user without CREATE rights opens a
migrated store and is told what right is missing otherwise."""

from __future__ import annotations

import os
import re
import traceback
from pathlib import Path

import pytest

from autodiff import cli
from autodiff.errors import StoreError
from autodiff.store import Store, mask_secrets, resolve_spec
from autodiff.store.spec import mask_url

SECRET = "hunter2pw"


@pytest.mark.parametrize("spec, meant", [
    ("postgresql:/x", "postgresql://x"),
    (f"postgresql:/alice:{SECRET}@host/db", "postgresql://alice:***@host/db"),
    (f"postgresql//alice:{SECRET}@host/db", "postgresql://alice:***@host/db"),
    (f"postgresql+psycopg://alice:{SECRET}@host/db", "postgresql://alice:***@host/db"),
    (f"postgres+psycopg2://alice:{SECRET}@host/db", "postgresql://alice:***@host/db"),
    (f"pgsql://alice:{SECRET}@host/db", "postgresql://alice:***@host/db"),
    (f"postgres:alice:{SECRET}@host/db", "postgresql://alice:***@host/db"),
    (f"PostgreSQL://alice:{SECRET}@host/db", "postgresql://alice:***@host/db"),
    (f"mysql://alice:{SECRET}@host/db", "postgresql://alice:***@host/db"),
])
def test_a_mistyped_url_is_one_clear_error_and_never_a_file(spec, meant, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError) as caught:
        Store(spec)
    message = str(caught.value)
    assert f"did you mean {meant!r}" in message and SECRET not in message
    assert SECRET not in "".join(traceback.format_exception(caught.value))
    assert cli.main(["--store", spec, "runs"]) == 2
    said = capsys.readouterr()
    assert "did you mean" in said.err and SECRET not in said.err + said.out
    monkeypatch.setenv("AUTODIFF_STORE", spec)
    with pytest.raises(StoreError, match="from AUTODIFF_STORE"):
        resolve_spec()
    assert cli.main(["dashboard"]) == 2 and "did you mean" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no folder, no SQLite file made from the URL


@pytest.mark.parametrize("spec, meant", [
    (f"host=127.0.0.1 port=55432 dbname=teamdb user=alice password={SECRET}", "postgresql://alice:***@127.0.0.1:55432/teamdb"),
    (f"dbname=runs user=bob password='{SECRET} x'", "postgresql://bob:***@localhost/runs"),
    ("host=db.example.org dbname=runs", "postgresql://db.example.org/runs"),
    ("host=/tmp/pg port=55433 dbname=runs user=ad", "postgresql://ad@%2Ftmp%2Fpg:55433/runs"),  # a socket folder
])
def test_a_key_value_connection_string_is_answered_with_its_url_and_never_a_file(spec, meant, tmp_path, monkeypatch,
                                                                                  capsys) -> None:
    """libpq's other form of a connection string used to become a SQLite file named after it,
    password and all, and the run trained into it instead of the team's store."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError) as caught:
        Store(spec)
    assert "key=value connection string" in str(caught.value) and f"instead: {meant!r}" in str(caught.value)
    assert SECRET not in str(caught.value)
    for command in (["train", "object_counting", "--model", "fake:x", "--steps", "1"], ["runs"]):
        assert cli.main(["--store", spec, *command]) == 2
        said = capsys.readouterr()
        assert "key=value connection string" in said.err and SECRET not in said.err + said.out
    assert list(tmp_path.iterdir()) == []  # no SQLite file made from it


@pytest.mark.parametrize("spec, meant", [(f"ad:{SECRET}@localhost", "postgresql://ad:***@localhost"),
                                         (f"ad:{SECRET}@127.0.0.1:55433/addb", "postgresql://ad:***@127.0.0.1:55433/addb")])
def test_a_url_without_its_scheme_is_refused_and_never_a_file(spec, meant, tmp_path, monkeypatch, capsys) -> None:
    """'user:password@host/db' used to become a SQLite file (or a folder and a file) named after
    it, and the refusals that followed printed the password."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match=f"did you mean {re.escape(repr(meant))}") as caught:
        Store(spec)
    assert SECRET not in str(caught.value)
    for command in (["train", "object_counting", "--model", "fake:x", "--steps", "1", "--queue"], ["runs"]):
        assert cli.main(["--store", spec, *command]) == 2
        said = capsys.readouterr()
        assert "without its scheme" in said.err and SECRET not in said.err + said.out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spec, meant", [("sqlite:///runs.sqlite", "runs.sqlite"),
                                         ("sqlite:////data/runs.sqlite", "/data/runs.sqlite"),
                                         ("file:///data/runs.sqlite", "/data/runs.sqlite")])
def test_a_sqlite_url_is_answered_with_the_path_meant(spec, meant, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match=f"a SQLite store is given as a plain file path: did you mean '{meant}'"):
        Store(spec)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spec", [f" postgresql://alice:{SECRET}@host/db", f"postgresql://alice:{SECRET}@host/db\n"])
def test_spaces_around_a_url_are_named(spec, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match="spaces around it") as caught:
        Store(spec)
    assert SECRET not in str(caught.value) and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("password", ["p@ss/w:rd%zz", "p@ss", "pa/ss", "pa?ss@", "pa#ss", "s3cr%zzet", "a:b@c/d"])
def test_a_password_with_unencoded_characters_is_masked_whole_and_the_fix_named(password) -> None:
    url = f"postgresql://alice:{password}@127.0.0.1:1/runs"
    with pytest.raises(StoreError) as caught:
        Store(url)
    message = str(caught.value)
    assert "postgresql://alice:***@127.0.0.1:1/runs" in message
    assert "percent-encode" in message and "%40" in message and "PGPASSWORD" in message
    for piece in {password, *password.replace("@", " ").replace("/", " ").replace(":", " ").split()}:
        if len(piece) >= 3:
            assert piece not in message, piece


@pytest.mark.parametrize("text", [
    "postgresql://alice:p@ss/w:rd%zz@host/db", "postgresql:/alice:p@ss@host/db", "pgsql://alice:p@ss@host/db",
    "postgresql+psycopg://alice:p@ss@host/db", "postgresql//alice:p@ss@host/db",
])
def test_masking_holds_for_any_malformed_url(text) -> None:
    """Everything between `scheme://user:` and the last `@` is hidden, by both masking paths."""
    assert mask_url(text).endswith(":***@host/db") and "p@ss" not in mask_url(text)
    assert "p@ss" not in mask_secrets(f"error: {text}: refused") and ":***@host/db: refused" in mask_secrets(f"x {text}: refused")


@pytest.mark.parametrize("spec", ["runs.sqlite", "C:/work/runs.sqlite", "postgresql/runs.sqlite", "my-postgres.sqlite",
                                  "runs=1.sqlite", "a=b c.sqlite", "x=y",
                                  "postgresql://alice:p%40ss@host:5432/db?sslmode=require", "postgres:///runs"])
def test_valid_paths_and_urls_pass(spec) -> None:
    assert resolve_spec(spec) == spec


def test_a_folder_or_a_file_that_is_not_a_store_is_named(tmp_path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("not a database, just text\n" * 100)
    with pytest.raises(StoreError, match="is not a SQLite store"):
        Store(tmp_path / "notes.txt")
    with pytest.raises(StoreError, match="is a folder, not a store file"):
        Store(tmp_path)
    assert cli.main(["--store", str(tmp_path / "notes.txt"), "runs"]) == 2
    assert "is not a SQLite store" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text().startswith("not a database")  # left as it was


# --- a database user without CREATE rights ---------------------------------------------------------

@pytest.fixture
def limited(postgres):
    """A migrated database, an empty one, and a role that may use tables but create none."""
    import psycopg

    migrated, empty = postgres.new_database(), postgres.new_database()
    role = f"limited_{os.getpid()}"
    admin = postgres.admin
    admin.execute(f"DROP ROLE IF EXISTS {role}")
    admin.execute(f"CREATE ROLE {role} LOGIN")
    with psycopg.connect(empty, autocommit=True) as conn:  # an empty database: no store tables at all
        for (table,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall():
            conn.execute(f"DROP TABLE {table}")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")  # PostgreSQL 15's default, said for older ones
    with psycopg.connect(migrated, autocommit=True) as conn:
        conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    as_role = lambda url: url.replace("://postgres@", f"://{role}@", 1)  # noqa: E731
    yield as_role(migrated), as_role(empty), role, migrated
    for url in (migrated, empty):
        postgres.drop(url)
    admin.execute(f"DROP ROLE IF EXISTS {role}")


def test_a_user_without_create_rights_opens_a_migrated_store(limited) -> None:
    """No DDL runs when every migration is applied, so a user who may only use the tables works."""
    migrated, _, _, _ = limited
    store = Store(migrated)
    store.create_run("r", "toy", {}, {})
    assert [r.id for r in store.runs()] == ["r"]
    store.close()


def test_a_migration_a_user_may_not_make_is_one_clear_error(limited) -> None:
    _, empty, role, _ = limited
    with pytest.raises(StoreError) as caught:
        Store(empty)
    message = str(caught.value)
    assert f"the database user '{role}' may not make or change its tables" in message
    assert f"GRANT CREATE ON SCHEMA public TO {role}" in message and "001_initial" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_a_right_missing_on_the_tables_is_named(limited) -> None:
    import psycopg

    migrated, _, role, owner_url = limited
    with psycopg.connect(owner_url, autocommit=True) as conn:
        conn.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}")
    with pytest.raises(StoreError, match=f"the database user '{role}' lacks a right .*GRANT SELECT, INSERT"):
        Store(migrated)


# --- a dashboard whose store cannot be reached -------------------------------------------------------

UNREACHABLE = f"postgresql://alice:{SECRET}@127.0.0.1:1/runs"  # nothing listens on port 1


def test_the_dashboard_shows_one_masked_error_when_its_store_cannot_be_opened(monkeypatch) -> None:
    from streamlit.testing.v1 import AppTest

    from tests.test_dashboard_pages import APP

    monkeypatch.delenv("AUTODIFF_STORE", raising=False)
    at = AppTest.from_file(APP, default_timeout=30)
    at.session_state["store_path"] = UNREACHABLE
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    [error] = at.error
    text = error.value.replace("\\", "")  # markdown escapes
    assert "The run store cannot be opened" in text and "postgresql://alice:***@127.0.0.1:1/runs" in text
    shown = " ".join(str(e.value) for kind in (at.error, at.markdown, at.caption, at.title) for e in kind)
    assert SECRET not in shown


def test_autodiff_dashboard_checks_its_store_before_it_starts(capsys) -> None:
    assert cli.main(["--store", UNREACHABLE, "dashboard"]) == 2
    said = capsys.readouterr()
    assert "dashboard on" not in said.out and "cannot use the PostgreSQL store" in said.err
    assert SECRET not in said.out + said.err
