"""The capture transaction: decoded changes -> retention log + sink queues + checkpoint.

The reader hands every kept change to an ``IngestBuffer``; ``flush()`` writes
the buffer in ONE state transaction: the changes (COPY into pgsink.changes),
one queue row per matching sink (COPY into pgsink.messages), the source's
checkpoint, and a NOTIFY per sink. Only after that commit may the reader
acknowledge the new position to the slot (invariant 1: no loss).

Positions: every change is identified by (commit_lsn, commit_idx), the LSN of
its transaction's commit record (known up front from Begin) and its index in
the transaction. The checkpoint stores the last position written, so a
transaction larger than memory is flushed in chunks and, after a crash, the
resent transaction is skipped up to that index (invariant 2: no duplicate
ingest). ``ack_lsn`` only ever moves to the end of a *complete* transaction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg

from .decode import RowChange
from .model import Sink
from .queries import QUERIES
from .queue import lane_for
from .values import RawJson, dumps

log = logging.getLogger("pgsink.ingest")

TX_COMPLETE = 2147483647  # commit_idx meaning "the whole transaction is written"
MESSAGE_PARTITION_SPAN = 1_000_000


@dataclass(frozen=True, order=True)
class Position:
    commit_lsn: int
    commit_idx: int


@dataclass(slots=True)
class PendingChange:
    commit_lsn: int
    commit_idx: int
    xid: int
    committed_at: datetime
    change: RowChange
    record_pk: str | None
    annotations: bytes | None
    messages: list[tuple[Sink, str | None]]  # (sink, group key)


def json_text(value: Any) -> str:
    return dumps(value).decode()


def key_text(value: Any) -> str:
    """A column value as text for group keys: strings as is, the rest as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, RawJson):
        return value.text
    return dumps(value).decode()


def record_key(record: dict[str, Any], columns: Iterable[str]) -> str:
    return ",".join(key_text(record.get(c)) for c in columns)


@dataclass
class IngestBuffer:
    """Changes decoded but not yet durable, plus what the next checkpoint will say."""

    source_id: UUID
    checkpoint: Position
    ack_lsn: int
    changes: list[PendingChange] = field(default_factory=list)
    # a complete transaction seen since the last flush whose end LSN we may ack after it
    completed: Position | None = None
    completed_end_lsn: int = 0
    first_buffered_at: float = 0.0
    _partition_days: set[str] = field(default_factory=set)
    _message_id_limit: int = 0

    def add(self, change: PendingChange) -> None:
        if not self.changes:
            self.first_buffered_at = time.monotonic()
        self.changes.append(change)

    def complete(self, commit_lsn: int, end_lsn: int) -> None:
        """A transaction whose kept changes are all in the buffer (or flushed) has committed."""
        self.completed = Position(commit_lsn, TX_COMPLETE)
        self.completed_end_lsn = end_lsn
        if not self.changes:
            self.first_buffered_at = time.monotonic()

    @property
    def dirty(self) -> bool:
        return bool(self.changes) or self.completed is not None

    def age(self) -> float:
        return time.monotonic() - self.first_buffered_at if self.dirty else 0.0

    def should_skip(self, pos: Position) -> bool:
        """True for changes already durable before a restart (invariant 2)."""
        return pos <= self.checkpoint

    def next_checkpoint(self) -> tuple[Position, int]:
        last = Position(self.changes[-1].commit_lsn, self.changes[-1].commit_idx) if self.changes else self.checkpoint
        ack = self.ack_lsn
        if self.completed is not None:
            # every change of that transaction is in this flush or an earlier one
            last, ack = max(last, self.completed), max(ack, self.completed_end_lsn)
        return max(last, self.checkpoint), ack

    async def flush(self, conn: psycopg.AsyncConnection) -> int:
        """Write the buffer in one transaction; returns the LSN now safe to acknowledge."""
        if not self.dirty:
            return self.ack_lsn
        new_checkpoint, new_ack = self.next_checkpoint()
        n_messages = sum(len(c.messages) for c in self.changes)
        await self._ensure_partitions(conn, n_messages)
        sink_ids = sorted({str(s.id) for c in self.changes for s, _ in c.messages})
        async with conn.transaction():
            if sink_ids:
                await conn.execute(QUERIES["enqueue_lock"], (sink_ids,))
            await self._check_fence(conn)
            if self.changes:
                await self._copy_changes(conn)
            if n_messages:
                await self._copy_messages(conn, n_messages)
            await conn.execute(QUERIES["checkpoint_set"], (
                new_checkpoint.commit_lsn, new_checkpoint.commit_idx, new_ack, self.source_id))
            if sink_ids:
                await conn.execute(QUERIES["notify_sinks"], (sink_ids,))
        log.debug("flushed %d changes, %d messages; checkpoint %s", len(self.changes), n_messages,
                  new_checkpoint, extra={"source": str(self.source_id)})
        self.checkpoint, self.ack_lsn = new_checkpoint, new_ack
        self.changes = []
        self.completed = None
        return new_ack

    async def _check_fence(self, conn: psycopg.AsyncConnection) -> None:
        """Refuse to write if another reader moved the checkpoint (we lost leadership)."""
        cur = await conn.execute(QUERIES["checkpoint_lock"], (self.source_id,))
        row = await cur.fetchone()
        stored = Position(row[0], row[1]) if row else None
        if stored != self.checkpoint:
            raise LeadershipLost(
                f"checkpoint of source {self.source_id} moved to {stored} under us (expected "
                f"{self.checkpoint}): another reader is active"
            )

    async def _copy_changes(self, conn: psycopg.AsyncConnection) -> None:
        source_id = self.source_id
        async with conn.cursor() as cur, cur.copy(QUERIES["copy_changes"]) as copy:
            for c in self.changes:
                ch = c.change
                await copy.write_row((
                    source_id, c.commit_lsn, c.commit_idx, c.xid, c.committed_at, ch.table_oid,
                    ch.schema, ch.table, ch.action, c.record_pk, json_text(ch.record),
                    json_text(ch.changes) if ch.changes is not None else None,
                    c.annotations.decode() if c.annotations is not None else None,
                ))

    async def _copy_messages(self, conn: psycopg.AsyncConnection, n: int) -> None:
        cur = await conn.execute(QUERIES["message_ids"], (n,))
        ids = iter([r[0] for r in await cur.fetchall()])
        async with conn.cursor() as cur, cur.copy(QUERIES["copy_messages"]) as copy:
            for c in self.changes:
                for sink, group_key in c.messages:
                    mid = next(ids)
                    lane = lane_for(group_key, sink.lane_count) if group_key is not None else mid % sink.lane_count
                    await copy.write_row((mid, sink.id, lane, group_key, c.change.action,
                                          c.commit_lsn, c.commit_idx, c.committed_at))

    async def _ensure_partitions(self, conn: psycopg.AsyncConnection, n_messages: int) -> None:
        """Create day partitions of changes and id partitions of messages before writing."""
        days = {c.committed_at.strftime("%Y%m%d") for c in self.changes} - self._partition_days
        need_ids = False
        high = 0
        if n_messages:
            cur = await conn.execute(QUERIES["message_id_high"])
            high = (await cur.fetchone())[0]  # type: ignore[index]
            need_ids = high + n_messages >= self._message_id_limit
        if not days and not need_ids:
            return
        stamps = [c.committed_at for c in self.changes]
        upto = high + max(n_messages, MESSAGE_PARTITION_SPAN) if need_ids else None
        async with conn.transaction():
            await conn.execute(QUERIES["ensure_partitions"], (
                min(stamps) if days else None, max(stamps) if days else None,
                high if need_ids else None, upto))
        self._partition_days |= days
        if upto is not None:
            self._message_id_limit = (upto // MESSAGE_PARTITION_SPAN + 1) * MESSAGE_PARTITION_SPAN


class LeadershipLost(RuntimeError):
    """Another reader wrote this source's checkpoint: stop reading at once."""
