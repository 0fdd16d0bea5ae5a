"""A database password reaches no run record, export, message or page: one masking function
(`mask_secrets`) hides it wherever a store is shown, including errors the driver raises."""

from __future__ import annotations

import json
import traceback
from urllib.parse import urlsplit, urlunsplit

import pytest
from streamlit.testing.v1 import AppTest

from autodiff import cli
from autodiff.errors import StoreError
from autodiff.export import export_run
from autodiff.store import Store, mask_secrets
from tests.test_dashboard_pages import APP

PASSWORD = "Tr0ub4dor-and-3"


@pytest.mark.parametrize("text, masked", [
    ("postgresql://me:pw1234@db.example:5432/runs", "postgresql://me:***@db.example:5432/runs"),
    ("postgres://me:p%40ss@db/runs?sslmode=require", "postgres://me:***@db/runs?sslmode=require"),
    ("postgresql://me@db/runs", "postgresql://me@db/runs"),  # no password: nothing to hide
    ("postgresql://db/runs", "postgresql://db/runs"),
    ("host=db user=me password=pw1234 dbname=runs", "host=db user=me password=*** dbname=runs"),
    ("host=db password='pw 12\\'34' dbname=runs", "host=db password=*** dbname=runs"),
    ("error at POSTGRESQL://me:pw1234@db/x: refused", "error at POSTGRESQL://me:***@db/x: refused"),
    ("runs.sqlite", "runs.sqlite"),
])
def test_mask_secrets_hides_passwords_in_urls_and_connection_strings(text: str, masked: str) -> None:
    assert mask_secrets(text) == masked


def test_mask_secrets_hides_a_known_password_anywhere() -> None:
    assert mask_secrets('invalid percent-encoded token: "s3cr%zzet"', ["s3cr%zzet"]) == \
        'invalid percent-encoded token: "***"'


@pytest.mark.parametrize("url", [
    f"postgresql://me:{PASSWORD}%zz@127.0.0.1:1/runs",     # the driver echoes the bad token
    f"postgresql://me:{PASSWORD}@[::1/runs",              # the driver echoes the whole URL
    f"postgresql://me:{PASSWORD}@127.0.0.1:1/runs",       # nothing listens on port 1
    f"postgresql://me:{PASSWORD}@127.0.0.1:1/runs?sslmode=bogus",
])
def test_a_store_that_cannot_be_opened_says_why_without_the_password(url: str) -> None:
    with pytest.raises(StoreError) as caught:
        Store(url)
    shown = "".join(traceback.format_exception(caught.value))
    assert PASSWORD not in shown and "cannot use the PostgreSQL store postgresql://me:***@" in shown
    assert "PGPASSWORD" in str(caught.value)


@pytest.fixture
def secret_url(postgres) -> str:
    """A database of the test server, reached with a password in the URL (the test server trusts
    loopback, so any password is let in: what matters is where it shows up)."""
    url = postgres.new_database()
    parts = urlsplit(url)
    yield urlunsplit(parts._replace(netloc=parts.netloc.replace("@", f":{PASSWORD}@", 1)))
    postgres.drop(url)


def test_a_password_in_the_url_reaches_no_record_export_message_or_page(secret_url, tmp_path, capsys) -> None:
    from autodiff.config import make_config
    from autodiff.runner import train
    from tests.conftest import FAST_RETRY, TOY_DEFAULTS, Script
    from autodiff.llm.fake import FakeProvider

    store = Store(secret_url)
    assert store.display.count("***") == 1 and PASSWORD not in store.display
    run_id = train(store, make_config(**TOY_DEFAULTS), run_id="secret",
                   providers={"fake": FakeProvider(Script())}, cache_path=tmp_path / "cache.sqlite", retry=FAST_RETRY)
    with store.connect() as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        rows = "\n".join(repr(tuple(row)) for t in tables for row in conn.execute(f"SELECT * FROM {t}"))
    assert "secret" in rows and PASSWORD not in rows
    assert PASSWORD not in json.dumps(export_run(store, run_id))
    # the CLI: a budget stop prints how to resume, naming the store; show, export, runs; an unknown run
    store.set_run_status(run_id, "stopped", error="stopped by a person")  # as if: how to go on names the store
    assert cli._stopped_exit(store, run_id) == 3
    said = {"resume": capsys.readouterr().err}
    for argv in (["show", run_id], ["export", run_id], ["runs"], ["show", "nope"]):
        cli.main(["--store", secret_url, "--quiet", "--cache", str(tmp_path / "cache.sqlite"), *argv])
        out = capsys.readouterr()
        said[argv[0]] = said.get(argv[0], "") + out.out + out.err
        assert PASSWORD not in out.out + out.err
    assert "continue with: autodiff resume secret --store 'postgresql://postgres:***@" in said["resume"]
    assert "(*** stands for the store's password: type it there, or leave it out of the URL and set PGPASSWORD)" \
        in said["resume"]  # a command to paste says what its *** is
    assert "no run with id 'nope' in postgresql://postgres:***@" in said["show"]
    # the dashboard: the sidebar names the store, masked
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["store_path"] = secret_url
    at.run()
    assert not at.exception
    shown = [c.value.replace("\\", "") for c in at.sidebar.caption]  # as shown: markdown escapes undone
    assert any("postgresql://postgres:***@" in c for c in shown), shown
    page = json.dumps([str(e) for e in at.main.children.values()] + shown)
    assert PASSWORD not in page
    store.close()
