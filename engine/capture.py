"""The reader: stream a source's WAL into the retention log and the sink queues.

One active reader per source across all worker processes: leadership is a
session advisory lock held by the very connection that runs the capture
transactions, so a reader that loses its connection cannot commit anything
more, and a standby takes over as soon as the lock is free.

Flow per source: START_REPLICATION from the checkpoint -> decode -> buffer ->
flush (one state transaction, see ``ingest``) -> only then a standby status
update acknowledging the flushed position. Keepalives are answered; an idle
source still acknowledges the server's position so WAL does not pile up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg

from . import model
from .db import connect
from .decode import (
    LogicalMessage,
    PgoutputDecoder,
    RelationSeen,
    RowChange,
    TableTruncate,
    TxBegin,
    TxCommit,
)
from .framing import parse_copy_data, standby_status_update, xlog_payload
from .errors import PgsinkError
from .filters import Predicate, filter_metadata, sink_predicate
from .ingest import (
    TX_COMPLETE,
    IngestBuffer,
    LeadershipLost,
    PendingChange,
    Position,
    TxFields,
    copy_relation_fields,
    group_key,
    key_text,
    record_key,
)
from .queries import QUERIES
from .replication import ReplicationStream
from .source import ensure_slot_and_publication
from .userfunc import UserFunctionError
from .jsontext import RawJson, dumps, in_jsonb_order, jsonb_refuses, loads_exact
from .values import TypeRegistry
from .waiting import wait_event
from .wal2json import WAL2JSON_OPTIONS, Wal2JsonDecoder

log = logging.getLogger("pgsink.capture")

STATE_SCHEMA = "pgsink"
YIELD_EVERY = 20  # messages between yields to the event loop while draining the stream
ANNOTATIONS_PREFIX = "pgsink:annotations"


@dataclass
class ReaderSettings:
    flush_changes: int = 5000         # flush when this many changes are buffered
    flush_interval: float = 0.025     # ... or when the oldest is this many seconds old
    idle_gap: float = 0.002           # ... or when the server sent nothing for this long
    status_interval: float = 10.0     # standby status update at least this often
    standby_poll: float = 1.0         # how often a standby tries to take over
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    config_poll: float = 2.0


@dataclass(slots=True)
class _Route:
    """Per (table, action): the target sinks (key, lanes, grouping, group columns) and text made once."""

    targets: list[tuple[bytes, int, bool, tuple[str, ...] | None]]
    group_prefix: str   # "schema.table:", the group key of a row is this + its primary key
    copy_fields: bytes  # the table's fields of a pgsink.changes COPY row


@dataclass(slots=True)
class _Tx:
    commit_lsn: int
    committed_at: Any
    fields: TxFields  # its COPY fields
    skip_upto: int  # changes with an index at or below this are already durable (-1: none)
    next_idx: int = 0
    kept: int = 0
    annotations: bytes | None = None


class SourceReader:
    """Reads one source while it holds that source's leadership."""

    def __init__(self, state_dsn: str, source: model.Source, *, settings: ReaderSettings | None = None) -> None:
        self.state_dsn = state_dsn
        self.source = source
        self.settings = settings or ReaderSettings()
        self.sinks: list[model.Sink] = []
        # (table oid, action) -> where its changes go; rebuilt on config or relation changes
        self._routes: dict[tuple[int, str], _Route] = {}
        self._predicates: dict[bytes, tuple[model.Sink, Predicate]] = {}  # sinks with filters (engine.filters)
        self._filtering = False
        self._broken_filters = False  # some sink's filters failed to build: retried at each config poll
        self.is_leader = asyncio.Event()
        self.streaming = asyncio.Event()  # leader, slot and publication in place, stream started
        self._flusher: Flusher
        self._stop = asyncio.Event()
        self._log_extra = {"source": source.name}

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> None:
        """Stand by until leader, then stream; reconnect with capped backoff on failures."""
        delay = self.settings.reconnect_min
        while not self.stopping:
            try:
                async with _StateSession(self.state_dsn) as state:
                    if not await self._wait_for_leadership(state.conn):
                        return
                    log.info("reader for source %s is active", self.source.name, extra=self._log_extra)
                    self.is_leader.set()
                    try:
                        await self._stream(state.conn)
                        delay = self.settings.reconnect_min
                    finally:
                        self.is_leader.clear()
                        self.streaming.clear()
            except (PgsinkError, psycopg.OperationalError, LeadershipLost, OSError) as e:
                # PgsinkError includes ingest.MissingPartition: the new session makes the partition
                if self.stopping:
                    return
                log.warning("reader for source %s: %s; retrying in %.1fs", self.source.name, str(e).strip(), delay,
                            extra=self._log_extra)
                await self._sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, self.settings.reconnect_max)

    async def _wait_for_leadership(self, conn: psycopg.AsyncConnection) -> bool:
        while not self.stopping:
            cur = await conn.execute(QUERIES["reader_try_lead"], (self.source.id,))
            row = await cur.fetchone()
            if row and row[0]:
                return True
            await self._sleep(self.settings.standby_poll)
        return False

    async def _sleep(self, seconds: float) -> None:
        await wait_event(self._stop, seconds)

    # ----------------------------------------------------------------- streaming

    async def _stream(self, state: psycopg.AsyncConnection) -> None:
        await ensure_slot_and_publication(self.source)
        stream = await ReplicationStream.connect(self.source.dsn(options=SESSION_OPTIONS),
                                                 description=f"source {self.source.name!r}")
        try:
            await self._stream_from(state, stream)
        finally:
            await stream.close()

    async def _checkpoint(self, state: psycopg.AsyncConnection, system: str) -> tuple[int, int, int]:
        """(commit_lsn, commit_idx, ack_lsn) to resume from, for this cluster (see checkpoint_for_system)."""
        cur = await state.execute(QUERIES["checkpoint_get"], (self.source.id,))
        commit_lsn, commit_idx, ack_lsn, recorded = (await cur.fetchone())  # type: ignore[misc]
        if recorded == system:
            return commit_lsn, commit_idx, ack_lsn
        if recorded is not None:
            log.warning("source %s now points at another Postgres cluster (system identifier %s, was %s): its "
                        "checkpoint is reset and capture starts where the slot stands", self.source.name, system,
                        recorded, extra=self._log_extra)
        await state.execute(QUERIES["checkpoint_for_system"], {"source_id": self.source.id, "system": system})
        return (commit_lsn, commit_idx, ack_lsn) if recorded is None else (0, TX_COMPLETE, 0)

    async def _stream_from(self, state: psycopg.AsyncConnection, stream: ReplicationStream) -> None:
        commit_lsn, commit_idx, ack_lsn = await self._checkpoint(state, await stream.identify_system())
        buffer = IngestBuffer(self.source.id, Position(commit_lsn, commit_idx), ack_lsn)
        await self._reload_sinks(state)

        types = TypeRegistry()
        decoder: PgoutputDecoder | Wal2JsonDecoder
        if self.source.decoder == "wal2json":
            # wal2json knows no publications: it sees every table but ours, partitions as their root
            decoder = Wal2JsonDecoder(types, partition_root=True)
            options = {**WAL2JSON_OPTIONS, "filter-tables": f"{STATE_SCHEMA}.*"}
        else:
            decoder = PgoutputDecoder(types)
            # a list of identifiers, which pgoutput folds to lower case unless quoted
            quoted = '"' + self.source.publication_name.replace('"', '""') + '"'
            options = {"proto_version": "1", "publication_names": quoted, "messages": "true"}
        await stream.start(self.source.slot_name, ack_lsn, options)
        source_conn = await connect(self.source.dsn(), autocommit=True)
        self.streaming.set()
        loop = asyncio.get_running_loop()
        flusher = self._flusher = Flusher(buffer, stream, state)
        try:
            tx: _Tx | None = None
            last_status = loop.time()
            last_config = loop.time()
            server_pos = ack_lsn
            flush_changes = self.settings.flush_changes
            while not self.stopping:
                # Drain what the server sends; flush when it pauses (idle_gap), when the
                # buffer is full, or when its oldest change waited flush_interval.
                raw = stream.read_nowait()
                if raw is None and buffer.dirty:
                    # a short gap is not the end of a burst: give the server a moment
                    wait = min(self.settings.idle_gap, self.settings.flush_interval - buffer.age())
                    raw = await stream.read(wait) if wait > 0 else None
                    if raw is None:
                        await flusher.submit(wait=True)
                        last_status = loop.time()
                elif raw is None:
                    raw = await stream.read(1.0)
                # A burst: up to YIELD_EVERY messages that are already here, with only the
                # per-message work in the loop; the checks below run once per burst.
                burst = 0
                while raw is not None:
                    payload = xlog_payload(raw)
                    if payload is not None:
                        events = decoder.feed(payload)
                        while True:
                            for event in events:
                                if type(event) is RowChange and tx is not None and not event.unchanged_toast:
                                    self._on_row(event, tx, buffer)  # the hot path: no await
                                    if len(buffer.changes) >= flush_changes:
                                        await flusher.submit(wait=True)  # a chunk; no ack past its commit
                                else:
                                    tx = await self._on_event(event, tx, buffer, source_conn, types, state)
                            if not decoder.pending:
                                break
                            events = decoder.resume()  # the types it paused for are loaded now
                    else:  # Keepalive (or a malformed message, which parse_copy_data reports)
                        frame = parse_copy_data(raw)
                        server_pos = max(server_pos, frame.wal_end)
                        if frame.reply_requested:
                            last_status = -1e9  # answer at once, below
                    burst += 1
                    raw = stream.read_nowait() if burst < YIELD_EVERY else None
                buffer.prepare()  # COPY rows as they come, so a flush can start writing at once
                if buffer.dirty and (len(buffer.changes) >= flush_changes
                                     or buffer.age() >= self.settings.flush_interval):
                    # while the previous batch is still being written, keep reading into
                    # this one (batches grow to match the write time), up to flush_changes
                    await flusher.submit(wait=len(buffer.changes) >= flush_changes)
                    last_status = loop.time()
                if burst >= YIELD_EVERY:  # more may be waiting: let the write in flight (and other stages) progress
                    await asyncio.sleep(0)
                if flusher.done:
                    await flusher.settle()
                now = loop.time()
                if now - last_status >= self.settings.status_interval:
                    # Idle: nothing buffered and no transaction open, so everything the server
                    # sent up to its position is durable (or not ours): acknowledge it.
                    if tx is None and not buffer.dirty and not flusher.busy and server_pos > buffer.ack_lsn:
                        buffer.ack_lsn = flusher.acked = server_pos
                    await stream.send(standby_status_update(flusher.acked, flusher.acked, flusher.acked))
                    last_status = now
                if now - last_config >= self.settings.config_poll:
                    await flusher.settle()
                    await self._reload_sinks(state)
                    last_config = now
            if buffer.dirty:
                await flusher.submit(wait=True)
            await flusher.settle()
        finally:
            flusher.cancel()
            await source_conn.close()

    async def _on_event(self, event: Any, tx: _Tx | None, buffer: IngestBuffer,
                        source_conn: psycopg.AsyncConnection, types: TypeRegistry,
                        state: psycopg.AsyncConnection) -> _Tx | None:
        if isinstance(event, RowChange):
            assert tx is not None, "row change outside a transaction"
            if event.unchanged_toast and event.schema != STATE_SCHEMA and tx.next_idx > tx.skip_upto:
                await self._fill_toast(event, record_key(event.record, event.key_columns), buffer, state)
            self._on_row(event, tx, buffer)
            if len(buffer.changes) >= self.settings.flush_changes:
                await self._flusher.submit(wait=True)  # a chunk of a large transaction; no ack past its commit
            return tx
        if isinstance(event, TxBegin):
            ck = buffer.checkpoint
            skip_upto = -1 if event.commit_lsn > ck.commit_lsn else (
                ck.commit_idx if event.commit_lsn == ck.commit_lsn else TX_COMPLETE)
            return _Tx(event.commit_lsn, event.committed_at,
                       TxFields.make(self.source.id, event.commit_lsn, event.xid, event.committed_at), skip_upto)
        if isinstance(event, TxCommit):
            partial = buffer.checkpoint.commit_lsn == event.commit_lsn and buffer.checkpoint.commit_idx != TX_COMPLETE
            if tx is not None and (tx.kept or partial):
                buffer.complete(event.commit_lsn, event.end_lsn)
            elif not buffer.dirty and event.commit_lsn > buffer.checkpoint.commit_lsn:
                buffer.ack_lsn = max(buffer.ack_lsn, event.end_lsn)  # nothing of ours in it
            return None
        if isinstance(event, RelationSeen):
            await types.load(source_conn, event.type_oids)
            self._routes.clear()  # the table may have been renamed
            return tx
        if isinstance(event, LogicalMessage):
            if tx is not None and event.transactional and event.prefix == ANNOTATIONS_PREFIX:
                tx.annotations = _annotations(event.content, self.source.name)
                tx.fields = tx.fields.annotated(tx.annotations)
            return tx
        if isinstance(event, TableTruncate):
            names = ", ".join(f"{s}.{t}" for _, s, t in event.tables if s != STATE_SCHEMA)
            if names:
                log.warning("TRUNCATE of %s captured: truncates are not delivered (no row events)",
                            names, extra=self._log_extra)
            return tx
        return tx

    def _on_row(self, change: RowChange, tx: _Tx, buffer: IngestBuffer) -> None:
        """Number the change within its transaction; buffer it unless it is ours or already durable."""
        if change.schema == STATE_SCHEMA:
            return  # pgsink's own tables never enter the stream
        idx, tx.next_idx = tx.next_idx, tx.next_idx + 1
        if idx <= tx.skip_upto:
            return
        tx.kept += 1
        route = self._routes.get((change.table_oid, change.action))
        if route is None:
            route = self._routes[(change.table_oid, change.action)] = self._route(change)
        record = change.record
        pk = change.key_columns  # the primary key, from the catalog
        if not pk:
            record_pk = None
        elif len(pk) == 1:
            record_pk = key_text(record.get(pk[0]))  # == record_key(), without the join
        else:
            record_pk = record_key(record, pk)
        targets = route.targets
        if self._filtering and targets:
            targets = [t for t in targets if self._passes(t[0], change, tx, idx)]
        messages = []
        for sink_key, lanes, grouping, columns in targets:
            if not grouping:
                key = None
            elif columns is None and record_pk is not None:
                key = route.group_prefix + record_pk  # == group_key(...), without the call
            else:
                key = group_key(change.schema, change.table, record, columns, record_pk)
            messages.append((sink_key, lanes, key))
        buffer.add(PendingChange(idx, tx.fields, change, route.copy_fields, record_pk, messages))

    def _route(self, change: RowChange) -> _Route:
        """The sinks a table's changes of one action go to, with what their group keys need."""
        targets = [(str(s.id).encode(), s.lane_count, s.message_grouping,
                    s.group_columns(change.schema, change.table))
                   for s in self.sinks
                   if change.action in s.actions and s.matches_table(change.schema, change.table)]
        return _Route(targets, f"{change.schema}.{change.table}:",
                      copy_relation_fields(change.table_oid, change.schema, change.table, change.action))

    def _passes(self, sink_key: bytes, change: RowChange, tx: _Tx, idx: int) -> bool:
        """The sink's filters (column, SQL, Python) at enqueue time; on an error the change is kept."""
        entry = self._predicates.get(sink_key)
        if entry is None:
            return True
        sink, predicate = entry
        metadata = filter_metadata(sink, change.schema, change.table, tx.committed_at.isoformat(), tx.commit_lsn, idx,
                                   loads_exact(tx.annotations.decode()) if tx.annotations else None)
        try:
            return predicate(change.action, change.record, change.changes, metadata)
        except Exception as e:  # noqa: BLE001 - a filter that cannot judge keeps the change; it never stops capture
            why = e.describe() if isinstance(e, UserFunctionError) else f"{type(e).__name__}: {e}"
            log.warning("sink %s: filter failed on %s.%s at %d/%d, the change is queued anyway: %s", sink.name,
                        change.schema, change.table, tx.commit_lsn, idx, why, extra=self._log_extra)
            return True

    def _compile_filters(self) -> None:
        """Build each sink's filter predicate once per config; a broken one lets every change through."""
        self._predicates = {}
        was_broken, self._broken_filters = self._broken_filters, False
        for sink in self.sinks:
            if not sink.has_filters:
                continue
            try:
                predicate = sink_predicate(sink.filters, sink.filter_sql, sink.filter_function,
                                           timeout=sink.function_timeout_ms / 1000, what=f"sink {sink.name}: filter")
            except PgsinkError as e:
                if not was_broken:
                    log.error("sink %s: its filters cannot be used (%s); every change is queued for it until "
                              "they are fixed", sink.name, e, extra=self._log_extra)
                self._broken_filters = True
                continue
            if predicate is not None:
                self._predicates[str(sink.id).encode()] = (sink, predicate)
        self._filtering = bool(self._predicates)

    async def _fill_toast(self, change: RowChange, record_pk: str | None, buffer: IngestBuffer,
                          state: psycopg.AsyncConnection) -> None:
        """Unchanged TOAST values are not in the WAL: take them from the row's last version."""
        previous: dict[str, Any] | None = None
        for pending in reversed(buffer.changes):
            if pending.change.table_oid == change.table_oid and pending.record_pk == record_pk:
                previous = pending.change.record
                break
        if previous is None and record_pk is not None:
            await self._flusher.settle()  # the row's last version may be in the batch being written
            cur = await state.execute(QUERIES["last_retained_record"], (self.source.id, change.table_oid, record_pk))
            row = await cur.fetchone()
            # numbers as their exact text: a float would drop digits (1.50 -> 1.5) when written back
            previous = json.loads(row[0], parse_float=RawJson) if row else None
        missing = []
        for column in change.unchanged_toast:
            if previous is not None and column in previous:
                change.record[column] = previous[column]
            else:
                missing.append(column)
        change.record = in_jsonb_order(change.record)  # the filled columns came last
        if missing:
            log.warning("%s.%s row %s: unchanged TOAST column(s) %s not retained; left out of the record "
                        "(set REPLICA IDENTITY FULL on the table to always have them)",
                        change.schema, change.table, record_pk, ", ".join(missing), extra=self._log_extra)

    async def _reload_sinks(self, state: psycopg.AsyncConnection) -> None:
        config = await model.load_config(state)
        sinks = [s for s in config.sinks_of(self.source.id) if s.status != "disabled"]
        if sinks != self.sinks:
            self.sinks = sinks
            self._routes.clear()
            self._compile_filters()
        elif self._broken_filters:
            self._compile_filters()  # e.g. a filter file that was missing may be there now


# The value formats the decoders parse fastest and exactly (values.py relies on them).
SESSION_OPTIONS = ("-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=postgres -c bytea_output=hex"
                   " -c extra_float_digits=1")


def _annotations(content: bytes, source_name: str) -> bytes | None:
    try:
        value = loads_exact(content.decode())
    except ValueError:  # not UTF-8, not JSON, or nested too deeply
        log.warning("source %s: transaction annotations are not JSON; ignored: %r", source_name, content[:200])
        return None
    try:
        text = dumps(value)
    except TypeError:  # a lone UTF-16 surrogate, which JSON text may spell and UTF-8 cannot hold
        text = None
    if text is None or jsonb_refuses(text.decode()):  # the retention log (jsonb) would refuse it, and
        # capture would stop there
        log.warning("source %s: transaction annotations hold what Postgres cannot store (\\u0000, a lone "
                    "surrogate, a number beyond numeric's range); ignored: %r", source_name, content[:200])
        return None
    return text


class Flusher:
    """Writes batches in the background so decoding overlaps the capture transaction.

    At most one batch is in flight; the slot is acknowledged only after its
    transaction committed (invariant 1): ``acked`` is the last position sent,
    never the buffer's optimistic one. The state connection is shared, so
    anything else that uses it first waits for the batch in flight (settle()).
    """

    def __init__(self, buffer: IngestBuffer, stream: Any, state: psycopg.AsyncConnection) -> None:
        self.buffer, self.stream, self.state = buffer, stream, state
        self.acked = buffer.ack_lsn
        self._task: asyncio.Task[int] | None = None

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    @property
    def busy(self) -> bool:
        return self._task is not None

    async def submit(self, *, wait: bool) -> None:
        """Start writing what is buffered, after the previous batch is durable and acknowledged.

        With wait=False and a batch still being written, do nothing: the caller
        keeps buffering and tries again later.
        """
        if self._task is not None and not self._task.done() and not wait:
            return
        await self.settle()
        if self.buffer.dirty:
            batch = self.buffer.detach()
            self._task = asyncio.create_task(self.buffer.write(batch, self.state), name="capture-write")

    async def settle(self) -> None:
        """Wait for the batch in flight; then acknowledge its position to the slot."""
        if self._task is None:
            return
        task, self._task = self._task, None
        self.acked = await task
        await self.stream.send(standby_status_update(self.acked, self.acked, self.acked))

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class _StateSession:
    """The reader's state connection: holds leadership and runs the capture transactions."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: psycopg.AsyncConnection

    async def __aenter__(self) -> _StateSession:
        self.conn = await connect(self.dsn, autocommit=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()  # releases the advisory lock


class CaptureStage:
    """Runs a reader for every configured source (or the named ones); follows config changes."""

    def __init__(self, dsn: str, *, sources: list[str] | None = None,
                 settings: ReaderSettings | None = None) -> None:
        self.dsn = dsn
        self.only = set(sources) if sources else None
        self.settings = settings or ReaderSettings()
        self.readers: dict[UUID, tuple[SourceReader, asyncio.Task[None]]] = {}
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()
        for reader, _ in self.readers.values():
            reader.stop()

    async def run(self) -> None:
        try:
            while not self._stop.is_set():
                await self._sync_readers()
                for reader, task in list(self.readers.values()):
                    if task.done() and task.exception() is not None:
                        raise PgsinkError(f"reader for source {reader.source.name} failed: "
                                          f"{task.exception()}") from task.exception()
                await wait_event(self._stop, self.settings.config_poll)  # then look at the config again
        finally:
            for reader, _ in self.readers.values():
                reader.stop()
            await asyncio.gather(*(t for _, t in self.readers.values()), return_exceptions=True)

    async def _sync_readers(self) -> None:
        async with _StateSession(self.dsn) as state:
            config = await model.load_config(state.conn)
        wanted = {sid: s for sid, s in config.sources.items() if self.only is None or s.name in self.only}
        for sid, (reader, task) in list(self.readers.items()):
            if sid not in wanted or wanted[sid] != reader.source:
                reader.stop()
                await task
                del self.readers[sid]
        for sid, source in wanted.items():
            if sid not in self.readers:
                reader = SourceReader(self.dsn, source, settings=self.settings)
                self.readers[sid] = (reader, asyncio.create_task(reader.run(), name=f"reader:{source.name}"))
