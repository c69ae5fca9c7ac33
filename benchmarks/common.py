"""Shared benchmark plumbing: the workload table, machine facts, result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg

from pgsink.engine.embedded import EmbeddedPostgres

RUNS_DIR = Path(__file__).parent / "runs"

# The shape of Sequin's benchmark table.
BENCHMARK_TABLE = """
create table if not exists benchmark_records (
    id              serial primary key,
    string_field    text,
    numeric_field   numeric,
    timestamp_field timestamptz,
    list_field      text[],
    map_field       jsonb,
    inserted_at     timestamp default now()
)
"""

INSERT_ROWS = """
insert into benchmark_records (string_field, numeric_field, timestamp_field, list_field, map_field)
select md5(g::text), (g %% 1000) / 7.0, now(), array['a', md5(g::text)], jsonb_build_object('n', g, 'tag', 'x')
from generate_series(1, %s) g
"""


def machine() -> dict[str, Any]:
    mem = ""
    try:
        mem = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
    except (OSError, StopIteration):
        pass
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "mem": mem.split(":", 1)[-1].strip()}


def git_ref() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save(name: str, result: dict[str, Any]) -> Path:
    RUNS_DIR.mkdir(exist_ok=True)
    out = RUNS_DIR / f"{time.strftime('%Y%m%dT%H%M%S')}-{name}.json"
    out.write_text(json.dumps({"benchmark": name, "git": git_ref(), "machine": machine(), **result}, indent=2,
                              default=str))
    return out


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a live process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used (steadier than wall time on a shared box)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> dict[str, float]:
    """Machine-wide CPU seconds so far (all cores): busy, idle, and stolen by the hypervisor.
    Steal that grows during a run means a neighbour had the host's cores, and rates drop."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return {"busy": (user + nice + system + irq + softirq) / tick, "idle": (idle + iowait) / tick,
            "steal": steal / tick}


def machine_cpu_since(start: dict[str, float]) -> dict[str, float]:
    now = machine_cpu()
    return {k: round(now[k] - start[k], 1) for k in now}


def _proc_cpu(pid: int, *, children: bool = False) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


QUERY_BACKENDS = """
select pid, coalesce(nullif(application_name, ''), backend_type) from pg_stat_activity where pid <> pg_backend_pid()
"""


def postgres_cpu(pg: EmbeddedPostgres, since: dict[str, float] | None = None) -> dict[str, float]:
    """CPU seconds of the server's processes, by application_name (PGAPPNAME of the pgsink role)
    or backend type; "exited" is what finished backends and autovacuum used. With ``since`` (an
    earlier reading), only what was used after it: the set-up's inserts are left out."""
    postmaster = int((pg.datadir / "postmaster.pid").read_text().split()[0])
    out: dict[str, float] = {"exited": _proc_cpu(postmaster, children=True) - _proc_cpu(postmaster)}
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        for pid, name in conn.execute(QUERY_BACKENDS).fetchall():
            try:
                out[name] = out.get(name, 0.0) + _proc_cpu(pid)
            except FileNotFoundError:
                continue
    if since is not None:
        out = {k: v - since.get(k, 0.0) for k, v in out.items()}
    return {k: round(v, 1) for k, v in sorted(out.items()) if round(v, 1)}


STATEMENTS_ENV = "PGSINK_BENCH_STATEMENTS"  # set to 1: record the top statements (pg_stat_statements)

QUERY_TOP_STATEMENTS = """
select round(total_exec_time)::bigint as ms, calls, rows, left(regexp_replace(query, '\\s+', ' ', 'g'), 160)
from pg_stat_statements order by total_exec_time desc limit 12
"""


def bench_postgres() -> EmbeddedPostgres:
    """The benchmarks' server; with PGSINK_BENCH_STATEMENTS=1 it also tracks statements."""
    if not os.environ.get(STATEMENTS_ENV):
        return EmbeddedPostgres(for_tests=False)
    return EmbeddedPostgres(for_tests=False, settings={"shared_preload_libraries": "pg_stat_statements,auto_explain",
                                                       "auto_explain.log_min_duration": "30",
                                                       "pg_stat_statements.track": "all"})


def top_statements(pg: EmbeddedPostgres, dbname: str = "postgres") -> list[list[Any]] | None:
    """Statements by total execution time (ms, calls, rows, text), when tracked."""
    if not os.environ.get(STATEMENTS_ENV):
        return None
    with psycopg.connect(pg.dsn(dbname), autocommit=True) as conn:
        conn.execute("create extension if not exists pg_stat_statements")
        return [list(r) for r in conn.execute(QUERY_TOP_STATEMENTS).fetchall()]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def capture_database(pg: EmbeddedPostgres, slots: tuple[str, ...]) -> tuple[str, UUID, UUID]:
    """Database "bench", migrated, with benchmark_records published, the slots made (the first
    one pgsink's), and a source plus a paused sink; returns (dsn, source id, sink id)."""
    dsn = pg.dsn("bench")
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("create database bench")
    subprocess.run([sys.executable, "-m", "pgsink.cli", "migrate", "--database-url", dsn], check=True,
                   capture_output=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(BENCHMARK_TABLE)
        conn.execute("create publication bench_pub for table benchmark_records")
        for slot in slots:
            conn.execute("select pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        source_id = conn.execute(
            "insert into pgsink.sources (name, hostname, port, database, username, slot_name, publication_name)"
            " values ('bench', '127.0.0.1', %s, 'bench', 'postgres', %s, 'bench_pub') returning id",
            (pg.port, slots[0])).fetchone()[0]  # type: ignore[index]
        endpoint = conn.execute("insert into pgsink.http_endpoints (name, url) values ('ep', 'http://127.0.0.1:9')"
                                " returning id").fetchone()[0]  # type: ignore[index]
        sink_id = conn.execute("insert into pgsink.sinks (name, source_id, http_endpoint_id, status) values"
                               " ('bench', %s, %s, 'paused') returning id",
                               (source_id, endpoint)).fetchone()[0]  # type: ignore[index]
    return dsn, source_id, sink_id
