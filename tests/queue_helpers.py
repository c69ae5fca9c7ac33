"""Test helpers for the queue: config rows, enqueueing as capture does, worker processes.

``enqueue_changes`` follows the capture contract exactly (see engine/queue.py):
partitions first in their own transaction; then, in one transaction, the
per-sink enqueue lock, change rows, message rows with ids taken after the
lock, NOTIFY pgsink_messages with the sink id, commit. So these tests do not
depend on the capture code.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import orjson
import psycopg

from pgsink.engine.queue import lane_for


@dataclass
class Row:
    """One change to enqueue. ``group_key`` defaults to ``record_pk`` (the PK, comma-joined)."""

    record: dict[str, Any]
    record_pk: str
    action: str = "insert"
    changes: dict[str, Any] | None = None
    table_schema: str = "public"
    table_name: str = "orders"
    transaction_annotations: dict[str, Any] | None = None
    group_key: str | None = field(default=None)
    record_json: str | None = None  # raw jsonb text, to test exact digits


@dataclass(frozen=True)
class SinkRefs:
    source_id: UUID
    endpoint_id: UUID
    sink_id: UUID


async def create_sink(conn: psycopg.AsyncConnection, url: str, *, name: str = "orders_webhook",
                      source_name: str = "app", endpoint_headers: dict[str, str] | None = None,
                      source_annotations: dict[str, Any] | None = None, **sink_cols: Any) -> SinkRefs:
    """Insert a source, an HTTP endpoint and a sink (columns of pgsink.sinks as keywords)."""
    cur = await conn.execute(
        "insert into pgsink.sources (name, hostname, database, username, slot_name, publication_name, annotations)"
        " values (%s, 'db.example.com', 'appdb', 'postgres', 'pgsink_slot', 'pgsink_pub', %s)"
        " on conflict (name) do update set name = excluded.name returning id",
        (source_name, orjson.dumps(source_annotations or {}).decode()))
    source_id = (await cur.fetchone())[0]  # type: ignore[index]
    cur = await conn.execute(
        "insert into pgsink.http_endpoints (name, url, headers) values (%s, %s, %s) returning id",
        (f"{name}_endpoint", url, orjson.dumps(endpoint_headers or {}).decode()))
    endpoint_id = (await cur.fetchone())[0]  # type: ignore[index]
    cols = {"name": name, "source_id": source_id, "http_endpoint_id": endpoint_id, **sink_cols}
    for k in ("annotations", "table_options"):
        if k in cols and not isinstance(cols[k], str):
            cols[k] = orjson.dumps(cols[k]).decode()
    names = ", ".join(cols)
    marks = ", ".join(["%s"] * len(cols))
    cur = await conn.execute(f"insert into pgsink.sinks ({names}) values ({marks}) returning id",  # type: ignore[arg-type]
                             list(cols.values()))
    sink_id = (await cur.fetchone())[0]  # type: ignore[index]
    return SinkRefs(source_id, endpoint_id, sink_id)


async def set_sink(conn: psycopg.AsyncConnection, sink_id: UUID, **cols: Any) -> None:
    """Update sink columns (bumps updated_at so workers reload)."""
    sets = ", ".join(f"{k} = %s" for k in cols)
    await conn.execute(f"update pgsink.sinks set {sets}, updated_at = clock_timestamp() where id = %s",  # type: ignore[arg-type]
                       [*cols.values(), sink_id])


async def _sink_info(conn: psycopg.AsyncConnection, sink_id: UUID) -> tuple[UUID, int, bool]:
    cur = await conn.execute("select source_id, lane_count, message_grouping from pgsink.sinks where id = %s",
                             (sink_id,))
    row = await cur.fetchone()
    assert row is not None, f"no sink {sink_id}"
    return row[0], row[1], row[2]


async def _ensure_partitions(conn: psycopg.AsyncConnection, n: int, when: datetime) -> None:
    cur = await conn.execute("select last_value from pgsink.message_id_seq")
    last = (await cur.fetchone())[0]  # type: ignore[index]
    async with conn.transaction():
        await conn.execute("select pgsink.ensure_partitions(%s, %s, %s, %s)", (when, when, last, last + n + 1))


async def enqueue_changes(conn: psycopg.AsyncConnection, sink_id: UUID, rows: Sequence[Row],
                          *, committed_at: datetime | None = None) -> list[int]:
    """Enqueue changes for one sink as one source transaction; returns the message ids."""
    if not rows:
        return []
    source_id, lane_count, grouping = await _sink_info(conn, sink_id)
    when = committed_at or datetime.now(UTC)
    await _ensure_partitions(conn, len(rows), when)
    async with conn.transaction():
        await conn.execute("select pgsink.lock_sinks_for_enqueue(array[%s]::uuid[])", (sink_id,))
        cur = await conn.execute(
            "select coalesce(max(commit_lsn), 0) + 1000 from pgsink.changes where source_id = %s", (source_id,))
        lsn = (await cur.fetchone())[0]  # type: ignore[index]
        cur = await conn.execute(
            "select nextval('pgsink.message_id_seq') from generate_series(1, %s)", (len(rows),))
        ids = [r[0] for r in await cur.fetchall()]
        keys = [(r.group_key if r.group_key is not None else r.record_pk) if grouping else None for r in rows]
        lanes = [lane_for(k, lane_count) if k is not None else i % lane_count for k, i in zip(keys, ids, strict=True)]
        await conn.execute(
            """
            insert into pgsink.changes (source_id, commit_lsn, commit_idx, xid, committed_at, source_table_oid,
                source_table_schema, source_table_name, action, record_pk, record, changes, transaction_annotations)
            select %(source_id)s, %(lsn)s, x.idx, 777, %(when)s, 16384, x.sch, x.tbl, x.action, x.pk,
                   x.record::jsonb, x.changes::jsonb, x.ann::jsonb
            from unnest(%(idx)s::int[], %(sch)s::text[], %(tbl)s::text[], %(action)s::text[], %(pk)s::text[],
                        %(record)s::text[], %(changes)s::text[], %(ann)s::text[])
                 as x(idx, sch, tbl, action, pk, record, changes, ann)
            """,
            {"source_id": source_id, "lsn": lsn, "when": when,
             "idx": list(range(len(rows))), "sch": [r.table_schema for r in rows],
             "tbl": [r.table_name for r in rows], "action": [r.action for r in rows],
             "pk": [r.record_pk for r in rows],
             "record": [r.record_json or orjson.dumps(r.record).decode() for r in rows],
             "changes": [orjson.dumps(r.changes).decode() if r.changes is not None else None for r in rows],
             "ann": [orjson.dumps(r.transaction_annotations).decode() if r.transaction_annotations is not None
                     else None for r in rows]})
        await conn.execute(
            """
            insert into pgsink.messages (id, sink_id, lane, group_key, action, commit_lsn, commit_idx, committed_at)
            select x.id, %(sink_id)s, x.lane, x.gk, x.action, %(lsn)s, x.idx, %(when)s
            from unnest(%(ids)s::bigint[], %(lanes)s::smallint[], %(gk)s::text[], %(action)s::text[], %(idx)s::int[])
                 as x(id, lane, gk, action, idx)
            """,
            {"sink_id": sink_id, "lsn": lsn, "when": when, "ids": ids, "lanes": lanes, "gk": keys,
             "action": [r.action for r in rows], "idx": list(range(len(rows)))})
        await conn.execute("select pg_notify('pgsink_messages', %s)", (str(sink_id),))
    return ids


async def enqueue_reads(conn: psycopg.AsyncConnection, sink_id: UUID, backfill_id: str, table: tuple[str, str],
                        records: Sequence[tuple[str, dict[str, Any]]], *, read_at: datetime | None = None) -> list[int]:
    """Enqueue backfill ``read`` messages: (record_pk, record) pairs; the payload carries the row."""
    _, lane_count, grouping = await _sink_info(conn, sink_id)
    when = read_at or datetime.now(UTC)
    await _ensure_partitions(conn, len(records), when)
    async with conn.transaction():
        await conn.execute("select pgsink.lock_sinks_for_enqueue(array[%s]::uuid[])", (sink_id,))
        ids: list[int] = []
        for pk, record in records:
            cur = await conn.execute("select nextval('pgsink.message_id_seq')")
            mid = (await cur.fetchone())[0]  # type: ignore[index]
            key = pk if grouping else None
            payload = {"backfill_id": backfill_id, "table_schema": table[0], "table_name": table[1],
                       "record_pk": pk, "record": record}
            await conn.execute(
                "insert into pgsink.messages (id, sink_id, lane, group_key, action, commit_lsn, commit_idx,"
                " committed_at, payload) values (%s, %s, %s, %s, 'read', 0, 0, %s, %s)",
                (mid, sink_id, lane_for(key, lane_count) if key is not None else mid % lane_count, key, when,
                 orjson.dumps(payload).decode()))
            ids.append(mid)
        await conn.execute("select pg_notify('pgsink_messages', %s)", (str(sink_id),))
    return ids


async def wait_for(check: Callable[[], Awaitable[bool]], *, timeout: float = 20.0, what: str = "",
                   interval: float = 0.05) -> None:
    """Poll an async condition until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check!r}")
        await asyncio.sleep(interval)  # ok-sleep: poll interval of a deadline-bounded wait


async def scalar(conn: psycopg.AsyncConnection, query: str, *params: Any) -> Any:
    cur = await conn.execute(query, params or None)  # type: ignore[arg-type]
    row = await cur.fetchone()
    return row[0] if row else None


# ---------------------------------------------------------------- worker processes

_WORKER = """
import asyncio, json, logging, signal, sys
from pgsink.engine.deliver import DeliveryStage
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
args = json.loads(sys.argv[1])
async def main():
    stage = DeliveryStage(args.pop("dsn"), **args)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stage.stop)
    await stage.run()
asyncio.run(main())
"""


async def spawn_worker(dsn: str, worker_id: str, **stage_kwargs: Any) -> asyncio.subprocess.Process:
    """A DeliveryStage in its own process (``python -c``); stop with SIGTERM, or kill -9."""
    args = json.dumps({"dsn": dsn, "worker_id": worker_id, **stage_kwargs})
    return await asyncio.create_subprocess_exec(sys.executable, "-c", _WORKER, args, env=dict(os.environ))


async def stop_worker(proc: asyncio.subprocess.Process, *, timeout: float = 20.0) -> int:
    """SIGTERM, wait for a clean exit (kill after ``timeout``); returns the exit code."""
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode
