"""The product as a user runs it: `pgsink config apply`, `pgsink worker`, `pgsink demo`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.helpers import wait_for
from tests.receiver import Receiver

ROOT = Path(__file__).parents[2]

CONFIG = """
databases:
  - name: app
    hostname: 127.0.0.1
    port: {port}
    database: {db}
    username: postgres
    slot: {{name: e2e_slot, create_if_not_exists: true}}
    publication: {{name: e2e_pub, create_if_not_exists: true}}
http_endpoints:
  - name: hook
    url: {url}
sinks:
  - name: orders
    database: app
    source: {{include_tables: [public.orders]}}
    batch_size: 5
    destination: {{type: webhook, http_endpoint: hook, http_endpoint_path: /orders}}
"""


def pgsink(*args: str, dsn: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgsink.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PGSINK_DATABASE_URL": dsn}, timeout=120, **kw)  # type: ignore[call-overload]


async def test_apply_then_worker_delivers_in_order_and_stops_on_sigterm(
        aconn: psycopg.AsyncConnection, fresh_db: str, tmp_path: Path) -> None:
    await aconn.execute("create table orders (id int primary key, status text)")
    receiver = await Receiver(group_of=lambda m: str(m["record"]["id"])).start()
    params = conninfo_to_dict(fresh_db)
    (tmp_path / "pgsink.yaml").write_text(CONFIG.format(port=params["port"], db=params["dbname"], url=receiver.url))
    res = pgsink("config", "apply", str(tmp_path / "pgsink.yaml"), dsn=fresh_db)
    assert res.returncode == 0, res.stderr
    worker = subprocess.Popen([sys.executable, "-m", "pgsink.cli", "worker"], cwd=ROOT,
                              env={**os.environ, "PGSINK_DATABASE_URL": fresh_db},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for i in range(1, 21):
            await aconn.execute("insert into orders values (%s, 'new')", (i,))
        await aconn.execute("update orders set status = 'paid' where id <= 10")
        await aconn.execute("delete from orders where id > 15")
        await receiver.wait_until(lambda: len(receiver.delivered()) >= 35, timeout=60, what="35 changes")
        assert not receiver.overlap_violations  # never two requests in flight for a row
        last: dict[int, tuple[int, int]] = {}
        for m in receiver.delivered():  # per row, in commit order
            pos = (m["metadata"]["commit_lsn"], m["metadata"]["commit_idx"])
            assert pos > last.get(m["record"]["id"], (-1, -1)), m
            last[m["record"]["id"]] = pos
        assert {r.path for r in receiver.requests} == {"/orders"}
        actions = [m["action"] for m in receiver.delivered()]
        assert actions.count("insert") == 20 and actions.count("update") == 10 and actions.count("delete") == 5
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = await asyncio.get_running_loop().run_in_executor(None, lambda: worker.communicate(timeout=60))
        await receiver.close()
    assert worker.returncode == 0, err.decode()[-3000:]


def test_make_demo_runs_end_to_end() -> None:
    res = subprocess.run([sys.executable, "-m", "pgsink.cli", "demo"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all 7 changes arrived in order" in res.stdout
    assert "demo-secret" not in res.stdout + res.stderr  # the encrypted header is never printed


async def test_worker_runs_a_process_per_role_and_stops_all_if_one_dies(fresh_db: str) -> None:
    from tests.helpers import wait_for

    worker = subprocess.Popen([sys.executable, "-m", "pgsink.cli", "worker"], cwd=ROOT,
                              env={**os.environ, "PGSINK_DATABASE_URL": fresh_db},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def children() -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(worker.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    async def four() -> list[int]:
        kids = children()
        return kids if len(kids) == 4 else []

    try:
        kids = await wait_for(four, timeout=30, what="one child process per role")
        os.kill(kids[0], signal.SIGKILL)
        _, err = await asyncio.get_running_loop().run_in_executor(None, lambda: worker.communicate(timeout=60))
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode != 0
    assert "stopping the others" in err.decode()
    assert not any(Path(f"/proc/{k}").exists() for k in kids[1:])  # the others were stopped and reaped


def _processes_with(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (a worker's children inherit it, orphaned or not)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: the worker runs its roles in one process")
async def test_sigterm_while_the_role_processes_start_is_a_clean_stop(fresh_db: str) -> None:
    """A stop asked for while the supervisor is still spawning its per-role children, and they are
    still importing (no handler of their own yet), is a clean stop: exit 0, and no child left."""
    marker = f"PGSINK_TEST_MARKER={uuid.uuid4()}"
    worker = subprocess.Popen([sys.executable, "-m", "pgsink.cli", "worker"], cwd=ROOT,
                              env={**os.environ, "PGSINK_DATABASE_URL": fresh_db, "PGSINK_TEST_MARKER": marker},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async def a_child_started() -> bool:
            return any(pid != worker.pid for pid in _processes_with(marker))

        await wait_for(a_child_started, timeout=30, interval=0.002, what="the first role process")
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            _, err = await asyncio.get_running_loop().run_in_executor(None, lambda: worker.communicate(timeout=60))
        finally:
            left = _processes_with(marker)
            for pid in left:  # a failure must not leave workers running into the next tests
                os.kill(pid, signal.SIGKILL)
            if worker.poll() is None:
                worker.wait()
    assert worker.returncode == 0, err.decode()[-3000:]
    assert left == []
