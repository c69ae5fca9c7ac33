"""`pgsink source|endpoint|sink|config ...`: the CLI face of pgsink's config.

Every command builds the same specs as a sequin.yaml file would (through the
same validators in ``pgsink.engine.config``) and writes them the same way, so
the CLI and YAML can never disagree. No command ever prints a password or an
encrypted header value.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from pgsink.engine import config as cfg
from pgsink.engine import signing, sink_functions
from pgsink.engine import source as src_checks
from pgsink.engine.errors import ConfigError, PgsinkError
from pgsink.engine.model import Config, Source

from .common import DatabaseUrl, console, dsn, err_console, run

T = TypeVar("T")

source_app = typer.Typer(help="Source databases: where changes are captured.", no_args_is_help=True)
endpoint_app = typer.Typer(help="HTTP endpoints: where sinks POST messages.", no_args_is_help=True)
sink_app = typer.Typer(help="Sinks: which changes of a source go to which endpoint.", no_args_is_help=True)
config_app = typer.Typer(help="Config as code, in Sequin's sequin.yaml format.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.add_typer(source_app, name="source")
    app.add_typer(endpoint_app, name="endpoint")
    app.add_typer(sink_app, name="sink")
    app.add_typer(config_app, name="config")


# ---------------------------------------------------------------- helpers


async def _safe(coro: Coroutine[Any, Any, T]) -> T:
    """Escape rich markup in error text: messages quote user values such as '[x]'."""
    try:
        return await coro
    except PgsinkError as e:
        raise type(e)(escape(str(e))) from None


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return run(_safe(coro))


_wide_console: Console | None = None


def _out() -> Console:
    """stdout; when piped, a wide console so names in tables are never cut or wrapped."""
    global _wide_console
    if console.is_terminal:
        return console
    if _wide_console is None:
        _wide_console = Console(width=max(console.width, 200))
    return _wide_console


def _print(renderable: Any) -> None:
    _out().print(renderable, highlight=False, soft_wrap=not isinstance(renderable, Table))


def _warn(lines: list[str]) -> None:
    for line in lines:
        err_console.print(Text(f"warning: {line}", style="yellow"), highlight=False, soft_wrap=True)


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {key!r}=...", param_hint=flag)
        out[key.strip()] = value
    return out


def _env_pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    """KEY=ENV_VAR -> KEY=value of ENV_VAR: keeps secrets out of shell history and `ps`."""
    out: dict[str, str] = {}
    for key, var in _pairs(values, flag).items():
        if var not in os.environ:
            raise typer.BadParameter(f"environment variable {var} is not set", param_hint=flag)
        out[key] = os.environ[var]
    return out


def _table(*columns: str, title: str | None = None) -> Table:
    t = Table(title=title, title_justify="left", show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    return t


def _kv_table(title: str, rows: list[tuple[str, str]]) -> Table:
    t = Table(title=title, title_justify="left", show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    for k, v in rows:
        t.add_row(k, Text(v))
    return t


def _list(values: tuple[str, ...] | list[str] | None, empty: str = "-") -> str:
    return ", ".join(values) if values else empty


def _load(database_url: str | None) -> Config:
    return _run(cfg.read_config(dsn(database_url)))


def _default_object_name(prefix: str, name: str) -> str:
    return (prefix + re.sub(r"[^a-z0-9_]", "_", name.lower()))[:63]


# ---------------------------------------------------------------- source


@source_app.command("add")
def source_add(
    name: Annotated[str, typer.Argument(help="Name of the source (sinks refer to it).")],
    url: Annotated[str | None, typer.Option("--url", help="postgresql://user:password@host:port/db instead of the connection flags.")] = None,
    host: Annotated[str | None, typer.Option("--host", "--hostname", help="Host of the source database.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (default 5432).")] = None,
    database: Annotated[str | None, typer.Option("--database", "--dbname", help="Database name.")] = None,
    username: Annotated[str | None, typer.Option("--username", "--user", help="User (default postgres); needs REPLICATION.")] = None,
    password: Annotated[str | None, typer.Option("--password", help="Password (stored encrypted). Prefer --password-env.")] = None,
    password_env: Annotated[str | None, typer.Option("--password-env", help="Read the password from this environment variable.")] = None,
    sslmode: Annotated[str | None, typer.Option("--sslmode", help="libpq sslmode (default prefer).")] = None,
    slot: Annotated[str | None, typer.Option("--slot", help="Replication slot name (default pgsink_<name>).")] = None,
    publication: Annotated[str | None, typer.Option("--publication", help="Publication name (default pgsink_<name>).")] = None,
    create_slot: Annotated[bool, typer.Option("--create-slot/--no-create-slot", help="Create the slot if it is missing.")] = False,
    create_publication: Annotated[bool, typer.Option("--create-publication/--no-create-publication", help="Create the publication if it is missing.")] = False,
    init_sql: Annotated[str | None, typer.Option("--init-sql", help="SQL that creates the publication (default: FOR ALL TABLES).")] = None,
    decoder: Annotated[str | None, typer.Option("--decoder", help="pgoutput (default) or wal2json.")] = None,
    retention: Annotated[str | None, typer.Option("--retention", help="How long changes are kept, e.g. '7 days'.")] = None,
    annotation: Annotated[list[str] | None, typer.Option("--annotation", help="KEY=VALUE, sent in every message's metadata.")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Add a source database; checks it (and creates slot/publication if asked) first."""
    state = dsn(database_url)
    if password_env is not None:
        if password is not None:
            raise typer.BadParameter("give --password or --password-env, not both", param_hint="--password-env")
        if password_env not in os.environ:
            raise typer.BadParameter(f"environment variable {password_env} is not set", param_hint="--password-env")
        password = os.environ[password_env]
    options: dict[str, Any] = {
        "name": name, "url": url, "hostname": host, "port": port, "database": database, "username": username,
        "password": password, "sslmode": sslmode,
        "slot": {"name": slot or _default_object_name("pgsink_", name), "create_if_not_exists": create_slot},
        "publication": {"name": publication or _default_object_name("pgsink_", name),
                        "create_if_not_exists": create_publication, "init_sql": init_sql},
        "decoder": decoder, "retention": retention, "annotations": _pairs(annotation, "--annotation") or None,
    }

    async def go() -> cfg.ApplyResult:
        spec = cfg.source_from_options(options)
        return await cfg.apply_config(state, cfg.Desired(sources=[spec]), create_only=True)

    result = _run(go())
    _warn(result.warnings)
    console.print(f"Created source {escape(name)}.", highlight=False)


@source_app.command("list")
def source_list(database_url: DatabaseUrl = None) -> None:
    """List sources."""
    config = _load(database_url)
    t = _table("Name", "Connection", "Slot", "Publication", "Decoder", "Retention", "Sinks")
    for s in config.sources.values():
        t.add_row(Text(s.name), Text(f"{s.username}@{s.hostname}:{s.port}/{s.database}"), Text(s.slot_name),
                  Text(s.publication_name), s.decoder, cfg.format_retention(int(s.retention_seconds)),
                  Text(_list([k.name for k in config.sinks_of(s.id)])))
    _print(t)


def _source_rows(s: Source, config: Config) -> list[tuple[str, str]]:
    return [
        ("name", s.name), ("hostname", s.hostname), ("port", str(s.port)), ("database", s.database),
        ("username", s.username), ("password", "(set, encrypted)" if s.password else "(none)"),
        ("sslmode", s.sslmode),
        ("slot", f"{s.slot_name} (create if missing: {'yes' if s.create_slot else 'no'})"),
        ("publication", f"{s.publication_name} (create if missing: {'yes' if s.create_publication else 'no'})"),
        ("publication init_sql", s.publication_init_sql or "-"), ("decoder", s.decoder),
        ("retention", cfg.format_retention(int(s.retention_seconds))),
        ("annotations", cfg.show_value(s.annotations) if s.annotations else "-"),
        ("sinks", _list([k.name for k in config.sinks_of(s.id)])),
    ]


@source_app.command("show")
def source_show(
    name: Annotated[str, typer.Argument(help="Source name.")],
    database_url: DatabaseUrl = None,
) -> None:
    """Show a source, check it, and list published tables that lack REPLICA IDENTITY FULL or a primary key."""
    config = _load(database_url)
    s = config.source_named(name)
    if s is None:
        err_console.print(f"[bold red]error:[/] There is no source named {escape(name)!r} (see pgsink source list).")
        raise typer.Exit(1)
    _print(_kv_table(f"source {s.name}", _source_rows(s, config)))
    tables: set[tuple[str, str]] = set()
    for k in config.sinks_of(s.id):
        tables |= cfg.sink_spec(k, config).explicit_tables()

    async def inspect() -> tuple[list[str] | None, str | None, list[src_checks.TableIdentity]]:
        try:
            warnings = await src_checks.check_source(s, sorted(tables) or None)
            problem = None
        except PgsinkError as e:
            warnings, problem = None, str(e)
        try:
            identities = await src_checks.replica_identity_report(s)
        except PgsinkError:
            identities = []
        return warnings, problem, identities

    warnings, problem, identities = run(inspect())
    if problem:
        err_console.print(Text("Source checks failed:\n" + problem, style="red"), highlight=False, soft_wrap=True)
    else:
        console.print("Source checks passed.", highlight=False)
    lacking = [t for t in identities if not t.full or not t.has_primary_key]
    if lacking:
        t = _table("Table", "Replica identity", "Primary key",
                   title="Published tables without REPLICA IDENTITY FULL or a primary key")
        for ti in lacking:
            t.add_row(Text(ti.qualified), ti.replica_identity.upper(), "yes" if ti.has_primary_key else "NO")
        _print(t)
        _warn(src_checks.identity_warnings(lacking))
    elif identities:
        console.print(f"All {len(identities)} published table(s) have REPLICA IDENTITY FULL and a primary key.")


@source_app.command("remove")
def source_remove(
    name: Annotated[str, typer.Argument(help="Source name.")],
    drop_slot: Annotated[bool, typer.Option("--drop-slot", help="Also drop its replication slot on the source.")] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Remove a source no sink uses. Its replication slot stays unless --drop-slot."""
    state = dsn(database_url)
    removed = _run(cfg.remove_source(state, name))
    console.print(f"Removed source {escape(name)}.", highlight=False)
    if drop_slot:
        try:
            dropped = _run_quiet(src_checks.drop_slot(removed))
        except PgsinkError as e:
            _warn([f"the replication slot was not dropped: {e}"])
            raise typer.Exit(1) from None
        console.print(f"Dropped replication slot {escape(removed.slot_name)}." if dropped
                      else f"Replication slot {escape(removed.slot_name)} did not exist.", highlight=False)
    else:
        _warn([f"replication slot {removed.slot_name!r} was left on the source database; it retains WAL "
               f"until dropped: select pg_drop_replication_slot('{removed.slot_name}');"])


def _run_quiet(coro: Coroutine[Any, Any, T]) -> T:
    """Run without common.run's exit-on-error: the caller turns errors into warnings."""
    return asyncio.run(coro)


# ---------------------------------------------------------------- endpoint


@endpoint_app.command("add")
def endpoint_add(
    name: Annotated[str, typer.Argument(help="Name of the endpoint (sinks refer to it).")],
    url: Annotated[str, typer.Option("--url", help="http:// or https:// URL; a sink's path is appended.")],
    header: Annotated[list[str] | None, typer.Option("--header", help="KEY=VALUE header, shown in listings.")] = None,
    encrypted_header: Annotated[list[str] | None, typer.Option("--encrypted-header", help="KEY=VALUE header, encrypted at rest and never shown.")] = None,
    encrypted_header_env: Annotated[list[str] | None, typer.Option("--encrypted-header-env", help="KEY=ENV_VAR: an encrypted header whose value is read from ENV_VAR.")] = None,
    signing: Annotated[bool, typer.Option("--signing/--no-signing", help="Sign requests (Standard Webhooks); pgsink makes the secret unless --signing-secret-env.")] = False,
    signing_secret_env: Annotated[str | None, typer.Option("--signing-secret-env", help="Read the whsec_ signing secret from this environment variable (turns signing on).")] = None,
    block_private_addresses: Annotated[bool, typer.Option("--block-private-addresses/--allow-private-addresses", help="Refuse hosts that are or resolve to private, loopback or link-local addresses.")] = False,
    ca_bundle: Annotated[str | None, typer.Option("--ca-bundle", help="PEM file of CAs to trust for this endpoint instead of the system's.")] = None,
    rate_limit: Annotated[float | None, typer.Option("--rate-limit", help="At most this many requests per second, across all workers.")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Add an HTTP endpoint."""
    state = dsn(database_url)
    encrypted = {**_pairs(encrypted_header, "--encrypted-header"),
                 **_env_pairs(encrypted_header_env, "--encrypted-header-env")}
    secret = None
    if signing_secret_env is not None:
        if signing_secret_env not in os.environ:
            raise typer.BadParameter(f"environment variable {signing_secret_env} is not set",
                                     param_hint="--signing-secret-env")
        secret = os.environ[signing_secret_env]
    options = {"name": name, "url": url, "headers": _pairs(header, "--header") or None,
               "encrypted_headers": encrypted or None, "signing": signing or None, "signing_secret": secret,
               "block_private_addresses": block_private_addresses or None, "ca_bundle": ca_bundle,
               "rate_limit": rate_limit}

    async def go() -> None:
        spec = cfg.endpoint_from_options(options)
        await cfg.apply_config(state, cfg.Desired(endpoints=[spec]), create_only=True)

    _run(go())
    console.print(f"Created endpoint {escape(name)}.", highlight=False)


@endpoint_app.command("list")
def endpoint_list(database_url: DatabaseUrl = None) -> None:
    """List HTTP endpoints (encrypted header values are never shown)."""
    config = _load(database_url)
    t = _table("Name", "URL", "Headers", "Encrypted headers", "Sinks")
    for e in config.endpoints.values():
        users = [k.name for k in config.sinks.values() if k.http_endpoint_id == e.id]
        t.add_row(Text(e.name), Text(e.url), Text(_list(list(e.headers))), Text(_list(list(e.encrypted_headers))),
                  Text(_list(users)))
    _print(t)


@endpoint_app.command("show")
def endpoint_show(
    name: Annotated[str, typer.Argument(help="Endpoint name.")],
    database_url: DatabaseUrl = None,
) -> None:
    """Show an HTTP endpoint (encrypted header values are never shown)."""
    config = _load(database_url)
    e = next((x for x in config.endpoints.values() if x.name == name), None)
    if e is None:
        err_console.print(f"[bold red]error:[/] There is no endpoint named {escape(name)!r} (see pgsink endpoint list).")
        raise typer.Exit(1)
    rows = [("name", e.name), ("url", e.url)]
    rows += [(f"header {k}", v) for k, v in e.headers.items()]
    rows += [(f"header {k}", "(encrypted)") for k in e.encrypted_headers]
    if e.signing is not None:
        live = len(e.signing.live_keys(time.time()))
        rows.append(("signing", "on (Standard Webhooks)" + (f", {live} secrets during a rotation" if live > 1 else "")))
    else:
        rows.append(("signing", "off"))
    rows.append(("private addresses", "blocked" if e.block_private_addresses else "allowed"))
    rows.append(("ca bundle", e.ca_bundle or "system"))
    rows.append(("rate limit", f"{e.rate_limit:g} requests/s" if e.rate_limit is not None else "none"))
    users = [k.name for k in config.sinks.values() if k.http_endpoint_id == e.id]
    rows.append(("sinks", _list(users)))
    _print(_kv_table(f"endpoint {e.name}", rows))


@endpoint_app.command("rotate-secret")
def endpoint_rotate_secret(
    name: Annotated[str, typer.Argument(help="Endpoint name.")],
    grace: Annotated[str, typer.Option("--grace", help="How long the old secret keeps signing too, e.g. '24 hours' or '0s'.")] = "24 hours",
    secret_env: Annotated[str | None, typer.Option("--secret-env", help="Use the whsec_ secret in this environment variable instead of a new random one.")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Make a new signing secret (turns signing on) and print it; the old one signs too during the grace period."""
    state = dsn(database_url)
    new_secret = None
    if secret_env is not None:
        if secret_env not in os.environ:
            raise typer.BadParameter(f"environment variable {secret_env} is not set", param_hint="--secret-env")
        new_secret = os.environ[secret_env]

    async def go() -> str:
        try:
            seconds = cfg.parse_retention(grace) if grace.strip() not in ("0", "0s") else 0
        except ValueError as e:
            raise ConfigError(f"--grace {grace!r} {e}") from None
        return await signing.rotate_secret(state, name, new_secret=new_secret, grace_seconds=seconds)

    secret = _run(go())
    err_console.print(f"Endpoint {escape(name)} now signs with a new secret; the previous one also signs for "
                      f"{escape(grace)}. Give the new secret to the receiver:", highlight=False)
    print(secret)


@endpoint_app.command("signing-secret")
def endpoint_signing_secret(
    name: Annotated[str, typer.Argument(help="Endpoint name.")],
    database_url: DatabaseUrl = None,
) -> None:
    """Print the endpoint's current signing secret (for the receiver's verification)."""
    secret = _run(signing.current_secret(dsn(database_url), name))
    if secret is None:
        err_console.print(f"Endpoint {escape(name)} does not sign requests (pgsink endpoint rotate-secret "
                          f"{escape(name)} turns signing on).", highlight=False)
        raise typer.Exit(1)
    print(secret)


@endpoint_app.command("remove")
def endpoint_remove(
    name: Annotated[str, typer.Argument(help="Endpoint name.")],
    database_url: DatabaseUrl = None,
) -> None:
    """Remove an HTTP endpoint no sink uses."""
    _run(cfg.remove_endpoint(dsn(database_url), name))
    console.print(f"Removed endpoint {escape(name)}.", highlight=False)


# ---------------------------------------------------------------- sink


def _group_columns(values: list[str] | None) -> list[dict[str, Any]] | None:
    if not values:
        return None
    out = []
    for table, cols in _pairs(values, "--group-columns").items():
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
        "status": status, "annotations": _pairs(annotation, "--annotation") or None,
        "destination": {"type": "webhook", "http_endpoint": endpoint, "http_endpoint_path": path, "batch": batch},
        "filters": _column_filters(filter_json), "function_timeout_ms": function_timeout_ms,
        "filter": _function("sql", filter_sql) or _function("python", filter_function),
        "transform": _function("path", transform_path) or _function("python", transform_function),
        "routing": _function("python", route_function), "enrichment": _function("sql", enrichment_sql),
    }

    async def go() -> cfg.ApplyResult:
        spec = cfg.sink_from_options(options)
        return await cfg.apply_config(state, cfg.Desired(sinks=[spec]), create_only=True)

    result = _run(go())
    _warn(result.warnings)
    console.print(f"Created sink {escape(name)}.", highlight=False)


@sink_app.command("list")
def sink_list(database_url: DatabaseUrl = None) -> None:
    """List sinks."""
    config = _load(database_url)
    t = _table("Name", "Source", "Endpoint", "Status", "Tables", "Actions", "Batch", "Lanes")
    for k in config.sinks.values():
        spec = cfg.sink_spec(k, config)
        tables = _list(spec.include_tables, empty=_list(spec.include_schemas, empty="all published"))
        t.add_row(Text(k.name), Text(spec.source), Text(spec.http_endpoint + spec.http_endpoint_path),
                  k.status, Text(tables), ", ".join(spec.actions),
                  str(k.batch_size) if k.batch else "off", str(k.lane_count))
    _print(t)


@sink_app.command("show")
def sink_show(
    name: Annotated[str, typer.Argument(help="Sink name.")],
    database_url: DatabaseUrl = None,
) -> None:
    """Show a sink's settings."""
    config = _load(database_url)
    k = config.sink_named(name)
    if k is None:
        err_console.print(f"[bold red]error:[/] There is no sink named {escape(name)!r} (see pgsink sink list).")
        raise typer.Exit(1)
    s = cfg.sink_spec(k, config)
    rows = [
        ("name", s.name), ("id", str(k.id)), ("status", s.status), ("source", s.source),
        ("endpoint", s.http_endpoint), ("path", s.http_endpoint_path or "-"),
        ("include schemas", _list(s.include_schemas)), ("exclude schemas", _list(s.exclude_schemas)),
        ("include tables", _list(s.include_tables)), ("exclude tables", _list(s.exclude_tables)),
        ("actions", ", ".join(s.actions)), ("message grouping", "on" if s.message_grouping else "off"),
        ("group columns", _list([cfg.show_value(t) for t in s.tables if t.group_column_names], empty="primary key")),
        ("batch", f"on, up to {s.batch_size}" if s.batch else "off"),
        ("batch timeout", f"{s.batch_timeout_ms} ms"), ("request timeout", f"{s.request_timeout_ms} ms"),
        ("max ack pending", str(s.max_ack_pending)),
        ("max retry count", "unlimited" if s.max_retry_count is None else str(s.max_retry_count)),
        ("lanes", str(s.lane_count)), ("annotations", cfg.show_value(s.annotations) if s.annotations else "-"),
        ("column filters", _list([json.dumps(f) for f in s.filters])), ("filter sql", s.filter_sql or "-"),
        ("filter function", s.filter_function or "-"),
        ("transform", s.transform_path or s.transform_function or "-"), ("routing", s.route_function or "-"),
        ("function timeout", f"{s.function_timeout_ms} ms"), ("enrichment", s.enrichment_sql or "-"),
    ]
    _print(_kv_table(f"sink {s.name}", rows))


@sink_app.command("test")
def sink_test(
    name: Annotated[str, typer.Argument(help="Sink name.")],
    limit: Annotated[int, typer.Option("--limit", "-n", help="How many of the sink's last retained changes.")] = 10,
    database_url: DatabaseUrl = None,
) -> None:
    """Run the sink's filters, transform and routing over its last retained changes; print what would be sent."""
    results = _run(sink_functions.try_sink(dsn(database_url), name, limit=limit))
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
    changed = _run(cfg.set_sink_status(dsn(database_url), name, status))
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
    _run(cfg.remove_sink(dsn(database_url), name))
    console.print(f"Removed sink {escape(name)}.", highlight=False)


# ---------------------------------------------------------------- config


FileArg = Annotated[str, typer.Argument(help="sequin.yaml-style file, or - for standard input.")]
PruneOpt = Annotated[bool, typer.Option("--prune", help="Also delete sources, endpoints and sinks absent from the file.")]


def _read_file(path: str) -> tuple[str, str]:
    if path == "-":
        return sys.stdin.read(), "<stdin>"
    try:
        return Path(path).read_text(), path
    except OSError as e:
        raise ConfigError(f"Cannot read {path}: {e.strerror}.") from None


def _print_plan(plan: cfg.Plan) -> None:
    styles = {"+": "green", "~": "yellow", "-": "red"}
    for line in plan.lines():
        style = styles.get(line[:1], "") if not line.startswith(" ") else ""
        console.print(Text(line, style=style), highlight=False, soft_wrap=True)
    console.print(plan.summary(), highlight=False)


@config_app.command("plan")
def config_plan(
    file: FileArg,
    prune: PruneOpt = False,
    exit_code: Annotated[bool, typer.Option("--exit-code", help="Exit 2 when there are changes (for CI).")] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Show what `config apply` would change, field by field, without writing anything."""
    state = dsn(database_url)

    async def go() -> cfg.Plan:
        text, name = _read_file(file)
        return await cfg.plan_config(state, cfg.parse_config(text, filename=name), prune=prune)

    plan = _run(go())
    _warn(plan.warnings)
    _print_plan(plan)
    if exit_code and not plan.empty:
        raise typer.Exit(2)


@config_app.command("apply")
def config_apply(
    file: FileArg,
    prune: PruneOpt = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Apply a sequin.yaml-style file in one transaction. Objects not in the file are left alone (unless --prune)."""
    state = dsn(database_url)

    async def go() -> cfg.ApplyResult:
        text, name = _read_file(file)
        return await cfg.apply_config(state, cfg.parse_config(text, filename=name), prune=prune)

    result = _run(go())
    _warn(result.plan.warnings + result.warnings)
    _print_plan(result.plan)
    if not result.plan.empty:
        console.print("Applied.", highlight=False)


@config_app.command("export")
def config_export(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of standard output.")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Print the whole config as sequin.yaml; secrets become ${PGSINK_...} placeholders."""
    text = _run(cfg.export_config(dsn(database_url)))
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        err_console.print(f"Wrote {escape(str(output))}.", highlight=False)
