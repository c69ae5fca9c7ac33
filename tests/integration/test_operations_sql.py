"""The SQL interface to inspect and repair (migration 0002): every view and function."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from pgsink.engine.capture import CaptureStage, ReaderSettings
from pgsink.engine.deliver import DeliveryStage
from pgsink.engine.ingest import group_key
from pgsink.engine.queue import lane_for
from pgsink.engine.jsontext import RawJson
from tests.helpers import add_sink, add_source
from tests.queue_helpers import Row, create_sink, enqueue_changes, scalar, wait_for
from tests.receiver import Received, Receiver, start_receiver

FAST = dict(poll_interval=0.1, backoff_base=0.05, backoff_cap=0.4, lease_seconds=5.0, shutdown_grace=5.0)
READER = ReaderSettings(flush_interval=0.005, status_interval=0.5, standby_poll=0.2, reconnect_min=0.1,
                        reconnect_max=1.0, config_poll=0.5)


@asynccontextmanager
async def delivering(dsn: str, **kw: Any) -> AsyncIterator[DeliveryStage]:
    stage = DeliveryStage(dsn, worker_id="ops", **{**FAST, **kw})
    task = asyncio.create_task(stage.run())
    try:
        yield stage
    finally:
        stage.stop()
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rcv = await start_receiver()
    yield rcv
    await rcv.close()


def groups_in(req: Received) -> set[str]:
    return {str(m["record"]["g"]) for m in req.messages}


async def rows(conn: psycopg.AsyncConnection, query: str, *params: Any) -> list[tuple[Any, ...]]:
    cur = await conn.execute(query, params or None)  # type: ignore[arg-type]
    return await cur.fetchall()


# ---------------------------------------------------------------- views


async def test_sink_status_shows_lag_rate_failing_groups_and_last_error(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    receiver.behavior = lambda req: 500 if "poison" in groups_in(req) else 200
    refs = await create_sink(aconn, receiver.url, batch_size=1, lane_count=2)
    old = datetime.now(UTC) - timedelta(seconds=90)
    await enqueue_changes(aconn, refs.sink_id, [Row({"g": g}, g) for g in ("poison", "a", "b", "c")],
                          committed_at=old)
    before = await rows(aconn, "select sink, source, state, lag_messages, pending_messages, parked_messages,"
                               " delivered_per_second, failing_groups, last_error, lag_seconds"
                               " from pgsink.sink_status")
    assert before[0][:9] == ("orders_webhook", "app", "active", 4, 4, 0, 0.0, 0, None)
    assert 89 < before[0][9] < 300

    async with delivering(fresh_db):
        await receiver.wait_until(lambda: len(receiver.delivered()) == 3, what="the healthy groups")
        await wait_for(lambda: scalar(aconn, "select count(*) = 1 from pgsink.parked_groups"), what="parking")
    status = await rows(aconn, "select lag_messages, pending_messages, parked_messages, delivered_last_minute,"
                               " failed_attempts_last_minute >= 3, failing_groups, last_error, last_error_at"
                               " is not null, delivered_per_second from pgsink.sink_status")
    assert status[0][:8] == (1, 0, 1, 3, True, 1, "HTTP 500: failing with 500", True)
    assert status[0][8] == pytest.approx(3 / 60)


async def test_message_states_track_a_message_from_pending_to_discarded(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    receiver.behavior = lambda req: 503 if "poison" in groups_in(req) else 200
    refs = await create_sink(aconn, receiver.url, batch_size=1, lane_count=1, max_retry_count=2)
    ids = await enqueue_changes(aconn, refs.sink_id, [Row({"g": "poison"}, "p1"), Row({"g": "ok"}, "o1")])
    states = await rows(aconn, "select id, state, action, table_schema, table_name, record_pk, attempts,"
                               " last_attempt_at from pgsink.message_states where sink = 'orders_webhook'"
                               " order by id")
    assert states == [(ids[0], "pending", "insert", "public", "orders", "p1", 0, None),
                      (ids[1], "pending", "insert", "public", "orders", "o1", 0, None)]

    # a leased lane: its reserved head messages are in flight
    await aconn.execute("insert into pgsink.lanes (sink_id, lane) values (%s, 0)", (refs.sink_id,))
    await aconn.execute("update pgsink.lanes set lease_owner = 'x', lease_expires = now() + interval '1 minute',"
                        " in_flight = 1")
    assert await rows(aconn, "select state from pgsink.message_states order by id") == [("in_flight",), ("pending",)]
    # a failed head batch backing off: failing, with its failure count
    await aconn.execute("update pgsink.lanes set lease_owner = null, lease_expires = null, failures = 2,"
                        " retry_at = now()")
    assert await rows(aconn, "select state, attempts from pgsink.message_states order by id") == [
        ("failing", 2), ("pending", 0)]
    await aconn.execute("update pgsink.lanes set failures = 0, in_flight = 0, retry_at = null")

    async with delivering(fresh_db):
        await wait_for(lambda: scalar(aconn, "select count(*) = 1 from pgsink.parked_messages"
                                             " where state = 'discarded'"), what="the poison message discarded")
        await receiver.wait_until(lambda: len(receiver.delivered()) == 1, what="the ok message")
    states = await rows(aconn, "select id, state, group_key, attempts, last_http_status, last_response,"
                               " last_attempt_at is not null from pgsink.message_states order by id")
    assert states == [(ids[0], "discarded", "p1", 3, 503, "failing with 503", True)]


async def test_attempt_log_has_status_excerpt_error_and_duration(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    refs = await create_sink(aconn, receiver.url, batch_size=10, lane_count=1)
    await aconn.execute(
        "insert into pgsink.attempts (sink_id, lane, message_ids, started_at, duration_ms, http_status,"
        " response_body, error, delivered) values"
        " (%(s)s, 0, '{1,2}', now() - interval '2 s', 12, 200, 'ok', null, true),"
        " (%(s)s, 0, '{3}', now() - interval '1 s', 30000, null, null, 'timeout after 30000 ms', false),"
        " (%(s)s, 0, '{3}', now(), 5, 422, repeat('x', 500), null, false)", {"s": refs.sink_id})
    log = await rows(aconn, "select sink, message_count, status, http_status, length(response_excerpt),"
                            " length(response_body), error, duration_ms from pgsink.attempt_log order by id")
    assert log == [("orders_webhook", 2, "delivered", 200, 2, 2, None, 12),
                   ("orders_webhook", 1, "error", None, None, None, "timeout after 30000 ms", 30000),
                   ("orders_webhook", 1, "failed", 422, 200, 500, None, 5)]


# ---------------------------------------------------------------- repair functions


async def test_retry_group_discard_and_retry_message(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    healed = asyncio.Event()
    receiver.behavior = lambda req: 500 if "poison" in groups_in(req) and not healed.is_set() else 200
    refs = await create_sink(aconn, receiver.url, batch_size=1, lane_count=1)
    ids = await enqueue_changes(aconn, refs.sink_id, [Row({"g": "poison", "seq": 1}, "poison"),
                                                      Row({"g": "poison", "seq": 2}, "poison")])
    async with delivering(fresh_db):
        await wait_for(lambda: scalar(aconn, "select count(*) = 2 from pgsink.parked_messages"), what="parking")
    await aconn.execute("update pgsink.parked_groups set next_attempt_at = now() + interval '1 hour'")
    assert await scalar(aconn, "select pgsink.retry_group('orders_webhook', 'poison')") == 2
    assert await scalar(aconn, "select next_attempt_at <= now() from pgsink.parked_groups") is True

    await aconn.execute("select pgsink.discard('orders_webhook', %s)", (ids[0],))
    assert await rows(aconn, "select id, state from pgsink.message_states order by id") == [
        (ids[0], "discarded"), (ids[1], "parked")]
    with pytest.raises(psycopg.errors.NoDataFound, match="is not parked"):
        await aconn.execute("select pgsink.discard('orders_webhook', %s)", (ids[0],))
    with pytest.raises(psycopg.errors.NoDataFound, match="is not discarded"):
        await aconn.execute("select pgsink.retry_message('orders_webhook', %s)", (ids[1],))
    with pytest.raises(psycopg.errors.NoDataFound, match="is not parked"):
        await aconn.execute("select pgsink.retry_group('orders_webhook', 'nope')")

    healed.set()
    async with delivering(fresh_db):
        await receiver.wait_until(lambda: len(receiver.delivered()) == 1, what="the parked message")
        await wait_for(lambda: scalar(aconn, "select count(*) = 0 from pgsink.parked_groups"), what="drain")
        # the discarded one is kept; retry_message parks it again, due now
        await aconn.execute("select pgsink.retry_message('orders_webhook', %s)", (ids[0],))
        await receiver.wait_until(lambda: len(receiver.delivered()) == 2, what="the retried message")
        await wait_for(lambda: scalar(aconn, "select count(*) = 0 from pgsink.parked_groups"), what="drain")
    assert [m["record"]["seq"] for m in receiver.delivered()] == [2, 1]
    assert await scalar(aconn, "select count(*) from pgsink.message_states") == 0


async def test_unknown_sink_is_an_actionable_error(aconn: psycopg.AsyncConnection) -> None:
    for call in ("pgsink.pause_sink('nope')", "pgsink.resume_sink('nope')", "pgsink.discard('nope', 1)",
                 "pgsink.retry_message('nope', 1)", "pgsink.retry_group('nope', 'g')",
                 "pgsink.replay('nope', now())"):
        with pytest.raises(psycopg.errors.NoDataFound, match="sink 'nope' does not exist") as e:
            await aconn.execute("select " + call)  # type: ignore[operator]
        assert e.value.diag.message_hint and "pgsink.sinks" in e.value.diag.message_hint


async def test_pause_and_resume_sink_notify_workers(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    refs = await create_sink(aconn, receiver.url, batch_size=1, lane_count=1)
    async with await psycopg.AsyncConnection.connect(fresh_db, autocommit=True) as listener:
        await listener.execute("listen pgsink_config")
        await aconn.execute("select pgsink.pause_sink('orders_webhook')")
        note = await anext(listener.notifies(timeout=10))
        assert note.payload == "sink:orders_webhook"
    assert await scalar(aconn, "select state from pgsink.sink_status") == "paused"
    async with delivering(fresh_db):
        await enqueue_changes(aconn, refs.sink_id, [Row({"g": "a"}, "a")])
        await aconn.execute("select pgsink.resume_sink(%s)", (str(refs.sink_id),))  # by id works too
        await receiver.wait_until(lambda: len(receiver.delivered()) == 1, what="delivery after resume")
    assert await scalar(aconn, "select status from pgsink.sinks") == "active"


# ---------------------------------------------------------------- replay


async def test_replay_redelivers_a_window_with_the_same_keys_in_commit_order(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    """Capture for real, deliver, replay: same group keys and lanes as capture, same bodies and keys."""
    await aconn.execute("create table orders (id int primary key, status text)")
    await aconn.execute("create table notes (body text)")  # no primary key: one group per table
    await aconn.execute("create table items (id int primary key, account text, n int)")
    source_id = await add_source(aconn, fresh_db)
    sink_id = await add_sink(aconn, source_id, url=receiver.url, batch_size=1, lane_count=8,
                             table_options='[{"name": "public.items", "group_column_names": ["account", "n"]}]')
    start = await scalar(aconn, "select now()")
    capture = CaptureStage(fresh_db, settings=READER)
    capture_task = asyncio.create_task(capture.run())
    try:
        async with delivering(fresh_db):
            await wait_for(lambda: scalar(aconn, "select count(*) = 1 from pg_replication_slots where active"),
                           what="the reader to stream")
            for i in range(5):
                await aconn.execute("insert into orders values (%s, 'new')", (i,))
            async with aconn.transaction():
                await aconn.execute("update orders set status = 'paid' where id < 3")
                await aconn.execute("insert into notes values ('x'), ('y')")
                await aconn.execute("insert into items values (1, 'acme', 7), (2, null, null)")
            await aconn.execute("delete from orders where id = 4")
            await receiver.wait_until(lambda: len(receiver.delivered()) == 13, timeout=30, what="capture")
    finally:
        capture.stop()
        await asyncio.wait_for(capture_task, 30)
    first = receiver.delivered()
    original = await rows(aconn, "select commit_lsn, commit_idx, group_key, lane from pgsink.messages order by id")

    n = await scalar(aconn, "select pgsink.replay('sink', %s)", start)
    assert n == 13
    replayed = await rows(aconn, "select commit_lsn, commit_idx, group_key, lane from pgsink.messages"
                                 " order by id offset 13")
    assert replayed == original  # capture's group keys and lanes, commit order
    assert "public.items:acme,7" in {r[2] for r in replayed} and "public.items:null,null" in {r[2] for r in replayed}
    assert "public.notes" in {r[2] for r in replayed}
    async with delivering(fresh_db):
        await receiver.wait_until(lambda: len(receiver.delivered()) == 26, what="the replay")
    again = receiver.delivered()[13:]
    assert sorted(again, key=lambda m: m["metadata"]["idempotency_key"]) == sorted(
        first, key=lambda m: m["metadata"]["idempotency_key"])
    per_group = {}
    for m in again:
        per_group.setdefault(m["metadata"]["table_name"] + str(m["record"].get("id")), []).append(
            m["metadata"]["idempotency_key"])
    for m in first:
        key = m["metadata"]["table_name"] + str(m["record"].get("id"))
        assert per_group[key].pop(0) == m["metadata"]["idempotency_key"]  # same order within each group

    # filters: table, action, until
    assert await scalar(aconn, "select pgsink.replay('sink', %s, p_table => 'orders', p_action => 'update')",
                        start) == 3
    assert await scalar(aconn, "select pgsink.replay('sink', %s, p_table => 'public.notes')", start) == 2
    assert await scalar(aconn, "select pgsink.replay('sink', %s, %s)", start, start) == 0
    assert await scalar(aconn, "select pgsink.replay('sink', now())") == 0
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="unknown action"):
        await aconn.execute("select pgsink.replay('sink', now(), p_action => 'read')")
    assert sink_id


async def test_replay_follows_the_sink_tables_actions_and_grouping(
        fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    refs = await create_sink(aconn, "http://127.0.0.1:9/hook", lane_count=4, message_grouping=False,
                             actions=["insert", "delete"], exclude_tables=["public.secret"])
    when = datetime.now(UTC) - timedelta(hours=1)
    await enqueue_changes(aconn, refs.sink_id, [
        Row({"id": 1}, "1"), Row({"id": 1}, "1", action="update"), Row({"id": 1}, "1", action="delete"),
        Row({"id": 2}, "2", table_name="secret")], committed_at=when)
    assert await scalar(aconn, "select pgsink.replay('orders_webhook', %s)", when) == 2
    got = await rows(aconn, "select action, group_key, lane = id % 4 from pgsink.messages order by id offset 4")
    assert got == [("insert", None, True), ("delete", None, True)]


@pytest.mark.parametrize("record,columns", [
    ({"a": "x,y", "b": 12}, ["a", "b"]),
    ({"a": None}, ["a", "missing"]),
    ({"a": True, "b": 1.5}, ["a", "b"]),
    ({"a": RawJson("123.4500")}, ["a"]),
    ({"a": ["a", "b"], "b": [[1, None], [2, 3]]}, ["a", "b"]),  # text[] and int[][] columns
    ({"a": 1e300, "b": -0.0, "c": 1e-7, "d": 123.0}, ["a", "b", "c", "d"]),  # float8 columns
    ({"a": RawJson('{"zz": 1.50, "b": "q\\"\\u0001\\u00e9\\n", "b": 2, "é": [1e2]}')}, ["a"]),  # json column
    ({"a": {"long key": 1, "k": {"x": "y"}}, "b": Decimal("1E+3")}, ["a", "b"]),
    ({"a": RawJson('"abc"'), "b": RawJson("[1, 2]")}, ["a", "b"]),  # json columns holding a string, a list
])
async def test_group_key_formula_matches_capture(
        aconn: psycopg.AsyncConnection, record: dict[str, Any], columns: list[str]) -> None:
    """pgsink.change_group_key (replay) is the twin of capture's and backfill's ingest.group_key: any
    difference put a replayed message in another group and lane than the row's captured ones."""
    from pgsink.engine.jsontext import dumps

    refs = await create_sink(aconn, "http://127.0.0.1:9/hook",
                             table_options=[{"name": "orders", "group_column_names": columns}])
    got = await scalar(aconn, "select pgsink.change_group_key(s, 'public', 'orders', '1', %s::jsonb)"
                              " from pgsink.sinks s where id = %s", dumps(record).decode(), refs.sink_id)
    assert got == group_key("public", "orders", record, tuple(columns), "1")
    assert lane_for(got, 64) == await scalar(aconn, "select pgsink.lane_for(%s, 64)", got)


async def test_replay_under_live_traffic_is_one_block_in_commit_order(
        fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    """Replay takes the sink's enqueue lock: its copies get one contiguous id block, in commit
    order, never interleaved with live messages, so each group sees old-then-replayed-then-new."""
    refs = await create_sink(aconn, "http://127.0.0.1:9/hook", lane_count=4)
    start = datetime.now(UTC) - timedelta(minutes=5)
    for i in range(20):
        await enqueue_changes(aconn, refs.sink_id, [Row({"id": k, "v": i}, str(k)) for k in range(5)],
                              committed_at=start + timedelta(seconds=i))
    async with await psycopg.AsyncConnection.connect(fresh_db, autocommit=True) as live:
        async def traffic() -> None:
            for i in range(30):
                await enqueue_changes(live, refs.sink_id, [Row({"id": k, "v": 100 + i}, str(k)) for k in range(5)])

        task = asyncio.create_task(traffic())
        replayed = await scalar(aconn, "select pgsink.replay('orders_webhook', %s, %s)",
                                start, start + timedelta(minutes=1))
        await task
    assert replayed == 100
    msgs = await rows(aconn, "select id, commit_lsn, commit_idx, (row_number() over (partition by commit_lsn,"
                             " commit_idx order by id)) > 1 as copy from pgsink.messages order by id")
    copies = [i for i, m in enumerate(msgs) if m[3]]
    assert len(copies) == 100 and copies == list(range(copies[0], copies[0] + 100))  # one block
    positions = [(m[1], m[2]) for m in msgs if m[3]]
    assert positions == sorted(positions)  # commit order


async def test_replay_of_a_sink_with_filters_sends_only_what_they_pass(
        fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    """Filters ran at capture; replay used to re-enqueue every change of the sink's tables, so the
    destination got rows the sink never takes. SQL cannot run them: pgsink.replay says so, and
    `pgsink replay` (ops.replay) judges each retained change as capture did."""
    from pgsink.engine import ops
    from pgsink.engine.errors import PgsinkError

    refs = await create_sink(aconn, "http://127.0.0.1:9/hook", lane_count=4,
                             filter_sql="amount > 100 and action <> 'delete'")
    when = datetime.now(UTC) - timedelta(hours=1)
    def row(pk: int, amount: str, action: str = "insert") -> Row:
        return Row({}, str(pk), action=action, record_json=f'{{"id": {pk}, "amount": {amount}}}')

    await enqueue_changes(aconn, refs.sink_id, [row(1, "150.50"), row(2, "5"), row(3, "100.000000000000000001"),
                                                row(1, "150.50", "delete"), row(4, "999")], committed_at=when)
    queued = await rows(aconn, "select commit_lsn, commit_idx from pgsink.messages order by id")
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="has filters") as e:
        await aconn.execute("select pgsink.replay('orders_webhook', %s)", (when - timedelta(minutes=1),))
    assert "pgsink replay --sink orders_webhook" in (e.value.diag.message_hint or "")
    assert await ops.replay(fresh_db, "orders_webhook", when - timedelta(minutes=1)) == 3
    replayed = await rows(aconn, "select commit_lsn, commit_idx, group_key from pgsink.messages order by id offset 5")
    assert [(lsn, idx) for lsn, idx, _ in replayed] == [queued[0], queued[2], queued[4]]  # exact: 100.0...01 > 100
    assert [key for _, _, key in replayed] == ["public.orders:1", "public.orders:3", "public.orders:4"]
    with pytest.raises(PgsinkError, match="sink .nope. does not exist"):
        await ops.replay(fresh_db, "nope", when)
