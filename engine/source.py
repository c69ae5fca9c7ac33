"""Checks and set-up against a real source database.

Run before a source's config is committed (``pgsink config apply``, ``pgsink
source add``, ``pgsink sink create``) so that a wrong host, a missing slot or a
server without ``wal_level=logical`` is reported at configuration time, with
the fix, instead of as a reader crash loop later.

Everything here talks to the *source* database over its own autocommit
connection. Slot creation must never run while a state transaction that has
written is open in the same cluster: creating a logical slot waits for every
running transaction with an xid to finish, so it would wait for us forever.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import LiteralString, cast

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from . import db
from .errors import PgsinkError, SourceError
from .model import Source
from .queries import QUERIES

log = logging.getLogger("pgsink.source")

STATE_SCHEMA = "pgsink"


@dataclass(frozen=True)
class TableIdentity:
    """How much of a published table's old row reaches the WAL."""

    schema: str
    name: str
    replica_identity: str  # default | full | index | nothing
    has_primary_key: bool

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def full(self) -> bool:
        return self.replica_identity == "full"


_IDENTITY = {"d": "default", "f": "full", "i": "index", "n": "nothing"}


@asynccontextmanager
async def _source_conn(source: Source) -> AsyncIterator[psycopg.AsyncConnection]:
    """An autocommit connection to the source; failures name the source and the fix."""
    try:
        conn = await db.connect(source.dsn(), autocommit=True)
    except PgsinkError as e:
        raise SourceError(f"Source {source.name!r}: {e}") from e
    try:
        yield conn
    finally:
        await conn.close()


async def _one(conn: psycopg.AsyncConnection, query: LiteralString, params: dict[str, object] | None = None
               ) -> dict[str, object] | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)
        return await cur.fetchone()


async def _all(conn: psycopg.AsyncConnection, query: LiteralString, params: dict[str, object] | None = None
               ) -> list[dict[str, object]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)
        return await cur.fetchall()


# ---------------------------------------------------------------- individual checks
# Each returns a problem description (what is wrong + how to fix it) or None.


async def _wal_level_problem(conn: psycopg.AsyncConnection, source: Source) -> str | None:
    row = await _one(conn, QUERIES["source_wal_level"])
    level = row["wal_level"] if row else "unknown"
    if level == "logical":
        return None
    return (
        f"wal_level is {level!r} on source {source.name!r}; logical replication needs 'logical'. "
        "Set wal_level = logical in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and "
        "restart Postgres. On Amazon RDS/Aurora set rds.logical_replication = 1 in the parameter "
        "group and reboot; on Google Cloud SQL set the cloudsql.logical_decoding flag."
    )


async def _privilege_problem(conn: psycopg.AsyncConnection, source: Source) -> str | None:
    row = await _one(conn, QUERIES["source_role"])
    if row and (row["rolsuper"] or row["rolreplication"] or row["rds_replication"]):
        return None
    return (
        f"User {source.username!r} of source {source.name!r} has no REPLICATION privilege "
        "(and is not a superuser), so it cannot read a replication slot. Run as a superuser: "
        f"ALTER ROLE {sql.Identifier(source.username).as_string(None)} WITH REPLICATION; "
        f"(on Amazon RDS: GRANT rds_replication TO {sql.Identifier(source.username).as_string(None)};)."
    )


def _create_slot_sql(source: Source) -> str:
    """The statement to show users (a hint; pgsink runs its own, parameterised)."""
    return sql.SQL("select pg_create_logical_replication_slot({}, {});").format(
        sql.Literal(source.slot_name), sql.Literal(source.decoder)).as_string(None)


async def _slot_problem(conn: psycopg.AsyncConnection, source: Source) -> str | None:
    row = await _one(conn, QUERIES["source_slot"], {"slot": source.slot_name})
    if row is None:
        return (
            f"Replication slot {source.slot_name!r} does not exist on source {source.name!r}. "
            f"Create it ({_create_slot_sql(source)}) or let pgsink create it: "
            "slot.create_if_not_exists: true in YAML, --create-slot on the CLI."
        )
    if row["slot_type"] != "logical":
        return (
            f"Replication slot {source.slot_name!r} on source {source.name!r} is a "
            f"{row['slot_type']} slot; pgsink needs a logical slot. Use another slot name, or drop "
            f"it (select pg_drop_replication_slot('{source.slot_name}');) and create a logical one "
            f"({_create_slot_sql(source)})."
        )
    if row["database"] != source.database:
        return (
            f"Replication slot {source.slot_name!r} belongs to database {row['database']!r}, but "
            f"source {source.name!r} connects to database {source.database!r}. A logical slot "
            "decodes one database only: use a slot created in this database."
        )
    if row["plugin"] != source.decoder:
        return (
            f"Replication slot {source.slot_name!r} on source {source.name!r} uses output plugin "
            f"{row['plugin']!r}, but the source's decoder is {source.decoder!r}. Set decoder: "
            f"{row['plugin']} if pgsink supports it, or drop the slot (select "
            f"pg_drop_replication_slot('{source.slot_name}');) and create it with "
            f"{_create_slot_sql(source)}"
        )
    return None


def _create_publication_hint(source: Source) -> str:
    name = sql.Identifier(source.publication_name).as_string(None)
    return f"CREATE PUBLICATION {name} FOR ALL TABLES WITH (publish_via_partition_root = true);"


async def _publication(conn: psycopg.AsyncConnection, source: Source) -> dict[str, object] | None:
    return await _one(conn, QUERIES["source_publication"], {"publication": source.publication_name})


def _publication_missing(source: Source) -> str:
    return (
        f"Publication {source.publication_name!r} does not exist in database {source.database!r} "
        f"of source {source.name!r}. Create it ({_create_publication_hint(source)}) or let pgsink "
        "create it: publication.create_if_not_exists: true in YAML, --create-publication on the CLI."
    )


def _publication_warnings(pub: dict[str, object], source: Source) -> list[str]:
    missing = [a for a in ("insert", "update", "delete") if not pub[f"pub{a}"]]
    if not missing:
        return []
    return [
        f"Publication {source.publication_name!r} does not publish {', '.join(missing)} events; "
        "those changes will never reach pgsink. Fix: ALTER PUBLICATION "
        f"{sql.Identifier(source.publication_name).as_string(None)} SET (publish = 'insert, update, delete');"
    ]


def _split(tables: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
    uniq = sorted(set(tables))
    return [s for s, _ in uniq], [t for _, t in uniq]


async def _table_problems(conn: psycopg.AsyncConnection, source: Source,
                          tables: list[tuple[str, str]]) -> list[str]:
    schemas, names = _split(tables)
    rows = await _all(conn, QUERIES["source_tables_status"],
                      {"publication": source.publication_name, "schemas": schemas, "names": names})
    problems = []
    pub = sql.Identifier(source.publication_name).as_string(None)
    for r in rows:
        qualified = f"{r['schema']}.{r['name']}"
        if not r["table_exists"]:
            problems.append(
                f"Table {qualified} does not exist in database {source.database!r} of source "
                f"{source.name!r}. Create it, or fix the table name in the sink (schema.table)."
            )
        elif not r["published"]:
            ident = sql.Identifier(str(r["schema"]), str(r["name"])).as_string(None)
            problems.append(
                f"Table {qualified} is not in publication {source.publication_name!r}, so its "
                f"changes never reach pgsink. Fix: ALTER PUBLICATION {pub} ADD TABLE {ident};"
            )
    return problems


# ---------------------------------------------------------------- replica identity


async def _identities(conn: psycopg.AsyncConnection, source: Source) -> list[TableIdentity]:
    rows = await _all(conn, QUERIES["source_replica_identity"],
                      {"publication": source.publication_name, "state_schema": STATE_SCHEMA})
    return [
        TableIdentity(str(r["schema"]), str(r["name"]), _IDENTITY.get(str(r["relreplident"]), "default"),
                      bool(r["has_pk"]))
        for r in rows
    ]


def _list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def identity_warnings(identities: list[TableIdentity]) -> list[str]:
    """What users lose on tables without REPLICA IDENTITY FULL or a primary key."""
    warnings = []
    not_full = [t.qualified for t in identities if not t.full and t.replica_identity != "nothing"]
    if not_full:
        warnings.append(
            f"{len(not_full)} table(s) lack REPLICA IDENTITY FULL: {_list(not_full)}. Their update "
            "messages carry \"changes\": null and deletes carry only the key columns. "
            "Fix: ALTER TABLE <table> REPLICA IDENTITY FULL;"
        )
    no_pk = [t.qualified for t in identities if not t.has_primary_key]
    if no_pk:
        warnings.append(
            f"{len(no_pk)} table(s) have no primary key: {_list(no_pk)}. Their messages cannot be "
            "grouped by key (set group_column_names for them), and unless their replica identity "
            "is FULL or an index, Postgres rejects UPDATE and DELETE on them while they are published."
        )
    nothing = [t.qualified for t in identities if t.replica_identity == "nothing"]
    if nothing:
        warnings.append(
            f"{len(nothing)} table(s) have REPLICA IDENTITY NOTHING: {_list(nothing)}. Postgres "
            "rejects UPDATE and DELETE on them while they are published. "
            "Fix: ALTER TABLE <table> REPLICA IDENTITY FULL;"
        )
    return warnings


async def replica_identity_report(source: Source) -> list[TableIdentity]:
    """Replica identity and primary key of every table the source's publication carries.

    The state schema is left out: the reader drops its changes anyway.
    """
    async with _source_conn(source) as conn:
        return await _identities(conn, source)


# ---------------------------------------------------------------- public API


async def check_source(source: Source, tables: list[tuple[str, str]] | None = None) -> list[str]:
    """Check that the source can be streamed from; return warnings, raise SourceError otherwise.

    ``tables`` are the (schema, table) pairs sinks name explicitly: each must
    exist and be published. Every problem found is reported at once, each with
    its fix, so one run of `pgsink config apply` tells the user everything.
    """
    async with _source_conn(source) as conn:
        problems: list[str] = []
        warnings: list[str] = []
        wal = await _wal_level_problem(conn, source)
        if wal:
            problems.append(wal)
        priv = await _privilege_problem(conn, source)
        if priv:
            problems.append(priv)
        slot = await _slot_problem(conn, source)
        if slot:
            problems.append(slot)
        pub = await _publication(conn, source)
        if pub is None:
            problems.append(_publication_missing(source))
        else:
            warnings += _publication_warnings(pub, source)
            if tables:
                problems += await _table_problems(conn, source, tables)
            identities = await _identities(conn, source)
            if tables is not None:
                wanted = set(tables)
                identities = [t for t in identities if (t.schema, t.name) in wanted]
            warnings += identity_warnings(identities)
    if len(problems) == 1:
        raise SourceError(problems[0])
    if problems:
        raise SourceError(f"{len(problems)} problems with source {source.name!r}:\n"
                          + "\n".join(f"- {p}" for p in problems))
    return warnings


async def ensure_slot_and_publication(source: Source) -> None:
    """Create the publication and slot when the source allows it; fail clearly when missing."""
    async with _source_conn(source) as conn:
        await _ensure(conn, source, strict=True)


async def prepare_source(source: Source, tables: list[tuple[str, str]] | None = None
                         ) -> tuple[list[str], list[str]]:
    """Create what the source may create, then run every check; the config-apply path.

    Unlike ensure_slot_and_publication, a missing object that may not be
    created is left to check_source, so all problems are reported together.
    Returns (warnings, what it created: "publication", "slot"); when a check
    fails, what it created is dropped again (see undo_created).
    """
    async with _source_conn(source) as conn:
        created = await _ensure(conn, source, strict=False)
    try:
        return await check_source(source, tables), created
    except BaseException:
        await undo_created(source, created)
        raise


async def undo_created(source: Source, created: list[str]) -> None:
    """Drop what prepare_source created, for an apply that failed: a slot nobody reads keeps WAL forever."""
    if not created:
        return
    try:
        async with _source_conn(source) as conn:
            if "slot" in created:
                await conn.execute(QUERIES["source_drop_slot"], {"slot": source.slot_name})
            if "publication" in created:
                await conn.execute(sql.SQL("drop publication if exists {}").format(
                    sql.Identifier(source.publication_name)))
    except (psycopg.Error, PgsinkError) as e:
        log.warning("source %s: could not drop the %s created for a failed apply (%s); drop it by hand",
                    source.name, " and ".join(created), e, extra={"source": source.name})


async def _ensure(conn: psycopg.AsyncConnection, source: Source, *, strict: bool) -> list[str]:
    await conn.execute(QUERIES["source_ensure_lock"], {"slot": source.slot_name})
    try:
        return await _ensure_locked(conn, source, strict=strict)
    finally:
        if not conn.broken:  # a broken session has released the lock already
            await conn.execute(QUERIES["source_ensure_unlock"], {"slot": source.slot_name})


async def _ensure_locked(conn: psycopg.AsyncConnection, source: Source, *, strict: bool) -> list[str]:
    created: list[str] = []
    # The publication first, so that the slot's first decoded transaction already sees it.
    if await _publication(conn, source) is None:
        if source.create_publication:
            if await _create_publication(conn, source):
                created.append("publication")
        elif strict:
            raise SourceError(_publication_missing(source))
    if await _one(conn, QUERIES["source_slot"], {"slot": source.slot_name}) is None:
        if source.create_slot:
            wal = await _wal_level_problem(conn, source)
            if wal:
                raise SourceError(wal)
            if await _create_slot(conn, source):
                created.append("slot")
        elif strict:
            problem = await _slot_problem(conn, source)
            raise SourceError(problem or f"Replication slot {source.slot_name!r} is missing.")
    return created


async def _create_publication(conn: psycopg.AsyncConnection, source: Source) -> bool:
    """Run the user's init_sql, or publish all tables (the reader drops pgsink's own); False when
    another session created it meanwhile."""
    try:
        if source.publication_init_sql:
            log.info("creating publication %s with init_sql", source.publication_name,
                     extra={"source": source.name})
            await conn.execute(cast(LiteralString, source.publication_init_sql))
        else:
            log.info("creating publication %s for all tables", source.publication_name,
                     extra={"source": source.name})
            await conn.execute(
                sql.SQL("create publication {} for all tables with (publish_via_partition_root = true)")
                .format(sql.Identifier(source.publication_name))
            )
    except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
        return False  # created concurrently by a process without our lock (an older pgsink, a human)
    except psycopg.errors.InsufficientPrivilege as e:
        raise SourceError(
            f"Cannot create publication {source.publication_name!r} on source {source.name!r}: "
            f"{e.diag.message_primary}. A FOR ALL TABLES publication needs a superuser. Ask one to "
            f"run {_create_publication_hint(source)} or give publication.init_sql that creates it "
            "FOR TABLES IN SCHEMA / FOR TABLE ... (needs ownership of those tables)."
        ) from e
    except psycopg.Error as e:
        what = "publication.init_sql failed" if source.publication_init_sql else "CREATE PUBLICATION failed"
        raise SourceError(
            f"Cannot create publication {source.publication_name!r} on source {source.name!r}: "
            f"{what}: {e.diag.message_primary or e}. Fix the SQL or create the publication yourself."
        ) from e
    if await _publication(conn, source) is None:
        raise SourceError(
            f"publication.init_sql of source {source.name!r} ran, but publication "
            f"{source.publication_name!r} still does not exist: init_sql must create a publication "
            "with exactly that name."
        )
    return True


async def _create_slot(conn: psycopg.AsyncConnection, source: Source) -> bool:
    """Create the slot; False when another session created it meanwhile."""
    log.info("creating logical replication slot %s (%s)", source.slot_name, source.decoder,
             extra={"source": source.name})
    try:
        await conn.execute(QUERIES["source_create_slot"], {"slot": source.slot_name, "plugin": source.decoder})
    except psycopg.errors.DuplicateObject:
        return False  # created concurrently; its plugin is checked below
    except psycopg.errors.InsufficientPrivilege as e:
        raise SourceError(
            f"Cannot create replication slot {source.slot_name!r} on source {source.name!r}: "
            f"{e.diag.message_primary}. Give the user REPLICATION (ALTER ROLE ... WITH REPLICATION) "
            f"or ask a superuser to run {_create_slot_sql(source)}"
        ) from e
    except psycopg.errors.UndefinedFile as e:
        raise SourceError(
            f"Cannot create replication slot {source.slot_name!r} on source {source.name!r}: the "
            f"output plugin {source.decoder!r} is not installed on the server "
            f"({e.diag.message_primary}). Install it (Debian: postgresql-NN-{source.decoder}) or use "
            "decoder: pgoutput, which is built in."
        ) from e
    except psycopg.Error as e:
        raise SourceError(
            f"Cannot create replication slot {source.slot_name!r} on source {source.name!r}: "
            f"{e.diag.message_primary or e}. Check max_replication_slots and wal_level on the server."
        ) from e
    problem = await _slot_problem(conn, source)
    if problem:
        raise SourceError(problem)
    return True


async def drop_slot(source: Source) -> bool:
    """Drop the source's slot if it exists and nobody reads it; True when dropped."""
    async with _source_conn(source) as conn:
        row = await _one(conn, QUERIES["source_slot"], {"slot": source.slot_name})
        if row is None:
            return False
        if row["active"]:
            raise SourceError(
                f"Replication slot {source.slot_name!r} is in use by a running reader (pid "
                f"{row['active_pid']}); stop the pgsink workers of source {source.name!r} first."
            )
        await conn.execute(QUERIES["source_drop_slot"], {"slot": source.slot_name})
        return True
