"""Enrichment: one read-only query per batch against the source, rows under metadata.enrichment."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgsink.engine import config as cfg
from pgsink.engine.enrichment import Enricher, check_sql
from pgsink.engine.errors import ConfigError
from tests.helpers import add_sink, add_source
from tests.integration.test_deliver import running, stage_for
from tests.queue_helpers import Row, enqueue_changes, scalar, wait_for
from tests.receiver import start_receiver

QUERY = ("select o.id, c.name, c.tier from orders o join customers c on c.id = o.customer_id"
         " where o.id = any($1::int[])")


async def test_enrichment_rows_are_merged_per_message_with_one_query_per_batch(
        fresh_db: str, aconn: psycopg.AsyncConnection, monkeypatch: pytest.MonkeyPatch) -> None:
    await aconn.execute("create table customers (id int primary key, name text, tier text)")
    await aconn.execute("create table orders (id int primary key, customer_id int)")
    await aconn.execute("insert into customers values (10, 'Ann', 'gold'), (20, 'Bob', 'basic')")
    await aconn.execute("insert into orders values (1, 10), (2, 20), (3, null)")
    calls: list[list[str]] = []
    real_fetch = Enricher.fetch

    async def counting(self: Enricher, keys: Any) -> dict[str, Any]:
        calls.append(list(keys))
        return await real_fetch(self, keys)

    monkeypatch.setattr(Enricher, "fetch", counting)
    rcv = await start_receiver()
    try:
        source_id = await add_source(aconn, fresh_db, create=False)
        sink_id = await add_sink(aconn, source_id, name="enriched", url=rcv.url, batch_size=10, batch_timeout_ms=200,
                                 lane_count=1, enrichment_sql=QUERY)
        await enqueue_changes(aconn, sink_id, [Row({"id": i}, str(i)) for i in (1, 2, 3)])
        async with running(stage_for(fresh_db)):
            await rcv.wait_until(lambda: len(rcv.delivered()) >= 3)
    finally:
        await rcv.close()
    assert [m["metadata"]["enrichment"] for m in rcv.delivered()] == [
        {"id": 1, "name": "Ann", "tier": "gold"}, {"id": 2, "name": "Bob", "tier": "basic"}, None]
    assert len(rcv.requests) == 1 and calls == [["1", "2", "3"]]  # one query for the batch


async def test_a_failing_enrichment_query_is_a_failed_attempt_not_a_crash(
        fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    rcv = await start_receiver()
    try:
        source_id = await add_source(aconn, fresh_db, create=False)
        sink_id = await add_sink(aconn, source_id, name="broken", url=rcv.url, lane_count=1,
                                 enrichment_sql="select id from no_such_table where id = any($1::int[])")
        await enqueue_changes(aconn, sink_id, [Row({"id": 1}, "1")])
        async with running(stage_for(fresh_db)):
            await wait_for(lambda: _failed(aconn, sink_id), what="a failed attempt")
    finally:
        await rcv.close()
    assert not rcv.requests
    error = await scalar(aconn, "select error from pgsink.attempts where sink_id = %s order by id limit 1", sink_id)
    assert "enrichment query failed" in error and "no_such_table" in error


async def test_enrichment_runs_read_only(fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    await aconn.execute("create table t (id int)")
    await aconn.execute("create function bump(x text[]) returns int language sql as 'insert into t values (1) returning 1'")
    source_id = await add_source(aconn, fresh_db, create=False)
    from pgsink.engine.model import load_config

    source = (await load_config(aconn)).sources[source_id]
    enricher = Enricher(source, "select bump($1::text[]) as id")
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        await enricher.fetch(["1"])
    await enricher.close()
    assert await scalar(aconn, "select count(*) from t") == 0


async def _failed(conn: psycopg.AsyncConnection, sink_id: Any) -> bool:
    return bool(await scalar(conn, "select count(*) from pgsink.attempts where sink_id = %s", sink_id))


@pytest.mark.parametrize(("query", "message"), [
    ("delete from orders where id = any($1)", "must be a single SELECT"),
    ("select 1", "must use $1"),
    ("select * from orders where id = any($1) and x = $2", "found $1, $2"),
    ("with d as (delete from orders returning id) select id from d where id = any($1)", "must not modify data"),
    ("select * from orders where id = any($1) for update", "FOR UPDATE"),
    ("select 1; select 2", "single SELECT"),
])
def test_enrichment_sql_validation(query: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("$", r"\$")):
        check_sql(query)


def test_yaml_enrichment() -> None:
    from tests.unit.test_filters import SINK

    d = cfg.parse_config(SINK % f"    enrichment:\n      sql: \"{QUERY}\"\n")
    assert d.sinks[0].enrichment_sql == QUERY
    with pytest.raises(ConfigError, match="enrichment: sql: must be a single SELECT"):
        cfg.parse_config(SINK % "    enrichment:\n      sql: delete from x\n", filename="sequin.yaml")


async def test_transforms_see_the_enrichment(fresh_db: str, aconn: psycopg.AsyncConnection, tmp_path: Any) -> None:
    await aconn.execute("create table customers (id int primary key, name text)")
    await aconn.execute("insert into customers values (5, 'Eve')")
    hook = tmp_path / "t.py"
    hook.write_text("def transform(action, record, changes, metadata):\n"
                    "    return {'id': record['id'], 'name': (metadata['enrichment'] or {}).get('name')}\n")
    rcv = await start_receiver()
    try:
        source_id = await add_source(aconn, fresh_db, create=False)
        sink_id = await add_sink(aconn, source_id, name="both", url=rcv.url, batch=False, lane_count=1,
                                 transform_function=str(hook),
                                 enrichment_sql="select id, name from customers where id = any($1::int[])")
        await enqueue_changes(aconn, sink_id, [Row({"id": 5}, "5"), Row({"id": 6}, "6")])
        async with running(stage_for(fresh_db)):
            await rcv.wait_until(lambda: len(rcv.delivered()) >= 2)
    finally:
        await rcv.close()
    assert sorted(rcv.delivered(), key=lambda b: b["id"]) == [{"id": 5, "name": "Eve"}, {"id": 6, "name": None}]


async def test_sink_test_shows_the_enrichment(fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    from pgsink.engine.sink_functions import try_sink

    await aconn.execute("create table customers (id int primary key, name text)")
    await aconn.execute("insert into customers values (5, 'Eve')")
    source_id = await add_source(aconn, fresh_db, create=False)
    sink_id = await add_sink(aconn, source_id, name="tried", lane_count=1,
                             enrichment_sql="select id, name from customers where id = any($1::int[])")
    await enqueue_changes(aconn, sink_id, [Row({"id": 5}, "5"), Row({"id": 6}, "6")])
    results = await try_sink(fresh_db, "tried")
    assert [r.body["metadata"]["enrichment"] for r in results] == [{"id": 5, "name": "Eve"}, None]
    await aconn.execute("drop table customers")
    with pytest.raises(ConfigError, match="enrichment query failed"):
        await try_sink(fresh_db, "tried")


async def test_an_enrichment_query_stuck_on_a_lock_is_cut_off_and_lanes_share_one_connection(
        fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    import asyncio

    from pgsink.engine.model import load_config

    await aconn.execute("create table orders (id int primary key, customer_id int)")
    await aconn.execute("insert into orders values (1, 10)")
    source_id = await add_source(aconn, fresh_db, create=False)
    source = (await load_config(aconn)).sources[source_id]
    enricher = Enricher(source, "select id, customer_id from orders where id = any($1::int[])", timeout_ms=300)
    try:
        rows = await asyncio.gather(*(enricher.fetch(["1"]) for _ in range(4)))
        assert all(r == {"1": {"id": 1, "customer_id": 10}} for r in rows)
        assert await scalar(aconn, "select count(*) from pg_stat_activity where query like %s",
                            "%row_to_json(pgsink_e)%") == 1
        locker = await psycopg.AsyncConnection.connect(fresh_db)
        try:
            await locker.execute("lock table orders in access exclusive mode")
            with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
                await asyncio.wait_for(enricher.fetch(["1"]), 30)
        finally:
            await locker.close()
        assert await enricher.fetch(["1"]) == {"1": {"id": 1, "customer_id": 10}}  # a new connection
    finally:
        await enricher.close()


async def test_an_enrichment_replaced_on_reload_closes_its_connection(
        fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    await aconn.execute("create table orders (id int primary key, customer_id int)")
    await aconn.execute("insert into orders values (1, 10), (2, 20)")
    rcv = await start_receiver()
    old_sql = "select id, customer_id from orders where id = any($1::int[])"

    async def sessions(marker: str) -> int:
        return int(await scalar(aconn, "select count(*) from pg_stat_activity where query like %s",
                                f"%{marker}%"))
    try:
        source_id = await add_source(aconn, fresh_db, create=False)
        sink_id = await add_sink(aconn, source_id, name="swapped", url=rcv.url, lane_count=1, enrichment_sql=old_sql)
        await enqueue_changes(aconn, sink_id, [Row({"id": 1}, "1")])
        async with running(stage_for(fresh_db, lease_seconds=1.0)):
            await wait_for(lambda: _failed(aconn, sink_id), what="the first batch")
            assert await sessions("customer_id from orders") == 1
            await aconn.execute("update pgsink.sinks set enrichment_sql = %s where id = %s",
                                ("select id, customer_id as c from orders where id = any($1::int[])", sink_id))
            await aconn.execute("select pg_notify('pgsink_config', '')")
            await enqueue_changes(aconn, sink_id, [Row({"id": 2}, "2")])
            await wait_for(lambda: sessions("customer_id as c"), what="the new enrichment query")
            await wait_for(lambda: _none(sessions("customer_id from orders")), what="the old connection closed")
    finally:
        await rcv.close()


async def _none(count: Any) -> bool:
    return await count == 0
