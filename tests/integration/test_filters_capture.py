"""Filters at enqueue time, through the real reader: a change failing a sink's filters is not queued for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

import orjson
import psycopg

from tests.helpers import add_sink, add_source, fetchval, wait_for
from tests.integration.test_capture import _source, running_reader


async def _queued(conn: psycopg.AsyncConnection, sink_id: UUID) -> list[tuple[str, str]]:
    cur = await conn.execute(
        "select m.action, c.record_pk from pgsink.messages m join pgsink.changes c"
        " on (c.commit_lsn, c.commit_idx, c.committed_at) = (m.commit_lsn, m.commit_idx, m.committed_at)"
        " where m.sink_id = %s order by m.id", (sink_id,))
    return [(r[0], r[1]) for r in await cur.fetchall()]


async def test_column_sql_and_python_filters_decide_what_each_sink_queues(
        aconn: psycopg.AsyncConnection, fresh_db: str, tmp_path: Path) -> None:
    await aconn.execute("create table orders (id int primary key, status text, amount numeric, doc jsonb)")
    await aconn.execute("alter table orders replica identity full")
    source_id = await add_source(aconn, fresh_db)
    everything = await add_sink(aconn, source_id, name="all")
    by_column = await add_sink(aconn, source_id, name="col", filters=orjson.dumps([
        {"column_name": "status", "operator": "in", "comparison_value": ["paid", "shipped"]},
        {"column_name": "doc", "field_path": "address.city", "operator": "=", "comparison_value": "Paris",
         "field_type": "string"}]).decode())
    by_sql = await add_sink(aconn, source_id, name="sql",
                            filter_sql="amount > 100 and (action = 'insert' or changes ? 'status')")
    hook = tmp_path / "only_even.py"
    hook.write_text("def filter(action, record, changes, metadata):\n"
                    "    assert metadata['table_name'] == 'orders' and metadata['consumer']['name'] == 'py'\n"
                    "    return record['id'] % 2 == 0\n")
    by_python = await add_sink(aconn, source_id, name="py", filter_function=str(hook))
    failing = tmp_path / "raises.py"
    failing.write_text("def filter(action, record, changes, metadata):\n    raise ValueError('nope')\n")
    fail_open = await add_sink(aconn, source_id, name="fails", filter_function=str(failing))
    source = await _source(aconn, source_id)
    async with running_reader(fresh_db, source):
        await wait_for(lambda: fetchval(aconn, "select count(*) from pg_replication_slots where slot_name = %s"
                                        " and active", (source.slot_name,)), what="the slot to stream")
        await aconn.execute(
            "insert into orders values (1, 'paid', 150.5, '{\"address\": {\"city\": \"Paris\"}}'),"
            " (2, 'new', 99.99, '{\"address\": {\"city\": \"Paris\"}}'), (3, 'shipped', 500, '{}'), (4, 'paid', 101, null)")
        await aconn.execute("update orders set amount = 200 where id = 1")      # status unchanged
        await aconn.execute("update orders set status = 'paid' where id = 2")   # amount too small
        await aconn.execute("update orders set status = 'shipped' where id = 4")
        await wait_for(lambda: _count(aconn, 7), what="7 changes")
    assert len(await _queued(aconn, everything)) == 7
    assert await _queued(aconn, by_column) == [("insert", "1"), ("update", "1"), ("update", "2")]
    assert await _queued(aconn, by_sql) == [("insert", "1"), ("insert", "3"), ("insert", "4"), ("update", "4")]
    assert await _queued(aconn, by_python) == [("insert", "2"), ("insert", "4"), ("update", "2"), ("update", "4")]
    assert len(await _queued(aconn, fail_open)) == 7  # a raising filter never loses a change


async def _count(conn: psycopg.AsyncConnection, n: int) -> Any:
    return await fetchval(conn, "select count(*) from pgsink.changes") >= n



async def _queued_pk(conn: psycopg.AsyncConnection, sink_id: UUID, pk: str) -> bool | None:
    """None until the change of row ``pk`` is retained; then whether it was queued for the sink."""
    if not await fetchval(conn, "select count(*) from pgsink.changes where record_pk = %s", (pk,)):
        return None
    return pk in [p for _, p in await _queued(conn, sink_id)]


async def test_a_missing_filter_file_queues_everything_until_it_appears_and_a_hang_is_cut_off(
        aconn: psycopg.AsyncConnection, fresh_db: str, tmp_path: Path) -> None:
    await aconn.execute("create table orders (id int primary key)")
    source_id = await add_source(aconn, fresh_db)
    hook = tmp_path / "later.py"
    sink_id = await add_sink(aconn, source_id, name="later", filter_function=str(hook), function_timeout_ms=100)
    source = await _source(aconn, source_id)
    async with running_reader(fresh_db, source):
        await wait_for(lambda: fetchval(aconn, "select count(*) from pg_replication_slots where slot_name = %s"
                                        " and active", (source.slot_name,)), what="the slot to stream")
        await aconn.execute("insert into orders values (1)")
        assert await wait_for(lambda: _queued_pk(aconn, sink_id, "1"), what="row 1") is True  # fails open
        hook.write_text("def filter(action, record, changes, metadata):\n"
                        "    while record['id'] == 3:\n        pass\n"
                        "    return record['id'] % 2 == 0\n")
        marker = 101
        while True:  # odd rows are queued until the reader picks the file up (at a config poll)
            await aconn.execute("insert into orders values (%s)", (marker,))
            if not await wait_for(lambda: _is_known(aconn, sink_id, str(marker)), what=f"row {marker}") - 1:
                break
            marker += 2
            assert marker < 400, "the filter file was never picked up"
        await aconn.execute("insert into orders values (3), (4), (5)")
        await wait_for(lambda: _is_known(aconn, sink_id, "5"), what="row 5")
    queued = [pk for _, pk in await _queued(aconn, sink_id)]
    assert "1" in queued and str(marker) not in queued
    assert "3" in queued and "4" in queued and "5" not in queued  # the hanging call was cut off: queued anyway


async def _is_known(conn: psycopg.AsyncConnection, sink_id: UUID, pk: str) -> int:
    """0 while row ``pk`` is not retained; 2 when it was queued for the sink, 1 when filtered out."""
    state = await _queued_pk(conn, sink_id, pk)
    return 0 if state is None else 2 if state else 1


async def test_a_column_filter_that_raises_unexpectedly_keeps_the_change_and_capture_goes_on(
        aconn: psycopg.AsyncConnection, fresh_db: str, monkeypatch: Any) -> None:
    """Not only a user function: any error while judging a change keeps it (it used to stop the reader)."""
    from pgsink.engine import filters

    real = filters.plain

    def plain(value: Any) -> Any:
        if value == 3:
            raise ArithmeticError("a bug in a comparison")
        return real(value)

    monkeypatch.setattr(filters, "plain", plain)
    await aconn.execute("create table orders (id int primary key)")
    source_id = await add_source(aconn, fresh_db)
    sink_id = await add_sink(aconn, source_id, name="col", filters=orjson.dumps(
        [{"column_name": "id", "operator": "=", "comparison_value": 2}]).decode())
    source = await _source(aconn, source_id)
    async with running_reader(fresh_db, source):
        await aconn.execute("insert into orders values (1), (2), (3), (4)")
        await wait_for(lambda: _count(aconn, 4), what="4 changes")
    assert await _queued(aconn, sink_id) == [("insert", "2"), ("insert", "3")]
