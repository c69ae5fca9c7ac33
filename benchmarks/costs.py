"""Where a captured change's CPU goes: the reader's Python work and the state COPY, each alone.

Two measurements that the ingest benchmark cannot separate, because there the
reader, the walsender and the state backend share two cores:

* ``reader``: WAL frames of a recorded workload (benchmark_records, half
  inserts, half updates) replayed through the reader's own code (frame parse,
  pgoutput decode, routing, group key, COPY rows) with no I/O. The result is
  the best of several passes, in CPU time per change (and the garbage
  collector's part of it, under the worker's `tune_gc`). ``decode`` is the
  decoder alone.
* ``copy``: COPY of the same rows into ``pgsink.changes`` and
  ``pgsink.messages`` in one transaction, against plain copies of those tables
  without their indexes or partitions, and with ``json`` instead of ``jsonb``.
  Each figure is the median of three runs, in µs per row.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import statistics
import time
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import psycopg

from pgsink.engine import model
from pgsink.engine.capture import SESSION_OPTIONS, ReaderSettings, SourceReader
from pgsink.engine.decode import PgoutputDecoder, RowChange
from pgsink.engine.framing import XLogData, parse_copy_data, xlog_payload
from pgsink.engine.embedded import EmbeddedPostgres
from pgsink.engine.ingest import IngestBuffer, Position
from pgsink.engine.replication import ReplicationStream
from pgsink.engine.values import TypeRegistry
from pgsink.engine.worker import tune_gc

from .common import INSERT_ROWS, capture_database, save
from .ingest import _write_workload

PASSES = 5
FLUSH_CHANGES = ReaderSettings.flush_changes

CHANGES_COLUMNS = ("(source_id, commit_lsn, commit_idx, xid, committed_at, source_table_oid, source_table_schema,"
                   " source_table_name, action, record_pk, record, changes, transaction_annotations)")
MESSAGES_COLUMNS = "(sink_id, lane, group_key, action, commit_lsn, commit_idx, committed_at)"
CHANGES_ROWS = """
copy (select %s::uuid, (1000000 + r.id * 10)::int8, 0, (1000 + r.id)::int8, now(), 'benchmark_records'::regclass::oid,
             'public'::text, 'benchmark_records'::text, 'insert'::text, r.id::text, to_jsonb(r), null::jsonb, null::jsonb
      from benchmark_records r) to stdout"""
MESSAGES_ROWS = """
copy (select %s::uuid, (hashtext(r.id::text) & 63)::int2, 'public.benchmark_records:' || r.id, 'insert'::text,
             (1000000 + r.id * 10)::int8, 0, now()
      from benchmark_records r) to stdout"""
# (target table, data) per variant; the plain tables are made in _copy_costs. Capture writes binary rows.
COPY_VARIANTS = {
    "pgsink.changes, binary (as capture writes it)": ("pgsink.changes", "changes binary"),
    "pgsink.changes (partitioned, primary key + changes_row index, jsonb)": ("pgsink.changes", "changes"),
    "plain table like pgsink.changes, primary key only": ("pk_changes", "changes"),
    "plain table like pgsink.changes, no index": ("plain_changes", "changes"),
    "plain table like pgsink.changes, no index, json instead of jsonb": ("json_changes", "changes"),
    "pgsink.messages (partitioned, primary key, id from the sequence)": ("pgsink.messages", "messages"),
    "pgsink.messages, binary (as capture writes it)": ("pgsink.messages", "messages binary"),
}


def _setup(pg: EmbeddedPostgres, changes: int) -> tuple[str, UUID, UUID, int]:
    """A migrated database with a source, a sink, and a workload written after the slot was made."""
    dsn, source_id, sink_id = capture_database(pg, ("bench_slot",))
    with psycopg.connect(dsn, autocommit=True) as conn:
        _write_workload(conn, changes)
        end_lsn = conn.execute("select pg_current_wal_lsn() - '0/0'").fetchone()[0]  # type: ignore[index]
    return dsn, source_id, sink_id, end_lsn


async def _record_frames(source: model.Source, end_lsn: int) -> list[bytes]:
    stream = await ReplicationStream.open(
        source.dsn(options=SESSION_OPTIONS), source.slot_name, 0,
        {"proto_version": "1", "publication_names": source.publication_name, "messages": "true"}, "bench")
    frames: list[bytes] = []
    try:
        while True:
            raw = await stream.read(5.0)
            if raw is None:
                raise RuntimeError("the stream went quiet before the end of the workload")
            frames.append(raw)
            frame = parse_copy_data(raw)
            if frame.wal_end >= end_lsn and not isinstance(frame, XLogData):
                return frames
    finally:
        await stream.close()


async def _reader_costs(dsn: str, source_id: UUID, end_lsn: int) -> dict[str, Any]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as state:
        source = (await model.load_config(state)).sources[source_id]
        frames = await _record_frames(source, end_lsn)
        reader = SourceReader(dsn, source)
        await reader._reload_sinks(state)
        async with await psycopg.AsyncConnection.connect(source.dsn(), autocommit=True) as source_conn:
            types = TypeRegistry()

            async def replay(decode_only: bool) -> tuple[int, float, float]:
                """One pass over the frames, as the reader's loop handles them (minus the I/O);
                the count, CPU seconds, and the garbage collector's part of them."""
                decoder = PgoutputDecoder(types)
                buffer = IngestBuffer(source_id, Position(0, 0), 0)
                tx = None
                n = 0
                with gc_timer() as gc_seconds:
                    started = time.process_time()
                    for raw in frames:
                        payload = xlog_payload(raw)
                        if payload is None:
                            continue
                        for event in decoder.feed(payload):
                            if decode_only:
                                n += type(event) is RowChange
                            elif type(event) is RowChange and tx is not None and not event.unchanged_toast:
                                reader._on_row(event, tx, buffer)
                            else:
                                tx = await reader._on_event(event, tx, buffer, source_conn, types, state)
                        if len(buffer.changes) >= FLUSH_CHANGES:
                            n += _copy_text(buffer)
                    n += _copy_text(buffer)
                    cpu = time.process_time() - started
                return n, cpu, gc_seconds[0]

            await replay(False)  # loads the types
            tune_gc(reader_only=True)  # the replay is the reader's work alone
            result: dict[str, Any] = {"frames": len(frames)}
            for name, decode_only in (("decode", True), ("reader", False)):
                best = min([await replay(decode_only) for _ in range(PASSES)], key=lambda r: r[1])
                result[f"{name}_us_per_change"] = round(best[1] * 1e6 / best[0], 1)
                result[f"{name}_gc_us_per_change"] = round(best[2] * 1e6 / best[0], 2)
            gc.unfreeze()
            return result


@contextlib.contextmanager
def gc_timer() -> Iterator[list[float]]:
    """Seconds the garbage collector ran inside the block (in the list it yields, at exit)."""
    total = [0.0]
    started = [0.0]

    def track(phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            total[0] += time.perf_counter() - started[0]

    gc.callbacks.append(track)
    try:
        yield total
    finally:
        gc.callbacks.remove(track)


def _copy_text(buffer: IngestBuffer) -> int:
    """What a flush takes: both COPY data of the buffered changes (the reader builds them as it goes)."""
    return len(buffer.detach().changes)


def _copy_costs(dsn: str, source_id: UUID, sink_id: UUID, rows: int) -> dict[str, float]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("truncate benchmark_records")
        conn.execute(INSERT_ROWS, (rows,))
        conn.execute("select pgsink.ensure_partitions(now(), now(), 0, %s)", (rows * 4,))
        conn.execute("create table plain_changes (like pgsink.changes including defaults)")
        conn.execute("create table pk_changes (like pgsink.changes including defaults)")
        conn.execute("alter table pk_changes add primary key (committed_at, source_id, commit_lsn, commit_idx)")
        conn.execute("create table json_changes (like pgsink.changes including defaults)")
        conn.execute("alter table json_changes alter record type json, alter changes type json,"
                     " alter transaction_annotations type json")
        data = {"changes": _dump(conn, CHANGES_ROWS, source_id), "messages": _dump(conn, MESSAGES_ROWS, sink_id),
                "changes binary": _dump(conn, CHANGES_ROWS, source_id, binary=True),
                "messages binary": _dump(conn, MESSAGES_ROWS, sink_id, binary=True)}
        costs: dict[str, list[float]] = {name: [] for name in COPY_VARIANTS}
        for _ in range(3):
            for name, (table, kind) in COPY_VARIANTS.items():
                columns = CHANGES_COLUMNS if kind.startswith("changes") else MESSAGES_COLUMNS
                options = " with (format binary)" if kind.endswith("binary") else ""
                started = time.perf_counter()
                with conn.transaction(), conn.cursor().copy(f"copy {table} {columns} from stdin{options}") as copy:
                    copy.write(data[kind])
                costs[name].append((time.perf_counter() - started) * 1e6 / rows)
                conn.execute(f"truncate {table}")
    return {name: round(statistics.median(v), 1) for name, v in costs.items()}


def _dump(conn: psycopg.Connection, query: str, param: UUID, binary: bool = False) -> bytes:
    out = bytearray()
    with conn.cursor().copy(query + (" with (format binary)" if binary else ""), (param,)) as copy:
        for chunk in copy:
            out += chunk
    return bytes(out)


def run(changes: int) -> dict[str, Any]:
    with EmbeddedPostgres(for_tests=False) as pg:
        dsn, source_id, sink_id, end_lsn = _setup(pg, changes)
        reader = asyncio.run(_reader_costs(dsn, source_id, end_lsn))
        copy = _copy_costs(dsn, source_id, sink_id, changes)
    return {"changes": changes, "reader": reader, "copy_us_per_row": copy}


def main(changes: int) -> None:
    result = run(changes)
    path = save("costs", result)
    r = result["reader"]
    print(f"reader replay: decode {r['decode_us_per_change']} us/change, decode + route + COPY rows "
          f"{r['reader_us_per_change']} us/change, of it garbage collection {r['reader_gc_us_per_change']} us/change "
          f"({r['frames']} frames)")
    for name, us in result["copy_us_per_row"].items():
        print(f"COPY {name}: {us} us/row")
    print(f"-> {path}")
