"""`pgsink worker`: run the reader, delivery, backfill and maintenance stages.

By default, on a machine with more than one core, each role runs in its own
child process (a Python process uses one core; the reader and delivery each
want one). `--one-process` runs them all on one event loop instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from typing import Annotated

import typer

from pgsink.engine.db import DATABASE_URL_ENV
from pgsink.engine.worker import ROLES, build_stages, new_worker_id, run_stages

from .common import DatabaseUrl, dsn, err_console, run, setup_logging


def worker(
    database_url: DatabaseUrl = None,
    role: Annotated[list[str] | None, typer.Option("--role", help=f"Stage(s) to run: {', '.join(ROLES)}. Default: all.")] = None,
    source: Annotated[list[str] | None, typer.Option("--source", help="Only read these sources.")] = None,
    sink: Annotated[list[str] | None, typer.Option("--sink", help="Only deliver these sinks.")] = None,
    one_process: Annotated[bool, typer.Option("--one-process", help="Run every role on one event loop (default: a process per role when there are several cores).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a worker: readers (one active per source), delivery, backfills, maintenance. Start as many as you like."""
    setup_logging(verbose)
    url = dsn(database_url)
    roles = list(role or ROLES)
    if not one_process and len(roles) > 1 and (os.cpu_count() or 1) > 1:
        raise typer.Exit(_supervise(url, roles, source or [], sink or [], verbose))
    worker_id = new_worker_id()
    # names this process's state-database sessions in pg_stat_activity (libpq reads PGAPPNAME)
    os.environ.setdefault("PGAPPNAME", f"pgsink {'+'.join(roles)}")

    async def main() -> None:
        stages = build_stages(url, roles, worker_id=worker_id, sources=source, sinks=sink)
        await run_stages(stages)

    run(main())


def _supervise(url: str, roles: list[str], sources: list[str], sinks: list[str], verbose: bool) -> int:
    """One child per role; signals are passed on; if a child dies, the others are stopped too."""
    base = [sys.executable, "-m", "pgsink.cli", "worker", "--one-process"]
    base += [a for s in sources for a in ("--source", s)] + [a for s in sinks for a in ("--sink", s)]
    base += ["--verbose"] if verbose else []
    env = {**os.environ, DATABASE_URL_ENV: url}  # not on the command line: ps would show a password
    children: dict[subprocess.Popen[bytes], str] = {}
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        signal_children(children, signum)

    for sig in (signal.SIGTERM, signal.SIGINT):  # before the first child: none is ever left behind
        signal.signal(sig, forward)
    for r in roles:
        if not stopping:
            children[subprocess.Popen([*base, "--role", r], env=env)] = r
    if stopping:  # the signal came during a spawn: that child was not in the list yet
        forward(signal.SIGTERM, None)
    status = 0
    while children:
        pid, code = os.wait()
        child = next((c for c in children if c.pid == pid), None)
        if child is None:
            continue
        child.returncode = os.waitstatus_to_exitcode(code)
        role = children.pop(child)
        if not (stopping and stopped_cleanly(child.returncode)):
            if not stopping:
                err_console.print(f"worker role {role} exited ({child.returncode}); stopping the others")
            status = status or (child.returncode or 1)
            forward(signal.SIGTERM, None)
    return status


def signal_children(children: Iterable[subprocess.Popen[bytes]], signum: int) -> None:
    """Send ``signum`` to children the wait loop has not reaped yet, without reaping any here.

    ``Popen.poll()`` and ``Popen.send_signal()`` call ``waitpid``: from a signal handler they would
    reap a child that just exited behind the loop's back, and its ``os.wait()`` would then fail
    with "No child processes". An exited child that is not reaped stays a zombie, so its pid is
    still ours and ``os.kill`` on it is harmless.
    """
    for child in list(children):
        with contextlib.suppress(ProcessLookupError):  # reaped by os.wait(), not yet popped
            os.kill(child.pid, signum)


def stopped_cleanly(returncode: int) -> bool:
    """How a child asked to stop may end: done, or killed by the very signal it was passed while
    still starting (before its handlers were in place, it had taken no work; all state is in
    Postgres)."""
    return returncode in (0, -signal.SIGTERM, -signal.SIGINT)


def register(app: typer.Typer) -> None:
    app.command()(worker)
