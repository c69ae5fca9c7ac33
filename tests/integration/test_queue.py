"""The queue's SQL against real Postgres: lane hashing, leases, fenced acks, parking, plans."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg

from pgsink.engine import queue as q
from pgsink.engine.queries import QUERIES
from tests.queue_helpers import Row, SinkRefs, create_sink, enqueue_changes, scalar, wait_for

URL = "http://127.0.0.1:9/hook"


async def setup_sink(conn: psycopg.AsyncConnection, **cols: Any) -> SinkRefs:
    refs = await create_sink(conn, URL, **cols)
    lane_count = await scalar(conn, "select lane_count from pgsink.sinks where id = %s", refs.sink_id)
    await q.ensure_lanes(conn, refs.sink_id, lane_count)
    return refs


def rows(keys: list[str]) -> list[Row]:
    return [Row({"id": k}, k) for k in keys]


async def lease(conn: psycopg.AsyncConnection, refs: SinkRefs, owner: str = "w1", **kw: Any) -> list[q.LaneLease]:
    sink = await conn.execute("select lane_count, batch_size, max_ack_pending from pgsink.sinks where id = %s",
                              (refs.sink_id,))
    lane_count, batch_size, max_ack = await sink.fetchone()  # type: ignore[misc]
    args: dict[str, Any] = dict(sink_id=refs.sink_id, lane_count=lane_count, batch_size=batch_size,
                                max_ack_pending=max_ack, owner=owner, max_lanes=64, lease_seconds=30.0)
    args.update(kw)
    return await q.lease_lanes(conn, **args)


def ok_attempt(ids: list[int]) -> q.Attempt:
    return q.Attempt(ids, datetime.now(UTC), 5, 200, "ok", None, True)


def failed_attempt(ids: list[int]) -> q.Attempt:
    return q.Attempt(ids, datetime.now(UTC), 5, 500, "boom", None, False)


async def read(conn: psycopg.AsyncConnection, refs: SinkRefs, ls: q.LaneLease, limit: int = 100) -> list[q.QueuedMessage]:
    return await q.read_lane_batch(conn, sink_id=refs.sink_id, source_id=refs.source_id, lane=ls.lane,
                                   after_id=ls.delivered_id, limit=limit)


# ---------------------------------------------------------------- lanes


async def test_python_lane_for_matches_sql(aconn: psycopg.AsyncConnection) -> None:
    rng = random.Random(5)
    keys = [str(i) for i in range(1500)] + [f"{rng.random()},ü{i},{'x' * (i % 40)}" for i in range(1500)] + ["", ","]
    for lane_count in (1, 7, 64, 1024):
        cur = await aconn.execute("select pgsink.lane_for(k, %s) from unnest(%s::text[]) k", (lane_count, keys))
        assert [r[0] for r in await cur.fetchall()] == [q.lane_for(k, lane_count) for k in keys]


async def test_lease_takes_only_lanes_with_work_and_is_exclusive(aconn: psycopg.AsyncConnection) -> None:
    refs = await setup_sink(aconn, lane_count=8, batch_size=10, batch=True)
    assert await lease(aconn, refs) == []
    ids = await enqueue_changes(aconn, refs.sink_id, rows(["a", "b", "c"]))
    wanted = sorted({q.lane_for(k, 8) for k in "abc"})
    first = await lease(aconn, refs, "w1")
    assert sorted(ls.lane for ls in first) == wanted
    assert all(ls.delivered_id == 0 and ls.reserved == 10 for ls in first)
    assert await lease(aconn, refs, "w2") == []  # all held
    # an expired lease is free to take
    await aconn.execute("update pgsink.lanes set lease_expires = now() - interval '1 s' where lane = %s",
                        (first[0].lane,))
    second = await lease(aconn, refs, "w2")
    assert [ls.lane for ls in second] == [first[0].lane]
    # a lane backing off is not leased until retry_at
    ls = second[0]
    msgs = await read(aconn, refs, ls)
    assert {m.id for m in msgs} <= set(ids)
    assert await q.fail_lane(aconn, ls, "w2", delay=60, in_flight=len(msgs), attempt=failed_attempt([m.id for m in msgs]))
    await aconn.execute("update pgsink.lanes set lease_expires = now() - interval '1 s'")
    assert ls.lane not in {x.lane for x in await lease(aconn, refs, "w3")}


async def test_max_ack_pending_is_shared_by_lanes_and_parked_groups(aconn: psycopg.AsyncConnection) -> None:
    refs = await setup_sink(aconn, lane_count=16, batch_size=100, max_ack_pending=250)
    await enqueue_changes(aconn, refs.sink_id, rows([str(i) for i in range(200)]))
    got = await lease(aconn, refs, "w1")
    assert sorted(ls.reserved for ls in got) == [50, 100, 100]
    assert await lease(aconn, refs, "w2") == []
    # parked groups backing off count too; a lane's own held messages count as its own room
    await aconn.execute("update pgsink.lanes set lease_owner = null, lease_expires = null, in_flight = 0")
    await aconn.execute("insert into pgsink.parked_groups (sink_id, group_key, lane, in_flight, next_attempt_at)"
                        " values (%s, 'x', 0, 240, now() + interval '1 h')", (refs.sink_id,))
    got = await lease(aconn, refs, "w3")
    assert [ls.reserved for ls in got] == [10]


async def test_lowering_max_ack_pending_below_what_parked_groups_hold_does_not_stall(
        aconn: psycopg.AsyncConnection) -> None:
    refs = await setup_sink(aconn, lane_count=4, batch_size=10, max_ack_pending=1000)
    for key in ("a", "b"):  # two parked groups, each holding 8 reserved messages, due now
        await aconn.execute("insert into pgsink.parked_groups (sink_id, group_key, lane, in_flight, next_attempt_at)"
                            " values (%s, %s, 0, 8, now())", (refs.sink_id, key))
    # the sink's max_ack_pending is lowered to 5 while 16 are held: no group had room left, and nothing
    # ever lowered what they hold. Each may take back what it holds (the total does not grow), so the
    # groups drain and the sink comes back under its limit.
    got = await q.lease_parked_groups(aconn, sink_id=refs.sink_id, batch_size=10, max_ack_pending=5, owner="r",
                                      max_groups=4, lease_seconds=30)
    assert sorted((g.group_key, g.reserved) for g in got) == [("a", 8), ("b", 8)]
    await aconn.execute("update pgsink.parked_groups set lease_owner = null, lease_expires = null")
    await enqueue_changes(aconn, refs.sink_id, rows(["x"]))
    assert await lease(aconn, refs, "w", max_ack_pending=5) == []  # lanes wait until the sink is back under


async def test_concurrent_leases_never_exceed_max_ack_pending(fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    refs = await setup_sink(aconn, lane_count=64, batch_size=7, max_ack_pending=40)
    await enqueue_changes(aconn, refs.sink_id, rows([str(i) for i in range(500)]))
    conns = [await psycopg.AsyncConnection.connect(fresh_db, autocommit=True) for _ in range(6)]
    try:
        results = await asyncio.gather(*(lease(c, refs, f"w{i}", max_lanes=8) for i, c in enumerate(conns)))
    finally:
        for c in conns:
            await c.close()
    reserved = sum(ls.reserved for r in results for ls in r)
    assert reserved == 40
    assert await scalar(aconn, "select sum(in_flight) from pgsink.lanes") == 40


# ---------------------------------------------------------------- reads and acks


async def test_read_returns_group_order_with_exact_json_text(aconn: psycopg.AsyncConnection) -> None:
    refs = await setup_sink(aconn, lane_count=1, batch_size=100)
    await enqueue_changes(aconn, refs.sink_id, [
        Row({}, "1", record_json='{"id": 1, "price": 10.50, "big": 12345678901234567890123}',
            transaction_annotations={"who": "me"}),
        Row({"id": 1}, "1", action="update", changes={"price": 9}),
    ])
    [ls] = await lease(aconn, refs)
    a, b = await read(aconn, refs, ls)
    assert a.id < b.id and a.commit_idx == 0 and b.commit_idx == 1
    assert a.record == '{"id": 1, "big": 12345678901234567890123, "price": 10.50}'
    assert a.transaction_annotations == '{"who": "me"}' and a.changes is None
    assert b.changes == '{"price": 9}' and b.action == "update"
    assert a.commit_timestamp.endswith("Z") and len(a.commit_timestamp) == len("2024-03-20T15:30:00.123456Z")


async def test_ack_moves_cursor_with_one_statement_and_no_message_updates(aconn: psycopg.AsyncConnection) -> None:
    refs = await setup_sink(aconn, lane_count=1, batch_size=100)
    ids = await enqueue_changes(aconn, refs.sink_id, rows([str(i) for i in range(30)]))
    [ls] = await lease(aconn, refs)
    msgs = await read(aconn, refs, ls)
    assert [m.id for m in msgs] == ids
    # fenced: a stranger, or a cursor that moved, changes nothing
    moved = q.LaneLease(ls.sink_id, ls.lane, ls.delivered_id + 1, 0, ls.reserved)
    for ack in (q.ack_lane, q.advance_lane):
        assert not await ack(aconn, ls, "stranger", last_id=ids[-1], attempt=ok_attempt(ids))
        assert not await ack(aconn, moved, "w1", last_id=ids[-1], attempt=ok_attempt(ids))
    assert await scalar(aconn, "select count(*) from pgsink.attempts") == 0
    assert await q.ack_lane(aconn, ls, "w1", last_id=ids[-1], attempt=ok_attempt(ids))
    lane = await (await aconn.execute(
        "select delivered_id, lease_owner, in_flight, failures from pgsink.lanes where sink_id = %s",
        (refs.sink_id,))).fetchone()
    assert lane == (ids[-1], None, 0, 0)
    att = await (await aconn.execute("select message_ids, http_status, delivered, lane from pgsink.attempts")).fetchall()
    assert att == [(ids, 200, True, 0)]
    assert await scalar(aconn, "select count(*) from pgsink.messages where xmax <> 0") == 0
    assert await lease(aconn, refs) == []


async def test_park_then_park_behind_then_retry_then_unpark(aconn: psycopg.AsyncConnection) -> None:
    refs = await setup_sink(aconn, lane_count=1, batch_size=10)
    sid = refs.sink_id
    first = await enqueue_changes(aconn, sid, rows(["bad", "good"]))
    [ls] = await lease(aconn, refs)
    batch = await read(aconn, refs, ls)
    plan = q.plan_batch(batch)
    fate = q.plan_failure(plan, failures=3, max_retry_count=None, park_after=3, may_park=True, base=0.0, cap=0.0)
    assert fate.kind == "park"
    # park only "bad": pretend "good" got delivered in a separate request
    bad = [m for m in batch if m.group_key == "bad"]
    assert await q.advance_lane(
        aconn, ls, "w1", last_id=plan.last_id, attempt=failed_attempt([m.id for m in bad]),
        copies=[q.Copy(m.id, "parked", 3) for m in bad], park=[q.ParkGroup("bad", 3, 0.0, 1)],
        lane_error="HTTP 500")
    assert await scalar(aconn, "select count(*) from pgsink.parked_messages where group_key = 'bad'") == 1
    # the next messages of the group are parked behind it; others flow
    later = await enqueue_changes(aconn, sid, rows(["bad", "other"]))
    [ls] = await lease(aconn, refs)
    plan = q.plan_batch(await read(aconn, refs, ls))
    assert [m.id for m in plan.behind] == [later[0]] and [m.id for m in plan.deliver] == [later[1]]
    assert await q.advance_lane(aconn, ls, "w1", last_id=plan.last_id, attempt=ok_attempt([later[1]]),
                                copies=plan.copies_on_success(), behind_keys=plan.behind_keys)
    parked = await (await aconn.execute(
        "select id, attempts, state from pgsink.parked_messages order by id")).fetchall()
    assert parked == [(first[0], 3, "parked"), (later[0], 0, "parked")]
    # the retrier takes the group on its own, in order, and counts it as pending
    [g] = await q.lease_parked_groups(aconn, sink_id=sid, batch_size=10, max_ack_pending=100, owner="r1",
                                      max_groups=8, lease_seconds=30)
    assert (g.group_key, g.attempts, g.reserved) == ("bad", 3, 10)
    msgs = await q.read_parked_batch(aconn, sink_id=sid, source_id=refs.source_id, group_key="bad", limit=1,
                                     owner="r1")
    assert [m.id for m in msgs] == [first[0]]
    assert await q.fail_parked(aconn, g, "r1", failed_attempt([first[0]]), delay=0, in_flight=1,
                               max_retry_count=None, moved_on=False)
    assert await scalar(aconn, "select attempts from pgsink.parked_messages where id = %s", first[0]) == 4
    [g] = await q.lease_parked_groups(aconn, sink_id=sid, batch_size=10, max_ack_pending=100, owner="r1",
                                      max_groups=8, lease_seconds=30)
    msgs = await q.read_parked_batch(aconn, sink_id=sid, source_id=refs.source_id, group_key="bad", limit=10,
                                     owner="r1")
    assert [m.id for m in msgs] == [first[0], later[0]]
    assert await q.ack_parked(aconn, g, "r1", ok_attempt([m.id for m in msgs]))
    assert await scalar(aconn, "select count(*) from pgsink.parked_messages") == 0
    assert await q.drop_drained_group(aconn, sid, 0, "bad", None)
    # with the group gone, its next message is delivered by the lane again
    last = await enqueue_changes(aconn, sid, rows(["bad"]))
    [ls] = await lease(aconn, refs)
    plan = q.plan_batch(await read(aconn, refs, ls))
    assert [m.id for m in plan.deliver] == last and not plan.behind


async def test_drained_group_found_by_the_lane_is_unparked(aconn: psycopg.AsyncConnection) -> None:
    refs = await setup_sink(aconn, lane_count=1, batch_size=10)
    await aconn.execute("insert into pgsink.parked_groups (sink_id, group_key, lane) values (%s, 'k', 0)",
                        (refs.sink_id,))
    ids = await enqueue_changes(aconn, refs.sink_id, rows(["k"]))
    [ls] = await lease(aconn, refs)
    plan = q.plan_batch(await read(aconn, refs, ls))
    assert [m.id for m in plan.deliver] == ids and plan.unpark_keys == ["k"]
    assert await q.advance_lane(aconn, ls, "w1", last_id=plan.last_id, attempt=ok_attempt(ids),
                                unpark_keys=plan.unpark_keys)
    assert await scalar(aconn, "select count(*) from pgsink.parked_groups") == 0


async def test_dropping_a_drained_group_waits_for_a_lane_ack_in_progress(
        fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    """The race the lane lock closes: an ack parking a message behind a group while its retrier drops it."""
    refs = await setup_sink(aconn, lane_count=1, batch_size=10)
    sid = refs.sink_id
    await aconn.execute("insert into pgsink.parked_groups (sink_id, group_key, lane) values (%s, 'g', 0)", (sid,))
    await aconn.execute(
        "insert into pgsink.parked_messages (sink_id, id, lane, group_key, action, commit_lsn, commit_idx,"
        " committed_at) values (%s, 0, 0, 'g', 'insert', 1, 0, now())", (sid,))
    ids = await enqueue_changes(aconn, sid, rows(["g"]))
    [ls] = await lease(aconn, refs)
    plan = q.plan_batch(await read(aconn, refs, ls))
    assert [m.id for m in plan.behind] == ids  # the lane saw the group blocked
    await aconn.execute("delete from pgsink.parked_messages where id = 0")  # the retrier delivered it meanwhile
    acker = await psycopg.AsyncConnection.connect(fresh_db, autocommit=True)
    dropper = await psycopg.AsyncConnection.connect(fresh_db, autocommit=True)
    try:
        async with acker.transaction():
            assert await q.advance_lane(acker, ls, "w1", last_id=plan.last_id, attempt=None,
                                        copies=plan.copies_on_success(), behind_keys=plan.behind_keys)
            drop = asyncio.create_task(q.drop_drained_group(dropper, sid, 0, "g", None))
            pid = dropper.info.backend_pid

            async def dropper_waits() -> bool:
                return bool(await scalar(aconn, "select wait_event_type = 'Lock' from pg_stat_activity"
                                                " where pid = %s", pid))
            await wait_for(dropper_waits, what="the drop to wait for the lane ack")
        assert await drop is False  # it saw the message parked behind, and kept the group
    finally:
        await acker.close()
        await dropper.close()
    assert await scalar(aconn, "select count(*) from pgsink.parked_groups where group_key = 'g'") == 1
    assert await scalar(aconn, "select count(*) from pgsink.parked_messages where group_key = 'g'") == 1


async def test_a_group_another_retrier_holds_is_neither_dropped_nor_read(aconn: psycopg.AsyncConnection) -> None:
    """The race two workers hit: retrier A drops a drained group just after retrier B leased it;
    the lane re-creates it with new messages, C leases it, and B and C both deliver them."""
    refs = await setup_sink(aconn, lane_count=1, batch_size=10)
    sid = refs.sink_id
    await aconn.execute("insert into pgsink.parked_groups (sink_id, group_key, lane) values (%s, 'g', 0)", (sid,))
    [b] = await q.lease_parked_groups(aconn, sink_id=sid, batch_size=10, max_ack_pending=100, owner="B",
                                      max_groups=8, lease_seconds=30)
    assert not await q.drop_drained_group(aconn, sid, 0, "g", None)  # A, after releasing its own lease
    assert not await q.drop_drained_group(aconn, sid, 0, "g", "C")
    # the lane finds it drained, but leaves it to its holder
    ids = await enqueue_changes(aconn, sid, rows(["g"]))
    [ls] = await lease(aconn, refs)
    plan = q.plan_batch(await read(aconn, refs, ls))
    assert plan.unpark_keys == ["g"]
    assert await q.advance_lane(aconn, ls, "w1", last_id=ids[-1], attempt=ok_attempt(ids), unpark_keys=["g"])
    assert await scalar(aconn, "select lease_owner from pgsink.parked_groups where group_key = 'g'") == "B"
    # only the holder reads a group's messages
    await aconn.execute(
        "insert into pgsink.parked_messages (sink_id, id, lane, group_key, action, commit_lsn, commit_idx,"
        " committed_at) values (%s, 0, 0, 'g', 'insert', 1, 0, now())", (sid,))
    read_as = lambda owner: q.read_parked_batch(  # noqa: E731
        aconn, sink_id=sid, source_id=refs.source_id, group_key="g", limit=10, owner=owner)
    assert await read_as("C") == []
    assert [m.id for m in await read_as("B")] == [0]
    await aconn.execute("delete from pgsink.parked_messages")
    assert await q.drop_drained_group(aconn, sid, 0, "g", "B") and b.group_key == "g"


async def test_max_retry_count_discards_parked_messages(aconn: psycopg.AsyncConnection) -> None:
    refs = await setup_sink(aconn, lane_count=1, batch_size=10)
    sid = refs.sink_id
    ids = await enqueue_changes(aconn, sid, rows(["x", "x"]))
    [ls] = await lease(aconn, refs)
    assert await q.advance_lane(aconn, ls, "w1", last_id=ids[-1], attempt=failed_attempt(ids),
                                copies=[q.Copy(ids[0], "parked", 3), q.Copy(ids[1], "parked", 0)],
                                park=[q.ParkGroup("x", 3, 0.0, 2)])
    [g] = await q.lease_parked_groups(aconn, sink_id=sid, batch_size=1, max_ack_pending=100, owner="r",
                                      max_groups=1, lease_seconds=30)
    msgs = await q.read_parked_batch(aconn, sink_id=sid, source_id=refs.source_id, group_key="x", limit=1,
                                     owner="r")
    delay, pending, moved_on = q.parked_outcome(msgs, group_attempts=g.attempts, max_retry_count=3, base=1, cap=1)
    assert (delay, pending, moved_on) == (0.0, 0, True)
    assert await q.fail_parked(aconn, g, "r", failed_attempt([ids[0]]), delay=delay, in_flight=pending,
                               max_retry_count=3, moved_on=moved_on)
    rows_ = await (await aconn.execute(
        "select id, state, attempts, discarded_at is not null from pgsink.parked_messages order by id")).fetchall()
    assert rows_ == [(ids[0], "discarded", 4, True), (ids[1], "parked", 0, False)]
    grp = await (await aconn.execute("select attempts, in_flight, next_attempt_at <= now() from pgsink.parked_groups"
                                     )).fetchone()
    assert grp == (0, 0, True)  # moved on to the next message at once


async def test_renew_and_release_leases(aconn: psycopg.AsyncConnection) -> None:
    refs = await setup_sink(aconn, lane_count=4, batch_size=10)
    await enqueue_changes(aconn, refs.sink_id, rows(["a", "b", "c", "d", "e"]))
    got = await lease(aconn, refs, "w1", lease_seconds=1)
    held = [(refs.sink_id, ls.lane) for ls in got]
    lost, _ = await q.renew_leases(aconn, "w1", 60, held + [(refs.sink_id, 99)], [])
    assert lost == {}  # lane 99 does not exist
    assert await scalar(aconn, "select min(lease_expires) > now() + interval '50 s' from pgsink.lanes"
                               " where lease_owner = 'w1'")
    await aconn.execute("update pgsink.lanes set lease_owner = 'w2' where sink_id = %s and lane = %s",
                        (refs.sink_id, got[0].lane))
    await aconn.execute("update pgsink.lanes set lease_owner = null where sink_id = %s and lane = %s",
                        (refs.sink_id, got[1].lane))
    lost, _ = await q.renew_leases(aconn, "w1", 60, held, [])
    assert lost == {(refs.sink_id, got[0].lane): True, (refs.sink_id, got[1].lane): False}
    await aconn.execute("update pgsink.lanes set lease_owner = 'w1' where sink_id = %s and lane in (%s, %s)",
                        (refs.sink_id, got[0].lane, got[1].lane))
    await q.release_all(aconn, "w1", [refs.sink_id])
    assert await scalar(aconn, "select count(*) from pgsink.lanes where lease_owner is not null or in_flight > 0") == 0


async def test_prune_attempts_by_age(aconn: psycopg.AsyncConnection) -> None:
    refs = await setup_sink(aconn)
    now = datetime.now(UTC)
    await aconn.execute(
        "insert into pgsink.attempts (sink_id, message_ids, started_at, duration_ms, delivered)"
        " select %s, '{1}', %s - make_interval(hours => h), 1, true from generate_series(0, 49) h",
        (refs.sink_id, now))
    assert await q.prune_attempts(aconn, timedelta(hours=24, minutes=30), chunk=7, now=now) == 25
    assert await scalar(aconn, "select count(*) from pgsink.attempts") == 25


# ---------------------------------------------------------------- plans


def _plan_nodes(plan: Any) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out.extend(_plan_nodes(child))
    return out


async def _explain(conn: psycopg.AsyncConnection, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    cur = await conn.execute("explain (format json) " + query, params)  # type: ignore[operator]
    doc = (await cur.fetchone())[0]  # type: ignore[index]
    if isinstance(doc, str):
        doc = orjson.loads(doc)
    return _plan_nodes(doc[0]["Plan"])


async def test_lane_read_and_lease_use_index_scans(aconn: psycopg.AsyncConnection) -> None:
    """Invariant 6: claiming costs the same with 10 or 10 million messages; no Seq Scan on messages."""
    refs = await setup_sink(aconn, lane_count=64, batch_size=100)
    await aconn.execute("select setval('pgsink.message_id_seq', 990000)")  # span two id partitions
    for k in range(4):
        await enqueue_changes(aconn, refs.sink_id, rows([str(i) for i in range(k * 5000, (k + 1) * 5000)]))
    await aconn.execute("update pgsink.lanes set delivered_id = 995000")
    await aconn.execute("analyze pgsink.messages, pgsink.lanes, pgsink.changes, pgsink.parked_groups")
    assert await scalar(aconn, "select count(*) from pg_inherits where inhparent = 'pgsink.messages'::regclass") >= 2
    lease_nodes = await _explain(aconn, QUERIES["lease_lanes"], dict(
        sink_id=refs.sink_id, lane_count=64, batch_size=100, max_ack_pending=10000, owner="x", max_lanes=32,
        lease_seconds=30.0, offset=3))
    read_nodes = await _explain(aconn, QUERIES["read_lane_batch"], dict(
        sink_id=refs.sink_id, source_id=refs.source_id, lane=3, after_id=995000, limit=100))
    for nodes in (lease_nodes, read_nodes):
        scans = [(n["Node Type"], n.get("Relation Name", "")) for n in nodes]
        assert not [s for s in scans if s[0] == "Seq Scan" and s[1].startswith("messages")], scans
        assert any(t in ("Index Scan", "Index Only Scan") and r.startswith("messages") for t, r in scans), scans


async def _retry_racing(fresh_db: str, aconn: psycopg.AsyncConnection, refs: SinkRefs, other: Any) -> Any:
    """Run ``other(conn)`` (a group drop or a lane ack) while ``pgsink.retry_message`` of the
    discarded message 0 of group 'k' is open; return its result once the retry has committed."""
    retrier = await psycopg.AsyncConnection.connect(fresh_db, autocommit=True)
    racer = await psycopg.AsyncConnection.connect(fresh_db, autocommit=True)
    try:
        async with retrier.transaction():
            await retrier.execute("select pgsink.retry_message('orders_webhook', 0)")
            task = asyncio.create_task(other(racer))
            pid = racer.info.backend_pid

            async def racer_waits() -> bool:
                return bool(await scalar(aconn, "select wait_event_type = 'Lock' from pg_stat_activity"
                                                " where pid = %s", pid))
            await wait_for(racer_waits, what="the racing statement to wait for the retry")
        return await task
    finally:
        await retrier.close()
        await racer.close()


async def _discarded_group(aconn: psycopg.AsyncConnection, refs: SinkRefs) -> None:
    """Group 'k' of lane 0: its row, and its message 0 discarded (nothing parked: drained)."""
    await aconn.execute("insert into pgsink.parked_groups (sink_id, group_key, lane) values (%s, 'k', 0)",
                        (refs.sink_id,))
    await aconn.execute(
        "insert into pgsink.parked_messages (sink_id, id, lane, group_key, action, commit_lsn, commit_idx,"
        " committed_at, state, discarded_at) values (%s, 0, 0, 'k', 'insert', 1, 0, now(), 'discarded', now())",
        (refs.sink_id,))


async def _retried_message_keeps_its_group(aconn: psycopg.AsyncConnection) -> None:
    assert await scalar(aconn, "select state from pgsink.parked_messages where id = 0") == "parked"
    # without its group row the retried message would never be sent again
    assert await scalar(aconn, "select count(*) from pgsink.parked_groups where group_key = 'k'") == 1


async def test_a_drained_group_drop_racing_retry_message_keeps_the_group(
        fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    refs = await setup_sink(aconn, lane_count=1, batch_size=10)
    await _discarded_group(aconn, refs)
    dropped = await _retry_racing(fresh_db, aconn, refs,
                                  lambda conn: q.drop_drained_group(conn, refs.sink_id, 0, "k", None))
    assert dropped is False
    await _retried_message_keeps_its_group(aconn)


async def test_a_lane_unparking_a_group_racing_retry_message_keeps_the_group(
        fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    refs = await setup_sink(aconn, lane_count=1, batch_size=10)
    await _discarded_group(aconn, refs)
    ids = await enqueue_changes(aconn, refs.sink_id, rows(["k"]))
    [ls] = await lease(aconn, refs)
    plan = q.plan_batch(await read(aconn, refs, ls))
    assert [m.id for m in plan.deliver] == ids and plan.unpark_keys == ["k"]
    acked = await _retry_racing(fresh_db, aconn, refs, lambda conn: q.advance_lane(
        conn, ls, "w1", last_id=plan.last_id, attempt=ok_attempt(ids), unpark_keys=plan.unpark_keys))
    assert acked is True
    await _retried_message_keeps_its_group(aconn)


async def test_renewal_passes_over_a_lane_someone_holds_locked(fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    """A `begin; select pgsink.retry_message(...)` left open in psql locks its lane row (and its group's):
    renewal used to wait for it, holding up every other lease of the worker until they all expired."""
    refs = await setup_sink(aconn, lane_count=2, batch_size=10)
    await _discarded_group(aconn, refs)
    await enqueue_changes(aconn, refs.sink_id, rows(["a", "b", "c", "d"]))
    got = await lease(aconn, refs, "w1", lease_seconds=1)
    assert {ls.lane for ls in got} == {0, 1}
    [g] = await q.lease_parked_groups(aconn, sink_id=refs.sink_id, batch_size=10, max_ack_pending=100, owner="w1",
                                      max_groups=8, lease_seconds=1)
    other = await psycopg.AsyncConnection.connect(fresh_db, autocommit=True)
    try:
        async with other.transaction():
            await other.execute("select pgsink.retry_message('orders_webhook', 0)")  # locks lane 0 and group k
            lost = await asyncio.wait_for(q.renew_leases(
                aconn, "w1", 60, [(refs.sink_id, ls.lane) for ls in got], [(refs.sink_id, g.group_key)]), 10)
            assert lost == ({}, {})  # none is reported lost
            assert await scalar(aconn, "select lease_expires > now() + interval '50 s' from pgsink.lanes"
                                       " where sink_id = %s and lane = 1", refs.sink_id)  # the free one renewed
    finally:
        await other.close()
