"""`pgsink demo`: the whole pipeline end to end on a throwaway Postgres.

Starts an embedded cluster, migrates it, creates a sample `orders` table,
starts a webhook receiver on 127.0.0.1 that prints what it receives, applies a
sequin.yaml-style config, runs the reader and delivery stages, writes inserts,
updates and deletes, waits until every change has arrived (checking per-row
order), then shuts everything down.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from aiohttp import web

from . import config as config_mod
from .embedded import EmbeddedPostgres, free_port
from .errors import PgsinkError
from .migrate import migrate
from .secrets import SECRET_KEY_ENV, generate_key
from .worker import build_stages

Say = Callable[[str], None]

DEMO_TABLE = """
create table public.orders (
    id          serial primary key,
    customer    text not null,
    status      text not null,
    amount      numeric(10, 2) not null,
    tags        text[] not null default '{}',
    details     jsonb,
    updated_at  timestamptz not null default now()
);
alter table public.orders replica identity full;  -- so updates carry old values in "changes"
"""

DEMO_CONFIG = """
databases:
  - name: demo-db
    hostname: 127.0.0.1
    port: ${DEMO_PORT}
    database: postgres
    username: postgres
    slot: {name: pgsink_demo, create_if_not_exists: true}
    publication: {name: pgsink_demo, create_if_not_exists: true}
http_endpoints:
  - name: demo-receiver
    url: http://127.0.0.1:${DEMO_RECEIVER_PORT}
    encrypted_headers:
      - {key: Authorization, value: "Bearer demo-secret"}
sinks:
  - name: orders-webhook
    database: demo-db
    source: {include_tables: [public.orders]}
    actions: [insert, update, delete]
    batch_size: 10
    destination: {type: webhook, http_endpoint: demo-receiver, http_endpoint_path: /hooks/orders}
"""

# (sql, expected changes) — the workload the demo writes, in order
WORKLOAD: list[tuple[str, int]] = [
    ("insert into orders (customer, status, amount, tags, details) values "
     "('ada', 'new', 19.90, '{vip}', '{\"items\": 2}'), ('bob', 'new', 5.00, '{}', null), "
     "('cyd', 'new', 120.50, '{b2b,net30}', '{\"items\": 12, \"po\": \"PO-7\"}')", 3),
    ("update orders set status = 'paid', updated_at = now() where customer = 'ada'", 1),
    ("update orders set status = 'shipped', updated_at = now() where customer = 'ada'", 1),
    ("update orders set amount = amount * 0.9, status = 'discounted' where customer = 'cyd'", 1),
    ("delete from orders where customer = 'bob'", 1),
]


@dataclass
class Receiver:
    """A webhook endpoint on 127.0.0.1 that records and prints every message."""

    say: Say
    messages: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    expected: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer demo-secret":
            return web.Response(status=401, text="missing the encrypted header")
        body = orjson.loads(await request.read())
        batch = body["data"] if isinstance(body, dict) and "data" in body else [body]
        self.requests += 1
        for m in batch:
            self.messages.append(m)
            rec = m["record"]
            changed = f"  changes={orjson.dumps(m['changes']).decode()}" if m.get("changes") else ""
            self.say(f"  <- {request.path} {m['action']:<6} order {rec.get('id')} {rec.get('customer')}: "
                     f"status={rec.get('status')} amount={rec.get('amount')}{changed}  "
                     f"[lsn {m['metadata']['commit_lsn']}, key {m['metadata']['idempotency_key']}]")
        if len(self.messages) >= self.expected:
            self.arrived.set()
        return web.Response(text="ok")


def check_order(messages: list[dict[str, Any]]) -> list[str]:
    """Per order id, positions must increase: returns the violations (none expected)."""
    last: dict[Any, tuple[int, int]] = {}
    problems = []
    for m in messages:
        key = m["record"].get("id")
        pos = (m["metadata"]["commit_lsn"], m["metadata"]["commit_idx"])
        if key in last and pos <= last[key]:
            problems.append(f"order {key}: {pos} arrived after {last[key]}")
        last[key] = pos
    return problems


async def run_demo(say: Say = print, *, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Run the demo; returns the messages the receiver got (raises if any is missing or out of order)."""
    started = time.monotonic()
    os.environ.setdefault(SECRET_KEY_ENV, generate_key())  # demo only: a fresh key for this run
    with EmbeddedPostgres(for_tests=False) as pg:
        dsn = pg.dsn()
        say(f"1. started a throwaway Postgres (wal_level=logical) on 127.0.0.1:{pg.port}")
        applied = await migrate(dsn)
        say(f"2. migrated the pgsink schema ({len(applied)} migration(s))")
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(DEMO_TABLE)
        say("3. created table public.orders (replica identity full)")

        receiver = Receiver(say, expected=sum(n for _, n in WORKLOAD))
        app = web.Application()
        app.router.add_post("/{tail:.*}", receiver.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        say(f"4. webhook receiver listening on http://127.0.0.1:{port}")
        try:
            env = {**os.environ, "DEMO_PORT": str(pg.port), "DEMO_RECEIVER_PORT": str(port)}
            desired = config_mod.parse_config(DEMO_CONFIG, filename="demo.yaml", env=env)
            await config_mod.apply_config(dsn, desired)
            say("5. applied the config: source demo-db (slot + publication created), endpoint "
                "demo-receiver (encrypted header), sink orders-webhook (batch_size 10)")
            await _run_pipeline(dsn, receiver, say, timeout)
        finally:
            await runner.cleanup()
    problems = check_order(receiver.messages)
    if problems:
        raise PgsinkError("demo: out-of-order delivery: " + "; ".join(problems))
    say(f"8. all {len(receiver.messages)} changes arrived in order in {receiver.requests} request(s); "
        f"everything stopped cleanly ({time.monotonic() - started:.1f}s in all)")
    return receiver.messages


async def _run_pipeline(dsn: str, receiver: Receiver, say: Say, timeout: float) -> None:
    stages = build_stages(dsn, ("reader", "delivery"), worker_id="demo")
    tasks = [asyncio.create_task(s.run(), name=f"demo:{n}") for n, s in stages.items()]
    try:
        say("6. worker running (reader + delivery); writing changes:")
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for sql, _ in WORKLOAD:  # the slot exists since the config was applied: nothing is missed
                say(f"  -> {sql.split(' where ')[0][:70]}{'...' if len(sql) > 70 else ''}")
                await conn.execute(sql.encode())
        arrived = asyncio.create_task(receiver.arrived.wait())
        await asyncio.wait([arrived, *tasks], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        arrived.cancel()
        for t in tasks:
            if t.done():
                t.result()  # a stage failed: show why
        if not receiver.arrived.is_set():
            raise PgsinkError(f"demo: only {len(receiver.messages)} of {receiver.expected} changes "
                              f"arrived within {timeout:.0f}s")
        say("7. every change arrived; stopping the worker")
    finally:
        for s in stages.values():
            s.stop()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [d for d in done if isinstance(d, BaseException)]
        if errors:
            raise errors[0]
