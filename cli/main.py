"""The `pgsink` command: a thin face over the engine."""

from __future__ import annotations

from typing import Annotated

import typer

from pgsink.engine import migrate as migrations
from pgsink.engine.secrets import generate_key

from .common import DatabaseUrl, console, dsn, err_console, run

app = typer.Typer(
    name="pgsink",
    help="Stream Postgres changes to webhook endpoints, with all state in Postgres.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def migrate(
    database_url: DatabaseUrl = None,
    status: Annotated[bool, typer.Option("--status", help="List applied and pending migrations; exit 1 if any is pending.")] = False,
) -> None:
    """Create or upgrade the pgsink schema in the state database."""
    url = dsn(database_url)
    if status:
        rows = run(migrations.status(url))
        pending = [r for r in rows if not r.applied]
        for r in rows:
            when = r.applied_at.isoformat(timespec="seconds") if r.applied_at else "pending"
            console.print(f"{r.version:04d}_{r.name}  {when}", highlight=False)
        if pending:
            err_console.print(f"{len(pending)} migration(s) pending: run `pgsink migrate`.")
            raise typer.Exit(1)
        return
    done = run(migrations.migrate(url))
    if done:
        for m in done:
            console.print(f"applied {m.version:04d}_{m.name}", highlight=False)
    else:
        console.print("schema is up to date")


@app.command()
def keygen() -> None:
    """Print a new secret key for PGSINK_SECRET_KEY (encrypts passwords and headers)."""
    print(generate_key())


def _register() -> None:
    from . import backfill_cmds, config_cmds, demo_cmd, endpoint_cmds, ops_cmds, sink_cmds, source_cmds, worker_cmd

    for module in (source_cmds, endpoint_cmds, sink_cmds, config_cmds, worker_cmd, demo_cmd, ops_cmds, backfill_cmds):
        module.register(app)


_register()


def main() -> None:
    app()
