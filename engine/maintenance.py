"""The maintenance stage: retention, queue pruning, partitions ahead of time.

Every ``interval`` seconds one worker (a session advisory lock elects it per
pass) does:

- pre-creates today's and tomorrow's partitions of the retention log
  (``pgsink.changes``), so capture never creates one in its hot path;
- drops whole day partitions of ``pgsink.changes`` that ended more than the
  longest source retention ago (plus a grace period for capture lag), but
  never one holding a change that a pending message (after its lane's
  cursor) or a parked message still needs;
- drops message id-partitions whose every message is behind its lane's
  cursor (delivered, or parked: parked messages are copies in
  ``pgsink.parked_messages`` and do not pin the partition) and that can
  receive no new id (the sequence is past their end);
- deletes attempt rows older than ``attempt_retention``, in chunks.

Each drop happens in its own transaction that first locks the partition,
then checks that nothing needs it, then drops it. The lock waits for any
writer still inserting into it (a capture or replay transaction), so the
check sees everything that will ever point into it: a capture transaction
writing a late change into a dropped day simply re-creates the partition
(capture calls ``pgsink.ensure_partitions`` before writing).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql

from . import db
from .errors import PgsinkError
from . import queue as q
from .ingest import MESSAGE_PARTITION_SPAN
from .queries import QUERIES
from .waiting import jittered, wait_event

log = logging.getLogger("pgsink.maintenance")

_CHANGES_PART = re.compile(r"^changes_(\d{8})$")
_MESSAGES_PART = re.compile(r"^messages_(\d{9})$")


@dataclass
class PassReport:
    """What one maintenance pass did (for logs and tests)."""

    ran: bool = False
    changes_dropped: list[str] | None = None
    changes_kept: list[str] | None = None  # old enough, but still needed
    messages_dropped: list[str] | None = None
    attempts_deleted: int = 0


class MaintenanceStage:
    """Runs a maintenance pass every ``interval`` seconds until stopped."""

    def __init__(self, dsn: str, *, interval: float = 60.0, attempt_retention: timedelta = timedelta(days=7),
                 grace: timedelta = timedelta(hours=1), lock_timeout_ms: int = 2000) -> None:
        self.dsn = dsn
        self.interval = interval
        self.attempt_retention = attempt_retention
        self.grace = grace
        self.lock_timeout_ms = lock_timeout_ms
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                report = await self.run_once()
                if report.changes_dropped or report.messages_dropped or report.attempts_deleted:
                    log.info("maintenance: dropped %s, %s; deleted %d attempt(s)",
                             report.changes_dropped, report.messages_dropped, report.attempts_deleted)
            except (psycopg.OperationalError, PgsinkError) as e:
                log.warning("maintenance pass failed (%s); retrying at the next one", e)
            await wait_event(self._stop, jittered(self.interval))

    async def run_once(self, now: datetime | None = None) -> PassReport:
        """One pass, if no other worker is running one."""
        now = now or datetime.now(UTC)
        report = PassReport()
        async with db.connection(self.dsn, autocommit=True) as conn:
            cur = await conn.execute(QUERIES["maintenance_try_lock"])
            if not (await cur.fetchone())[0]:  # type: ignore[index]
                return report
            try:
                report.ran = True
                await conn.execute(QUERIES["maintenance_precreate"])
                report.changes_dropped, report.changes_kept = await self._prune_changes(conn, now)
                report.messages_dropped = await self._prune_messages(conn)
                report.attempts_deleted = await q.prune_attempts(conn, self.attempt_retention, now=now)
            finally:
                await conn.execute(QUERIES["maintenance_unlock"])
        return report

    async def _partitions(self, conn: psycopg.AsyncConnection, parent: str) -> list[str]:
        cur = await conn.execute(QUERIES["maintenance_partitions"], {"parent": parent})
        return [r[0] for r in await cur.fetchall()]

    async def _prune_changes(self, conn: psycopg.AsyncConnection, now: datetime) -> tuple[list[str], list[str]]:
        cur = await conn.execute(QUERIES["maintenance_retention"])
        retention = (await cur.fetchone())[0]  # type: ignore[index]
        if retention is None:
            return [], []
        keep = max(retention, timedelta(0)) + self.grace
        if keep > now - datetime(2000, 1, 1, tzinfo=UTC):  # set by hand past any partition's age: keep all
            return [], []
        horizon = now - keep
        dropped, kept = [], []
        for name in await self._partitions(conn, "pgsink.changes"):
            m = _CHANGES_PART.match(name)
            if not m:
                continue
            lo = datetime.strptime(m.group(1), "%Y%m%d").replace(tzinfo=UTC)
            hi = lo + timedelta(days=1)
            if hi > horizon:
                continue
            if await self._drop_if_unneeded(conn, "changes", name, "maintenance_changes_needed", {"lo": lo, "hi": hi}):
                dropped.append(name)
            else:
                kept.append(name)
        return dropped, kept

    async def _prune_messages(self, conn: psycopg.AsyncConnection) -> list[str]:
        cur = await conn.execute(QUERIES["maintenance_last_message_id"])
        last_id = (await cur.fetchone())[0]  # type: ignore[index]
        dropped = []
        for name in await self._partitions(conn, "pgsink.messages"):
            m = _MESSAGES_PART.match(name)
            if not m:
                continue
            lo = int(m.group(1)) * MESSAGE_PARTITION_SPAN
            hi = lo + MESSAGE_PARTITION_SPAN
            if hi - 1 > last_id:  # ids in it may still be handed out
                continue
            if await self._drop_if_unneeded(conn, "messages", name, "maintenance_messages_needed", {"lo": lo, "hi": hi}):
                dropped.append(name)
        return dropped

    async def _drop_if_unneeded(self, conn: psycopg.AsyncConnection, parent: str, name: str, check: str,
                                params: dict[str, object]) -> bool:
        """Lock the partition, then check, then drop, in one transaction (see the module docstring).

        The parent is locked first (alone: ONLY), as the drop needs it and as
        readers lock it before its partitions: no lock-order deadlock.
        """
        table = sql.Identifier("pgsink", name)
        try:
            async with conn.transaction():
                await conn.execute(QUERIES["maintenance_lock_timeout"], {"timeout": f"{self.lock_timeout_ms}ms"})
                await conn.execute(sql.SQL("lock table only {}, {} in access exclusive mode").format(
                    sql.Identifier("pgsink", parent), table))
                cur = await conn.execute(QUERIES[check], params)
                if (await cur.fetchone())[0]:  # type: ignore[index]
                    return False
                await conn.execute(sql.SQL("drop table {}").format(table))
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected):
            log.info("partition %s is busy; trying again at the next pass", name)
            return False
        log.info("dropped partition pgsink.%s", name)
        return True
