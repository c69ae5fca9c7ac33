"""End-to-end benchmark: source writes -> pgsink (reader + delivery) -> local receiver.

A load generator writes a mixed insert/update/delete workload on Sequin's
benchmark_records shape as fast as it can (or at --rate), while `pgsink worker`
and a receiver run as their own processes, all on this machine. Reports
sustained changes/s (first change committed -> last received), the rate over
the first and last 10% of messages by receipt (decay check), and commit ->
receipt latency p50/p99.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Any

import orjson
import psycopg

from pgsink.engine.embedded import free_port

from .common import BENCHMARK_TABLE, bench_postgres, cpu_seconds, postgres_cpu, save, top_statements

CONFIG = """
databases:
  - name: bench
    hostname: 127.0.0.1
    port: {port}
    database: postgres
    username: postgres
    slot: {{name: bench_slot, create_if_not_exists: true}}
    publication: {{name: bench_pub, create_if_not_exists: true, init_sql: "create publication bench_pub for table benchmark_records"}}
http_endpoints:
  - name: receiver
    url: http://127.0.0.1:{receiver_port}
sinks:
  - name: bench
    database: bench
    source: {{include_tables: [public.benchmark_records]}}
    batch_size: {batch_size}
    destination: {{type: webhook, http_endpoint: receiver, http_endpoint_path: /hook}}
{extra}"""

# Sink functions measured against the plain run (every change passes the filter).
VARIANTS = {
    "plain": "",
    "sql-filter": '    filter: {{sql: "action = \'delete\' or (numeric_field >= 0 and string_field is not null)"}}\n',
    "python-transform": "    transform: {{python: \"{transform_file}\"}}\n",
    "lanes64": "    lane_count: 64\n",  # the default before migration 0004
    "lanes8": "    lane_count: 8\n",
}

TRANSFORM = '''
def transform(action, record, changes, metadata):
    return {"id": record["id"], "action": action, "amount": record.get("numeric_field"),
            "at": metadata["commit_timestamp"]}
'''

TX_SCALE = 10  # per transaction: 60*TX_SCALE inserts, 30*TX_SCALE updates, 10*TX_SCALE deletes


def _load(dsn: str, changes: int, rate: float | None) -> float:
    """Write the workload; returns when the last transaction committed."""
    rng = random.Random(7)
    live: list[int] = []
    done = 0
    start = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        while done < changes:
            with conn.transaction():
                ids = [r[0] for r in conn.execute(
                    "insert into benchmark_records (string_field, numeric_field, timestamp_field, list_field, map_field)"
                    " select md5(random()::text), round((random() * 1000)::numeric, 2), now(), array['a', 'b'],"
                    " jsonb_build_object('k', g) from generate_series(1, %s) g returning id", (60 * TX_SCALE,)).fetchall()]
                live.extend(ids)
                upd = rng.sample(live, min(30 * TX_SCALE, len(live)))
                conn.execute("update benchmark_records set numeric_field = numeric_field + 1, string_field = 'u'"
                             " where id = any(%s)", (upd,))
                gone = [_take_random(live, rng) for _ in range(min(10 * TX_SCALE, len(live)))]
                conn.execute("delete from benchmark_records where id = any(%s)", (gone,))
            done += len(ids) + len(upd) + len(gone)
            if rate:
                ahead = done / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
    return time.time()


def _take_random(items: list[int], rng: random.Random) -> int:
    """Remove and return a random item in O(1) (shuffling the whole list made long runs quadratic)."""
    i = rng.randrange(len(items))
    items[i], items[-1] = items[-1], items[i]
    return items.pop()


def _stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=30) as r:
        return orjson.loads(r.read())


def run(changes: int, batch_size: int, rate: float | None = None,
        roles: tuple[str, ...] = ("reader", "delivery"), variant: str = "plain") -> dict[str, Any]:
    with bench_postgres() as pg:
        dsn = pg.dsn()
        env = {**os.environ, "PGSINK_DATABASE_URL": dsn}
        env.setdefault("PGSINK_SECRET_KEY", "A" * 43 + "=")
        subprocess.run([sys.executable, "-m", "pgsink.cli", "migrate"], env=env, check=True, capture_output=True)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(BENCHMARK_TABLE)
        rport = free_port()
        receiver = subprocess.Popen([sys.executable, "-m", "benchmarks.receiver", str(rport)])
        workers: list[subprocess.Popen[bytes]] = []
        try:
            cfg = f"/tmp/pgsink-bench-{os.getpid()}.yaml"
            transform_file = f"/tmp/pgsink-bench-transform-{os.getpid()}.py"
            with open(transform_file, "w") as f:
                f.write(TRANSFORM)
            extra = VARIANTS[variant].format(transform_file=transform_file)
            with open(cfg, "w") as f:
                f.write(CONFIG.format(port=pg.port, receiver_port=rport, batch_size=batch_size, extra=extra))
            subprocess.run([sys.executable, "-m", "pgsink.cli", "config", "apply", cfg], env=env, check=True,
                           capture_output=True)
            # one process per role, as a deployment would scale it: each gets a core of its own
            workers = [subprocess.Popen([sys.executable, "-m", "pgsink.cli", "worker", "--role", role], env=env,
                                        stderr=subprocess.DEVNULL) for role in roles]
            postgres0 = postgres_cpu(pg)
            t0 = time.time()
            last_commit = _load(dsn, changes, rate)
            total = changes  # every change of the table goes to the sink
            deadline = time.time() + max(600, changes / 500)
            while True:
                st = _stats(rport)
                if st["count"] >= total or time.time() > deadline:
                    break
                time.sleep(1)
            cpu = {role: round(cpu_seconds(w.pid), 1) for role, w in zip(roles, workers, strict=True)}
            cpu["receiver"] = round(cpu_seconds(receiver.pid), 1)
            postgres = postgres_cpu(pg, postgres0)
            statements = top_statements(pg)
        finally:
            for w in workers:
                w.terminate()
                w.wait(60)
            receiver.terminate()
            receiver.wait(30)
    arrivals = sorted(st["arrivals"])
    n = len(arrivals)
    tenth = max(n // 10, 1)
    first = tenth / max(arrivals[tenth - 1] - arrivals[0], 1e-9)
    last = tenth / max(arrivals[-1] - arrivals[-tenth], 1e-9)
    lat = sorted(st["latencies"])
    return {
        "variant": variant, "changes_written": changes, "received": n, "batch_size": batch_size,
        "worker_processes": list(roles),
        "load_s": round(last_commit - t0, 2), "end_to_end_s": round(arrivals[-1] - t0, 2),
        "changes_per_s": round(n / (arrivals[-1] - t0)),
        "first_10pct_per_s": round(first), "last_10pct_per_s": round(last),
        "last_over_first": round(last / first, 2),
        "latency_p50_ms": round(statistics.median(lat) * 1000, 1),
        "latency_p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 1),
        "postgres_cpu_s": postgres,
        "top_statements": statements,
        "cpu_s": cpu,  # per process over the whole run; the machine has os.cpu_count() cores
    }


def main(changes: int, batch_sizes: list[int], rate: float | None, variants: list[str]) -> None:
    for variant in variants:
        for b in batch_sizes:
            r = run(changes if b >= 10 else min(changes, 20_000), b, rate, variant=variant)
            path = save(f"e2e-{variant}-batch{b}", r)
            print(orjson.dumps(r).decode(), "->", path)
