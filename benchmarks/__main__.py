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


@app.command()
def e2e(changes: int = typer.Option(200_000, help="Changes to write (batch size 1 is capped at 20k)."),
        batch_size: list[int] = typer.Option([1, 10, 100], help="Sink batch sizes to run."),
        rate: float = typer.Option(0, help="Target write rate, changes/s (0: as fast as possible)."),
        variant: list[str] = typer.Option(["plain"], help="plain, sql-filter, python-transform, lanes64, lanes8.")) -> None:
    """Source writes -> pgsink -> local receiver: throughput, decay, latency."""
    from .e2e import main

    main(changes, batch_size, rate or None, variant)


@app.command()
def costs(changes: int = typer.Option(100_000, help="Changes to record and replay.")) -> None:
    """CPU per change of the reader's Python work and of the state COPY, each measured alone."""
    from .costs import main

    main(changes)


@app.command()
def claim() -> None:
    """Claim cost with 10k vs 1M pending messages and 100k parked behind one group."""
    from .claim import main

    main()


@app.command("backfill")
def backfill_(rows: int = typer.Option(1_000_000, help="Rows in the table to backfill."),
              live_rate: float = typer.Option(500, help="Live updates/s captured alongside.")) -> None:
    """A full backfill delivered at batch size 100 while capture runs."""
    from .backfill import main

    main(rows, live_rate)


if __name__ == "__main__":
    app()
