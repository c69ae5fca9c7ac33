"""Ingest benchmark: pgsink's reader vs pg_recvlogical on the same WAL, same run.

Writes a workload of N changes (inserts, then updates of the same rows) on
Sequin's benchmark_records shape, then reads the same WAL range from four
slots created at the same point: three times with `pg_recvlogical` (raw server
decode rate, output to /dev/null; once before the reader, twice after; the
median is the ratio's denominator) and once with `pgsink worker --role reader`
(decode, retention log + one sink's queue, checkpoint, ack). Also samples the
reader's RSS.

The reader's rate is its steady rate: from its first write to the state
database to the ack of the last change, over the changes written in that time
(Python start-up, ~1-2 s, is not ingest). The rate including start-up is
recorded too.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Any

import psycopg

from pgsink.engine.embedded import EmbeddedPostgres, find_bindir

from .common import (INSERT_ROWS, capture_database, cpu_seconds, machine_cpu, machine_cpu_since, postgres_cpu, rss_mb,
                     save)

TX_ROWS = 1000


def _write_workload(conn: psycopg.Connection, changes: int) -> None:
    inserts = changes // 2
    for start in range(0, inserts, TX_ROWS * 10):
        conn.execute(INSERT_ROWS, (min(TX_ROWS * 10, inserts - start),))
    updates = changes - inserts
    for start in range(1, updates + 1, TX_ROWS):
        conn.execute("update benchmark_records set numeric_field = numeric_field + 1, string_field = 'u'"
                     " where id between %s and %s", (start, min(start + TX_ROWS - 1, updates)))


RECV_SLOTS = ("recv_1", "recv_2", "recv_3")


def run(changes: int = 200_000) -> dict[str, Any]:
    with EmbeddedPostgres(for_tests=False) as pg:
        dsn, _, _ = capture_database(pg, ("pgsink_slot", *RECV_SLOTS))
        with psycopg.connect(dsn, autocommit=True) as conn:
            t = time.monotonic()
            _write_workload(conn, changes)
            write_s = time.monotonic() - t
            end_lsn = conn.execute("select pg_current_wal_lsn()::text").fetchone()[0]
            end_int = conn.execute("select pg_current_wal_lsn() - '0/0'").fetchone()[0]

        # pg_recvlogical once before the reader and twice after it: on this shared machine one
        # 2-3 s run can be off by a third, so the ratio's denominator is the median of the three
        rates = [_pg_recvlogical(dsn, RECV_SLOTS[0], end_lsn, changes)]
        reader = _pgsink_reader(pg, dsn, end_int, changes)
        rates += [_pg_recvlogical(dsn, slot, end_lsn, changes) for slot in RECV_SLOTS[1:]]
        recv = {"changes_per_s": round(statistics.median(rates)), "runs_changes_per_s": [round(r) for r in rates]}
        ratio = reader["changes_per_s"] / recv["changes_per_s"]
        return {"changes": changes, "write_s": round(write_s, 2), "pg_recvlogical": recv, "pgsink": reader,
                "ratio": round(ratio, 3)}


def _pg_recvlogical(dsn: str, slot: str, end_lsn: str, changes: int) -> float:
    """The raw server decode rate: pg_recvlogical from ``slot`` to /dev/null, in changes/s."""
    t = time.monotonic()
    subprocess.run([str(find_bindir() / "pg_recvlogical"), "-d", dsn, "--slot", slot, "--start",
                    "-o", "proto_version=1", "-o", "publication_names=bench_pub", "-f", "/dev/null",
                    "-E", end_lsn, "--no-loop"], check=True, capture_output=True)
    return changes / (time.monotonic() - t)


QUERY_PROGRESS = "select ack_lsn, exists (select from pgsink.changes) from pgsink.source_checkpoints"


def _pgsink_reader(pg: EmbeddedPostgres, dsn: str, end_lsn: int, changes: int) -> dict[str, Any]:
    """Runs the reader over the WAL; the steady rate is from its first write to the last ack.

    Polls cheaply (``exists``, not ``count(*)``, which scanned the whole retention log every
    50 ms and took CPU from the state backend being measured).
    """
    env = {**os.environ, "PGSINK_DATABASE_URL": dsn}
    env.setdefault("PGSINK_SECRET_KEY", "A" * 43 + "=")
    t = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pgsink.cli", "worker", "--role", "reader"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0.0
    first: tuple[float, int, float, dict[str, float], dict[str, float]] | None = None
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while True:
                peak = max(peak, rss_mb(proc.pid))
                row = conn.execute(QUERY_PROGRESS).fetchone()
                if row and row[1] and first is None:  # start-up (imports, connections) is not per-change work
                    n_first = conn.execute("select count(*) from pgsink.changes").fetchone()[0]  # type: ignore[index]
                    first = (time.monotonic(), n_first, cpu_seconds(proc.pid), postgres_cpu(pg), machine_cpu())
                if row and row[0] >= end_lsn:
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"reader exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
                time.sleep(0.05)
            t_end = time.monotonic()
            assert first is not None
            t_first, n_first, cpu_first, pg_first, machine_first = first
            cpu = cpu_seconds(proc.pid) - cpu_first
            server = postgres_cpu(pg, pg_first)
            machine_s = machine_cpu_since(machine_first)
            n = conn.execute("select count(*) from pgsink.changes").fetchone()[0]  # type: ignore[index]
            m = conn.execute("select count(*) from pgsink.messages").fetchone()[0]  # type: ignore[index]
    finally:
        proc.terminate()
        proc.wait(30)
    assert n == changes and m == changes, (n, m, changes)
    steady = changes - n_first
    return {"seconds": round(t_end - t, 3), "changes_per_s_with_start_up": round(changes / (t_end - t)),
            "steady_s": round(t_end - t_first, 3), "changes_per_s": round(steady / (t_end - t_first)),
            "peak_rss_mb": round(peak, 1), "reader_cpu_us_per_change": round(cpu * 1e6 / steady, 1),
            "postgres_cpu_s": server, "machine_cpu_s": machine_s}


def main(changes: int = 200_000) -> None:
    result = run(changes)
    recv = result["pg_recvlogical"]
    path = save("ingest", result)
    print(f"changes={changes} pg_recvlogical={recv['changes_per_s']}/s pgsink={result['pgsink']['changes_per_s']}/s "
          f"ratio={result['ratio']} peak_rss={result['pgsink']['peak_rss_mb']}MB "
          f"reader_cpu={result['pgsink']['reader_cpu_us_per_change']}us/change -> {path}")
