"""The dashboard's server: Streamlit's own command line, with the pages' imports loaded first.

    python -m dashboard.serve run app.py [streamlit options]   (what `autodiff dashboard` runs)

Streamlit imports a page's modules when a session first runs it, so the first visitor after a
start waited for the engine, pandas, plotly and networkx to load (over a second on a
2-core machine). Here they are imported before the server starts listening, in this one thread:
imports racing in two threads can deadlock on a circular import, and the server answers only
once a first visit is fast. The dashboard's own modules (dashboard.*) are left to the first
visit: they are quick to load, and their Streamlit caches are best made with the server running.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def page_imports(root: Path = ROOT) -> list[str]:
    """Modules app.py, the pages and the dashboard's own modules import, in the order they first
    appear (so what dashboard.graphview lays graphs out with, networkx, is among them). For `from a import b`
    both `a` and `a.b` are listed: `b` may be a submodule (`from dashboard import charts`)."""
    names: list[str] = []
    for path in [root / "app.py", *sorted((root / "pages").glob("*.py")), *sorted((root / "dashboard").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return list(dict.fromkeys(names))


def preload(names: list[str]) -> list[str]:
    """Import each module that exists; returns those imported. Names that are not modules (the
    `b` of `from a import b` when it is a function) are skipped, and so is a module that fails to
    import: the page that needs it reports the error when it runs."""
    loaded = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - see the docstring: the page itself shows the error
            continue
        loaded.append(name)
    return loaded


def main() -> int:
    preload([name for name in page_imports() if name.split(".")[0] != "dashboard"])
    from streamlit.web.cli import main as streamlit_main

    return streamlit_main()


if __name__ == "__main__":
    sys.exit(main())
