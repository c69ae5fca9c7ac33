"""`pgsink sink ...`: which changes of a source go to which endpoint, and how."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.text import Text

from pgsink.engine import config as cfg
from pgsink.engine import sink_functions

from .common import DatabaseUrl, console, dsn, err_console
from .config_common import join_list, kv_table, load_config, new_table, pairs, print_out, run_config, warn

sink_app = typer.Typer(help="Sinks: which changes of a source go to which endpoint.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.add_typer(sink_app, name="sink")


def _group_columns(values: list[str] | None) -> list[dict[str, Any]] | None:
    if not values:
        return None
    out = []
    for table, cols in pairs(values, "--group-columns").items():
        out.append({"name": table, "group_column_names": [c.strip() for c in cols.split(",") if c.strip()]})
    return out


def _column_filters(values: list[str] | None) -> list[Any] | None:
    if not values:
        return None
    out = []
    for v in values:
        try:
            out.append(json.loads(v))
        except ValueError:
            raise typer.BadParameter(f"not JSON: {v!r}", param_hint="--column-filter") from None
    return out


def _function(form: str, value: str | None) -> dict[str, str] | None:
    return {form: value} if value is not None else None


@sink_app.command("create")
def sink_create(
    name: Annotated[str, typer.Argument(help="Name of the sink.")],
    source: Annotated[str, typer.Option("--source", "--database", help="Source the changes come from.")],
    endpoint: Annotated[str, typer.Option("--endpoint", help="HTTP endpoint to POST to.")],
    path: Annotated[str | None, typer.Option("--path", help="Path appended to the endpoint URL, e.g. /orders.")] = None,
    table: Annotated[list[str] | None, typer.Option("--table", help="Only this schema.table (repeatable).")] = None,
    include_schema: Annotated[list[str] | None, typer.Option("--include-schema", help="Only tables of this schema (repeatable).")] = None,
    exclude_schema: Annotated[list[str] | None, typer.Option("--exclude-schema", help="Skip this schema (repeatable).")] = None,
    exclude_table: Annotated[list[str] | None, typer.Option("--exclude-table", help="Skip this schema.table (repeatable).")] = None,
    action: Annotated[list[str] | None, typer.Option("--action", help="insert, update or delete (repeatable; default all).")] = None,
    group_columns: Annotated[list[str] | None, typer.Option("--group-columns", help="schema.table=col1,col2: group key of a table (default: primary key).")] = None,
    message_grouping: Annotated[bool, typer.Option("--message-grouping/--no-message-grouping", help="Deliver in order per group (default on).")] = True,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Messages per request (default 1).")] = None,
    batch: Annotated[bool, typer.Option("--batch/--no-batch", help="Send {\"data\": [...]} bodies (default) or one message per request.")] = True,
    batch_timeout_ms: Annotated[int | None, typer.Option("--batch-timeout-ms", help="Wait this long to fill a batch (default 50).")] = None,
    request_timeout_ms: Annotated[int | None, typer.Option("--request-timeout-ms", help="HTTP request timeout (default 30000).")] = None,
    max_ack_pending: Annotated[int | None, typer.Option("--max-ack-pending", help="Messages in flight at most (default 10000).")] = None,
    max_retry_count: Annotated[int | None, typer.Option("--max-retry-count", help="Give up on a message after this many failures (default: never).")] = None,
    lane_count: Annotated[int | None, typer.Option("--lane-count", help="Parallel ordered lanes (default 16; fixed after creation).")] = None,
    status: Annotated[str | None, typer.Option("--status", help="active (default), paused or disabled.")] = None,
    annotation: Annotated[list[str] | None, typer.Option("--annotation", help="KEY=VALUE, sent in every message's metadata.")] = None,
    filter_json: Annotated[list[str] | None, typer.Option("--column-filter", help='A column filter as JSON, e.g. \'{"column_name": "status", "operator": "=", "comparison_value": "paid"}\' (repeatable).')] = None,
    filter_sql: Annotated[str | None, typer.Option("--filter-sql", help="Only changes for which this SQL expression over the row is true, e.g. \"status = 'paid' and amount > 100\".")] = None,
    filter_function: Annotated[str | None, typer.Option("--filter-function", help="Python filter: module:function or path/to/file.py (def filter(action, record, changes, metadata)).")] = None,
    transform_path: Annotated[str | None, typer.Option("--transform-path", help="Send only this part of each message, e.g. record or record.id.")] = None,
    transform_function: Annotated[str | None, typer.Option("--transform-function", help="Python transform: module:function or file.py (def transform(...) -> body).")] = None,
    route_function: Annotated[str | None, typer.Option("--route-function", help="Python routing: module:function or file.py (def route(...) -> {method, endpoint_path, headers}).")] = None,
    function_timeout_ms: Annotated[int | None, typer.Option("--function-timeout-ms", help="Cut off a filter, transform or route call after this long (default 1000).")] = None,
    enrichment_sql: Annotated[str | None, typer.Option("--enrichment-sql", help="A SELECT run against the source once per batch, $1 = the batch's primary keys (text[]); rows go under metadata.enrichment.")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a sink; checks that its tables exist and are published first."""
    state = dsn(database_url)
    selection = {"include_tables": table, "include_schemas": include_schema, "exclude_schemas": exclude_schema,
                 "exclude_tables": exclude_table}
    options: dict[str, Any] = {
        "name": name, "database": source,
        "source": {k: v for k, v in selection.items() if v} or None,
        "actions": action, "tables": _group_columns(group_columns), "message_grouping": message_grouping,
        "batch_size": batch_size, "batch_timeout_ms": batch_timeout_ms, "request_timeout_ms": request_timeout_ms,
        "max_ack_pending": max_ack_pending, "max_retry_count": max_retry_count, "lane_count": lane_count,
        "status": status, "annotations": pairs(annotation, "--annotation") or None,
        "destination": {"type": "webhook", "http_endpoint": endpoint, "http_endpoint_path": path, "batch": batch},
        "filters": _column_filters(filter_json), "function_timeout_ms": function_timeout_ms,
        "filter": _function("sql", filter_sql) or _function("python", filter_function),
        "transform": _function("path", transform_path) or _function("python", transform_function),
        "routing": _function("python", route_function), "enrichment": _function("sql", enrichment_sql),
    }

    async def go() -> cfg.ApplyResult:
        spec = cfg.sink_from_options(options)
        return await cfg.apply_config(state, cfg.Desired(sinks=[spec]), create_only=True)

    result = run_config(go())
    warn(result.warnings)
    console.print(f"Created sink {escape(name)}.", highlight=False)


@sink_app.command("list")
def sink_list(database_url: DatabaseUrl = None) -> None:
    """List sinks."""
    config = load_config(database_url)
    t = new_table("Name", "Source", "Endpoint", "Status", "Tables", "Actions", "Batch", "Lanes")
    for k in config.sinks.values():
        spec = cfg.sink_spec(k, config)
        tables = join_list(spec.include_tables, empty=join_list(spec.include_schemas, empty="all published"))
        t.add_row(Text(k.name), Text(spec.source), Text(spec.http_endpoint + spec.http_endpoint_path),
                  k.status, Text(tables), ", ".join(spec.actions),
                  str(k.batch_size) if k.batch else "off", str(k.lane_count))
    print_out(t)


@sink_app.command("show")
def sink_show(
    name: Annotated[str, typer.Argument(help="Sink name.")],
    database_url: DatabaseUrl = None,
) -> None:
    """Show a sink's settings."""
    config = load_config(database_url)
    k = config.sink_named(name)
    if k is None:
        err_console.print(f"[bold red]error:[/] There is no sink named {escape(name)!r} (see pgsink sink list).")
        raise typer.Exit(1)
    s = cfg.sink_spec(k, config)
    rows = [
        ("name", s.name), ("id", str(k.id)), ("status", s.status), ("source", s.source),
        ("endpoint", s.http_endpoint), ("path", s.http_endpoint_path or "-"),
        ("include schemas", join_list(s.include_schemas)), ("exclude schemas", join_list(s.exclude_schemas)),
        ("include tables", join_list(s.include_tables)), ("exclude tables", join_list(s.exclude_tables)),
        ("actions", ", ".join(s.actions)), ("message grouping", "on" if s.message_grouping else "off"),
        ("group columns", join_list([cfg.show_value(t) for t in s.tables if t.group_column_names], empty="primary key")),
        ("batch", f"on, up to {s.batch_size}" if s.batch else "off"),
        ("batch timeout", f"{s.batch_timeout_ms} ms"), ("request timeout", f"{s.request_timeout_ms} ms"),
        ("max ack pending", str(s.max_ack_pending)),
        ("max retry count", "unlimited" if s.max_retry_count is None else str(s.max_retry_count)),
        ("lanes", str(s.lane_count)), ("annotations", cfg.show_value(s.annotations) if s.annotations else "-"),
        ("column filters", join_list([json.dumps(f) for f in s.filters])), ("filter sql", s.filter_sql or "-"),
        ("filter function", s.filter_function or "-"),
        ("transform", s.transform_path or s.transform_function or "-"), ("routing", s.route_function or "-"),
        ("function timeout", f"{s.function_timeout_ms} ms"), ("enrichment", s.enrichment_sql or "-"),
    ]
    print_out(kv_table(f"sink {s.name}", rows))


@sink_app.command("test")
def sink_test(
    name: Annotated[str, typer.Argument(help="Sink name.")],
    limit: Annotated[int, typer.Option("--limit", "-n", help="How many of the sink's last retained changes.")] = 10,
    database_url: DatabaseUrl = None,
) -> None:
    """Run the sink's filters, transform and routing over its last retained changes; print what would be sent."""
    results = run_config(sink_functions.try_sink(dsn(database_url), name, limit=limit))
    if not results:
        console.print("No retained changes of this sink's tables and actions yet.", highlight=False)
    for r in results:
        if r.passes is None:
            verdict = "filter failed"
        elif not r.passes:
            verdict = "filtered out"
        elif r.error:
            verdict = "transform/route failed (the message would be parked)"
        else:
            target = r.route.endpoint_path if r.route.endpoint_path is not None else "(sink path)"
            verdict = f"{r.route.method} {target}"
            if r.route.headers:
                verdict += " " + " ".join(f"{k}: {v}" for k, v in r.route.headers)
        console.print(Text(f"{r.change}: {verdict}", style="bold"), highlight=False, soft_wrap=True)
        if r.error:
            console.print(Text(r.error, style="red"), highlight=False, soft_wrap=True)
        elif r.passes:
            console.print(Text(json.dumps(r.body, indent=2, default=str)), highlight=False, soft_wrap=True)


def _set_status(name: str, status: str, database_url: str | None, verb: str) -> None:
    changed = run_config(cfg.set_sink_status(dsn(database_url), name, status))
    console.print(f"Sink {escape(name)} {verb}." if changed else f"Sink {escape(name)} was already {status}.",
                  highlight=False)


@sink_app.command("pause")
def sink_pause(name: Annotated[str, typer.Argument(help="Sink name.")], database_url: DatabaseUrl = None) -> None:
    """Stop delivering (changes keep being captured and queued)."""
    _set_status(name, "paused", database_url, "paused")


@sink_app.command("resume")
def sink_resume(name: Annotated[str, typer.Argument(help="Sink name.")], database_url: DatabaseUrl = None) -> None:
    """Resume delivering from where the sink stopped."""
    _set_status(name, "active", database_url, "resumed")


@sink_app.command("remove")
def sink_remove(name: Annotated[str, typer.Argument(help="Sink name.")], database_url: DatabaseUrl = None) -> None:
    """Remove a sink with its lanes, parked messages and attempt log."""
    run_config(cfg.remove_sink(dsn(database_url), name))
    console.print(f"Removed sink {escape(name)}.", highlight=False)
