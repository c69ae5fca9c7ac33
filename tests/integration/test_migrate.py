"""Migrations: idempotent, race-safe, immutable once applied, --status exit codes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from pgsink.engine import migrate as m
from pgsink.engine.errors import MigrationError, PgsinkError


def _pgsink(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgsink.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


async def test_migrate_applies_all_then_is_a_noop(empty_db: str) -> None:
    first = await m.migrate(empty_db)
    assert [x.version for x in first] == [x.version for x in m.available()]
    assert await m.migrate(empty_db) == []
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("select count(*) from pgsink.schema_migrations").fetchone()[0] == len(first)
        assert conn.execute("select to_regclass('pgsink.sinks') is not null").fetchone()[0]


async def test_racing_migrations_apply_each_once(empty_db: str) -> None:
    results = await asyncio.gather(*(m.migrate(empty_db) for _ in range(4)))
    assert sum(len(r) for r in results) == len(m.available())


async def test_changed_checksum_is_refused(empty_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    await m.migrate(empty_db)
    real = m.available()
    changed = [m.Migration(real[0].version, real[0].name, real[0].sql + "\n-- edited\n"), *real[1:]]
    monkeypatch.setattr(m, "available", lambda: changed)
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await m.migrate(empty_db)
    with pytest.raises(MigrationError, match="immutable"):
        await m.status(empty_db)


def test_status_exit_codes(empty_db: str) -> None:
    res = _pgsink("migrate", "--status", "--database-url", empty_db)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "pending" in res.stdout + res.stderr
    res = _pgsink("migrate", env={"PGSINK_DATABASE_URL": empty_db})
    assert res.returncode == 0, res.stderr
    assert "applied 0001_initial" in res.stdout
    res = _pgsink("migrate", "--status", "--database-url", empty_db)
    assert res.returncode == 0, res.stderr
    assert "pending" not in res.stdout


def test_wrong_dsn_is_an_actionable_error() -> None:
    res = _pgsink("migrate", "--database-url", "postgresql://nobody:secretpw@127.0.0.1:1/nowhere")
    assert res.returncode == 1
    assert "Cannot connect" in res.stderr and "check that Postgres is running" in res.stderr
    assert "secretpw" not in res.stderr + res.stdout


def test_a_malformed_dsn_is_refused_without_echoing_its_password() -> None:
    res = _pgsink("migrate", "--database-url", "postgres//app:S3CRET@db.example.com/app")  # "://" mistyped
    assert res.returncode == 1
    assert "Invalid connection string" in res.stderr and "postgresql://user:password@host" in res.stderr
    assert "S3CRET" not in res.stderr + res.stdout


def test_missing_database_url_says_how_to_give_one() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PGSINK_DATABASE_URL"}
    res = subprocess.run([sys.executable, "-m", "pgsink.cli", "migrate"], capture_output=True, text=True, env=env)
    assert res.returncode == 2
    assert "PGSINK_DATABASE_URL" in res.stderr


def test_every_migration_file_is_named_and_numbered() -> None:
    names = sorted(p.name for p in (Path(__file__).parents[2] / "sql" / "migrations").glob("*.sql"))
    assert names and all(m._NAME.match(n) for n in names)
    assert [int(n[:4]) for n in names] == list(range(1, len(names) + 1))


def test_errors_share_one_base() -> None:
    assert issubclass(MigrationError, PgsinkError)
