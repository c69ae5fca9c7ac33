"""Safer endpoints: Retry-After, redirects not followed, private-address block, CA bundle, rate limit."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import time
from collections.abc import AsyncIterator, Callable
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pgsink.engine import http_safety as safety
from pgsink.engine.deliver import DeliveryStage
from tests.integration.test_deliver import running, stage_for
from tests.queue_helpers import Row, create_sink, enqueue_changes, scalar, wait_for
from tests.receiver import start_receiver

Handler = Callable[[web.Request, int], web.StreamResponse]


class Server:
    """A scripted aiohttp server on 127.0.0.1: ``handler(request, n)`` answers the n-th request."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.hits: list[tuple[str, float]] = []  # (path, monotonic time)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> Server:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.hits.append((request.path, time.monotonic()))
        return self.handler(request, len(self.hits))

    def url(self, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def servers() -> AsyncIterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        await s.close()


async def serve(servers: list[Server], handler: Handler, **kw: Any) -> Server:
    s = await Server(handler, **kw).start()
    servers.append(s)
    return s


async def attempt_rows(conn: psycopg.AsyncConnection, sink_id: Any) -> list[tuple[Any, ...]]:
    cur = await conn.execute("select http_status, error, response_body, delivered from pgsink.attempts"
                             " where sink_id = %s order by id", (sink_id,))
    return await cur.fetchall()


async def n_attempts(conn: psycopg.AsyncConnection, sink_id: Any) -> int:
    return int(await scalar(conn, "select count(*) from pgsink.attempts where sink_id = %s", sink_id))


# ---------------------------------------------------------------- Retry-After


def test_parse_retry_after_seconds_dates_and_garbage() -> None:
    now = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert safety.parse_retry_after("7", now) == 7.0
    assert safety.parse_retry_after(" 0 ", now) == 0.0
    assert safety.parse_retry_after(format_datetime(now + dt.timedelta(seconds=90), usegmt=True), now) == 90.0
    assert safety.parse_retry_after(format_datetime(now - dt.timedelta(seconds=90), usegmt=True), now) == 0.0
    assert safety.parse_retry_after("999999", now) == safety.RETRY_AFTER_CAP
    for bad in (None, "", "soon", "-5", "1.5e3"):
        assert safety.parse_retry_after(bad, now) is None


@pytest.mark.parametrize("status,header", [(429, "seconds"), (503, "date")])
async def test_retry_after_is_honoured_for_the_next_attempt(
        fresh_db: str, aconn: psycopg.AsyncConnection, servers: list[Server], status: int, header: str) -> None:
    def handler(request: web.Request, n: int) -> web.StreamResponse:
        if n == 1:
            value = "2" if header == "seconds" else format_datetime(
                dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3), usegmt=True)
            return web.Response(status=status, headers={"Retry-After": value}, text="slow down")
        return web.Response(status=200)

    srv = await serve(servers, handler)
    refs = await create_sink(aconn, srv.url(), name="ra", lane_count=1)
    await enqueue_changes(aconn, refs.sink_id, [Row({"id": 1}, "1")])
    async with running(stage_for(fresh_db)):  # backoff_base 0.05 s: without Retry-After it retries at once
        await wait_for(lambda: _delivered(aconn, refs.sink_id), timeout=20, what="delivery after Retry-After")
    (_, first), (_, second) = srv.hits[:2]
    assert second - first >= 1.9, f"retried after {second - first:.2f}s despite Retry-After"
    rows = await attempt_rows(aconn, refs.sink_id)
    assert [r[0] for r in rows] == [status, 200]


async def _delivered(conn: psycopg.AsyncConnection, sink_id: Any) -> bool:
    return bool(await scalar(conn, "select count(*) from pgsink.attempts where sink_id = %s and delivered", sink_id))


# ---------------------------------------------------------------- redirects


async def test_redirects_are_failures_and_not_followed(
        fresh_db: str, aconn: psycopg.AsyncConnection, servers: list[Server]) -> None:
    def handler(request: web.Request, n: int) -> web.StreamResponse:
        if request.path == "/hook":
            return web.Response(status=302, headers={"Location": "/elsewhere"})
        return web.Response(status=200)

    srv = await serve(servers, handler)
    refs = await create_sink(aconn, srv.url() + "/hook", name="redir", lane_count=1)
    await enqueue_changes(aconn, refs.sink_id, [Row({"id": 1}, "1")])
    async with running(stage_for(fresh_db)):
        await wait_for(lambda: _at_least(aconn, refs.sink_id, 2), what="two failed attempts")
    assert {p for p, _ in srv.hits} == {"/hook"}, "the redirect was followed"
    rows = await attempt_rows(aconn, refs.sink_id)
    assert all(r[0] == 302 and not r[3] for r in rows)
    assert "redirect not followed (location: /elsewhere)" in rows[0][2]


async def test_odd_bytes_from_the_endpoint_are_recorded_and_no_token_is_kept(
        fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    """A Location header that is not UTF-8, then one with a NUL (aiohttp's error then quotes the URL):
    each is an ordinary failed attempt. Storing them used to raise and stop the worker, every retry."""
    answers = [b"HTTP/1.1 302 Found\r\nLocation: /\xff\xfe\r\nContent-Length: 0\r\n\r\n",
               b"HTTP/1.1 302 Found\r\nLocation: /a\x00b\r\nContent-Length: 0\r\n\r\n"]
    hits = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal hits
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answers[min(hits, 1)])
        hits += 1
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        refs = await create_sink(aconn, f"http://127.0.0.1:{port}/hook?token=SECRET123", name="odd", lane_count=1)
        await enqueue_changes(aconn, refs.sink_id, [Row({"id": 1}, "1")])
        async with running(stage_for(fresh_db)):
            await wait_for(lambda: _at_least(aconn, refs.sink_id, 3), what="three failed attempts")
    finally:
        server.close()
    rows = await attempt_rows(aconn, refs.sink_id)
    assert rows[0][0] == 302 and "redirect not followed (location: /" in rows[0][2]
    assert any(r[1] for r in rows[1:]), "the NUL header should fail in the client"
    assert not any(r[3] for r in rows)
    assert "SECRET123" not in repr(rows)


async def _at_least(conn: psycopg.AsyncConnection, sink_id: Any, n: int) -> bool:
    return await n_attempts(conn, sink_id) >= n


# ---------------------------------------------------------------- private addresses


@pytest.mark.parametrize("address,reason", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"), ("10.1.2.3", "private"),
    ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("169.254.169.254", "link-local"),
    ("fe80::1", "link-local"), ("fc00::1", "private"), ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"),
    ("100.100.100.200", "not a public address"), ("100.64.0.1", "not a public address"),
    ("fec0::1", "site-local"), ("2002:a9fe:a9fe::", "carries 169.254.169.254"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "carries 192.0.2.45"),
])
def test_blocked_addresses(address: str, reason: str) -> None:
    assert reason in (safety.blocked_reason(address) or "")


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1::1", "example.com"])
def test_public_addresses_and_names_pass_the_literal_check(address: str) -> None:
    assert safety.blocked_reason(address) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_private_address_block_refuses_before_connecting(
        fresh_db: str, aconn: psycopg.AsyncConnection, host: str) -> None:
    rcv = await start_receiver()
    try:
        refs = await create_sink(aconn, f"http://{host}:{rcv.port}/hook", name="blocked", lane_count=1)
        await aconn.execute("update pgsink.http_endpoints set block_private_addresses = true where id = %s",
                            (refs.endpoint_id,))
        allowed = await create_sink(aconn, f"http://{host}:{rcv.port}/open", name="open", lane_count=1)
        await enqueue_changes(aconn, refs.sink_id, [Row({"id": 1}, "1")])
        await enqueue_changes(aconn, allowed.sink_id, [Row({"id": 2}, "2")])
        async with running(stage_for(fresh_db)):
            await wait_for(lambda: _at_least(aconn, refs.sink_id, 2), what="two refused attempts")
            await rcv.wait_until(lambda: len(rcv.delivered()) >= 1, what="the unblocked endpoint's delivery")
    finally:
        await rcv.close()
    assert [r.path for r in rcv.requests] == ["/open"]  # off by default; the blocked one never connected
    rows = await attempt_rows(aconn, refs.sink_id)
    assert all(r[0] is None and not r[3] for r in rows)
    assert "refused to connect to" in rows[0][1] and "is a loopback address" in rows[0][1]
    assert "block_private_addresses" in rows[0][1]


# ---------------------------------------------------------------- CA bundle


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pgsink test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_tls_is_verified_and_a_ca_bundle_makes_a_private_ca_trusted(
        fresh_db: str, aconn: psycopg.AsyncConnection, servers: list[Server], tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    srv = await serve(servers, lambda r, n: web.Response(status=200), ssl_context=server_ctx)
    untrusted = await create_sink(aconn, srv.url("https") + "/a", name="untrusted", lane_count=1)
    trusted = await create_sink(aconn, srv.url("https") + "/b", name="trusted", lane_count=1)
    await aconn.execute("update pgsink.http_endpoints set ca_bundle = %s where id = %s",
                        (str(cert), trusted.endpoint_id))
    await enqueue_changes(aconn, untrusted.sink_id, [Row({"id": 1}, "1")])
    await enqueue_changes(aconn, trusted.sink_id, [Row({"id": 2}, "2")])
    async with running(stage_for(fresh_db)):
        await wait_for(lambda: _delivered(aconn, trusted.sink_id), what="delivery over TLS with the CA bundle")
        await wait_for(lambda: _at_least(aconn, untrusted.sink_id, 1), what="a failed TLS attempt")
    rows = await attempt_rows(aconn, untrusted.sink_id)
    assert not rows[0][3] and "CERTIFICATE_VERIFY_FAILED" in rows[0][1]
    assert [p for p, _ in srv.hits] == ["/b"]


# ---------------------------------------------------------------- rate limit


async def test_rate_token_bucket_in_sql(aconn: psycopg.AsyncConnection) -> None:
    refs = await create_sink(aconn, "http://127.0.0.1:9/x", name="rl")
    waits = [await safety.take_rate_token(aconn, refs.endpoint_id, 5.0) for _ in range(7)]
    assert waits[:5] == [0, 0, 0, 0, 0]  # a full bucket: one second's worth of requests at once
    assert 0.1 < waits[5] <= 0.2 < waits[6] <= 0.4  # then one per 1/rate seconds, queued in turn


async def test_rate_limit_is_shared_by_two_workers(
        fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    rcv = await start_receiver()
    try:
        refs = await create_sink(aconn, rcv.url, name="limited", batch_size=1, batch=False)
        await aconn.execute("update pgsink.http_endpoints set rate_limit = 10 where id = %s", (refs.endpoint_id,))
        await enqueue_changes(aconn, refs.sink_id, [Row({"id": i}, str(i)) for i in range(30)])
        stages: list[DeliveryStage] = [stage_for(fresh_db, "w1"), stage_for(fresh_db, "w2")]
        async with running(*stages):
            await rcv.wait_until(lambda: len(rcv.delivered()) >= 30, timeout=30, what="30 messages")
    finally:
        await rcv.close()
    starts = sorted(r.started for r in rcv.requests)
    # 10 at once from the full bucket, then 10/s: the 30th request no earlier than ~2 s after the first
    assert starts[-1] - starts[0] >= 1.8, f"30 requests in {starts[-1] - starts[0]:.2f}s at 10/s"
    for i in range(len(starts)):
        in_window = sum(1 for t in starts[i:] if t - starts[i] < 1.0)
        assert in_window <= 24, f"{in_window} requests within one second"  # bucket 10 + 10/s, slack for load
