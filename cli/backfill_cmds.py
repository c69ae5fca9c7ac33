"""`pgsink backfill start|list|show|cancel`: send a table's existing rows as `read` messages.

Jobs are rows of pgsink.backfills (see ``pgsink.engine.backfill``); workers
with the backfill role run them. `start --wait` and `show --watch` draw a
progress bar from the pgsink.backfill_progress view.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from pgsink.engine import backfill as bf
from pgsink.engine.errors import PgsinkError

from .common import DatabaseUrl, console, dsn, err_console, run

backfill_app = typer.Typer(help="Backfills: send a table's existing rows as read messages.", no_args_is_help=True)

DONE_STATES = ("completed", "cancelled", "failed")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.add_typer(backfill_app, name="backfill")


def _id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        err_console.print(f"[bold red]error:[/] {escape(text)!r} is not a backfill id (a UUID): "
                          "see `pgsink backfill list`")
        raise typer.Exit(2) from None


@backfill_app.command("start")
def start(
    sink: Annotated[str, typer.Option("--sink", help="Sink name.")],
    table: Annotated[list[str], typer.Option("--table", help="Table (schema.table); repeat for several.")],
    sort_column: Annotated[str | None, typer.Option("--sort-column", help="Partial backfill: sort by this column...")] = None,
    start_position: Annotated[str | None, typer.Option("--start-position", help="...from this value (JSON or text).")] = None,
    page_size: Annotated[int, typer.Option("--page-size", help="First page size (adapts).")] = 1000,
    max_page_ms: Annotated[int, typer.Option("--max-page-ms", help="Keep each page query under this.")] = 5000,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until it ends.")] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Start a backfill of one or more tables for a sink (full, or partial from a start position)."""
    url = dsn(database_url)
    position: Any = bf.parse_position(start_position) if start_position is not None else None
    ids = []
    for t in table:
        bid = run(bf.start(url, sink, t, sort_column=sort_column, start_position=position, page_size=page_size,
                           max_page_ms=max_page_ms))
        ids.append(bid)
        console.print(f"backfill {bid} of {escape(t)} for sink {escape(sink)} started", highlight=False)
    if wait:
        _watch(url, ids)
        _exit_unless_completed(url, ids)


@backfill_app.command("list")
def list_(database_url: DatabaseUrl = None) -> None:
    """Backfills, newest first, with their progress."""
    rows = run(bf.progress(dsn(database_url)))
    if not rows:
        console.print("no backfills")
        return
    table = Table(title="backfills")
    for col in ("id", "sink", "table", "state", "rows", "estimate", "%", "rows/s", "ETA s", "error"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(str(r["id"]), escape(r["sink"]), escape(r["table"]), r["state"], str(r["rows_done"]),
                      _num(r["rows_estimate"]), _num(r["percent"]), _num(r["rows_per_second"]),
                      _num(r["eta_seconds"]), escape(r["error"] or ""))
    console.print(table)


@backfill_app.command("show")
def show(
    backfill_id: Annotated[str, typer.Argument(help="Backfill id.")],
    watch: Annotated[bool, typer.Option("--watch", help="Show a progress bar until it ends.")] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """One backfill: state, cursor, progress (rows, estimate, rate, ETA)."""
    url = dsn(database_url)
    bid = _id(backfill_id)
    rows = run(bf.progress(url, bid))
    if not rows:
        err_console.print(f"[bold red]error:[/] no backfill {bid}: see `pgsink backfill list`")
        raise typer.Exit(1)
    if watch:
        _watch(url, [bid])
        rows = run(bf.progress(url, bid))
    r = rows[0]
    for key in ("id", "sink", "table", "state", "rows_done", "rows_estimate", "percent", "rows_per_second",
                "eta_seconds", "page_size", "sort_column", "start_position", "cursor", "worker", "error",
                "created_at", "started_at", "completed_at"):
        if r[key] is not None:
            console.print(f"{key}: {escape(_num(r[key]))}", highlight=False)


@backfill_app.command("cancel")
def cancel(backfill_id: Annotated[str, typer.Argument(help="Backfill id.")], database_url: DatabaseUrl = None) -> None:
    """Cancel a backfill (its worker stops after the current page)."""
    bid = _id(backfill_id)
    if not run(bf.cancel(dsn(database_url), bid)):
        err_console.print(f"[bold red]error:[/] backfill {bid} is not pending or running")
        raise typer.Exit(1)
    console.print(f"backfill {bid} cancelled")


def _num(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def _exit_unless_completed(url: str, ids: list[uuid.UUID]) -> None:
    """After --wait: exit 1, saying why, when a backfill failed or was cancelled (scripts rely on it)."""
    bad = [r for bid in ids for r in run(bf.progress(url, bid)) if r["state"] != "completed"]
    for r in bad:
        err_console.print(f"[bold red]error:[/] backfill {r['id']} of {escape(r['table'])} {r['state']}"
                          + (f": {escape(r['error'])}" if r["error"] else ""), highlight=False)
    if bad:
        raise typer.Exit(1)


def _watch(url: str, ids: list[uuid.UUID], interval: float = 0.5) -> None:
    """A rich progress bar per backfill until every one has ended."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rows"),
                  TextColumn("{task.fields[rate]} rows/s"), TimeRemainingColumn(), console=console) as bar:
        tasks = {bid: bar.add_task(str(bid)[:8], total=None, rate="-") for bid in ids}
        while True:
            states = []
            for bid, task in tasks.items():
                rows = run(bf.progress(url, bid))
                if not rows:
                    raise PgsinkError(f"backfill {bid} disappeared")
                r = rows[0]
                bar.update(task, completed=r["rows_done"], total=r["rows_estimate"] or None,
                           description=f"{r['table']} {r['state']}", rate=_num(r["rows_per_second"]) or "-")
                states.append(r["state"])
            if all(s in DONE_STATES for s in states):
                return
            time.sleep(interval)  # ok-sleep: polling the progress view for display
