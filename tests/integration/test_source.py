"""Source checks and set-up against real databases: each failure says what is wrong and how to fix it."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pgsink.engine.embedded import EmbeddedPostgres, free_port
from pgsink.engine.errors import SourceError
from pgsink.engine.model import Source
from pgsink.engine.source import (
    check_source,
    drop_slot,
    ensure_slot_and_publication,
    replica_identity_report,
)


def make_source(dsn: str, **changes: object) -> Source:
    p = conninfo_to_dict(dsn)
    tag = uuid.uuid4().hex[:8]
    src = Source(
        id=uuid.uuid4(), name="app", hostname=str(p.get("host", "127.0.0.1")), port=int(p.get("port", 5432)),
        database=str(p["dbname"]), username=str(p.get("user", "postgres")),
        password=str(p["password"]) if p.get("password") else None, sslmode=str(p.get("sslmode", "prefer")),
        slot_name=f"slot_{tag}", create_slot=False, publication_name=f"pub_{tag}", create_publication=False,
        publication_init_sql=None, decoder="pgoutput", retention_seconds=86400.0, annotations={},
    )
    return dataclasses.replace(src, **changes)  # type: ignore[arg-type]


def run_sql(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for s in statements:
            conn.execute(s.encode())


def slot_plugin(dsn: str, slot: str) -> str | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("select plugin from pg_replication_slots where slot_name = %s", (slot,)).fetchone()
        return row[0] if row else None


async def test_create_if_not_exists_creates_publication_and_slot(fresh_db: str) -> None:
    run_sql(fresh_db, "create table public.orders (id int primary key, total int)")
    src = make_source(fresh_db, create_slot=True, create_publication=True)
    await ensure_slot_and_publication(src)
    await ensure_slot_and_publication(src)  # idempotent
    assert slot_plugin(fresh_db, src.slot_name) == "pgoutput"
    with psycopg.connect(fresh_db) as conn:
        alltables, viaroot = conn.execute(
            "select puballtables, pubviaroot from pg_publication where pubname = %s",
            (src.publication_name,)).fetchone()
    assert alltables and viaroot
    warnings = await check_source(src, [("public", "orders")])
    assert len(warnings) == 1 and "public.orders" in warnings[0] and "REPLICA IDENTITY FULL" in warnings[0]


async def test_init_sql_creates_the_publication(fresh_db: str) -> None:
    run_sql(fresh_db, "create table public.a (id int primary key)")
    src = make_source(fresh_db, create_publication=True, create_slot=True)
    src = dataclasses.replace(src, publication_init_sql=f"create publication {src.publication_name} for table public.a")
    await ensure_slot_and_publication(src)
    assert await check_source(src, [("public", "a")])  # only a replica identity warning
    wrong = make_source(fresh_db, create_publication=True, publication_init_sql="create publication other_name for table public.a")
    with pytest.raises(SourceError, match="init_sql must create a publication with exactly that name"):
        await ensure_slot_and_publication(wrong)


@pytest.mark.wal2json
async def test_wal2json_decoder_creates_a_wal2json_slot(fresh_db: str) -> None:
    src = make_source(fresh_db, create_slot=True, create_publication=True, decoder="wal2json")
    await ensure_slot_and_publication(src)
    assert slot_plugin(fresh_db, src.slot_name) == "wal2json"


async def test_missing_publication_and_slot_are_reported_with_the_fix(fresh_db: str) -> None:
    src = make_source(fresh_db)
    with pytest.raises(SourceError) as e:
        await ensure_slot_and_publication(src)
    assert f"Publication {src.publication_name!r} does not exist" in str(e.value)
    assert "CREATE PUBLICATION" in str(e.value) and "create_if_not_exists" in str(e.value)
    with pytest.raises(SourceError) as e:
        await check_source(src)
    text = str(e.value)
    assert f"Replication slot {src.slot_name!r} does not exist" in text
    assert f"pg_create_logical_replication_slot('{src.slot_name}', 'pgoutput')" in text and "--create-slot" in text
    assert "Publication" in text  # every problem at once


async def test_slot_with_another_plugin_is_refused(fresh_db: str) -> None:
    src = make_source(fresh_db, create_publication=True)
    run_sql(fresh_db, f"select pg_create_logical_replication_slot('{src.slot_name}', 'test_decoding')")
    await ensure_slot_and_publication(src)  # exists: nothing to create
    with pytest.raises(SourceError, match=r"uses output plugin 'test_decoding', but the source's decoder is 'pgoutput'"):
        await check_source(src)


async def test_tables_must_exist_and_be_published(fresh_db: str) -> None:
    run_sql(fresh_db, "create table public.a (id int primary key)", "create table public.b (id int primary key)")
    src = make_source(fresh_db, create_slot=True)
    run_sql(fresh_db, f"create publication {src.publication_name} for table public.a")
    await ensure_slot_and_publication(src)
    with pytest.raises(SourceError) as e:
        await check_source(src, [("public", "a"), ("public", "b"), ("public", "nope")])
    text = str(e.value)
    assert "Table public.nope does not exist" in text
    assert f"Table public.b is not in publication {src.publication_name!r}" in text
    assert f'ALTER PUBLICATION "{src.publication_name}" ADD TABLE "public"."b"' in text
    assert "public.a" not in text


async def test_publication_without_updates_warns(fresh_db: str) -> None:
    src = make_source(fresh_db, create_slot=True)
    run_sql(fresh_db, f"create publication {src.publication_name} for all tables with (publish = 'insert')")
    await ensure_slot_and_publication(src)
    warnings = await check_source(src)
    assert any("does not publish update, delete events" in w for w in warnings)


async def test_replica_identity_report(fresh_db: str) -> None:
    run_sql(fresh_db,
            "create table public.full_t (id int primary key)", "alter table public.full_t replica identity full",
            "create table public.default_t (id int primary key)",
            "create table public.nopk_t (v int)", "alter table public.nopk_t replica identity full")
    src = make_source(fresh_db, create_slot=True, create_publication=True)
    await ensure_slot_and_publication(src)
    report = {t.qualified: t for t in await replica_identity_report(src)}
    assert not any(name.startswith("pgsink.") for name in report)  # the state schema is left out
    assert report["public.full_t"].full and report["public.full_t"].has_primary_key
    assert report["public.default_t"].replica_identity == "default"
    assert not report["public.nopk_t"].has_primary_key
    warnings = await check_source(src)
    assert any("lack REPLICA IDENTITY FULL: public.default_t" in w and '"changes": null' in w for w in warnings)
    assert any("have no primary key: public.nopk_t" in w for w in warnings)


async def test_wrong_port_and_database_give_actionable_errors(fresh_db: str) -> None:
    with pytest.raises(SourceError) as e:
        await check_source(make_source(fresh_db, port=free_port()))
    assert "Source 'app'" in str(e.value) and "check that Postgres is running" in str(e.value)
    with pytest.raises(SourceError) as e:
        await check_source(make_source(fresh_db, database="no_such_db_here"))
    assert "The database does not exist" in str(e.value)


async def test_user_without_replication_is_refused(fresh_db: str) -> None:
    role = f"noreplication_{uuid.uuid4().hex[:8]}"
    run_sql(fresh_db, f"create role {role} login nosuperuser noreplication")
    try:
        src = make_source(fresh_db, username=role, password=None, create_publication=False)
        run_sql(fresh_db, f"create publication {src.publication_name} for all tables",
                f"select pg_create_logical_replication_slot('{src.slot_name}', 'pgoutput')")
        with pytest.raises(SourceError) as e:
            await check_source(src)
        assert f"User {role!r}" in str(e.value) and "WITH REPLICATION" in str(e.value)
        run_sql(fresh_db, f"alter role {role} replication")
        await check_source(src)
    finally:
        run_sql(fresh_db, f"drop role {role}")


async def test_drop_slot(fresh_db: str) -> None:
    src = make_source(fresh_db, create_slot=True, create_publication=True)
    await ensure_slot_and_publication(src)
    assert await drop_slot(src)
    assert slot_plugin(fresh_db, src.slot_name) is None
    assert not await drop_slot(src)


# ---------------------------------------------------------------- a server without wal_level=logical


@pytest.fixture(scope="module")
def replica_level_db() -> Iterator[str]:
    with EmbeddedPostgres(for_tests=True, settings={"wal_level": "replica"}) as pg:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier("app")))
        yield pg.dsn("app")


async def test_wal_level_replica_says_how_to_fix(replica_level_db: str) -> None:
    src = make_source(replica_level_db, create_slot=True, create_publication=True)
    with pytest.raises(SourceError) as e:
        await ensure_slot_and_publication(src)
    text = str(e.value)
    assert "wal_level is 'replica'" in text and "wal_level = logical" in text and "restart" in text
    assert "rds.logical_replication = 1" in text
    with pytest.raises(SourceError, match="wal_level is 'replica'"):
        await check_source(src)
