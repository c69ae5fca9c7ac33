"""Numbered plain-SQL migrations under ``sql/migrations/NNNN_slug.sql``.

Each pending migration runs in its own transaction together with its version
row, all under one session advisory lock so that racing `pgsink migrate` runs
apply each migration once. An applied migration whose file changed is refused:
migrations are immutable once landed.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import datetime

import psycopg

from .db import connection
from .errors import MigrationError
from .queries import QUERIES, sql_dir

log = logging.getLogger("pgsink.migrate")

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True)
class MigrationStatus:
    version: int
    name: str
    applied_at: datetime | None

    @property
    def applied(self) -> bool:
        return self.applied_at is not None


def available() -> list[Migration]:
    """The migrations shipped with this version, in order."""
    out = []
    for entry in (sql_dir() / "migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            out.append(Migration(int(m.group(1)), m.group(2), entry.read_text()))
    out.sort(key=lambda m: m.version)
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"Two migrations share a version number: {versions}")
    return out


async def _applied(conn: psycopg.AsyncConnection) -> dict[int, tuple[str, str, datetime]]:
    cur = await conn.execute(QUERIES["migrations_schema_exists"])
    row = await cur.fetchone()
    if not row or not row[0]:
        return {}
    cur = await conn.execute(QUERIES["migrations_applied"])
    return {v: (n, c, at) for v, n, c, at in await cur.fetchall()}


def _check_checksums(migrations: list[Migration], applied: dict[int, tuple[str, str, datetime]]) -> None:
    by_version = {m.version: m for m in migrations}
    for version, (name, checksum, _) in applied.items():
        m = by_version.get(version)
        if m is None:
            raise MigrationError(
                f"The database has migration {version:04d}_{name} applied, which this "
                "pgsink does not know: it is older than the schema. Upgrade pgsink."
            )
        if m.checksum != checksum:
            raise MigrationError(
                f"Migration {version:04d}_{name}.sql was changed after it was applied "
                f"(checksum {checksum[:12]} in the database, {m.checksum[:12]} on disk). "
                "Applied migrations are immutable: restore the file and add a new "
                "numbered migration for the change."
            )


async def status(dsn: str) -> list[MigrationStatus]:
    migrations = available()
    async with connection(dsn, autocommit=True) as conn:
        applied = await _applied(conn)
    _check_checksums(migrations, applied)
    return [MigrationStatus(m.version, m.name, applied.get(m.version, (None, None, None))[2])
            for m in migrations]


async def migrate(dsn: str) -> list[Migration]:
    """Apply pending migrations; returns those applied by this call."""
    migrations = available()
    done: list[Migration] = []
    async with connection(dsn, autocommit=True) as conn:
        await conn.execute(QUERIES["migrations_lock"])
        try:
            await conn.execute(QUERIES["migrations_bootstrap"])
            applied = await _applied(conn)
            _check_checksums(migrations, applied)
            for m in migrations:
                if m.version in applied:
                    continue
                log.info("applying migration %04d_%s", m.version, m.name)
                try:
                    async with conn.transaction():
                        await conn.execute(m.sql.encode())  # many statements, no parameters
                        await conn.execute(QUERIES["migrations_record"], (m.version, m.name, m.checksum))
                except psycopg.Error as e:
                    raise MigrationError(f"Migration {m.version:04d}_{m.name} failed: {e}") from e
                done.append(m)
        finally:
            await conn.execute(QUERIES["migrations_unlock"])
    return done
