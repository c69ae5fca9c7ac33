"""`pgsink demo`: the end-to-end demo on an embedded throwaway Postgres."""

from __future__ import annotations

import typer

from .common import console, run


def demo() -> None:
    """Start a throwaway Postgres, stream a sample table's changes to a local webhook, show them arrive."""
    from pgsink.engine.demo import run_demo

    run(run_demo(lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True)))


def register(app: typer.Typer) -> None:
    app.command()(demo)
