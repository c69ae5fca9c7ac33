"""The delivery stage: lease lanes, POST group-ordered batches, ack or back off.

Per active sink, a runner (``sink_runner.SinkRunner``) keeps up to
``min(lane_count, max_lanes_per_sink)`` lanes in flight (one batch per lane,
so a group never has two requests in flight) plus a few parked groups. Each
lane batch: lease (within max_ack_pending) -> read after the cursor (waiting
up to batch_timeout_ms for a short batch to fill) -> render -> POST -> one
statement that acks, backs off, parks or discards. All state is in Postgres; a worker that dies loses
its leases when they expire, and another delivers the batch again with the
same idempotency keys.

Wake-ups: LISTEN pgsink_messages (payload: sink id) on one connection, a
jittered poll as fallback, local timers for back-offs that end, and a slot
freeing up (a lane that finished a batch may have more).

This module holds what the runners share: the connection pool, the HTTP
sessions, config reloads, LISTEN, lease renewal, and the request itself
(``post``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit
from uuid import UUID

import aiohttp
import psycopg
from psycopg_pool import AsyncConnectionPool

from . import db
from . import http_safety as safety
from . import queue as q
from .model import Config, HttpEndpoint, Sink, Source, config_version, load_config
from .render import RenderContext, RequestTarget, idempotency_key, join_url, render_body
from .enrichment import Enricher
from .sink_functions import DEFAULT_ROUTE, Prepared, SinkFunctions, render_enriched, render_transformed
from .signing import batch_id, sign_headers
from .sink_runner import TRANSIENT_DB_ERRORS, SinkRunner, SinkSetup, stop_task
from .waiting import jittered, wait_event

log = logging.getLogger("pgsink.deliver")

T = TypeVar("T")


async def _excerpt(resp: aiohttp.ClientResponse) -> str | None:
    """The start of a response body for the attempt log; the status alone decides the outcome."""
    try:
        raw = await resp.content.read(q.RESPONSE_BODY_LIMIT)
    except (aiohttp.ClientError, TimeoutError) as e:
        return f"<response body unreadable: {type(e).__name__}>"
    return raw.decode("utf-8", "replace").replace("\x00", "")


def merge_headers(*layers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    """Request headers, later layers winning whatever the case of a name (HTTP names are
    case-insensitive: an endpoint's ``Webhook-Id`` must not go out next to ours)."""
    merged: dict[str, str] = {}
    for layer in layers:
        for name, value in dict(layer).items():
            for old in [old for old in merged if old.lower() == name.lower()]:
                del merged[old]
            merged[name] = value
    return merged


def _storable(text: str | None, url: str) -> str | None:
    """Endpoint or HTTP-client text as the attempt log (and our logs) may keep it.

    Header bytes come through surrogate-escaped, and Postgres text holds neither
    lone surrogates nor NUL: either made storing the attempt raise, on every
    retry. aiohttp's errors quote the URL, and a query string may carry a token.
    """
    if text is None:
        return None
    query = urlsplit(url).query
    if query:
        text = text.replace(query, "<query hidden>")
    return q.storable(text)


def _stop_lost(tasks: dict[tuple[UUID, Any], asyncio.Task[None]], lost: dict[tuple[UUID, Any], bool],
               what: str) -> None:
    """Stop the task of each lease no longer ours (``lost``: whether another worker holds it now)."""
    for (sink_id, key), taken in lost.items():
        task = tasks[(sink_id, key)]
        if taken and not task.done():
            log.warning("lease of %s %r of sink %s was taken by another worker; stopping its delivery here",
                        what, key, sink_id)
        stop_task(task)


USER_ERROR_LIMIT = 16_384
"""Characters of a user function's error and traceback kept in the attempt row."""


class DeliveryStage:
    """Delivers the messages of active sinks to their HTTP endpoints until ``stop()``.

    ``sinks`` limits the stage to these sinks (names or ids); None means all.
    Back-off: ``backoff_base * 2^(n-1)`` seconds, capped at ``backoff_cap``,
    jittered; a lane batch that failed ``park_after`` times in a row has its
    groups parked so the rest of the lane flows on.
    """

    def __init__(self, dsn: str, *, worker_id: str, sinks: list[str] | None = None,
                 poll_interval: float = 1.0, lease_seconds: float = 30.0, shutdown_grace: float = 10.0,
                 backoff_base: float = 1.0, backoff_cap: float = 180.0,
                 park_after: int = q.PARK_AFTER_FAILURES,
                 park_health_window: float = q.PARK_HEALTH_WINDOW_SECONDS,
                 max_lanes_per_sink: int = 32, max_groups_per_sink: int = 8, pool_size: int = 10) -> None:
        self.dsn = dsn
        self.worker_id = worker_id
        self.owner = f"{worker_id}:{uuid.uuid4().hex[:12]}"  # unique per stage: fences our leases
        self.sink_filter = set(sinks) if sinks is not None else None
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.shutdown_grace = shutdown_grace
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.park_after = park_after
        self.park_health_window = park_health_window
        self.max_lanes_per_sink = max_lanes_per_sink
        self.max_groups_per_sink = max_groups_per_sink
        self.pool_size = pool_size
        self._stop_requested = False
        self._stop: asyncio.Event | None = None
        self._fatal: BaseException | None = None
        self._runners: dict[UUID, SinkRunner] = {}
        self._retired: list[SinkRunner] = []
        self._stale_enrichers: set[Enricher] = set()  # replaced on reload: closed once their batches ended
        self._touched_sinks: set[UUID] = set()
        self._config_dirty: asyncio.Event | None = None
        self._side_tasks: list[asyncio.Task[None]] = []
        self._pool: AsyncConnectionPool | None = None
        self._session: aiohttp.ClientSession | None = None
        self._public_session: aiohttp.ClientSession | None = None  # for endpoints blocking private addresses
        self._warned_missing: set[str] = set()

    # ------------------------------------------------------------ public

    def stop(self) -> None:
        """Stop claiming; in-flight requests get ``shutdown_grace`` seconds, then leases are released."""
        self._stop_requested = True
        if self._stop is not None:
            self._stop.set()

    async def run(self) -> None:
        """Deliver until ``stop()``; raises if a loop fails for a reason other than a lost connection."""
        self._stop = asyncio.Event()
        self._config_dirty = asyncio.Event()
        if self._stop_requested:
            self._stop.set()
        listener = await db.connect(self.dsn, autocommit=True)  # fails early, with a clear message
        self._pool = AsyncConnectionPool(
            self.dsn, min_size=1, max_size=self.pool_size, kwargs={"autocommit": True},
            open=False, name=f"pgsink.deliver.{self.worker_id}",
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            headers={"user-agent": "pgsink"},
        )
        try:
            await self._pool.open(wait=True, timeout=30)
            self._side("listen", self._listen(listener))
            self._side("config", self._config_loop())
            self._side("renew", self._renew_loop())
            await self._stop.wait()
        finally:
            await self._shutdown()
            await listener.close()  # the listen task closes it too; closing twice is harmless
        if self._fatal is not None:
            raise self._fatal

    @property
    def active_sinks(self) -> set[UUID]:
        """Sinks this stage is delivering right now (active, and in its ``sinks`` selection)."""
        return set(self._runners)

    # ------------------------------------------------------------ plumbing for runners

    @property
    def pool(self) -> AsyncConnectionPool:
        assert self._pool is not None
        return self._pool

    @property
    def stopping(self) -> bool:
        return self._stop_requested

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A task whose unexpected failure stops the whole stage, loudly."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._watch)
        return task

    def _side(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        self._side_tasks.append(self.spawn(coro, f"pgsink.deliver.{name}"))

    def _watch(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self._fatal is None:
            log.error("delivery task %s failed; stopping the stage", task.get_name(), exc_info=exc)
            self._fatal = exc
            self.stop()

    async def with_conn(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        async with self.pool.connection() as conn:
            return await fn(conn, *args, **kwargs)

    def _session_for(self, endpoint: HttpEndpoint | None) -> aiohttp.ClientSession:
        """The shared session; endpoints that block private addresses use one whose resolver refuses them."""
        assert self._session is not None
        if endpoint is None or not endpoint.block_private_addresses:
            return self._session
        if self._public_session is None:
            self._public_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, resolver=safety.PublicOnlyResolver()),
                headers={"user-agent": "pgsink"},
            )
        return self._public_session

    async def _wait_for_rate(self, endpoint: HttpEndpoint) -> None:
        """Take a token of the endpoint's bucket, shared by all workers; wait if there was none."""
        assert endpoint.rate_limit is not None
        wait = await self.with_conn(safety.take_rate_token, endpoint.id, endpoint.rate_limit)
        if wait > 0:
            await asyncio.sleep(wait)  # the rate limit itself, not a synchronisation

    async def post(self, setup: SinkSetup, messages: list[q.QueuedMessage],
                   prepared: Prepared | None = None) -> q.Attempt:
        """POST one batch; any outcome becomes an Attempt (never raises for HTTP trouble or user functions)."""
        if prepared is not None and prepared.error is not None:  # a transform or route failed: nothing to send
            return q.Attempt([m.id for m in messages], datetime.now(UTC), 0, None, None,
                             prepared.error.describe()[:USER_ERROR_LIMIT], False)
        route = prepared.route if prepared is not None else DEFAULT_ROUTE
        if prepared is not None and prepared.bodies:
            plain = render_transformed(messages, prepared.bodies, setup.ctx)
        elif prepared is not None and prepared.enrichment is not None:
            plain = render_enriched(messages, prepared.enrichment, setup.ctx)
        else:
            plain = render_body(messages, setup.ctx)
        body = setup.target.encode(plain)
        endpoint = setup.endpoint
        url = setup.target.url
        if route.endpoint_path is not None and endpoint is not None:
            url = join_url(endpoint.url, route.endpoint_path)
        if endpoint is not None and endpoint.rate_limit is not None:
            await self._wait_for_rate(endpoint)
        # every request says what it carries, signed or not: a transformed body may have dropped the keys
        msg_id = (idempotency_key(messages[0]) if len(messages) == 1
                  else batch_id([idempotency_key(m) for m in messages]))
        ours = {"webhook-id": msg_id}
        if endpoint is not None and endpoint.signing is not None:  # after any wait: a fresh timestamp
            ours.update(sign_headers(endpoint.signing.live_keys(time.time()), msg_id, plain))
        headers = merge_headers(setup.target.headers, route.headers, ours)
        timeout_ms = setup.sink.request_timeout_ms
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        status: int | None = None
        text: str | None = None
        error: str | None = None
        retry_after: float | None = None
        try:
            ssl_option: Any = True
            if endpoint is not None:
                if endpoint.block_private_addresses:
                    safety.check_url_host(url)
                if endpoint.ca_bundle:
                    ssl_option = safety.ssl_context(endpoint.ca_bundle)
            async with self._session_for(endpoint).request(
                route.method, url, data=body, headers=headers, allow_redirects=False, ssl=ssl_option,
                timeout=aiohttp.ClientTimeout(total=timeout_ms / 1000),
            ) as resp:
                status = resp.status
                text = await _excerpt(resp)
                if status in safety.RETRY_AFTER_STATUSES:
                    retry_after = safety.parse_retry_after(resp.headers.get("retry-after"))
                if 300 <= status < 400:  # a failure: a redirect could lead anywhere, even inside
                    text = f"redirect not followed (location: {resp.headers.get('location', '-')}); {text or ''}"
        except TimeoutError:
            error = f"timed out after {timeout_ms} ms (the sink's request_timeout_ms)"
        except (aiohttp.ClientError, ValueError, OSError) as e:  # refused, reset, TLS, bad header or URL, blocked
            error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        duration_ms = int((time.perf_counter() - t0) * 1000)
        delivered = error is None and status is not None and 200 <= status < 300
        return q.Attempt([m.id for m in messages], started, duration_ms, status, _storable(text, url),
                         _storable(error, url), delivered, retry_after)

    # ------------------------------------------------------------ side loops

    async def _listen(self, conn: psycopg.AsyncConnection) -> None:
        """LISTEN for new messages and config changes (polling covers the gaps)."""
        assert self._stop is not None
        await db.listen(self.dsn, ("pgsink_messages", "pgsink_config"), self._on_notify, self._wake_all,
                        self._stop, conn)

    def _on_notify(self, n: psycopg.Notify) -> None:
        if n.channel == "pgsink_config":
            assert self._config_dirty is not None
            self._config_dirty.set()
        else:
            self._on_messages(n.payload)

    def _on_messages(self, payload: str) -> None:
        try:
            runner = self._runners.get(UUID(payload))
        except ValueError:
            self._wake_all()
            return
        if runner is not None:
            runner.notify()

    def _wake_all(self) -> None:
        for r in self._runners.values():
            r.notify()

    async def _config_loop(self) -> None:
        """Load config at start; reload when its fingerprint changes or on NOTIFY pgsink_config."""
        assert self._stop is not None and self._config_dirty is not None
        version: tuple[Any, ...] | None = None
        while not self.stopping:
            try:
                async with self.pool.connection() as conn:
                    current = await config_version(conn)
                    if current != version or self._config_dirty.is_set():
                        self._config_dirty.clear()
                        config = await load_config(conn)
                        await self._apply(config, conn)
                        version = current
            except TRANSIENT_DB_ERRORS as e:
                log.warning("cannot read config from the state database (%s); retrying", e)
            for r in self._retired:
                if not r.busy() and r.setup.enricher is not None:
                    await self._close_enricher(r.setup.enricher)
            self._retired = [r for r in self._retired if r.busy()]
            await wait_event(self._config_dirty, jittered(self.poll_interval))

    async def _apply(self, config: Config, conn: psycopg.AsyncConnection) -> None:
        """Start runners for active sinks, reconfigure changed ones, stop paused or removed ones."""
        wanted: dict[UUID, SinkSetup] = {}
        seen: set[str] = set()
        for sink in config.sinks.values():
            if self.sink_filter is not None:
                names = {sink.name, str(sink.id)} & self.sink_filter
                if not names:
                    continue
                seen |= names
            if sink.status != "active":
                continue
            endpoint = config.endpoints[sink.http_endpoint_id]
            source = config.sources[sink.source_id]
            try:
                wanted[sink.id] = SinkSetup(sink, RenderContext.for_sink(sink, source),
                                             RequestTarget.for_sink(sink, endpoint), endpoint,
                                             SinkFunctions.for_sink(sink), self._enricher(sink, source))
            except Exception as e:  # noqa: BLE001 - one sink's odd config must not stop every sink
                runner = self._runners.get(sink.id)
                log.error("sink %s: cannot use its config (%s: %s); %s", sink.name, type(e).__name__, e,
                          "it keeps its previous one" if runner else "it is not delivered until this is fixed",
                          extra={"sink": sink.name})
                if runner is not None:
                    wanted[sink.id] = runner.setup
        for name in (self.sink_filter or set()) - seen - self._warned_missing:
            log.warning("sink %r is not configured; nothing to deliver for it", name)
            self._warned_missing.add(name)
        for sink_id, runner in list(self._runners.items()):
            if sink_id not in wanted:
                log.info("sink %s is no longer active here: stopping its delivery", runner.setup.sink.name)
                runner.stop()
                self._retired.append(runner)
                del self._runners[sink_id]
        for sink_id, setup in wanted.items():
            runner = self._runners.get(sink_id)
            if runner is None or runner.setup.sink.lane_count != setup.sink.lane_count:
                await q.ensure_lanes(conn, sink_id, setup.sink.lane_count)
            if runner is None:
                runner = SinkRunner(self, setup)
                self._runners[sink_id] = runner
                self._touched_sinks.add(sink_id)
                runner.start()
                log.info("delivering sink %s", setup.sink.name, extra={"sink": setup.sink.name})
            else:
                old = runner.setup.enricher
                if old is not None and old is not setup.enricher:
                    self._retire_enricher(old)
                runner.setup = setup

    def _retire_enricher(self, enricher: Enricher) -> None:
        """Close a replaced enricher after two leases: a batch that began with it has ended by then."""
        self._stale_enrichers.add(enricher)
        asyncio.get_running_loop().call_later(
            2 * self.lease_seconds, lambda: self.spawn(self._close_enricher(enricher), "pgsink.deliver.enricher"))

    async def _close_enricher(self, enricher: Enricher) -> None:
        self._stale_enrichers.discard(enricher)
        with contextlib.suppress(Exception):  # closing is best effort: the source may be gone
            await enricher.close()

    def _enricher(self, sink: Sink, source: Source) -> Enricher | None:
        """The sink's enricher, kept across reloads while its query and source stay the same."""
        if not sink.enrichment_sql:
            return None
        runner = self._runners.get(sink.id)
        old = runner.setup.enricher if runner is not None else None
        if old is not None and old.sql == sink.enrichment_sql and old.source == source:
            return old
        return Enricher(source, sink.enrichment_sql)

    async def _renew_loop(self) -> None:
        """Extend held leases every third of the lease; the task of a lease found lost is stopped."""
        assert self._stop is not None
        while not self.stopping:
            await wait_event(self._stop, self.lease_seconds / 3)
            if self.stopping:
                return
            # the task that held each lease when we asked: only that one is stopped if the lease is lost
            # (a lane released by its finished task and leased again runs a new task, which is fine)
            lanes = {(r.sink_id, lane): t for r in [*self._runners.values(), *self._retired]
                     for lane, t in r.lane_tasks.items()}
            groups = {(r.sink_id, key): t for r in [*self._runners.values(), *self._retired]
                      for key, t in r.group_tasks.items()}
            if not lanes and not groups:
                continue
            try:
                lost_lanes, lost_groups = await self.with_conn(
                    q.renew_leases, self.owner, self.lease_seconds, list(lanes), list(groups))
            except TRANSIENT_DB_ERRORS as e:
                log.warning("cannot renew leases (%s); they expire in %.0f s", e, self.lease_seconds)
                continue
            # a task whose lease is no longer ours stops: another worker holds it, or held it and sent
            # its batches meanwhile, and a request still in flight here must not race those (a task
            # that released its own lease as it finished is at its end anyway)
            _stop_lost(lanes, lost_lanes, "lane")
            _stop_lost(groups, lost_groups, "parked group")

    async def _shutdown(self) -> None:
        """Stop claiming, give in-flight requests the grace period, then release our leases."""
        self._stop_requested = True
        runners = [*self._runners.values(), *self._retired]
        for r in runners:
            r.stop()
        await asyncio.gather(*(r.loop_task for r in runners if r.loop_task), return_exceptions=True)
        inflight = [t for r in runners for t in r.tasks()]
        if inflight:
            _, pending = await asyncio.wait(inflight, timeout=self.shutdown_grace)
            for t in pending:
                t.cancel()
            if pending:
                log.warning("%d deliveries still running after %.1f s; abandoned, they will be retried",
                            len(pending), self.shutdown_grace)
                await asyncio.gather(*pending, return_exceptions=True)
        for t in self._side_tasks:
            t.cancel()
        await asyncio.gather(*self._side_tasks, return_exceptions=True)
        if self._pool is not None:
            if self._touched_sinks and not self._pool.closed:
                try:
                    await self.with_conn(q.release_all, self.owner, sorted(self._touched_sinks))
                except TRANSIENT_DB_ERRORS as e:
                    log.warning("cannot release leases (%s); they expire in %.0f s", e, self.lease_seconds)
            await self._pool.close()
        if self._session is not None:
            await self._session.close()
        if self._public_session is not None:
            await self._public_session.close()
        for enricher in {*(r.setup.enricher for r in runners if r.setup.enricher), *self._stale_enrichers}:
            await self._close_enricher(enricher)
