"""`pgsink status|messages|message show|replay|retry|discard`: inspect and repair.

Each command mirrors a view or function of the SQL interface (see
``pgsink.engine.ops``): what the CLI shows is what `select * from
pgsink.sink_status` shows.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from pgsink.engine import ops
from pgsink.engine.errors import PgsinkError

from .common import DatabaseUrl, console, dsn, err_console, run

message_app = typer.Typer(help="One message of a sink: payload and attempt history.", no_args_is_help=True)

SinkName = Annotated[str, typer.Option("--sink", help="Sink name (or id).")]


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("status")(status)
    app.command("messages")(messages)
    app.add_typer(message_app, name="message")
    app.command("replay")(replay)
    app.command("retry")(retry)
    app.command("discard")(discard)


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.1f}"
    if hasattr(v, "isoformat"):
        return v.isoformat(timespec="seconds")
    return escape(str(v))


def status(
    sink: Annotated[str | None, typer.Option("--sink", help="Only this sink.")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Per sink: state, lag (messages, seconds), delivery rate, failing groups, slot lag on the source."""
    url = dsn(database_url)
    rows = run(ops.status(url, sink))
    slots = run(ops.slot_lags(url))
    if not rows:
        console.print("no sinks" if sink is None else f"no sink named {escape(sink)}")
        raise typer.Exit(0 if sink is None else 1)
    table = Table(title="pgsink sinks")
    for col in ("sink", "state", "lag msgs", "lag s", "rate/s", "parked", "failing groups", "discarded",
                "slot lag", "last error"):
        table.add_column(col, overflow="fold")
    for r in rows:
        slot = slots.get(r["source"])
        slot_text = "?" if slot is None else (
            f"error: {escape(slot.error)}" if slot.error else _bytes(slot.lag_bytes))
        table.add_row(escape(r["sink"]), r["state"], str(r["lag_messages"]), f"{r['lag_seconds']:.1f}",
                      f"{r['delivered_per_second']:.1f}", str(r["parked_messages"]), str(r["failing_groups"]),
                      str(r["discarded_messages"]), slot_text,
                      escape((r["last_error"] or "")[:120]))
    console.print(table)


def messages(
    sink: SinkName,
    state: Annotated[str | None, typer.Option(
        "--state", help="pending, in_flight, failing, parked, discarded, or failed (attempted, not delivered).")] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many, oldest first.")] = 100,
    database_url: DatabaseUrl = None,
) -> None:
    """Messages of a sink not delivered yet, with their state and last attempt."""
    rows = run(ops.messages(dsn(database_url), sink, state, limit))
    if not rows:
        console.print("no messages")
        return
    table = Table(title=f"messages of {escape(sink)}")
    for col in ("id", "state", "action", "table", "record_pk", "group", "attempts", "last attempt", "status",
                "last error"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(str(r["id"]), r["state"], r["action"], _cell(f"{r['table_schema']}.{r['table_name']}"),
                      _cell(r["record_pk"]), _cell(r["group_key"]), str(r["attempts"]),
                      _cell(r["last_attempt_at"]), _cell(r["last_http_status"]),
                      _cell(r["last_error"] or r["last_response"]))
    console.print(table)


@message_app.command("show")
def message_show(
    message_id: Annotated[int, typer.Argument(help="Message id.")],
    sink: SinkName,
    database_url: DatabaseUrl = None,
) -> None:
    """A message's change (or backfilled row) and every attempt, with response bodies."""
    row, attempts = run(ops.message(dsn(database_url), sink, message_id))
    console.print(f"message {row['id']} of sink {escape(sink)}: [bold]{row['state']}[/]", highlight=False)
    for key in ("action", "table_schema", "table_name", "record_pk", "group_key", "lane", "commit_lsn",
                "commit_idx", "committed_at", "attempts", "backfill_id"):
        if row[key] is not None:
            console.print(f"  {key}: {_cell(row[key])}", highlight=False)
    for key in ("record", "changes", "transaction_annotations"):
        if row[key] is not None:
            console.print(f"  {key}:", highlight=False)
            console.print_json(row[key], indent=2)
    if row["record"] is None:
        console.print("  record: (gone: its change was pruned from the retention log)")
    console.print(f"attempts ({len(attempts)}):", highlight=False)
    for a in attempts:
        outcome = a["status"] + (f" HTTP {a['http_status']}" if a["http_status"] is not None else "")
        console.print(f"  #{a['id']} {_cell(a['started_at'])} {outcome} in {a['duration_ms']} ms"
                      f" (batch of {a['message_count']})", highlight=False)
        if a["error"]:
            console.print(f"    error: {escape(a['error'])}", highlight=False)
        if a["response_body"]:
            console.print(f"    response: {escape(a['response_body'])}", highlight=False)


def replay(
    sink: SinkName,
    since: Annotated[str, typer.Option("--since", help="ISO time, or a duration ago (30m, 2h, 7d).")],
    until: Annotated[str | None, typer.Option("--until", help="ISO time or duration ago; default: now.")] = None,
    table: Annotated[str | None, typer.Option("--table", help="Only this table (schema.table).")] = None,
    action: Annotated[str | None, typer.Option("--action", help="Only insert, update or delete.")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Re-enqueue retained changes of a sink in commit order, with their original idempotency keys."""
    url = dsn(database_url)
    try:
        start = ops.parse_time(since)
        end = ops.parse_time(until) if until is not None else None
    except PgsinkError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    n = run(ops.replay(url, sink, start, end, table, action))
    console.print(f"replayed {n} change(s) to sink {escape(sink)}", highlight=False)


def retry(
    sink: SinkName,
    group: Annotated[str | None, typer.Option("--group", help="Retry this parked group now.")] = None,
    message_id: Annotated[int | None, typer.Option("--message", help="Send this discarded message again.")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Retry a parked group now, or send a discarded message again."""
    if (group is None) == (message_id is None):
        err_console.print("[bold red]error:[/] give exactly one of --group KEY or --message ID")
        raise typer.Exit(2)
    url = dsn(database_url)
    if group is not None:
        n = run(ops.retry_group(url, sink, group))
        console.print(f"group {escape(group)} is due now ({n} parked message(s))", highlight=False)
    else:
        assert message_id is not None
        run(ops.retry_message(url, sink, message_id))
        console.print(f"message {message_id} is parked again, due now", highlight=False)


def discard(
    message_id: Annotated[int, typer.Argument(help="Id of a parked message.")],
    sink: SinkName,
    database_url: DatabaseUrl = None,
) -> None:
    """Give up on a parked message (kept as discarded; `pgsink retry --message` sends it again)."""
    run(ops.discard(dsn(database_url), sink, message_id))
    console.print(f"message {message_id} discarded", highlight=False)
