"""`pgsink worker`: one process type running the stages selected by --role.

Stages are small classes with ``run()`` and ``stop()``. The supervisor starts
them as named tasks and watches them: the first one that fails stops the whole
worker loudly (never a silent half-dead process). SIGTERM/SIGINT stop claiming
new work; stages finish in-flight work within their grace period.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import uuid
from collections.abc import Iterable
from typing import Protocol

from .errors import PgsinkError

log = logging.getLogger("pgsink.worker")

ROLES = ("reader", "delivery", "maintenance", "backfill")


class Stage(Protocol):
    async def run(self) -> None: ...
    def stop(self) -> None: ...


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def build_stages(dsn: str, roles: Iterable[str], *, worker_id: str,
                 sources: list[str] | None = None, sinks: list[str] | None = None) -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    for role in roles:
        if role == "reader":
            from .capture import CaptureStage

            stages[role] = CaptureStage(dsn, sources=sources)
        elif role == "delivery":
            from .deliver import DeliveryStage

            stages[role] = DeliveryStage(dsn, worker_id=worker_id, sinks=sinks)
        elif role == "maintenance":
            from .maintenance import MaintenanceStage

            stages[role] = MaintenanceStage(dsn)
        elif role == "backfill":
            from .backfill import BackfillStage

            stages[role] = BackfillStage(dsn, worker_id=worker_id)
        else:
            raise PgsinkError(f"Unknown role {role!r}; choose from {', '.join(ROLES)}.")
    return stages


def tune_gc(*, reader_only: bool) -> None:
    """Fewer garbage-collector passes over long-lived objects.

    The reader allocates several tracked objects per change (~8 for a row with
    an array and a json column) and keeps them alive until their batch is
    written; while one batch is written the next is built, so ~80k are alive
    at the peak with the default ``flush_changes``. Each young collection
    scans all of them (and, without the freeze, every module loaded at
    start-up). With a young threshold below that peak, collections ran once or
    twice per batch: 0.4-0.7 s of the reader's CPU per 200k changes in the
    ingest benchmark, against under 0.02 s at 100k (benchmarks/RESULTS.md). Reference
    counting frees a written batch at once, so the net count rarely reaches the
    threshold; the collector is left for the few reference cycles.

    Only a process that runs the reader alone gets 100k: delivery makes reference
    cycles that hold request bodies (a failed aiohttp attempt), and a sink outage
    with 1 MB batches would keep ~1 GB of them before a collection; 20k there.
    """
    gc.freeze()
    gc.set_threshold(100_000 if reader_only else 20_000, 20, 20)


async def run_stages(stages: dict[str, Stage], *, install_signals: bool = True) -> None:
    """Run until a signal or until one stage fails (then stop the others and re-raise)."""
    tune_gc(reader_only=set(stages) == {"reader"})
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def stop_all() -> None:
        if not stopping.is_set():
            log.info("stopping: finishing in-flight work")
            stopping.set()
            for stage in stages.values():
                stage.stop()

    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_all)
    tasks = {asyncio.create_task(s.run(), name=f"stage:{name}"): name for name, s in stages.items()}
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None and not stopping.is_set():
                    log.error("stage %s failed: %s", tasks[task], task.exception())
                    stop_all()
                    await asyncio.gather(*pending, return_exceptions=True)
                    raise task.exception()  # type: ignore[misc]
                if not stopping.is_set():
                    log.error("stage %s ended unexpectedly", tasks[task])
                    stop_all()
    finally:
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
