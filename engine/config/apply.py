"""Applying a plan to the state database, and the single-object commands.

Every touched source is set up and checked (slot, publication, tables)
*before* the state transaction starts -- creating a logical slot waits for
every open transaction with an xid, ours included -- then all changes are
written in one transaction with ``NOTIFY pgsink_config``. The CLI's remove
and pause/resume/disable commands write here too, under the same lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
import psycopg
from psycopg.types.json import Jsonb

from .. import secrets
from .. import signing as signing_mod
from .. import source as source_checks
from ..db import connection
from ..errors import ConfigError
from ..model import Config, Source, load_config
from ..queries import QUERIES
from .plan import Change, Plan, make_plan
from .specs import STATUSES, Desired, EndpointSpec, SinkSpec, SourceSpec, current_specs

log = logging.getLogger("pgsink.config")


@dataclass
class ApplyResult:
    plan: Plan
    warnings: list[str]


def _secret_blob(data: bytes | None) -> bytes | None:
    return secrets.encrypt(data) if data else None


def _source_params(s: SourceSpec) -> dict[str, Any]:
    return {
        "name": s.name, "hostname": s.hostname, "port": s.port, "database": s.database,
        "username": s.username, "password_encrypted": _secret_blob(s.password.encode() if s.password else None),
        "sslmode": s.sslmode, "slot_name": s.slot_name, "create_slot": s.create_slot,
        "publication_name": s.publication_name, "create_publication": s.create_publication,
        "publication_init_sql": s.publication_init_sql, "decoder": s.decoder,
        "retention": timedelta(seconds=s.retention_seconds), "annotations": Jsonb(s.annotations),
    }


def _endpoint_params(e: EndpointSpec) -> dict[str, Any]:
    return {
        "name": e.name, "url": e.url, "headers": Jsonb(e.headers),
        "encrypted_headers": _secret_blob(orjson.dumps(e.encrypted_headers) if e.encrypted_headers else None),
    }


def _sink_params(k: SinkSpec) -> dict[str, Any]:
    def arr(v: tuple[str, ...] | None) -> list[str] | None:
        return list(v) if v is not None else None

    options = [{"name": t.name, **({"group_column_names": list(t.group_column_names)}
                                   if t.group_column_names else {})} for t in k.tables]
    return {
        "name": k.name, "source": k.source, "http_endpoint": k.http_endpoint,
        "http_endpoint_path": k.http_endpoint_path, "status": k.status,
        "include_schemas": arr(k.include_schemas), "exclude_schemas": arr(k.exclude_schemas),
        "include_tables": arr(k.include_tables), "exclude_tables": arr(k.exclude_tables),
        "actions": list(k.actions), "message_grouping": k.message_grouping, "table_options": Jsonb(options),
        "batch": k.batch, "batch_size": k.batch_size, "batch_timeout_ms": k.batch_timeout_ms,
        "request_timeout_ms": k.request_timeout_ms, "max_ack_pending": k.max_ack_pending,
        "max_retry_count": k.max_retry_count, "annotations": Jsonb(k.annotations), "lane_count": k.lane_count,
    }


_WRITES: dict[tuple[str, str], tuple[str, Callable[[Any], dict[str, Any]]]] = {
    ("create", "source"): ("source_insert", _source_params),
    ("update", "source"): ("source_update", _source_params),
    ("create", "endpoint"): ("endpoint_insert", _endpoint_params),
    ("update", "endpoint"): ("endpoint_update", _endpoint_params),
    ("update", "sink"): ("sink_update", _sink_params),
}
_DELETES = {"source": "source_delete", "endpoint": "endpoint_delete", "sink": "sink_delete"}
_ORDER = {("create", "source"): 0, ("update", "source"): 0, ("create", "endpoint"): 1, ("update", "endpoint"): 1,
          ("create", "sink"): 2, ("update", "sink"): 2, ("delete", "sink"): 3, ("delete", "endpoint"): 4,
          ("delete", "source"): 5}


async def _write(conn: psycopg.AsyncConnection, plan: Plan) -> None:
    """Execute a plan's changes, dependencies first (sources, endpoints, sinks; deletions reversed)."""
    for c in sorted(plan.changes, key=lambda c: _ORDER[(c.action, c.kind)]):
        log.info("%s %s %s", c.action, c.kind, c.name, extra={c.kind: c.name})
        try:
            await _write_one(conn, c)
        except psycopg.Error as e:
            # Only the primary message: a DETAIL line would echo the row, ciphertext included.
            raise ConfigError(f"Cannot {c.action} {c.kind} {c.name!r}: {e.diag.message_primary or type(e).__name__}. "
                              "Nothing was applied.") from None


async def _write_one(conn: psycopg.AsyncConnection, c: Change) -> None:
    if c.action == "delete":
        await conn.execute(QUERIES[_DELETES[c.kind]], {"name": c.name})
    elif (c.action, c.kind) == ("create", "sink"):
        cur = await conn.execute(QUERIES["sink_insert"], _sink_params(c.spec))
        row = await cur.fetchone()
        assert row is not None
        await conn.execute(QUERIES["sink_lanes_insert"], {"id": row[0], "lane_count": c.spec.lane_count})
        for table in c.spec.initial_backfill:  # same transaction: the sink and its backfills, or neither
            await conn.execute(QUERIES["backfill_initial"], {"sink": c.spec.name, "table": table})
    else:
        query, params = _WRITES[(c.action, c.kind)]
        await conn.execute(QUERIES[query], params(c.spec))  # type: ignore[index]
    if c.kind == "endpoint" and c.action != "delete":
        await _write_endpoint_security(conn, c.spec)
    if c.kind == "sink" and c.action != "delete":
        k: SinkSpec = c.spec
        await conn.execute(QUERIES["sink_functions_set"], {
            "name": k.name, "filters": Jsonb(list(k.filters)), "filter_sql": k.filter_sql,
            "filter_function": k.filter_function, "transform_path": k.transform_path,
            "transform_function": k.transform_function, "route_function": k.route_function,
            "function_timeout_ms": k.function_timeout_ms, "enrichment_sql": k.enrichment_sql})


async def _write_endpoint_security(conn: psycopg.AsyncConnection, e: EndpointSpec) -> None:
    """Signing secrets (a changed secret is a rotation: the old one signs on for a grace period),
    the private-address block, CA bundle and rate limit (migration 0003's columns)."""
    cur = await conn.execute(QUERIES["endpoint_security_get"], {"name": e.name})
    row = await cur.fetchone()
    old_blob = row[0] if row else None
    blob: bytes | None = None
    if e.signing:
        secret = e.signing_secret or signing_mod.generate_secret()
        old = signing_mod.SigningKeys.decrypt(old_blob) if old_blob else None
        if old is not None and old.current == secret:
            blob = old_blob
        elif old is not None:
            blob = old.rotated(secret, grace_seconds=signing_mod.DEFAULT_GRACE_SECONDS).encrypt()
        else:
            blob = signing_mod.SigningKeys.of(secret).encrypt()
    await conn.execute(QUERIES["endpoint_security_set"], {
        "name": e.name, "signing_secrets_encrypted": blob, "block_private_addresses": e.block_private_addresses,
        "ca_bundle": e.ca_bundle, "rate_limit": e.rate_limit})


def _sources_to_check(plan: Plan, desired: Desired, current: Config) -> dict[str, tuple[Source, set[tuple[str, str]]]]:
    """Sources touched by the plan, each with the tables its sinks (after the plan) name."""
    by_name = {s.name: s for s in current.sources.values()}
    wanted = {s.name: s for s in desired.sources}
    final_sinks = {k.name: k for k in current_specs(current).sinks}
    final_sinks.update({k.name: k for k in desired.sinks})
    for c in plan.changes:
        if c.action == "delete" and c.kind == "sink":
            final_sinks.pop(c.name, None)
    touched: set[str] = set()
    for c in plan.changes:
        if c.action != "delete" and c.kind == "source":
            touched.add(c.name)
        if c.action != "delete" and c.kind == "sink":
            touched.add(c.spec.source)
    out: dict[str, tuple[Source, set[tuple[str, str]]]] = {}
    for name in sorted(touched):
        existing = by_name.get(name)
        model = wanted[name].to_model(existing.id if existing else None) if name in wanted else existing
        assert model is not None
        tables: set[tuple[str, str]] = set()
        for k in final_sinks.values():
            if k.source == name:
                tables |= k.explicit_tables()
        out[name] = (model, tables)
    return out


async def _prepare_sources(checks: dict[str, tuple[Source, set[tuple[str, str]]]],
                           created: list[tuple[Source, list[str]]]) -> list[str]:
    """Create slots/publications allowed to be created (noted in ``created``), then check every
    touched source."""
    warnings: list[str] = []
    for name, (src, tables) in checks.items():
        found, made = await source_checks.prepare_source(src, sorted(tables))
        created.append((src, made))
        warnings += [f"source {name!r}: {w}" for w in found]
    return warnings


async def _load(conn: psycopg.AsyncConnection) -> Config:
    try:
        return await load_config(conn)
    except psycopg.errors.UndefinedTable:
        raise ConfigError("The state database has no pgsink schema yet: run `pgsink migrate` first.") from None


async def read_config(dsn: str) -> Config:
    async with connection(dsn, autocommit=True) as conn:
        return await _load(conn)


async def plan_config(dsn: str, desired: Desired, *, prune: bool = False) -> Plan:
    """What apply would change; reads the state database, writes nothing, contacts no source."""
    return make_plan(desired, await read_config(dsn), prune=prune)


async def apply_config(dsn: str, desired: Desired, *, prune: bool = False, create_only: bool = False
                       ) -> ApplyResult:
    """Validate touched sources, then write every change in one transaction and NOTIFY workers.

    Slot and publication creation happen before the state transaction (a
    logical slot waits for open transactions with an xid to finish). A
    failing check raises before anything is written to the state database.
    """
    current = await read_config(dsn)
    plan = make_plan(desired, current, prune=prune)
    if create_only:
        _refuse_existing(plan)
    if plan.empty:
        return ApplyResult(plan, [])
    checks = _sources_to_check(plan, desired, current)
    created: list[tuple[Source, list[str]]] = []
    committed = False
    try:
        warnings = await _prepare_sources(checks, created)
        async with connection(dsn, autocommit=True) as conn:
            async with conn.transaction():
                await conn.execute(QUERIES["config_lock"])
                latest = await _load(conn)
                plan = make_plan(desired, latest, prune=prune)
                if create_only:
                    _refuse_existing(plan)
                if set(_sources_to_check(plan, desired, latest)) - set(checks):
                    raise ConfigError("The config changed while it was being applied; run the command again.")
                await _write(conn, plan)
                await conn.execute(QUERIES["config_notify"], {"what": "apply"})
            committed = True
    except BaseException:
        if not committed:  # nothing was written: drop the slots and publications this run made
            for src, made in created:
                await source_checks.undo_created(src, made)
        raise
    return ApplyResult(plan, warnings)


def _refuse_existing(plan: Plan) -> None:
    for c in plan.changes:
        if c.action != "create":
            raise ConfigError(
                f"{c.kind} {c.name!r} already exists. Remove it first (pgsink {c.kind} remove {c.name}) "
                "or change it with `pgsink config apply`.")


def _remove_hint(kind: str, name: str, users: list[str]) -> str:
    return (f"Cannot remove {kind} {name!r}: sink{'s' if len(users) > 1 else ''} {', '.join(users)} "
            f"use{'' if len(users) > 1 else 's'} it. Remove {'them' if len(users) > 1 else 'it'} first "
            f"(pgsink sink remove NAME).")


async def _remove(dsn: str, kind: str, name: str, users_query: str | None) -> None:
    async with connection(dsn, autocommit=True) as conn:
        async with conn.transaction():
            await conn.execute(QUERIES["config_lock"])
            if users_query is not None:
                cur = await conn.execute(QUERIES[users_query], {"name": name})  # type: ignore[index]
                users = [r[0] for r in await cur.fetchall()]
                if users:
                    raise ConfigError(_remove_hint(kind, name, users))
            cur = await conn.execute(QUERIES[_DELETES[kind]], {"name": name})
            if cur.rowcount == 0:
                raise ConfigError(f"There is no {kind} named {name!r} (see pgsink {kind} list).")
            await conn.execute(QUERIES["config_notify"], {"what": f"remove {kind}"})


async def remove_source(dsn: str, name: str, *, drop_slot: bool = False) -> Source:
    """Delete a source no sink uses; optionally drop its replication slot afterwards."""
    config = await read_config(dsn)
    src = config.source_named(name)
    await _remove(dsn, "source", name, "sinks_using_source")
    assert src is not None
    if drop_slot:
        await source_checks.drop_slot(src)
    return src


async def remove_endpoint(dsn: str, name: str) -> None:
    await _remove(dsn, "endpoint", name, "sinks_using_endpoint")


async def remove_sink(dsn: str, name: str) -> None:
    await _remove(dsn, "sink", name, None)


async def set_sink_status(dsn: str, name: str, status: str) -> bool:
    """Pause, resume or disable a sink; False when it already had that status."""
    if status not in STATUSES:
        raise ConfigError(f"status must be one of {', '.join(STATUSES)}")
    async with connection(dsn, autocommit=True) as conn:
        async with conn.transaction():
            await conn.execute(QUERIES["config_lock"])
            cur = await conn.execute(QUERIES["sink_status"], {"name": name})
            row = await cur.fetchone()
            if row is None:
                raise ConfigError(f"There is no sink named {name!r} (see pgsink sink list).")
            if row[0] == status:
                return False
            await conn.execute(QUERIES["sink_set_status"], {"name": name, "status": status})
            await conn.execute(QUERIES["config_notify"], {"what": f"sink {status}"})
    return True
