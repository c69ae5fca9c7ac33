"""The reader against a real server: what lands in pgsink.changes and pgsink.messages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from uuid import UUID

import psycopg
import pytest
from psycopg.pq import TransactionStatus

from pgsink.engine import model
from pgsink.engine.capture import ReaderSettings, SourceReader
from pgsink.engine.decode import RowChange
from pgsink.engine.ingest import (TX_COMPLETE, Batch, IngestBuffer, LeadershipLost, PendingChange, Position,
                                  TxFields, copy_relation_fields)

from tests.helpers import add_sink, add_source, fetchval, wait_for

FAST = ReaderSettings(flush_interval=0.005, status_interval=0.5, standby_poll=0.2, reconnect_min=0.1,
                      reconnect_max=1.0, config_poll=0.5)


async def _source(conn: psycopg.AsyncConnection, source_id: UUID) -> model.Source:
    return (await model.load_config(conn)).sources[source_id]


@asynccontextmanager
async def running_reader(dsn: str, source: model.Source,
                         settings: ReaderSettings = FAST) -> AsyncIterator[SourceReader]:
    reader = SourceReader(dsn, source, settings=settings)
    task = asyncio.create_task(reader.run())
    try:
        await wait_for(lambda: _leader(reader, task), timeout=20, what="reader to become active")
        yield reader
    finally:
        reader.stop()
        await asyncio.wait_for(task, 20)


async def _leader(reader: SourceReader, task: asyncio.Task[None]) -> bool:
    if task.done():
        task.result()  # surface the reader's error
    return reader.streaming.is_set()  # the slot exists from here on: nothing written later is missed


async def changes_count(conn: psycopg.AsyncConnection, n: int) -> bool:
    return await fetchval(conn, "select count(*) from pgsink.changes") >= n


@pytest.fixture
async def setup(aconn: psycopg.AsyncConnection, fresh_db: str) -> tuple[model.Source, UUID]:
    await aconn.execute("create table orders (id int primary key, status text, amount numeric, note text)")
    source_id = await add_source(aconn, fresh_db)
    sink_id = await add_sink(aconn, source_id)
    return await _source(aconn, source_id), sink_id


async def test_insert_update_delete_reach_log_and_queue(aconn: psycopg.AsyncConnection, fresh_db: str,
                                                        setup: tuple[model.Source, UUID]) -> None:
    source, sink_id = setup
    async with running_reader(fresh_db, source):
        async with aconn.transaction():
            await aconn.execute("insert into orders values (1, 'new', 10.50, 'a'), (2, 'new', 3, 'b')")
        await aconn.execute("update orders set status = 'paid' where id = 1")
        await aconn.execute("delete from orders where id = 2")
        await wait_for(lambda: changes_count(aconn, 4), what="4 changes")
    cur = await aconn.execute(
        "select action, record_pk, record, changes, commit_idx, source_table_schema, source_table_name"
        " from pgsink.changes order by commit_lsn, commit_idx")
    rows = await cur.fetchall()
    assert [(r[0], r[1]) for r in rows] == [("insert", "1"), ("insert", "2"), ("update", "1"), ("delete", "2")]
    assert rows[0][2] == {"id": 1, "status": "new", "amount": 10.50, "note": "a"}
    assert [r[4] for r in rows] == [0, 1, 0, 0]
    assert rows[2][3] is None  # default replica identity: old values unknown
    assert rows[3][2] == {"id": 2, "status": None, "amount": None, "note": None}
    assert all(r[5:] == ("public", "orders") for r in rows)
    cur = await aconn.execute("select group_key, action, lane from pgsink.messages where sink_id = %s order by id",
                              (sink_id,))
    msgs = await cur.fetchall()
    assert [(m[0], m[1]) for m in msgs] == [("public.orders:1", "insert"), ("public.orders:2", "insert"),
                                            ("public.orders:1", "update"), ("public.orders:2", "delete")]
    assert msgs[0][2] == msgs[2][2]  # a group lives in one lane
    # the state schema's own writes never enter the log
    assert await fetchval(aconn, "select count(*) from pgsink.changes where source_table_schema = 'pgsink'") == 0
    # the checkpoint says the last transaction is complete and the slot was acknowledged up to it
    ack = await fetchval(aconn, "select ack_lsn from pgsink.source_checkpoints")
    assert await fetchval(aconn, "select commit_idx from pgsink.source_checkpoints") == TX_COMPLETE
    confirmed = await fetchval(aconn, "select confirmed_flush_lsn - '0/0' from pg_replication_slots where slot_name = %s",
                               (source.slot_name,))
    assert int(confirmed) >= ack > 0


async def test_every_column_of_a_captured_change(aconn: psycopg.AsyncConnection, fresh_db: str,
                                                 setup: tuple[model.Source, UUID]) -> None:
    """The fields capture writes (binary COPY) against what the source says about the transaction."""
    source, sink_id = setup
    async with running_reader(fresh_db, source):
        before = await fetchval(aconn, "select (pg_current_wal_lsn() - '0/0')::bigint")
        async with aconn.transaction():
            await aconn.execute("select pg_logical_emit_message(true, 'pgsink:annotations', '{\"by\": \"é\"}')")
            await aconn.execute("insert into orders values (7, 'tab\there', 1e-3, null)")
            xid = await fetchval(aconn, "select pg_current_xact_id()::text::bigint % 4294967296")  # 32 bits, as sent
            started = await fetchval(aconn, "select clock_timestamp()")
        finished = await fetchval(aconn, "select clock_timestamp()")
        after = await fetchval(aconn, "select (pg_current_wal_lsn() - '0/0')::bigint")
        await wait_for(lambda: changes_count(aconn, 1), what="the insert")
    cur = await aconn.execute(
        "select source_id, commit_lsn, commit_idx, xid, committed_at, source_table_oid = 'orders'::regclass,"
        " source_table_schema, source_table_name, action, record_pk, record::text, changes,"
        " transaction_annotations from pgsink.changes")
    [row] = await cur.fetchall()
    assert row[0] == source.id and before < row[1] <= after and row[2] == 0 and row[3] == xid
    assert started <= row[4] <= finished and row[5]
    assert row[6:] == ("public", "orders", "insert", "7",
                       '{"id": 7, "note": null, "amount": 0.001, "status": "tab\\there"}', None, {"by": "é"})
    cur = await aconn.execute("select sink_id, lane, group_key, action, commit_lsn, commit_idx, committed_at"
                              " from pgsink.messages")
    [msg] = await cur.fetchall()
    lanes = await fetchval(aconn, "select lane_count from pgsink.sinks where id = %s", (sink_id,))
    assert msg[0] == sink_id and 0 <= msg[1] < lanes
    assert msg[2:] == ("public.orders:7", "insert", row[1], 0, row[4])


async def test_replica_identity_full_gives_old_values(aconn: psycopg.AsyncConnection, fresh_db: str,
                                                      setup: tuple[model.Source, UUID]) -> None:
    source, _ = setup
    await aconn.execute("alter table orders replica identity full")
    await aconn.execute("insert into orders values (1, 'new', 1, 'x')")  # before the slot exists
    async with running_reader(fresh_db, source):
        await aconn.execute("update orders set status = 'paid', amount = 2 where id = 1")
        await wait_for(lambda: changes_count(aconn, 1), what="the update")
    changes = await fetchval(aconn, "select changes from pgsink.changes where action = 'update'")
    assert changes == {"status": "new", "amount": 1}


async def test_sink_filters_tables_and_actions(aconn: psycopg.AsyncConnection, fresh_db: str,
                                               setup: tuple[model.Source, UUID]) -> None:
    source, all_sink = setup
    await aconn.execute("create table other (id int primary key)")
    only_inserts = await add_sink(aconn, source.id, name="inserts", actions=["insert"],
                                  include_tables=["public.orders"])
    async with running_reader(fresh_db, source):
        await aconn.execute("insert into orders values (1, 'a', 1, '')")
        await aconn.execute("insert into other values (1)")
        await aconn.execute("delete from orders")
        await wait_for(lambda: changes_count(aconn, 3), what="3 changes")
    per_sink = dict(await (await aconn.execute(
        "select sink_id, count(*) from pgsink.messages group by sink_id")).fetchall())
    assert per_sink == {all_sink: 3, only_inserts: 1}


async def test_restart_resumes_without_duplicates(aconn: psycopg.AsyncConnection, fresh_db: str,
                                                  setup: tuple[model.Source, UUID]) -> None:
    source, _ = setup
    async with running_reader(fresh_db, source):
        await aconn.execute("insert into orders select g, 'a', g, '' from generate_series(1, 100) g")
        await wait_for(lambda: changes_count(aconn, 100), what="first 100")
    await aconn.execute("insert into orders select g, 'b', g, '' from generate_series(101, 150) g")
    async with running_reader(fresh_db, source):
        await wait_for(lambda: changes_count(aconn, 150), what="150 changes")
        await aconn.execute("insert into orders values (151, 'c', 0, '')")
        await wait_for(lambda: changes_count(aconn, 151), what="151 changes")
    assert await fetchval(aconn, "select count(distinct (commit_lsn, commit_idx)) from pgsink.changes") == 151
    assert await fetchval(aconn, "select count(*) from pgsink.messages") == 151


async def test_a_missing_message_partition_is_made_on_a_retry(aconn: psycopg.AsyncConnection, fresh_db: str,
                                                              setup: tuple[model.Source, UUID]) -> None:
    source, sink_id = setup
    async with running_reader(fresh_db, source):
        await aconn.execute("insert into orders values (1, 'a', 1, '')")
        await wait_for(lambda: changes_count(aconn, 1), what="the first change")
        # another writer (a backfill, a replay) took message ids far past the reader's spare partition
        await aconn.execute("select setval('pgsink.message_id_seq', 50000000)")
        await aconn.execute("insert into orders values (2, 'b', 2, '')")
        await wait_for(lambda: changes_count(aconn, 2), what="the second change, after a retry")
    ids = [r[0] for r in await (await aconn.execute(
        "select id from pgsink.messages where sink_id = %s order by id", (sink_id,))).fetchall()]
    assert len(ids) == 2 and ids[1] > 50_000_000


async def test_ddl_mid_stream(aconn: psycopg.AsyncConnection, fresh_db: str,
                              setup: tuple[model.Source, UUID]) -> None:
    source, _ = setup
    async with running_reader(fresh_db, source):
        await aconn.execute("insert into orders values (1, 'a', 1, 'n')")
        await aconn.execute("alter table orders add column extra jsonb")
        await aconn.execute("""insert into orders values (2, 'b', 2, 'n', '{"k": [1, 2]}')""")
        await aconn.execute("alter table orders drop column note")
        await aconn.execute("alter table orders rename column status to state")
        await aconn.execute("insert into orders values (3, 'c', 3, null)")
        await wait_for(lambda: changes_count(aconn, 3), what="3 changes")
    cur = await aconn.execute("select record from pgsink.changes order by commit_lsn")
    records = [r[0] for r in await cur.fetchall()]
    assert records == [
        {"id": 1, "status": "a", "amount": 1, "note": "n"},
        {"id": 2, "status": "b", "amount": 2, "note": "n", "extra": {"k": [1, 2]}},
        {"id": 3, "state": "c", "amount": 3, "extra": None},
    ]


async def test_partitioned_table_is_published_as_its_root(aconn: psycopg.AsyncConnection, fresh_db: str) -> None:
    await aconn.execute("create table events (id int, day date, primary key (id, day)) partition by range (day)")
    await aconn.execute("create table events_2024 partition of events for values from ('2024-01-01') to ('2025-01-01')")
    await aconn.execute("create table events_2025 partition of events for values from ('2025-01-01') to ('2026-01-01')")
    await aconn.execute("create publication pgsink_pub for all tables with (publish_via_partition_root = true)")
    source_id = await add_source(aconn, fresh_db)
    sink_id = await add_sink(aconn, source_id)
    async with running_reader(fresh_db, await _source(aconn, source_id)):
        await aconn.execute("insert into events values (1, '2024-05-01'), (2, '2025-05-01')")
        await wait_for(lambda: changes_count(aconn, 2), what="2 changes")
    cur = await aconn.execute("select source_table_name, record_pk from pgsink.changes order by commit_idx")
    assert await cur.fetchall() == [("events", "1,2024-05-01"), ("events", "2,2025-05-01")]
    assert await fetchval(aconn, "select count(*) from pgsink.messages where sink_id = %s", (sink_id,)) == 2


async def test_table_without_primary_key(aconn: psycopg.AsyncConnection, fresh_db: str,
                                         setup: tuple[model.Source, UUID]) -> None:
    source, sink_id = setup
    await aconn.execute("create table logs (line text)")
    await aconn.execute("alter table logs replica identity full")
    async with running_reader(fresh_db, source):
        await aconn.execute("insert into logs values ('a'), ('b')")
        await aconn.execute("update logs set line = 'c' where line = 'a'")
        await aconn.execute("delete from logs where line = 'b'")
        await wait_for(lambda: changes_count(aconn, 4), what="4 changes")
    cur = await aconn.execute("select action, record_pk, record, changes from pgsink.changes order by commit_lsn, commit_idx")
    rows = await cur.fetchall()
    assert [r[0] for r in rows] == ["insert", "insert", "update", "delete"]
    assert all(r[1] is None for r in rows)
    assert rows[2][2:] == ({"line": "c"}, {"line": "a"})
    assert rows[3][2] == {"line": "b"}
    # no primary key: the whole table is one group, so its changes stay in commit order
    keys = {r[0] for r in await (await aconn.execute(
        "select distinct group_key from pgsink.messages where sink_id = %s", (sink_id,))).fetchall()}
    assert keys == {"public.logs"}


async def test_unchanged_toast_is_filled_from_the_log(aconn: psycopg.AsyncConnection, fresh_db: str,
                                                      setup: tuple[model.Source, UUID]) -> None:
    source, _ = setup
    big = "x" * 100_000 + "end"  # compressed and toasted out of line
    await aconn.execute("alter table orders alter column note set storage external")
    async with running_reader(fresh_db, source):
        await aconn.execute("insert into orders values (1, 'a', 1, %s)", (big,))
        await wait_for(lambda: changes_count(aconn, 1), what="insert")
    async with running_reader(fresh_db, source):  # a restart: only the log knows the old value
        await aconn.execute("update orders set status = 'b' where id = 1")
        await aconn.execute("update orders set status = 'c' where id = 1")
        await wait_for(lambda: changes_count(aconn, 3), what="updates")
    cur = await aconn.execute("select record->>'status', length(record->>'note') from pgsink.changes order by commit_lsn")
    assert await cur.fetchall() == [("a", len(big)), ("b", len(big)), ("c", len(big))]


async def test_toast_values_filled_from_the_log_keep_their_digits_and_key_order(
        aconn: psycopg.AsyncConnection, fresh_db: str, setup: tuple[model.Source, UUID]) -> None:
    source, _ = setup
    await aconn.execute("create table docs (id int primary key, z_doc jsonb, a int)")
    await aconn.execute("alter table docs alter column z_doc set storage external")
    doc = '{"n": 1.50, "big": 12345678901234567890.10, "pad": "%s"}' % ("x" * 20_000)
    async with running_reader(fresh_db, source):
        await aconn.execute("insert into docs values (1, %s, 0)", (doc,))
        await wait_for(lambda: changes_count(aconn, 1), what="insert")
    async with running_reader(fresh_db, source):  # a restart: only the log knows the old value
        await aconn.execute("update docs set a = 1 where id = 1")
        await wait_for(lambda: changes_count(aconn, 2), what="update")
    cur = await aconn.execute("select record::text from pgsink.changes order by commit_lsn")
    [inserted, updated] = [r[0] for r in await cur.fetchall()]
    assert updated == inserted.replace('"a": 0', '"a": 1')  # 1.50 and the 22 digits kept
    assert '"n": 1.50' in updated and "12345678901234567890.10" in updated


async def test_transaction_annotations(aconn: psycopg.AsyncConnection, fresh_db: str,
                                       setup: tuple[model.Source, UUID]) -> None:
    source, _ = setup
    async with running_reader(fresh_db, source):
        async with aconn.transaction():
            await aconn.execute("""select pg_logical_emit_message(true, 'pgsink:annotations', '{"user": "ada"}')""")
            await aconn.execute("insert into orders values (1, 'a', 1, '')")
        await aconn.execute("insert into orders values (2, 'b', 1, '')")
        await wait_for(lambda: changes_count(aconn, 2), what="2 changes")
    cur = await aconn.execute("select record_pk, transaction_annotations from pgsink.changes order by commit_lsn")
    assert await cur.fetchall() == [("1", {"user": "ada"}), ("2", None)]


async def test_json_that_jsonb_refuses_does_not_stop_capture(
        aconn: psycopg.AsyncConnection, fresh_db: str, setup: tuple[model.Source, UUID]) -> None:
    """json (unlike jsonb) takes a \\u0000 escape, a lone surrogate, 1e200000; the retention log is
    jsonb. Such a value is kept as its text, and such annotations are ignored, instead of failing
    every capture write."""
    source, _ = setup
    await aconn.execute("create table docs (id int primary key, doc json, docs json[])")
    nul, odd = r'{"a": "x\u0000y"}', r'[1e200000, "\ud800"]'
    async with running_reader(fresh_db, source):
        async with aconn.transaction():
            await aconn.execute("select pg_logical_emit_message(true, 'pgsink:annotations', %s)", (nul,))
            await aconn.execute("insert into docs values (1, %s, array[%s, '{\"b\": 1}']::json[])", (nul, nul))
        await aconn.execute("""insert into docs values (2, '{"c": "\\\\u0000"}', null)""")  # an escaped backslash
        async with aconn.transaction():
            await aconn.execute("select pg_logical_emit_message(true, 'pgsink:annotations', %s)",
                                (r'{"s": "\ud800"}',))
            await aconn.execute("insert into docs values (3, %s, null)", (odd,))
        await wait_for(lambda: changes_count(aconn, 3), what="the three inserts")
    cur = await aconn.execute("select record, transaction_annotations from pgsink.changes order by commit_lsn")
    assert await cur.fetchall() == [
        ({"id": 1, "doc": nul, "docs": [nul, {"b": 1}]}, None),
        ({"id": 2, "doc": {"c": "\\u0000"}, "docs": None}, None),
        ({"id": 3, "doc": odd, "docs": None}, None)]


async def test_large_transaction_is_flushed_in_chunks(aconn: psycopg.AsyncConnection, fresh_db: str,
                                                      setup: tuple[model.Source, UUID]) -> None:
    """A transaction bigger than the buffer is written in chunks; the slot is acked only at its end."""
    source, _ = setup
    settings = ReaderSettings(flush_changes=1000, flush_interval=0.005, status_interval=0.2,
                              standby_poll=0.2, config_poll=0.5)
    async with running_reader(fresh_db, source, settings) as reader:
        await aconn.execute("insert into orders select g, 'x', g, '' from generate_series(1, 20000) g")
        await wait_for(lambda: changes_count(aconn, 20000), timeout=60, what="20k changes")
        assert reader.is_leader.is_set()
    ck = await (await aconn.execute("select commit_lsn, commit_idx, ack_lsn from pgsink.source_checkpoints")).fetchone()
    assert ck is not None and ck[1] == TX_COMPLETE
    assert await fetchval(aconn, "select count(*) from pgsink.messages") == 20000


async def test_idle_source_still_advances_the_slot(aconn: psycopg.AsyncConnection, fresh_db: str) -> None:
    await aconn.execute("create table watched (id int primary key)")
    await aconn.execute("create table unwatched (id int primary key)")
    await aconn.execute("create publication pgsink_pub for table watched")
    source_id = await add_source(aconn, fresh_db)
    source = await _source(aconn, source_id)
    async with running_reader(fresh_db, source):
        start = await fetchval(aconn, "select confirmed_flush_lsn from pg_replication_slots where slot_name = %s",
                               (source.slot_name,))
        await aconn.execute("insert into unwatched select generate_series(1, 1000)")
        end = await fetchval(aconn, "select pg_current_wal_lsn()")

        async def advanced() -> bool:
            now = await fetchval(aconn, "select confirmed_flush_lsn >= %s::pg_lsn from pg_replication_slots"
                                        " where slot_name = %s", (end, source.slot_name))
            return bool(now)

        await wait_for(advanced, timeout=30, what=f"slot to move past {end} (from {start})")
    assert await fetchval(aconn, "select count(*) from pgsink.changes") == 0


async def test_missing_publication_is_an_actionable_error(aconn: psycopg.AsyncConnection, fresh_db: str) -> None:
    from pgsink.engine.errors import SourceError
    from pgsink.engine.source import ensure_slot_and_publication

    source_id = await add_source(aconn, fresh_db, create=False, publication="nope")
    with pytest.raises(SourceError, match="nope"):
        await ensure_slot_and_publication(await _source(aconn, source_id))


async def test_pgoutput_and_wal2json_capture_identically(aconn: psycopg.AsyncConnection, fresh_db: str) -> None:
    """The same workload through both decoders gives the same retention rows."""
    await aconn.execute("create table t (id int primary key, n numeric, j jsonb, a text[], ts timestamptz, b bool)")
    await aconn.execute("alter table t replica identity full")
    pg_id = await add_source(aconn, fresh_db, name="pgoutput")
    wj_id = await add_source(aconn, fresh_db, name="wal2json", decoder="wal2json")
    sources = [await _source(aconn, pg_id), await _source(aconn, wj_id)]
    async with running_reader(fresh_db, sources[0]), running_reader(fresh_db, sources[1]):
        async with aconn.transaction():
            await aconn.execute("""select pg_logical_emit_message(true, 'pgsink:annotations', '{"by": "test"}')""")
            await aconn.execute("""insert into t values (1, 1.50, '{"x": [1, 2.0]}', '{"a,b", NULL}', '2024-01-02 03:04:05+02', true),
                                                        (2, 'NaN', null, '{}', null, false)""")
        await aconn.execute("update t set n = 2.25, a = array['q\"uote'] where id = 1")
        await aconn.execute("delete from t where id = 2")
        await wait_for(lambda: changes_count(aconn, 8), what="4 changes from each decoder")
    query = ("select commit_lsn, commit_idx, action, record_pk, record::text, changes::text,"
             " transaction_annotations::text from pgsink.changes where source_id = %s order by 1, 2")
    via_pgoutput = await (await aconn.execute(query, (pg_id,))).fetchall()
    via_wal2json = await (await aconn.execute(query, (wj_id,))).fetchall()
    assert len(via_pgoutput) == 4
    # wal2json 2.5 prints numeric NaN as null: compare the rest exactly
    assert [r for r in via_pgoutput if r[3] != "2"] == [r for r in via_wal2json if r[3] != "2"]
    assert [r[:4] for r in via_pgoutput] == [r[:4] for r in via_wal2json]


async def test_a_publication_name_with_capitals_streams(aconn: psycopg.AsyncConnection, fresh_db: str) -> None:
    """Created as "MyPub" (quoted); pgoutput folded the unquoted name to mypub and the reader retried forever."""
    await aconn.execute("create table shouty (id int primary key)")
    source_id = await add_source(aconn, fresh_db, publication="MyPub")
    await add_sink(aconn, source_id, name="s")
    source = await _source(aconn, source_id)
    async with running_reader(fresh_db, source):
        await aconn.execute("insert into shouty values (1)")
        await wait_for(lambda: changes_count(aconn, 1), what="the change")
    assert await fetchval(aconn, "select pubname from pg_publication") == "MyPub"


async def test_a_checkpoint_of_another_cluster_is_reset_not_obeyed(aconn: psycopg.AsyncConnection, fresh_db: str,
                                                                   setup: tuple[model.Source, UUID]) -> None:
    """A source re-pointed at another cluster kept its old checkpoint: every transaction below that LSN
    was skipped, on the server and in the reader, and lost without a word."""
    source, _ = setup
    async with running_reader(fresh_db, source):
        await aconn.execute("insert into orders values (1, 'a', 1, '')")
        await wait_for(lambda: changes_count(aconn, 1), what="the first change")
    system = await fetchval(aconn, "select system_identifier::text from pg_control_system()")
    assert await fetchval(aconn, "select system_identifier from pgsink.source_checkpoints") == system
    far = 1 << 40  # where the other cluster's WAL had got to
    await aconn.execute("update pgsink.source_checkpoints set system_identifier = '42', commit_lsn = %s,"
                        " ack_lsn = %s", (far, far))
    await aconn.execute("insert into orders values (2, 'b', 2, '')")
    async with running_reader(fresh_db, source):
        await wait_for(lambda: changes_count(aconn, 2), what="the change made after the move")
    assert await fetchval(aconn, "select system_identifier from pgsink.source_checkpoints") == system
    assert await fetchval(aconn, "select count(distinct (commit_lsn, commit_idx)) from pgsink.changes") == 2


async def test_a_capture_write_that_fails_leaves_no_transaction_open(
        aconn: psycopg.AsyncConnection, fresh_db: str, setup: tuple[model.Source, UUID]) -> None:
    """A failed fence (another reader wrote) rolls the capture transaction back, releasing the
    sink's enqueue lock at once, and the connection goes on writing."""
    source, sink_id = setup
    await aconn.execute("insert into pgsink.source_checkpoints (source_id, commit_lsn, commit_idx)"
                        " values (%s, 100, %s)", (source.id, TX_COMPLETE))
    change = RowChange("insert", 1, "public", "orders", {"id": 1}, None, ("id",), ())
    stamp = datetime.now(UTC)

    def batch_after(checkpoint: Position) -> Batch:
        buffer = IngestBuffer(source.id, checkpoint, 0)
        buffer.add(PendingChange(0, TxFields.make(source.id, 200, 7, stamp), change,
                                 copy_relation_fields(1, "public", "orders", "insert"), "1",
                                 [(str(sink_id).encode(), 1, "public.orders:1")]))
        buffer.complete(200, 201)
        return buffer.detach()

    async with await psycopg.AsyncConnection.connect(fresh_db, autocommit=True) as conn:
        writer = IngestBuffer(source.id, Position(0, 0), 0)
        with pytest.raises(LeadershipLost):
            await writer.write(batch_after(Position(99, TX_COMPLETE)), conn)  # not the stored checkpoint
        assert conn.info.transaction_status == TransactionStatus.IDLE
        assert await fetchval(aconn, "select count(*) from pg_locks where locktype = 'advisory' and pid = %s",
                              (conn.info.backend_pid,)) == 0
        assert await writer.write(batch_after(Position(100, TX_COMPLETE)), conn) == 201  # usable, and it commits
        assert conn.info.transaction_status == TransactionStatus.IDLE
    assert await fetchval(aconn, "select count(*) from pgsink.messages where sink_id = %s", (sink_id,)) == 1
    assert await fetchval(aconn, "select commit_lsn from pgsink.source_checkpoints where source_id = %s",
                          (source.id,)) == 200
