"""The spec dataclasses: what the user asks for, as plain comparable values.

A spec is one source, endpoint or sink as a YAML file or a CLI command wants
it. Parsing produces specs, the current rows are turned into the same specs
(``current_specs``), and the plan is the field-by-field difference between
the two; export writes specs back out. This module holds only those shared
values and conversions, so every other layer can import it.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..model import Config, HttpEndpoint, Sink, Source


DEFAULT_RETENTION_SECONDS = 7 * 86400
DEFAULT_LANE_COUNT = 16  # the column default since migration 0004 (why: see there)
ACTIONS = ("insert", "update", "delete")
STATUSES = ("active", "paused", "disabled")
DECODERS = ("pgoutput", "wal2json")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@dataclass(frozen=True)
class SourceSpec:
    """A source as the user wants it (``databases:`` entry or `pgsink source add`)."""

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
    retention_seconds: int
    annotations: dict[str, Any]
    line: int = field(default=0, compare=False)

    def to_model(self, id: uuid.UUID | None = None) -> Source:
        """The runtime Source for checks against the real database."""
        return Source(
            id=id or uuid.uuid4(), name=self.name, hostname=self.hostname, port=self.port,
            database=self.database, username=self.username, password=self.password,
            sslmode=self.sslmode, slot_name=self.slot_name, create_slot=self.create_slot,
            publication_name=self.publication_name, create_publication=self.create_publication,
            publication_init_sql=self.publication_init_sql, decoder=self.decoder,
            retention_seconds=float(self.retention_seconds), annotations=self.annotations,
        )


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    url: str
    headers: dict[str, str]
    encrypted_headers: dict[str, str] = field(repr=False)
    signing: bool = False  # Standard Webhooks signatures
    signing_secret: str | None = field(default=None, repr=False)  # None with signing: keep or generate
    block_private_addresses: bool = False
    ca_bundle: str | None = None
    rate_limit: float | None = None  # requests/s across all workers
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class TableSpec:
    name: str  # "schema.table"
    group_column_names: tuple[str, ...] | None

    def split(self) -> tuple[str, str]:
        schema, _, table = self.name.rpartition(".")
        return schema or "public", table


@dataclass(frozen=True)
class SinkSpec:
    name: str
    source: str  # the source's (database's) name
    http_endpoint: str
    http_endpoint_path: str
    status: str
    include_schemas: tuple[str, ...] | None
    exclude_schemas: tuple[str, ...] | None
    include_tables: tuple[str, ...] | None
    exclude_tables: tuple[str, ...] | None
    actions: tuple[str, ...]
    message_grouping: bool
    tables: tuple[TableSpec, ...]
    batch: bool
    batch_size: int
    batch_timeout_ms: int
    request_timeout_ms: int
    max_ack_pending: int
    max_retry_count: int | None
    annotations: dict[str, Any]
    lane_count: int
    filters: tuple[dict[str, Any], ...] = ()  # column filters, sequin.yaml form
    filter_sql: str | None = None
    filter_function: str | None = None
    transform_path: str | None = None
    transform_function: str | None = None
    route_function: str | None = None
    function_timeout_ms: int = 1000
    enrichment_sql: str | None = None
    # tables to backfill when apply creates the sink (sequin.yaml initial_backfill); not a diffable setting
    initial_backfill: tuple[str, ...] = field(default=(), compare=False)
    # false when the file left lane_count out: an existing sink then keeps its own (see plan)
    lane_count_given: bool = field(default=True, compare=False)
    line: int = field(default=0, compare=False)

    def explicit_tables(self) -> set[tuple[str, str]]:
        """Tables this sink names: each must exist in the source and be published."""
        out = {TableSpec(t, None).split() for t in self.include_tables or ()}
        out |= {t.split() for t in self.tables}
        return out


@dataclass
class Desired:
    """Everything one YAML file (or one CLI command) asks for."""

    sources: list[SourceSpec] = field(default_factory=list)
    endpoints: list[EndpointSpec] = field(default_factory=list)
    sinks: list[SinkSpec] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    filename: str = "<config>"


# ====================================================================== retention


_RETENTION_PART = re.compile(
    r"(\d+)\s*(weeks?|w|days?|d|hours?|hrs?|h|minutes?|mins?|m|seconds?|secs?|s)(?![a-z])", re.I)
_UNIT_SECONDS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


MAX_RETENTION_SECONDS = 100 * 365 * 86400
"""A century: past it a retention period overflows dates (and means "forever" anyway)."""


def parse_retention(value: object) -> int:
    """'7 days', '36 hours', '1 day 12 hours', '90m' or a number of seconds -> seconds.

    0 keeps only what pending and parked deliveries still need."""
    if isinstance(value, bool):
        raise ValueError("is a boolean")
    if isinstance(value, int):
        seconds = value
    else:
        text = str(value).strip().lower()
        if text.isdigit():  # seconds, as from the command line
            return parse_retention(int(text))
        if re.search(r"\b(mon|months?|years?|y)\b", text):
            raise ValueError("months and years vary in length: give it in days (e.g. '30 days')")
        parts = list(_RETENTION_PART.finditer(text))
        rest = _RETENTION_PART.sub("", text).replace(",", "").replace("and", "").strip()
        if not parts or rest:
            raise ValueError("is not a duration like '7 days', '36 hours' or '1 day 12 hours'")
        seconds = 0
        for p in parts:
            unit = p.group(2)
            key = "m" if unit.startswith("mi") or unit == "m" else unit[0]
            seconds += int(p.group(1)) * _UNIT_SECONDS[key]
    if seconds < 0:
        raise ValueError("cannot be negative")
    if seconds > MAX_RETENTION_SECONDS:
        raise ValueError(f"is longer than {MAX_RETENTION_SECONDS // 86400} days: give a shorter period")
    return seconds


def format_retention(seconds: int) -> str:
    """The shortest exact text for a retention period (round-trips through parse_retention)."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds % size == 0:
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds} seconds"


# ====================================================================== current state as specs


def source_spec(s: Source) -> SourceSpec:
    return SourceSpec(
        name=s.name, hostname=s.hostname, port=s.port, database=s.database, username=s.username,
        password=s.password, sslmode=s.sslmode, slot_name=s.slot_name, create_slot=s.create_slot,
        publication_name=s.publication_name, create_publication=s.create_publication,
        publication_init_sql=s.publication_init_sql, decoder=s.decoder,
        retention_seconds=int(round(s.retention_seconds)), annotations=dict(s.annotations),
    )


def endpoint_spec(e: HttpEndpoint) -> EndpointSpec:
    return EndpointSpec(name=e.name, url=e.url, headers=dict(e.headers), encrypted_headers=dict(e.encrypted_headers),
                        signing=e.signing is not None, signing_secret=e.signing.current if e.signing else None,
                        block_private_addresses=e.block_private_addresses, ca_bundle=e.ca_bundle,
                        rate_limit=e.rate_limit)


def sink_spec(k: Sink, config: Config) -> SinkSpec:
    return SinkSpec(
        name=k.name, source=config.sources[k.source_id].name,
        http_endpoint=config.endpoints[k.http_endpoint_id].name, http_endpoint_path=k.http_endpoint_path,
        status=k.status, include_schemas=k.include_schemas, exclude_schemas=k.exclude_schemas,
        include_tables=k.include_tables, exclude_tables=k.exclude_tables,
        actions=tuple(a for a in ACTIONS if a in k.actions), message_grouping=k.message_grouping,
        tables=tuple(TableSpec(f"{t.schema}.{t.name}", t.group_column_names) for t in k.table_options),
        batch=k.batch, batch_size=k.batch_size, batch_timeout_ms=k.batch_timeout_ms,
        request_timeout_ms=k.request_timeout_ms, max_ack_pending=k.max_ack_pending,
        max_retry_count=k.max_retry_count, annotations=dict(k.annotations), lane_count=k.lane_count,
        filters=tuple(dict(f) for f in k.filters), filter_sql=k.filter_sql, filter_function=k.filter_function,
        transform_path=k.transform_path, transform_function=k.transform_function,
        route_function=k.route_function, function_timeout_ms=k.function_timeout_ms,
        enrichment_sql=k.enrichment_sql,
    )


def current_specs(config: Config) -> Desired:
    return Desired(
        sources=[source_spec(s) for s in config.sources.values()],
        endpoints=[endpoint_spec(e) for e in config.endpoints.values()],
        sinks=[sink_spec(k, config) for k in config.sinks.values()],
    )
