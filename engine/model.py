"""The runtime view of config rows: sources, HTTP endpoints and sinks.

Workers load this from the state database (``load_config``) and reload it when
it changes, so config edits take effect without a restart. Secrets are
decrypted here, in memory only; ``__repr__`` never shows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import orjson
import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from . import secrets
from .queries import QUERIES
from .signing import SigningKeys


@dataclass(frozen=True)
class Source:
    id: UUID
    name: str
    hostname: str
    port: int
    database: str
    username: str
    password: str | None = field(repr=False)
    sslmode: str
    slot_name: str
    create_slot: bool
    publication_name: str
    create_publication: bool
    publication_init_sql: str | None
    decoder: str
    retention_seconds: float
    annotations: dict[str, Any]

    def dsn(self, **extra: str) -> str:
        """libpq connection string for this source (contains the password: never log it)."""
        params: dict[str, Any] = {
            "host": self.hostname, "port": self.port, "dbname": self.database,
            "user": self.username, "sslmode": self.sslmode,
            "application_name": f"pgsink:{self.name}",
        }
        if self.password:
            params["password"] = self.password
        params.update(extra)
        return make_conninfo(**params)


@dataclass(frozen=True)
class HttpEndpoint:
    id: UUID
    name: str
    url: str
    headers: dict[str, str]
    encrypted_headers: dict[str, str] = field(repr=False)
    signing: SigningKeys | None = field(default=None, repr=False)  # None: requests are not signed
    block_private_addresses: bool = False
    ca_bundle: str | None = None
    rate_limit: float | None = None  # requests/s across all workers

    def all_headers(self) -> dict[str, str]:
        return {**self.headers, **self.encrypted_headers}


@dataclass(frozen=True)
class TableOptions:
    schema: str
    name: str
    group_column_names: tuple[str, ...] | None


@dataclass(frozen=True)
class Sink:
    id: UUID
    name: str
    source_id: UUID
    http_endpoint_id: UUID
    http_endpoint_path: str
    status: str
    include_schemas: tuple[str, ...] | None
    exclude_schemas: tuple[str, ...] | None
    include_tables: tuple[str, ...] | None
    exclude_tables: tuple[str, ...] | None
    actions: frozenset[str]
    message_grouping: bool
    table_options: tuple[TableOptions, ...]
    batch: bool
    batch_size: int
    batch_timeout_ms: int
    request_timeout_ms: int
    max_ack_pending: int
    max_retry_count: int | None
    annotations: dict[str, Any]
    lane_count: int
    filters: tuple[dict[str, Any], ...] = ()  # sequin.yaml column filters, applied at enqueue
    filter_sql: str | None = None
    filter_function: str | None = None
    transform_path: str | None = None
    transform_function: str | None = None
    route_function: str | None = None
    function_timeout_ms: int = 1000
    enrichment_sql: str | None = None  # a SELECT against the source, $1: the batch's primary keys

    @property
    def has_filters(self) -> bool:
        return bool(self.filters or self.filter_sql or self.filter_function)

    def matches_table(self, schema: str, table: str) -> bool:
        """Whether changes of schema.table belong to this sink (source filters only)."""
        qualified = f"{schema}.{table}"
        if self.include_schemas is not None and schema not in self.include_schemas:
            return False
        if self.exclude_schemas is not None and schema in self.exclude_schemas:
            return False
        if self.include_tables is not None and qualified not in self.include_tables:
            return False
        if self.exclude_tables is not None and qualified in self.exclude_tables:
            return False
        return True

    def group_columns(self, schema: str, table: str) -> tuple[str, ...] | None:
        """Columns forming the group key for this table; None means the primary key."""
        for t in self.table_options:
            if t.schema == schema and t.name == table:
                return t.group_column_names
        return None


@dataclass(frozen=True)
class Config:
    sources: dict[UUID, Source]
    endpoints: dict[UUID, HttpEndpoint]
    sinks: dict[UUID, Sink]

    def sinks_of(self, source_id: UUID) -> list[Sink]:
        return [s for s in self.sinks.values() if s.source_id == source_id]

    def source_named(self, name: str) -> Source | None:
        return next((s for s in self.sources.values() if s.name == name), None)

    def sink_named(self, name: str) -> Sink | None:
        return next((s for s in self.sinks.values() if s.name == name), None)


def _tuple(v: list[str] | None) -> tuple[str, ...] | None:
    return tuple(v) if v is not None else None


def _table_options(raw: list[dict[str, Any]]) -> tuple[TableOptions, ...]:
    out = []
    for t in raw:
        schema, _, name = t["name"].rpartition(".")
        cols = t.get("group_column_names")
        out.append(TableOptions(schema or "public", name, tuple(cols) if cols else None))
    return tuple(out)


def _decrypt_json(blob: bytes | None) -> dict[str, str]:
    return orjson.loads(secrets.decrypt(blob)) if blob else {}


async def load_config(conn: psycopg.AsyncConnection) -> Config:
    """Read every source, endpoint and sink; decrypt their secrets in memory."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(QUERIES["config_sources"])
        sources = {
            r["id"]: Source(
                id=r["id"], name=r["name"], hostname=r["hostname"], port=r["port"],
                database=r["database"], username=r["username"],
                password=secrets.decrypt(r["password_encrypted"]).decode() if r["password_encrypted"] else None,
                sslmode=r["sslmode"], slot_name=r["slot_name"], create_slot=r["create_slot"],
                publication_name=r["publication_name"], create_publication=r["create_publication"],
                publication_init_sql=r["publication_init_sql"], decoder=r["decoder"],
                retention_seconds=r["retention"].total_seconds(), annotations=r["annotations"],
            )
            for r in await cur.fetchall()
        }
        await cur.execute(QUERIES["config_http_endpoints"])
        endpoints = {
            r["id"]: HttpEndpoint(
                id=r["id"], name=r["name"], url=r["url"], headers=r["headers"],
                encrypted_headers=_decrypt_json(r["encrypted_headers"]),
                signing=SigningKeys.decrypt(r["signing_secrets_encrypted"]) if r["signing_secrets_encrypted"] else None,
                block_private_addresses=r["block_private_addresses"], ca_bundle=r["ca_bundle"],
                rate_limit=r["rate_limit"],
            )
            for r in await cur.fetchall()
        }
        await cur.execute(QUERIES["config_sinks"])
        sinks = {
            r["id"]: Sink(
                id=r["id"], name=r["name"], source_id=r["source_id"],
                http_endpoint_id=r["http_endpoint_id"], http_endpoint_path=r["http_endpoint_path"],
                status=r["status"], include_schemas=_tuple(r["include_schemas"]),
                exclude_schemas=_tuple(r["exclude_schemas"]), include_tables=_tuple(r["include_tables"]),
                exclude_tables=_tuple(r["exclude_tables"]), actions=frozenset(r["actions"]),
                message_grouping=r["message_grouping"], table_options=_table_options(r["table_options"]),
                batch=r["batch"], batch_size=r["batch_size"], batch_timeout_ms=r["batch_timeout_ms"],
                request_timeout_ms=r["request_timeout_ms"], max_ack_pending=r["max_ack_pending"],
                max_retry_count=r["max_retry_count"], annotations=r["annotations"],
                lane_count=r["lane_count"], filters=tuple(r["filters"]), filter_sql=r["filter_sql"],
                filter_function=r["filter_function"], transform_path=r["transform_path"],
                transform_function=r["transform_function"], route_function=r["route_function"],
                function_timeout_ms=r["function_timeout_ms"], enrichment_sql=r["enrichment_sql"],
            )
            for r in await cur.fetchall()
        }
    return Config(sources, endpoints, sinks)


async def config_version(conn: psycopg.AsyncConnection) -> tuple[Any, ...]:
    """A cheap fingerprint of the config; when it changes, reload."""
    cur = await conn.execute(QUERIES["config_version"])
    row = await cur.fetchone()
    return tuple(row) if row else ()
