"""Transforms, routing and user-function failures through the delivery stage (real Postgres, real HTTP)."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from aiohttp import web

from tests.integration.test_deliver import running, stage_for
from tests.queue_helpers import Row, create_sink, enqueue_changes, scalar, wait_for


@dataclass
class Hit:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class Recorder:
    """Records method, path, headers and JSON body of every request; answers 200."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> Recorder:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.hits.append(Hit(request.method, request.path, {k.lower(): v for k, v in request.headers.items()},
                             orjson.loads(body)))
        return web.Response(status=200)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def bodies(self) -> list[Any]:
        """Every delivered value: the items of batched bodies, or the single body."""
        out: list[Any] = []
        for h in self.hits:
            out += h.body["data"] if isinstance(h.body, dict) and set(h.body) == {"data"} else [h.body]
        return out

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    r = await Recorder().start()
    yield r
    await r.close()


def hook(tmp_path: Path, name: str, code: str) -> str:
    path = tmp_path / name
    path.write_text(code)
    return str(path)


def rewrite(path: str, code: str) -> None:
    """Change a function file so the loader sees a new mtime even within the same second."""
    Path(path).write_text(code)
    later = time.time() + 2
    os.utime(path, (later, later))


# ---------------------------------------------------------------- transforms


async def test_path_transforms_single_and_batched(
        fresh_db: str, aconn: psycopg.AsyncConnection, recorder: Recorder) -> None:
    ids = await create_sink(aconn, recorder.url + "/ids", name="ids", transform_path="record.id", batch_size=10,
                            batch_timeout_ms=200, lane_count=1)
    city = await create_sink(aconn, recorder.url + "/city", name="city", transform_path="record.address.city",
                             batch=False)
    whole = await create_sink(aconn, recorder.url + "/whole", name="whole", transform_path="record", batch=False)
    rows = [Row({"id": i, "address": {"city": c}}, str(i)) for i, c in ((1, "Paris"), (2, "Lyon"), (3, None))]
    for refs in (ids, city, whole):
        await enqueue_changes(aconn, refs.sink_id, rows)
    async with running(stage_for(fresh_db)):
        await wait_for(lambda: _hits_at_least(recorder, 7), what="7 requests")
    by_path: dict[str, list[Any]] = {}
    for h in recorder.hits:
        by_path.setdefault(h.path, []).append(h.body)
    assert by_path["/ids"] == [{"data": [1, 2, 3]}]
    assert sorted(by_path["/city"], key=str) == sorted(["Paris", "Lyon", None], key=str)
    assert sorted(b["id"] for b in by_path["/whole"]) == [1, 2, 3]
    assert all(set(b) == {"id", "address"} for b in by_path["/whole"])  # the record alone, no envelope
    # the body lost the idempotency keys; the webhook-id header carries them, one per change, unsigned
    city_ids = {h.headers["webhook-id"] for h in recorder.hits if h.path == "/city"}
    assert len(city_ids) == 3 and not any(i.startswith("batch_") for i in city_ids)
    assert [h.headers["webhook-id"].startswith("batch_") for h in recorder.hits if h.path == "/ids"] == [True]


async def _hits_at_least(r: Recorder, n: int) -> bool:
    return len(r.hits) >= n


async def test_python_transform_gets_plain_values_and_metadata(
        fresh_db: str, aconn: psycopg.AsyncConnection, recorder: Recorder, tmp_path: Path) -> None:
    ref = hook(tmp_path, "shape.py",
               "def transform(action, record, changes, metadata):\n"
               "    return {'id': record['id'], 'action': action, 'old': changes,\n"
               "            'table': metadata['table_name'], 'sink': metadata['consumer']['name'],\n"
               "            'user': (metadata['transaction_annotations'] or {}).get('user')}\n")
    refs = await create_sink(aconn, recorder.url, name="shaped", transform_function=ref, batch_size=10,
                             batch_timeout_ms=200, lane_count=1)
    await enqueue_changes(aconn, refs.sink_id, [
        Row({"id": 1, "price": 2}, "1", transaction_annotations={"user": "ann"}),
        Row({"id": 1, "price": 3}, "1", action="update", changes={"price": 2})])
    async with running(stage_for(fresh_db)):
        await wait_for(lambda: _hits_at_least(recorder, 1), what="a request")
    assert recorder.hits[0].body == {"data": [
        {"id": 1, "action": "insert", "old": None, "table": "orders", "sink": "shaped", "user": "ann"},
        {"id": 1, "action": "update", "old": {"price": 2}, "table": "orders", "sink": "shaped", "user": None}]}


# ---------------------------------------------------------------- routing


async def test_routing_sets_method_path_and_headers_and_batches_never_mix_routes(
        fresh_db: str, aconn: psycopg.AsyncConnection, recorder: Recorder, tmp_path: Path) -> None:
    ref = hook(tmp_path, "router.py",
               "def route(action, record, changes, metadata):\n"
               "    method = {'insert': 'POST', 'update': 'PUT', 'delete': 'DELETE'}[action]\n"
               "    return {'method': method, 'endpoint_path': f\"/orders/{record['id'] % 2}\",\n"
               "            'headers': {'x-action': action}}\n")
    refs = await create_sink(aconn, recorder.url, name="routed", route_function=ref, batch_size=10,
                             http_endpoint_path="/ignored",
                             batch_timeout_ms=200, lane_count=1, message_grouping=False)
    rows = [Row({"id": 2}, "2"), Row({"id": 4}, "4"), Row({"id": 1}, "1"),
            Row({"id": 2}, "2", action="update"), Row({"id": 4}, "4", action="update"),
            Row({"id": 1}, "1", action="delete")]
    await enqueue_changes(aconn, refs.sink_id, rows)
    async with running(stage_for(fresh_db)):
        await wait_for(lambda: _values_at_least(recorder, 6), what="6 messages")
    seen = [(h.method, h.path, h.headers["x-action"], [m["record"]["id"] for m in h.body["data"]])
            for h in recorder.hits]
    assert seen == [("POST", "/orders/0", "insert", [2, 4]), ("POST", "/orders/1", "insert", [1]),
                    ("PUT", "/orders/0", "update", [2, 4]), ("DELETE", "/orders/1", "delete", [1])]


async def _values_at_least(r: Recorder, n: int) -> bool:
    return len(r.bodies()) >= n


# ---------------------------------------------------------------- failures


async def _attempt_errors(conn: psycopg.AsyncConnection, sink_id: Any) -> list[str]:
    cur = await conn.execute("select error from pgsink.attempts where sink_id = %s and error is not null"
                             " order by id", (sink_id,))
    return [r[0] for r in await cur.fetchall()]


@pytest.mark.parametrize("failure", ["raises", "hangs", "bad route"])
async def test_a_failing_user_function_parks_its_message_others_flow_and_a_fix_delivers_it(
        fresh_db: str, aconn: psycopg.AsyncConnection, recorder: Recorder, tmp_path: Path, failure: str) -> None:
    bad = {"raises": "        raise KeyError('no such customer')\n",
           "hangs": "        while True:\n            pass\n",
           "bad route": "        return {'method': 'TRACE'}\n"}[failure]
    role = "route" if failure == "bad route" else "transform"
    code = (f"def {role}(action, record, changes, metadata):\n"
            "    if record['id'] == 2:\n" + bad
            + ("    return {'endpoint_path': '/r'}\n" if role == "route" else "    return record['id']\n"))
    ref = hook(tmp_path, "fn.py", code)
    column = "route_function" if role == "route" else "transform_function"
    refs = await create_sink(aconn, recorder.url, name="fails", batch_size=10, batch_timeout_ms=50,
                             function_timeout_ms=200, **{column: ref})
    await enqueue_changes(aconn, refs.sink_id, [Row({"id": i}, str(i)) for i in (1, 2, 3)])
    async with running(stage_for(fresh_db)):
        await wait_for(lambda: _values_at_least(recorder, 2), what="the other groups")
        await wait_for(lambda: _parked(aconn, refs.sink_id), what="the failing message to be parked")
        await enqueue_changes(aconn, refs.sink_id, [Row({"id": 4}, "4")])
        await wait_for(lambda: _values_at_least(recorder, 3), what="later messages flowing")
        errors = await _attempt_errors(aconn, refs.sink_id)
        rewrite(ref, code.replace("if record['id'] == 2:", "if record['id'] == -1:"))
        await wait_for(lambda: _values_at_least(recorder, 4), timeout=30, what="the fixed message")
    delivered = sorted((b if role == "transform" else b["record"]["id"]) for b in recorder.bodies())
    assert delivered == [1, 2, 3, 4]
    expected = {"raises": "raised KeyError: 'no such customer'", "hangs": "ran longer than 200 ms and was cut off",
                "bad route": "returned method 'TRACE'"}[failure]
    assert errors and all(expected in e for e in errors), errors
    if failure == "raises":
        assert "Traceback (most recent call last)" in errors[0] and "fn.py" in errors[0]
    assert await scalar(aconn, "select count(*) from pgsink.parked_messages where sink_id = %s and state = 'parked'",
                        refs.sink_id) == 0


async def _parked(conn: psycopg.AsyncConnection, sink_id: Any) -> bool:
    return bool(await scalar(conn, "select count(*) from pgsink.parked_messages where sink_id = %s", sink_id))


# ---------------------------------------------------------------- pgsink sink test


async def test_try_sink_shows_filter_transform_and_route_per_change(
        fresh_db: str, aconn: psycopg.AsyncConnection, tmp_path: Path) -> None:
    from pgsink.engine.sink_functions import try_sink

    ref = hook(tmp_path, "r.py", "def route(action, record, changes, metadata):\n"
                                 "    if record['id'] == 3:\n        raise ValueError('bad row')\n"
                                 "    return {'method': 'PUT', 'endpoint_path': f\"/o/{record['id']}\"}\n")
    refs = await create_sink(aconn, "http://127.0.0.1:9/x", name="tried", filter_sql="id > 1",
                             transform_path="record", route_function=ref)
    await enqueue_changes(aconn, refs.sink_id, [Row({"id": i}, str(i)) for i in (1, 2, 3)])
    results = await try_sink(fresh_db, "tried", limit=10)
    assert [r.passes for r in results] == [False, True, True]
    assert results[1].body == {"id": 2} and (results[1].route.method, results[1].route.endpoint_path) == ("PUT", "/o/2")
    assert results[2].error is not None and "raised ValueError: bad row" in results[2].error
    assert results[0].change.startswith("public.orders insert 1 @ ")
    assert [r.passes for r in await try_sink(fresh_db, "tried", limit=1)] == [True]  # the newest one


def test_cli_sink_test_prints_what_would_be_sent(fresh_db: str) -> None:
    import asyncio
    import subprocess
    import sys

    async def setup() -> None:
        async with await psycopg.AsyncConnection.connect(fresh_db, autocommit=True) as conn:
            refs = await create_sink(conn, "http://127.0.0.1:9/x", name="clitest", transform_path="record.id",
                                     filter_sql="id <> 2")
            await enqueue_changes(conn, refs.sink_id, [Row({"id": i}, str(i)) for i in (1, 2)])

    import threading

    t = threading.Thread(target=lambda: asyncio.run(setup()))
    t.start()
    t.join(60)  # a sync test: set up on a loop of its own
    res = subprocess.run([sys.executable, "-m", "pgsink.cli", "sink", "test", "clitest", "--database-url", fresh_db],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert res.returncode == 0, res.stderr
    out = " ".join(res.stdout.split())
    assert "public.orders insert 1" in out and "POST (sink path) 1" in out
    assert "public.orders insert 2" in out and "filtered out" in out
    res = subprocess.run([sys.executable, "-m", "pgsink.cli", "sink", "test", "nope", "--database-url", fresh_db],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert res.returncode == 1 and "no sink named 'nope'" in res.stderr
