"""Backfill benchmark: a 1M-row table read and delivered while capture runs alongside.

benchmark_records is filled with N rows, then a sink (batch size 100) gets a
full backfill while a load generator keeps writing live changes (which the
reader captures and delivery sends too). Workers run one process per role
(reader, delivery, backfill). Reports `read` rows delivered per second (start
of the backfill -> last read received) and the live changes delivered meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

import orjson
import psycopg

from pgsink.engine import backfill
from pgsink.engine.embedded import free_port

from .common import (BENCHMARK_TABLE, INSERT_ROWS, bench_postgres, cpu_seconds, machine_cpu, machine_cpu_since,
                     peak_rss_mb, postgres_cpu, save, top_statements)
from .e2e import CONFIG


QUERY_DONE = "select bool_and(state = 'completed') from pgsink.backfills"
QUERY_READS = "select count(*) from pgsink.messages where action = 'read'"
QUERY_BACKFILL_LISTENING = """
select count(*) > 0 from pg_stat_activity where application_name = 'pgsink backfill' and query like 'listen %'
"""


def _live_load(dsn: str, stop: threading.Event, rate: float, rows: int) -> int:
    """Updates of random existing rows at about `rate` changes/s until stopped."""
    done = 0
    rng = random.Random(3)
    if rate <= 0:
        return 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        start = time.monotonic()
        while not stop.is_set():
            conn.execute("update benchmark_records set string_field = 'live' where id = %s", (rng.randint(1, rows),))
            done += 1
            ahead = done / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
    return done


def _reads_received(port: int) -> tuple[int, int, list[float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=30) as r:
        st = orjson.loads(r.read())
    return st["count"], st.get("reads", 0), st.get("read_arrivals", [])


def _wait_until_up(dsn: str, port: int, live: bool) -> None:
    """Until the workers run (reader and delivery pass live changes, the backfill stage listens):
    the rate is of the backfill, not of starting processes."""
    deadline = time.time() + 120
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not (conn.execute(QUERY_BACKFILL_LISTENING).fetchone()[0]  # type: ignore[index]
                   and (not live or _reads_received(port)[0] > 0)):
            if time.time() > deadline:
                raise RuntimeError("the workers did not start within 120 s")
            time.sleep(0.2)


def run(rows: int, live_rate: float) -> dict[str, Any]:
    with bench_postgres() as pg:
        dsn = pg.dsn()
        env = {**os.environ, "PGSINK_DATABASE_URL": dsn}
        env.setdefault("PGSINK_SECRET_KEY", "A" * 43 + "=")
        subprocess.run([sys.executable, "-m", "pgsink.cli", "migrate"], env=env, check=True, capture_output=True)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(BENCHMARK_TABLE)
            for _ in range(0, rows, 100_000):
                conn.execute(INSERT_ROWS, (min(100_000, rows),))
            conn.execute("analyze benchmark_records")
        rport = free_port()
        receiver = subprocess.Popen([sys.executable, "-m", "benchmarks.receiver", str(rport)])
        workers: list[subprocess.Popen[bytes]] = []
        stop = threading.Event()
        live = {"n": 0}
        try:
            cfg = f"/tmp/pgsink-bench-{os.getpid()}.yaml"
            with open(cfg, "w") as f:
                f.write(CONFIG.format(port=pg.port, receiver_port=rport, batch_size=100, extra=""))
            subprocess.run([sys.executable, "-m", "pgsink.cli", "config", "apply", cfg], env=env, check=True,
                           capture_output=True)
            log_path = f"/tmp/pgsink-bench-backfill-{os.getpid()}.log"
            backfill_log = open(log_path, "w")  # noqa: SIM115 - closed in finally
            workers = [subprocess.Popen([sys.executable, "-m", "pgsink.cli", "worker", "--role", role], env=env,
                                        stderr=backfill_log if role == "backfill" else subprocess.DEVNULL)
                       for role in ("reader", "delivery", "backfill")]
            loader = threading.Thread(target=lambda: live.__setitem__("n", _live_load(dsn, stop, live_rate, rows)))
            loader.start()
            _wait_until_up(dsn, rport, live_rate > 0)
            postgres0 = postgres_cpu(pg)
            t0 = time.time()
            machine0 = machine_cpu()
            asyncio.run(backfill.start(dsn, "bench", "public.benchmark_records", max_page_ms=5000))
            deadline = time.time() + 1800
            peak_rss = 0.0
            enqueued = rows
            with psycopg.connect(dsn, autocommit=True) as conn:
                while True:
                    _, reads, arrivals = _reads_received(rport)
                    peak_rss = max(peak_rss, peak_rss_mb(workers[2].pid))
                    if reads >= rows or time.time() > deadline:
                        break
                    # a row updated while its page was in flight gets no read (its newer change
                    # carries the newer state: invariant 5), so count the reads enqueued once done
                    if conn.execute(QUERY_DONE).fetchone()[0]:  # type: ignore[index]
                        enqueued = conn.execute(QUERY_READS).fetchone()[0]  # type: ignore[index]
                        if reads >= enqueued:
                            break
                    time.sleep(1)
            stop.set()
            loader.join()
            cpu = {role: round(cpu_seconds(w.pid), 1)
                   for role, w in zip(("reader", "delivery", "backfill"), workers, strict=True)}
            cpu["receiver"] = round(cpu_seconds(receiver.pid), 1)
            postgres = postgres_cpu(pg, postgres0)
            machine_s = machine_cpu_since(machine0)
            statements = top_statements(pg)
            with psycopg.connect(dsn, autocommit=True) as conn:
                slowest = conn.execute("select max(max_page_ms) from pgsink.backfills").fetchone()[0]  # type: ignore[index]
        finally:
            stop.set()
            for w in workers:
                w.terminate()
                w.wait(60)
            if workers:
                backfill_log.close()
            receiver.terminate()
            receiver.wait(30)
    log_text = open(log_path).read()
    over_limit = log_text.count("page over its time limit")
    arrivals = sorted(arrivals)
    last = arrivals[-1] if arrivals else t0
    tenth = max(len(arrivals) // 10, 1)
    deciles = {"first_10pct_per_s": round(tenth / max(arrivals[tenth - 1] - t0, 1e-9)),
               "last_10pct_per_s": round(tenth / max(last - arrivals[-tenth], 1e-9)),
               "reads_per_5s": [sum(1 for a in arrivals if t0 + i <= a < t0 + i + 5)
                                for i in range(0, int(last - t0) + 1, 5)]} if arrivals else {}
    return {"rows": rows, "reads_received": reads, "reads_superseded_by_live_changes": rows - enqueued, "live_changes_written": live["n"],
            "live_rate_target": live_rate, "seconds": round(last - t0, 2),
            "rows_per_s": round(reads / max(last - t0, 1e-9)), **deciles,
            "max_page_ms_setting": slowest,
            "pages_over_time_limit": over_limit, "backfill_worker_peak_rss_mb": round(peak_rss, 1),
            "worker_processes": ["reader", "delivery", "backfill"], "batch_size": 100, "cpu_s": cpu,
            "postgres_cpu_s": postgres, "machine_cpu_s": machine_s,
            "top_statements": statements}


def main(rows: int, live_rate: float) -> None:
    r = run(rows, live_rate)
    print(orjson.dumps(r).decode(), "->", save("backfill", r))
