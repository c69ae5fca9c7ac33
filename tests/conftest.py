"""Test harness: one real Postgres per session, one fresh database per test.

Server, in order: PGSINK_TEST_DSN if set; else testcontainers when a Docker
engine answers on its socket; else a throwaway local cluster from the server
binaries; else a clear error saying how to get Postgres. Every test database
is cloned from a migrated template, so tests start from the real schema.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgsink.engine.embedded import EmbeddedPostgres
from pgsink.engine.migrate import migrate
from pgsink.engine.secrets import SECRET_KEY_ENV, generate_key

TEMPLATE_DB = "pgsink_template"


@dataclass
class PgServer:
    """The server the session runs against."""

    admin_dsn: str
    embedded: EmbeddedPostgres | None = None

    def dsn(self, dbname: str) -> str:
        params = conninfo_to_dict(self.admin_dsn)
        params["dbname"] = dbname
        return make_conninfo(**params)


def _docker_answers() -> bool:
    """True only if a Docker engine is listening; costs one failed connect otherwise."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return False
    path = host[len("unix://"):]
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect(path)
        s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
        return b"OK" in s.recv(1024)
    except OSError:
        return False
    finally:
        s.close()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    if os.environ.get("PGSINK_TEST_DSN"):
        yield PgServer(os.environ["PGSINK_TEST_DSN"])
        return
    if _docker_answers():
        from testcontainers.community.postgres import PostgresContainer  # type: ignore[import-not-found]

        with PostgresContainer("postgres:15").with_command(
            "postgres -c wal_level=logical -c max_replication_slots=64 -c max_wal_senders=64 -c fsync=off"
        ) as pg:
            yield PgServer(pg.get_connection_url(driver=None))
        return
    with EmbeddedPostgres(for_tests=True) as pg:  # raises with an install hint when absent
        yield PgServer(pg.dsn(), embedded=pg)


@pytest.fixture(scope="session", autouse=True)
def secret_key() -> str:
    """Every test process has a key; tests of the missing-key error unset it."""
    key = os.environ.setdefault(SECRET_KEY_ENV, generate_key())
    return key


@pytest.fixture(scope="session")
def template_db(pg_server: PgServer) -> str:
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(TEMPLATE_DB)))
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(TEMPLATE_DB)))
    asyncio.run(migrate(pg_server.dsn(TEMPLATE_DB)))
    return TEMPLATE_DB


def drop_database(admin_dsn: str, name: str) -> None:
    """Drop a test database, its replication slots first (a slot pins the database)."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            "select pg_terminate_backend(active_pid) from pg_replication_slots "
            "where database = %s and active_pid is not null",
            (name,),
        )
        conn.execute(
            "select pg_drop_replication_slot(slot_name) from pg_replication_slots where database = %s",
            (name,),
        )
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


@pytest.fixture
def fresh_db(pg_server: PgServer, template_db: str) -> Iterator[str]:
    """A migrated, empty database of its own; yields its DSN."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {} template {}").format(sql.Identifier(name), sql.Identifier(template_db)))
    try:
        yield pg_server.dsn(name)
    finally:
        drop_database(pg_server.admin_dsn, name)


@pytest.fixture
def empty_db(pg_server: PgServer) -> Iterator[str]:
    """An unmigrated empty database (for migration tests)."""
    name = f"e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    try:
        yield pg_server.dsn(name)
    finally:
        drop_database(pg_server.admin_dsn, name)


@pytest.fixture
async def aconn(fresh_db: str) -> AsyncIterator[psycopg.AsyncConnection]:
    conn = await psycopg.AsyncConnection.connect(fresh_db, autocommit=True)
    try:
        yield conn
    finally:
        await conn.close()
