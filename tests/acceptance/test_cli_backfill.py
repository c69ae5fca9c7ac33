"""`pgsink backfill start|list|show|cancel` as subprocesses, with a worker running the job."""

from __future__ import annotations

import asyncio
import re
import uuid

import psycopg

from pgsink.engine.backfill import BackfillStage
from tests.acceptance.test_cli_ops import pgsink
from tests.helpers import add_sink, add_source
from tests.queue_helpers import scalar, wait_for


async def test_backfill_cli_flow(fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    await aconn.execute("create table items (id int primary key, n int)")
    await aconn.execute("insert into items select g, g from generate_series(1, 500) g")
    await aconn.execute("analyze items")
    source_id = await add_source(aconn, fresh_db, create=False, slot="unused")
    await add_sink(aconn, source_id, name="orders")

    out = pgsink(fresh_db, "backfill", "start", "--sink", "orders", "--table", "items", "--page-size", "100")
    bid = re.search(r"backfill ([0-9a-f-]{36}) of items for sink orders started", out)
    assert bid, out
    assert "pending" in pgsink(fresh_db, "backfill", "list")
    stage = BackfillStage(fresh_db, worker_id="cli", poll_interval=0.1)
    task = asyncio.create_task(stage.run())
    try:
        await wait_for(lambda: scalar(aconn, "select state = 'completed' from pgsink.backfills"), what="done")
    finally:
        stage.stop()
        await asyncio.wait_for(task, 30)
    out = pgsink(fresh_db, "backfill", "show", bid.group(1), "--watch")
    assert "state: completed" in out and "rows_done: 500" in out and "percent: 100.0" in out
    assert '"id": 500' in out  # the cursor
    assert "500/500 rows" in out  # the progress bar's last frame
    out = pgsink(fresh_db, "backfill", "start", "--sink", "orders", "--table", "items",
                 "--sort-column", "n", "--start-position", "250")
    partial = re.search(r"backfill ([0-9a-f-]{36})", out)
    assert partial and "cancelled" in pgsink(fresh_db, "backfill", "cancel", partial.group(1))
    assert await scalar(aconn, "select start_position from pgsink.backfills where sort_column = 'n'") == 250
    assert "not pending or running" in pgsink(fresh_db, "backfill", "cancel", partial.group(1), code=1)
    assert "not a backfill id" in pgsink(fresh_db, "backfill", "show", "nope", code=2)
    assert "no backfill" in pgsink(fresh_db, "backfill", "show", str(uuid.uuid4()), code=1)
    assert "does not exist" in pgsink(fresh_db, "backfill", "start", "--sink", "nope", "--table", "items", code=1)


async def test_backfill_start_wait_exits_1_and_says_why_when_the_backfill_fails(
        fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    import os
    import sys

    await aconn.execute("create table items (id int primary key, n int)")
    source_id = await add_source(aconn, fresh_db, create=False, slot="unused")
    await add_sink(aconn, source_id, name="orders")
    stage = BackfillStage(fresh_db, worker_id="cli", poll_interval=0.1)
    task = asyncio.create_task(stage.run())
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pgsink.cli", "backfill", "start", "--sink", "orders", "--table", "items",
            "--sort-column", "no_such_column", "--start-position", "1", "--wait", "--database-url", fresh_db,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": "200"})
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        stage.stop()
        await asyncio.wait_for(task, 30)
    assert await scalar(aconn, "select state from pgsink.backfills") == "failed"
    assert proc.returncode == 1, (out + err).decode()
    assert "failed" in err.decode() and "no_such_column" in err.decode()
