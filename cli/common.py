"""Shared plumbing of the CLI: option types, running coroutines, printing errors."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from pgsink.engine.db import DATABASE_URL_ENV, state_dsn
from pgsink.engine.errors import PgsinkError

T = TypeVar("T")

console = Console()
err_console = Console(stderr=True)

DatabaseUrl = Annotated[
    str | None,
    typer.Option("--database-url", envvar=DATABASE_URL_ENV, show_envvar=True,
                 help="State database URL (holds the pgsink schema).", show_default=False),
]


EVENT_LOOP_ENV = "PGSINK_EVENT_LOOP"


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop, unless ``PGSINK_EVENT_LOOP=asyncio`` asks for asyncio's own (to debug).

    With uvloop the reader needed ~7% less CPU a change, and ran ~5% faster, in 12
    alternating ingest pairs (benchmarks/RESULTS.md). None means asyncio's default loop,
    also where uvloop is not installed (it does not build on Windows).
    """
    choice = os.environ.get(EVENT_LOOP_ENV, "uvloop")
    if choice not in ("uvloop", "asyncio"):
        raise PgsinkError(f"{EVENT_LOOP_ENV}={choice!r}: use uvloop (the default) or asyncio.")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run an engine coroutine; a PgsinkError becomes a clean message and exit code 1."""
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            return runner.run(coro)
    except PgsinkError as e:
        coro.close()  # not started if the loop could not be made (a no-op once it ran)
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, markup=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def dsn(database_url: str | None) -> str:
    try:
        return state_dsn(database_url)
    except PgsinkError as e:
        err_console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
