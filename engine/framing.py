"""Framing of a ``START_REPLICATION`` stream, pure: CopyData payloads in, dataclasses out.

The outermost layer of the replication protocol, the same for every output
plugin: XLogData ('w') carries one decoded message, Keepalive ('k') the
server's position; the client answers with standby status updates ('r').
Also the LSN text helpers. No I/O here (that is :mod:`.replication`).
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from .errors import PgsinkError

PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_PG_EPOCH_UNIX: Final = 946_684_800  # 2000-01-01 in Unix seconds


class DecodeError(PgsinkError, ValueError):
    """Bytes that do not follow the replication protocol (a bug or an unsupported option)."""


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


def xlog_payload(buf: bytes) -> bytes | None:
    """The payload of an XLogData message, or None for anything else (parse that with parse_copy_data).

    The reader's hot path: once per change, where building an XLogData costs
    more than the check.
    """
    if buf[:1] == b"w" and len(buf) >= _XLOG_HEADER.size + 1:
        return buf[_XLOG_HEADER.size + 1:]
    return None


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
