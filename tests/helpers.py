"""Small helpers shared by tests: waiting on conditions, config rows for the test database."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

T = TypeVar("T")


async def wait_for(check: Callable[[], Awaitable[T]], *, timeout: float = 30.0, interval: float = 0.05,
                   what: str = "condition") -> T:
    """Poll an async check until it returns a truthy value, or fail after timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)  # ok-sleep: polling interval of a deadline-bounded wait
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")


async def fetchval(dsn_or_conn: str | psycopg.AsyncConnection, query: Any, params: Any = None) -> Any:
    if isinstance(dsn_or_conn, str):
        async with await psycopg.AsyncConnection.connect(dsn_or_conn, autocommit=True) as conn:
            return await fetchval(conn, query, params)
    cur = await dsn_or_conn.execute(query, params)
    row = await cur.fetchone()
    return row[0] if row else None


async def add_source(conn: psycopg.AsyncConnection, dsn: str, *, name: str = "src", decoder: str = "pgoutput",
                     slot: str | None = None, publication: str = "pgsink_pub", create: bool = True) -> uuid.UUID:
    """A source row pointing at the database behind dsn (tests use one database for both roles)."""
    p = conninfo_to_dict(dsn)
    slot = slot or f"pgsink_{uuid.uuid4().hex[:10]}"
    cur = await conn.execute(
        "insert into pgsink.sources (name, hostname, port, database, username, slot_name, create_slot,"
        " publication_name, create_publication, decoder) values (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) returning id",
        (name, p.get("host", "127.0.0.1"), int(p.get("port", 5432)), p["dbname"], p.get("user", "postgres"),
         slot, create, publication, create, decoder),
    )
    return (await cur.fetchone())[0]  # type: ignore[index]


async def add_sink(conn: psycopg.AsyncConnection, source_id: uuid.UUID, *, name: str = "sink",
                   url: str = "http://127.0.0.1:9/hook", **columns: Any) -> uuid.UUID:
    """An endpoint + sink (+ its lane rows), written as the config commands do."""
    cur = await conn.execute(
        "insert into pgsink.http_endpoints (name, url) values (%s, %s) returning id", (f"{name}_ep", url))
    endpoint_id = (await cur.fetchone())[0]  # type: ignore[index]
    cols = {"name": name, "source_id": source_id, "http_endpoint_id": endpoint_id, **columns}
    names = sql.SQL(", ").join(sql.Identifier(c) for c in cols)
    values = sql.SQL(", ").join([sql.Placeholder()] * len(cols))
    cur = await conn.execute(
        sql.SQL("insert into pgsink.sinks ({}) values ({}) returning id, lane_count").format(names, values),
        list(cols.values()))
    sink_id, lanes = await cur.fetchone()  # type: ignore[misc]
    await conn.execute("insert into pgsink.lanes (sink_id, lane) select %s, generate_series(0, %s - 1)",
                       (sink_id, lanes))
    return sink_id
