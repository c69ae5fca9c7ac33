"""Message JSON in Sequin's format, and the HTTP request that carries it.

A body is one message when the sink's ``batch`` is off, else ``{"data": [...]}``.
Keys follow Sequin's ``docs/reference/messages.mdx``, in its order::

    {"record": {...}, "changes": {...} | null, "action": "insert|update|delete|read",
     "metadata": {"table_schema", "table_name", "idempotency_key", "commit_timestamp",
                  "commit_lsn", "commit_idx", "database_name" (deprecated in Sequin, still sent),
                  "consumer": {"id", "name", "annotations"},
                  "database": {"id", "name", "annotations", "database", "hostname"},
                  "transaction_annotations"}}

``record``, ``changes`` and ``transaction_annotations`` arrive from Postgres as
jsonb text and are spliced in verbatim with ``orjson.Fragment``: numbers keep
their exact digits (a numeric 1.10 stays 1.10) and nothing is parsed twice.

Idempotency keys, stable across retries, restarts, workers and replays (as
Sequin): a change's is base64 of ``"<commit_lsn>:<commit_idx>"``; a backfill
read's is base64 of ``"<backfill_id>:<record_pk>"``.
"""

from __future__ import annotations

import binascii
import gzip
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from .model import HttpEndpoint, Sink, Source
from .queue import QueuedMessage
from .jsontext import dumps


def change_idempotency_key(commit_lsn: int, commit_idx: int) -> str:
    return binascii.b2a_base64(f"{commit_lsn}:{commit_idx}".encode(), newline=False).decode()


def read_idempotency_key(backfill_id: str, record_pk: str) -> str:
    return binascii.b2a_base64(f"{backfill_id}:{record_pk}".encode(), newline=False).decode()


def idempotency_key(m: QueuedMessage) -> str:
    if m.action == "read" and m.backfill_id is not None:
        return read_idempotency_key(m.backfill_id, m.record_pk or "")
    return change_idempotency_key(m.commit_lsn, m.commit_idx)


def _fragment(text: str | None) -> orjson.Fragment | None:
    return orjson.Fragment(text) if text is not None else None


@dataclass(frozen=True)
class RenderContext:
    """What every message of a sink shares: consumer and database metadata, body shape."""

    consumer: orjson.Fragment
    database: orjson.Fragment
    database_name: str
    batch: bool

    @classmethod
    def for_sink(cls, sink: Sink, source: Source) -> RenderContext:
        consumer = {"id": str(sink.id), "name": sink.name, "annotations": sink.annotations}
        database = {"id": str(source.id), "name": source.name, "annotations": source.annotations,
                    "database": source.database, "hostname": source.hostname}
        return cls(orjson.Fragment(dumps(consumer)), orjson.Fragment(dumps(database)),
                   source.name, sink.batch)


def render_message(m: QueuedMessage, ctx: RenderContext) -> dict[str, Any]:
    """One message as a dict ready for orjson (jsonb parts as fragments)."""
    return {
        "record": _fragment(m.record),
        "changes": _fragment(m.changes),
        "action": m.action,
        "metadata": {
            "table_schema": m.table_schema,
            "table_name": m.table_name,
            "idempotency_key": idempotency_key(m),
            "commit_timestamp": m.commit_timestamp,
            "commit_lsn": m.commit_lsn,
            "commit_idx": m.commit_idx,
            "database_name": ctx.database_name,
            "consumer": ctx.consumer,
            "database": ctx.database,
            "transaction_annotations": _fragment(m.transaction_annotations),
        },
    }


def render_body(messages: Sequence[QueuedMessage], ctx: RenderContext) -> bytes:
    """The request body: ``{"data": [...]}`` when batching, else the single message."""
    if not ctx.batch:
        if len(messages) != 1:
            raise ValueError(f"a sink with batch off sends one message per request, got {len(messages)}")
        return orjson.dumps(render_message(messages[0], ctx))
    return orjson.dumps({"data": [render_message(m, ctx) for m in messages]})


@dataclass(frozen=True)
class RequestTarget:
    """Where and how a sink's requests go."""

    url: str
    headers: Mapping[str, str]
    gzip: bool

    @classmethod
    def for_sink(cls, sink: Sink, endpoint: HttpEndpoint) -> RequestTarget:
        headers = dict(endpoint.all_headers())
        lower = {k.lower(): v for k, v in headers.items()}
        if "content-type" not in lower:
            headers["content-type"] = "application/json"
        gz = "gzip" in lower.get("content-encoding", "").lower()
        return cls(join_url(endpoint.url, sink.http_endpoint_path), headers, gz)

    def encode(self, body: bytes) -> bytes:
        return gzip.compress(body, compresslevel=5) if self.gzip else body


def join_url(base: str, path: str) -> str:
    """The endpoint URL with the sink's path appended (one slash between them)."""
    if not path:
        return base
    return base.rstrip("/") + "/" + path.lstrip("/")
