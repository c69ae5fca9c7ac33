"""Connections to the state database, with driver errors translated at the boundary."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .errors import PgsinkError
from .waiting import wait_event

DATABASE_URL_ENV = "PGSINK_DATABASE_URL"

log = logging.getLogger("pgsink.db")


def state_dsn(explicit: str | None = None) -> str:
    """The state database URL from --database-url or PGSINK_DATABASE_URL."""
    dsn = explicit or os.environ.get(DATABASE_URL_ENV)
    if not dsn:
        raise PgsinkError(
            "No state database given. Pass --database-url postgresql://user@host/db "
            f"or set {DATABASE_URL_ENV}."
        )
    return dsn


def redact(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparseable connection string>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo(**{k: v for k, v in params.items() if v is not None})


def _without(text: str, dsn: str) -> str:
    """``text`` with the connection string (and so its password) cut out."""
    return text.replace(dsn, "<the connection string>") if dsn else text


def explain_connect_error(dsn: str, err: Exception) -> PgsinkError:
    """Turn a driver connection error into one that says what to check."""
    text = _without(str(err).strip(), dsn)
    hint = "Check the host, port, user, password and database name"
    if "password authentication failed" in text:
        hint = "The password was refused: check the user and password"
    elif "does not exist" in text and "database" in text:
        hint = "The database does not exist: create it or fix the database name"
    elif "Connection refused" in text or "could not connect" in text or "timeout" in text:
        hint = "Nothing answered: check that Postgres is running and the host and port are right"
    return PgsinkError(f"Cannot connect to {redact(dsn)}: {text}\n{hint}.")


async def connect(dsn: str, **kwargs: object) -> psycopg.AsyncConnection:
    """Open an async connection, translating failures into an actionable PgsinkError."""
    try:
        return await psycopg.AsyncConnection.connect(dsn, connect_timeout=10, **kwargs)  # type: ignore[arg-type]
    except psycopg.OperationalError as e:
        raise explain_connect_error(dsn, e) from e
    except psycopg.ProgrammingError as e:  # libpq quotes the string back, password and all: say it in our words
        raise PgsinkError(f"Invalid connection string {redact(dsn)}: {_without(str(e), dsn)}\nUse a URL such as "
                          "postgresql://user:password@host:5432/dbname, or key=value pairs.") from None


@asynccontextmanager
async def connection(dsn: str, **kwargs: object) -> AsyncIterator[psycopg.AsyncConnection]:
    conn = await connect(dsn, **kwargs)
    try:
        yield conn
    finally:
        await conn.close()


async def listen(dsn: str, channels: Sequence[str], on_notify: Callable[[psycopg.Notify], None],
                 on_subscribed: Callable[[], None], stop: asyncio.Event,
                 conn: psycopg.AsyncConnection | None = None) -> None:
    """LISTEN on ``channels`` until ``stop`` is set (or the task is cancelled).

    A lost connection is reopened with capped backoff. Notifications sent
    while nobody listened are lost, so ``on_subscribed`` runs after every
    (re)subscription for the caller to look for work it may have missed; the
    caller also polls, so an outage only delays work.
    """
    delay = 0.5
    try:
        while not stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = await connect(dsn, autocommit=True)
                for channel in channels:
                    await conn.execute(sql.SQL("listen {}").format(sql.Identifier(channel)))
                delay = 0.5
                on_subscribed()
                async for n in conn.notifies():
                    on_notify(n)
            except (psycopg.OperationalError, PgsinkError) as e:
                log.warning("LISTEN connection lost (%s); polling until it is back", e)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                await wait_event(stop, delay)
                delay = min(delay * 2, 10.0)
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
