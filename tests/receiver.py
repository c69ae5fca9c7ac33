"""A real aiohttp webhook receiver on 127.0.0.1 for tests.

It records every request (headers, decoded body, the status it answered),
can be scripted per request (status codes, hangs, delays), and checks what
delivery promises while it runs:

- per group, successfully received messages arrive in order, without gaps
  or repeats (``order_violations``), when ``group_of``/``seq_of`` are given;
- a group never has two requests in flight (``overlap_violations``);
- how many messages were in flight at once, at most (``max_in_flight``).

Use ``await receiver.wait_until(lambda: ..., timeout=...)`` to wait for a
condition; it re-checks after every request and fails with a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

Behavior = Callable[["Received"], Awaitable[int] | int]


@dataclass
class Received:
    """One request as the receiver saw it."""

    n: int
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes            # after gzip decoding, when it was gzipped
    wire_length: int       # bytes on the wire
    started: float
    finished: float | None = None
    status: int | None = None  # what we answered; None if the client went away first

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The messages of the body: ``data`` of a batch, or the single message."""
        doc = self.json
        if isinstance(doc, dict) and "data" in doc and "record" not in doc:
            return list(doc["data"])
        return [doc]

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass
class Receiver:
    """Start with ``await Receiver(...).start()``; stop with ``await receiver.close()``."""

    behavior: Behavior | None = None
    group_of: Callable[[dict[str, Any]], str] | None = None
    seq_of: Callable[[dict[str, Any]], int] | None = None
    requests: list[Received] = field(default_factory=list)
    order_violations: list[str] = field(default_factory=list)
    overlap_violations: list[str] = field(default_factory=list)
    max_in_flight: int = 0
    in_flight: int = 0
    _groups_in_flight: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _last_seq: dict[str, int] = field(default_factory=dict)
    _changed: asyncio.Condition | None = None
    _runner: web.AppRunner | None = None
    _site: web.TCPSite | None = None
    _release: asyncio.Event | None = None
    port: int = 0

    async def start(self) -> Receiver:
        self._changed = asyncio.Condition()
        self._release = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await self._site.start()
        server = self._site._server
        assert server is not None and server.sockets  # type: ignore[union-attr]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self._release is not None:
            self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------ scripting helpers

    async def hang(self) -> int:
        """Never answer (until the client gives up or the receiver closes)."""
        assert self._release is not None
        await self._release.wait()
        return 503

    # ------------------------------------------------------------ views

    def delivered(self) -> list[dict[str, Any]]:
        """Messages of every request answered 2xx, in arrival order."""
        return [m for r in self.requests if r.ok for m in r.messages]

    def delivered_keys(self) -> list[str]:
        return [m["metadata"]["idempotency_key"] for m in self.delivered()]

    async def wait_until(self, predicate: Callable[[], bool], *, timeout: float = 20.0, what: str = "") -> None:
        """Wait until ``predicate()`` holds, re-checking after each request; fail after ``timeout``."""
        assert self._changed is not None
        deadline = time.monotonic() + timeout
        async with self._changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out after {timeout}s waiting for {what or predicate!r}; "
                        f"{len(self.requests)} requests, {len(self.delivered())} messages delivered")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(remaining, 0.25))

    # ------------------------------------------------------------ the handler

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = raw
        if request.headers.get("content-encoding", "").lower() == "gzip" and raw[:2] == b"\x1f\x8b":
            body = gzip.decompress(raw)
        wire = int(request.headers.get("content-length", len(raw)))
        headers = {k.lower(): v for k, v in request.headers.items()}
        rec = Received(len(self.requests), request.path, headers, body, wire, time.monotonic())
        self.requests.append(rec)
        groups = self._enter(rec)
        try:
            status = 200
            if self.behavior is not None:
                result = self.behavior(rec)
                status = await result if not isinstance(result, int) else result
            rec.status = status
            if rec.ok:
                self._check_order(rec)
            return web.Response(status=status, text="ok" if rec.ok else f"failing with {status}")
        finally:
            rec.finished = time.monotonic()
            self._leave(rec, groups)
            await self._notify()

    def _enter(self, rec: Received) -> list[str]:
        try:
            messages = rec.messages
        except orjson.JSONDecodeError:
            return []
        self.in_flight += len(messages)
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.group_of is None:
            return []
        groups = sorted({self.group_of(m) for m in messages})
        for g in groups:
            if self._groups_in_flight[g] > 0:
                self.overlap_violations.append(f"group {g} got request #{rec.n} while another was in flight")
            self._groups_in_flight[g] += 1
        return groups

    def _leave(self, rec: Received, groups: list[str]) -> None:
        with contextlib.suppress(orjson.JSONDecodeError):
            self.in_flight -= len(rec.messages)
        for g in groups:
            self._groups_in_flight[g] -= 1

    def _check_order(self, rec: Received) -> None:
        if self.group_of is None or self.seq_of is None:
            return
        for m in rec.messages:
            g, s = self.group_of(m), self.seq_of(m)
            last = self._last_seq.get(g, 0)
            if s != last + 1:
                self.order_violations.append(f"group {g}: got seq {s} after {last} (request #{rec.n})")
            self._last_seq[g] = max(last, s)

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()


async def start_receiver(**kwargs: Any) -> Receiver:
    return await Receiver(**kwargs).start()
