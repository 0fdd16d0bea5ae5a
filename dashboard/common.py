"""Shared chrome: which store, which run, and safe display of untrusted text."""

from __future__ import annotations

import html
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlencode

import streamlit as st

from autodiff.llm.pricing import count  # noqa: F401 - pages take it from here, with the other words for people
from autodiff.metrics import run_summary
from autodiff.records import LLMCall, Run
from autodiff.recovery import Recovery, recovery
from autodiff.runner import default_cache_path, mark_dead_runs
from autodiff.errors import StoreError
from autodiff.store import Store, is_url, mask_secrets, resolve_spec

# Escaped by `md`; with "&", so that an entity ("&lt;") shows as written, not decoded.
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:&])")
ALL = "All"  # the choice of a filter that keeps everything


@st.cache_resource
def get_store(spec: str) -> Store:
    """One Store object per store (SQLite path or PostgreSQL URL), shared across sessions; it
    opens short-lived connections (SQLite) or borrows them from its pool (PostgreSQL), waiting at
    most `STORE_WAIT_S` for one while the database does not answer (then the page says so:
    `store_unreachable`), not the trainer's minute."""
    return Store(spec, wait_s=STORE_WAIT_S)


STORE_WAIT_S = 5.0


def store_unreachable(exc: StoreError) -> None:
    """Say, in place of a page, that the store failed under it (a PostgreSQL server down or
    restarting), masked, and what to do; for an error no page handled itself."""
    said = mask_secrets(str(exc)).rstrip(". ")
    st.error(f"**The run store did not answer.** {md(said)}.  \nNothing stored is lost: reload the page once the "
             "database answers again.", icon=":material/error:")


def store_path() -> str:
    """This session's store: a SQLite file's absolute path, or a postgresql:// URL (may hold a
    password: show `current_store().display`, never this)."""
    spec = resolve_spec(st.session_state.get("store_path") or None)
    return spec if is_url(spec) else str(Path(spec).resolve())


def cache_path() -> Path:
    return default_cache_path().resolve()


def current_store() -> Store:
    """The store of this session. Every page starts here, so this is also where a page run that
    bypassed the frame (see `_leave_legacy_pages_mode`) is sent back through app.py."""
    _leave_legacy_pages_mode()
    try:
        return get_store(store_path())
    except StoreError as exc:  # a wrong password, a server down, not a store: said once, masked, and the page ends
        st.error(f"**The run store cannot be opened.** {md(mask_secrets(str(exc)))}", icon=":material/error:")
        st.stop()


def _leave_legacy_pages_mode() -> None:
    """Because a folder named pages/ sits beside app.py, each new Streamlit server starts in its
    legacy multipage mode and stays there until some run calls st.navigation. If the first visit
    to a fresh server is a deep link (/graph), Streamlit runs pages/graph.py on its own: no app.py,
    so no sidebar and no run chosen. For a session that has not been through the frame yet (so no
    click can be lost), clear the flag st.navigation itself clears and rerun: the run then goes
    through app.py, on the same page (page ids are their URL paths). Streamlit calls the flag a
    relic kept for old apps; should it go, this does nothing.

    Upstream: the flag came with https://github.com/streamlit/streamlit/pull/10276 (MPA v2 by
    default), whose review reports this very case: a pages/ folder plus st.navigation, opened on a
    page's URL, "completely switch[es] back to MPAv1". Remove this function once a fresh server
    opened on a deep link draws the frame without it: the guard is
    tests/test_browser.py::test_deep_link_as_a_fresh_servers_first_request."""
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # a Streamlit without the legacy mode has nothing to leave
        return
    if getattr(PagesManager, "uses_pages_directory", None) and "run_id" not in st.session_state:
        PagesManager.uses_pages_directory = False
        st.rerun()


ACTIVE = ("created", "queued", "running")  # queued: waiting for a worker (a PostgreSQL store)


@st.cache_data(max_entries=1000, show_spinner=False)
def _settled_summary(path: str, run_id: str, status: str, updated_at: float) -> dict:
    return run_summary(get_store(path), run_id)


def summary(store: Store, run: Run) -> dict:
    """`run_summary` of a run (as `Store.runs` gives it). A run no process writes to (completed,
    stopped, failed) changes only along with its status and time stamp, so its summary is
    computed once and kept: a store of many runs does not sum every run's calls on each visit."""
    if run.status in ACTIVE:
        return run_summary(store, run.id)
    return _settled_summary(store.spec, run.id, run.status, run.updated_at)


def static_url(name: str = "") -> str:
    """Where the browser finds a file of the project's static/ folder (served by Streamlit at
    /app/static/, under the server's base path if it has one)."""
    base = (st.get_option("server.baseUrlPath") or "").strip("/")
    return f"/{base}/app/static/{name}" if base else f"/app/static/{name}"


def page_url(page: str = "", **params: object) -> str:
    """The address of a dashboard page ("curves", "proposals"; "" for the first page) with a query
    string of `params` (None values left out), under the server's base path if it has one."""
    base = (st.get_option("server.baseUrlPath") or "").strip("/")
    query = urlencode({k: str(v) for k, v in params.items() if v is not None})
    return "/" + "/".join(part for part in (base, page) if part) + (f"?{query}" if query else "")


# --- choices that follow the user: kept in the URL, reset when what they choose among changes -----
#
# A keyed Streamlit widget keeps its value across reruns as long as the value is still among its
# options, even when the options now mean something else (step 2 of another run, version 0 of
# another parameter). `reset_when` ties a widget to the scope its options come from; `choose`
# adds the URL: a choice is read from the query string when the page opens with one (a reload, a
# shared link), and written back on every run, so the address bar always names the view.


def reset_when(key: str, scope: object, value: object) -> None:
    """Give widget `key` `value` when it is drawn for another `scope` (what its choices depend on:
    the run, a parameter) than last time, or for the first time. Call it before drawing the
    widget, which then takes no default of its own."""
    mark = f"_scope:{key}"
    if key not in st.session_state or st.session_state.get(mark) != scope:
        st.session_state[key] = value
    st.session_state[mark] = scope


def from_url(key: str, param: str, options: Sequence, scope: object, value: object) -> str | None:
    """`reset_when`, except that a value the URL's query string `param` brought (one this session
    has not written there itself: a reload, a shared link) is taken when it is among `options`.
    Returns that value when it is not among them (the caller says so; the widget keeps its own
    choice), else None."""
    wanted = st.query_params.get(param)
    by_text = {str(o): o for o in options}
    if wanted is not None and wanted != st.session_state.get(f"_url:{param}") and wanted in by_text:
        st.session_state[key] = by_text[wanted]
        st.session_state[f"_scope:{key}"] = scope
        return None
    reset_when(key, scope, value)
    return wanted if wanted is not None and wanted != st.session_state.get(f"_url:{param}") else None


def to_url(param: str, value: object) -> None:
    """Write a choice into the URL's query string (a choice of `ALL`, or None, takes it out)."""
    text = None if value is None or value == ALL else str(value)
    st.session_state[f"_url:{param}"] = text
    if text is None:
        if param in st.query_params:
            del st.query_params[param]
    elif st.query_params.get(param) != text:
        st.query_params[param] = text


def choose(where: Any, label: str, options: Sequence, *, key: str, scope: object, url: str | None = None,
           index: int = 0, missing: str = "is not among the choices", **kwargs: Any) -> Any:
    """A selectbox in `where` (st, st.sidebar, a column) that opens on `options[index]` and goes back
    to it whenever `scope` changes; with `url`, its choice is also kept in that query parameter.
    A value the URL brought that is not among `options` is said once, as a warning in the page's
    main area ("Step '999' `missing`: showing 3."), and the address is rewritten to what is shown."""
    options = list(options)
    unknown = from_url(key, url, options, scope, options[index]) if url else reset_when(key, scope, options[index])
    if st.session_state[key] not in options:  # gone from the same scope's choices (a node not traced at this step)
        st.session_state[key] = options[index]
    chosen = where.selectbox(label, options, key=key, **kwargs)
    if url:
        to_url(url, chosen)
    if unknown is not None:
        shown = kwargs.get("format_func", str)(chosen)
        st.warning(f"{md(label)} '{md(unknown)}' (from the address) {md(missing)}: showing {md(shown)}.",
                   icon=":material/warning:")
    return chosen


def md(text: object) -> str:
    """Escape untrusted text for st.markdown: no HTML, links, images or formatting survive. A bare
    web or e-mail address is not made a link either: GitHub-flavoured markdown links them after
    escapes are read (remark-gfm's autolink literals: "http://", "https://", "www.", "a@b.c"), so a
    word joiner (U+2060, invisible, no break) goes inside each of those marks."""
    text = _AUTOLINK.sub(WORD_JOINER, "" if text is None else str(text))
    return _MD_SPECIAL.sub(r"\\\1", text).replace("\n", "  \n")


WORD_JOINER = "\u2060"
# Inside the marks GFM's autolink literals start from: "http:" + "//", "www" + ".", and after the
# "@" of an e-mail address.
_AUTOLINK = re.compile(r"(?<=https:)(?=//)|(?<=http:)(?=//)|(?<=www)(?=\.)|(?<=\w@)(?=\w)", re.I)


_TABLE_STYLE = """<style>
.plain-table { overflow-x: auto; }
.plain-table table { border-collapse: collapse; font-size: 0.85rem; }
.plain-table th, .plain-table td { padding: 0.3rem 0.3rem; text-align: left; vertical-align: top;
  border-bottom: 1px solid color-mix(in srgb, currentColor 15%, transparent); }
.plain-table td { overflow-wrap: anywhere; min-width: 3.5rem; }
.plain-table td.words { overflow-wrap: normal; }
.plain-table th { font-weight: 600; color: color-mix(in srgb, currentColor 75%, transparent); }
.plain-table td.num, .plain-table th.num { text-align: right; font-variant-numeric: tabular-nums; }
.plain-table td.num { white-space: nowrap; min-width: 0; }
.plain-table td.wrap { min-width: 6rem; }
.plain-table td.fold { min-width: 7rem; max-width: 40rem; }
.plain-table td.fold summary { cursor: pointer; }
.plain-table td.fold details[open] summary { color: color-mix(in srgb, currentColor 60%, transparent); }
</style>"""


class Link(NamedTuple):
    """A table cell that links somewhere: `text` is escaped like any cell, `href` made by `page_url`."""

    text: str
    href: str


FOLD_AT = 120  # characters of a folded cell (`html_table`'s `fold`) shown before it is opened


def _cell(value: object, fold: bool = False) -> str:
    if isinstance(value, Link):
        return f'<a href="{html.escape(value.href, quote=True)}" target="_self">{html.escape(value.text)}</a>'
    text = "-" if value is None else str(value)
    if fold and len(text) > FOLD_AT:  # its start, and the whole text when opened (no script: a <details>)
        return (f"<details><summary>{html.escape(text[:FOLD_AT])}… ({count(len(text), 'character')})</summary>"
                f"{html.escape(text)}</details>")
    return html.escape(text)


def html_table(rows: Sequence[dict], numeric: Sequence[str] = (), wrap: Sequence[str] = ("error",),
               fold: Sequence[str] = (), drop_empty: Sequence[str] = (), words: Sequence[str] = ()) -> str:
    """A plain HTML table of already formatted rows (column name -> text, or a `Link`; None shows as
    "-"), every cell escaped, for st.html; a cell of a `fold` column longer than `FOLD_AT`
    characters shows its start and opens on a click to the whole text. For tables of up to a few
    dozen rows where st.dataframe's grid is more than the page needs: its script (about 1.6 MB)
    loads on a browser tab's first use, and each grid costs the browser about 0.1 s to draw
    (bench/dashboard_load.py's large run: the Graph page's three grids drawn as plain tables cut
    the browser's main-thread work for that page from about 0.9 s to 0.5 s). A column of
    `drop_empty` that is empty (None or "") in every row is left out, to save width. Cells wrap
    (long words anywhere, except in `words` columns: "completed" is not cut) so that a table fits
    a narrow page rather than scrolling sideways."""
    if not rows:
        return ""
    columns = [c for c in rows[0] if c not in drop_empty or any(r.get(c) not in (None, "") for r in rows)]

    def cls(column: str) -> str:
        return (' class="num"' if column in numeric else ' class="fold"' if column in fold
                else ' class="wrap"' if column in wrap else ' class="words"' if column in words else "")

    head = "".join(f"<th{cls(c)}>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td{cls(c)}>{_cell(r.get(c), c in fold)}</td>" for c in columns)
                   + "</tr>" for r in rows)
    return (f'{_TABLE_STYLE}<div class="plain-table"><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{body}</tbody></table></div>')


def html_tables(*tables: str) -> str:
    """Several `html_table`s for one st.html element, a line apart: one element draws faster in the
    browser than one per table (a tab's first load of the Runs page, bench/dashboard_load.py)."""
    return '<div style="height: 1rem"></div>'.join(t for t in tables if t)


_PRE_STYLE = """<style>
.plain-text { margin: 0; padding: 0.6rem 0.8rem; border-radius: 0.5rem; white-space: pre-wrap;
  overflow-wrap: anywhere; font-family: "Source Code Pro", monospace; font-size: 0.8rem; line-height: 1.5;
  background: color-mix(in srgb, currentColor 6%, transparent); }
</style>"""


def script_json(text: str) -> str:
    """JSON text made safe inside an HTML <script> block: <, >, & and the JavaScript line
    separators U+2028/U+2029 written as \\u escapes, as Jinja's `tojson` filter does. Raises
    nothing; `text` must already be JSON."""
    for c in "<>&\u2028\u2029":
        text = text.replace(c, f"\\u{ord(c):04x}")
    return text


def unlinked_costs(costs: Iterable[dict]) -> str:
    """A sentence for costs shown "unknown" because their calls are not linked to the proposal in
    the store (`Store.proposal_costs` gives None), "" when there are none."""
    n = sum(c["make_usd"] is None or c["validate_usd"] is None for c in costs)
    return (f" {count(n, 'proposal')} cost unknown: their calls are not linked to them in this store, which was "
            "written before those links (as the bundled sample runs were); every call is still counted in the "
            "run's cost.") if n else ""


def html_pre(text: str) -> str:
    """`text` as an escaped, wrapped, monospace block for st.html, shown as written (every space and
    line break kept, long words cut anywhere), in the theme's colours (light or dark). For text to
    read rather than code to highlight: st.code's highlighter script loads on a browser tab's
    first st.code, and on bench/dashboard_load.py's large run that load took 0.4 to 1.2 s of the
    browser's main thread (by the machine's load) on the first click to the Prompts page, which
    shows one short value, and nothing measurable on a second click: a one-time cost per tab, not
    one per block. The line break after <pre> is the one HTML drops, so a leading line break of
    `text` is kept."""
    return f'{_PRE_STYLE}<pre class="plain-text">\n{html.escape(text)}</pre>'


def fmt_score(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def fmt_time(ts: float | None) -> str:
    return "-" if not ts else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


class _RunMenu:
    """Where `choose` draws the run picker: a popover in the sidebar, labelled with the run chosen,
    holding the selectbox. The browser draws a popover's content only when it is opened, so a new
    tab's first load no longer fetches, starts and draws the selectbox's code (about 20 scripts).
    The selectbox is still run on the server each time, so the choice, its reset and the URL work
    as for any `choose`, and it stays usable with many runs (it filters as one types)."""

    KEY = "run_menu"  # the popover's open state: True while open

    def selectbox(self, label: str, options: Sequence, *, key: str, **kwargs: Any) -> Any:
        # Wide enough for the longest id (an id cut short cannot be told from its neighbours), at
        # most 960 px; the popover closes after a pick, since a picked run is what the menu is for.
        widest = max((len(str(option)) for option in options), default=0)
        with st.sidebar.popover(f"{md(label)}: {md(st.session_state[key])}", key=self.KEY, on_change="rerun",
                                width="stretch"):
            return st.selectbox(label, options, key=key, on_change=self._close,
                                width=min(max(300, widest * 8 + 64), 960), **kwargs)

    @classmethod
    def _close(cls) -> None:
        st.session_state[cls.KEY] = False


def sidebar() -> str | None:
    """Store and run pickers in the sidebar. The chosen run id lives in session state and in the
    URL (`?run=`), so a reload or a shared link opens the same run; without one, the newest. The
    run picker is a selectbox inside a popover (`_RunMenu`) whose button names the run."""
    store = current_store()
    runs = store.runs()
    if mark_dead_runs(store, runs):  # a run whose process died shows as stopped on every page
        runs = store.runs()
    where = f"Store: {md(store.display)}"  # a database password masked
    if not runs:
        st.sidebar.caption(where)
        st.session_state["run_id"] = None
        return None
    ids = [r.id for r in runs]
    # Plain ids as options: the front end keeps a chosen option's label as its value, so a status
    # in the label went stale when the run's status changed. Outside `with st.sidebar`, so that a
    # run the address names but the store lacks is said on the page itself, not in the sidebar.
    known = st.session_state.get("run_id")
    run_id = choose(_RunMenu(), "Run", ids, key="run_picker", scope=None, url="run",
                    index=ids.index(known) if known in ids else 0, missing="is not in this store")
    run = next(r for r in runs if r.id == run_id)
    # One caption under the menu, in the body font: each sidebar element is drawn on every page,
    # and a tab's first load of the Runs page is timed against an empty app (bench/dashboard_load.py).
    st.sidebar.caption(f"{md(run.task)}, {run.status}  \n{where}")
    st.session_state["run_id"] = run_id
    return run_id


def require_run() -> tuple[Store, str]:
    """The store and the chosen run, or a note on how to start one (and the page stops). A run
    that stopped or failed has its reason and what to do on top of the page (`run_problem`)."""
    store = current_store()
    run_id = st.session_state.get("run_id")
    if not run_id:
        st.info(
            "No runs in this store yet. Start one on the **Runs** page, or from a shell: "
            "`autodiff train object_counting`."
        )
        st.stop()
    run_problem(store.run(run_id))
    return store, run_id


def run_problem(run: Run, here: bool = False) -> Recovery | None:
    """Why `run` stopped or failed and what to do (see autodiff.recovery), drawn as an error
    (failed) or a warning (stopped); nothing for a run that is going or completed. Every page of
    a run draws it first (through `require_run`); the Runs page (`here`) draws it above Resume."""
    what = recovery(run, current_store())
    if what is None:
        return None
    where = "below" if here else "on the **Runs** page"
    resume = {"go": f"Resume it {where}.", "fix_first": f"Resume is {where}.",
              "new_run": f"Start a new run {where} (a resume would fail the same way)."}[what.outlook]
    text = f"**Run {md(run.id)} {what.status}:** {md(what.error or 'no reason recorded')}  \n" \
           f"**What to do:** {md(what.advice)} {resume}"
    if what.status == "failed":
        st.error(text, icon=":material/error:")
    else:  # a stop someone asked for is no fault: a pause sign, not a warning sign
        asked = (what.error or "").startswith(("stopped on request", "interrupted"))
        st.warning(text, icon=":material/pause_circle:" if asked else ":material/warning:")
    return what


def show_call(call: LLMCall | None) -> None:
    """One recorded LLM call, as stored: model, tokens, how it ended, every message, the reasoning
    the model wrote (kept apart from its reply) and the reply or the error. All text is shown as
    code, never as markdown or HTML (it came from an LLM or a dataset)."""
    if call is None:
        st.caption("The call record is missing from the store.")
        return
    notes = [note for note, flag in (("cached", call.cached), ("cut off at the token limit", call.cut_off),
                                     (count(call.attempts, "request"), call.attempts > 1)) if flag]
    st.caption(" · ".join([md(call.model), f"{call.prompt_tokens:,}+{count(call.completion_tokens, 'token')}", *notes]))
    for role, content in call.messages:
        st.caption(md(role))
        st.code(content, language=None, wrap_lines=True)
    if call.reasoning:
        st.caption("reasoning (not part of the reply)")
        st.code(call.reasoning, language=None, wrap_lines=True)
    if call.error:
        st.caption(f"error ({md(call.error_kind or 'unknown kind')})")
        st.code(call.error, language=None, wrap_lines=True)
    else:
        st.caption("reply")
        st.code(call.response or "", language=None, wrap_lines=True)
