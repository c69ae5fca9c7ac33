"""The delivery queue, SQL side: lanes, leases, batch reads, acks and parking.

``pgsink.messages`` is append-only. A sink's messages are split into lanes by
a stable hash of their group key, so a group lives in one lane; a lane's
cursor (``pgsink.lanes.delivered_id``) says everything up to it is delivered
or parked. A worker leases a lane (``FOR UPDATE SKIP LOCKED``), reads the next
batch after the cursor by an index range scan, POSTs it and moves the cursor
with one fenced statement: the success path never updates a row per message.

A batch that keeps failing parks its groups: their messages are copied, in
order, into ``pgsink.parked_messages`` and the cursor moves on, so the other
groups of the lane keep flowing; later messages of a parked group are parked
behind it. Parked groups are leased and retried on their own. Only the lane
holder inserts parked messages; a parked group's retrier delivers, backs off,
discards and drops drained group rows (see ``drop_drained_group``).

This module holds the statements and the pure decisions about a batch
(``plan_batch``, ``plan_failure``); ``pgsink.engine.deliver`` runs the loops.
"""

from __future__ import annotations

import logging
import random
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple
from uuid import UUID

import psycopg

from .queries import QUERIES

try:  # CPython's own MD5: 0.4 µs a key against 1.2 µs through OpenSSL's hashlib.md5 (the set-up dominates)
    from _md5 import md5 as _md5
except ImportError:  # a build without it
    from hashlib import md5 as _md5

_LANE_HASH = struct.Struct(">I").unpack_from

log = logging.getLogger("pgsink.queue")

PARK_AFTER_FAILURES = 3
"""Consecutive failures of a lane's head batch after which its groups are parked."""

PARK_HEALTH_WINDOW_SECONDS = 300.0
"""How far back a delivered attempt counts as "the endpoint works for others"."""

RESPONSE_BODY_LIMIT = 4096
"""Bytes of a response body kept in the attempt log."""

SYNTHETIC_GROUP_PREFIX = "pgsink:message:"
"""Group key of a parked message that has none (message_grouping off): its own group."""


# ---------------------------------------------------------------- lanes and keys


def lane_for(group_key: str, lane_count: int) -> int:
    """The lane of a group key; the Python twin of SQL ``pgsink.lane_for``."""
    return _LANE_HASH(_md5(group_key.encode()).digest())[0] % lane_count


def storable(text: str | None) -> str | None:
    """Text as Postgres can store it: valid UTF-8 (no lone surrogates, as undecodable header bytes come
    through) and no NUL."""
    if text is None:
        return None
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")


def bigint_array(ids: Sequence[int]) -> str:
    """Message ids as a ``bigint[]`` literal (the SQL casts it): a batch of 100 takes ~19 µs,
    against ~100 µs through psycopg's generic list dumper, on every ack."""
    return "{" + ",".join(map(str, ids)) + "}"


def message_lane(message_id: int, group_key: str | None, lane_count: int) -> int:
    """A message's lane: by group when grouped, else spread by id."""
    return lane_for(group_key, lane_count) if group_key is not None else message_id % lane_count


def backoff_delay(failures: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait after the ``failures``-th consecutive failure (1-based).

    Exponential (base * 2^(n-1), capped) with jitter in [2/3, 1] of that value.
    Not full jitter: full jitter can retry a struggling endpoint almost at once
    and makes consecutive delays shrink; with a 2/3 floor every delay is longer
    than the previous one until the cap, and retries of many lanes still spread.
    """
    n = max(1, failures)
    ceiling = min(cap, base * (2.0 ** min(n - 1, 62)))
    r = (rng or random).random()
    return ceiling * (2.0 / 3.0 + r / 3.0)


def backoff_floor(failures: int, base: float, cap: float) -> float:
    """The smallest delay ``backoff_delay`` can return for this failure count."""
    return min(cap, base * (2.0 ** min(max(1, failures) - 1, 62))) * 2.0 / 3.0


# ---------------------------------------------------------------- rows


@dataclass(frozen=True, slots=True)
class LaneLease:
    sink_id: UUID
    lane: int
    delivered_id: int
    failures: int
    reserved: int  # messages this lease may take (its share of max_ack_pending)


@dataclass(frozen=True, slots=True)
class GroupLease:
    sink_id: UUID
    group_key: str
    lane: int
    attempts: int
    reserved: int


class QueuedMessage(NamedTuple):
    """A message as read for delivery; jsonb fields stay JSON text (exact digits).

    A NamedTuple, made straight from the query's row: ~0.5 µs against ~2.7 µs
    for a frozen dataclass of these 16 fields, for every message delivered.
    """

    id: int
    group_key: str | None
    action: str
    commit_lsn: int
    commit_idx: int
    commit_timestamp: str
    table_schema: str | None
    table_name: str | None
    record: str | None
    changes: str | None
    transaction_annotations: str | None
    backfill_id: str | None
    record_pk: str | None
    group_parked: bool
    group_blocked: bool
    attempts: int

    @property
    def renderable(self) -> bool:
        """False when the change it points at is gone (pruned): nothing to send."""
        return self.record is not None and self.table_name is not None

    @property
    def park_key(self) -> str:
        return self.group_key if self.group_key is not None else f"{SYNTHETIC_GROUP_PREFIX}{self.id}"


@dataclass(frozen=True, slots=True)
class Attempt:
    """One HTTP request's outcome, as stored in pgsink.attempts."""

    message_ids: list[int]
    started_at: datetime
    duration_ms: int
    http_status: int | None
    response_body: str | None
    error: str | None
    delivered: bool
    retry_after: float | None = None  # seconds the endpoint asked to wait (Retry-After on 429/503)

    def describe(self) -> str:
        """Short text for last_error columns and logs."""
        if self.error:
            return self.error
        body = (self.response_body or "").strip().replace("\n", " ")
        return f"HTTP {self.http_status}" + (f": {body[:200]}" if body else "")


# ---------------------------------------------------------------- pure decisions


@dataclass(frozen=True)
class Copy:
    id: int
    state: str  # 'parked' | 'discarded'
    attempts: int


@dataclass(frozen=True)
class ParkGroup:
    group_key: str
    attempts: int
    delay: float
    in_flight: int


@dataclass(frozen=True)
class BatchPlan:
    """What to do with a lane batch before POSTing it."""

    deliver: list[QueuedMessage]
    behind: list[QueuedMessage]      # their group is parked with messages left: park behind it
    broken: list[QueuedMessage]      # their change is gone: discard (kept, replayable)
    unpark_keys: list[str]           # parked groups found drained: delivered normally again
    last_id: int

    def copies_on_success(self) -> list[Copy]:
        return [Copy(m.id, "parked", 0) for m in self.behind] + [Copy(m.id, "discarded", 0) for m in self.broken]

    @property
    def simple(self) -> bool:
        """Nothing to park, discard or unpark: a success is a plain ack."""
        return not (self.behind or self.broken or self.unpark_keys)

    @property
    def behind_keys(self) -> list[str]:
        return sorted({m.park_key for m in self.behind})


def plan_batch(messages: Sequence[QueuedMessage]) -> BatchPlan:
    """Split a lane batch into what is POSTed, parked behind its group, or discarded.

    Once a message of a group is blocked, every later message of that group in
    the batch goes behind it too, blocked or not: a batch topped up by a second
    read (batch_timeout_ms) may see the group drained by then, and sending the
    later message now would overtake the earlier one. Such a group is not
    unparked either.
    """
    deliver: list[QueuedMessage] = []
    behind: list[QueuedMessage] = []
    broken: list[QueuedMessage] = []
    unpark: set[str] = set()
    blocked: set[str] = set()
    for m in messages:
        if m.group_blocked or (m.group_key is not None and m.group_key in blocked):
            behind.append(m)
            if m.group_key is not None:
                blocked.add(m.group_key)
            continue
        if m.group_parked and m.group_key is not None:
            unpark.add(m.group_key)
        if m.renderable:
            deliver.append(m)
        else:
            broken.append(m)
    return BatchPlan(deliver, behind, broken, sorted(unpark - blocked), messages[-1].id if messages else 0)


@dataclass(frozen=True)
class FailurePlan:
    """What a failed lane attempt leads to: back off, park the batch's groups, or discard it."""

    kind: str  # 'backoff' | 'park' | 'discard'
    delay: float = 0.0
    copies: list[Copy] = field(default_factory=list)
    groups: list[ParkGroup] = field(default_factory=list)


def plan_failure(plan: BatchPlan, *, failures: int, max_retry_count: int | None, park_after: int,
                 may_park: bool, base: float, cap: float, rng: random.Random | None = None) -> FailurePlan:
    """Decide the fate of a lane batch after its ``failures``-th consecutive failed attempt."""
    side = plan.copies_on_success()
    if max_retry_count is not None and failures > max_retry_count:
        return FailurePlan("discard", copies=[Copy(m.id, "discarded", failures) for m in plan.deliver] + side)
    if failures >= park_after and may_park:
        counts = Counter(m.park_key for m in plan.deliver)
        groups = [ParkGroup(k, failures, backoff_delay(failures, base, cap, rng), n) for k, n in sorted(counts.items())]
        return FailurePlan("park", copies=[Copy(m.id, "parked", failures) for m in plan.deliver] + side, groups=groups)
    return FailurePlan("backoff", delay=backoff_delay(failures, base, cap, rng))


# ---------------------------------------------------------------- statements


async def ensure_lanes(conn: psycopg.AsyncConnection, sink_id: UUID, lane_count: int) -> None:
    """Create the sink's lane rows (idempotent)."""
    await conn.execute(QUERIES["ensure_lanes"], {"sink_id": sink_id, "lane_count": lane_count})


async def lease_lanes(conn: psycopg.AsyncConnection, *, sink_id: UUID, lane_count: int, batch_size: int,
                      max_ack_pending: int, owner: str, max_lanes: int, lease_seconds: float,
                      offset: int | None = None) -> list[LaneLease]:
    """Lease up to ``max_lanes`` lanes that have work, within max_ack_pending.

    The check of max_ack_pending is serialised per sink by an advisory lock,
    taken in its own statement so that the lease statement's snapshot sees
    every reservation committed before it.
    """
    params = {
        "sink_id": sink_id, "lane_count": lane_count, "batch_size": batch_size,
        "max_ack_pending": max_ack_pending, "owner": owner, "max_lanes": max_lanes,
        "lease_seconds": lease_seconds,
        "offset": random.randrange(lane_count) if offset is None else offset,
    }
    async with conn.pipeline(), conn.transaction():  # one round trip: begin, lock, lease, commit
        await conn.execute(QUERIES["lock_sink_leases"], {"sink_id": sink_id})
        cur = await conn.execute(QUERIES["lease_lanes"], params)
    rows = await cur.fetchall()
    return [LaneLease(sink_id, r[0], r[1], r[2], r[3]) for r in rows]


def _messages(rows: list[tuple[Any, ...]]) -> list[QueuedMessage]:
    make = QueuedMessage._make
    return [make(r) for r in rows]


async def read_lane_batch(conn: psycopg.AsyncConnection, *, sink_id: UUID, source_id: UUID, lane: int,
                          after_id: int, limit: int) -> list[QueuedMessage]:
    cur = await conn.execute(QUERIES["read_lane_batch"], {
        "sink_id": sink_id, "source_id": source_id, "lane": lane, "after_id": after_id, "limit": limit,
    })
    return _messages(await cur.fetchall())


async def release_lane(conn: psycopg.AsyncConnection, lease: LaneLease, owner: str) -> None:
    await conn.execute(QUERIES["release_lane"], {"sink_id": lease.sink_id, "lane": lease.lane, "owner": owner})


def _attempt_params(attempt: Attempt | None) -> dict[str, Any]:
    if attempt is None:
        return {"attempted": False, "attempt_ids": [], "started_at": None, "duration_ms": 0,
                "http_status": None, "response_body": None, "error": None, "delivered": False}
    return {"attempted": True, "attempt_ids": bigint_array(attempt.message_ids), "started_at": attempt.started_at,
            "duration_ms": attempt.duration_ms, "http_status": attempt.http_status,
            "response_body": attempt.response_body, "error": attempt.error, "delivered": attempt.delivered}


def _ack_params(lease: LaneLease, owner: str, last_id: int, attempt: Attempt, keep_for: float | None
                ) -> dict[str, Any]:
    return {
        "sink_id": lease.sink_id, "lane": lease.lane, "owner": owner, "after_id": lease.delivered_id,
        "keep": keep_for is not None, "lease_seconds": keep_for or 0.0,
        "last_id": last_id, "attempt_ids": bigint_array(attempt.message_ids), "started_at": attempt.started_at,
        "duration_ms": attempt.duration_ms, "http_status": attempt.http_status,
        "response_body": attempt.response_body,
    }


async def ack_lane(conn: psycopg.AsyncConnection, lease: LaneLease, owner: str, *, last_id: int,
                   attempt: Attempt, keep_for: float | None = None) -> bool:
    """The common success path of ``advance_lane``: nothing parked, nothing unparked.

    With ``keep_for`` (seconds) the lease and its reservation are kept, for the
    lane's next batch; the caller then continues from ``last_id``.
    """
    cur = await conn.execute(QUERIES["ack_lane"], _ack_params(lease, owner, last_id, attempt, keep_for))
    row = await cur.fetchone()
    return bool(row and row[0])


async def ack_lane_and_read_next(conn: psycopg.AsyncConnection, lease: LaneLease, owner: str, *, last_id: int,
                                 attempt: Attempt, keep_for: float, source_id: UUID, limit: int
                                 ) -> list[QueuedMessage] | None:
    """Ack keeping the lease and read the next batch, in one round trip (pipeline).

    Returns the next batch, or None when the lease was lost (nothing acked).
    The read runs after the ack has committed, from the new cursor.
    """
    async with conn.pipeline():
        ack = await conn.execute(QUERIES["ack_lane"], _ack_params(lease, owner, last_id, attempt, keep_for))
        nxt = await conn.execute(QUERIES["read_lane_batch"], {
            "sink_id": lease.sink_id, "source_id": source_id, "lane": lease.lane, "after_id": last_id,
            "limit": limit,
        })
    row = await ack.fetchone()
    if not (row and row[0]):
        return None
    return _messages(await nxt.fetchall())


async def advance_lane(conn: psycopg.AsyncConnection, lease: LaneLease, owner: str, *, last_id: int,
                       attempt: Attempt | None, copies: Sequence[Copy] = (), park: Sequence[ParkGroup] = (),
                       behind_keys: Sequence[str] = (), unpark_keys: Sequence[str] = (),
                       lane_error: str | None = None) -> bool:
    """Move the lane's cursor to ``last_id`` with everything that goes with it, atomically.

    Returns False when the lease was lost (another worker owns the lane now):
    nothing was written, and that worker will deliver the batch again.
    Drained groups (``unpark_keys``) are dropped by a second statement, once
    the first holds the lane row (see ``unpark_groups`` in queue.sql).
    """
    async with conn.transaction():
        cur = await conn.execute(QUERIES["advance_lane"], {
            "sink_id": lease.sink_id, "lane": lease.lane, "owner": owner, "after_id": lease.delivered_id,
            "last_id": last_id, "lane_error": lane_error,
            **_attempt_params(attempt),
            "copy_ids": [c.id for c in copies], "copy_states": [c.state for c in copies],
            "copy_attempts": [c.attempts for c in copies],
            "park_keys": [g.group_key for g in park], "park_attempts": [g.attempts for g in park],
            "park_delays": [g.delay for g in park], "park_in_flight": [g.in_flight for g in park],
            "behind_keys": list(behind_keys),
        })
        row = await cur.fetchone()
        advanced = bool(row and row[0])
        if advanced and unpark_keys:
            await conn.execute(QUERIES["unpark_groups"], {"sink_id": lease.sink_id, "unpark_keys": list(unpark_keys)})
    return advanced


async def fail_lane(conn: psycopg.AsyncConnection, lease: LaneLease, owner: str, *, delay: float,
                    in_flight: int, attempt: Attempt) -> bool:
    """Record a failed attempt of the lane's head batch and back the lane off."""
    cur = await conn.execute(QUERIES["fail_lane"], {
        "sink_id": lease.sink_id, "lane": lease.lane, "owner": owner, "after_id": lease.delivered_id,
        "delay": delay, "in_flight": in_flight, "lane_error": attempt.describe(),
        "attempt_ids": bigint_array(attempt.message_ids), "started_at": attempt.started_at,
        "duration_ms": attempt.duration_ms, "http_status": attempt.http_status,
        "response_body": attempt.response_body, "error": attempt.error,
    })
    row = await cur.fetchone()
    return bool(row and row[0])


async def may_park(conn: psycopg.AsyncConnection, sink_id: UUID, lane: int,
                   window: float = PARK_HEALTH_WINDOW_SECONDS) -> bool:
    """Whether parking a failing batch helps: not when the endpoint fails for everyone.

    Parking copies messages; when every lane fails (endpoint down) it would
    copy the whole backlog for nothing. So: park when some delivery succeeded
    recently, or when no other lane is failing (this batch is the problem).
    """
    cur = await conn.execute(QUERIES["sink_failure_scope"], {"sink_id": sink_id, "lane": lane, "window": window})
    row = await cur.fetchone()
    assert row is not None
    recent_success, others_failing = row
    return bool(recent_success or not others_failing)


async def lease_parked_groups(conn: psycopg.AsyncConnection, *, sink_id: UUID, batch_size: int,
                              max_ack_pending: int, owner: str, max_groups: int,
                              lease_seconds: float) -> list[GroupLease]:
    """Lease parked groups whose next attempt is due, within max_ack_pending."""
    async with conn.pipeline(), conn.transaction():
        await conn.execute(QUERIES["lock_sink_leases"], {"sink_id": sink_id})
        cur = await conn.execute(QUERIES["lease_parked_groups"], {
            "sink_id": sink_id, "batch_size": batch_size, "max_ack_pending": max_ack_pending,
            "owner": owner, "max_groups": max_groups, "lease_seconds": lease_seconds,
        })
    rows = await cur.fetchall()
    return [GroupLease(sink_id, r[0], r[1], r[2], r[3]) for r in rows]


async def read_parked_batch(conn: psycopg.AsyncConnection, *, sink_id: UUID, source_id: UUID,
                            group_key: str, limit: int, owner: str) -> list[QueuedMessage]:
    """The head of a parked group, in order; empty unless ``owner`` holds the group's lease."""
    cur = await conn.execute(QUERIES["read_parked_batch"], {
        "sink_id": sink_id, "source_id": source_id, "group_key": group_key, "limit": limit, "owner": owner,
    })
    return _messages(await cur.fetchall())


async def ack_parked(conn: psycopg.AsyncConnection, lease: GroupLease, owner: str, attempt: Attempt) -> bool:
    """Delete delivered parked messages, reset the group's backoff, log the attempt."""
    cur = await conn.execute(QUERIES["ack_parked"], {
        "sink_id": lease.sink_id, "group_key": lease.group_key, "owner": owner, "ids": bigint_array(attempt.message_ids),
        "started_at": attempt.started_at, "duration_ms": attempt.duration_ms,
        "http_status": attempt.http_status, "response_body": attempt.response_body,
    })
    row = await cur.fetchone()
    return bool(row and row[0])


async def fail_parked(conn: psycopg.AsyncConnection, lease: GroupLease, owner: str, attempt: Attempt, *,
                      delay: float, in_flight: int, max_retry_count: int | None, moved_on: bool) -> bool:
    """Record a failed attempt of a parked group; past max_retry_count its messages are discarded."""
    cur = await conn.execute(QUERIES["fail_parked"], {
        "sink_id": lease.sink_id, "group_key": lease.group_key, "owner": owner, "ids": bigint_array(attempt.message_ids),
        "delay": delay, "in_flight": in_flight, "group_error": attempt.describe(),
        "max_retry_count": max_retry_count, "moved_on": moved_on, "started_at": attempt.started_at,
        "duration_ms": attempt.duration_ms, "http_status": attempt.http_status,
        "response_body": attempt.response_body, "error": attempt.error,
    })
    row = await cur.fetchone()
    return bool(row and row[0])


async def discard_parked(conn: psycopg.AsyncConnection, sink_id: UUID, ids: Sequence[int]) -> None:
    await conn.execute(QUERIES["discard_parked"], {"sink_id": sink_id, "ids": list(ids)})


def parked_outcome(messages: Sequence[QueuedMessage], *, group_attempts: int, max_retry_count: int | None,
                   base: float, cap: float, rng: random.Random | None = None) -> tuple[float, int, bool]:
    """After a parked group's failed attempt: (delay, messages still pending, moved on).

    A message whose attempts pass max_retry_count is discarded by the failure
    statement; the group then moves on at once to its next message.
    """
    if max_retry_count is not None:
        keep = [m for m in messages if m.attempts + 1 <= max_retry_count]
        if len(keep) < len(messages):
            return 0.0, len(keep), True
    return backoff_delay(group_attempts + 1, base, cap, rng), len(messages), False


async def drop_drained_group(conn: psycopg.AsyncConnection, sink_id: UUID, lane: int, group_key: str,
                             owner: str | None) -> bool:
    """Drop a parked group with no parked messages left; True if it was dropped.

    ``owner``: the lease we hold on the group, or None after releasing it; a
    group another retrier leased meanwhile is left to that retrier (deleting
    it under them would let the lane re-create it and a third party lease it
    while they still deliver).

    First a share lock on the lane row, in its own statement: it waits for an
    ack of the lane in progress, so the delete's fresh snapshot sees any
    message that ack parked behind the group (and then keeps the group). An
    ack that starts after the drop re-creates the group row itself.
    """
    async with conn.transaction():
        await conn.execute(QUERIES["lock_lane_shared"], {"sink_id": sink_id, "lane": lane})
        cur = await conn.execute(QUERIES["drop_drained_group"],
                                 {"sink_id": sink_id, "group_key": group_key, "owner": owner})
        return cur.rowcount > 0


async def release_parked_group(conn: psycopg.AsyncConnection, lease: GroupLease, owner: str) -> None:
    await conn.execute(QUERIES["release_parked_group"], {
        "sink_id": lease.sink_id, "group_key": lease.group_key, "owner": owner,
    })


async def renew_leases(conn: psycopg.AsyncConnection, owner: str, lease_seconds: float,
                       lanes: Sequence[tuple[UUID, int]], groups: Sequence[tuple[UUID, str]]
                       ) -> tuple[dict[tuple[UUID, int], bool], dict[tuple[UUID, str], bool]]:
    """Extend the leases this owner holds; returns the others, each with whether another owner
    holds it now (False: the lease ended, e.g. its own task released it as it finished)."""
    lost_lanes: dict[tuple[UUID, int], bool] = {}
    lost_groups: dict[tuple[UUID, str], bool] = {}
    if lanes:
        cur = await conn.execute(QUERIES["renew_lane_leases"], {
            "owner": owner, "lease_seconds": lease_seconds,
            "sink_ids": [s for s, _ in lanes], "lanes": [n for _, n in lanes],
        })
        lost_lanes = {(r[0], r[1]): r[2] for r in await cur.fetchall()}
    if groups:
        cur = await conn.execute(QUERIES["renew_group_leases"], {
            "owner": owner, "lease_seconds": lease_seconds,
            "sink_ids": [s for s, _ in groups], "group_keys": [k for _, k in groups],
        })
        lost_groups = {(r[0], r[1]): r[2] for r in await cur.fetchall()}
    return lost_lanes, lost_groups


async def release_all(conn: psycopg.AsyncConnection, owner: str, sink_ids: Sequence[UUID]) -> None:
    """Give up every lease this owner holds on these sinks (shutdown)."""
    if not sink_ids:
        return
    params = {"owner": owner, "sink_ids": list(sink_ids)}
    await conn.execute(QUERIES["release_lane_leases"], params)
    await conn.execute(QUERIES["release_group_leases"], params)


async def prune_attempts(conn: psycopg.AsyncConnection, older_than: timedelta, *, chunk: int = 10_000,
                         now: datetime | None = None) -> int:
    """Delete attempt rows started before now - older_than, in chunks; returns how many.

    Chunks keep each statement short, so pruning a large backlog never holds
    locks or a snapshot for long.
    """
    before = (now or datetime.now().astimezone()) - older_than
    total = 0
    while True:
        cur = await conn.execute(QUERIES["prune_attempts"], {"before": before, "chunk": chunk})
        total += cur.rowcount
        if cur.rowcount < chunk:
            return total
