"""`pgsink status|messages|message show|replay|retry|discard` as subprocesses, against a real queue."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest

from pgsink.engine.deliver import DeliveryStage
from tests.helpers import add_sink, add_source
from tests.queue_helpers import Row, enqueue_changes, scalar, wait_for
from tests.receiver import Receiver, start_receiver


def pgsink(dsn: str, *args: str, code: int = 0) -> str:
    res = subprocess.run([sys.executable, "-m", "pgsink.cli", *args, "--database-url", dsn],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    both = res.stdout + res.stderr
    assert res.returncode == code, f"pgsink {' '.join(args)} exited {res.returncode}:\n{both}"
    return " ".join(re.sub("[\u2500-\u257f]", " ", both).split())  # table borders out


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rcv = await start_receiver()
    rcv.behavior = lambda req: 500 if any(m["record"]["g"] == "a" for m in req.messages) else 200
    yield rcv
    await rcv.close()


async def test_inspect_and_repair_from_the_cli(
        fresh_db: str, aconn: psycopg.AsyncConnection, receiver: Receiver) -> None:
    slot = f"ops_{uuid.uuid4().hex[:8]}"
    await aconn.execute("select pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    try:
        source_id = await add_source(aconn, fresh_db, slot=slot, create=False)
        sink_id = await add_sink(aconn, source_id, name="orders", url=receiver.url, batch_size=1, lane_count=1)
        ids = await enqueue_changes(aconn, sink_id, [Row({"g": g}, g) for g in ("a", "b", "c")])

        out = pgsink(fresh_db, "status")
        assert "orders" in out and "active" in out and " 3 " in out
        assert re.search(r"active 3 [0-9.]+ 0.0 0 0 0 [0-9.]+ (B|kB|MB)", out)  # slot lag on the source

        stage = DeliveryStage(fresh_db, worker_id="cli", poll_interval=0.1, backoff_base=0.05, backoff_cap=0.4)
        task = asyncio.create_task(stage.run())
        try:
            await receiver.wait_until(lambda: len(receiver.delivered()) == 2, what="b and c")
            await wait_for(lambda: scalar(aconn, "select count(*) = 1 from pgsink.parked_groups"), what="parking")
        finally:
            stage.stop()
            await asyncio.wait_for(task, 30)

        out = pgsink(fresh_db, "messages", "--sink", "orders")
        assert f"{ids[0]} parked insert public.orders a a" in out
        assert out.count(" parked ") == 1 and "pending" not in out
        assert str(ids[0]) in pgsink(fresh_db, "messages", "--sink", "orders", "--state", "failed")
        assert "no messages" in pgsink(fresh_db, "messages", "--sink", "orders", "--state", "discarded")

        out = pgsink(fresh_db, "message", "show", str(ids[0]), "--sink", "orders")
        assert f"message {ids[0]} of sink orders: parked" in out
        assert '"g": "a"' in out
        assert "failed HTTP 500" in out and "response: failing with 500" in out
        assert "delivered" in pgsink(fresh_db, "message", "show", str(ids[1]), "--sink", "orders")

        assert "discarded" in pgsink(fresh_db, "discard", str(ids[0]), "--sink", "orders")
        assert str(ids[0]) in pgsink(fresh_db, "messages", "--sink", "orders", "--state", "discarded")
        assert "parked again" in pgsink(fresh_db, "retry", "--sink", "orders", "--message", str(ids[0]))
        assert "due now (1 parked message(s))" in pgsink(fresh_db, "retry", "--sink", "orders", "--group", "a")

        assert "replayed 3 change(s)" in pgsink(fresh_db, "replay", "--sink", "orders", "--since", "1h")
        assert "replayed 0 change(s)" in pgsink(fresh_db, "replay", "--sink", "orders", "--since", "1h",
                                                 "--action", "delete")
        assert await scalar(aconn, "select count(*) from pgsink.messages") == 6

        # errors say what to do
        assert "is not parked" in pgsink(fresh_db, "discard", str(ids[1]), "--sink", "orders", code=1)
        assert "does not exist" in pgsink(fresh_db, "messages", "--sink", "nope", code=1)
        assert "Cannot read the time" in pgsink(fresh_db, "replay", "--sink", "orders", "--since", "soon", code=2)
        assert "exactly one of" in pgsink(fresh_db, "retry", "--sink", "orders", code=2)
        assert "has no message 999999" in pgsink(fresh_db, "message", "show", "999999", "--sink", "orders", code=1)
    finally:
        await aconn.execute("select pg_drop_replication_slot(%s)", (slot,))
