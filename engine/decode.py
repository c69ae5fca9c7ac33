"""pgoutput messages -> the normalised events capture consumes; pure, no I/O.

The replication protocol in three layers, each usable alone:

1. :mod:`.framing`: the CopyData payloads of a ``START_REPLICATION`` stream
   (:func:`~.framing.parse_copy_data`, standby status updates, LSN text).
2. :mod:`.pgoutput`: one pgoutput logical message (protocol 1 and 2) -> one
   raw message dataclass, exactly as the server sent it.
3. Here, :class:`PgoutputDecoder`: raw messages -> normalised :data:`Event` s
   with JSON-ready values (:mod:`.values`). ``wal2json`` output is normalised
   to the very same events by :mod:`.wal2json`.

Normalised transactions: ``TxBegin`` is emitted lazily before the first change
of a transaction and a transaction without changes produces no events at all
(pgoutput on PostgreSQL 14 and wal2json send empty BEGIN/COMMIT pairs, pgoutput
on 15+ does not; this keeps every combination the same).

Feeding protocol: ``feed(payload)`` returns events in order. When it returns a
``RelationSeen`` whose types or table facts are not loaded yet, decoding pauses
right after it (``pending`` is true) so the caller can ``await
TypeRegistry.load(conn, event.type_oids)`` first; then call :meth:`resume` (or
the next ``feed``, which resumes first) to get the rest. With pgoutput proto 1
a Relation message always travels alone, so this only happens when a streamed
(proto 2) transaction is replayed, and with wal2json on the first change of a
table.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .framing import DecodeError
from .jsontext import in_jsonb_order
from .pgoutput import (
    PAD,
    ROW_KINDS,
    UNCHANGED_TOAST,
    Begin,
    Commit,
    Delete,
    Insert,
    Message,
    PgoutputParser,
    PlainRecordReader,
    RawMessage,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    Tuple,
    Type,
    Update,
    make_plain_record_reader,
    read_tuple,
)
from .values import Converter, TypeRegistry

log = logging.getLogger("pgsink.decode")

_U32 = struct.Struct(">I")


# ===================================================================== normalised events


@dataclass(frozen=True, slots=True)
class TxBegin:
    commit_lsn: int
    committed_at: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class TxCommit:
    commit_lsn: int
    end_lsn: int


@dataclass(frozen=True, slots=True)
class RelationSeen:
    oid: int
    schema: str
    table: str
    type_oids: tuple[int, ...]


@dataclass(slots=True)
class RowChange:
    action: str                       # "insert" | "update" | "delete"
    table_oid: int
    schema: str
    table: str
    record: dict[str, Any]            # new row (insert/update); old row as far as known (delete)
    changes: dict[str, Any] | None    # update with the old row known: {column: old value} of changed columns
    key_columns: tuple[str, ...]      # primary key (else replica identity index) columns
    unchanged_toast: tuple[str, ...]  # update columns sent as unchanged TOAST: absent from record


@dataclass(frozen=True, slots=True)
class TableTruncate:
    tables: tuple[tuple[int, str, str], ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    transactional: bool
    prefix: str
    content: bytes


Event = TxBegin | TxCommit | RelationSeen | RowChange | TableTruncate | LogicalMessage


# ===================================================================== row conversion (shared with wal2json)


def _fallback(conv: Converter | None, value: Any) -> Any:
    """Slow, safe conversion of one value: odd input keeps its text."""
    if type(value) is bytes:  # binary-mode pgoutput value: not supported, keep it readable
        return "\\x" + value.hex()
    if conv is None:
        return value
    try:
        return conv(value)
    except Exception:  # noqa: BLE001 - contract: never fail a row on one odd value
        return value


def convert_row(
    names: Sequence[str], convs: Sequence[Converter | None], values: Sequence[Any], special: bool = True
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Column texts -> (record, unchanged TOAST column names). ``values`` items are
    None, UNCHANGED_TOAST or the text; UNCHANGED_TOAST columns are left out of the record.
    ``special=False`` promises there is no UNCHANGED_TOAST and no bytes (a faster path).

    Every record lists its columns in jsonb's key order (shorter names first,
    then bytewise), the order they have once stored: the state backend then
    parses the retained record without reordering it, and a filter sees the
    same dict at capture as at replay or delivery.
    """
    record: dict[str, Any] = {}
    toast: list[str] | None = None
    try:
        if not special:  # the common case: no TOAST marker, no binary value
            return in_jsonb_order({n: v if v is None or c is None else c(v)
                                   for n, c, v in zip(names, convs, values, strict=False)}), ()
        for name, conv, v in zip(names, convs, values, strict=False):
            if v is None:
                record[name] = None
            elif v is UNCHANGED_TOAST:
                if toast is None:
                    toast = []
                toast.append(name)
            elif conv is None:
                if type(v) is bytes:
                    raise TypeError
                record[name] = v
            else:
                record[name] = conv(v)
    except Exception:  # noqa: BLE001 - redo this row value by value, keeping odd texts
        record, toast = {}, None
        for name, conv, v in zip(names, convs, values, strict=False):
            if v is UNCHANGED_TOAST:
                toast = (toast or []) + [name]
            else:
                record[name] = None if v is None else _fallback(conv, v)
    return in_jsonb_order(record), (tuple(toast) if toast else ())


def old_values_record(
    names: Sequence[str], convs: Sequence[Converter | None], old: Sequence[Any]
) -> dict[str, Any]:
    """The old row of a delete: every column present, unknown ones (NULL, TOAST) None."""
    values = [None if v is UNCHANGED_TOAST else v for v in old]
    return convert_row(names, convs, values)[0]


def changed_old_values(
    names: Sequence[str], convs: Sequence[Converter | None], old: Sequence[Any], new: Sequence[Any]
) -> dict[str, Any]:
    """{column: old value} for columns whose text changed; TOAST-unchanged columns did not change."""
    changed_names: list[str] = []
    changed_convs: list[Converter | None] = []
    changed_old: list[Any] = []
    for name, conv, o, n in zip(names, convs, old, new, strict=False):
        if o is UNCHANGED_TOAST or n is UNCHANGED_TOAST or o == n:
            continue
        changed_names.append(name)
        changed_convs.append(conv)
        changed_old.append(o)
    return convert_row(changed_names, changed_convs, changed_old)[0]


# ===================================================================== pgoutput -> events


_NEW, _KEY, _OLD = ord("N"), ord("K"), ord("O")


def _text_values(values: Tuple) -> list[Any]:
    """Raw tuple values for conversion: binary ones become their ``\\x`` hex text."""
    return [("\\x" + v.hex()) if type(v) is bytes else v for v in values]


def _never_plain(buf: bytes, pos: int, end: int) -> None:
    """The record reader of a relation whose converters are not known yet."""
    return None


class _Rel:
    """A relation as the last Relation message described it, plus cached converters."""

    __slots__ = ("msg", "schema", "names", "type_oids", "flagged", "convs", "read_plain", "keys", "version")

    def __init__(self, msg: Relation) -> None:
        self.msg = msg
        self.schema = msg.namespace or "pg_catalog"
        self.names = tuple(c.name for c in msg.columns)
        self.type_oids = tuple(c.type_oid for c in msg.columns)
        self.flagged = tuple(c.name for c in msg.columns if c.is_key)
        self.convs: tuple[Converter | None, ...] = ()
        self.read_plain: PlainRecordReader = _never_plain
        self.keys: tuple[str, ...] = ()
        self.version = -1


class PgoutputDecoder:
    """pgoutput payloads -> normalised events (see the module docstring for the protocol)."""

    def __init__(self, types: TypeRegistry) -> None:
        self.types = types
        self.parser = PgoutputParser()
        self._relations: dict[int, _Rel] = {}
        self._readers: dict[tuple[tuple[str, ...], tuple[Converter | None, ...]], PlainRecordReader] = {}
        self._queue: deque[RawMessage] = deque()
        self._begin: Begin | None = None
        self._begin_sent = False
        self._streams: dict[int, list[RawMessage]] = {}
        self._stream_xid: int | None = None
        self._warned_no_key: set[int] = set()

    # ---- public

    @property
    def pending(self) -> bool:
        """True when decoding paused after a RelationSeen; call :meth:`resume` after loading."""
        return bool(self._queue)

    def feed(self, payload: bytes) -> list[Event]:
        """One XLogData payload -> 0..n events (resumes a paused replay first)."""
        kind = payload[:1]
        if kind in ROW_KINDS and not self._queue and not self.parser.in_stream:
            try:
                return self._row_fast(kind, payload)
            except (struct.error, IndexError) as e:
                raise DecodeError(f"malformed pgoutput message {kind!r} ({len(payload)} bytes): {e}") from e
        msg = self.parser.parse(payload)
        if isinstance(msg, (StreamStart, StreamStop, StreamCommit, StreamAbort)):
            self._stream_control(msg)
        elif self._stream_xid is not None:
            self._streams[self._stream_xid].append(msg)
        else:
            self._queue.append(msg)
        return self._drain()

    def resume(self) -> list[Event]:
        """Continue after a pause (a RelationSeen whose types needed loading)."""
        return self._drain()

    # ---- streaming (protocol 2): buffer per top-level xid until it commits

    def _stream_control(self, msg: RawMessage) -> None:
        if isinstance(msg, StreamStart):
            self._stream_xid = msg.xid
            self._streams.setdefault(msg.xid, [])
        elif isinstance(msg, StreamStop):
            self._stream_xid = None
        elif isinstance(msg, StreamCommit):
            buffered = self._streams.pop(msg.xid, [])
            self._queue.append(Begin(msg.commit_lsn, msg.commit_ts, msg.xid))
            self._queue.extend(buffered)
            self._queue.append(Commit(msg.flags, msg.commit_lsn, msg.end_lsn, msg.commit_ts))
        elif isinstance(msg, StreamAbort):
            if msg.subxid == msg.xid:
                self._streams.pop(msg.xid, None)
            elif msg.xid in self._streams:
                # a rolled-back subtransaction: drop its data, keep schema messages
                self._streams[msg.xid] = [
                    m for m in self._streams[msg.xid]
                    if isinstance(m, (Relation, Type)) or getattr(m, "xid", None) != msg.subxid
                ]

    # ---- the main loop

    def _drain(self) -> list[Event]:
        out: list[Event] = []
        queue = self._queue
        while queue:
            msg = queue.popleft()
            if isinstance(msg, Insert):
                self._tx_started(out)
                out.append(self._row(msg.relation_oid, b"I", None, None, False, _text_values(msg.new), True))
            elif isinstance(msg, Update):
                self._tx_started(out)
                old = _text_values(msg.old) if msg.old is not None else None
                out.append(self._row(msg.relation_oid, b"U", msg.old_kind, old, True, _text_values(msg.new), True))
            elif isinstance(msg, Delete):
                self._tx_started(out)
                out.append(self._row(msg.relation_oid, b"D", msg.old_kind, _text_values(msg.old), True, None, True))
            elif isinstance(msg, Begin):
                self._begin, self._begin_sent = msg, False
            elif isinstance(msg, Commit):
                if self._begin_sent:
                    out.append(TxCommit(msg.commit_lsn, msg.end_lsn))
                self._begin, self._begin_sent = None, False
            elif isinstance(msg, Relation):
                seen = self._relation(msg)
                out.append(seen)
                if queue and self.types.needs_load(seen.type_oids):
                    break  # let the caller load before the rows that need it
            elif isinstance(msg, Truncate):
                self._tx_started(out)
                out.append(self._truncate(msg))
            elif isinstance(msg, Message):
                if msg.transactional:
                    self._tx_started(out)
                out.append(LogicalMessage(msg.transactional, msg.prefix, msg.content))
            # Type and Origin carry nothing the events need (types come from the catalog)
        return out

    def _tx_started(self, out: list[Event]) -> None:
        if not self._begin_sent and self._begin is not None:
            b = self._begin
            out.append(TxBegin(b.final_lsn, b.commit_ts, b.xid))
            self._begin_sent = True

    def _relation(self, msg: Relation) -> RelationSeen:
        self._relations[msg.oid] = rel = _Rel(msg)
        self.types.want_relation(msg.oid)
        return RelationSeen(msg.oid, rel.schema, msg.name, rel.type_oids)

    def _rel(self, oid: int) -> _Rel:
        rel = self._relations.get(oid)
        if rel is None:
            raise DecodeError(
                f"change for relation {oid} arrived before its Relation message; "
                "the stream must be read from the slot's start position"
            )
        if rel.version != self.types.version:
            types = self.types
            rel.convs = tuple(types.converter(t) for t in rel.type_oids)
            # compiled once per shape: Relation messages repeat (after a restart, a cache
            # invalidation, a type load) far more often than a table's columns change
            shape = (rel.names, rel.convs)
            reader = self._readers.get(shape)
            if reader is None:
                reader = self._readers[shape] = make_plain_record_reader(rel.names, rel.convs)
            rel.read_plain = reader
            info = types.relation(oid)
            if info is not None:
                rel.keys = info.key_columns
            elif rel.msg.replica_identity in ("d", "i"):
                rel.keys = rel.flagged
            else:  # FULL/NOTHING flag every/no column: the key is unknown without the catalog
                rel.keys = ()
                if oid not in self._warned_no_key:
                    self._warned_no_key.add(oid)
                    log.warning("no key known for %s.%s (replica identity %s, catalog not loaded)",
                                rel.schema, rel.msg.name, rel.msg.replica_identity)
            rel.version = types.version
        return rel

    def _row_fast(self, kind: bytes, payload: bytes) -> list[Event]:
        """Insert/Update/Delete outside a stream block, straight from the bytes (the hot path)."""
        end = len(payload)
        if end < 8:
            raise DecodeError(f"malformed pgoutput message {kind!r}: {end} bytes is too short")
        buf = payload + PAD
        (oid,) = _U32.unpack_from(buf, 1)
        marker = buf[5]
        if marker == _NEW and kind != b"D":  # insert, or update without an old tuple: the most common rows
            rel = self._relations.get(oid)
            if rel is None or rel.version != self.types.version:
                rel = self._rel(oid)
            fast = rel.read_plain(buf, 6, end)
            if fast is not None:
                row = RowChange("insert" if kind == b"I" else "update", oid, rel.schema, rel.msg.name, fast,
                                None, rel.keys, ())
                if self._begin_sent:
                    return [row]
                out: list[Event] = []
                self._tx_started(out)
                out.append(row)
                return out
        old_kind: str | None = None
        old: list[Any] | None = None
        new: list[Any] | None = None
        old_special = new_special = False
        if kind == b"I":
            if marker != _NEW:
                raise DecodeError("insert without a new tuple")
            new, _, new_special = read_tuple(buf, 6, end, True)
        elif kind == b"U":
            pos = 5
            if marker in (_KEY, _OLD):
                old_kind = chr(marker)
                old, pos, old_special = read_tuple(buf, 6, end, True)
            if buf[pos] != _NEW:
                raise DecodeError(f"update without a new tuple (got {chr(buf[pos])!r})")
            new, _, new_special = read_tuple(buf, pos + 1, end, True)
        else:
            if marker not in (_KEY, _OLD):
                raise DecodeError(f"delete without an old tuple (got {chr(marker)!r})")
            old_kind = chr(marker)
            old, _, old_special = read_tuple(buf, 6, end, True)
        out = []
        self._tx_started(out)
        out.append(self._row(oid, kind, old_kind, old, old_special, new, new_special))
        return out

    def _row(self, oid: int, kind: bytes, old_kind: str | None, old: Sequence[Any] | None, old_special: bool,
             new: Sequence[Any] | None, new_special: bool) -> RowChange:
        rel = self._rel(oid)
        m = rel.msg
        if kind == b"I":
            record, toast = convert_row(rel.names, rel.convs, new, new_special)  # type: ignore[arg-type]
            return RowChange("insert", oid, rel.schema, m.name, record, None, rel.keys, toast)
        if kind == b"U":
            record, toast = convert_row(rel.names, rel.convs, new, new_special)  # type: ignore[arg-type]
            changes = None
            if old_kind == "O" and old is not None:
                changes = changed_old_values(rel.names, rel.convs, old, new)  # type: ignore[arg-type]
            return RowChange("update", oid, rel.schema, m.name, record, changes, rel.keys, toast)
        record = old_values_record(rel.names, rel.convs, old)  # type: ignore[arg-type]
        return RowChange("delete", oid, rel.schema, m.name, record, None, rel.keys, ())

    def _truncate(self, msg: Truncate) -> TableTruncate:
        tables = []
        for oid in msg.relation_oids:
            rel = self._relations.get(oid)
            tables.append((oid, rel.schema, rel.msg.name) if rel else (oid, "", ""))
        return TableTruncate(tuple(tables), msg.cascade, msg.restart_identity)
