"""Transaction annotations from the application's transaction to the webhook body, through capture and delivery."""

from __future__ import annotations

from pathlib import Path

import psycopg

from tests.helpers import add_sink, add_source, fetchval, wait_for
from tests.integration.test_capture import _source, running_reader
from tests.integration.test_deliver import running, stage_for
from tests.receiver import start_receiver


async def test_transaction_annotations_reach_every_message_of_their_transaction_only(
        aconn: psycopg.AsyncConnection, fresh_db: str, tmp_path: Path) -> None:
    await aconn.execute("create table orders (id int primary key, status text)")
    rcv = await start_receiver()
    try:
        source_id = await add_source(aconn, fresh_db)
        await add_sink(aconn, source_id, name="all", url=rcv.url + "/all", batch_size=10, batch_timeout_ms=100)
        hook = tmp_path / "by_user.py"
        hook.write_text("def filter(action, record, changes, metadata):\n"
                        "    return (metadata['transaction_annotations'] or {}).get('user') == 'ann'\n")
        await add_sink(aconn, source_id, name="ann_only", url=rcv.url + "/ann", filter_function=str(hook))
        source = await _source(aconn, source_id)
        async with running_reader(fresh_db, source), running(stage_for(fresh_db)):
            await wait_for(lambda: fetchval(aconn, "select count(*) from pg_replication_slots where slot_name = %s"
                                            " and active", (source.slot_name,)), what="the slot to stream")
            async with aconn.transaction():
                await aconn.execute("select pg_logical_emit_message(true, 'pgsink:annotations',"
                                    " '{\"user\": \"ann\", \"reason\": \"refund #42\"}')")
                await aconn.execute("insert into orders values (1, 'new'), (2, 'new')")
                await aconn.execute("update orders set status = 'refunded' where id = 1")
            await aconn.execute("insert into orders values (3, 'plain')")
            await rcv.wait_until(lambda: len(rcv.delivered()) >= 7, what="4 messages to /all and 3 to /ann")
    finally:
        await rcv.close()
    by_path: dict[str, list[dict[str, object]]] = {}
    for r in rcv.requests:
        if r.ok:
            by_path.setdefault(r.path, []).extend(r.messages)
    annotated = {"user": "ann", "reason": "refund #42"}
    seen = {(m["action"], m["record"]["id"]): m["metadata"]["transaction_annotations"]  # type: ignore[index]
            for m in by_path["/all"]}
    assert seen == {("insert", 1): annotated, ("insert", 2): annotated, ("update", 1): annotated,
                    ("insert", 3): None}
    # a Python filter sees the annotations too: only the annotated transaction reaches /ann
    assert len(by_path["/ann"]) == 3 and all(
        m["metadata"]["transaction_annotations"] == annotated for m in by_path["/ann"])  # type: ignore[index]
