"""The delivery stage end to end: real Postgres, real aiohttp receiver on 127.0.0.1, real workers."""

from __future__ import annotations

import asyncio
import base64
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
import pytest

from pgsink.engine import secrets
from pgsink.engine.deliver import DeliveryStage
from pgsink.engine.queue import backoff_floor
from tests.queue_helpers import (
    Row,
    SinkRefs,
    create_sink,
    enqueue_changes,
    enqueue_reads,
    scalar,
    set_sink,
    spawn_worker,
    stop_worker,
    wait_for,
)
from tests.receiver import Received, Receiver, start_receiver

FAST = dict(poll_interval=0.1, backoff_base=0.05, backoff_cap=0.4, lease_seconds=5.0, shutdown_grace=5.0)


def stage_for(dsn: str, worker_id: str = "w1", **kw: Any) -> DeliveryStage:
    return DeliveryStage(dsn, worker_id=worker_id, **{**FAST, **kw})


@asynccontextmanager
async def running(*stages: DeliveryStage) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(s.run()) for s in stages]
    try:
        yield
    finally:
        for s in stages:
            s.stop()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        for r in results:
            if isinstance(r, BaseException):
                raise r


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rcv = await start_receiver(group_of=lambda m: str(m["record"]["g"]), seq_of=lambda m: int(m["record"]["seq"]))
    yield rcv
    await rcv.close()


def seq_rows(groups: list[str], seq: int) -> list[Row]:
    return [Row({"g": g, "seq": seq}, g) for g in groups]


async def attempts(conn: psycopg.AsyncConnection, sink_id: Any) -> list[tuple[Any, ...]]:
    cur = await conn.execute(
        "select started_at, duration_ms, http_status, error, delivered, group_key from pgsink.attempts"
        " where sink_id = %s order by id", (sink_id,))
    return await cur.fetchall()


def groups_in(req: Received) -> set[str]:
    return {str(m["record"]["g"]) for m in req.messages}


# ---------------------------------------------------------------- message format


async def _lsn_idx(conn: psycopg.AsyncConnection, mid: int) -> tuple[int, int]:
    cur = await conn.execute("select commit_lsn, commit_idx from pgsink.messages where id = %s", (mid,))
    row = await cur.fetchone()
    assert row is not None
    return row[0], row[1]


async def test_bodies_and_headers_match_sequin_golden_examples(
        fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    rcv = await start_receiver()
    try:
        enc = secrets.encrypt(orjson.dumps({"authorization": "Bearer s3cret"}))
        single = await create_sink(aconn, rcv.url + "/base", name="orders_single", batch=False, batch_size=1,
                                   http_endpoint_path="/single", annotations={"team": "orders"},
                                   endpoint_headers={"x-static": "yes"}, source_annotations={"env": "test"})
        await aconn.execute("update pgsink.http_endpoints set encrypted_headers = %s where id = %s",
                            (enc, single.endpoint_id))
        batched = await create_sink(aconn, rcv.url, name="orders_batched", batch_size=10, batch_timeout_ms=200,
                                    http_endpoint_path="batched", lane_count=1,
                                    endpoint_headers={"Content-Encoding": "gzip"})
        when = datetime(2024, 3, 20, 15, 30, 0, 123456, tzinfo=UTC)
        changes = [
            Row({}, "7", record_json='{"id": 7, "price": 10.50, "qty": 3, "tags": ["a"], "at": "2024-03-20T15:30:00Z"}',
                transaction_annotations={"username": "paul"}),
            Row({"id": 7, "price": 9.99, "qty": 3}, "7", action="update", changes={"price": 10.50}),
        ]
        s_ids = await enqueue_changes(aconn, single.sink_id, changes, committed_at=when)
        b_ids = await enqueue_changes(aconn, batched.sink_id, changes, committed_at=when)
        r_ids = await enqueue_reads(aconn, batched.sink_id, "bf-42", ("public", "orders"),
                                    [("8", {"id": 8, "price": 1.5})], read_at=when)
        async with running(stage_for(fresh_db)):
            await rcv.wait_until(lambda: len(rcv.delivered()) >= 5, what="5 messages")
    finally:
        await rcv.close()

    def golden(refs: SinkRefs, name: str, annotations: dict[str, Any], lsn: int, idx: int, record: Any,
               changes: Any, action: str, tx: Any) -> dict[str, Any]:
        return {
            "record": record,
            "changes": changes,
            "action": action,
            "metadata": {
                "table_schema": "public",
                "table_name": "orders",
                "idempotency_key": base64.b64encode(f"{lsn}:{idx}".encode()).decode(),
                "commit_timestamp": "2024-03-20T15:30:00.123456Z",
                "commit_lsn": lsn,
                "commit_idx": idx,
                "database_name": "app",
                "consumer": {"id": str(refs.sink_id), "name": name, "annotations": annotations},
                "database": {"id": str(refs.source_id), "name": "app", "annotations": {"env": "test"},
                             "database": "appdb", "hostname": "db.example.com"},
                "transaction_annotations": tx,
            },
        }

    rec0 = {"id": 7, "at": "2024-03-20T15:30:00Z", "qty": 3, "tags": ["a"], "price": 10.50}
    rec1 = {"id": 7, "qty": 3, "price": 9.99}
    by_path = {r.path: [x for x in rcv.requests if x.path == r.path] for r in rcv.requests}

    # batch off: one message per request, in order
    s_reqs = by_path["/base/single"]
    assert len(s_reqs) == 2 and all(r.ok for r in s_reqs)
    lsn, _ = await _lsn_idx(aconn, s_ids[0])
    assert [r.json for r in s_reqs] == [
        golden(single, "orders_single", {"team": "orders"}, lsn, 0, rec0, None, "insert", {"username": "paul"}),
        golden(single, "orders_single", {"team": "orders"}, lsn, 1, rec1, {"price": 10.50}, "update", None),
    ]
    assert list(s_reqs[0].json) == ["record", "changes", "action", "metadata"]
    assert list(s_reqs[0].json["metadata"]) == [
        "table_schema", "table_name", "idempotency_key", "commit_timestamp", "commit_lsn", "commit_idx",
        "database_name", "consumer", "database", "transaction_annotations"]
    assert b'"price": 10.50' in s_reqs[0].body  # exact digits of the jsonb numeric
    h = s_reqs[0].headers
    assert h["authorization"] == "Bearer s3cret" and h["x-static"] == "yes"
    assert h["content-type"] == "application/json"

    # batch on: {"data": [...]}, gzip when the endpoint asks for it; a backfill read
    b_reqs = by_path["/batched"]
    assert all(r.ok for r in b_reqs) and b_reqs[0].headers["content-encoding"] == "gzip"
    assert b_reqs[0].wire_length < len(b_reqs[0].body)
    lsn, _ = await _lsn_idx(aconn, b_ids[0])
    data = [m for r in b_reqs for m in r.json["data"]]
    read = golden(batched, "orders_batched", {}, 0, 0, {"id": 8, "price": 1.5}, None, "read", None)
    read["metadata"]["idempotency_key"] = base64.b64encode(b"bf-42:8").decode()
    assert data == [
        golden(batched, "orders_batched", {}, lsn, 0, rec0, None, "insert", {"username": "paul"}),
        golden(batched, "orders_batched", {}, lsn, 1, rec1, {"price": 10.50}, "update", None),
        read,
    ]
    assert len(b_reqs) == 1  # batch_timeout_ms let the batch fill
    assert r_ids and await scalar(aconn, "select count(*) from pgsink.attempts where delivered") == 3


# ---------------------------------------------------------------- ordering across workers


async def test_group_order_holds_across_two_worker_processes_with_random_failures(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    rng = random.Random(11)
    stubborn = {"n": 0}
    both_leasing = asyncio.Event()

    async def flaky(req: Received) -> int:
        # the first requests wait until both workers hold lanes, so both take part however fast one starts
        await asyncio.wait_for(both_leasing.wait(), 30)
        await asyncio.sleep(rng.random() * 0.004)  # ok-sleep: endpoint latency, to let requests overlap
        if "g7" in groups_in(req) and stubborn["n"] < 4:
            stubborn["n"] += 1
            return 500  # g7's batch fails past park_after: its groups get parked
        return 500 if rng.random() < 0.2 else 200

    receiver.behavior = flaky
    refs = await create_sink(aconn, receiver.url, lane_count=8, batch_size=5, batch_timeout_ms=0)
    groups = [f"g{i}" for i in range(30)]
    for seq in range(1, 4):
        await enqueue_changes(aconn, refs.sink_id, seq_rows(groups, seq))
    opts = dict(FAST, backoff_base=0.02, backoff_cap=0.2, max_lanes_per_sink=4)  # 8 lanes: both must work
    owners: set[str] = set()
    procs = [await spawn_worker(fresh_db, f"proc{i}", **opts) for i in range(2)]
    sampler = asyncio.create_task(_sample_lease_owners(fresh_db, owners, both_leasing))
    try:
        for seq in range(4, 9):  # more arrive while the workers run
            await enqueue_changes(aconn, refs.sink_id, seq_rows(groups, seq))
        await receiver.wait_until(lambda: len(receiver.delivered()) >= 30 * 8, timeout=60, what="all messages")
    finally:
        sampler.cancel()
        codes = [await stop_worker(p) for p in procs]
    assert codes == [0, 0]
    assert owners == {"proc0", "proc1"}  # both workers took part
    assert receiver.order_violations == []
    assert receiver.overlap_violations == []
    assert len(receiver.delivered()) == 30 * 8
    assert await scalar(aconn, "select count(*) from pgsink.attempts where group_key is not null and delivered") > 0
    assert await scalar(aconn, "select count(distinct lease_owner) from pgsink.lanes") == 0
    assert await scalar(aconn, "select count(*) from pgsink.parked_messages") == 0


async def _sample_lease_owners(dsn: str, owners: set[str], all_seen: asyncio.Event | None = None,
                               expected: frozenset[str] = frozenset({"proc0", "proc1"})) -> None:
    """Record which workers hold lane leases while a test runs (until cancelled); set ``all_seen``
    once every expected worker has held one."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while True:
            cur = await conn.execute("select distinct split_part(lease_owner, ':', 1) from pgsink.lanes"
                                     " where lease_owner is not null")
            owners.update(r[0] for r in await cur.fetchall())
            if all_seen is not None and expected <= owners:
                all_seen.set()
            await asyncio.sleep(0.01)  # ok-sleep: sampling interval of the lease watcher


# ---------------------------------------------------------------- retries


async def test_a_lane_lease_taken_by_another_worker_stops_its_request_here(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    released = asyncio.Event()

    async def hang(req: Received) -> int:
        await released.wait()  # the endpoint holds the request past the lease
        return 200

    receiver.behavior = hang
    refs = await create_sink(aconn, receiver.url, batch_size=10, lane_count=1)
    await enqueue_changes(aconn, refs.sink_id, seq_rows(["a"], 1))
    stage = stage_for(fresh_db, lease_seconds=1.5)  # renewed every 0.5 s
    async with running(stage):
        await receiver.wait_until(lambda: len(receiver.requests) == 1, what="the request in flight")
        # another worker took the lane (as after renewals failed for a whole lease): it sends the batch
        # again, so this worker's request must stop rather than race that worker's later batches
        await aconn.execute("update pgsink.lanes set lease_owner = 'other', lease_expires = now() + interval '1 h'"
                            " where sink_id = %s", (refs.sink_id,))
        await wait_for(lambda: _no_lane_tasks(stage, refs.sink_id), timeout=10, what="the lane task to stop")
        released.set()
    assert await scalar(aconn, "select count(*) from pgsink.attempts") == 0  # it never acked
    assert await scalar(aconn, "select lease_owner from pgsink.lanes where sink_id = %s", refs.sink_id) == "other"


async def _no_lane_tasks(stage: DeliveryStage, sink_id: Any) -> bool:
    runner = stage._runners.get(sink_id)  # noqa: SLF001 - the stage's own view of what it delivers
    return runner is not None and not runner.lane_tasks


async def test_500_then_200_is_retried_with_growing_delays(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    answers = iter([500, 500, 500, 500, 200])
    receiver.behavior = lambda req: next(answers)
    refs = await create_sink(aconn, receiver.url, batch_size=1, lane_count=1)
    await enqueue_changes(aconn, refs.sink_id, seq_rows(["a"], 1))
    async with running(stage_for(fresh_db, park_after=10, backoff_base=0.1, backoff_cap=2.0)):
        await receiver.wait_until(lambda: len(receiver.delivered()) == 1)
    rows = await attempts(aconn, refs.sink_id)
    assert [(r[2], r[4]) for r in rows] == [(500, False)] * 4 + [(200, True)]
    assert await scalar(aconn, "select response_body from pgsink.attempts order by id limit 1") == "failing with 500"
    _assert_growing_gaps(rows, base=0.1, cap=2.0)
    lane = await (await aconn.execute("select failures, retry_at, in_flight, delivered_id > 0 from pgsink.lanes"
                                      )).fetchone()
    assert lane == (0, None, 0, True)


async def test_hanging_endpoint_times_out_and_is_retried(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    calls = {"n": 0}

    async def hang_twice(req: Received) -> int:
        calls["n"] += 1
        return await receiver.hang() if calls["n"] <= 3 else 200

    receiver.behavior = hang_twice
    refs = await create_sink(aconn, receiver.url, batch_size=1, lane_count=1, request_timeout_ms=250)
    await enqueue_changes(aconn, refs.sink_id, seq_rows(["a"], 1))
    async with running(stage_for(fresh_db, park_after=10, backoff_base=0.1, backoff_cap=2.0)):
        await receiver.wait_until(lambda: len(receiver.delivered()) == 1)
    rows = await attempts(aconn, refs.sink_id)
    assert [r[4] for r in rows] == [False, False, False, True]
    for r in rows[:3]:
        assert r[2] is None and "timed out after 250 ms" in r[3] and r[1] >= 240
    _assert_growing_gaps(rows, base=0.1, cap=2.0)


def _assert_growing_gaps(rows: list[tuple[Any, ...]], *, base: float, cap: float) -> None:
    """Each retry waited at least its back-off floor after the failed request ended; waits grew."""
    waits = [(b[0] - a[0]).total_seconds() - a[1] / 1000 for a, b in zip(rows, rows[1:], strict=False)]
    for n, w in enumerate(waits, start=1):
        assert w >= backoff_floor(n, base, cap) - 0.02, (n, waits)
    assert waits[-1] > waits[0] * 2, waits


async def test_unreachable_endpoint_and_bad_header_are_failed_attempts_not_crashes(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    refused = await create_sink(aconn, f"http://127.0.0.1:{closed_port}", name="refused", lane_count=1)
    bad = await create_sink(aconn, receiver.url, name="bad_header", lane_count=1,
                            endpoint_headers={"x-bad": "a\r\nInjected: 1"})
    fine = await create_sink(aconn, receiver.url, name="fine", lane_count=1)
    for refs in (refused, bad, fine):
        await enqueue_changes(aconn, refs.sink_id, seq_rows(["a"], 1))

    async def failed_twice(sink_id: Any) -> bool:
        return await scalar(aconn, "select count(*) from pgsink.attempts where sink_id = %s and error is not null",
                            sink_id) >= 2

    async with running(stage_for(fresh_db)):
        await receiver.wait_until(lambda: len(receiver.delivered()) == 1)
        await wait_for(lambda: failed_twice(refused.sink_id), what="refused connections to be retried")
        await wait_for(lambda: failed_twice(bad.sink_id), what="the bad header to fail attempts")
    assert "Cannot connect" in await scalar(aconn, "select error from pgsink.attempts where sink_id = %s limit 1",
                                            refused.sink_id)
    assert await scalar(aconn, "select last_error from pgsink.lanes where sink_id = %s", bad.sink_id)
    assert len(receiver.requests) == 1  # nothing with the injected header reached the receiver


# ---------------------------------------------------------------- parking


async def test_failing_group_does_not_delay_other_groups(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    healed = asyncio.Event()
    receiver.behavior = lambda req: 500 if "poison" in groups_in(req) and not healed.is_set() else 200
    refs = await create_sink(aconn, receiver.url, batch_size=1, lane_count=1)  # one lane: all share the cursor
    await enqueue_changes(aconn, refs.sink_id, seq_rows(["poison"], 1))
    others = [f"o{i}" for i in range(20)]
    await enqueue_changes(aconn, refs.sink_id, seq_rows(others, 1))
    await enqueue_changes(aconn, refs.sink_id, seq_rows(["poison"], 2))
    await enqueue_changes(aconn, refs.sink_id, seq_rows(others, 2))

    async def poison_retried_on_its_own() -> bool:
        return bool(await scalar(aconn, "select attempts >= 5 from pgsink.parked_groups where group_key = 'poison'"))

    async with running(stage_for(fresh_db)):
        await receiver.wait_until(lambda: len(receiver.delivered()) == 40, what="every other group")
        assert not any("poison" in groups_in(r) for r in receiver.requests if r.ok)
        await wait_for(poison_retried_on_its_own, what="the parked group to keep retrying")
        parked = await (await aconn.execute(
            "select state, attempts from pgsink.parked_messages order by id")).fetchall()
        assert [p[0] for p in parked] == ["parked", "parked"]  # seq 2 parked behind seq 1
        healed.set()
        await receiver.wait_until(lambda: len(receiver.delivered()) == 42, what="the healed group")
        await wait_for(lambda: _no_parked_groups(aconn), what="the drained group to be dropped")
    assert receiver.order_violations == [] and receiver.overlap_violations == []
    assert await scalar(aconn, "select count(*) from pgsink.parked_messages") == 0


async def test_without_grouping_a_failing_message_is_parked_alone(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    healed = asyncio.Event()
    receiver.behavior = lambda req: 500 if "bad" in groups_in(req) and not healed.is_set() else 200
    refs = await create_sink(aconn, receiver.url, batch_size=1, lane_count=2, message_grouping=False)
    ids = await enqueue_changes(aconn, refs.sink_id, [Row({"g": "bad", "seq": 1}, "1")] +
                                [Row({"g": f"o{i}", "seq": 1}, "1") for i in range(10)])
    async with running(stage_for(fresh_db)):
        await receiver.wait_until(lambda: len(receiver.delivered()) == 10, what="the other messages")
        key = await scalar(aconn, "select group_key from pgsink.parked_groups")
        assert key == f"pgsink:message:{ids[0]}"
        healed.set()
        await receiver.wait_until(lambda: len(receiver.delivered()) == 11, what="the parked message")
        await wait_for(lambda: _no_parked_groups(aconn), what="its group to be dropped")
    assert await scalar(aconn, "select count(*) from pgsink.messages where group_key is not null") == 0


async def _no_parked_groups(conn: psycopg.AsyncConnection) -> bool:
    return await scalar(conn, "select count(*) from pgsink.parked_groups") == 0


async def test_endpoint_failing_for_everyone_backs_off_without_parking(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    receiver.behavior = lambda req: 503
    refs = await create_sink(aconn, receiver.url, batch_size=2, lane_count=4)
    await enqueue_changes(aconn, refs.sink_id, seq_rows([f"k{i}" for i in range(16)], 1))

    async def every_lane_failed_past_park_after() -> bool:
        return bool(await scalar(aconn, "select min(failures) >= 5 from pgsink.lanes"))

    async with running(stage_for(fresh_db)):
        await wait_for(every_lane_failed_past_park_after, what="lanes to keep failing")
    assert await scalar(aconn, "select count(*) from pgsink.parked_messages") == 0
    assert await scalar(aconn, "select count(*) from pgsink.lanes where delivered_id > 0") == 0


async def test_max_retry_count_discards_and_keeps_the_message(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    receiver.behavior = lambda req: 500 if "poison" in groups_in(req) else 200
    refs = await create_sink(aconn, receiver.url, batch_size=1, lane_count=1, max_retry_count=4)
    ids = await enqueue_changes(aconn, refs.sink_id, seq_rows(["poison"], 1) + seq_rows(["ok"], 1))
    later = await enqueue_changes(aconn, refs.sink_id, seq_rows(["poison"], 2))

    async def both_discarded() -> bool:
        return await scalar(aconn, "select count(*) from pgsink.parked_messages where state = 'discarded'") == 2

    async with running(stage_for(fresh_db)):
        await wait_for(both_discarded, what="poison messages to be discarded")
        await wait_for(lambda: _no_parked_groups(aconn), what="the group to move on and drain")
    rows = await (await aconn.execute(
        "select id, attempts, state, discarded_at is not null, payload from pgsink.parked_messages order by id"
    )).fetchall()
    assert rows == [(ids[0], 5, "discarded", True, None), (later[0], 5, "discarded", True, None)]
    poison_requests = [r for r in receiver.requests if "poison" in groups_in(r)]
    assert len(poison_requests) == 10  # 1 attempt + 4 retries, each
    assert [m["record"]["g"] for m in receiver.delivered()] == ["ok"]


async def test_max_retry_count_zero_discards_at_the_lane(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    receiver.behavior = lambda req: 500 if "poison" in groups_in(req) else 200
    refs = await create_sink(aconn, receiver.url, batch_size=1, lane_count=1, max_retry_count=0)
    await enqueue_changes(aconn, refs.sink_id, seq_rows(["poison", "ok"], 1))
    async with running(stage_for(fresh_db)):
        await receiver.wait_until(lambda: len(receiver.delivered()) == 1)
    assert await scalar(aconn, "select state || ':' || attempts from pgsink.parked_messages") == "discarded:1"
    assert await scalar(aconn, "select count(*) from pgsink.parked_groups") == 0


# ---------------------------------------------------------------- back-pressure


async def test_max_ack_pending_is_never_exceeded_across_workers(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    failed: set[str] = set()

    async def slow(req: Received) -> int:
        await asyncio.sleep(0.02)  # ok-sleep: a slow endpoint keeps messages in flight
        g = sorted(groups_in(req))[0]
        if g.endswith("3") and g not in failed:  # some fail once: backing off still counts as pending
            failed.add(g)
            return 500
        return 200

    receiver.behavior = slow
    refs = await create_sink(aconn, receiver.url, batch_size=2, lane_count=16, max_ack_pending=5,
                             batch_timeout_ms=0)
    groups = [f"m{i}" for i in range(40)]
    await enqueue_changes(aconn, refs.sink_id, seq_rows(groups, 1) + seq_rows(groups, 2))
    async with running(stage_for(fresh_db, "a"), stage_for(fresh_db, "b")):
        await receiver.wait_until(lambda: len(receiver.delivered()) == 80, timeout=60)
    assert receiver.max_in_flight <= 5
    assert receiver.max_in_flight >= 3  # and the budget was actually used concurrently
    assert receiver.order_violations == [] and receiver.overlap_violations == []


# ---------------------------------------------------------------- crashes, pause, shutdown


async def test_kill_9_mid_request_redelivers_the_batch_with_the_same_keys(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    first = asyncio.Event()

    async def hang_first(req: Received) -> int:
        if not first.is_set():
            first.set()
            return await receiver.hang()
        return 200

    receiver.behavior = hang_first
    refs = await create_sink(aconn, receiver.url, batch_size=5, lane_count=1, batch_timeout_ms=0)
    await enqueue_changes(aconn, refs.sink_id, seq_rows(["a", "b", "c", "d", "e"], 1))
    proc = await spawn_worker(fresh_db, "doomed", **{**FAST, "lease_seconds": 1.5})
    try:
        await receiver.wait_until(lambda: len(receiver.requests) == 1, timeout=30, what="the first request")
    finally:
        proc.kill()
        await proc.wait()
    hung = receiver.requests[0]
    assert hung.status is None
    async with running(stage_for(fresh_db, "survivor")):
        await receiver.wait_until(lambda: len(receiver.delivered()) == 5, timeout=30)
    assert receiver.delivered_keys() == [m["metadata"]["idempotency_key"] for m in hung.messages]
    assert [m["record"]["g"] for m in receiver.delivered()] == ["a", "b", "c", "d", "e"]
    assert [r[4] for r in await attempts(aconn, refs.sink_id)] == [True]


async def test_paused_sink_delivers_nothing_and_resumes_where_it_stopped(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    active = await create_sink(aconn, receiver.url, name="active", http_endpoint_path="active", lane_count=2)
    paused = await create_sink(aconn, receiver.url, name="paused", http_endpoint_path="paused", lane_count=2)

    def on(path: str) -> list[dict[str, Any]]:
        return [m for r in receiver.requests if r.ok and r.path == path for m in r.messages]

    stage = stage_for(fresh_db)
    async with running(stage):
        await enqueue_changes(aconn, paused.sink_id, seq_rows(["p"], 1))
        await receiver.wait_until(lambda: len(on("/paused")) == 1)
        await set_sink(aconn, paused.sink_id, status="paused")
        await wait_for(lambda: _not_delivering(stage, paused.sink_id), what="the pause to take effect")
        await enqueue_changes(aconn, paused.sink_id, seq_rows(["p"], 2) + seq_rows(["p"], 3))
        await enqueue_changes(aconn, active.sink_id, seq_rows(["x"], 1))
        await receiver.wait_until(lambda: len(on("/active")) == 1)
        assert len(on("/paused")) == 1
        await set_sink(aconn, paused.sink_id, status="active")
        await receiver.wait_until(lambda: len(on("/paused")) == 3)
    assert [m["record"]["seq"] for m in on("/paused")] == [1, 2, 3]
    assert receiver.order_violations == []


async def _not_delivering(stage: DeliveryStage, sink_id: Any) -> bool:
    return sink_id not in stage.active_sinks


async def test_stop_waits_for_in_flight_requests_then_releases_leases(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    started = asyncio.Event()

    async def slow(req: Received) -> int:
        started.set()
        await asyncio.sleep(0.3)  # ok-sleep: a request still in flight when stop() is called
        return 200

    receiver.behavior = slow
    refs = await create_sink(aconn, receiver.url, batch_size=1, lane_count=4)
    await enqueue_changes(aconn, refs.sink_id, seq_rows(["a"], 1))
    stage = stage_for(fresh_db)
    task = asyncio.create_task(stage.run())
    await asyncio.wait_for(started.wait(), 20)
    stage.stop()
    await asyncio.wait_for(task, 20)
    assert len(receiver.delivered()) == 1
    assert await scalar(aconn, "select count(*) from pgsink.attempts where delivered") == 1
    assert await scalar(aconn, "select count(*) from pgsink.lanes where lease_owner is not null or in_flight > 0") == 0


async def test_stop_after_the_grace_period_abandons_and_releases(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    receiver.behavior = lambda req: receiver.hang()
    refs = await create_sink(aconn, receiver.url, batch_size=1, lane_count=1)
    await enqueue_changes(aconn, refs.sink_id, seq_rows(["a"], 1))
    stage = stage_for(fresh_db, shutdown_grace=0.2)
    task = asyncio.create_task(stage.run())
    await receiver.wait_until(lambda: len(receiver.requests) == 1)
    stage.stop()
    await asyncio.wait_for(task, 20)
    lane = await (await aconn.execute("select lease_owner, in_flight, delivered_id from pgsink.lanes")).fetchone()
    assert lane == (None, 0, 0)  # free for the next worker at once, nothing acknowledged


async def test_a_sink_whose_config_cannot_be_used_leaves_the_others_flowing(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Building one sink's setup raising (a value nothing can render, a future bug) used to stop the
    whole delivery stage on every start."""
    from pgsink.engine import deliver

    real = deliver.RenderContext.for_sink

    def for_sink(sink: Any, source: Any) -> Any:
        if sink.name == "broken":
            raise ValueError("cannot render this sink's metadata")
        return real(sink, source)

    monkeypatch.setattr(deliver.RenderContext, "for_sink", for_sink)
    good = await create_sink(aconn, receiver.url, name="good", lane_count=1)
    broken = await create_sink(aconn, receiver.url, name="broken", lane_count=1)
    await enqueue_changes(aconn, broken.sink_id, seq_rows(["b"], 1))
    await enqueue_changes(aconn, good.sink_id, seq_rows(["g"], 1))
    async with running(stage_for(fresh_db)):
        await receiver.wait_until(lambda: len(receiver.delivered()) == 1)
    assert await scalar(aconn, "select count(*) from pgsink.attempts where sink_id = %s", broken.sink_id) == 0


async def test_an_unexpected_error_fails_the_batch_like_any_failure_and_the_stage_goes_on(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug of ours hit by one sink's batch is an internal-error attempt of that batch (visible in attempts
    and lanes.last_error): it backs off, then its groups park, as for any failing batch. It used to stop
    the stage and every sink with it."""
    from pgsink.engine import sink_runner

    real = sink_runner._prepare

    async def prepare(setup: Any, messages: Any) -> Any:
        if setup.sink.name == "broken":
            raise RuntimeError("a bug")
        return await real(setup, messages)

    monkeypatch.setattr(sink_runner, "_prepare", prepare)
    good = await create_sink(aconn, receiver.url, name="good", lane_count=1)
    broken = await create_sink(aconn, receiver.url, name="broken", lane_count=1)
    await enqueue_changes(aconn, broken.sink_id, seq_rows(["b"], 1))
    await enqueue_changes(aconn, good.sink_id, seq_rows(["g"], 1))
    # and a parked group of the broken sink, which its retrier takes on its own
    await aconn.execute("insert into pgsink.parked_groups (sink_id, group_key, lane) values (%s, 'p', 0)",
                        (broken.sink_id,))
    await aconn.execute(
        "insert into pgsink.parked_messages (sink_id, id, lane, group_key, action, commit_lsn, commit_idx,"
        " committed_at, payload) values (%s, 0, 0, 'p', 'read', 0, 0, now(), %s)",
        (broken.sink_id, '{"backfill_id": "b", "table_schema": "public", "table_name": "t", "record_pk": "1",'
                         ' "record": {"id": 1}}'))

    async def failed_then_parked() -> bool:
        """The lane's batch failed like any failing batch, then its group was parked; the parked group failed too."""
        return bool(await scalar(
            aconn, "select count(*) filter (where group_key is null) >= 3 and count(*) filter (where group_key = 'p')"
                   " >= 2 and exists (select 1 from pgsink.parked_messages where sink_id = %s and group_key = 'b')"
                   " from pgsink.attempts where sink_id = %s and error = 'internal error: RuntimeError: a bug'",
            broken.sink_id, broken.sink_id))
    async with running(stage_for(fresh_db)):
        await wait_for(failed_then_parked, what="internal-error attempts, then the broken batch's group parked")
        await enqueue_changes(aconn, good.sink_id, seq_rows(["g"], 1))
        await receiver.wait_until(lambda: len(receiver.delivered()) == 2)
    assert await scalar(aconn, "select last_error from pgsink.lanes where sink_id = %s",
                        broken.sink_id) == "internal error: RuntimeError: a bug"
    assert await scalar(aconn, "select attempts from pgsink.parked_messages where id = 0") == 0  # not its fault
