"""The maintenance stage: retention-log partitions, message partitions, attempts, pre-created days."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from pgsink.engine.maintenance import MaintenanceStage
from pgsink.engine.worker import build_stages
from tests.queue_helpers import Row, create_sink, enqueue_changes, scalar, wait_for


def day(d: datetime) -> str:
    return f"changes_{d:%Y%m%d}"


async def partitions(conn: psycopg.AsyncConnection, parent: str) -> set[str]:
    cur = await conn.execute("select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid"
                             " where i.inhparent = %s::regclass", (parent,))
    return {r[0] for r in await cur.fetchall()}


async def deliver_lane_up_to(conn: psycopg.AsyncConnection, sink_id: Any, last_id: int) -> None:
    """Move every lane's cursor as delivery would after delivering everything up to last_id."""
    await conn.execute("insert into pgsink.lanes (sink_id, lane) select %s, generate_series(0, lane_count - 1)"
                       " from pgsink.sinks where id = %s on conflict do nothing", (sink_id, sink_id))
    await conn.execute("update pgsink.lanes set delivered_id = greatest(delivered_id, %s) where sink_id = %s",
                       (last_id, sink_id))


async def park(conn: psycopg.AsyncConnection, sink_id: Any, message_id: int) -> None:
    """Park a message the way advance_lane does: a copy in parked_messages, then the cursor moves past it."""
    await conn.execute(
        "insert into pgsink.parked_messages (sink_id, id, lane, group_key, action, commit_lsn, commit_idx,"
        " committed_at, payload) select sink_id, id, lane, group_key, action, commit_lsn, commit_idx,"
        " committed_at, payload from pgsink.messages where sink_id = %s and id = %s", (sink_id, message_id))
    await conn.execute("insert into pgsink.parked_groups (sink_id, group_key, lane) select sink_id, group_key,"
                       " lane from pgsink.messages where id = %s", (message_id,))
    await conn.execute("update pgsink.lanes set delivered_id = greatest(delivered_id, %s) where sink_id = %s",
                       (message_id, sink_id))


async def test_old_day_partitions_go_unless_a_pending_or_parked_message_needs_them(
        fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    refs = await create_sink(aconn, "http://127.0.0.1:9/hook", lane_count=1)
    now = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    d10, d9, d8, d2 = (now - timedelta(days=n) for n in (10, 9, 8, 2))
    delivered = await enqueue_changes(aconn, refs.sink_id, [Row({"id": 2}, "2")], committed_at=d9)
    parked = await enqueue_changes(aconn, refs.sink_id, [Row({"id": 3}, "3")], committed_at=d8)
    pending = await enqueue_changes(aconn, refs.sink_id, [Row({"id": 1}, "1")], committed_at=d10)  # replayed
    await enqueue_changes(aconn, refs.sink_id, [Row({"id": 4}, "4")], committed_at=d2)
    await deliver_lane_up_to(aconn, refs.sink_id, delivered[0])
    await park(aconn, refs.sink_id, parked[0])  # the cursor moves past it; the d10 message stays pending

    stage = MaintenanceStage(fresh_db, grace=timedelta(0))
    report = await stage.run_once(now=now)
    assert report.ran
    assert report.changes_dropped == [day(d9)]
    assert sorted(report.changes_kept or []) == sorted([day(d10), day(d8)])
    left = await partitions(aconn, "pgsink.changes")
    assert {day(d10), day(d8), day(d2)} <= left and day(d9) not in left
    assert f"changes_{datetime.now(UTC) + timedelta(days=1):%Y%m%d}" in left  # tomorrow pre-created
    assert await scalar(aconn, "select count(*) from pgsink.changes") == 3

    # the parked message is delivered (its copy goes), the pending one too: both days can go
    await aconn.execute("delete from pgsink.parked_messages")
    await deliver_lane_up_to(aconn, refs.sink_id, pending[0])
    report = await stage.run_once(now=now)
    assert sorted(report.changes_dropped or []) == sorted([day(d10), day(d8)])
    # a discarded copy does not pin its change either; retention (7 days) keeps d2
    assert day(d2) in await partitions(aconn, "pgsink.changes")


async def test_retention_follows_the_longest_source_and_grace(
        fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    refs = await create_sink(aconn, "http://127.0.0.1:9/hook", lane_count=1)
    now = datetime.now(UTC)
    d3 = now - timedelta(days=3)
    ids = await enqueue_changes(aconn, refs.sink_id, [Row({"id": 1}, "1")], committed_at=d3)
    await deliver_lane_up_to(aconn, refs.sink_id, ids[0])
    await aconn.execute("update pgsink.sources set retention = interval '5 days'")
    assert (await MaintenanceStage(fresh_db).run_once()).changes_dropped == []
    # retention 0: only what pending deliveries need is kept
    await aconn.execute("update pgsink.sources set retention = interval '0'")
    assert (await MaintenanceStage(fresh_db).run_once()).changes_dropped == [day(d3)]
    # the retained log is still queryable and replay finds nothing there
    assert await scalar(aconn, "select pgsink.replay('orders_webhook', %s)", d3 - timedelta(days=1)) == 0
    # a retention set by hand past what dates hold keeps everything, and the pass still runs
    await enqueue_changes(aconn, refs.sink_id, [Row({"id": 2}, "2")], committed_at=d3)
    await aconn.execute("update pgsink.sources set retention = interval '1000000 days'")
    report = await MaintenanceStage(fresh_db).run_once()
    assert report.ran and report.changes_dropped == []


async def test_message_partitions_go_when_every_message_is_behind_its_cursor(
        fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    refs = await create_sink(aconn, "http://127.0.0.1:9/hook", lane_count=4)
    other = await create_sink(aconn, "http://127.0.0.1:9/other", name="other", lane_count=2)
    await aconn.execute("select setval('pgsink.message_id_seq', 999990)")
    first = await enqueue_changes(aconn, refs.sink_id, [Row({"id": i}, str(i)) for i in range(8)])
    second = await enqueue_changes(aconn, other.sink_id, [Row({"id": i}, str(i)) for i in range(8)])
    more = await enqueue_changes(aconn, refs.sink_id, [Row({"id": i}, str(i)) for i in range(10)])
    assert first[0] < 1_000_000 <= more[-1]
    assert await partitions(aconn, "pgsink.messages") == {"messages_000000000", "messages_000000001"}
    stage = MaintenanceStage(fresh_db)

    # nothing delivered: nothing dropped (sink "other" has no lane rows yet: cursor 0)
    await deliver_lane_up_to(aconn, refs.sink_id, more[-1])
    assert (await stage.run_once()).messages_dropped == []
    # "other" delivered but one of its messages parked (a copy): the partition can go
    await deliver_lane_up_to(aconn, other.sink_id, second[-1])
    await park(aconn, other.sink_id, second[3])
    assert (await stage.run_once()).messages_dropped == ["messages_000000000"]
    assert await scalar(aconn, "select count(*) from pgsink.parked_messages") == 1
    # the current partition (ids still handed out) stays even when all of it is delivered
    assert "messages_000000001" in await partitions(aconn, "pgsink.messages")
    assert await scalar(aconn, "select count(*) from pgsink.message_states where sink = 'other'") == 1


async def test_attempts_are_pruned_by_age_and_one_pass_runs_at_a_time(
        fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    refs = await create_sink(aconn, "http://127.0.0.1:9/hook", lane_count=1)
    await aconn.execute(
        "insert into pgsink.attempts (sink_id, lane, message_ids, started_at, duration_ms, delivered)"
        " select %s, 0, '{1}', now() - make_interval(days => d), 1, true from generate_series(0, 9) d",
        (refs.sink_id,))
    stage = MaintenanceStage(fresh_db, attempt_retention=timedelta(days=3, hours=12))
    async with await psycopg.AsyncConnection.connect(fresh_db, autocommit=True) as other:
        await other.execute("select pg_advisory_lock(hashtext('pgsink.maintenance'))")
        assert not (await stage.run_once()).ran  # another worker's pass is running
    report = await stage.run_once()
    assert report.attempts_deleted == 6
    assert await scalar(aconn, "select count(*) from pgsink.attempts") == 4


async def test_maintenance_is_a_worker_role_that_stops(fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    stages = build_stages(fresh_db, ["maintenance"], worker_id="m")
    stage = stages["maintenance"]
    assert isinstance(stage, MaintenanceStage)
    tomorrow = f"changes_{datetime.now(UTC) + timedelta(days=1):%Y%m%d}"
    task = asyncio.create_task(stage.run())
    await wait_for(lambda: _has_partition(aconn, tomorrow), what="tomorrow's partition")
    stage.stop()
    await asyncio.wait_for(task, 10)


async def _has_partition(conn: psycopg.AsyncConnection, name: str) -> bool:
    return name in await partitions(conn, "pgsink.changes")
