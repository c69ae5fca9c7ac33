"""A reader in its own process, for crash and takeover tests.

    python -m tests.reader_proc DSN SOURCE_NAME MODE [FLUSH_CHANGES]

MODE: normal | crash-after-commit (SIGKILL itself right after the first flush
commits, before the slot is acknowledged) | crash-before-commit (SIGKILL itself
inside the first capture transaction, after the changes were copied).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from pgsink.engine import ingest, model
from pgsink.engine.capture import ReaderSettings, SourceReader
from pgsink.engine.db import connection


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_fault(mode: str) -> None:
    if mode == "crash-after-commit":
        original = ingest.IngestBuffer.write

        async def write_then_die(self: ingest.IngestBuffer, batch: ingest.Batch, conn: object) -> int:
            ack = await original(self, batch, conn)  # type: ignore[arg-type]
            if batch.changes:
                _kill_self()  # committed, not yet acknowledged to the slot
            return ack

        ingest.IngestBuffer.write = write_then_die  # type: ignore[method-assign]
    elif mode == "crash-before-commit":
        original_copy = ingest.IngestBuffer._copy

        async def copy_then_die(conn: object, query: str, data: bytes) -> None:
            if query == "copy_messages" and data:
                _kill_self()  # inside the capture transaction, after the changes were copied
            await original_copy(conn, query, data)  # type: ignore[arg-type]

        ingest.IngestBuffer._copy = staticmethod(copy_then_die)  # type: ignore[assignment]


async def main(dsn: str, source_name: str, mode: str, flush_changes: int) -> None:
    install_fault(mode)
    async with connection(dsn, autocommit=True) as conn:
        source = (await model.load_config(conn)).source_named(source_name)
    assert source is not None
    settings = ReaderSettings(flush_changes=flush_changes, flush_interval=0.005, status_interval=0.2,
                              standby_poll=0.2, reconnect_min=0.1, reconnect_max=1.0, config_poll=0.5)
    reader = SourceReader(dsn, source, settings=settings)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, reader.stop)
    await reader.run()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 5000))
