"""Config apply/plan/export against the real state database (which is also the source here)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pgsink.engine import config as cfg
from pgsink.engine.errors import ConfigError, SourceError
from pgsink.engine.model import load_config

FIXTURE = (Path(__file__).parent.parent / "fixtures" / "sequin.yaml").read_text()
PASSWORD = "pw-" + uuid.uuid4().hex
TOKEN = "tok-" + uuid.uuid4().hex


@pytest.fixture
def env(fresh_db: str) -> dict[str, str]:
    """Environment for the fixture file, pointing it at this test's database, with its tables."""
    p = conninfo_to_dict(fresh_db)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("create table public.orders (id int primary key, total int)")
        conn.execute("create table public.order_items (id int primary key, order_id int)")
        conn.execute("create table public.users (id int primary key, email text)")
        conn.execute("alter table public.users replica identity full")
    return {
        "PGSINK_TEST_HOST": str(p.get("host", "127.0.0.1")), "PGSINK_TEST_PORT": str(p.get("port", 5432)),
        "PGSINK_TEST_DB": str(p["dbname"]), "PGSINK_TEST_USER": str(p.get("user", "postgres")),
        "PGSINK_TEST_DB_PASSWORD": PASSWORD, "PGSINK_TEST_API_TOKEN": TOKEN,
        "PGSINK_TEST_SLOT": f"sequin_slot_{uuid.uuid4().hex[:8]}",
    }


def desired(text: str, env: dict[str, str]) -> cfg.Desired:
    return cfg.parse_config(text, filename="sequin.yaml", env=env)


async def rows(conn: psycopg.AsyncConnection, query: str) -> list[tuple[Any, ...]]:
    cur = await conn.execute(query.encode())
    return await cur.fetchall()


async def config_counts(conn: psycopg.AsyncConnection) -> tuple[int, int, int, int]:
    [row] = await rows(conn, "select (select count(*) from pgsink.sources), (select count(*) from pgsink.http_endpoints),"
                             " (select count(*) from pgsink.sinks), (select count(*) from pgsink.lanes)")
    return row  # type: ignore[return-value]


def export_env(env: dict[str, str]) -> dict[str, str]:
    """The placeholders `export` writes for the fixture's secrets, set to the same secrets."""
    return {**env, "PGSINK_DB_PRODUCTION_DB_PASSWORD": PASSWORD,
            "PGSINK_ENDPOINT_WEBHOOK_ENDPOINT_AUTHORIZATION": f"Bearer {TOKEN}"}


async def test_apply_creates_rows_lanes_slot_publication_and_notifies(
        fresh_db: str, aconn: psycopg.AsyncConnection, env: dict[str, str]) -> None:
    await aconn.execute("listen pgsink_config")
    result = await cfg.apply_config(fresh_db, desired(FIXTURE, env))
    assert [c.title() for c in result.plan.changes] == [
        "+ create source production-db", "+ create endpoint webhook-endpoint",
        "+ create sink orders-to-webhook", "+ create sink users-audit"]
    assert any("public.order_items, public.orders" in w and "REPLICA IDENTITY FULL" in w for w in result.warnings)
    notes = [n async for n in aconn.notifies(timeout=10, stop_after=1)]
    assert [n.channel for n in notes] == ["pgsink_config"]

    assert await config_counts(aconn) == (1, 1, 2, 16 + 16)
    assert await rows(aconn, f"select plugin from pg_replication_slots where slot_name = '{env['PGSINK_TEST_SLOT']}'") == [("pgoutput",)]
    assert await rows(aconn, "select puballtables from pg_publication where pubname = 'sequin_pub'") == [(True,)]
    [(pw_blob, headers_blob)] = await rows(
        aconn, "select s.password_encrypted, e.encrypted_headers from pgsink.sources s, pgsink.http_endpoints e")
    assert PASSWORD.encode() not in bytes(pw_blob) and TOKEN.encode() not in bytes(headers_blob)

    config = await load_config(aconn)  # the lead's runtime view reads what we wrote
    source = config.source_named("production-db")
    assert source is not None and source.password == PASSWORD and source.retention_seconds == 3 * 86400
    [endpoint] = config.endpoints.values()
    assert endpoint.all_headers() == {"X-Source": "pgsink-tests", "Authorization": f"Bearer {TOKEN}"}
    orders = config.sink_named("orders-to-webhook")
    assert orders is not None and orders.matches_table("public", "orders") and not orders.matches_table("public", "users")
    assert orders.group_columns("public", "order_items") == ("order_id",) and orders.lane_count == 16
    audit = config.sink_named("users-audit")
    assert audit is not None and audit.status == "paused" and audit.actions == frozenset({"update", "delete"})
    assert audit.matches_table("public", "users") and not audit.matches_table("public", "orders")


async def test_export_then_apply_is_a_no_op(fresh_db: str, aconn: psycopg.AsyncConnection, env: dict[str, str]) -> None:
    await cfg.apply_config(fresh_db, desired(FIXTURE, env))
    before = await rows(aconn, "select name, updated_at from pgsink.sinks order by name")
    text = await cfg.export_config(fresh_db)
    assert PASSWORD not in text and TOKEN not in text
    assert '"${PGSINK_DB_PRODUCTION_DB_PASSWORD}"' in text
    exported = desired(text, export_env(env))
    assert (await cfg.plan_config(fresh_db, exported)).empty
    result = await cfg.apply_config(fresh_db, exported)
    assert result.plan.empty and result.plan.summary().startswith("No changes")
    assert await rows(aconn, "select name, updated_at from pgsink.sinks order by name") == before
    # and the original file is a no-op too
    assert (await cfg.plan_config(fresh_db, desired(FIXTURE, env))).empty


async def test_update_is_field_level_bumps_updated_at_and_notifies(
        fresh_db: str, aconn: psycopg.AsyncConnection, env: dict[str, str]) -> None:
    await cfg.apply_config(fresh_db, desired(FIXTURE, env))
    [(before,)] = await rows(aconn, "select updated_at from pgsink.sinks where name = 'users-audit'")
    changed = FIXTURE.replace("  batch_size: 10\n", "  batch_size: 25\n").replace("status: paused", "status: active")
    plan = await cfg.plan_config(fresh_db, desired(changed, env))
    assert plan.lines() == [
        "~ update sink orders-to-webhook", "    batch_size: 10 -> 25",
        "~ update sink users-audit", '    status: "paused" -> "active"', "    batch_size: 10 -> 25"]
    await aconn.execute("listen pgsink_config")
    await cfg.apply_config(fresh_db, desired(changed, env))
    assert [n.payload async for n in aconn.notifies(timeout=10, stop_after=1)] == ["apply"]
    [(after, status, batch_size)] = await rows(
        aconn, "select updated_at, status, batch_size from pgsink.sinks where name = 'users-audit'")
    assert after > before and (status, batch_size) == ("active", 25)
    plan = await cfg.plan_config(fresh_db, desired(changed, {**env, "PGSINK_TEST_API_TOKEN": "other"}))
    assert plan.lines() == ["~ update endpoint webhook-endpoint", "    encrypted_headers: Authorization (changed)"]


async def test_lane_count_change_is_refused(fresh_db: str, aconn: psycopg.AsyncConnection, env: dict[str, str]) -> None:
    await cfg.apply_config(fresh_db, desired(FIXTURE, env))
    with pytest.raises(ConfigError, match=r"lane_count cannot change \(16 -> 32\).*split groups across lanes"):
        await cfg.apply_config(fresh_db, desired(FIXTURE.replace("lane_count: 16", "lane_count: 32"), env))
    assert await config_counts(aconn) == (1, 1, 2, 16 + 16)


async def test_a_file_without_lane_count_keeps_an_existing_sinks_lanes(
        fresh_db: str, aconn: psycopg.AsyncConnection, env: dict[str, str]) -> None:
    # sinks made before the default went from 64 to 16 lanes must not be refused (or split) later
    await cfg.apply_config(fresh_db, desired(FIXTURE.replace("lane_count: 16", "lane_count: 64"), env))
    assert await config_counts(aconn) == (1, 1, 2, 64 + 16)
    result = await cfg.apply_config(fresh_db, desired(FIXTURE.replace("    lane_count: 16\n", ""), env))
    assert result.plan.changes == []
    assert await config_counts(aconn) == (1, 1, 2, 64 + 16)


async def test_a_failing_source_check_writes_nothing(fresh_db: str, aconn: psycopg.AsyncConnection,
                                                     env: dict[str, str]) -> None:
    broken = FIXTURE.replace('        - "public.order_items"\n', '        - "public.order_items"\n        - "public.missing"\n')
    with pytest.raises(SourceError, match=r"Table public.missing does not exist"):
        await cfg.apply_config(fresh_db, desired(broken, env))
    assert await config_counts(aconn) == (0, 0, 0, 0)
    # nor leaves the slot it made (it would keep WAL forever) or the publication
    assert await rows(aconn, f"select 1 from pg_replication_slots where slot_name = '{env['PGSINK_TEST_SLOT']}'") == []
    assert await rows(aconn, "select 1 from pg_publication where pubname = 'sequin_pub'") == []
    wrong_port = FIXTURE.replace("${PGSINK_TEST_PORT:-5432}", "1")
    with pytest.raises(SourceError, match=r"Source 'production-db': Cannot connect"):
        await cfg.apply_config(fresh_db, desired(wrong_port, env))
    assert await config_counts(aconn) == (0, 0, 0, 0)


async def test_missing_slot_is_an_error_without_create_if_not_exists(
        fresh_db: str, aconn: psycopg.AsyncConnection, env: dict[str, str]) -> None:
    no_create = FIXTURE.replace("create_if_not_exists: true", "create_if_not_exists: false")
    with pytest.raises(SourceError) as e:
        await cfg.apply_config(fresh_db, desired(no_create, env))
    assert "Replication slot" in str(e.value) and "Publication 'sequin_pub' does not exist" in str(e.value)
    assert await config_counts(aconn) == (0, 0, 0, 0)


async def test_removing_used_objects_is_refused_then_allowed(fresh_db: str, aconn: psycopg.AsyncConnection,
                                                             env: dict[str, str]) -> None:
    await cfg.apply_config(fresh_db, desired(FIXTURE, env))
    with pytest.raises(ConfigError, match=r"Cannot remove endpoint 'webhook-endpoint': sinks orders-to-webhook, users-audit use it"):
        await cfg.remove_endpoint(fresh_db, "webhook-endpoint")
    with pytest.raises(ConfigError, match=r"Cannot remove source 'production-db': sinks orders-to-webhook, users-audit"):
        await cfg.remove_source(fresh_db, "production-db")
    await cfg.remove_sink(fresh_db, "orders-to-webhook")
    assert await config_counts(aconn) == (1, 1, 1, 16)  # its lanes went with it
    with pytest.raises(ConfigError, match="There is no sink named 'orders-to-webhook'"):
        await cfg.remove_sink(fresh_db, "orders-to-webhook")
    # prune: only the source and endpoint stay in the file, so the remaining sink goes
    only = desired(FIXTURE.split("# A template")[0], env)
    plan = await cfg.plan_config(fresh_db, only, prune=True)
    assert [c.title() for c in plan.changes] == ["- delete sink users-audit"]
    await cfg.apply_config(fresh_db, only, prune=True)
    await cfg.remove_endpoint(fresh_db, "webhook-endpoint")
    removed = await cfg.remove_source(fresh_db, "production-db", drop_slot=True)
    assert removed.slot_name == env["PGSINK_TEST_SLOT"]
    assert await config_counts(aconn) == (0, 0, 0, 0)
    assert await rows(aconn, f"select 1 from pg_replication_slots where slot_name = '{removed.slot_name}'") == []


async def test_sink_status_and_create_only(fresh_db: str, aconn: psycopg.AsyncConnection, env: dict[str, str]) -> None:
    await cfg.apply_config(fresh_db, desired(FIXTURE, env))
    assert await cfg.set_sink_status(fresh_db, "orders-to-webhook", "paused")
    assert not await cfg.set_sink_status(fresh_db, "orders-to-webhook", "paused")
    assert await rows(aconn, "select status from pgsink.sinks where name = 'orders-to-webhook'") == [("paused",)]
    assert await cfg.set_sink_status(fresh_db, "orders-to-webhook", "active")
    d = desired(FIXTURE, env)
    with pytest.raises(ConfigError, match="source 'production-db' already exists"):
        await cfg.apply_config(fresh_db, cfg.Desired(sources=[
            cfg.SourceSpec(**{**d.sources[0].__dict__, "port": 1})]), create_only=True)


async def test_every_write_notifies(fresh_db: str, aconn: psycopg.AsyncConnection, env: dict[str, str]) -> None:
    await cfg.apply_config(fresh_db, desired(FIXTURE, env))
    await aconn.execute("listen pgsink_config")
    await cfg.set_sink_status(fresh_db, "users-audit", "active")
    await cfg.remove_sink(fresh_db, "users-audit")
    payloads = [n.payload async for n in aconn.notifies(timeout=10, stop_after=2)]
    assert payloads == ["sink active", "remove sink"]


async def test_concurrent_applies_write_once(fresh_db: str, aconn: psycopg.AsyncConnection, env: dict[str, str]) -> None:
    results = await asyncio.gather(*(cfg.apply_config(fresh_db, desired(FIXTURE, env)) for _ in range(3)))
    assert sorted(len(r.plan.changes) for r in results)[-1] == 4
    assert await config_counts(aconn) == (1, 1, 2, 16 + 16)


async def test_unmigrated_state_database_says_to_migrate(empty_db: str) -> None:
    with pytest.raises(ConfigError, match="run `pgsink migrate` first"):
        await cfg.read_config(empty_db)
