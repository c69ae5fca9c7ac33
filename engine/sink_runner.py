"""One sink's delivery in a worker: a lane loop and a parked-group loop.

The lane loop keeps up to ``min(lane_count, max_lanes_per_sink)`` lanes
leased, one batch in flight per lane, so a group never has two requests in
flight; a lane whose batches come back full is kept (``LANE_HOLD_SECONDS``)
and the ack of one batch travels with the read of the next. The group loop
delivers parked groups on their own, with their own back-off. The HTTP
request itself and the shared pool, session and settings belong to the
:class:`~pgsink.engine.deliver.DeliveryStage` that owns the runner.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg

from . import queue as q
from .enrichment import Enricher
from .errors import PgsinkError
from .model import HttpEndpoint, Sink
from .render import RenderContext, RequestTarget
from .sink_functions import Prepared, SinkFunctions
from .userfunc import UserFunctionError
from .waiting import jittered, wait_event

if TYPE_CHECKING:
    from .deliver import DeliveryStage

log = logging.getLogger("pgsink.deliver")

LANE_HOLD_SECONDS = 2.0
"""How long a worker may keep a lane while its batches come back full, before giving it back."""

TRANSIENT_DB_ERRORS = (psycopg.OperationalError,)
"""Connection-level trouble with the state database: retried, never fatal."""


class Pulse:
    """Wakes everyone waiting at the moment it fires (unlike an Event, it does not stay set)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        await wait_event(self._event, timeout)


def _forget(tasks: dict[Any, asyncio.Task[None]], key: Any) -> None:
    """Remove the current task from ``tasks``; not a newer task that took the same key."""
    if tasks.get(key) is asyncio.current_task():
        del tasks[key]


def stop_task(task: asyncio.Task[None]) -> None:
    """Cancel a task once: a second cancel could cut short the clean-up of the first (a psycopg
    query being cancelled on the server, a connection going back to the pool)."""
    if not task.done() and not task.cancelling():
        task.cancel()


def _internal_error(e: Exception) -> q.Attempt:
    """A failed attempt standing for a bug of ours, for the attempt log and the lane's last_error."""
    return q.Attempt([], datetime.now(UTC), 0, None, None, q.storable(f"internal error: {type(e).__name__}: {e}"),
                     False)


async def _prepare(setup: SinkSetup, messages: list[q.QueuedMessage]) -> Prepared | None:
    """Enrichment (one source query per batch), then transform and route; None when the sink has none.

    Only the messages the request would carry (``plan_batch``: not behind their
    group, not pruned) are enriched and given to the functions.
    """
    if setup.functions is None and setup.enricher is None:
        return None
    sent = {m.id for m in q.plan_batch(messages).deliver}
    enrichment: dict[int, Any] | None = None
    if setup.enricher is not None:
        keys = sorted({m.record_pk for m in messages if m.id in sent and m.record_pk is not None})
        try:
            rows = await setup.enricher.fetch(keys)
        except (psycopg.Error, PgsinkError) as e:
            error = UserFunctionError(f"sink {setup.sink.name}: enrichment query failed: {e}")
            return Prepared(messages, error=error)
        enrichment = {m.id: rows.get(m.record_pk) for m in messages if m.record_pk is not None}
    if setup.functions is None:
        return Prepared(messages, enrichment=enrichment)
    return setup.functions.prepare(messages, setup.ctx, lambda m: m.id in sent, enrichment)


def _honour_retry_after(fate: q.FailurePlan, seconds: float) -> q.FailurePlan:
    """The endpoint said when to come back (Retry-After): wait at least that long."""
    if fate.kind == "backoff":
        return dataclasses.replace(fate, delay=max(fate.delay, seconds))
    if fate.kind == "park":
        groups = [dataclasses.replace(g, delay=max(g.delay, seconds)) for g in fate.groups]
        return dataclasses.replace(fate, groups=groups)
    return fate


@dataclass(frozen=True)
class SinkSetup:
    """A sink's config as one runner uses it; replaced whole on reload."""

    sink: Sink
    ctx: RenderContext
    target: RequestTarget
    endpoint: HttpEndpoint | None = None
    functions: SinkFunctions | None = None  # transform / route
    enricher: Enricher | None = None


class SinkRunner:
    """Delivery of one sink in this stage: a lane loop and a parked-group loop."""

    def __init__(self, stage: DeliveryStage, setup: SinkSetup) -> None:
        self.stage = stage
        self.setup = setup
        self.sink_id = setup.sink.id
        self.lane_tasks: dict[int, asyncio.Task[None]] = {}
        self.group_tasks: dict[str, asyncio.Task[None]] = {}
        self.lane_wake = asyncio.Event()
        self.group_wake = asyncio.Event()
        self.arrivals = Pulse()
        self.stopped = False
        self.loop_task: asyncio.Task[None] | None = None
        self._timers: set[asyncio.TimerHandle] = set()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.loop_task = self.stage.spawn(self._run(), f"pgsink.deliver.sink.{self.setup.sink.name}")

    def stop(self) -> None:
        self.stopped = True
        for h in self._timers:
            h.cancel()
        self._timers.clear()
        self.lane_wake.set()
        self.group_wake.set()
        self.arrivals.fire()

    def notify(self) -> None:
        self.lane_wake.set()
        self.arrivals.fire()

    def tasks(self) -> list[asyncio.Task[None]]:
        return [*self.lane_tasks.values(), *self.group_tasks.values()]

    def busy(self) -> bool:
        return bool(self.lane_tasks or self.group_tasks) or (self.loop_task is not None and not self.loop_task.done())

    @property
    def halted(self) -> bool:
        return self.stopped or self.stage.stopping

    def _wake_later(self, event: asyncio.Event, delay: float) -> None:
        if self.halted:
            return
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            event.set()

        handle = loop.call_later(max(0.0, delay), fire)
        self._timers.add(handle)

    async def _run(self) -> None:
        await asyncio.gather(self._lane_loop(), self._group_loop())

    # ------------------------------------------------------------ lanes

    async def _lane_loop(self) -> None:
        while not self.halted:
            self.lane_wake.clear()
            sink = self.setup.sink
            free = min(sink.lane_count, self.stage.max_lanes_per_sink) - len(self.lane_tasks)
            if free > 0:
                try:
                    leases = await self.stage.with_conn(
                        q.lease_lanes, sink_id=sink.id, lane_count=sink.lane_count, batch_size=sink.batch_size,
                        max_ack_pending=sink.max_ack_pending, owner=self.stage.owner, max_lanes=free,
                        lease_seconds=self.stage.lease_seconds)
                except TRANSIENT_DB_ERRORS as e:
                    log.warning("sink %s: cannot lease lanes (%s); retrying", sink.name, e)
                    leases = []
                for lease in leases:
                    if self.halted:
                        await self._quietly(q.release_lane, lease, self.stage.owner)
                        continue
                    if (old := self.lane_tasks.get(lease.lane)) is not None:
                        # its lease had expired under a task still running here, and another worker may
                        # have delivered meanwhile: that task stops, a new one goes on from this lease
                        stop_task(old)
                    self.lane_tasks[lease.lane] = self.stage.spawn(
                        self._lane_work(lease), f"pgsink.deliver.{sink.name}.lane{lease.lane}")
            await wait_event(self.lane_wake, jittered(self.stage.poll_interval))

    async def _quietly(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        try:
            await self.stage.with_conn(fn, *args)
        except TRANSIENT_DB_ERRORS as e:
            log.warning("sink %s: %s failed (%s); the lease will expire", self.setup.sink.name, fn.__name__, e)

    async def _lane_work(self, lease: q.LaneLease) -> None:
        """Deliver batches of a leased lane: keep the lease while batches come back full.

        Keeping the lane (for at most ``LANE_HOLD_SECONDS``, so other lanes get
        their turn under max_ack_pending) saves a lease per batch, and the ack
        of one batch travels with the read of the next; any outcome other than
        a plain success gives the lane back.
        """
        loop = asyncio.get_running_loop()
        until = loop.time() + LANE_HOLD_SECONDS
        current: q.LaneLease | None = lease
        prefetched: list[q.QueuedMessage] | None = None
        try:
            while current is not None:
                current, prefetched = await self._lane_batch(current, prefetched, keep=loop.time() < until)
        except TRANSIENT_DB_ERRORS as e:
            log.warning("sink %s lane %d: state database error (%s); the batch will be retried",
                        self.setup.sink.name, lease.lane, e)
        except Exception as e:  # noqa: BLE001 - a bug costs this lane's batch a failed attempt, not every sink
            log.exception("sink %s lane %d: unexpected error; counted as a failed attempt of the batch",
                          self.setup.sink.name, lease.lane, extra={"sink": self.setup.sink.name})
            if current is not None:
                await self._after_internal_error(current, e)
        finally:
            _forget(self.lane_tasks, lease.lane)
            self.lane_wake.set()

    async def _after_internal_error(self, lease: q.LaneLease, error: Exception) -> None:
        """The lane's head batch failed on a bug of ours: a failed attempt like any other, so the batch
        backs off, then its groups park and only the group that trips the bug stays stuck."""
        setup, stage = self.setup, self.stage
        attempt = _internal_error(error)
        try:
            messages = await self._reader(setup, lease)(lease.delivered_id, min(lease.reserved, setup.sink.batch_size))
            if messages:
                await self._lane_failed(setup, lease, q.plan_batch(messages), attempt)
                return
            delay = q.backoff_delay(lease.failures + 1, stage.backoff_base, stage.backoff_cap)
            await stage.with_conn(q.fail_lane, lease, stage.owner, delay=delay, in_flight=0, attempt=attempt)
            self._wake_later(self.lane_wake, delay)
        except Exception as e:  # noqa: BLE001 - the lease expires and the lane is retried then
            log.warning("sink %s lane %d: cannot record the failure (%s); the lease will expire",
                        setup.sink.name, lease.lane, e)

    async def _lane_batch(self, lease: q.LaneLease, prefetched: list[q.QueuedMessage] | None, *, keep: bool
                          ) -> tuple[q.LaneLease | None, list[q.QueuedMessage] | None]:
        """Deliver one batch; returns the lease to go on with (and its next batch, if read), or None."""
        setup = self.setup
        stage = self.stage
        limit = min(lease.reserved, setup.sink.batch_size)
        messages = [] if self.halted else await self._read_filled(setup, lease, limit, prefetched)
        if not messages:  # nothing to do, or stopping: give the lane back
            await stage.with_conn(q.release_lane, lease, stage.owner)
            return None, None
        prepared = await _prepare(setup, messages)
        if prepared is not None:  # cut at a route change or a failing function
            messages = prepared.messages
        plan = q.plan_batch(messages)
        for m in plan.broken:
            log.error("sink %s: message %d has no change row (pruned?); discarded", setup.sink.name, m.id)
        attempt = await stage.post(setup, plan.deliver, prepared) if plan.deliver else None
        going_on = keep and len(messages) >= limit and not self.halted
        if attempt is not None and attempt.delivered and plan.simple:
            if going_on:
                nxt = await stage.with_conn(
                    q.ack_lane_and_read_next, lease, stage.owner, last_id=plan.last_id, attempt=attempt,
                    keep_for=stage.lease_seconds, source_id=setup.sink.source_id, limit=limit)
                ok = nxt is not None
                if ok:
                    return q.LaneLease(lease.sink_id, lease.lane, plan.last_id, 0, lease.reserved), nxt
            else:
                ok = await stage.with_conn(q.ack_lane, lease, stage.owner, last_id=plan.last_id, attempt=attempt)
        elif attempt is None or attempt.delivered:
            ok = await stage.with_conn(
                q.advance_lane, lease, stage.owner, last_id=plan.last_id, attempt=attempt,
                copies=plan.copies_on_success(), behind_keys=plan.behind_keys, unpark_keys=plan.unpark_keys)
            if plan.behind:
                self.group_wake.set()
        else:
            ok = await self._lane_failed(setup, lease, plan, attempt)
        if not ok:
            log.warning("sink %s: lease of lane %d was lost before its ack; another worker delivers it",
                        setup.sink.name, lease.lane)
        return None, None

    async def _read_filled(self, setup: SinkSetup, lease: q.LaneLease, limit: int,
                           prefetched: list[q.QueuedMessage] | None = None) -> list[q.QueuedMessage]:
        """The next batch of the lane; a short one waits up to batch_timeout_ms to fill."""
        sink = setup.sink
        read = self._reader(setup, lease)
        # a batch read ahead with the last ack may predate a reload that lowered batch_size (or
        # turned batch off): cut it to the sink as it is now; the rest is read again after the cursor
        messages = prefetched[:limit] if prefetched is not None else await read(lease.delivered_id, limit)
        if not messages or len(messages) >= limit or sink.batch_timeout_ms <= 0:
            return messages
        loop = asyncio.get_running_loop()
        deadline = loop.time() + sink.batch_timeout_ms / 1000
        while len(messages) < limit and not self.halted:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await self.arrivals.wait(remaining)
            messages.extend(await read(messages[-1].id, limit - len(messages)))
        return messages

    def _reader(self, setup: SinkSetup, lease: q.LaneLease
                ) -> Callable[[int, int], Awaitable[list[q.QueuedMessage]]]:
        async def read(after_id: int, limit: int) -> list[q.QueuedMessage]:
            return await self.stage.with_conn(
                q.read_lane_batch, sink_id=lease.sink_id, source_id=setup.sink.source_id, lane=lease.lane,
                after_id=after_id, limit=limit)
        return read

    async def _lane_failed(self, setup: SinkSetup, lease: q.LaneLease, plan: q.BatchPlan,
                           attempt: q.Attempt) -> bool:
        """Back off, park the batch's groups, or discard it (max_retry_count)."""
        sink = setup.sink
        stage = self.stage
        failures = lease.failures + 1
        past_retries = sink.max_retry_count is not None and failures > sink.max_retry_count
        may_park = False
        if failures >= stage.park_after and not past_retries:
            may_park = await stage.with_conn(q.may_park, sink.id, lease.lane, stage.park_health_window)
        fate = q.plan_failure(plan, failures=failures, max_retry_count=sink.max_retry_count,
                              park_after=stage.park_after, may_park=may_park,
                              base=stage.backoff_base, cap=stage.backoff_cap)
        if attempt.retry_after is not None:
            fate = _honour_retry_after(fate, attempt.retry_after)
        log.warning("sink %s lane %d: attempt %d failed (%s): %s", sink.name, lease.lane, failures,
                    attempt.describe(), fate.kind, extra={"sink": sink.name})
        if fate.kind == "backoff":
            ok = await stage.with_conn(q.fail_lane, lease, stage.owner, delay=fate.delay,
                                       in_flight=len(plan.deliver), attempt=attempt)
            self._wake_later(self.lane_wake, fate.delay)
            return ok
        ok = await stage.with_conn(
            q.advance_lane, lease, stage.owner, last_id=plan.last_id, attempt=attempt, copies=fate.copies,
            park=fate.groups, behind_keys=plan.behind_keys,
            unpark_keys=plan.unpark_keys if fate.kind == "discard" else [],
            lane_error=attempt.describe())
        if fate.groups:
            self._wake_later(self.group_wake, min(g.delay for g in fate.groups))
        return ok

    # ------------------------------------------------------------ parked groups

    async def _group_loop(self) -> None:
        while not self.halted:
            self.group_wake.clear()
            sink = self.setup.sink
            free = self.stage.max_groups_per_sink - len(self.group_tasks)
            if free > 0:
                try:
                    leases = await self.stage.with_conn(
                        q.lease_parked_groups, sink_id=sink.id, batch_size=sink.batch_size,
                        max_ack_pending=sink.max_ack_pending, owner=self.stage.owner, max_groups=free,
                        lease_seconds=self.stage.lease_seconds)
                except TRANSIENT_DB_ERRORS as e:
                    log.warning("sink %s: cannot lease parked groups (%s); retrying", sink.name, e)
                    leases = []
                for lease in leases:
                    if self.halted:
                        await self._quietly(q.release_parked_group, lease, self.stage.owner)
                        continue
                    if (old := self.group_tasks.get(lease.group_key)) is not None:
                        stop_task(old)  # as for lanes
                    self.group_tasks[lease.group_key] = self.stage.spawn(
                        self._group_batch(lease), f"pgsink.deliver.{sink.name}.parked")
            await wait_event(self.group_wake, jittered(self.stage.poll_interval))

    async def _group_batch(self, lease: q.GroupLease) -> None:
        """Deliver the next parked messages of one group, in order."""
        setup = self.setup
        sink = setup.sink
        stage = self.stage
        try:
            messages = await stage.with_conn(q.read_parked_batch, sink_id=sink.id, source_id=sink.source_id,
                                             group_key=lease.group_key,
                                             limit=min(lease.reserved, sink.batch_size), owner=stage.owner)
            broken = [m.id for m in messages if not m.renderable]
            if broken:
                log.error("sink %s: parked messages %s have no change row (pruned?); discarded", sink.name, broken)
                await stage.with_conn(q.discard_parked, sink.id, broken)
                messages = [m for m in messages if m.renderable]
            if not messages:
                if not await stage.with_conn(q.drop_drained_group, sink.id, lease.lane, lease.group_key,
                                             stage.owner):
                    await stage.with_conn(q.release_parked_group, lease, stage.owner)
                return
            prepared = await _prepare(setup, messages)
            if prepared is not None:
                messages = prepared.messages
            attempt = await stage.post(setup, messages, prepared)
            if attempt.delivered:
                if not await stage.with_conn(q.ack_parked, lease, stage.owner, attempt):
                    log.warning("sink %s: lease of parked group %r was lost before its ack",
                                sink.name, lease.group_key)
                elif len(messages) < min(lease.reserved, sink.batch_size):
                    await stage.with_conn(q.drop_drained_group, sink.id, lease.lane, lease.group_key, None)
                return
            delay, pending, moved_on = q.parked_outcome(
                messages, group_attempts=lease.attempts, max_retry_count=sink.max_retry_count,
                base=stage.backoff_base, cap=stage.backoff_cap)
            if attempt.retry_after is not None:
                delay = max(delay, attempt.retry_after)
            log.warning("sink %s parked group %r: attempt %d failed (%s)", sink.name, lease.group_key,
                        lease.attempts + 1, attempt.describe(), extra={"sink": sink.name})
            await stage.with_conn(q.fail_parked, lease, stage.owner, attempt, delay=delay, in_flight=pending,
                                  max_retry_count=sink.max_retry_count, moved_on=moved_on)
            self._wake_later(self.group_wake, delay)
        except TRANSIENT_DB_ERRORS as e:
            log.warning("sink %s parked group %r: state database error (%s); will retry",
                        sink.name, lease.group_key, e)
        except Exception as e:  # noqa: BLE001 - as for lanes: this group backs off, the rest flows
            log.exception("sink %s parked group %r: unexpected error; the group backs off and retries",
                          sink.name, lease.group_key, extra={"sink": sink.name})
            delay = q.backoff_delay(lease.attempts + 1, stage.backoff_base, stage.backoff_cap)
            try:
                await stage.with_conn(q.fail_parked, lease, stage.owner, _internal_error(e), delay=delay,
                                      in_flight=lease.reserved, max_retry_count=None, moved_on=False)
            except Exception as again:  # noqa: BLE001 - the lease expires and the group is retried then
                log.warning("sink %s parked group %r: cannot record the failure (%s); the lease will expire",
                            sink.name, lease.group_key, again)
            self._wake_later(self.group_wake, delay)
        finally:
            _forget(self.group_tasks, lease.group_key)
            self.group_wake.set()
