"""Built-in tasks by name, and user tasks as `path/to/file.py:factory` or `module:factory`."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Mapping

from autodiff.errors import AutodiffError, ConfigError
from autodiff.pipeline import Task, check_splits

BUILTIN: dict[str, str] = {
    "object_counting": "autodiff.tasks.object_counting:load",
    "trec": "autodiff.tasks.trec:load",
    "rag": "autodiff.tasks.hotpotqa:load_rag",
    "multihop_rag": "autodiff.tasks.hotpotqa:load_multihop_rag",
    "agent_rag": "autodiff.tasks.hotpotqa:load_agent_rag",
}


def task_names() -> list[str]:
    return list(BUILTIN)


def load_task(name: str, args: Mapping[str, str] | None = None) -> Task:
    """The task `name` names: a built-in task, `path/to/file.py:factory` or `module:factory`,
    the factory called with `args` as keyword arguments. A task file's folder is importable
    while it loads, so it can import the modules beside it. Raises ConfigError naming what is
    wrong (unknown name, missing file or factory, a factory that fails or returns no Task)."""
    target = BUILTIN.get(name, name)
    if ":" not in target:
        raise ConfigError(
            f"unknown task {name!r}; built-in tasks: {', '.join(BUILTIN)}; or give file.py:factory / module:factory"
        )
    where, _, attr = target.rpartition(":")
    factory = getattr(_import(where), attr, None)
    if not callable(factory):
        raise ConfigError(f"task {name!r}: {where} has no callable {attr!r}")
    try:
        task = factory(**dict(args or {}))
    except AutodiffError:
        raise  # the project's own errors (bad data, a bad pipeline) already say what is wrong
    except Exception as exc:  # noqa: BLE001 - the user's factory; its failure is named, not dumped
        raise ConfigError(f"task {name!r}: {attr}({_args(args)}) raised {type(exc).__name__}: {exc}"
                          + (" (--task-arg values arrive as strings)" if args else "")) from None
    if not isinstance(task, Task):
        raise ConfigError(f"task {name!r}: {attr}() returned {type(task).__name__}, not an autodiff Task")
    check_splits(task)
    if name not in BUILTIN:
        task.name = name
    return task


def _args(args: Mapping[str, str] | None) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in (args or {}).items())


def _import(where: str):
    if where.endswith(".py"):
        path = Path(where).expanduser().resolve()
        if not path.exists():
            raise ConfigError(f"task file {where} does not exist")
        spec = importlib.util.spec_from_file_location(f"autodiff_user_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        # Registered before it runs, as an import would: dataclasses (and pickling) look the
        # module up in sys.modules while the file executes.
        sys.modules[spec.name] = module
        folder = str(path.parent)
        if folder not in sys.path:  # modules beside the task file import as they would from there
            sys.path.append(folder)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's file; its failure is named, not dumped
            sys.modules.pop(spec.name, None)
            raise ConfigError(f"task file {path} failed to import: {_where_it_failed(exc)}") from None
        return module
    try:
        return importlib.import_module(where)
    except Exception as exc:  # noqa: BLE001 - ditto, for a module
        raise ConfigError(f"cannot import task module {where!r}: {_where_it_failed(exc)}") from None


def _where_it_failed(exc: BaseException) -> str:
    """An import's failure in one line: a syntax error with its file, line and column; any other
    error with its type, message and the last line of the traceback that ran ("file.py:12")."""
    if isinstance(exc, SyntaxError):
        return f"{type(exc).__name__} at {exc.filename}:{exc.lineno}" + (f":{exc.offset}" if exc.offset else "") \
            + f": {exc.msg}"
    frames = traceback.extract_tb(exc.__traceback__)
    at = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{at}"
