"""pgoutput, pure: one logical message (protocol 1 and 2) -> one raw dataclass, exactly as sent.

:class:`PgoutputParser` knows the wire format and nothing else; turning raw
messages into the normalised events capture consumes is :mod:`.decode`'s job.
The tuple helpers are shared with the decoder's hot path, which reads
Insert/Update/Delete straight from the bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from .framing import DecodeError, pg_timestamp
from .jsontext import jsonb_key_order
from .values import Converter


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
ROW_KINDS: Final = frozenset((b"I", b"U", b"D"))


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(0, pos)
    return buf[pos:end].decode("utf-8", "replace"), end + 1


PAD = b"\x00\x00\x00\x00"
_KIND_LEN = struct.Struct(">BI")


def read_tuple(buf: bytes, pos: int, end: int, binary_as_text: bool = False) -> tuple[list[Any], int, bool]:
    """TupleData: Int16 count, then per column 'n' | 'u' | 't' Int32 len bytes | 'b' Int32 len bytes.

    ``buf`` is the payload followed by ``PAD`` (``end`` is the payload's length), so
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


PlainRecordReader = Callable[[bytes, int, int], "dict[str, Any] | None"]


def make_plain_record_reader(names: Sequence[str], convs: Sequence[Converter | None]) -> PlainRecordReader:
    """A reader of one relation's TupleData straight to a record, for tuples of only text and NULL values.

    The reader returns None when anything is unusual (a TOAST marker, a binary
    value, a column count that differs from the Relation, bad UTF-8, a
    converter that raises, a truncated message): the careful path (read_tuple +
    convert_row) then handles, or reports, the same bytes.

    Why generated code: this is the reader's hottest loop, once per column of
    every change. Unrolled for the relation's columns, with each converter
    bound to a name, it takes ~6 µs instead of ~9 µs for a 7-column row
    (measured by ``python -m benchmarks costs``). Only trusted text goes into
    the source: column names and converters are passed in as values, never pasted.
    The record lists the columns in jsonb's key order, as every record does
    (see ``decode.convert_row``).
    """
    env: dict[str, Any] = {"unpack": _KIND_LEN.unpack_from, "T": _T, "N": _N}
    lines = ["def read(buf, pos, end):",
             f"    if ((buf[pos] << 8) | buf[pos + 1]) != {len(names)}:",
             "        return None",
             "    pos += 2",
             "    try:",
             "        pass"]  # a relation may have no columns
    for i, (name, conv) in enumerate(zip(names, convs, strict=True)):
        env[f"name{i}"], env[f"conv{i}"] = name, conv
        if conv is None:
            value = "buf[pos:nxt].decode()"
        elif conv is int:  # int() reads the ASCII digits as they are
            value = "int(buf[pos:nxt])"
        else:
            value = f"conv{i}(buf[pos:nxt].decode())"
        lines += ["        kind, ln = unpack(buf, pos)",
                  "        if kind == T:",
                  "            pos += 5",
                  "            nxt = pos + ln",
                  f"            v{i} = {value}",
                  "            pos = nxt",
                  "        elif kind == N:",
                  f"            v{i} = None",
                  "            pos += 1",
                  "        else:",
                  "            return None"]
    lines += ["    except Exception:  # the careful path redoes this row value by value",
              "        return None",
              "    if pos > end:",
              "        return None",
              "    return {" + ", ".join(f"name{i}: v{i}" for i in jsonb_key_order(tuple(names)) or range(len(names)))
              + "}"]
    exec(compile("\n".join(lines), "<pgoutput record reader>", "exec"), env)  # noqa: S102 - see the docstring
    return env["read"]  # type: ignore[no-any-return]


def _tuple(buf: bytes, pos: int, end: int) -> tuple[Tuple, int]:
    values, pos, _ = read_tuple(buf, pos, end)
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
            return self._parse(payload + PAD, len(payload))
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
        if kind in ROW_KINDS and end < 8:
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
