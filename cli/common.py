"""Shared plumbing of the CLI: option types, running coroutines, printing errors."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
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


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run an engine coroutine; a PgsinkError becomes a clean message and exit code 1."""
    try:
        return asyncio.run(coro)
    except PgsinkError as e:
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
