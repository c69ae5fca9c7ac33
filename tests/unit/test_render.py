"""Message JSON: Sequin's shape and key order, exact digits, idempotency keys, request target."""

from __future__ import annotations

import base64
import gzip
import json
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest

from pgsink.engine.model import HttpEndpoint, Sink, Source
from pgsink.engine.queue import QueuedMessage
from pgsink.engine.render import (
    RenderContext,
    RequestTarget,
    change_idempotency_key,
    join_url,
    read_idempotency_key,
    render_body,
)

SINK_ID = UUID("f47ac10b-58cc-4372-a567-0e02b2c3d479")
SOURCE_ID = UUID("12345678-9abc-def0-1234-56789abcdef0")


def make_source(**kw: Any) -> Source:
    base: dict[str, Any] = dict(
        id=SOURCE_ID, name="myapp-prod", hostname="db.example.com", port=5432, database="myapp",
        username="postgres", password=None, sslmode="prefer", slot_name="s", create_slot=False,
        publication_name="p", create_publication=False, publication_init_sql=None, decoder="pgoutput",
        retention_seconds=86400.0, annotations={"team": "data"})
    return Source(**{**base, **kw})


def make_sink(**kw: Any) -> Sink:
    base: dict[str, Any] = dict(
        id=SINK_ID, name="orders_webhook", source_id=SOURCE_ID, http_endpoint_id=UUID(int=7),
        http_endpoint_path="", status="active", include_schemas=None, exclude_schemas=None,
        include_tables=None, exclude_tables=None, actions=frozenset({"insert", "update", "delete"}),
        message_grouping=True, table_options=(), batch=True, batch_size=10, batch_timeout_ms=50,
        request_timeout_ms=30000, max_ack_pending=10000, max_retry_count=None,
        annotations={"my-custom-key": "my-custom-value"}, lane_count=64)
    return Sink(**{**base, **kw})


def change(**kw: Any) -> QueuedMessage:
    base: dict[str, Any] = dict(
        id=1, group_key="1234", action="update", commit_lsn=123456790, commit_idx=1,
        commit_timestamp="2024-10-28T21:39:21.127470Z", table_schema="public", table_name="orders",
        record='{"id": 1234, "price": 199.990, "status": "shipped", "tags": ["a", "b"], "meta": {"x": null}}',
        changes='{"status": "pending"}', transaction_annotations='{"username": "paul.atreides"}',
        backfill_id=None, record_pk="1234", group_parked=False, group_blocked=False, attempts=0)
    return QueuedMessage(**{**base, **kw})


CONSUMER = {"id": str(SINK_ID), "name": "orders_webhook", "annotations": {"my-custom-key": "my-custom-value"}}
DATABASE = {"id": str(SOURCE_ID), "name": "myapp-prod", "annotations": {"team": "data"},
            "database": "myapp", "hostname": "db.example.com"}

# Hand-written, in the key order of Sequin's docs/reference/messages.mdx.
GOLDEN_UPDATE = {
    "record": {"id": 1234, "price": Decimal("199.990"), "status": "shipped", "tags": ["a", "b"], "meta": {"x": None}},
    "changes": {"status": "pending"},
    "action": "update",
    "metadata": {
        "table_schema": "public",
        "table_name": "orders",
        "idempotency_key": base64.b64encode(b"123456790:1").decode(),
        "commit_timestamp": "2024-10-28T21:39:21.127470Z",
        "commit_lsn": 123456790,
        "commit_idx": 1,
        "database_name": "myapp-prod",
        "consumer": CONSUMER,
        "database": DATABASE,
        "transaction_annotations": {"username": "paul.atreides"},
    },
}

GOLDEN_INSERT = {
    "record": {"id": 7, "status": "pending"},
    "changes": None,
    "action": "insert",
    "metadata": {
        "table_schema": "public",
        "table_name": "orders",
        "idempotency_key": base64.b64encode(b"123456791:0").decode(),
        "commit_timestamp": "2024-10-28T21:40:00.000000Z",
        "commit_lsn": 123456791,
        "commit_idx": 0,
        "database_name": "myapp-prod",
        "consumer": CONSUMER,
        "database": DATABASE,
        "transaction_annotations": None,
    },
}


def decode(body: bytes) -> Any:
    """Parse keeping exact decimals; dicts keep key order."""
    return json.loads(body, parse_float=Decimal)


def key_orders(doc: Any, path: str = "$") -> dict[str, list[str]]:
    """Every object's keys, in order, by path: key order is part of the contract."""
    out: dict[str, list[str]] = {}
    if isinstance(doc, dict):
        out[path] = list(doc)
        for k, v in doc.items():
            out.update(key_orders(v, f"{path}.{k}"))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.update(key_orders(v, f"{path}[{i}]"))
    return out


def ctx(**sink_kw: Any) -> RenderContext:
    return RenderContext.for_sink(make_sink(**sink_kw), make_source())


def test_single_message_body_when_batch_is_off() -> None:
    body = render_body([change()], ctx(batch=False, batch_size=1))
    doc = decode(body)
    assert doc == GOLDEN_UPDATE
    assert key_orders(doc)["$"] == ["record", "changes", "action", "metadata"]
    assert key_orders(doc) == key_orders(GOLDEN_UPDATE)


def test_batched_body_wraps_messages_in_data() -> None:
    insert = change(id=2, group_key="7", action="insert", commit_lsn=123456791, commit_idx=0,
                    commit_timestamp="2024-10-28T21:40:00.000000Z", record='{"id": 7, "status": "pending"}',
                    changes=None, transaction_annotations=None, record_pk="7")
    body = render_body([change(), insert], ctx())
    doc = decode(body)
    assert doc == {"data": [GOLDEN_UPDATE, GOLDEN_INSERT]}
    assert key_orders(doc) == key_orders({"data": [GOLDEN_UPDATE, GOLDEN_INSERT]})


def test_batch_of_one_is_still_wrapped() -> None:
    assert decode(render_body([change()], ctx(batch_size=1))) == {"data": [GOLDEN_UPDATE]}


def test_batch_off_refuses_several_messages() -> None:
    with pytest.raises(ValueError, match="one message per request"):
        render_body([change(), change(id=2)], ctx(batch=False, batch_size=1))


def test_jsonb_text_is_spliced_verbatim_keeping_digits() -> None:
    body = render_body([change(record='{"big": 123456789012345678901234567890, "n": 1.10, "e": 1e-7}')], ctx())
    assert b'"record":{"big": 123456789012345678901234567890, "n": 1.10, "e": 1e-7}' in body


def test_read_message_uses_backfill_id_and_primary_key() -> None:
    read = change(action="read", changes=None, transaction_annotations=None, backfill_id="bf-1",
                  record_pk="1234", record='{"id": 1234}', commit_lsn=0, commit_idx=0)
    doc = decode(render_body([read], ctx(batch=False, batch_size=1)))
    assert doc["action"] == "read"
    assert doc["changes"] is None
    assert doc["metadata"]["idempotency_key"] == base64.b64encode(b"bf-1:1234").decode()
    assert doc["metadata"]["idempotency_key"] == read_idempotency_key("bf-1", "1234")


def test_change_idempotency_key_is_sequins() -> None:
    assert change_idempotency_key(123, 4) == base64.b64encode(b"123:4").decode() == "MTIzOjQ="


def test_request_target_headers_path_and_gzip() -> None:
    endpoint = HttpEndpoint(UUID(int=7), "ep", "https://hooks.example.com/base/", {"X-Static": "1"},
                            {"Authorization": "Bearer s3cret"})
    target = RequestTarget.for_sink(make_sink(http_endpoint_path="/orders"), endpoint)
    assert target.url == "https://hooks.example.com/base/orders"
    assert target.headers == {"X-Static": "1", "Authorization": "Bearer s3cret", "content-type": "application/json"}
    assert not target.gzip and target.encode(b"{}") == b"{}"
    gz = HttpEndpoint(UUID(int=8), "gz", "https://h.example.com", {"Content-Encoding": "gzip"}, {})
    gz_target = RequestTarget.for_sink(make_sink(), gz)
    assert gz_target.gzip and gzip.decompress(gz_target.encode(b'{"a":1}')) == b'{"a":1}'
    custom = HttpEndpoint(UUID(int=9), "ct", "https://h.example.com", {"Content-Type": "application/cloudevents+json"}, {})
    assert "content-type" not in RequestTarget.for_sink(make_sink(), custom).headers


@pytest.mark.parametrize(("base", "path", "url"), [
    ("https://a.example.com", "", "https://a.example.com"),
    ("https://a.example.com", "hook", "https://a.example.com/hook"),
    ("https://a.example.com/", "/hook", "https://a.example.com/hook"),
    ("https://a.example.com/v1", "hook/x", "https://a.example.com/v1/hook/x"),
])
def test_join_url(base: str, path: str, url: str) -> None:
    assert join_url(base, path) == url


def test_annotations_with_numbers_past_64_bits_render_exactly() -> None:
    """A YAML annotation like ``budget: 123456789012345678901234567890`` used to stop every delivery
    worker at config load (orjson refuses such ints)."""
    body = render_body([change()], ctx(annotations={"budget": 123456789012345678901234567890}))
    assert b'"annotations":{"budget":123456789012345678901234567890}' in body


def test_request_headers_merge_whatever_the_case_of_their_names() -> None:
    from pgsink.engine.deliver import merge_headers

    merged = merge_headers({"Webhook-Id": "mine", "X-Team": "a"}, (("x-team", "b"),), {"webhook-id": "ours"})
    assert merged == {"x-team": "b", "webhook-id": "ours"}  # one of each, the later layer's
