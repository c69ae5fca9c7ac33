"""Backfills end to end: real source table, real delivery to a receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest

from pgsink.engine.backfill import BackfillStage, Snapshot, next_page_size
from pgsink.engine.capture import CaptureStage, ReaderSettings
from pgsink.engine.deliver import DeliveryStage
from tests.helpers import add_sink, add_source
from tests.queue_helpers import scalar, wait_for
from tests.receiver import Receiver, start_receiver

FAST = dict(poll_interval=0.1, backoff_base=0.05, backoff_cap=0.4, lease_seconds=5.0, shutdown_grace=5.0)
READER = ReaderSettings(flush_interval=0.005, status_interval=0.5, standby_poll=0.2, reconnect_min=0.1,
                        reconnect_max=1.0, config_poll=0.5)


@asynccontextmanager
async def stages(*running: Any) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(s.run()) for s in running]
    try:
        yield
    finally:
        for s in running:
            s.stop()
        for r in await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30):
            if isinstance(r, BaseException):
                raise r


def delivery(dsn: str) -> DeliveryStage:
    return DeliveryStage(dsn, worker_id="d", **FAST)  # type: ignore[arg-type]


def backfiller(dsn: str, name: str = "b", **kw: Any) -> BackfillStage:
    return BackfillStage(dsn, worker_id=name, poll_interval=0.1, **kw)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rcv = await start_receiver()
    yield rcv
    await rcv.close()


async def setup_table(conn: psycopg.AsyncConnection, dsn: str, url: str, rows: int, **sink: Any) -> Any:
    await conn.execute("create table items (id int primary key, n int not null, note text)")
    await conn.execute("insert into items select g, mod(g, 1000), 'row ' || g from generate_series(1, %s) g", (rows,))
    await conn.execute("create index on items (n, id)")  # a partial backfill pages by (sort column, pk)
    await conn.execute("analyze items")
    source_id = await add_source(conn, dsn, create=False, slot="unused")
    return await add_sink(conn, source_id, url=url, **{"batch_size": 100, **sink})


def reads(receiver: Receiver) -> list[dict[str, Any]]:
    return [m for m in receiver.delivered() if m["action"] == "read"]


async def test_full_backfill_delivers_every_row_once_as_read(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    await setup_table(aconn, fresh_db, receiver.url, 2500)
    bid = await scalar(aconn, "select pgsink.start_backfill('sink', 'items', p_page_size => 300)")
    async with stages(backfiller(fresh_db), delivery(fresh_db)):
        await receiver.wait_until(lambda: len(reads(receiver)) >= 2500, timeout=60, what="every row")
        await wait_for(lambda: scalar(aconn, "select state = 'completed' from pgsink.backfills"), what="done")
    got = reads(receiver)
    assert sorted(m["record"]["id"] for m in got) == list(range(1, 2501))
    first = next(m for m in got if m["record"]["id"] == 7)
    assert first["record"] == {"id": 7, "n": 7, "note": "row 7"}
    assert first["metadata"]["table_schema"] == "public" and first["metadata"]["table_name"] == "items"
    assert first["metadata"]["idempotency_key"] == base64.b64encode(f"{bid}:7".encode()).decode()
    assert first["changes"] is None
    progress = await (await aconn.execute(
        "select state, rows_done, rows_estimate, percent, rows_per_second > 0, eta_seconds"
        " from pgsink.backfill_progress")).fetchone()
    assert progress == ("completed", 2500, 2500, 100.0, True, None)
    # same group and lane as capture would give: "public.items:<pk>"
    assert await scalar(aconn, "select count(*) from pgsink.messages where group_key = 'public.items:' ||"
                               " (payload->>'record_pk') and lane = pgsink.lane_for(group_key, 16)") == 2500


async def test_a_new_backfill_wakes_an_idle_stage_at_once(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    await setup_table(aconn, fresh_db, receiver.url, 10)
    idle = backfiller(fresh_db)
    idle.poll_interval = 3600.0  # only the NOTIFY from pgsink.start_backfill can wake it in time
    async with stages(idle):
        await wait_for(lambda: scalar(aconn, "select count(*) = 1 from pg_stat_activity"
                                             " where query like 'listen %'"), what="listening")
        await aconn.execute("select pgsink.start_backfill('sink', 'items')")
        await wait_for(lambda: scalar(aconn, "select state = 'completed' from pgsink.backfills"), timeout=15,
                       what="the backfill, long before the next poll")


async def test_partial_backfill_starts_at_the_position(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    await setup_table(aconn, fresh_db, receiver.url, 3000)
    await aconn.execute("select pgsink.start_backfill('sink', 'public.items', 'n', '990', 50)")
    async with stages(backfiller(fresh_db), delivery(fresh_db)):
        await wait_for(lambda: scalar(aconn, "select state = 'completed' from pgsink.backfills"), what="done")
        await receiver.wait_until(lambda: len(reads(receiver)) >= 30, what="rows with n >= 990")
    got = reads(receiver)
    assert sorted(m["record"]["id"] for m in got) == sorted(i for i in range(1, 3001) if i % 1000 >= 990)
    assert len(got) == 30


async def test_a_stopped_backfill_resumes_from_its_cursor_without_duplicates(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    await setup_table(aconn, fresh_db, receiver.url, 3000)
    await aconn.execute("select pgsink.start_backfill('sink', 'items', p_page_size => 100)")
    first = backfiller(fresh_db, "first", max_page_size=100)
    async with stages(first):
        await wait_for(lambda: scalar(aconn, "select rows_done >= 500 from pgsink.backfills"), what="5 pages")
    done, cursor, owner = await (await aconn.execute(
        "select rows_done, cursor, lease_owner from pgsink.backfills")).fetchone()  # type: ignore[misc]
    assert done < 3000 and cursor == {"id": done} and owner is None
    # a worker that died mid-job: its lease expires and another takes over
    await aconn.execute("update pgsink.backfills set lease_owner = 'dead', lease_expires = now() - interval '1 s'")
    async with stages(backfiller(fresh_db, "second"), delivery(fresh_db)):
        await wait_for(lambda: scalar(aconn, "select state = 'completed' from pgsink.backfills"), what="done")
        await receiver.wait_until(lambda: len(reads(receiver)) >= 3000, what="every row")
    counts = Counter(m["record"]["id"] for m in reads(receiver))
    assert sorted(counts) == list(range(1, 3001)) and max(counts.values()) == 1


async def test_cancel_and_failures_are_recorded(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    await setup_table(aconn, fresh_db, receiver.url, 10)
    await aconn.execute("create table nokey (a int)")
    await aconn.execute("select pgsink.start_backfill('sink', 'nokey')")
    await aconn.execute("select pgsink.start_backfill('sink', 'missing')")
    cancelled = await scalar(aconn, "select pgsink.start_backfill('sink', 'items')")
    assert await scalar(aconn, "select pgsink.cancel_backfill(%s)", cancelled) is True
    assert await scalar(aconn, "select pgsink.cancel_backfill(%s)", cancelled) is None
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="both a sort column and a start position"):
        await aconn.execute("select pgsink.start_backfill('sink', 'items', 'n')")
    await aconn.execute("update pgsink.sinks set exclude_tables = '{public.secret}'")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="not one of the tables of sink 'sink'"):
        await aconn.execute("select pgsink.start_backfill('sink', 'secret')")
    async with stages(backfiller(fresh_db)):
        await wait_for(lambda: scalar(aconn, "select count(*) = 2 from pgsink.backfills where state = 'failed'"),
                       what="both failed")
    rows = await (await aconn.execute("select \"table\", state, error from pgsink.backfill_progress"
                                      " order by created_at")).fetchall()
    assert rows[0][:2] == ("public.nokey", "failed") and "has no primary key" in rows[0][2]
    assert rows[1][:2] == ("public.missing", "failed") and "does not exist" in rows[1][2]
    assert rows[2][:2] == ("public.items", "cancelled")
    assert await scalar(aconn, "select count(*) from pgsink.messages") == 0


async def test_reads_never_overwrite_newer_changes_under_concurrent_writes(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    """Invariant 5: hammer updates and deletes on the rows being backfilled; per row, the last
    message the receiver got is the row's final state (or its delete)."""
    await aconn.execute("create table items (id int primary key, n int not null, note text)")
    await aconn.execute("insert into items select g, 0, 'v0' from generate_series(1, 2000) g")
    await aconn.execute("create table marker (id int primary key)")
    source_id = await add_source(aconn, fresh_db)
    await add_sink(aconn, source_id, url=receiver.url, batch_size=50)
    capture = CaptureStage(fresh_db, settings=READER)
    async with stages(capture, delivery(fresh_db)):
        await wait_for(lambda: scalar(aconn, "select count(*) = 1 from pg_replication_slots where active"),
                       what="the reader to stream")
        await aconn.execute("select pgsink.start_backfill('sink', 'items', p_page_size => 100)")
        rng = random.Random(5)
        async with stages(backfiller(fresh_db, max_page_size=100)):
            async with await psycopg.AsyncConnection.connect(fresh_db, autocommit=True) as writer:
                for i in range(400):
                    ids = rng.sample(range(1, 2001), 5)
                    async with writer.transaction():
                        for rid in ids[:4]:
                            await writer.execute("update items set n = n + 1, note = %s where id = %s",
                                                 (f"v{i}", rid))
                        await writer.execute("delete from items where id = %s", (ids[4],))
                    if i % 50 == 0:
                        await asyncio.sleep(0.01)  # ok-sleep: let pages interleave with the writes
                await writer.execute("insert into marker values (1)")  # captured after every write above
            await wait_for(lambda: scalar(aconn, "select state = 'completed' from pgsink.backfills"),
                           timeout=60, what="the backfill")
        await wait_for(lambda: scalar(aconn, "select count(*) = 1 from pgsink.changes"
                                             " where source_table_name = 'marker'"), what="capture to catch up")
        final = {r[0]: r for r in await (await aconn.execute("select id, n, note from items")).fetchall()}
        changed = await scalar(aconn, "select count(*) from pgsink.changes")
        total = await scalar(aconn, "select count(*) from pgsink.messages")
        await receiver.wait_until(lambda: len(receiver.delivered()) >= total, timeout=60, what="everything")
    last: dict[int, dict[str, Any]] = {}
    for m in receiver.delivered():
        if m["metadata"]["table_name"] == "items":
            last[m["record"]["id"]] = m
    wrong = []
    for rid in range(1, 2001):
        m = last.get(rid)
        if rid in final:
            _, n, note = final[rid]
            if m is None or m["action"] == "delete" or (m["record"]["n"], m["record"]["note"]) != (n, note):
                wrong.append((rid, m and m["action"], m and m["record"], final[rid]))
        elif m is None or m["action"] != "delete":
            wrong.append((rid, m and m["action"], m and m["record"], "deleted"))
    assert not wrong, f"{len(wrong)} rows end in a stale state, e.g. {wrong[:3]}"
    assert changed >= 1000 and any(m["action"] == "read" for m in receiver.delivered())


class _UpdateAfterFirstPage(BackfillStage):
    """Updates a row of the first page after its snapshot and waits until capture logged the
    update, before the page is enqueued: the interleaving the superseded check is for."""

    def __init__(self, dsn: str, row_id: int) -> None:
        super().__init__(dsn, worker_id="b", poll_interval=0.1)
        self.row_id = row_id
        self.done = False

    async def _read_page(self, *args: Any, **kwargs: Any) -> Any:
        page = await super()._read_page(*args, **kwargs)
        if not self.done:
            self.done = True
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                await conn.execute("update items set note = 'changed' where id = %s", (self.row_id,))
                await wait_for(lambda: scalar(conn, "select count(*) = 1 from pgsink.changes"
                                                    " where action = 'update'"), what="capture of the update")
        return page


@pytest.mark.parametrize("sink", [{"actions": ["insert", "delete"]}, {"filters": [
    {"column_name": "note", "operator": "!=", "comparison_value": "changed"}]}], ids=["actions", "filter"])
async def test_a_change_the_sink_never_gets_does_not_drop_the_read(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver, sink: dict[str, Any]) -> None:
    await aconn.execute("create table items (id int primary key, n int not null, note text)")
    await aconn.execute("insert into items select g, 0, 'v0' from generate_series(1, 300) g")
    source_id = await add_source(aconn, fresh_db)
    columns = {k: json.dumps(v) if k == "filters" else v for k, v in sink.items()}
    await add_sink(aconn, source_id, url=receiver.url, batch_size=50, **columns)
    async with stages(CaptureStage(fresh_db, settings=READER), delivery(fresh_db)):
        await wait_for(lambda: scalar(aconn, "select count(*) = 1 from pg_replication_slots where active"),
                       what="the reader to stream")
        await aconn.execute("select pgsink.start_backfill('sink', 'items', p_page_size => 100)")
        async with stages(_UpdateAfterFirstPage(fresh_db, row_id=7)):
            await wait_for(lambda: scalar(aconn, "select state = 'completed' from pgsink.backfills"),
                           timeout=60, what="the backfill")
        await receiver.wait_until(lambda: len(reads(receiver)) >= 300, timeout=30, what="a read of every row")
    assert sorted(m["record"]["id"] for m in reads(receiver)) == list(range(1, 301))
    assert not [m for m in receiver.delivered() if m["action"] == "update"]  # the sink never took it


class _JudgeOutsideTheLock(_UpdateAfterFirstPage):
    """Notes, each time a captured change is judged against the sink's filters, whether the
    backfill holds the sink's enqueue lock (which capture waits for) at that moment."""

    def __init__(self, dsn: str, row_id: int) -> None:
        super().__init__(dsn, row_id)
        self.locked_while_judging: list[bool] = []
        self.state_pid = 0

    async def _enqueue(self, state: psycopg.AsyncConnection, *args: Any) -> None:
        self.state_pid = state.info.backend_pid
        await super()._enqueue(state, *args)

    def _was_sent(self, job: Any, change: Any) -> bool:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            held = conn.execute("select count(*) from pg_locks where locktype = 'advisory' and pid = %s",
                                (self.state_pid,)).fetchone()[0]  # type: ignore[index]
        self.locked_while_judging.append(held > 0)
        return super()._was_sent(job, change)


async def test_filters_judge_superseding_changes_outside_the_enqueue_lock(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    await aconn.execute("create table items (id int primary key, n int not null, note text)")
    await aconn.execute("insert into items select g, 0, 'v0' from generate_series(1, 300) g")
    source_id = await add_source(aconn, fresh_db)
    await add_sink(aconn, source_id, url=receiver.url, batch_size=50, filters=json.dumps(
        [{"column_name": "note", "operator": "!=", "comparison_value": "never"}]))
    stage = _JudgeOutsideTheLock(fresh_db, row_id=7)
    async with stages(CaptureStage(fresh_db, settings=READER), delivery(fresh_db)):
        await wait_for(lambda: scalar(aconn, "select count(*) = 1 from pg_replication_slots where active"),
                       what="the reader to stream")
        await aconn.execute("select pgsink.start_backfill('sink', 'items', p_page_size => 100)")
        async with stages(stage):
            await wait_for(lambda: scalar(aconn, "select state = 'completed' from pgsink.backfills"),
                           timeout=60, what="the backfill")
        await receiver.wait_until(lambda: len(reads(receiver)) >= 299, timeout=30, what="the reads")
        await receiver.wait_until(lambda: any(m["action"] == "update" for m in receiver.delivered()),
                                  timeout=30, what="the update")
    # the update passed the filter, so it superseded the read of row 7 (judged once, without the lock)
    assert sorted(m["record"]["id"] for m in reads(receiver)) == [i for i in range(1, 301) if i != 7]
    assert stage.locked_while_judging == [False]


def test_snapshot_visibility_with_32_bit_xids() -> None:
    s = Snapshot.parse("100:110:103,105")
    assert s.sees(99) and s.sees(104) and not s.sees(103) and not s.sees(110) and not s.sees(200)
    wrapped = Snapshot.parse(f"{(1 << 32) + 5}:{(1 << 32) + 10}:")
    assert wrapped.sees((1 << 32) - 3)  # before the wrap: an older transaction
    assert wrapped.sees(6) and not wrapped.sees(10) and not wrapped.sees(11)


def test_page_size_adapts_to_the_time_limit() -> None:
    assert next_page_size(1000, 1000, 3000, 5000, 10_000) == 500
    assert next_page_size(1000, 1000, 100, 5000, 10_000) == 2000
    assert next_page_size(8000, 8000, 100, 5000, 10_000) == 10_000
    assert next_page_size(1000, 1000, 1000, 5000, 10_000) == 1000
    assert next_page_size(15, 15, 4000, 5000, 10_000) == 10


async def test_a_read_record_is_the_same_json_as_a_captured_change(
        fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    await aconn.execute("create type mood as enum ('ok', 'meh')")
    await aconn.execute("create table typed (a numeric, b text, c timestamptz, d jsonb, e bytea, f int[],"
                        " g mood, h float8, primary key (b, a))")
    source_id = await add_source(aconn, fresh_db)
    await add_sink(aconn, source_id)
    async with stages(CaptureStage(fresh_db, settings=READER)):
        await wait_for(lambda: scalar(aconn, "select count(*) = 1 from pg_replication_slots where active"),
                       what="the reader to stream")
        await aconn.execute("insert into typed values (123.4500, 'x,y', '2026-11-27 10:00:00.5+02',"
                            " '{\"n\": 1.10}', '\\x00ff', '{1,2}', 'meh', 0.1)")
        await wait_for(lambda: scalar(aconn, "select count(*) = 1 from pgsink.changes"), what="the insert")
        await aconn.execute("select pgsink.start_backfill('sink', 'typed')")
        async with stages(backfiller(fresh_db)):
            await wait_for(lambda: scalar(aconn, "select state = 'completed' from pgsink.backfills"), what="done")
    change = await (await aconn.execute("select record::text, record_pk from pgsink.changes")).fetchone()
    read = await (await aconn.execute("select payload->'record', payload->>'record_pk', group_key"
                                      " from pgsink.messages where action = 'read'")).fetchone()
    captured = await (await aconn.execute("select group_key from pgsink.messages where action = 'insert'")).fetchone()
    assert change is not None and read is not None and captured is not None
    assert read[0] == json.loads(change[0])
    assert read[1] == change[1] == "x,y,123.4500"
    assert read[2] == captured[0]  # same group (and lane) as the row's changes


async def test_page_queries_are_index_range_scans_and_shrink_to_the_time_limit(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    """Bounded cost: a page costs the same wherever the cursor is (keyset on the key's index, no
    sort, no OFFSET); a page over max_page_ms is cut down until it fits."""
    from pgsink.engine.backfill import Job

    await setup_table(aconn, fresh_db, receiver.url, 60_000)
    stage = backfiller(fresh_db)
    for sort_column, start, cursor in ((None, None, '{"id": 30000}'), ("n", "500", None),
                                       ("n", "500", '{"n": 700, "id": 12700}')):
        job = Job(uuid.uuid4(), uuid.uuid4(), "public", "items", sort_column, start,
                  cursor, 0, None, 1000, 5000)
        keys = ["n", "id"] if sort_column else ["id"]
        queries = stage._page_query(job, keys, ["id", "n", "note"])
        query = queries["next"] if cursor else queries["first"]
        cur = await aconn.execute(psycopg.sql.SQL("explain ") + query,
                                  {"cursor": cursor, "start": start, "limit": 1000})
        plan = "\n".join(r[0] for r in await cur.fetchall())
        assert "Index Scan" in plan and "Sort" not in plan and "Seq Scan" not in plan, plan

    await aconn.execute("select pgsink.start_backfill('sink', 'items', p_page_size => 10000, p_max_page_ms => 4)")
    async with stages(backfiller(fresh_db)):
        await wait_for(lambda: scalar(aconn, "select state = 'completed' from pgsink.backfills"), timeout=60,
                       what="done")
    assert await scalar(aconn, "select count(distinct payload->>'record_pk') from pgsink.messages") == 60_000
    assert await scalar(aconn, "select page_size from pgsink.backfills") < 10_000


async def test_the_sink_filters_apply_to_reads(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    await setup_table(aconn, fresh_db, receiver.url, 3000,
                      filters=json.dumps([{"column_name": "n", "operator": ">=", "comparison_value": 995}]))
    await aconn.execute("select pgsink.start_backfill('sink', 'items', p_page_size => 500)")
    async with stages(backfiller(fresh_db)):
        await wait_for(lambda: scalar(aconn, "select state = 'completed' from pgsink.backfills"), what="done")
    assert await scalar(aconn, "select rows_done from pgsink.backfills") == 3000
    got = await rows_of(aconn, "select (payload->'record'->>'n')::int from pgsink.messages order by id")
    assert len(got) == 15 and all(n >= 995 for (n,) in got)


async def rows_of(conn: psycopg.AsyncConnection, query: str) -> list[tuple[Any, ...]]:
    return await (await conn.execute(query)).fetchall()  # type: ignore[arg-type]
