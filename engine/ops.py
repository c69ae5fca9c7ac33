"""Inspect and repair: the engine side of `pgsink status|messages|message|replay|retry|discard`.

Thin calls of the SQL interface (views and functions of migration 0002), so
the CLI and a user at psql see and do exactly the same thing. Errors the SQL
functions raise (unknown sink, message not parked, ...) become PgsinkError
with their hint.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import psycopg
from psycopg.rows import dict_row

from . import db
from .errors import PgsinkError
from .filters import retained_change_passes, sink_predicate
from .model import load_config
from .queries import QUERIES

log = logging.getLogger("pgsink.ops")

MESSAGE_STATES = ("pending", "in_flight", "failing", "parked", "discarded")
"""States of pgsink.message_states; the CLI also accepts ``failed`` (attempted and not delivered)."""

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """An ISO-8601 time (UTC when no offset) or a duration ago: ``30m``, ``2h``, ``7d``."""
    m = _RELATIVE.match(text)
    if m:
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise PgsinkError(f"Cannot read the time {text!r}: give an ISO time such as 2026-11-27T10:00:00Z "
                          "or a duration ago such as 30m, 2h or 7d.") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


@asynccontextmanager
async def _state(dsn: str) -> AsyncIterator[psycopg.AsyncConnection[dict[str, Any]]]:
    """A state connection whose SQL-function errors read as PgsinkError."""
    async with db.connection(dsn, autocommit=True, row_factory=dict_row) as conn:
        try:
            yield conn  # type: ignore[misc]
        except (psycopg.errors.NoDataFound, psycopg.errors.InvalidParameterValue) as e:
            hint = e.diag.message_hint
            raise PgsinkError(f"{e.diag.message_primary}." + (f" {hint}" if hint else "")) from None
        except psycopg.errors.UndefinedTable as e:
            raise PgsinkError(f"The pgsink schema is missing or old ({e.diag.message_primary}): "
                              "run `pgsink migrate`.") from None


async def _rows(dsn: str, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    async with _state(dsn) as conn:
        cur = await conn.execute(QUERIES[name], params)  # type: ignore[arg-type]
        return await cur.fetchall()


@dataclass(frozen=True)
class SlotLag:
    source: str
    active: bool | None
    lag_bytes: int | None
    error: str | None = None


async def status(dsn: str, sink: str | None = None) -> list[dict[str, Any]]:
    """Rows of pgsink.sink_status (all sinks, or one)."""
    return await _rows(dsn, "ops_status", {"sink": sink})


async def slot_lags(dsn: str) -> dict[str, SlotLag]:
    """Per source: WAL bytes its slot's confirmed position is behind the source's current LSN."""
    try:
        async with _state(dsn) as conn:
            config = await load_config(conn)  # type: ignore[arg-type]
    except PgsinkError as e:  # e.g. no PGSINK_SECRET_KEY for a source password: show "?"
        log.warning("cannot read the sources to measure slot lag: %s", e)
        return {}
    out: dict[str, SlotLag] = {}
    for source in config.sources.values():
        try:
            async with db.connection(source.dsn(), autocommit=True) as sconn:
                cur = await sconn.execute(QUERIES["ops_slot_lag"], {"slot": source.slot_name})
                row = await cur.fetchone()
            out[source.name] = SlotLag(source.name, row[0], row[1]) if row else SlotLag(
                source.name, None, None, f"no slot {source.slot_name}")
        except (PgsinkError, psycopg.Error) as e:
            out[source.name] = SlotLag(source.name, None, None, str(e).splitlines()[0])
    return out


async def messages(dsn: str, sink: str, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Undelivered messages of a sink (pgsink.message_states), oldest first."""
    if state is not None and state not in (*MESSAGE_STATES, "failed"):
        raise PgsinkError(f"Unknown state {state!r}: choose from {', '.join((*MESSAGE_STATES, 'failed'))}.")
    states = None if state is None else (
        ["failing", "parked", "in_flight"] if state == "failed" else [state])
    return await _rows(dsn, "ops_messages", {"sink": sink, "states": states, "failed": state == "failed",
                                             "limit": limit})


async def message(dsn: str, sink: str, message_id: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One message (with its change or row) and its attempts, oldest first."""
    async with _state(dsn) as conn:
        cur = await conn.execute(QUERIES["ops_message"], {"sink": sink, "id": message_id})
        row = await cur.fetchone()
        if row is None:
            raise PgsinkError(f"Sink {sink!r} has no message {message_id} (delivered ones are dropped when "
                              f"their partition is pruned). List them with: pgsink messages --sink {sink}")
        cur = await conn.execute(QUERIES["ops_message_attempts"], {"sink": sink, "id": message_id})
        return row, await cur.fetchall()


async def replay(dsn: str, sink: str, since: datetime, until: datetime | None = None,
                 table: str | None = None, action: str | None = None) -> int:
    """Re-enqueue retained changes of a sink; returns how many.

    A sink without filters: pgsink.replay. With filters, which run in Python,
    the window's candidates are judged here as capture judged them and only
    those that pass go to pgsink.replay_changes.
    """
    params = {"sink": sink, "since": since, "until": until, "table": table, "action": action}
    async with _state(dsn) as conn:
        cur = await conn.execute(QUERIES["ops_sink_filters"], {"sink": sink})  # type: ignore[arg-type]
        row = await cur.fetchone()
        target = SimpleNamespace(**row) if row else None
        if target is None or not (target.filters or target.filter_sql or target.filter_function):
            return await _count(conn, "ops_replay", params)  # (pgsink.replay says what is wrong with a name)
        predicate = sink_predicate(target.filters, target.filter_sql, target.filter_function,
                                   timeout=target.function_timeout_ms / 1000, what=f"sink {target.name}: filter")
        assert predicate is not None
        lsns: list[int] = []
        idxs: list[int] = []
        ats: list[datetime] = []
        async with conn.transaction(), conn.cursor(name="pgsink_replay") as cur:
            await cur.execute(QUERIES["ops_replay_candidates"], params)  # type: ignore[arg-type]
            async for c in cur:
                if retained_change_passes(predicate, target, c["source_table_schema"], c["source_table_name"],
                                          c["action"], c["record"], c["changes"], c["committed_at"],
                                          c["commit_lsn"], c["commit_idx"], c["transaction_annotations"]):
                    lsns.append(c["commit_lsn"])
                    idxs.append(c["commit_idx"])
                    ats.append(c["committed_at"])
        return await _count(conn, "ops_replay_changes", {"sink": sink, "lsns": lsns, "idxs": idxs, "ats": ats})


async def _count(conn: psycopg.AsyncConnection[dict[str, Any]], name: str, params: dict[str, Any]) -> int:
    """The single number a SQL function returned."""
    cur = await conn.execute(QUERIES[name], params)  # type: ignore[arg-type]
    row = await cur.fetchone()
    return int(next(iter(row.values()))) if row else 0


async def retry_group(dsn: str, sink: str, group_key: str) -> int:
    rows = await _rows(dsn, "ops_retry_group", {"sink": sink, "group_key": group_key})
    return int(next(iter(rows[0].values())))


async def retry_message(dsn: str, sink: str, message_id: int) -> None:
    await _rows(dsn, "ops_retry_message", {"sink": sink, "id": message_id})


async def discard(dsn: str, sink: str, message_id: int) -> None:
    await _rows(dsn, "ops_discard", {"sink": sink, "id": message_id})
