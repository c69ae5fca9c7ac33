"""`python -m benchmarks <name> [options]`."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="pgsink benchmarks.")


@app.callback()
def _group() -> None:
    """Each command starts its own throwaway Postgres and writes a JSON run file."""


@app.command()
def ingest(changes: int = typer.Option(200_000, help="Changes to write and ingest.")) -> None:
    """Reader ingest rate vs pg_recvlogical on the same WAL."""
    from .ingest import main

    main(changes)


if __name__ == "__main__":
    app()
