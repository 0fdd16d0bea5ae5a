"""Signing in to a team's dashboard: the start-up warning when served beyond this machine with no
sign-in, the sign-in wall when one is configured, and review decisions and feedback recorded under
the signed-in user's name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from autodiff.exposure import auth_section, exposure_warning, is_loopback
from dashboard.auth import ANONYMOUS
from tests.fake_runs import filled_store

APP = "../app.py"
AUTH = {"redirect_uri": "http://team.example:8501/oauth2callback", "cookie_secret": "not-a-real-secret",
        "client_id": "id", "client_secret": "secret",
        "server_metadata_url": "http://127.0.0.1:1/.well-known/openid-configuration"}


@pytest.mark.parametrize("address", ["localhost", "127.0.0.1", "127.0.1.1", "::1", "[::1]"])
def test_loopback_addresses_get_no_warning(address: str, tmp_path: Path) -> None:
    assert is_loopback(address)
    assert exposure_warning(address, tmp_path) is None


@pytest.mark.parametrize("address", ["0.0.0.0", "192.168.1.20", "::", "team-box"])
def test_serving_beyond_this_machine_without_sign_in_warns(address: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("autodiff.exposure.SECRETS_FILES", (Path(".streamlit/secrets.toml"), tmp_path / "none.toml"))
    warning = exposure_warning(address, tmp_path)
    assert warning and address in warning and "[auth]" in warning and "anyone who reaches it" in warning


def test_a_configured_sign_in_silences_the_warning(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("autodiff.exposure.SECRETS_FILES", (Path(".streamlit/secrets.toml"), tmp_path / "none.toml"))
    secrets = tmp_path / ".streamlit" / "secrets.toml"
    secrets.parent.mkdir()
    secrets.write_text('[auth]\nredirect_uri = "http://x/oauth2callback"\ncookie_secret = "s"\n', encoding="utf-8")
    assert auth_section(tmp_path) == {"redirect_uri": "http://x/oauth2callback", "cookie_secret": "s"}
    assert exposure_warning("0.0.0.0", tmp_path) is None
    secrets.write_text("[auth\n", encoding="utf-8")  # broken TOML: named, and still a warning
    warning = exposure_warning("0.0.0.0", tmp_path)
    assert warning and "secrets.toml is not valid TOML" in warning


def test_the_dashboard_command_prints_the_warning(tmp_path: Path) -> None:
    """`autodiff dashboard --address 0.0.0.0` says so on stderr before the server starts (stopped at
    once here: a bad port makes Streamlit exit)."""
    out = subprocess.run(
        [sys.executable, "-m", "autodiff.cli", "--store", str(tmp_path / "runs.sqlite"), "dashboard",
         "--address", "0.0.0.0", "--port", "-1"],
        capture_output=True, text=True, timeout=120, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert "beyond this machine, and no sign-in is configured" in out.stderr


def test_the_installed_command_warns_from_any_folder(tmp_path: Path) -> None:
    """The console script (what ./dashboard.sh runs) outside the project folder: only the autodiff
    package is importable there, and the check must not need more."""
    script = Path(sys.executable).with_name("autodiff")
    out = subprocess.run([str(script), "--store", str(tmp_path / "runs.sqlite"), "dashboard", "--address", "0.0.0.0",
                          "--port", "-1"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert "Error" not in out.stderr.split("beyond this machine")[0], out.stderr
    assert "beyond this machine, and no sign-in is configured" in out.stderr


def test_with_sign_in_configured_a_visitor_sees_only_the_sign_in(tmp_path: Path) -> None:
    store, _ = filled_store(tmp_path)
    at = AppTest.from_file(APP, default_timeout=30)
    at.secrets["auth"] = AUTH
    at.user = {"is_logged_in": False}
    at.session_state["store_path"] = str(store.path)
    at.run()
    assert not at.exception
    assert [b.label for b in at.button] == ["Sign in"]
    assert not at.dataframe and "sign in" in at.markdown[0].value.lower()


def test_without_sign_in_the_reviewer_is_anonymous(tmp_path: Path) -> None:
    store, _ = filled_store(tmp_path)
    at = AppTest.from_file(APP, default_timeout=30)
    at.session_state["store_path"] = str(store.path)
    at.run()
    assert not at.exception and "Sign in" not in [b.label for b in at.button]
    assert ANONYMOUS == "human"


def signed_in(store_path: Path, page: str, run_id: str | None = None, name: str = "Ada Lovelace") -> AppTest:
    at = AppTest.from_file(APP, default_timeout=30)
    at.secrets["auth"] = AUTH
    at.user = {"is_logged_in": True, "name": name, "email": "ada@team.example"}
    at.session_state["store_path"] = str(store_path)
    if run_id:
        at.query_params["run"] = run_id
    at.run()
    at.switch_page(page).run()
    return at


def test_a_signed_in_reviewer_decides_under_their_name(tmp_path: Path) -> None:
    from tests.test_dashboard_pages import next_pending, start_review_run

    store, thread, errors = start_review_run(tmp_path, "validated")
    first = next_pending(store, [])
    at = signed_in(store.path, "pages/review.py", first.run_id)
    assert not at.exception
    at.button(key=f"reject-{first.id}").click().run()
    assert not at.exception
    assert store.proposal(first.id).decision_by == "Ada Lovelace"
    second = next_pending(store, [first.id])
    at.run()
    at.button(key=f"accept-{second.id}").click().run()
    thread.join(timeout=30)
    assert not thread.is_alive() and not errors, errors
    assert [store.proposal(p.id).decided_by for p in (first, second)] == ["Ada Lovelace"] * 2


def test_a_signed_in_users_feedback_carries_their_name(tmp_path: Path) -> None:
    store, ids = filled_store(tmp_path)
    at = signed_in(store.path, "pages/review.py", ids[1])
    at.selectbox[-2].select("counter")
    at.text_area[-1].input("Number words count too.")
    next(b for b in at.button if b.label == "Add feedback").click().run()
    assert not at.exception
    params = [p.name for p in store.parameters(ids[1])]
    assert {r.source_node for r in store.pending_human_feedback(ids[1], params)} == {"Ada Lovelace"}
