"""A logical replication stream over libpq's COPY_BOTH, driven by asyncio.

psycopg 3 opens the ``replication=database`` connection; after
``START_REPLICATION`` we talk to libpq directly through ``conn.pgconn``:
``get_copy_data(1)`` never blocks (0 means: wait until the socket is readable,
then ``consume_input()``), and ``put_copy_data()`` + ``flush()`` send standby
status updates. No polling of ``pg_logical_slot_get_changes``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import psycopg
from psycopg import pq, sql

from .db import redact
from .framing import format_lsn
from .errors import SourceError

log = logging.getLogger("pgsink.replication")


class StreamClosed(SourceError):
    """The server ended the stream (restart, terminated walsender, network)."""


class ReplicationStream:
    """One START_REPLICATION session. Not safe for concurrent readers."""

    def __init__(self, conn: psycopg.AsyncConnection, description: str) -> None:
        self._conn = conn
        self._pg = conn.pgconn
        self._description = description
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, dsn: str, description: str) -> ReplicationStream:
        """A replication connection, not streaming yet (see :meth:`identify_system`, :meth:`start`)."""
        try:
            conn = await psycopg.AsyncConnection.connect(dsn, replication="database", autocommit=True,
                                                         connect_timeout=10)
        except psycopg.OperationalError as e:
            raise SourceError(f"{description}: cannot open a replication connection to {redact(dsn)}: "
                              f"{str(e).strip()}") from e
        conn.pgconn.nonblocking = 1
        return cls(conn, description)

    @classmethod
    async def open(
        cls, dsn: str, slot: str, start_lsn: int, options: Mapping[str, str], description: str
    ) -> ReplicationStream:
        """connect + start."""
        stream = await cls.connect(dsn, description)
        try:
            await stream.start(slot, start_lsn, options)
        except BaseException:
            await stream.close()
            raise
        return stream

    async def identify_system(self) -> str:
        """The server's system identifier (IDENTIFY_SYSTEM): which cluster, and so which LSNs, this is."""
        res = await self._command(b"IDENTIFY_SYSTEM", pq.ExecStatus.TUPLES_OK)
        value = res.get_value(0, 0)
        assert value is not None
        return value.decode()

    async def start(self, slot: str, start_lsn: int, options: Mapping[str, str]) -> None:
        opts = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in options.items()
        )
        query = sql.SQL("START_REPLICATION SLOT {} LOGICAL {} ({})").format(
            sql.Identifier(slot), sql.SQL(format_lsn(start_lsn)), opts
        )
        await self._command(query.as_bytes(self._conn), pq.ExecStatus.COPY_BOTH)

    async def _command(self, query: bytes, expect: pq.ExecStatus) -> pq.abc.PGresult:
        """Send one replication command (simple protocol) and wait for its result."""
        self._pg.send_query(query)
        await self._flush()
        while True:
            self._consume()
            if not self._pg.is_busy():
                break
            await self._readable(None)
        res = self._pg.get_result()
        if res is None or res.status != expect:
            msg = (res.error_message.decode(errors="replace").strip() if res is not None else "no result")
            raise SourceError(f"{self._description}: {query.split()[0].decode()} failed: {msg}")
        if expect != pq.ExecStatus.COPY_BOTH:
            while self._pg.get_result() is not None:  # the end of this command's results
                pass
        return res

    def read_nowait(self) -> bytes | None:
        """The next CopyData message if one is already here (buffered or in the socket), else None."""
        nbytes, data = self._pg.get_copy_data(1)
        if nbytes == 0:
            self._consume()
            nbytes, data = self._pg.get_copy_data(1)
        if nbytes > 0:
            return bytes(data)
        if nbytes < 0:
            raise StreamClosed(f"{self._description}: replication stream ended: {self._error_text()}")
        return None

    async def read(self, timeout: float) -> bytes | None:
        """The next CopyData message, or None when nothing arrived within timeout."""
        deadline = self._loop.time() + timeout
        while True:
            nbytes, data = self._pg.get_copy_data(1)
            if nbytes > 0:
                return bytes(data)
            if nbytes < 0:
                raise StreamClosed(f"{self._description}: replication stream ended: {self._error_text()}")
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                return None
            if not await self._readable(remaining):
                return None
            self._consume()

    async def send(self, data: bytes) -> None:
        if self._pg.put_copy_data(data) != 1:
            raise StreamClosed(f"{self._description}: cannot send to the server: {self._error_text()}")
        await self._flush()

    async def close(self) -> None:
        try:
            await self._conn.close()
        except psycopg.Error as e:  # closing a broken connection: nothing left to do
            log.debug("closing replication connection: %s", e)

    # -------------------------------------------------------------- libpq glue

    def _consume(self) -> None:
        try:
            self._pg.consume_input()
        except psycopg.OperationalError as e:
            raise StreamClosed(f"{self._description}: connection lost: {str(e).strip()}") from e

    def _error_text(self) -> str:
        res = self._pg.get_result()
        if res is not None and res.error_message:
            return res.error_message.decode(errors="replace").strip()
        return self._pg.error_message.decode(errors="replace").strip() or "connection closed"

    async def _flush(self) -> None:
        while True:
            rc = self._pg.flush()
            if rc == 0:
                return
            if rc < 0:
                raise StreamClosed(f"{self._description}: send failed: {self._error_text()}")
            await self._wait(writable=True, timeout=None)

    async def _readable(self, timeout: float | None) -> bool:
        return await self._wait(writable=False, timeout=timeout)

    async def _wait(self, *, writable: bool, timeout: float | None) -> bool:
        fd = self._pg.socket
        fut: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        (self._loop.add_writer if writable else self._loop.add_reader)(fd, ready)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            (self._loop.remove_writer if writable else self._loop.remove_reader)(fd)
