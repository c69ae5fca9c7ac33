"""Postgres text values -> the JSON a user expects.

Both decoders (pgoutput and wal2json) hand every column value to the same
converters here, so the two produce identical records. The rules, in short:

* numbers are JSON numbers: int2/4/8 and oid as ints, float4/8 as floats,
  numeric as a :class:`RawJson` that serialises with exactly the digits
  Postgres printed (``123.4500`` stays ``123.4500``, no float rounding);
  ``NaN`` / ``Infinity`` / ``-Infinity`` are strings (JSON has no such numbers);
* json/jsonb are nested JSON (a :class:`RawJson` of the document text, so its
  numbers keep their digits too);
* timestamps are ISO 8601 with six fractional digits; timestamptz is converted
  to UTC and ends in ``Z`` (Sequin's format); timetz keeps its offset;
  date, interval, money, bytea (``\\x..`` hex, as Sequin sends it), network
  and range types are the text Postgres prints;
* arrays become (nested) lists, composites become objects, enums are strings,
  domains convert as their base type;
* anything unknown or odd stays the text Postgres printed: conversion never
  raises out of :meth:`TypeRegistry.convert`.

Serialise records with :func:`.jsontext.dumps` (``orjson`` with its ``default`` hook):
plain ``orjson.dumps`` rejects :class:`RawJson`. Why not return
``orjson.Fragment`` directly: a Fragment is opaque (its text cannot be read
back), compares equal only to itself and stringifies to its address, so group
keys, filters and equality checks on records would silently go wrong.

The output of pgoutput and wal2json depends on the session settings of the
decoding session; the converters have fast paths for the defaults plus
``TimeZone=UTC`` and fall back to the printed text for anything else. The
reader should start its replication session with
``options='-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=postgres
-c bytea_output=hex -c extra_float_digits=1'``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from .jsontext import RawJson, jsonb_refuses
from .queries import QUERIES

log = logging.getLogger("pgsink.decode")

Converter = Callable[[str], Any]
"""Turns one value's text output into a JSON-able value; may raise on odd input
(callers catch and keep the text). ``None`` in a converter slot means "keep the text"."""

FIRST_USER_OID = 10000
"""Type oids below this are built into every server and never need a catalog query."""


# ------------------------------------------------------------ scalar converters

_SPECIAL_NUMBERS = frozenset(("NaN", "Infinity", "-Infinity"))


def _bool(text: str) -> Any:
    if text == "t":
        return True
    if text == "f":
        return False
    return text


def _float(text: str) -> Any:
    """Finite floats become numbers; NaN/Infinity stay strings (JSON has no such numbers)."""
    if text in _SPECIAL_NUMBERS:
        return text
    return float(text)


def _numeric(text: str) -> Any:
    """Exact: the same digits Postgres printed, as a JSON number."""
    if text in _SPECIAL_NUMBERS:
        return text
    return RawJson(text)


def _json(text: str) -> Any:
    """The document itself, unless jsonb refuses it (json takes a \\u0000 escape, a lone surrogate, 1e200000;
    the retention log is jsonb): then its text, a JSON string, the rule for what cannot be converted."""
    if jsonb_refuses(text):
        return text
    return RawJson(text)


def _jsonb(text: str) -> Any:
    """The document itself (jsonb printed it, so jsonb takes it back)."""
    return RawJson(text)


def _pad_time(t: str) -> str:
    """``HH:MM:SS[.f{1,6}]`` -> ``HH:MM:SS.ffffff`` (Postgres strips trailing zeros)."""
    n = len(t)
    if n == 15:
        return t
    if n == 8:
        return t + ".000000"
    if 10 <= n < 15 and t[8] == ".":
        return (t + "00000")[:15]
    raise ValueError(t)


def _time(text: str) -> Any:
    return _pad_time(text)


def _iso_offset(off: str) -> str:
    """``+00`` -> ``Z``; ``+02`` -> ``+02:00``; ``+05:30`` and ``+05:30:12`` unchanged."""
    if len(off) == 3:
        return "Z" if off[1:] == "00" else off + ":00"
    if off[1:] == "00:00":
        return "Z"
    return off


def _timetz(text: str) -> Any:
    i = max(text.rfind("+"), text.rfind("-"))
    if i < 8:
        raise ValueError(text)
    return _pad_time(text[:i]) + _iso_offset(text[i:])


def _timestamp(text: str) -> Any:
    """``2024-01-02 03:04:05.12`` -> ``2024-01-02T03:04:05.120000``; BC/infinity unchanged."""
    # six fractional digits, most values (not "…12:00:00.123 BC", 26 characters too)
    if len(text) == 26 and text[4] == "-" and text[10] == " " and text[19] == "." and text[-1] != "C":
        return text.replace(" ", "T", 1)
    if len(text) < 19 or text[4] != "-" or text[10] != " " or text[-1] == "C":
        return text
    return text[:10] + "T" + _pad_time(text[11:])


def _timestamptz(text: str) -> Any:
    """ISO 8601 in UTC with ``Z``; fast when the session TimeZone is UTC."""
    # the common case, fast: six fractional digits in UTC
    if len(text) == 29 and text[4] == "-" and text[10] == " " and text[19] == "." and text[26:] == "+00":
        return text[:26].replace(" ", "T", 1) + "Z"
    if len(text) < 22 or text[4] != "-" or text[10] != " " or text[-1] == "C":
        return text  # infinity, BC, years past 9999: as printed
    if text[-3:] == "+00":
        return text[:10] + "T" + _pad_time(text[11:-3]) + "Z"
    return datetime.fromisoformat(text).astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def _vector(text: str) -> Any:
    """pgvector ``[1,2.5,3]`` -> list of floats (as Sequin sends it)."""
    if len(text) < 2 or text[0] != "[" or text[-1] != "]":
        return text
    inner = text[1:-1]
    return [float(x) for x in inner.split(",")] if inner else []


# ------------------------------------------------------------ arrays and records


def _read_quoted(text: str, i: int) -> tuple[str, int]:
    """Read a double-quoted token starting at ``text[i] == '"'``; return (value, index after it).

    Backslash escapes the next character (array and record output); a doubled
    quote is a literal quote (record output).
    """
    parts: list[str] = []
    j = i + 1
    while True:
        q = text.find('"', j)
        if q < 0:
            raise ValueError("unterminated quote")
        b = text.find("\\", j, q)
        if b >= 0:
            parts.append(text[j:b])
            parts.append(text[b + 1])
            j = b + 2
            continue
        parts.append(text[j:q])
        if q + 1 < len(text) and text[q + 1] == '"':
            parts.append('"')
            j = q + 2
            continue
        return "".join(parts), q + 1


def parse_array(text: str, delim: str = ",") -> list[Any]:
    """Postgres array text -> nested lists of ``str`` / ``None`` (NULL).

    Handles quoting, backslash escapes, NULL, any number of dimensions and the
    ``[lo:hi]=`` prefix of arrays with non-default bounds.
    """
    i = 0
    if text[:1] == "[":
        i = text.index("=") + 1
    if text[i] != "{":
        raise ValueError(text)
    n = len(text)
    stack: list[list[Any]] = []
    cur: list[Any] = []
    i += 1
    while i < n:
        c = text[i]
        if c == "{":
            new: list[Any] = []
            cur.append(new)
            stack.append(cur)
            cur = new
            i += 1
        elif c == "}":
            if not stack:
                return cur
            cur = stack.pop()
            i += 1
        elif c == delim or c == " ":
            i += 1
        elif c == '"':
            value, i = _read_quoted(text, i)
            cur.append(value)
        else:
            j = i
            while j < n and text[j] != delim and text[j] != "}":
                j += 1
            token = text[i:j].strip()
            cur.append(None if token == "NULL" else token)
            i = j
    raise ValueError("unterminated array")


def _convert_nested(items: list[Any], conv: Converter | None) -> list[Any]:
    out: list[Any] = []
    for x in items:
        if x is None:
            out.append(None)
        elif type(x) is list:
            out.append(_convert_nested(x, conv))
        elif conv is None:
            out.append(x)
        else:
            out.append(conv(x))
    return out


def make_array_converter(elem: Converter | None, delim: str = ",") -> Converter:
    """Converter for an array type whose elements convert with ``elem``."""

    def convert_array(text: str) -> Any:
        # fast path: one dimension, nothing quoted
        if text[:1] == "{" and '"' not in text and text.count("{") == 1:
            inner = text[1:-1]
            if not inner:
                return []
            if elem is None:
                parts = inner.split(delim)
                return parts if "NULL" not in parts else [None if p == "NULL" else p for p in parts]
            return [None if p == "NULL" else elem(p) for p in inner.split(delim)]
        return _convert_nested(parse_array(text, delim), elem)

    return convert_array


def parse_record(text: str) -> list[str | None]:
    """Composite text ``(a,"b c",,)`` -> field texts, ``None`` for NULL (empty unquoted)."""
    if len(text) < 2 or text[0] != "(" or text[-1] != ")":
        raise ValueError(text)
    out: list[str | None] = []
    end = len(text) - 1
    i = 1
    while True:
        if i >= end or text[i] == ",":
            out.append(None)
        elif text[i] == '"':
            value, i = _read_quoted(text, i)
            out.append(value)
        else:
            j = text.find(",", i, end)
            if j < 0:
                j = end
            out.append(text[i:j])
            i = j
        if i >= end:
            return out
        i += 1  # the comma


def make_record_converter(fields: Sequence[tuple[str, Converter | None]]) -> Converter:
    """Converter for a composite type: an object with each field converted."""
    fields = tuple(fields)

    def convert_record(text: str) -> Any:
        values = parse_record(text)
        if len(values) != len(fields):
            if not fields and values == [None]:
                return {}
            # the type changed since the catalog was read: keep the text rather than drop a field
            raise ValueError("composite value does not match the type's attributes")
        out: dict[str, Any] = {}
        for (name, conv), v in zip(fields, values, strict=True):
            if v is None or conv is None:
                out[name] = v
            else:
                out[name] = conv(v)
        return out

    return convert_record


# ------------------------------------------------------------ builtin catalogue

_SCALARS: dict[int, Converter | None] = {
    16: _bool,
    20: int, 21: int, 23: int, 26: int,  # Postgres prints plain decimal ints
    700: _float, 701: _float,
    1700: _numeric,
    114: _json, 3802: _jsonb,
    1083: _time, 1266: _timetz, 1114: _timestamp, 1184: _timestamptz,
}

# builtin array oid -> element oid (pg_type, PostgreSQL 15; int2vector/oidvector left out:
# they print space-separated, not as arrays)
_BUILTIN_ARRAYS: dict[int, int] = {
    143: 142, 199: 114, 210: 71, 270: 75, 271: 5069, 272: 81, 273: 83, 629: 628, 651: 650,
    719: 718, 775: 774, 791: 790, 1000: 16, 1001: 17, 1002: 18, 1003: 19, 1005: 21, 1006: 22,
    1007: 23, 1008: 24, 1009: 25, 1010: 27, 1011: 28, 1012: 29, 1013: 30, 1014: 1042,
    1015: 1043, 1016: 20, 1017: 600, 1018: 601, 1019: 602, 1020: 603, 1021: 700, 1022: 701,
    1027: 604, 1028: 26, 1034: 1033, 1040: 829, 1041: 869, 1115: 1114, 1182: 1082, 1183: 1083,
    1185: 1184, 1187: 1186, 1231: 1700, 1263: 2275, 1270: 1266, 1561: 1560, 1563: 1562,
    2201: 1790, 2207: 2202, 2208: 2203, 2209: 2204, 2210: 2205, 2211: 2206, 2949: 2970,
    2951: 2950, 3221: 3220, 3643: 3614, 3644: 3642, 3645: 3615, 3735: 3734, 3770: 3769,
    3807: 3802, 3905: 3904, 3907: 3906, 3909: 3908, 3911: 3910, 3913: 3912, 3927: 3926,
    4073: 4072, 4090: 4089, 4097: 4096, 4192: 4191, 5039: 5038, 6150: 4451, 6151: 4532,
    6152: 4533, 6153: 4534, 6155: 4535, 6157: 4536,
}
_BOX_ARRAY = 1020  # the one builtin array whose delimiter is ';'


def _builtin_converters() -> dict[int, Converter | None]:
    out: dict[int, Converter | None] = dict(_SCALARS)
    for arr, elem in _BUILTIN_ARRAYS.items():
        out[arr] = make_array_converter(_SCALARS.get(elem), ";" if arr == _BOX_ARRAY else ",")
    return out


BUILTIN_CONVERTERS: dict[int, Converter | None] = _builtin_converters()
"""Every type oid below 10000 not listed here is text (the printed form is kept)."""


# ------------------------------------------------------------ catalog model


@dataclass(frozen=True, slots=True)
class TypeRow:
    """One pg_type row as far as conversion needs it (see ``types_by_oid``)."""

    oid: int
    name: str
    schema: str
    typtype: str        # b base, c composite, d domain, e enum, p pseudo, r range, m multirange
    category: str       # pg_type.typcategory ('A' = array)
    elem: int           # element type of an array, else 0
    base: int           # base type of a domain, else 0
    delim: str          # array delimiter of this type as an element
    attributes: tuple[tuple[str, int], ...]  # composite fields (name, type oid)


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    name: str
    type_oid: int
    varlena: bool       # typlen = -1: may be sent as unchanged TOAST
    generated: bool     # generated column (pgoutput does not send these)


@dataclass(frozen=True, slots=True)
class RelationInfo:
    """What the catalog says about a published table at the time it was loaded."""

    oid: int
    schema: str
    name: str
    replica_identity: str                 # d default, f full, i index, n nothing
    primary_key: tuple[str, ...]
    identity_columns: tuple[str, ...]     # replica identity index columns (d with a PK, or i)
    columns: tuple[ColumnInfo, ...]       # attnum order, no dropped columns
    root: tuple[int, str, str] | None     # topmost partitioned ancestor, for partitions

    @property
    def key_columns(self) -> tuple[str, ...]:
        """The row's identity: the primary key, else the replica identity index."""
        return self.primary_key or self.identity_columns


# ------------------------------------------------------------ the registry


class TypeRegistry:
    """Type oid -> converter, for builtins at once and for user types after :meth:`load`.

    Also remembers relation facts the replication stream does not carry
    (primary key, replica identity, columns, partition root). Decoders ask for
    a relation with :meth:`want_relation` / :meth:`want_relation_named` when
    they emit ``RelationSeen``; the reader's ``await load(conn, oids)`` then
    answers every pending wish together with the types.

    ``version`` grows whenever a load changes anything, so decoders can cache
    per-relation converter lists and rebuild them only when needed.
    """

    def __init__(self) -> None:
        self._conv: dict[int, Converter | None] = dict(BUILTIN_CONVERTERS)
        self._rows: dict[int, TypeRow] = {}
        self._attempted: set[int] = set()
        self._relations: dict[int, RelationInfo] = {}
        self._by_name: dict[tuple[str, str], RelationInfo] = {}
        self._want_oids: set[int] = set()
        self._want_names: set[tuple[str, str]] = set()
        self.version = 0

    # ---- conversion

    def converter(self, type_oid: int) -> Converter | None:
        """The converter for a type; ``None`` means the text is kept as it is."""
        return self._conv.get(type_oid)

    def convert(self, type_oid: int, text: str | None) -> Any:
        """Convert one value; never raises (odd input comes back as the text)."""
        if text is None:
            return None
        conv = self._conv.get(type_oid)
        if conv is None:
            return text
        try:
            return conv(text)
        except Exception:  # noqa: BLE001 - contract: fall back to the printed text
            return text

    # ---- what is known

    def knows(self, type_oid: int) -> bool:
        """True if converting this type needs no catalog query (builtin or loaded or tried)."""
        return type_oid < FIRST_USER_OID or type_oid in self._conv or type_oid in self._attempted

    def missing(self, type_oids: Iterable[int]) -> list[int]:
        return [o for o in type_oids if not self.knows(o)]

    def needs_load(self, type_oids: Iterable[int] = ()) -> bool:
        """True if a :meth:`load` would learn something the decoders asked for."""
        return bool(self._want_oids or self._want_names or self.missing(type_oids))

    # ---- relations

    def want_relation(self, oid: int) -> None:
        """Ask the next :meth:`load` to (re)read this relation's catalog facts."""
        self._want_oids.add(oid)

    def want_relation_named(self, schema: str, name: str) -> None:
        self._want_names.add((schema, name))

    def relation(self, oid: int) -> RelationInfo | None:
        return self._relations.get(oid)

    def relation_named(self, schema: str, name: str) -> RelationInfo | None:
        return self._by_name.get((schema, name))

    # ---- loading

    async def load(self, conn: psycopg.AsyncConnection[Any], oids: Iterable[int] = ()) -> None:
        """Read the catalog for the user types in ``oids`` (and everything they
        reference) and for the relations the decoders asked about.

        User types are re-read even when known, so a composite or enum altered
        since the last load is picked up at the next ``RelationSeen``.
        """
        wanted = set(oids)
        async with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
            if self._want_oids or self._want_names:
                want_oids, want_names = sorted(self._want_oids), sorted(self._want_names)
                self._want_oids, self._want_names = set(), set()
                await cur.execute(QUERIES["types_relations"], {
                    "oids": want_oids,
                    "schemas": [s for s, _ in want_names],
                    "names": [n for _, n in want_names],
                })
                for rel in self.add_relation_rows(await cur.fetchall()):
                    wanted.update(c.type_oid for c in rel.columns)
            todo = {o for o in wanted if o >= FIRST_USER_OID}
            done: set[int] = set()
            rows: list[Sequence[Any]] = []
            while todo:
                await cur.execute(QUERIES["types_by_oid"], {"oids": sorted(todo)})
                batch = await cur.fetchall()
                rows.extend(batch)
                done |= todo
                refs: set[int] = set()
                for _oid, _n, _s, _t, _c, elem, base, _d, _names, atttypes in batch:
                    refs.update((int(elem or 0), int(base or 0)))
                    refs.update(int(t) for t in atttypes or ())
                todo = {o for o in refs if o >= FIRST_USER_OID} - done
            if done:
                self.add_type_rows(rows, attempted=done)
        log.debug("types loaded", extra={"types": len(self._rows), "relations": len(self._relations)})

    def add_relation_rows(self, rows: Iterable[Sequence[Any]]) -> list[RelationInfo]:
        """Record rows of the ``types_relations`` query (pure; used by :meth:`load` and tests)."""
        added: list[RelationInfo] = []
        for (oid, schema, name, replident, pk, ident, colnames, coltypes, collens, colgen,
             root_oid, root_schema, root_name) in rows:
            columns = tuple(
                ColumnInfo(n, int(t), int(ln) == -1, bool(g))
                for n, t, ln, g in zip(colnames, coltypes, collens, colgen, strict=True)
            )
            root = (int(root_oid), root_schema, root_name) if root_oid and int(root_oid) != int(oid) else None
            info = RelationInfo(int(oid), schema, name, str(replident), tuple(pk), tuple(ident), columns, root)
            old = self._relations.get(info.oid)
            if old is not None and self._by_name.get((old.schema, old.name)) is old:
                del self._by_name[(old.schema, old.name)]
            self._relations[info.oid] = info
            self._by_name[(schema, name)] = info
            self._want_oids.discard(info.oid)
            self._want_names.discard((schema, name))
            added.append(info)
        self.version += 1
        return added

    def add_type_rows(self, rows: Iterable[Sequence[Any]], attempted: Iterable[int] = ()) -> list[TypeRow]:
        """Record rows of the ``types_by_oid`` query and build their converters (pure)."""
        new: list[TypeRow] = []
        for oid, name, schema, typtype, category, elem, base, delim, attnames, atttypes in rows:
            row = TypeRow(int(oid), name, schema, str(typtype), str(category), int(elem or 0), int(base or 0),
                          str(delim or ","), tuple(zip(attnames or (), map(int, atttypes or ()), strict=True)))
            self._rows[row.oid] = row
            new.append(row)
        self._attempted.update(attempted)
        self._attempted.update(r.oid for r in new)
        # rebuild every user type: converters embed the converters of the types they contain
        for oid in self._rows:
            self._conv.pop(oid, None)
        building: set[int] = set()
        for oid in self._rows:
            self._build(oid, building)
        self.version += 1
        return new

    def _build(self, oid: int, building: set[int]) -> Converter | None:
        """Converter for a loaded type, building what it references first."""
        if oid in self._conv or oid not in self._rows:
            return self._conv.get(oid)
        if oid in building:  # a cycle cannot happen in Postgres; be safe anyway
            return None
        building.add(oid)
        row = self._rows[oid]
        conv: Converter | None = None
        if row.typtype == "d":
            conv = self._build(row.base, building)
        elif row.typtype == "c":
            conv = make_record_converter([(n, self._build(t, building)) for n, t in row.attributes])
        elif row.category == "A" and row.elem:
            elem_row = self._rows.get(row.elem)
            delim = elem_row.delim if elem_row else ","
            conv = make_array_converter(self._build(row.elem, building), delim)
        elif row.typtype == "b" and row.name == "vector":
            conv = _vector
        self._conv[oid] = conv
        building.discard(oid)
        return conv
