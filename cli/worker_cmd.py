"""`pgsink worker`: run the reader and delivery loops."""

from __future__ import annotations

from typing import Annotated

import typer

from pgsink.engine.worker import ROLES, build_stages, new_worker_id, run_stages

from .common import DatabaseUrl, dsn, run, setup_logging


def worker(
    database_url: DatabaseUrl = None,
    role: Annotated[list[str] | None, typer.Option("--role", help=f"Stage(s) to run: {', '.join(ROLES)}. Default: all.")] = None,
    source: Annotated[list[str] | None, typer.Option("--source", help="Only read these sources.")] = None,
    sink: Annotated[list[str] | None, typer.Option("--sink", help="Only deliver these sinks.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a worker: readers (one active per source) and delivery loops. Start as many as you like."""
    setup_logging(verbose)
    url = dsn(database_url)
    worker_id = new_worker_id()

    async def main() -> None:
        stages = build_stages(url, role or ROLES, worker_id=worker_id, sources=source, sinks=sink)
        await run_stages(stages)

    run(main())


def register(app: typer.Typer) -> None:
    app.command()(worker)
