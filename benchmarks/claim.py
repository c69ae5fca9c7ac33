"""Claim-cost benchmark (invariant 6): lease + read + ack of one lane batch.

Measures the median time of one claim cycle (lease a lane with SKIP LOCKED,
read the next 100 messages after its cursor, advance the cursor with the
attempt row) in three queue states of the same database:

- small: 50k pending messages (what 300 cycles of 100 need, with room);
- deep: 1M pending messages;
- parked: the deep queue plus one failing group with 100k parked messages
  (the parked-group lease is timed too).

No HTTP: this isolates the queue. Invariant 6 asks deep and parked to stay
within 2x of small.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import psycopg

from pgsink.engine import queue as q
from pgsink.engine.embedded import EmbeddedPostgres
from pgsink.engine.migrate import migrate

from .common import save

LANES = 16  # the default lane count (migration 0004); the 2026-11-27 first-session runs used 64
BATCH = 100
CYCLES = 300

FILL_CHANGES = """
insert into pgsink.changes (source_id, commit_lsn, commit_idx, xid, committed_at, source_table_oid,
    source_table_schema, source_table_name, action, record_pk, record)
select %(source)s, g, 0, g, %(ts)s, 1, 'public', 'benchmark_records', 'insert', g::text,
       jsonb_build_object('id', g, 'string_field', md5(g::text))
from generate_series(%(lo)s::bigint, %(hi)s::bigint) g
"""

FILL_MESSAGES = """
insert into pgsink.messages (id, sink_id, lane, group_key, action, commit_lsn, commit_idx, committed_at)
select g, %(sink)s, pgsink.lane_for('public.benchmark_records:' || g, %(lanes)s),
       'public.benchmark_records:' || g, 'insert', g, 0, %(ts)s
from generate_series(%(lo)s::bigint, %(hi)s::bigint) g
"""

PARK_GROUP = """
insert into pgsink.parked_groups (sink_id, group_key, lane, attempts, next_attempt_at)
values (%(sink)s, 'public.benchmark_records:failing', 0, 5, now())
"""

PARK_MESSAGES = """
insert into pgsink.parked_messages (sink_id, id, lane, group_key, action, commit_lsn, commit_idx, committed_at)
select %(sink)s, 5000000 + g, 0, 'public.benchmark_records:failing', 'insert', g, 0, %(ts)s
from generate_series(1, 100000) g
"""


async def _fill(conn: psycopg.AsyncConnection, source: uuid.UUID, sink: uuid.UUID, lo: int, hi: int) -> None:
    ts = datetime.now(timezone.utc)
    await conn.execute("select pgsink.ensure_partitions(%s, %s, %s, %s)", (ts, ts, lo, hi + 1))
    for start in range(lo, hi + 1, 200_000):
        end = min(start + 199_999, hi)
        args = {"source": source, "sink": sink, "ts": ts, "lo": start, "hi": end, "lanes": LANES}
        await conn.execute(FILL_CHANGES, args)
        await conn.execute(FILL_MESSAGES, args)
    await conn.execute("analyze pgsink.messages")
    await conn.execute("analyze pgsink.changes")


async def _cycles(conn: psycopg.AsyncConnection, source: uuid.UUID, sink: uuid.UUID) -> list[float]:
    times = []
    owner = "bench"
    for _ in range(CYCLES):
        t = time.perf_counter()
        leases = await q.lease_lanes(conn, sink_id=sink, lane_count=LANES, batch_size=BATCH,
                                     max_ack_pending=1_000_000, owner=owner, max_lanes=1, lease_seconds=30)
        if not leases:
            raise RuntimeError("no lane with work: the queue ran dry")
        lease = leases[0]
        batch = await q.read_lane_batch(conn, sink_id=sink, source_id=source, lane=lease.lane,
                                        after_id=lease.delivered_id, limit=BATCH)
        if not batch:
            raise RuntimeError(f"leased lane {lease.lane} has no messages after {lease.delivered_id}")
        attempt = q.Attempt([m.id for m in batch], datetime.now(timezone.utc), 1, 200, "ok", None, True)
        await q.ack_lane(conn, lease, owner, last_id=batch[-1].id, attempt=attempt)
        times.append(time.perf_counter() - t)
    return times


async def _parked_leases(conn: psycopg.AsyncConnection, sink: uuid.UUID) -> list[float]:
    times = []
    for _ in range(CYCLES):
        t = time.perf_counter()
        async with conn.transaction():
            await q.lease_parked_groups(conn, sink_id=sink, batch_size=BATCH, max_ack_pending=1_000_000,
                                        owner="bench", max_groups=1, lease_seconds=30)
            raise_rollback = psycopg.Rollback()
            raise raise_rollback
        times.append(time.perf_counter() - t)
    return times


def _ms(times: list[float]) -> float:
    return round(statistics.median(times) * 1000, 3)


async def run() -> dict[str, Any]:
    with EmbeddedPostgres(for_tests=False) as pg:
        dsn = pg.dsn()
        await migrate(dsn)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            source = (await (await conn.execute(
                "insert into pgsink.sources (name, hostname, database, username, slot_name, publication_name)"
                " values ('b', '127.0.0.1', 'postgres', 'postgres', 's', 'p') returning id")).fetchone())[0]  # type: ignore[index]
            ep = (await (await conn.execute("insert into pgsink.http_endpoints (name, url) values ('e', 'http://127.0.0.1:9')"
                                            " returning id")).fetchone())[0]  # type: ignore[index]
            sink = (await (await conn.execute(
                "insert into pgsink.sinks (name, source_id, http_endpoint_id, lane_count, batch_size)"
                " values ('b', %s, %s, %s, %s) returning id", (source, ep, LANES, BATCH))).fetchone())[0]  # type: ignore[index]
            await q.ensure_lanes(conn, sink, LANES)
            await _fill(conn, source, sink, 1, 50_000)
            small = await _cycles(conn, source, sink)
            await _fill(conn, source, sink, 50_001, 1_050_000)
            deep = await _cycles(conn, source, sink)
            await conn.execute(PARK_GROUP, {"sink": sink})
            await conn.execute(PARK_MESSAGES, {"sink": sink, "ts": datetime.now(timezone.utc)})
            await conn.execute("analyze pgsink.parked_messages")
            parked = await _cycles(conn, source, sink)
            parked_lease = await _parked_leases(conn, sink)
    result = {"cycles": CYCLES, "batch": BATCH, "lanes": LANES,
              "claim_ms_small_50k": _ms(small), "claim_ms_deep_1m": _ms(deep),
              "claim_ms_deep_plus_100k_parked": _ms(parked), "parked_group_lease_ms": _ms(parked_lease)}
    result["deep_over_small"] = round(result["claim_ms_deep_1m"] / result["claim_ms_small_50k"], 2)
    result["parked_over_small"] = round(result["claim_ms_deep_plus_100k_parked"] / result["claim_ms_small_50k"], 2)
    return result


def main() -> None:
    result = asyncio.run(run())
    print(result, "->", save("claim", result))
