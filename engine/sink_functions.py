"""Transforms and routing at delivery time, and `pgsink sink test`.

- **Path transforms** (as in Sequin): ``record``, ``record.id``,
  ``record.address.city``, ``changes.x``, ``action``, ``metadata.table_name``:
  the message body becomes the value at that path.
- **Python transforms** ``def transform(action, record, changes, metadata)``
  return any JSON value, which becomes the body. Batched bodies wrap the
  transformed values in ``data`` as usual.
- **Routing** ``def route(action, record, changes, metadata)`` returns a
  mapping with any of ``method`` (POST, PUT, PATCH, DELETE), ``endpoint_path``
  (appended to the endpoint URL instead of the sink's path) and ``headers``.
  A batch only holds messages with the same route: the batch is cut before
  the first message routed elsewhere, which then heads the next batch.

A user function that raises, runs too long or returns something unusable
never stops the pipeline: the batch is cut before that message; alone, the
message fails its attempt with the exception and traceback in the attempt
row, backs off and is parked like any failing message, and the rest of the
lane flows on. Fixing the function (files are re-read when they change) and
retrying delivers it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from . import userfunc
from .db import connection
from .errors import ConfigError, PgsinkError
from .filters import sink_predicate
from .enrichment import Enricher
from .model import Sink, Source, load_config
from .queries import QUERIES
from .queue import QueuedMessage
from .render import RenderContext, render_message
from .userfunc import UserFunctionError
from .jsontext import dumps, loads_exact

METHODS = ("POST", "PUT", "PATCH", "DELETE")


@dataclass(frozen=True)
class Route:
    method: str = "POST"
    endpoint_path: str | None = None  # None: the sink's own path
    headers: tuple[tuple[str, str], ...] = ()


DEFAULT_ROUTE = Route()


BATCH_FUNCTION_SECONDS = 2.0
"""Time a batch's transforms and routes may take in all before the batch is cut (one message always goes)."""


@dataclass
class Prepared:
    """The head of a batch that can go in one request, with its bodies and route."""

    messages: list[QueuedMessage]
    bodies: dict[int, Any] = field(default_factory=dict)  # message id -> transformed value
    route: Route = DEFAULT_ROUTE
    error: UserFunctionError | None = None  # set: messages is the one failing message, not to be sent
    enrichment: dict[int, Any] | None = None  # message id -> metadata.enrichment (None: no enrichment)


def _rendered(m: QueuedMessage, ctx: RenderContext) -> dict[str, Any]:
    """The message as the endpoint would get it, as Python values; UserFunctionError when Python
    cannot hold its JSON (nested too deeply), so the message fails instead of the worker."""
    try:
        return loads_exact(dumps(render_message(m, ctx)).decode())  # type: ignore[no-any-return]
    except ValueError as e:
        raise UserFunctionError(f"message {m.id} holds JSON Python cannot read: {e}") from None


def _inputs(m: QueuedMessage, ctx: RenderContext, enrichment: Mapping[int, Any] | None = None
            ) -> tuple[str, Any, Any, Any]:
    """Plain JSON values (action, record, changes, metadata) for user functions, numbers exact."""
    rendered = _rendered(m, ctx)
    if enrichment is not None:
        rendered["metadata"]["enrichment"] = enrichment.get(m.id)
    return m.action, rendered["record"], rendered["changes"], rendered["metadata"]


def path_value(path: str, inputs: tuple[str, Any, Any, Any]) -> Any:
    """The value at a transform path; missing keys give null."""
    action, record, changes, metadata = inputs
    head, *rest = path.split(".")
    value: Any = {"record": record, "changes": changes, "action": action, "metadata": metadata}.get(head)
    for key in rest:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _check_json(value: Any, what: str) -> Any:
    try:
        dumps(value)
    except TypeError as e:
        raise UserFunctionError(f"{what} returned a value that is not JSON: {e}") from None
    return value


def parse_route(value: Any, what: str) -> Route:
    """A route function's result as a Route; UserFunctionError saying what is wrong."""
    if value is None:
        return DEFAULT_ROUTE
    if not isinstance(value, Mapping):
        raise UserFunctionError(f"{what} returned {type(value).__name__}, not a mapping with method, "
                                "endpoint_path and headers")
    unknown = set(value) - {"method", "endpoint_path", "headers"}
    if unknown:
        raise UserFunctionError(f"{what} returned unknown keys {sorted(unknown)} (known: method, endpoint_path, "
                                "headers)")
    method = str(value.get("method") or "POST").upper()
    if method not in METHODS:
        raise UserFunctionError(f"{what} returned method {method!r}; use one of {', '.join(METHODS)}")
    path = value.get("endpoint_path")
    if path is not None and not isinstance(path, str):
        raise UserFunctionError(f"{what} returned endpoint_path {path!r}, not a string")
    headers = value.get("headers") or {}
    if not isinstance(headers, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and "\n" not in v and "\r" not in v
            for k, v in headers.items()):
        raise UserFunctionError(f"{what} returned headers that are not a mapping of strings to one-line strings")
    return Route(method, path, tuple(sorted(headers.items())))


@dataclass(frozen=True)
class SinkFunctions:
    """A sink's transform and route, ready to apply to messages."""

    sink_name: str
    transform_path: str | None
    transform_function: str | None
    route_function: str | None
    timeout: float

    @classmethod
    def for_sink(cls, sink: Sink) -> SinkFunctions | None:
        if not (sink.transform_path or sink.transform_function or sink.route_function):
            return None
        return cls(sink.name, sink.transform_path, sink.transform_function, sink.route_function,
                   sink.function_timeout_ms / 1000)

    def _call(self, ref: str, role: str, inputs: tuple[str, Any, Any, Any]) -> Any:
        what = f"sink {self.sink_name}: {role} {ref}"
        try:
            fn = userfunc.load(ref, role)
        except Exception as e:  # noqa: BLE001 - a ConfigError from loading, as a message failure
            raise UserFunctionError(f"{what} cannot be loaded: {e}") from None
        return userfunc.call(fn, inputs, timeout=self.timeout, what=what)

    def apply(self, m: QueuedMessage, ctx: RenderContext, enrichment: Mapping[int, Any] | None = None
              ) -> tuple[Any, Route, bool]:
        """(body value, route, transformed?) of one message; raises UserFunctionError."""
        inputs = _inputs(m, ctx, enrichment)
        body: Any = None
        transformed = False
        if self.transform_path:
            body, transformed = path_value(self.transform_path, inputs), True
        elif self.transform_function:
            what = f"sink {self.sink_name}: transform {self.transform_function}"
            body = _check_json(self._call(self.transform_function, "transform", inputs), what)
            transformed = True
        route = DEFAULT_ROUTE
        if self.route_function:
            what = f"sink {self.sink_name}: route {self.route_function}"
            route = parse_route(self._call(self.route_function, "route", inputs), what)
        return body, route, transformed

    def prepare(self, messages: Sequence[QueuedMessage], ctx: RenderContext,
                sendable: Callable[[QueuedMessage], bool], enrichment: dict[int, Any] | None = None,
                budget: float = BATCH_FUNCTION_SECONDS) -> Prepared:
        """The longest head of ``messages`` that shares one route and whose functions succeed.

        Messages for which ``sendable`` is false (parked behind their group,
        pruned) are not given to the functions and never cut the batch. Once
        the functions have run ``budget`` seconds the batch is cut there: they
        run on the event loop, which must get back to renewing leases.
        """
        out = Prepared([], enrichment=enrichment)
        route: Route | None = None
        deadline = time.monotonic() + budget
        for m in messages:
            if route is not None and time.monotonic() > deadline:
                return out
            if not sendable(m):
                out.messages.append(m)
                continue
            try:
                body, r, transformed = self.apply(m, ctx, enrichment)
            except UserFunctionError as e:
                if route is None:  # the first message to send fails: it goes alone, as a failed attempt
                    out.messages.append(m)
                    out.error = e
                return out
            if route is None:
                route = out.route = r
            elif r != route:
                return out
            out.messages.append(m)
            if transformed:
                out.bodies[m.id] = body
        return out


def render_enriched(messages: Sequence[QueuedMessage], enrichment: Mapping[int, Any], ctx: RenderContext) -> bytes:
    """The usual body, each message's metadata carrying its ``enrichment`` row (or null)."""
    rendered = []
    for m in messages:
        d = render_message(m, ctx)
        d["metadata"]["enrichment"] = enrichment.get(m.id)
        rendered.append(d)
    if not ctx.batch:
        if len(rendered) != 1:
            raise ValueError(f"a sink with batch off sends one message per request, got {len(rendered)}")
        return dumps(rendered[0])
    return dumps({"data": rendered})


def render_transformed(messages: Sequence[QueuedMessage], bodies: Mapping[int, Any], ctx: RenderContext) -> bytes:
    """The request body with transformed values: the value itself, or ``{"data": [...]}`` when batching."""
    if not ctx.batch:
        if len(messages) != 1:
            raise ValueError(f"a sink with batch off sends one message per request, got {len(messages)}")
        return dumps(bodies[messages[0].id])
    return dumps({"data": [bodies[m.id] for m in messages]})


@dataclass
class TrialResult:
    """What `pgsink sink test` shows for one retained change."""

    change: str           # "public.orders insert 7 @ lsn/idx"
    passes: bool | None   # None: the filter failed
    body: Any = None      # the body it would send alone (JSON value)
    route: Route = DEFAULT_ROUTE
    error: str | None = None


async def try_sink(dsn: str, name: str, *, limit: int = 10, scan: int = 10_000) -> list[TrialResult]:
    """Run a sink's filters, transform and route over its last ``limit`` retained changes (oldest first).

    Nothing is sent or written. Looks at most ``scan`` recent changes of the
    sink's source to find ``limit`` of its tables and actions.
    """
    async with connection(dsn, autocommit=True) as conn:
        config = await load_config(conn)
        sink = config.sink_named(name)
        if sink is None:
            raise ConfigError(f"There is no sink named {name!r} (see pgsink sink list).")
        cur = await conn.execute(QUERIES["recent_changes"], {"source_id": sink.source_id, "limit": scan})
        rows = await cur.fetchall()
    messages = [QueuedMessage(*r) for r in rows]
    mine = [m._replace(id=i + 1) for i, m in enumerate(
        [m for m in messages if m.action in sink.actions
         and sink.matches_table(m.table_schema or "", m.table_name or "")][:limit])]
    source = config.sources[sink.source_id]
    ctx = RenderContext.for_sink(sink, source)
    enrichment = await _trial_enrichment(sink, source, mine)
    predicate = sink_predicate(sink.filters, sink.filter_sql, sink.filter_function,
                               timeout=sink.function_timeout_ms / 1000, what=f"sink {sink.name}: filter")
    functions = SinkFunctions.for_sink(sink)
    out = []
    for m in reversed(mine):
        label = f"{m.table_schema}.{m.table_name} {m.action} {m.record_pk or '-'} @ {m.commit_lsn}/{m.commit_idx}"
        action, record, changes, metadata = _inputs(m, ctx, enrichment)
        try:
            passes = predicate is None or predicate(action, record, changes, metadata)
        except UserFunctionError as e:
            out.append(TrialResult(label, None, error=e.describe()))
            continue
        if not passes:
            out.append(TrialResult(label, False))
            continue
        try:
            body, route, transformed = (functions.apply(m, ctx, enrichment) if functions
                                        else (None, DEFAULT_ROUTE, False))
            if not transformed:
                body = _rendered(m, ctx)
                if enrichment is not None:
                    body["metadata"]["enrichment"] = enrichment.get(m.id)
        except UserFunctionError as e:
            out.append(TrialResult(label, True, error=e.describe()))
            continue
        out.append(TrialResult(label, True, body, route))
    return out


async def _trial_enrichment(sink: Sink, source: Source, messages: Sequence[QueuedMessage]
                            ) -> dict[int, Any] | None:
    """The sink's enrichment of these messages, as delivery would fetch it (one query)."""
    if not sink.enrichment_sql:
        return None
    enricher = Enricher(source, sink.enrichment_sql)
    try:
        rows = await enricher.fetch(sorted({m.record_pk for m in messages if m.record_pk is not None}))
    except (psycopg.Error, PgsinkError) as e:
        raise ConfigError(f"sink {sink.name}: enrichment query failed: {e}") from None
    finally:
        await enricher.close()
    return {m.id: rows.get(m.record_pk) for m in messages if m.record_pk is not None}
