"""Who trains a run: one process at a time, whatever starts it (a shell, Python, the dashboard,
a worker), on either store.

A trainer takes a run before it touches the run's steps (`take`): it writes its host, its pid
and the time into the run, status running, as a compare-and-set on what it read, so of two
processes taking one run at once exactly one wins. While a run says running, another process
may take it only when the holder is known dead: a process of this host that is gone (the host is
recorded because a pid means nothing on another machine). A holder on another host cannot be
checked from here, so it is refused, naming host, pid and since when, unless the caller forces a
takeover (`autodiff resume RUN --force`, `autodiff.resume(..., force=True)`) because that process
is really gone; a takeover is recorded in the run's events, and a holder that was alive after
all stops at its next step boundary when it sees the run is no longer its own (`still_holds`).

Runs a worker holds on a PostgreSQL store follow the queue's own rule first (see
`runner._refuse_if_queued`): they are handed to another worker when the worker stops answering.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from autodiff.errors import AutodiffError, ConfigError
from autodiff.records import Run
from autodiff.recovery import resume_command, store_option

Liveness = Literal["alive", "dead", "unknown"]
# A process with the holder's pid that started this long after the run was taken is another one
# (the pid was reused). Generous: a start time read from /proc is exact to a second, but the wall
# clock the run's time was written with may have been stepped since.
PID_REUSE_MARGIN_S = 60.0


def this_host() -> str:
    """This machine's name, as runs record their holder's host."""
    return socket.gethostname()


def pid_alive(pid: int | None) -> bool:
    """Whether process `pid` of this machine exists (False for None)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Holder:
    """The process that holds a running run: `host` None when not recorded (a run trained before
    hosts were), `since` in seconds (time.time()), None when not recorded."""

    host: str | None
    pid: int | None
    since: float | None

    def is_me(self) -> bool:
        return self.host == this_host() and self.pid == os.getpid()

    def describe(self) -> str:
        """'process 4242 on host gpu-3 (this machine) since 2026-01-05 14:02:11, 12 min ago'."""
        who = f"process {self.pid}" if self.pid else "a process"
        where = (f" on host {self.host}" + (" (this machine)" if self.host == this_host() else "")
                 if self.host else " on a host not recorded")
        return f"{who}{where}{_since(self.since)}"


def holder(run: Run) -> Holder | None:
    """Who holds `run`: its trainer while it says running, else None."""
    if run.status != "running":
        return None
    return Holder(run.host, run.pid, run.held_since)


def liveness(run: Run, backend: str) -> Liveness:
    """Whether the holder of a running `run` lives: checked for a process of this host (a
    process with its pid that started after the run was taken is another one: the pid was
    reused); a run without a recorded host counts as this host's on a SQLite store (one
    machine's file), as unknown on a PostgreSQL store (any machine's); another host's process
    is unknown."""
    host = run.host or (this_host() if backend == "sqlite" else None)
    if host != this_host() or not run.pid:
        return "unknown"
    if not pid_alive(run.pid):
        return "dead"
    started = process_started_at(run.pid)
    if started is not None and run.held_since is not None and started > run.held_since + PID_REUSE_MARGIN_S:
        return "dead"  # that pid now names a process born after the holder took the run
    return "alive"


def process_started_at(pid: int) -> float | None:
    """When process `pid` of this machine started (seconds, time.time()), from Linux's /proc;
    None where that cannot be read (another system, the process gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


# An interrupted trainer (Ctrl-C, SIGTERM) records its run as stopped once its own calls are over;
# its process then still has to end (stores closed, the interpreter's exit: seconds, longer on a
# busy machine). For this long after such a stop, another trainer on its machine waits for it.
STOPPING_GRACE_S = 60.0


def still_ending(run: Run, backend: str) -> bool:
    """Whether `run` was stopped by an interrupt less than `STOPPING_GRACE_S` ago and the process
    that trained it, on this machine and not this one, is still alive (see `liveness`)."""
    if run.status != "stopped" or not (run.error or "").startswith("interrupted ("):
        return False
    if not run.updated_at or time.time() - run.updated_at > STOPPING_GRACE_S:
        return False
    if run.host != this_host() or run.pid == os.getpid():
        return False
    return liveness(run, backend) == "alive"


def check(store, run: Run, *, force: bool = False) -> None:
    """Refuse (ConfigError) to train `run` here while another process holds it and may be
    alive: on this host a process that still runs; on another host (or one not recorded) any,
    unless `force`; and, on this host, a process an interrupt stopped it in that has not ended
    yet (`still_ending`). Takes nothing: see `take`, which also checks, atomically."""
    if still_ending(run, store.backend):
        raise ConfigError(f"run {run.id} was just interrupted in process {run.pid} on this machine, which is still "
                          "ending: resume it once that process has exited (a few seconds), so that no call of "
                          "the two processes overlaps")
    held = holder(run)
    if held is None or held.is_me():
        return
    state = liveness(run, store.backend)
    if state == "dead" or (force and state == "unknown"):
        return
    raise ConfigError(refusal(run, state, store))


def refusal(run: Run, state: Liveness, store=None) -> str:
    """Why a second trainer may not take `run`, and what to do."""
    held = holder(run) or Holder(run.host, run.pid, run.held_since)
    where = store_option(store) if store is not None else ""
    if state == "alive":
        return (f"run {run.id} is being trained by {held.describe()}: one run is trained by one process at a time. "
                f"Stop it first (autodiff stop {run.id}{where}, or Ctrl-C where it runs), then resume it once it "
                "says stopped. --force does not take a run from a process this machine sees alive (a process that "
                "is stopped or paused still holds it: end it, or let it go on)")
    return (f"run {run.id} is being trained by {held.describe()}, which cannot be checked from here: one run is "
            f"trained by one process at a time. Stop it there (autodiff stop {run.id}{where}); if that process is "
            f"really gone (killed, its machine down), take the run over: {resume_command(run.id, store, '--force')} "
            "(from Python: autodiff.resume(..., force=True))")


def take(store, run_id: str, *, force: bool = False) -> Run:
    """Make this process the holder of run `run_id` (status running, this host and pid, since
    now), unless another process holds it and may be alive (see `check`; `force` takes over
    from a holder that cannot be checked). Atomic: the write happens only if the run is still as
    read, so two processes taking one run cannot both win. A takeover from a dead or forced-out
    holder is recorded as a run event "taken_over". Returns the run as it was before. Raises
    ConfigError when refused, StoreError for an unknown run."""
    for _ in range(3):  # the run changed between read and write: read it again
        run = store.run(run_id)
        held = holder(run)
        if held is not None and held.is_me():
            return run
        check(store, run, force=force)
        if store.hold_run(run_id, this_host(), os.getpid(), expect=run):
            if held is not None:
                how = "its process is gone" if liveness(run, store.backend) == "dead" else "forced"
                store.add_run_event(run_id, "taken_over", f"taken over by {Holder(this_host(), os.getpid(), None).describe()} "
                                                          f"from {held.describe()} ({how})")
            return run
    raise ConfigError(f"run {run_id} keeps changing while this process tries to take it: another process is starting "
                      "it; look again with autodiff show " + run_id)


def still_holds(store, run_id: str) -> bool:
    """Whether this process still holds run `run_id` (False once another process took it over)."""
    run = store.run(run_id)
    return run.status == "running" and run.host == this_host() and run.pid == os.getpid()


def _since(at: float | None) -> str:
    if not at:
        return ""
    ago = max(0.0, time.time() - at)
    span = f"{ago:.0f} s" if ago < 120 else f"{ago / 60:.0f} min" if ago < 7200 else f"{ago / 3600:.1f} h"
    return f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at))}, {span} ago"
