"""The backfill stage: read a table page by page and enqueue each row as a ``read`` message.

A job (a row of ``pgsink.backfills``, created by ``pgsink.start_backfill``) is
claimed with ``FOR UPDATE SKIP LOCKED`` and a lease, so any worker can run it
and only one does; a worker that dies loses the job when its lease expires
and another resumes it from the stored cursor.

Pages use keyset pagination (never OFFSET): ``(keys) > (cursor) order by
keys limit n``, the keys being the primary key (full backfill) or the sort
column followed by the primary key (partial backfill, from a start
position). The page size adapts so each page query stays well under
``max_page_ms``. The cursor is stored in the same state transaction that
enqueues the page's messages, so after a crash nothing is sent twice beyond
the page in flight and nothing is skipped.

Consistency (invariant 5: a read never overwrites a newer change of the same
row at the destination). The destination ends with the state of the LAST
message of a row in its group's lane (lanes deliver in id order, and a
row's read and changes share a group, hence a lane). Each page is read on
the source in a REPEATABLE READ snapshot S; its messages are enqueued in a
state transaction that first takes the sink's enqueue lock (the lock every
capture transaction takes before allocating message ids) and then looks in
the retention log for changes of the page's rows whose transaction S did
not see (by xid against S's xmin/xmax/xip) and that capture queued for this
sink (its actions and filters, re-applied as capture applied them). A row with
such a change is not enqueued. Why this is enough, for a row R of the page:

- a change of R that S saw is reflected in the read;
- a change of R that S did not see committed after S. Either capture wrote
  it before we took the lock: it is in the log, and if the sink got it we
  drop R's read (the change's own message, and every later one, carries R's
  newer state), while a change the sink does not take (an action it does not
  want, a filter) never reaches the destination, so the read is kept --
  dropping it would lose the row there; or capture writes it after our
  commit: its message gets a larger id than the read, in the same lane, so
  it is delivered after the read.

So when the read is R's last message, no change of R committed after S has
been enqueued before it, and the read holds R's newest state; otherwise a
newer change follows it. No waiting on the reader is needed, and capture
lag only makes more reads redundant, never wrong. The log lookup is bounded
to changes committed since S's time minus ``visibility_margin`` (a
transaction invisible to S longer than that after its commit timestamp --
only a synchronous standby stalled that long -- is assumed seen).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple
from uuid import UUID

import orjson
import psycopg
from psycopg import sql

from . import db
from .capture import SESSION_OPTIONS
from .errors import PgsinkError
from .filters import Predicate, filter_metadata, retained_change_passes, sink_predicate
from .decode import convert_row
from .ingest import group_key, key_text, record_key
from .model import Sink, load_config
from .queries import QUERIES
from .userfunc import UserFunctionError
from .jsontext import dumps
from .values import TypeRegistry
from .waiting import jittered, wait_event

log = logging.getLogger("pgsink.backfill")

XID_SPACE = 1 << 32


@dataclass(frozen=True)
class Snapshot:
    """A ``pg_current_snapshot()``: transactions below xmin are settled; xip were running."""

    xmin: int
    xmax: int
    xip: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def full_xid(self, xid32: int) -> int:
        """The 64-bit id of a 32-bit xid near this snapshot (within 2^31 of xmax)."""
        ahead = (xid32 - self.xmax) % XID_SPACE
        return self.xmax + ahead if ahead < XID_SPACE // 2 else self.xmax - (XID_SPACE - ahead)

    def sees(self, xid32: int) -> bool:
        """Whether a transaction committed before this snapshot (its changes are in what it reads)."""
        xid = self.full_xid(xid32)
        return xid < self.xmin or (xid < self.xmax and xid not in self.xip)


@dataclass
class Job:
    id: UUID
    sink_id: UUID
    schema: str
    table: str
    sort_column: str | None
    start_position: str | None  # JSON text
    cursor: str | None          # JSON text: {"key column": value, ...}
    rows_done: int
    rows_estimate: int | None
    page_size: int
    max_page_ms: int


@dataclass
class Page:
    records: list[str]      # JSON text, values converted as capture converts them
    record_pks: list[str]
    group_keys: list[str | None]
    cursor: str | None      # after the last row
    snapshot: Snapshot
    read_at: datetime
    elapsed_ms: float
    rows_read: int          # rows the page query returned (filtered ones included)


class RecentChange(NamedTuple):
    """A captured change of a page's row (backfill_recent_changes); row and metadata only with filters."""

    record_pk: str
    xid: int
    action: str
    record: str | None
    changes: str | None
    committed: datetime | None
    commit_lsn: int
    commit_idx: int
    annotations: str | None


class JobLost(Exception):
    """The job was cancelled or another worker holds it now."""


def next_page_size(size: int, rows: int, elapsed_ms: float, max_page_ms: int, cap: int) -> int:
    """Halve a page that took over half the limit; double a full page that took under an eighth."""
    if elapsed_ms > max_page_ms / 2:
        return max(10, size // 2)
    if rows >= size and elapsed_ms < max_page_ms / 8:
        return min(cap, size * 2)
    return size


class BackfillStage:
    """Claims backfill jobs and runs them, one at a time per stage."""

    def __init__(self, dsn: str, *, worker_id: str, poll_interval: float = 2.0, lease_seconds: float = 60.0,
                 visibility_margin: timedelta = timedelta(hours=1), max_page_size: int = 10_000) -> None:
        self.dsn = dsn
        self.owner = f"{worker_id}:backfill"
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.visibility_margin = visibility_margin
        self.max_page_size = max_page_size
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # a job may be waiting: look now
        self._sink: Sink  # the sink of the job being run
        self._predicate: Predicate | None = None  # its filters, as capture applies them

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        """Claim and run jobs until stopped; a new job (NOTIFY pgsink_backfills) wakes the stage at once."""
        listener = asyncio.create_task(
            db.listen(self.dsn, ("pgsink_backfills",), lambda _n: self._wake.set(), self._wake.set, self._stop),
            name="pgsink.backfill.listen")
        listener.add_done_callback(_log_listener_failure)
        try:
            while not self._stop.is_set():
                self._wake.clear()
                try:
                    job = await self._claim()
                    if job is not None:
                        await self._run_job(job)
                        continue
                except (psycopg.OperationalError, PgsinkError) as e:
                    log.warning("backfill: %s; retrying", e)
                await wait_event(self._wake, jittered(self.poll_interval))
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    async def _claim(self) -> Job | None:
        async with db.connection(self.dsn, autocommit=True) as conn:
            cur = await conn.execute(QUERIES["backfill_claim"],
                                     {"owner": self.owner, "lease_seconds": self.lease_seconds})
            row = await cur.fetchone()
        return Job(*row) if row else None

    async def _finish(self, job: Job, state: str, error: str | None = None) -> None:
        async with db.connection(self.dsn, autocommit=True) as conn:
            await conn.execute(QUERIES["backfill_finish"],
                               {"id": job.id, "owner": self.owner, "state": state, "error": error})

    async def _run_job(self, job: Job) -> None:
        extra = {"backfill": str(job.id), "table": f"{job.schema}.{job.table}"}
        async with db.connection(self.dsn, autocommit=True) as state:
            config = await load_config(state)
            sink = config.sinks.get(job.sink_id)
            if sink is None:
                await self._finish(job, "failed", "its sink was removed")
                return
            source = config.sources[sink.source_id]
            self._sink = sink
            self._predicate = None
            if sink.has_filters:
                self._predicate = sink_predicate(sink.filters, sink.filter_sql, sink.filter_function,
                                                 timeout=sink.function_timeout_ms / 1000,
                                                 what=f"sink {sink.name}: filter")
            try:
                # the reader's session settings: values print (and convert) exactly as in captured changes
                async with db.connection(source.dsn(options=SESSION_OPTIONS), autocommit=True) as src:
                    await self._pages(job, state, src, source.id)
            except JobLost:
                log.info("backfill %s was cancelled or taken over; stopping", job.id, extra=extra)
            except (PgsinkError, psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn,
                    psycopg.errors.InsufficientPrivilege) as e:
                log.error("backfill %s failed: %s", job.id, e, extra=extra)
                await self._finish(job, "failed", str(e))

    async def _pages(self, job: Job, state: psycopg.AsyncConnection, src: psycopg.AsyncConnection,
                     source_id: UUID) -> None:
        cur = await src.execute(QUERIES["source_table_info"], {"schema": job.schema, "table": job.table})
        info = await cur.fetchone()
        if info is None:
            raise PgsinkError(f"table {job.schema}.{job.table} does not exist on the source")
        table_oid, pk, estimate = info
        if not pk:
            raise PgsinkError(f"table {job.schema}.{job.table} has no primary key: a backfill pages by it "
                              "(add one, or give the table a primary key before backfilling)")
        keys = [job.sort_column, *[c for c in pk if c != job.sort_column]] if job.sort_column else list(pk)
        cur = await src.execute(QUERIES["source_table_columns"], {"oid": table_oid})
        columns: list[tuple[str, int]] = [(r[0], r[1]) for r in await cur.fetchall()]
        types = TypeRegistry()
        await types.load(src, {oid for _, oid in columns})
        if job.rows_estimate is None:
            await state.execute(QUERIES["backfill_set_estimate"],
                                {"id": job.id, "owner": self.owner, "estimate": estimate})
        query = self._page_query(job, keys, [name for name, _ in columns])

        async def read(cursor: str | None, size: int) -> tuple[Page, int]:
            """A page; one over the time limit is cancelled and read again at half the size."""
            while True:
                try:
                    return await self._read_page(src, query, job, cursor, size, columns, types, list(pk)), size
                except psycopg.errors.QueryCanceled:
                    size = max(10, size // 2)
                    log.info("backfill %s: page over its time limit; page size now %d", job.id, size)

        # Pipelined: the next page is read on the source while this one is
        # enqueued in the state database (each page is consistent on its own).
        page, size = await read(job.cursor, job.page_size)
        while not self._stop.is_set():
            last = page.rows_read < size
            following: asyncio.Task[tuple[Page, int]] | None = None
            if not last:
                following = asyncio.create_task(read(page.cursor, next_page_size(
                    size, page.rows_read, page.elapsed_ms, job.max_page_ms, self.max_page_size)))
            try:
                await self._enqueue(state, job, page, table_oid, source_id, size)
            except BaseException:
                if following is not None:
                    following.cancel()
                    await asyncio.gather(following, return_exceptions=True)
                raise
            if following is None:
                await self._finish(job, "completed")
                log.info("backfill %s of %s.%s completed", job.id, job.schema, job.table)
                return
            page, size = await following
        async with db.connection(self.dsn, autocommit=True) as conn:  # stopping: let another worker resume
            await conn.execute(QUERIES["backfill_release"], {"id": job.id, "owner": self.owner})

    def _page_query(self, job: Job, keys: list[str], columns: list[str]) -> dict[str, sql.Composed]:
        """``select ... where (keys) > (cursor) order by keys limit n``, built from identifiers only."""
        table = sql.Identifier(job.schema, job.table)
        cols = sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(k)) for k in keys)
        from_cursor = sql.SQL(", ").join(
            sql.SQL("(select r.{} from jsonb_populate_record(null::{}, %(cursor)s::jsonb) r)").format(
                sql.Identifier(k), table) for k in keys)
        start = sql.SQL(
            "(select r.{} from jsonb_populate_record(null::{}, jsonb_build_object({}, %(start)s::jsonb)) r)"
        ).format(sql.Identifier(keys[0]), table, sql.Literal(keys[0]))
        values = sql.SQL(", ").join(sql.SQL("t.{}::text").format(sql.Identifier(c)) for c in columns)
        cursor_json = sql.SQL(", ").join(
            sql.SQL("{}, t.{}").format(sql.Literal(k), sql.Identifier(k)) for k in keys)
        head = sql.SQL("select jsonb_build_object({})::text, {} from {} t").format(cursor_json, values, table)
        tail = sql.SQL(" order by {} limit %(limit)s").format(cols)
        # each shape is a plain index range scan (no CASE in the WHERE): the
        # first page (all rows, or from the start position), then after the cursor
        first = head + tail if job.start_position is None else (
            head + sql.SQL(" where t.{} >= {}").format(sql.Identifier(keys[0]), start) + tail)
        return {"first": first, "next": head + sql.SQL(" where ({}) > ({})").format(cols, from_cursor) + tail}

    async def _read_page(self, src: psycopg.AsyncConnection, queries: dict[str, sql.Composed], job: Job,
                         cursor: str | None, size: int, columns: list[tuple[str, int]], types: TypeRegistry,
                         pk: list[str]) -> Page:
        async with src.transaction():
            await src.execute(QUERIES["source_page_transaction"])
            await src.execute(QUERIES["source_page_timeout"], {"timeout": f"{job.max_page_ms * 2}ms"})
            cur = await src.execute(QUERIES["source_snapshot"])
            snap_text, read_at = await cur.fetchone()  # type: ignore[misc]
            started = time.monotonic()
            query = queries["next"] if cursor is not None else queries["first"]
            cur = await src.execute(query, {"cursor": cursor, "start": job.start_position, "limit": size})
            rows = await cur.fetchall()
            elapsed_ms = (time.monotonic() - started) * 1000
        records, record_pks, group_keys = [], [], []
        group_columns = self._sink.group_columns(job.schema, job.table) if self._sink.message_grouping else None
        # the converters capture uses: a read's record looks like a change's
        names = [name for name, _ in columns]
        convs = [types.converter(oid) for _, oid in columns]
        for r in rows:
            record = convert_row(names, convs, r[1:], special=False)[0]  # texts and NULLs only
            if not self._passes(job, record, read_at):
                continue
            records.append(dumps(record).decode())
            record_pk = key_text(record.get(pk[0])) if len(pk) == 1 else record_key(record, pk)
            record_pks.append(record_pk)
            # the group key capture gives the row's changes: same group, same lane
            group_keys.append(None if not self._sink.message_grouping else
                              group_key(job.schema, job.table, record, group_columns, record_pk))
        return Page(records, record_pks, group_keys, rows[-1][0] if rows else cursor, Snapshot.parse(snap_text),
                    read_at, elapsed_ms, len(rows))

    def _was_sent(self, job: Job, change: RecentChange) -> bool:
        """Whether capture queued this change for the sink: its actions, then its filters as capture
        applied them (kept on an error, as capture keeps it). A change the sink never got does not
        supersede the read: dropping the read would lose the row at the destination."""
        if change.action not in self._sink.actions:
            return False
        return self._predicate is None or retained_change_passes(
            self._predicate, self._sink, job.schema, job.table, change.action, change.record, change.changes,
            change.committed, change.commit_lsn, change.commit_idx, change.annotations)

    def _passes(self, job: Job, record: dict[str, Any], read_at: datetime) -> bool:
        """The sink's filters, applied to a read as capture applies them to a change (kept on an error)."""
        if self._predicate is None:
            return True
        metadata = filter_metadata(self._sink, job.schema, job.table, read_at.isoformat(), 0, 0, None)
        try:
            return bool(self._predicate("read", record, None, metadata))
        except Exception as e:  # noqa: BLE001 - as capture: a filter that cannot judge keeps the row
            why = e.describe() if isinstance(e, UserFunctionError) else f"{type(e).__name__}: {e}"
            log.warning("sink %s: filter failed on a read of %s.%s, the row is sent anyway: %s", self._sink.name,
                        job.schema, job.table, why)
            return True

    async def _enqueue(self, state: psycopg.AsyncConnection, job: Job, page: Page, table_oid: int,
                       source_id: UUID, next_size: int) -> None:
        """One state transaction: enqueue lock, drop superseded rows, enqueue + cursor (see module doc).

        The sink's filters are user code, and capture waits for the enqueue
        lock: the changes already captured are judged before taking it, and
        under it only those captured since.
        """
        # JSON arrays, not text[]: no per-element escaping on either side
        pks = dumps(page.record_pks).decode()
        judged: dict[RecentChange, bool] = {}
        if self._predicate is not None:
            judged = {c: self._was_sent(job, c)
                      for c in await self._recent_changes(state, page, pks, table_oid, source_id)}
        try:
            async with state.transaction():
                await state.execute(QUERIES["backfill_lock_sink"], {"sink_id": job.sink_id})
                superseded = set()
                for change in await self._recent_changes(state, page, pks, table_oid, source_id):
                    sent = judged.get(change)
                    if sent is None:
                        sent = self._was_sent(job, change)
                    if sent:
                        superseded.add(change.record_pk)
                records, group_keys = page.records, page.group_keys
                if superseded:
                    keep = [i for i, pk in enumerate(page.record_pks) if pk not in superseded]
                    records, group_keys = [records[i] for i in keep], [group_keys[i] for i in keep]
                    pks = dumps([page.record_pks[i] for i in keep]).decode()
                await state.execute(QUERIES["backfill_enqueue_page"], {
                    "id": job.id, "owner": self.owner, "cursor": page.cursor, "rows_read": page.rows_read,
                    "page_size": next_size, "lease_seconds": self.lease_seconds, "read_at": page.read_at,
                    "records": "[" + ",".join(records) + "]", "record_pks": pks,
                    "group_keys": dumps(group_keys).decode()})
        except psycopg.errors.LockNotAvailable as e:
            raise JobLost(str(e)) from None
        if superseded:
            log.debug("backfill %s: %d row(s) superseded by newer captured changes", job.id, len(superseded))

    async def _recent_changes(self, state: psycopg.AsyncConnection, page: Page, pks: str, table_oid: int,
                              source_id: UUID) -> list[RecentChange]:
        """Captured changes of the page's rows that its snapshot did not see (candidates to supersede a read)."""
        cur = await state.execute(QUERIES["backfill_recent_changes"], {
            "source_id": source_id, "table_oid": table_oid, "record_pks": pks,
            "since": page.read_at - self.visibility_margin, "filtered": self._predicate is not None},
            prepare=False)
        return [RecentChange(*r) for r in await cur.fetchall() if not page.snapshot.sees(r[1])]


def _log_listener_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("backfill: LISTEN stopped; new jobs are found by polling only", exc_info=task.exception())


def parse_position(text: str) -> Any:
    """A start position as the user typed it: JSON if it parses, else a string."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


# ---------------------------------------------------------------- CLI side


async def start(dsn: str, sink: str, table: str, *, sort_column: str | None = None,
                start_position: Any = None, page_size: int = 1000, max_page_ms: int = 5000) -> UUID:
    """Create a backfill job (pgsink.start_backfill); a worker with the backfill role runs it."""
    params = {"sink": sink, "table": table, "sort_column": sort_column,
              "start_position": orjson.dumps(start_position).decode() if start_position is not None else None,
              "page_size": page_size, "max_page_ms": max_page_ms}
    async with db.connection(dsn, autocommit=True) as conn:
        try:
            cur = await conn.execute(QUERIES["backfill_start"], params)
        except (psycopg.errors.NoDataFound, psycopg.errors.InvalidParameterValue) as e:
            hint = e.diag.message_hint
            raise PgsinkError(f"{e.diag.message_primary}." + (f" {hint}" if hint else "")) from None
        return (await cur.fetchone())[0]  # type: ignore[index]


async def progress(dsn: str, backfill_id: UUID | None = None) -> list[dict[str, Any]]:
    """Rows of pgsink.backfill_progress (newest first), or the one asked for."""
    from psycopg.rows import dict_row

    async with db.connection(dsn, autocommit=True, row_factory=dict_row) as conn:
        cur = await conn.execute(QUERIES["backfill_list"], {"id": backfill_id})  # type: ignore[arg-type]
        return await cur.fetchall()  # type: ignore[return-value]


async def cancel(dsn: str, backfill_id: UUID) -> bool:
    async with db.connection(dsn, autocommit=True) as conn:
        cur = await conn.execute(QUERIES["backfill_cancel"], {"id": backfill_id})
        return bool((await cur.fetchone())[0])  # type: ignore[index]
