"""wal2json (format-version 2) -> the same events as :class:`~.decode.PgoutputDecoder`.

Expected plugin options: ``format-version 2, include-xids 1, include-timestamp 1,
include-lsn 1, include-type-oids 1, include-transaction 1, include-pk 1`` and,
with wal2json 2.6 or newer, ``numeric-data-types-as-string 1`` (see below).
Each payload is one JSON object with ``action`` B, C, I, U, D, T or M.

How the output is made identical to pgoutput's:

* Values: wal2json prints numbers and booleans bare, strips ``\\x`` from bytea
  and quotes everything else. Each value is turned back into the text Postgres
  printed (numbers are parsed as their literal text, never as floats) and goes
  through the same :class:`~.values.TypeRegistry` converters.
* LSNs: B/C ``lsn`` is the commit record's LSN (pgoutput Begin.final_lsn and
  Commit.commit_lsn) and ``nextlsn`` is the end of the commit record
  (Commit.end_lsn); they match exactly.
* Tables: wal2json gives names, not oids. The first change of a table emits
  ``RelationSeen`` (oid 0 until the catalog is loaded) and asks the registry to
  look the table up by name; decoding pauses so the change is built after
  ``load`` with the oid, primary key and replica identity from the catalog.
* Unchanged TOAST columns are simply missing from a wal2json update. Columns a
  table is known to have (from its last insert or the catalog) that an update
  lacks are reported in ``unchanged_toast``; the first time a given set of
  columns is missing the catalog is re-read, so a dropped column is not
  mistaken for an untouched one.
* Empty transactions (wal2json prints BEGIN/COMMIT for DDL) produce nothing.

Known differences that cannot be removed:

* numeric/float ``NaN`` and ``Infinity`` are printed as JSON ``null`` by
  wal2json older than 2.6 (no ``numeric-data-types-as-string``), so they
  arrive as ``None`` instead of ``"NaN"``.
* TRUNCATE: wal2json prints one object per table and neither ``CASCADE`` nor
  ``RESTART IDENTITY``; consecutive objects are merged into one
  ``TableTruncate`` with both flags false.
* Logical message content is a JSON string: binary content that is not valid
  text in the database encoding is mangled by wal2json itself.
* Partitions: wal2json before 2.6 names the leaf partition. With
  ``partition_root=True`` the decoder maps it to the topmost partitioned table
  (like ``publish_via_partition_root``) using the catalog.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .decode import (
    Event,
    LogicalMessage,
    RelationSeen,
    RowChange,
    TableTruncate,
    TxBegin,
    TxCommit,
    changed_old_values,
    convert_row,
    old_values_record,
)
from .framing import DecodeError, parse_lsn
from .pgoutput import UNCHANGED_TOAST
from .values import Converter, TypeRegistry

log = logging.getLogger("pgsink.decode")

WAL2JSON_OPTIONS: dict[str, str] = {
    "format-version": "2",
    "include-xids": "1",
    "include-timestamp": "1",
    "include-lsn": "1",
    "include-type-oids": "1",
    "include-transaction": "1",
    "include-pk": "1",
}
"""The plugin options this decoder expects (add ``numeric-data-types-as-string`` on wal2json >= 2.6)."""

_BYTEA = 17
_BOOL = 16


_JSON = json.JSONDecoder(parse_int=str, parse_float=str, parse_constant=str)


def _loads(payload: bytes | str) -> dict[str, Any]:
    """Parse keeping every number as its literal text (no float rounding).

    (Measured: ``orjson`` plus copying numeric digits back from the bytes was
    slower than this, and harder to trust.)
    """
    try:
        text = payload if isinstance(payload, str) else bytes(payload).decode("utf-8", "replace")
        obj = _JSON.decode(text)
    except ValueError as e:
        raise DecodeError(f"wal2json payload is not JSON: {e}") from e
    if not isinstance(obj, dict) or "action" not in obj:
        raise DecodeError("wal2json payload is not a format-version 2 object; use 'format-version' '2'")
    return obj


def _text(type_oid: int, value: Any) -> Any:
    """A wal2json value -> the text Postgres printed (numbers already are, see ``_loads``)."""
    if value is None:
        return None
    if value is True:
        return "t"
    if value is False:
        return "f"
    if type_oid == _BYTEA:
        return "\\x" + value
    return value


def _timestamp(text: str | None) -> datetime:
    if not text:
        return datetime(2000, 1, 1, tzinfo=UTC)
    return datetime.fromisoformat(text).astimezone(UTC)


@dataclass(slots=True)
class _Col:
    name: str
    type_oid: int


Signature = list[tuple[str, str]]
"""A payload's columns as (name, type oid text), compared as a whole to spot shape changes."""


@dataclass(slots=True)
class _Plan:
    """How to turn a payload of one table into a record, valid for one registry version."""

    version: int
    columns: list[_Col]                    # the record's columns (generated ones left out)
    names: list[str]
    convs: list[Converter | None]
    keep: list[int] | None                 # their positions among the table's columns; None: all
    fixes: list[tuple[int, int]]           # (position, type oid) of bool/bytea columns to re-text
    target: tuple[int, str, str]           # (oid, schema, table) the events name
    keys: tuple[str, ...] | None           # from the catalog; None: use the payload's pk


@dataclass(slots=True)
class _Table:
    """What the decoder knows about one table as wal2json names it."""

    schema: str
    name: str
    columns: list[_Col] | None = None      # the table's columns, in attnum order
    sig: Signature | None = None           # ``columns`` as a payload would list them
    verified_missing: set[frozenset[str]] = field(default_factory=set)
    announced: bool = False
    plan: _Plan | None = None

    def set_columns(self, columns: list[_Col] | None) -> None:
        self.columns = columns
        self.sig = None if columns is None else [(c.name, str(c.type_oid)) for c in columns]
        self.plan = None


@dataclass(slots=True)
class _Item:
    obj: dict[str, Any]
    announced: bool = False
    sig: Signature | None = None


class Wal2JsonDecoder:
    """wal2json v2 payloads -> normalised events (same contract as PgoutputDecoder)."""

    def __init__(self, types: TypeRegistry, *, partition_root: bool = False) -> None:
        self.types = types
        self.partition_root = partition_root
        self._queue: deque[_Item] = deque()
        self._tables: dict[tuple[str, str], _Table] = {}
        self._begin: TxBegin | None = None
        self._begin_sent = False
        self._truncating: list[tuple[int, str, str]] = []
        self._truncate_lsn: str | None = None

    # ---- public

    @property
    def pending(self) -> bool:
        return bool(self._queue)

    def feed(self, payload: bytes | str) -> list[Event]:
        self._queue.append(_Item(_loads(payload)))
        return self._drain()

    def resume(self) -> list[Event]:
        return self._drain()

    # ---- main loop

    def _drain(self) -> list[Event]:
        out: list[Event] = []
        queue = self._queue
        while queue:
            item = queue[0]
            obj = item.obj
            action = obj["action"]
            if self._truncating and (action != "T" or obj.get("lsn") != self._truncate_lsn):
                out.append(self._flush_truncate())
            if action in ("I", "U", "D", "T"):
                seen = self._check_table(item)
                if seen is not None:
                    out.append(seen)
                    if self.types.needs_load(seen.type_oids):
                        break  # the caller loads; the same item is decoded on resume
                queue.popleft()
                self._tx_started(out)
                if action == "T":
                    self._truncate(obj)
                else:
                    out.append(self._row(item))
                continue
            queue.popleft()
            if action == "B":
                self._begin = TxBegin(parse_lsn(obj["lsn"]), _timestamp(obj.get("timestamp")), int(obj["xid"]))
                self._begin_sent = False
            elif action == "C":
                if self._begin_sent:
                    out.append(TxCommit(parse_lsn(obj["lsn"]), parse_lsn(obj["nextlsn"])))
                self._begin, self._begin_sent = None, False
            elif action == "M":
                transactional = bool(obj.get("transactional"))
                if transactional:
                    self._tx_started(out)
                content = obj.get("content") or ""
                out.append(LogicalMessage(transactional, obj.get("prefix") or "", content.encode("utf-8")))
            else:
                raise DecodeError(f"unknown wal2json action {action!r}")
        return out

    def _tx_started(self, out: list[Event]) -> None:
        if not self._begin_sent and self._begin is not None:
            out.append(self._begin)
            self._begin_sent = True

    # ---- tables

    @staticmethod
    def _payload_columns(obj: dict[str, Any], key: str) -> list[_Col]:
        return [_Col(c["name"], int(c["typeoid"])) for c in obj.get(key) or ()]

    def _check_table(self, item: _Item) -> RelationSeen | None:
        """Decide whether this change shows a table (or table shape) not seen before.

        Returns a RelationSeen to emit before the change, or None. Called again
        for the same item after a pause, when it must not announce twice.
        """
        obj = item.obj
        key = (obj.get("schema") or "public", obj["table"])
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = _Table(*key)
        action = obj["action"]
        given = obj.get("columns")
        sig = item.sig = [(c["name"], str(c["typeoid"])) for c in given] if given else None
        reason = None
        if not table.announced:
            reason = "new table"
        elif action == "I":
            if sig != table.sig:
                reason = "columns changed"
        elif action == "U" and table.sig is not None and sig is not None and sig != table.sig:
            known = dict(table.sig)
            if any(known.get(n) != t for n, t in sig):
                reason = "columns changed"
            else:
                present = {n for n, _ in sig}
                missing = frozenset(n for n, _ in table.sig if n not in present)
                if missing and missing not in table.verified_missing:
                    reason = "columns missing"
        if item.announced or reason is None:
            self._settle_columns(table, action, obj, sig)
            return None
        item.announced = table.announced = True
        if action == "I":
            table.set_columns(self._payload_columns(obj, "columns"))
        elif action == "U" and reason == "columns changed":
            table.set_columns(None)  # re-read from the catalog once loaded
        table.verified_missing.clear()
        self.types.want_relation_named(*key)
        info = self.types.relation_named(*key)
        type_oids = tuple(c.type_oid for c in self._payload_columns(obj, "columns")) or tuple(
            c.type_oid for c in self._payload_columns(obj, "identity"))
        return RelationSeen(info.oid if info else 0, key[0], key[1], type_oids)

    def _settle_columns(self, table: _Table, action: str, obj: dict[str, Any], sig: Signature | None) -> None:
        """After the catalog had its chance: fix the table's column list for this change."""
        if sig is not None and sig == table.sig:
            return  # the usual case: nothing to learn
        info = self.types.relation_named(table.schema, table.name)
        catalog = [_Col(c.name, c.type_oid) for c in info.columns if not c.generated] if info else None
        if action == "I":
            table.set_columns(self._payload_columns(obj, "columns"))
        elif table.columns is None:
            if action == "U" and catalog is None:
                table.set_columns(self._payload_columns(obj, "columns"))
            else:
                table.set_columns(catalog)
        if action == "U" and table.columns is not None and sig is not None:
            present = {n for n, _ in sig}
            missing = frozenset(c.name for c in table.columns if c.name not in present)
            if missing and missing not in table.verified_missing:
                if catalog is not None:  # a column the catalog no longer has was dropped, not TOASTed
                    names = {c.name for c in catalog}
                    kept = [c for c in table.columns if c.name in present or c.name in names]
                    if len(kept) != len(table.columns):
                        table.set_columns(kept)
                    missing = frozenset(c.name for c in kept if c.name not in present)
                table.verified_missing.add(missing)

    def _target(self, schema: str, name: str) -> tuple[tuple[int, str, str], tuple[str, ...] | None]:
        """((oid, schema, table) as the events name the table, key columns from the catalog)."""
        info = self.types.relation_named(schema, name)
        if info is None:
            return (0, schema, name), None
        if self.partition_root and info.root is not None:
            return info.root, info.key_columns
        return (info.oid, schema, name), info.key_columns

    def _plan(self, table: _Table, obj: dict[str, Any]) -> _Plan:
        plan = table.plan
        if plan is not None and plan.version == self.types.version:
            return plan
        known = (table.columns or self._payload_columns(obj, "columns")
                 or self._payload_columns(obj, "identity"))
        generated = self._generated(table.schema, table.name)
        keep = [i for i, c in enumerate(known) if c.name not in generated]
        columns = [known[i] for i in keep]
        target, keys = self._target(table.schema, table.name)
        plan = _Plan(
            self.types.version, columns, [c.name for c in columns],
            [self.types.converter(c.type_oid) for c in columns],
            None if len(keep) == len(known) else keep,
            [(i, c.type_oid) for i, c in enumerate(known) if c.type_oid in (_BOOL, _BYTEA)],
            target, keys,
        )
        if table.columns is not None:
            table.plan = plan
        return plan

    # ---- rows

    def _row(self, item: _Item) -> RowChange:
        obj = item.obj
        table = self._tables[(obj.get("schema") or "public", obj["table"])]
        plan = self._plan(table, obj)
        oid, schema, name = plan.target
        keys = plan.keys
        if keys is None:
            keys = tuple(c["name"] for c in obj.get("pk") or ())
        action = obj["action"]

        if action == "D":
            old = self._aligned(plan.columns, obj.get("identity"), missing=None)
            record = old_values_record(plan.names, plan.convs, old)
            return RowChange("delete", oid, schema, name, record, None, keys, ())

        if item.sig is not None and item.sig == table.sig:  # the payload has exactly the table's columns
            new = [c.get("value") for c in obj["columns"]]
            for i, type_oid in plan.fixes:
                new[i] = _text(type_oid, new[i])
            if plan.keep is not None:
                new = [new[i] for i in plan.keep]
            record, toast = convert_row(plan.names, plan.convs, new, False)
        else:
            new = self._aligned(plan.columns, obj.get("columns"), missing=UNCHANGED_TOAST)
            record, toast = convert_row(plan.names, plan.convs, new)
        if action == "I":
            return RowChange("insert", oid, schema, name, record, None, keys, toast)
        changes = None
        if self._identity_is_full(table.schema, table.name, plan.columns, obj):
            old = self._aligned(plan.columns, obj.get("identity"), missing=UNCHANGED_TOAST)
            changes = changed_old_values(plan.names, plan.convs, old, new)
        return RowChange("update", oid, schema, name, record, changes, keys, toast)

    def _generated(self, schema: str, name: str) -> frozenset[str]:
        """Generated columns: wal2json prints them, pgoutput (before PostgreSQL 18) does not."""
        info = self.types.relation_named(schema, name)
        return frozenset(c.name for c in info.columns if c.generated) if info else frozenset()

    @staticmethod
    def _aligned(columns: list[_Col], given: list[dict[str, Any]] | None, missing: Any) -> list[Any]:
        """Values in the table's column order, as texts; absent columns get ``missing``."""
        by_name = {c["name"]: c for c in given or ()}
        out: list[Any] = []
        for col in columns:
            c = by_name.get(col.name)
            out.append(missing if c is None else _text(col.type_oid, c.get("value")))
        return out

    def _identity_is_full(self, schema: str, name: str, columns: list[_Col], obj: dict[str, Any]) -> bool:
        """Does ``identity`` hold the whole old row (REPLICA IDENTITY FULL)?

        Read from the payload itself, so switching a table to FULL takes effect
        at once: wal2json prints the whole old row then, and only the key
        columns otherwise. Only when the key is every column is the payload
        ambiguous; then the catalog decides.
        """
        identity = {c["name"] for c in obj.get("identity") or ()}
        every = {c.name for c in columns}
        if not identity or not identity >= every:
            return False
        key = {c["name"] for c in obj.get("pk") or ()}
        if key != every:
            return True
        info = self.types.relation_named(schema, name)
        return info is not None and info.replica_identity == "f"

    # ---- truncate

    def _truncate(self, obj: dict[str, Any]) -> None:
        entry, _ = self._target(obj.get("schema") or "public", obj["table"])
        if entry not in self._truncating:
            self._truncating.append(entry)
        self._truncate_lsn = obj.get("lsn")

    def _flush_truncate(self) -> TableTruncate:
        tables, self._truncating, self._truncate_lsn = tuple(self._truncating), [], None
        return TableTruncate(tables, cascade=False, restart_identity=False)
