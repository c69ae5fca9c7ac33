"""The replication protocol, pure: bytes in, dataclasses out, no I/O.

Three layers, each usable alone:

1. Framing of the CopyData payloads of a ``START_REPLICATION`` stream
   (:func:`parse_copy_data`, :func:`standby_status_update`, LSN text helpers).
2. :class:`PgoutputParser`: one pgoutput logical message (protocol 1 and 2)
   -> one raw message dataclass, exactly as the server sent it.
3. :class:`PgoutputDecoder`: raw messages -> normalised :data:`Event` s with
   JSON-ready values (:mod:`.values`). ``wal2json`` output is normalised to the
   very same events by :mod:`.wal2json`.

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
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from .errors import PgsinkError
from .values import Converter, TypeRegistry

log = logging.getLogger("pgsink.decode")

PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_PG_EPOCH_UNIX: Final = 946_684_800  # 2000-01-01 in Unix seconds


class DecodeError(PgsinkError, ValueError):
    """Bytes that do not follow the replication protocol (a bug or an unsupported option)."""


# ===================================================================== helpers


def pg_timestamp(micros: int) -> datetime:
    """Microseconds since 2000-01-01 UTC -> aware datetime (clamped to datetime's range)."""
    try:
        return PG_EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        return datetime.max.replace(tzinfo=UTC) if micros > 0 else datetime.min.replace(tzinfo=UTC)


def format_lsn(lsn: int) -> str:
    """64-bit LSN -> ``16/B374D848``, the way Postgres prints it."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """``16/B374D848`` -> 64-bit int."""
    hi, sep, lo = text.strip().partition("/")
    try:
        if not sep or not hi or not lo or len(hi) > 8 or len(lo) > 8:
            raise ValueError
        return (int(hi, 16) << 32) | int(lo, 16)
    except ValueError:
        raise DecodeError(f"{text!r} is not an LSN; expected two hex numbers like '16/B374D848'") from None


# ===================================================================== framing


@dataclass(frozen=True, slots=True)
class XLogData:
    """'w': a chunk of decoded WAL (one pgoutput message, or one wal2json object)."""

    wal_start: int
    wal_end: int
    send_micros: int  # microseconds since 2000-01-01; a datetime per message costs more than the decode
    payload: bytes

    @property
    def send_time(self) -> datetime:
        return pg_timestamp(self.send_micros)


@dataclass(frozen=True, slots=True)
class Keepalive:
    """'k': the server's position; answer at once when ``reply_requested``."""

    wal_end: int
    send_time: datetime
    reply_requested: bool


_XLOG_HEADER = struct.Struct(">QQq")
_KEEPALIVE = struct.Struct(">Qq?")
_STATUS = struct.Struct(">cQQQq?")


def parse_copy_data(buf: bytes) -> XLogData | Keepalive:
    """One CopyData payload of a START_REPLICATION stream."""
    kind = buf[:1]
    try:
        if kind == b"w":
            start, end, sent = _XLOG_HEADER.unpack_from(buf, 1)
            return XLogData(start, end, sent, buf[25:])
        if kind == b"k":
            end, sent, reply = _KEEPALIVE.unpack_from(buf, 1)
            return Keepalive(end, pg_timestamp(sent), reply)
    except struct.error as e:
        raise DecodeError(f"truncated replication message {kind!r} ({len(buf)} bytes)") from e
    raise DecodeError(f"unknown replication message type {kind!r}")


def standby_status_update(
    write_lsn: int, flush_lsn: int, apply_lsn: int, reply: bool = False, *, now: datetime | None = None
) -> bytes:
    """'r': tell the server what is written/flushed/applied (the flush LSN frees the slot)."""
    if now is None:
        micros = int((time.time() - _PG_EPOCH_UNIX) * 1_000_000)
    else:
        micros = (now - PG_EPOCH) // timedelta(microseconds=1)
    return _STATUS.pack(b"r", write_lsn, flush_lsn, apply_lsn, micros, reply)


# ===================================================================== raw pgoutput messages


class _UnchangedToast:
    """A TOASTed value the update did not touch; pgoutput does not resend it."""

    _instance: _UnchangedToast | None = None

    def __new__(cls) -> _UnchangedToast:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"

    def __reduce__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST: Final = _UnchangedToast()

TupleValue = None | _UnchangedToast | str | bytes
Tuple = tuple[TupleValue, ...]


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    commit_ts: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts: datetime


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    is_key: bool
    name: str
    type_oid: int
    type_modifier: int


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    namespace: str   # '' means pg_catalog
    name: str
    replica_identity: str  # d default, n nothing, f full, i index
    columns: tuple[Column, ...]
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Type:
    oid: int
    namespace: str
    name: str
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Insert:
    relation_oid: int
    new: Tuple
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Update:
    relation_oid: int
    old_kind: str | None  # 'K' old key, 'O' old row (replica identity full), None
    old: Tuple | None
    new: Tuple
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    relation_oid: int
    old_kind: str  # 'K' or 'O'
    old: Tuple
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Truncate:
    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Message:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class StreamStart:
    xid: int
    first_segment: bool


@dataclass(frozen=True, slots=True)
class StreamStop:
    pass


@dataclass(frozen=True, slots=True)
class StreamCommit:
    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts: datetime


@dataclass(frozen=True, slots=True)
class StreamAbort:
    xid: int
    subxid: int
    abort_lsn: int | None = None       # protocol 4 only
    abort_ts: datetime | None = None   # protocol 4 only


RawMessage = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | Message
    | StreamStart | StreamStop | StreamCommit | StreamAbort
)

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_BEGIN = struct.Struct(">QqI")
_COMMIT = struct.Struct(">BQQq")
_COL_TAIL = struct.Struct(">Ii")
_T, _N, _U, _B = ord("t"), ord("n"), ord("u"), ord("b")


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(0, pos)
    return buf[pos:end].decode("utf-8", "replace"), end + 1


_PAD = b"\x00\x00\x00\x00"
_KIND_LEN = struct.Struct(">BI")


def _read_tuple(buf: bytes, pos: int, end: int, binary_as_text: bool = False) -> tuple[list[Any], int, bool]:
    """TupleData: Int16 count, then per column 'n' | 'u' | 't' Int32 len bytes | 'b' Int32 len bytes.

    ``buf`` is the payload followed by ``_PAD`` (``end`` is the payload's length), so
    a column's kind and length unpack in one call even for a trailing 'n'. Returns
    (values, position after the tuple, whether any 'u' or 'b' column was seen).
    """
    ncols = (buf[pos] << 8) | buf[pos + 1]
    pos += 2
    values: list[Any] = []
    append = values.append
    unpack = _KIND_LEN.unpack_from
    special = False
    for _ in range(ncols):
        kind, ln = unpack(buf, pos)
        if kind == _T:
            pos += 5
            nxt = pos + ln
            append(buf[pos:nxt].decode("utf-8", "replace"))
            pos = nxt
        elif kind == _N:
            append(None)
            pos += 1
        elif kind == _U:
            append(UNCHANGED_TOAST)
            pos += 1
            special = True
        elif kind == _B:
            pos += 5
            nxt = pos + ln
            raw = bytes(buf[pos:nxt])
            append("\\x" + raw.hex() if binary_as_text else raw)
            pos = nxt
            special = True
        else:
            raise DecodeError(f"unknown tuple column kind {chr(kind)!r}")
    if pos > end:
        raise DecodeError("malformed tuple data: the message ends inside it")
    return values, pos, special


def _plain_record(buf: bytes, pos: int, end: int, names: Sequence[str],
                  convs: Sequence[Converter | None]) -> dict[str, Any] | None:
    """TupleData straight to a record in one pass, for a tuple of only text and NULL values.

    None when anything is unusual (a TOAST marker, a binary value, a column
    count that differs from the Relation, bad UTF-8, a converter that raises,
    a truncated message): the careful path (_read_tuple + convert_row) then
    handles, or reports, the same bytes.
    """
    if ((buf[pos] << 8) | buf[pos + 1]) != len(names):
        return None
    pos += 2
    record: dict[str, Any] = {}
    unpack = _KIND_LEN.unpack_from
    try:
        for name, conv in zip(names, convs, strict=True):
            kind, ln = unpack(buf, pos)
            if kind == _T:
                pos += 5
                nxt = pos + ln
                text = buf[pos:nxt].decode()
                record[name] = text if conv is None else conv(text)
                pos = nxt
            elif kind == _N:
                record[name] = None
                pos += 1
            else:
                return None
    except Exception:  # noqa: BLE001 - the careful path redoes this row value by value
        return None
    return record if pos <= end else None


def _tuple(buf: bytes, pos: int, end: int) -> tuple[Tuple, int]:
    values, pos, _ = _read_tuple(buf, pos, end)
    return tuple(values), pos


class PgoutputParser:
    """pgoutput logical messages -> raw dataclasses (protocol versions 1 and 2).

    Stateful only in one bit: between Stream Start and Stream Stop the data
    messages carry the (sub)transaction xid first.
    """

    def __init__(self) -> None:
        self.in_stream = False

    def parse(self, payload: bytes) -> RawMessage:
        try:
            return self._parse(payload + _PAD, len(payload))
        except (struct.error, IndexError, ValueError) as e:
            if isinstance(e, DecodeError):
                raise
            kind = payload[:1]
            raise DecodeError(f"malformed pgoutput message {kind!r} ({len(payload)} bytes): {e}") from e

    def _xid(self, buf: bytes, pos: int) -> tuple[int | None, int]:
        if self.in_stream:
            return _U32.unpack_from(buf, pos)[0], pos + 4
        return None, pos

    def _parse(self, buf: bytes, end: int) -> RawMessage:
        kind = buf[:1]
        if kind in _ROW_KINDS and end < 8:
            raise DecodeError(f"malformed pgoutput message {kind!r}: {end} bytes is too short")
        if kind == b"I":
            xid, pos = self._xid(buf, 1)
            (oid,) = _U32.unpack_from(buf, pos)
            if buf[pos + 4] != ord("N"):
                raise DecodeError("insert without a new tuple")
            new, _ = _tuple(buf, pos + 5, end)
            return Insert(oid, new, xid)
        if kind == b"U":
            xid, pos = self._xid(buf, 1)
            (oid,) = _U32.unpack_from(buf, pos)
            pos += 4
            old_kind: str | None = None
            old: Tuple | None = None
            marker = chr(buf[pos])
            if marker in ("K", "O"):
                old_kind = marker
                old, pos = _tuple(buf, pos + 1, end)
                marker = chr(buf[pos])
            if marker != "N":
                raise DecodeError(f"update without a new tuple (got {marker!r})")
            new, _ = _tuple(buf, pos + 1, end)
            return Update(oid, old_kind, old, new, xid)
        if kind == b"D":
            xid, pos = self._xid(buf, 1)
            (oid,) = _U32.unpack_from(buf, pos)
            marker = chr(buf[pos + 4])
            if marker not in ("K", "O"):
                raise DecodeError(f"delete without an old tuple (got {marker!r})")
            old, _ = _tuple(buf, pos + 5, end)
            return Delete(oid, marker, old, xid)
        if kind == b"B":
            final_lsn, ts, xid_ = _BEGIN.unpack_from(buf, 1)
            return Begin(final_lsn, pg_timestamp(ts), xid_)
        if kind == b"C":
            flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(buf, 1)
            return Commit(flags, commit_lsn, end_lsn, pg_timestamp(ts))
        if kind == b"R":
            return self._relation(buf)
        if kind == b"Y":
            xid, pos = self._xid(buf, 1)
            (oid,) = _U32.unpack_from(buf, pos)
            ns, pos = _cstring(buf, pos + 4)
            name, _ = _cstring(buf, pos)
            return Type(oid, ns, name, xid)
        if kind == b"T":
            xid, pos = self._xid(buf, 1)
            (n,) = _U32.unpack_from(buf, pos)
            (opts,) = _U8.unpack_from(buf, pos + 4)
            oids = struct.unpack_from(f">{n}I", buf, pos + 5)
            return Truncate(tuple(oids), bool(opts & 1), bool(opts & 2), xid)
        if kind == b"M":
            xid, pos = self._xid(buf, 1)
            (flags,) = _U8.unpack_from(buf, pos)
            (lsn,) = struct.unpack_from(">Q", buf, pos + 1)
            prefix, pos = _cstring(buf, pos + 9)
            (ln,) = _U32.unpack_from(buf, pos)
            if pos + 4 + ln > end:
                raise DecodeError("malformed message: content longer than the message")
            return Message(bool(flags & 1), lsn, prefix, bytes(buf[pos + 4:pos + 4 + ln]), xid)
        if kind == b"O":
            (lsn,) = struct.unpack_from(">Q", buf, 1)
            name, _ = _cstring(buf, 9)
            return Origin(lsn, name)
        if kind == b"S":
            (xid_,) = _U32.unpack_from(buf, 1)
            (first,) = _U8.unpack_from(buf, 5)
            self.in_stream = True
            return StreamStart(xid_, first == 1)
        if kind == b"E":
            self.in_stream = False
            return StreamStop()
        if kind == b"c":
            (xid_,) = _U32.unpack_from(buf, 1)
            flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(buf, 5)
            return StreamCommit(xid_, flags, commit_lsn, end_lsn, pg_timestamp(ts))
        if kind == b"A":
            xid_, subxid = struct.unpack_from(">II", buf, 1)
            if end >= 25:
                abort_lsn, abort_ts = struct.unpack_from(">Qq", buf, 9)
                return StreamAbort(xid_, subxid, abort_lsn, pg_timestamp(abort_ts))
            return StreamAbort(xid_, subxid)
        raise DecodeError(
            f"unsupported pgoutput message type {kind!r}; pgsink speaks protocol versions 1 and 2 "
            "without two-phase commit"
        )

    def _relation(self, buf: bytes) -> Relation:
        xid, pos = self._xid(buf, 1)
        (oid,) = _U32.unpack_from(buf, pos)
        ns, pos = _cstring(buf, pos + 4)
        name, pos = _cstring(buf, pos)
        ident = chr(buf[pos])
        (ncols,) = _U16.unpack_from(buf, pos + 1)
        pos += 3
        cols: list[Column] = []
        for _ in range(ncols):
            flags = buf[pos]
            colname, pos = _cstring(buf, pos + 1)
            type_oid, typmod = _COL_TAIL.unpack_from(buf, pos)
            pos += 8
            cols.append(Column(bool(flags & 1), colname, type_oid, typmod))
        return Relation(oid, ns, name, ident, tuple(cols), xid)


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
    ``special=False`` promises there is no UNCHANGED_TOAST and no bytes (a faster path)."""
    record: dict[str, Any] = {}
    toast: list[str] | None = None
    try:
        if not special:  # the common case: no TOAST marker, no binary value
            return {n: v if v is None or c is None else c(v)
                    for n, c, v in zip(names, convs, values, strict=False)}, ()
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
    return record, (tuple(toast) if toast else ())


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


_ROW_KINDS = frozenset((b"I", b"U", b"D"))
_NEW, _KEY, _OLD = ord("N"), ord("K"), ord("O")


def _text_values(values: Tuple) -> list[Any]:
    """Raw tuple values for conversion: binary ones become their ``\\x`` hex text."""
    return [("\\x" + v.hex()) if type(v) is bytes else v for v in values]


class _Rel:
    """A relation as the last Relation message described it, plus cached converters."""

    __slots__ = ("msg", "schema", "names", "type_oids", "flagged", "convs", "keys", "version")

    def __init__(self, msg: Relation) -> None:
        self.msg = msg
        self.schema = msg.namespace or "pg_catalog"
        self.names = tuple(c.name for c in msg.columns)
        self.type_oids = tuple(c.type_oid for c in msg.columns)
        self.flagged = tuple(c.name for c in msg.columns if c.is_key)
        self.convs: tuple[Converter | None, ...] = ()
        self.keys: tuple[str, ...] = ()
        self.version = -1


class PgoutputDecoder:
    """pgoutput payloads -> normalised events (see the module docstring for the protocol)."""

    def __init__(self, types: TypeRegistry) -> None:
        self.types = types
        self.parser = PgoutputParser()
        self._relations: dict[int, _Rel] = {}
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
        if kind in _ROW_KINDS and not self._queue and not self.parser.in_stream:
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
        buf = payload + _PAD
        (oid,) = _U32.unpack_from(buf, 1)
        marker = buf[5]
        if marker == _NEW and kind != b"D":  # insert, or update without an old tuple: the most common rows
            rel = self._rel(oid)
            fast = _plain_record(buf, 6, end, rel.names, rel.convs)
            if fast is not None:
                out: list[Event] = []
                self._tx_started(out)
                out.append(RowChange("insert" if kind == b"I" else "update", oid, rel.schema, rel.msg.name, fast,
                                     None, rel.keys, ()))
                return out
        old_kind: str | None = None
        old: list[Any] | None = None
        new: list[Any] | None = None
        old_special = new_special = False
        if kind == b"I":
            if marker != _NEW:
                raise DecodeError("insert without a new tuple")
            new, _, new_special = _read_tuple(buf, 6, end, True)
        elif kind == b"U":
            pos = 5
            if marker in (_KEY, _OLD):
                old_kind = chr(marker)
                old, pos, old_special = _read_tuple(buf, 6, end, True)
            if buf[pos] != _NEW:
                raise DecodeError(f"update without a new tuple (got {chr(buf[pos])!r})")
            new, _, new_special = _read_tuple(buf, pos + 1, end, True)
        else:
            if marker not in (_KEY, _OLD):
                raise DecodeError(f"delete without an old tuple (got {chr(marker)!r})")
            old_kind = chr(marker)
            old, _, old_special = _read_tuple(buf, 6, end, True)
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
