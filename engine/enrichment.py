"""Enrichment: one SQL query per batch against the source, merged under ``metadata.enrichment``.

The query is a single SELECT whose ``$1`` receives the batch's primary keys
as a ``text[]`` (each the row's ``record_pk``: key values comma-joined), e.g.::

    select o.id, c.name as customer_name, c.tier
    from orders o join customers c on c.id = o.customer_id
    where o.id = any($1::int[])

The FIRST column of each result row is matched against the messages'
``record_pk`` (as text); a message gets that row (all its columns, as JSON)
under ``metadata.enrichment``, or null when no row matched. The query runs in
a read-only transaction on its own connection to the source, so it can never
write; it is validated with pglast when the config is read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import pglast
import psycopg
from pglast import ast
from pglast.visitors import Visitor

from .db import connect
from .errors import ConfigError, PgsinkError
from .model import Source
from .jsontext import dumps, loads_exact

log = logging.getLogger("pgsink.enrichment")


class _Params(Visitor):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.numbers: set[int] = set()
        self.writes = False

    def visit_ParamRef(self, ancestors: Any, node: ast.ParamRef) -> None:
        self.numbers.add(node.number)

    def visit_InsertStmt(self, ancestors: Any, node: Any) -> None:
        self.writes = True

    visit_UpdateStmt = visit_DeleteStmt = visit_MergeStmt = visit_InsertStmt


def check_sql(text: str) -> None:
    """ConfigError unless ``text`` is one SELECT using $1 (and no other parameter), writing nothing."""
    try:
        stmts = pglast.parse_sql(text)
    except pglast.parser.ParseError as e:
        raise ConfigError(f"enrichment sql: not valid SQL: {e.args[0]}") from None
    if len(stmts) != 1 or not isinstance(stmts[0].stmt, ast.SelectStmt):
        raise ConfigError("enrichment sql: must be a single SELECT (one statement, no ';')")
    stmt = stmts[0].stmt
    if stmt.intoClause is not None or stmt.lockingClause:
        raise ConfigError("enrichment sql: SELECT INTO and FOR UPDATE/SHARE are not allowed")
    params = _Params()
    params(stmt)
    if params.writes:
        raise ConfigError("enrichment sql: must not modify data (no INSERT/UPDATE/DELETE in a WITH)")
    if params.numbers != {1}:
        raise ConfigError("enrichment sql: must use $1 (the batch's primary keys, text[]) and no other "
                          f"parameter; found {', '.join(f'${n}' for n in sorted(params.numbers)) or 'none'}")


ENRICHMENT_TIMEOUT_MS = 10_000
"""statement_timeout of enrichment queries: a query stuck on a lock fails its batch's attempt."""


class Enricher:
    """Runs a sink's enrichment query against its source; one connection, reopened when lost."""

    def __init__(self, source: Source, sql: str, timeout_ms: int = ENRICHMENT_TIMEOUT_MS) -> None:
        self.source = source
        self.sql = sql
        self.timeout_ms = timeout_ms
        self._query = f"select row_to_json(pgsink_e)::text from ({sql}) pgsink_e"
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._connecting = asyncio.Lock()  # lanes call at once: one connection, not one each

    async def fetch(self, keys: Sequence[str]) -> dict[str, Any]:
        """record_pk -> enrichment row (JSON value). Raises psycopg/PgsinkError on trouble."""
        if not keys:
            return {}
        async with self._connecting:
            if self._conn is None or self._conn.closed:
                self._conn = await connect(self.source.dsn(
                    options=f"-c default_transaction_read_only=on -c statement_timeout={self.timeout_ms}"),
                    autocommit=True)
            conn = self._conn
        try:
            async with psycopg.AsyncRawCursor(conn) as cur:
                await cur.execute(self._query, [list(keys)])
                rows = await cur.fetchall()
        except psycopg.OperationalError:  # lost, or cut off by statement_timeout: start afresh
            if self._conn is conn:
                await self.close()
            raise
        out: dict[str, Any] = {}
        for (text,) in rows:
            try:
                row = loads_exact(text)
            except ValueError as e:
                raise PgsinkError(f"enrichment row is JSON Python cannot hold: {e}") from None
            if row:
                first = next(iter(row.values()))
                out[first if isinstance(first, str) else dumps(first).decode()] = row
        return out

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()
