"""`pgsink source ...`: source databases, where changes are captured."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.text import Text

from pgsink.engine import config as cfg
from pgsink.engine import source as src_checks
from pgsink.engine.errors import PgsinkError
from pgsink.engine.model import Config, Source

from .common import DatabaseUrl, console, dsn, err_console, run
from .config_common import (default_object_name, join_list, kv_table, load_config, new_table, pairs, print_out,
                            run_config, run_quiet, warn)

source_app = typer.Typer(help="Source databases: where changes are captured.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.add_typer(source_app, name="source")


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
        "slot": {"name": slot or default_object_name("pgsink_", name), "create_if_not_exists": create_slot},
        "publication": {"name": publication or default_object_name("pgsink_", name),
                        "create_if_not_exists": create_publication, "init_sql": init_sql},
        "decoder": decoder, "retention": retention, "annotations": pairs(annotation, "--annotation") or None,
    }

    async def go() -> cfg.ApplyResult:
        spec = cfg.source_from_options(options)
        return await cfg.apply_config(state, cfg.Desired(sources=[spec]), create_only=True)

    result = run_config(go())
    warn(result.warnings)
    console.print(f"Created source {escape(name)}.", highlight=False)


@source_app.command("list")
def source_list(database_url: DatabaseUrl = None) -> None:
    """List sources."""
    config = load_config(database_url)
    t = new_table("Name", "Connection", "Slot", "Publication", "Decoder", "Retention", "Sinks")
    for s in config.sources.values():
        t.add_row(Text(s.name), Text(f"{s.username}@{s.hostname}:{s.port}/{s.database}"), Text(s.slot_name),
                  Text(s.publication_name), s.decoder, cfg.format_retention(int(s.retention_seconds)),
                  Text(join_list([k.name for k in config.sinks_of(s.id)])))
    print_out(t)


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
        ("sinks", join_list([k.name for k in config.sinks_of(s.id)])),
    ]


@source_app.command("show")
def source_show(
    name: Annotated[str, typer.Argument(help="Source name.")],
    database_url: DatabaseUrl = None,
) -> None:
    """Show a source, check it, and list published tables that lack REPLICA IDENTITY FULL or a primary key."""
    config = load_config(database_url)
    s = config.source_named(name)
    if s is None:
        err_console.print(f"[bold red]error:[/] There is no source named {escape(name)!r} (see pgsink source list).")
        raise typer.Exit(1)
    print_out(kv_table(f"source {s.name}", _source_rows(s, config)))
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
        t = new_table("Table", "Replica identity", "Primary key",
                   title="Published tables without REPLICA IDENTITY FULL or a primary key")
        for ti in lacking:
            t.add_row(Text(ti.qualified), ti.replica_identity.upper(), "yes" if ti.has_primary_key else "NO")
        print_out(t)
        warn(src_checks.identity_warnings(lacking))
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
    removed = run_config(cfg.remove_source(state, name))
    console.print(f"Removed source {escape(name)}.", highlight=False)
    if drop_slot:
        try:
            dropped = run_quiet(src_checks.drop_slot(removed))
        except PgsinkError as e:
            warn([f"the replication slot was not dropped: {e}"])
            raise typer.Exit(1) from None
        console.print(f"Dropped replication slot {escape(removed.slot_name)}." if dropped
                      else f"Replication slot {escape(removed.slot_name)} did not exist.", highlight=False)
    else:
        warn([f"replication slot {removed.slot_name!r} was left on the source database; it retains WAL "
               f"until dropped: select pg_drop_replication_slot('{removed.slot_name}');"])




# ---------------------------------------------------------------- endpoint
