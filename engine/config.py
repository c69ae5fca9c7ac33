"""Config as code: the webhook subset of Sequin's sequin.yaml, plan, apply, export.

Three layers, each usable on its own:

- **parse** (pure): YAML text -> ``Desired`` specs. We compose the YAML
  ourselves so every error names the key *and* its line; ``${VAR}`` and
  ``${VAR:-default}`` are substituted inside scalar values after parsing, so a
  variable can never inject YAML structure and line numbers stay exact.
- **plan** (pure given the current rows): ``Desired`` vs ``model.Config`` ->
  field-level create/update/delete changes. Objects absent from the file are
  left alone unless pruning is asked for (Sequin's apply does the same).
- **apply**: set up and check every touched source (slot, publication,
  tables) *before* the state transaction starts — creating a logical slot
  waits for every open transaction with an xid, ours included — then write
  all changes in one transaction with ``NOTIFY pgsink_config``.

Secrets (source passwords, encrypted header values) are encrypted at rest
with ``engine.secrets`` and never appear in a message, a plan, or an export:
export writes them as ``${PGSINK_...}`` placeholders.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import date, datetime, timedelta
from typing import Any

import orjson
import psycopg
import yaml
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

from . import enrichment as enrichment_mod
from . import filters as filters_mod
from . import secrets
from . import signing as signing_mod
from . import source as source_checks
from .db import connection
from .errors import ConfigError
from .model import Config, HttpEndpoint, Sink, Source, load_config
from .queries import QUERIES

log = logging.getLogger("pgsink.config")

DEFAULT_RETENTION_SECONDS = 7 * 86400
ACTIONS = ("insert", "update", "delete")
STATUSES = ("active", "paused", "disabled")
DECODERS = ("pgoutput", "wal2json")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_SLOT = re.compile(r"^[a-z0-9_]{1,63}$")
_HEADER_KEY = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


# ====================================================================== specs


@dataclass(frozen=True)
class SourceSpec:
    """A source as the user wants it (``databases:`` entry or `pgsink source add`)."""

    name: str
    hostname: str
    port: int
    database: str
    username: str
    password: str | None = field(repr=False)
    sslmode: str
    slot_name: str
    create_slot: bool
    publication_name: str
    create_publication: bool
    publication_init_sql: str | None
    decoder: str
    retention_seconds: int
    annotations: dict[str, Any]
    line: int = field(default=0, compare=False)

    def to_model(self, id: uuid.UUID | None = None) -> Source:
        """The runtime Source for checks against the real database."""
        return Source(
            id=id or uuid.uuid4(), name=self.name, hostname=self.hostname, port=self.port,
            database=self.database, username=self.username, password=self.password,
            sslmode=self.sslmode, slot_name=self.slot_name, create_slot=self.create_slot,
            publication_name=self.publication_name, create_publication=self.create_publication,
            publication_init_sql=self.publication_init_sql, decoder=self.decoder,
            retention_seconds=float(self.retention_seconds), annotations=self.annotations,
        )


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    url: str
    headers: dict[str, str]
    encrypted_headers: dict[str, str] = field(repr=False)
    signing: bool = False  # Standard Webhooks signatures
    signing_secret: str | None = field(default=None, repr=False)  # None with signing: keep or generate
    block_private_addresses: bool = False
    ca_bundle: str | None = None
    rate_limit: float | None = None  # requests/s across all workers
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class TableSpec:
    name: str  # "schema.table"
    group_column_names: tuple[str, ...] | None

    def split(self) -> tuple[str, str]:
        schema, _, table = self.name.rpartition(".")
        return schema or "public", table


@dataclass(frozen=True)
class SinkSpec:
    name: str
    source: str  # the source's (database's) name
    http_endpoint: str
    http_endpoint_path: str
    status: str
    include_schemas: tuple[str, ...] | None
    exclude_schemas: tuple[str, ...] | None
    include_tables: tuple[str, ...] | None
    exclude_tables: tuple[str, ...] | None
    actions: tuple[str, ...]
    message_grouping: bool
    tables: tuple[TableSpec, ...]
    batch: bool
    batch_size: int
    batch_timeout_ms: int
    request_timeout_ms: int
    max_ack_pending: int
    max_retry_count: int | None
    annotations: dict[str, Any]
    lane_count: int
    filters: tuple[dict[str, Any], ...] = ()  # column filters, sequin.yaml form
    filter_sql: str | None = None
    filter_function: str | None = None
    transform_path: str | None = None
    transform_function: str | None = None
    route_function: str | None = None
    function_timeout_ms: int = 1000
    enrichment_sql: str | None = None
    # tables to backfill when apply creates the sink (sequin.yaml initial_backfill); not a diffable setting
    initial_backfill: tuple[str, ...] = field(default=(), compare=False)
    line: int = field(default=0, compare=False)

    def explicit_tables(self) -> set[tuple[str, str]]:
        """Tables this sink names: each must exist in the source and be published."""
        out = {TableSpec(t, None).split() for t in self.include_tables or ()}
        out |= {t.split() for t in self.tables}
        return out


@dataclass
class Desired:
    """Everything one YAML file (or one CLI command) asks for."""

    sources: list[SourceSpec] = field(default_factory=list)
    endpoints: list[EndpointSpec] = field(default_factory=list)
    sinks: list[SinkSpec] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    filename: str = "<config>"


# ====================================================================== retention


_RETENTION_PART = re.compile(
    r"(\d+)\s*(weeks?|w|days?|d|hours?|hrs?|h|minutes?|mins?|m|seconds?|secs?|s)(?![a-z])", re.I)
_UNIT_SECONDS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_retention(value: object) -> int:
    """'7 days', '36 hours', '1 day 12 hours', '90m' or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("is a boolean")
    if isinstance(value, int):
        seconds = value
    else:
        text = str(value).strip().lower()
        if re.search(r"\b(mon|months?|years?|y)\b", text):
            raise ValueError("months and years vary in length: give it in days (e.g. '30 days')")
        parts = list(_RETENTION_PART.finditer(text))
        rest = _RETENTION_PART.sub("", text).replace(",", "").replace("and", "").strip()
        if not parts or rest:
            raise ValueError("is not a duration like '7 days', '36 hours' or '1 day 12 hours'")
        seconds = 0
        for p in parts:
            unit = p.group(2)
            key = "m" if unit.startswith("mi") or unit == "m" else unit[0]
            seconds += int(p.group(1)) * _UNIT_SECONDS[key]
    if seconds <= 0:
        raise ValueError("must be longer than zero")
    return seconds


def format_retention(seconds: int) -> str:
    """The shortest exact text for a retention period (round-trips through parse_retention)."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds % size == 0:
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds} seconds"


# ====================================================================== env substitution


_ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def substitute(text: str, env: Mapping[str, str], problem: Callable[[str], None]) -> str:
    """Expand ${VAR} and ${VAR:-default} (default also when VAR is empty); $${ is a literal ${.

    Problems (unset variable, malformed reference) are reported by name only:
    a variable's value may be a secret.
    """
    def repl(m: re.Match[str]) -> str:
        whole = m.group(0)
        if whole == "$${":
            return "${"
        if m.group(1) is None:
            problem("malformed variable reference: write ${NAME} or ${NAME:-default} "
                    "(and $${ for a literal ${)")
            return whole
        name, default = m.group(1), m.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is not None:
                return default
            problem(f"environment variable {name} is not set: set it, or give a default "
                    f"with ${{{name}:-default}}")
            return ""
        return value

    return _ENV_REF.sub(repl, text)


# ====================================================================== YAML tree with lines

_UNSET: Any = object()


@dataclass
class _Scalar:
    text: str  # after substitution
    line: int
    tag: str
    implicit: bool  # plain scalar: its type is re-resolved from the substituted text
    py: Any = _UNSET  # set when built from Python values (the CLI)
    broken: bool = False  # substitution failed (already reported): no second error for it


class _Map(dict[str, Any]):
    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.key_lines: dict[str, int] = {}


class _Seq(list[Any]):
    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line


_Node = _Scalar | _Map | _Seq
_CONSTRUCTOR = yaml.SafeLoader("")
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _BadValue(Exception):
    pass


def _resolve(s: _Scalar) -> Any:
    """The Python value of a scalar: YAML 1.1 typing for plain scalars, str for quoted ones."""
    if s.py is not _UNSET:
        return s.py
    tag = _CONSTRUCTOR.resolve(yaml.ScalarNode, s.text, (True, False)) if s.implicit else s.tag
    ctor = _CONSTRUCTOR.yaml_constructors.get(tag)
    if ctor is None:
        raise _BadValue(f"unsupported YAML tag {tag}")
    try:
        value = ctor(_CONSTRUCTOR, yaml.ScalarNode(tag, s.text))
    except (yaml.YAMLError, ValueError, TypeError):
        raise _BadValue(f"cannot read the value as {tag.rsplit(':', 1)[-1]}") from None
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        raise _BadValue("binary values are not supported")
    return value


def _is_null(s: _Scalar) -> bool:
    if s.py is not _UNSET:
        return s.py is None
    return s.implicit and s.text in ("", "~", "null", "Null", "NULL")


class _Loader(yaml.SafeLoader):
    """Composes nodes (not objects) and remembers which nodes carry an &anchor."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.anchored: set[int] = set()

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        anchor = None if isinstance(event, yaml.AliasEvent) else getattr(event, "anchor", None)
        node = super().compose_node(parent, index)
        if anchor is not None:
            self.anchored.add(id(node))
        return node


class _Report:
    """Collects every error and warning of one file, each prefixed with file:line."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.errors: list[tuple[int, str]] = []
        self.warnings: list[str] = []

    def _at(self, line: int, msg: str) -> str:
        return f"{self.filename}:{line}: {msg}" if line else f"{self.filename}: {msg}"

    def error(self, line: int, msg: str) -> None:
        self.errors.append((line, self._at(line, msg)))

    def warn(self, line: int, msg: str) -> None:
        self.warnings.append(self._at(line, msg))

    def raise_if_errors(self) -> None:
        if self.errors:
            n = len(self.errors)
            ordered = [msg for _, msg in sorted(self.errors, key=lambda e: e[0])]
            raise ConfigError(f"{n} problem{'s' if n > 1 else ''} in {self.filename}:\n" + "\n".join(ordered))


class _Builder:
    """Turns composed YAML nodes into _Map/_Seq/_Scalar with lines, resolving << merges."""

    def __init__(self, report: _Report, env: Mapping[str, str]) -> None:
        self.report = report
        self.env = env

    def build(self, node: yaml.Node, stack: tuple[int, ...] = ()) -> _Node:
        line = node.start_mark.line + 1
        if id(node) in stack:
            self.report.error(line, "recursive alias: a node cannot contain itself")
            return _Scalar("", line, "tag:yaml.org,2002:null", False)
        stack = (*stack, id(node))
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, line)
        if isinstance(node, yaml.SequenceNode):
            seq = _Seq(line)
            seq.extend(self.build(item, stack) for item in node.value)
            return seq
        assert isinstance(node, yaml.MappingNode)
        return self._mapping(node, line, stack)

    def _scalar(self, node: yaml.ScalarNode, line: int) -> _Scalar:
        problems: list[str] = []
        text = substitute(node.value, self.env, problems.append)
        for msg in problems:
            self.report.error(line, msg)
        implicit = node.style is None and node.tag == _CONSTRUCTOR.resolve(
            yaml.ScalarNode, node.value, (True, False))
        return _Scalar(text, line, node.tag, implicit, broken=bool(problems))

    def _mapping(self, node: yaml.MappingNode, line: int, stack: tuple[int, ...]) -> _Map:
        out = _Map(line)
        merged: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merged += value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        # Earlier merge sources win over later ones; explicit keys win over all.
        for source in reversed(merged):
            if not isinstance(source, yaml.MappingNode):
                self.report.error(source.start_mark.line + 1, "<< must merge a mapping (an &anchor of one)")
                continue
            built = self._mapping(source, source.start_mark.line + 1, (*stack, id(source)))
            out.update(built)
            out.key_lines.update(built.key_lines)
        explicit: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                self.report.error(key_line, "mapping keys must be plain strings")
                continue
            key = str(key_node.value)
            if key in explicit:
                self.report.error(key_line, f"duplicate key {key!r} (first at line {explicit[key]})")
                continue
            explicit[key] = key_line
            out[key] = self.build(value_node, stack)
            out.key_lines[key] = key_line
        return out


def _from_python(value: Any, line: int = 0) -> _Node:
    """The same tree from Python values: the CLI builds specs through the YAML validators."""
    if isinstance(value, Mapping):
        m = _Map(line)
        for k, v in value.items():
            m[str(k)] = _from_python(v, line)
            m.key_lines[str(k)] = line
        return m
    if isinstance(value, list | tuple):
        s = _Seq(line)
        s.extend(_from_python(v, line) for v in value)
        return s
    return _Scalar("" if value is None else str(value), line, "", False, py=value)


def _plain(node: _Node) -> Any:
    """A subtree as plain JSON-able Python values (annotations)."""
    if isinstance(node, _Map):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, _Seq):
        return [_plain(v) for v in node]
    return _resolve(node)


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Obj:
    """One mapping being read: typed accessors that report errors at the key's line.

    Every key read is recorded; ``finish`` reports the rest as unknown keys.
    """

    def __init__(self, report: _Report, node: _Map, what: str) -> None:
        self.report = report
        self.node = node
        self.what = what
        self.used: set[str] = set()
        self.ok = True

    # ------------------------------------------------------------ plumbing

    def line(self, key: str | None = None) -> int:
        if key is not None and key in self.node.key_lines:
            return self.node.key_lines[key]
        return self.node.line

    def err(self, key: str | None, msg: str) -> None:
        self.ok = False
        node = self.node.get(key) if key is not None else None
        if isinstance(node, _Scalar) and node.broken:
            return  # its substitution problem is the error to fix
        where = f"{self.what}: {key}" if key else self.what
        self.report.error(self.line(key), f"{where}: {msg}")

    def raw(self, key: str) -> _Node | None:
        """The node under key, or None when absent or null."""
        self.used.add(key)
        node = self.node.get(key)
        return None if isinstance(node, _Scalar) and _is_null(node) else node

    def has(self, key: str) -> bool:
        return self.raw(key) is not None

    def ignore(self, *keys: str) -> None:
        self.used.update(keys)

    def ignore_with_warning(self, key: str, why: str) -> None:
        if self.raw(key) is not None:
            self.report.warn(self.line(key), f"{self.what}: {key} is ignored: {why}")

    def unsupported(self, key: str, why: str, allowed: Callable[[_Node], bool] | None = None) -> None:
        node = self.raw(key)
        if node is not None and not (allowed and allowed(node)):
            self.err(key, f"not supported yet by pgsink: {why}")

    def finish(self) -> None:
        known = set(self.used)
        for key in self.node:
            if key not in known:
                self.ok = False
                self.report.error(self.line(key), f"{self.what}: unknown key {key!r}{_suggest(key, known)}")

    # ------------------------------------------------------------ typed values

    def _scalar(self, key: str, node: _Node, kind: str) -> _Scalar | None:
        if not isinstance(node, _Scalar):
            self.err(key, f"must be {kind}, not a {'list' if isinstance(node, _Seq) else 'mapping'}")
            return None
        return node

    def str(self, key: str, *, required: bool = False, default: str | None = None,
            choices: Iterable[str] | None = None, secret: bool = False) -> str | None:
        node = self.raw(key)
        if node is None:
            if required:
                self.err(key, "is required")
            return default
        s = self._scalar(key, node, "a string")
        if s is None:
            return default
        if s.py is not _UNSET:
            value = s.py if isinstance(s.py, str) else json.dumps(s.py) if isinstance(s.py, bool) else str(s.py)
        else:
            value = s.text
        if choices is not None and value not in choices:
            shown = "the value" if secret else repr(value)
            self.err(key, f"{shown} is not one of {', '.join(choices)}")
            return default
        return value

    def int(self, key: str, *, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
        node = self.raw(key)
        if node is None:
            return default
        s = self._scalar(key, node, "an integer")
        if s is None:
            return default
        try:
            value = _resolve(s)
        except _BadValue as e:
            self.err(key, str(e))
            return default
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.err(key, f"must be an integer, got {s.text!r}")
            return default
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            self.err(key, f"must be {bounds}, got {value}")
            return default
        return value

    def bool(self, key: str, default: bool | None) -> bool | None:
        node = self.raw(key)
        if node is None:
            return default
        s = self._scalar(key, node, "true or false")
        if s is None:
            return default
        try:
            value = _resolve(s)
        except _BadValue:
            value = s.text
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        if not isinstance(value, bool):
            self.err(key, f"must be true or false, got {s.text!r}")
            return default
        return value

    def strs(self, key: str) -> list[str] | None:
        node = self.raw(key)
        if node is None:
            return None
        if isinstance(node, _Scalar):
            self.err(key, "must be a list of strings")
            return None
        if isinstance(node, _Map):
            self.err(key, "must be a list of strings, not a mapping")
            return None
        out = []
        for item in node:
            if not isinstance(item, _Scalar):
                self.report.error(getattr(item, "line", self.line(key)), f"{self.what}: {key}: items must be strings")
                self.ok = False
                continue
            out.append(item.text if item.py is _UNSET else str(item.py))
        return out

    def obj(self, key: str, *, required: bool = False) -> _Obj | None:
        node = self.raw(key)
        if node is None:
            if required:
                self.err(key, "is required")
            return None
        if not isinstance(node, _Map):
            self.err(key, "must be a mapping")
            return None
        return _Obj(self.report, node, f"{self.what}: {key}")

    def seq(self, key: str) -> _Seq | None:
        node = self.raw(key)
        if node is None:
            return None
        if not isinstance(node, _Seq):
            self.err(key, "must be a list")
            return None
        return node

    def mapping_value(self, key: str) -> dict[str, Any] | None:
        node = self.raw(key)
        if node is None:
            return None
        if not isinstance(node, _Map):
            self.err(key, "must be a mapping")
            return None
        try:
            return _plain(node)  # type: ignore[no-any-return]
        except _BadValue as e:
            self.err(key, str(e))
            return None


# ====================================================================== readers


def _check_name(o: _Obj, name: str | None) -> None:
    if name is not None and not _NAME.match(name):
        o.err("name", f"{name!r} is not a valid name: use letters, digits, '_', '-' and '.' "
                      "(at most 128, not starting with '-' or '.')")


def _qualify(table: str) -> str:
    """'orders' -> 'public.orders' (Sequin's default schema)."""
    return table if "." in table else f"public.{table}"


_PG_URL_KEYS = {"host": "hostname", "port": "port", "dbname": "database", "user": "username",
                "password": "password", "sslmode": "sslmode"}


def _parse_pg_url(o: _Obj, url: str) -> dict[str, Any]:
    """postgresql://user:password@host:port/db[?sslmode=...] -> database keys.

    Error messages never quote the URL: it usually holds the password.
    """
    if not url.startswith(("postgres://", "postgresql://")):
        o.err("url", "must be a postgresql://user:password@host:port/database URL")
        return {}
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        o.err("url", "is not a valid postgresql://user:password@host:port/database URL")
        return {}
    out: dict[str, Any] = {}
    for k, v in params.items():
        if k not in _PG_URL_KEYS:
            o.err("url", f"parameter {k!r} is not supported in url; only sslmode is")
            continue
        out[_PG_URL_KEYS[k]] = v
    for needed in ("hostname", "database"):
        if not out.get(needed):
            o.err("url", f"has no {'host' if needed == 'hostname' else 'database name'}: "
                         "postgresql://user:password@host:port/database")
    if "port" in out:
        try:
            out["port"] = int(out["port"])
        except ValueError:
            o.err("url", "has a port that is not a number")
    return out


def _read_slot_or_publication(o: _Obj, block: str, old_key: str) -> tuple[str | None, bool, str | None]:
    """The new {name, create_if_not_exists[, init_sql]} block or Sequin's older *_name key."""
    sub = o.obj(block)
    old = o.str(old_key)
    if sub is not None and old is not None:
        o.err(old_key, f"give either {block}.name or {old_key}, not both")
    if sub is None:
        if old is None:
            o.err(block, f"is required ({block}: {{name: ..., create_if_not_exists: false}})")
        return old, False, None
    name = sub.str("name", required=True)
    create = sub.bool("create_if_not_exists", False)
    init_sql = None
    if block == "publication":
        init_sql = sub.str("init_sql")
        sub.unsupported("schemas", "give init_sql, e.g. CREATE PUBLICATION p FOR TABLES IN SCHEMA public "
                                   "WITH (publish_via_partition_root = true)")
    sub.finish()
    return name, bool(create), init_sql


def _read_database(o: _Obj) -> SourceSpec | None:
    name = o.str("name", required=True)
    _check_name(o, name)
    if name:
        o.what = f"database {name!r}"
    url_parts: dict[str, Any] = {}
    url = o.str("url", secret=True)
    if url is not None:
        for k in ("hostname", "port", "database", "username", "password"):
            if o.has(k):
                o.err(k, "cannot be given together with url: put the connection in url or in the keys")
        url_parts = _parse_pg_url(o, url)
    hostname = url_parts.get("hostname") or o.str("hostname", required=url is None)
    port = url_parts.get("port") or o.int("port", default=5432, lo=1, hi=65535)
    database = url_parts.get("database") or o.str("database", required=url is None)
    username = url_parts.get("username") or o.str("username", default="postgres")
    password = url_parts.get("password") if url is not None else o.str("password", secret=True)
    ssl = o.bool("ssl", None)
    sslmode = o.str("sslmode", choices=SSLMODES)
    if ssl is not None and (sslmode is not None or "sslmode" in url_parts):
        o.err("ssl", "give either ssl (Sequin's key) or sslmode, not both")
    mode = sslmode or url_parts.get("sslmode") or (
        ("require" if ssl else "disable") if ssl is not None else "prefer")
    if mode not in SSLMODES:
        o.err("url", f"sslmode must be one of {', '.join(SSLMODES)}")
    slot_name, create_slot, _ = _read_slot_or_publication(o, "slot", "slot_name")
    if slot_name is not None and not _SLOT.match(slot_name):
        o.err("slot", f"slot name {slot_name!r} is invalid: Postgres allows lower-case letters, "
                      "digits and '_' (at most 63)")
    pub_name, create_pub, init_sql = _read_slot_or_publication(o, "publication", "publication_name")
    decoder = o.str("decoder", default="pgoutput", choices=DECODERS)
    retention = DEFAULT_RETENTION_SECONDS
    raw_retention = o.raw("retention")
    if raw_retention is not None:
        if isinstance(raw_retention, _Scalar):
            try:
                retention = parse_retention(_resolve(raw_retention))
            except (ValueError, _BadValue) as e:
                o.err("retention", str(e))
        else:
            o.err("retention", "must be a duration like '7 days'")
    annotations = o.mapping_value("annotations") or {}
    for key, why in (("pool_size", "pgsink opens the connections it needs"),
                     ("await_database", "pgsink checks the database when the config is applied"),
                     ("ipv6", "libpq picks IPv4 or IPv6 from the host name by itself"),
                     ("tables", "every table in the publication is captured; pick tables per sink")):
        o.ignore_with_warning(key, why)
    o.unsupported("primary", "reading from a replica (the slot lives on the primary)")
    o.unsupported("use_local_tunnel", "Sequin's local tunnel: connect to the database directly")
    o.ignore("id", "inserted_at", "updated_at", "account_id")
    o.finish()
    if not o.ok or not (name and hostname and database and slot_name and pub_name and username and port):
        return None
    return SourceSpec(
        name=name, hostname=hostname, port=int(port), database=database, username=username,
        password=password or None, sslmode=mode, slot_name=slot_name, create_slot=create_slot,
        publication_name=pub_name, create_publication=create_pub, publication_init_sql=init_sql or None,
        decoder=decoder or "pgoutput", retention_seconds=retention, annotations=annotations,
        line=o.node.line,
    )


def _read_headers(o: _Obj, key: str) -> dict[str, str]:
    """Sequin's [{key, value}] list (or a plain mapping); values are never quoted in errors."""
    node = o.raw(key)
    if node is None:
        return {}
    out: dict[str, str] = {}
    items: list[tuple[_Node | None, _Node | None, int]] = []
    if isinstance(node, _Map):
        items = [(_Scalar(k, node.key_lines.get(k, node.line), "", False, py=k), v, node.key_lines.get(k, node.line))
                 for k, v in node.items()]
    elif isinstance(node, _Seq):
        for item in node:
            line = getattr(item, "line", node.line)
            if not isinstance(item, _Map):
                o.report.error(line, f"{o.what}: {key}: each header is a mapping {{key: ..., value: ...}}")
                o.ok = False
                continue
            h = _Obj(o.report, item, f"{o.what}: {key}")
            h.raw("key")
            h.raw("value")
            h.finish()
            items.append((item.get("key"), item.get("value"), line))
    else:
        if isinstance(node, _Scalar) and "encrypted header" in node.text:
            o.err(key, "holds a Sequin export's obfuscated summary, not the headers: give the real "
                       "values, e.g. value: \"${API_TOKEN}\"")
        else:
            o.err(key, "must be a list of {key: ..., value: ...} (or a mapping)")
        return {}
    for k_node, v_node, line in items:
        if not isinstance(k_node, _Scalar) or not (k_node.text or k_node.py):
            o.report.error(line, f"{o.what}: {key}: a header needs a key")
            o.ok = False
            continue
        k = k_node.text if k_node.py is _UNSET else str(k_node.py)
        if not isinstance(v_node, _Scalar):
            o.report.error(line, f"{o.what}: {key}: header {k!r} needs a string value")
            o.ok = False
            continue
        v = v_node.text if v_node.py is _UNSET else ("" if v_node.py is None else str(v_node.py))
        if not _HEADER_KEY.match(k):
            o.report.error(line, f"{o.what}: {key}: {k!r} is not a valid HTTP header name")
            o.ok = False
        elif "\r" in v or "\n" in v:
            o.report.error(line, f"{o.what}: {key}: the value of header {k!r} contains a line break")
            o.ok = False
        elif k in out:
            o.report.error(line, f"{o.what}: {key}: header {k!r} is given twice")
            o.ok = False
        else:
            out[k] = v
    return out


def _read_endpoint(o: _Obj) -> EndpointSpec | None:
    name = o.str("name", required=True)
    _check_name(o, name)
    if name:
        o.what = f"http endpoint {name!r}"
    url = o.str("url", required=True)
    if url is not None and (not re.match(r"^https?://[^/\s]+", url) or re.search(r"\s", url)):
        o.err("url", f"{url!r} is not an http:// or https:// URL")
    headers = _read_headers(o, "headers")
    encrypted = _read_headers(o, "encrypted_headers")
    for k in sorted(set(headers) & set(encrypted)):
        o.err("encrypted_headers", f"header {k!r} is also in headers: give it once")
    signing, signing_secret = _read_signing(o)
    block_private = o.bool("block_private_addresses", False)
    ca_bundle = o.str("ca_bundle")
    rate_limit = _read_rate_limit(o)
    o.unsupported("local", "Sequin Cloud's tunnel to localhost: give url: http://127.0.0.1:PORT/...")
    o.unsupported("webhook.site", "webhook.site test endpoints: give url")
    o.unsupported("path", "only with local; put the path in url")
    o.ignore("id", "inserted_at", "updated_at", "account_id")
    o.finish()
    if not o.ok or not (name and url):
        return None
    return EndpointSpec(name=name, url=url, headers=headers, encrypted_headers=encrypted, signing=signing,
                        signing_secret=signing_secret, block_private_addresses=bool(block_private),
                        ca_bundle=ca_bundle or None, rate_limit=rate_limit, line=o.node.line)


def _read_signing(o: _Obj) -> tuple[bool, str | None]:
    """signing: true (pgsink makes and keeps the secret) and/or signing_secret: whsec_... (never quoted)."""
    secret = o.str("signing_secret")
    signing = o.bool("signing", None)
    if secret is not None:
        try:
            signing_mod.secret_key(secret)
        except ConfigError as e:
            o.err("signing_secret", str(e))
            secret = None
        if signing is False:
            o.err("signing", "is false but signing_secret is given: remove one")
    return bool(signing) or secret is not None, secret


def _read_rate_limit(o: _Obj) -> float | None:
    text = o.str("rate_limit")
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        o.err("rate_limit", f"must be a positive number of requests per second, got {text!r}")
        return None
    return value


def _read_tables(o: _Obj) -> list[TableSpec]:
    seq = o.seq("tables")
    out: list[TableSpec] = []
    seen: set[str] = set()
    for item in seq or []:
        line = getattr(item, "line", o.line("tables"))
        if not isinstance(item, _Map):
            o.report.error(line, f"{o.what}: tables: each entry is {{name: schema.table, group_column_names: [...]}}")
            o.ok = False
            continue
        t = _Obj(o.report, item, f"{o.what}: tables")
        name = t.str("name", required=True)
        cols = t.strs("group_column_names")
        t.finish()
        if not t.ok:
            o.ok = False
        if name is None:
            continue
        qualified = _qualify(name)
        if qualified in seen:
            t.err("name", f"table {qualified} is listed twice")
            o.ok = False
            continue
        seen.add(qualified)
        out.append(TableSpec(qualified, tuple(cols) if cols else None))
    return out


def _read_destination(o: _Obj) -> tuple[str | None, str, bool]:
    dest = o.obj("destination", required=True)
    if dest is None:
        return None, "", True
    kind = dest.str("type", required=True)
    if kind is not None and kind != "webhook":
        dest.err("type", f"sink type {kind!r} is not supported: pgsink delivers to HTTP endpoints "
                         "only (destination.type: webhook)")
        o.ok = False
        return None, "", True
    endpoint = dest.str("http_endpoint", required=True)
    path = dest.str("http_endpoint_path", default="") or ""
    if path and not path.startswith("/"):
        dest.err("http_endpoint_path", f"{path!r} must start with '/'")
    batch = dest.bool("batch", True)
    dest.finish()
    if not dest.ok:
        o.ok = False
    return endpoint, path, bool(batch)


def _function_none(node: _Node) -> bool:
    return isinstance(node, _Scalar) and (node.text if node.py is _UNSET else str(node.py)) == "none"


def _empty_list(node: _Node) -> bool:
    return isinstance(node, _Seq) and not node


def _read_sink(o: _Obj) -> SinkSpec | None:
    name = o.str("name", required=True)
    _check_name(o, name)
    if name:
        o.what = f"sink {name!r}"
    database = o.str("database", required=True)
    status = o.str("status", default="active", choices=STATUSES)

    src = o.obj("source")
    selection: dict[str, list[str] | None] = {
        "include_schemas": None, "exclude_schemas": None, "include_tables": None, "exclude_tables": None}
    if src is not None:
        for key in selection:
            values = src.strs(key)
            selection[key] = [_qualify(v) for v in values] if values is not None and "tables" in key else values
        src.finish()
        if not src.ok:
            o.ok = False
    # Sequin's older single-table / single-schema sinks.
    table = o.str("table")
    schema = o.str("schema")
    old_groups = o.strs("group_column_names")
    if table is not None or schema is not None:
        if src is not None:
            o.err("table" if table is not None else "schema", "cannot be combined with source: "
                  "use source.include_tables / source.include_schemas")
        elif table is not None and schema is not None:
            o.err("schema", "give either table or schema, not both")
        elif table is not None:
            selection["include_tables"] = [_qualify(table)]
        else:
            selection["include_schemas"] = [schema] if schema else None

    actions = o.strs("actions")
    if actions is not None:
        bad = [a for a in actions if a not in ACTIONS]
        if bad:
            o.err("actions", f"unknown action(s) {', '.join(map(repr, bad))}: use insert, update, delete "
                             "(backfill reads are always sent)")
        elif not actions:
            o.err("actions", "is empty: the sink would never send anything")
    canonical = tuple(a for a in ACTIONS if actions is None or a in actions)

    grouping = o.bool("message_grouping", True)
    tables = _read_tables(o)
    if old_groups is not None:
        if table is None:
            o.err("group_column_names", "needs table; or use tables: [{name: schema.table, group_column_names: [...]}]")
        elif _qualify(table) not in {t.name for t in tables}:
            tables.append(TableSpec(_qualify(table), tuple(old_groups) or None))
    if grouping is False and any(t.group_column_names for t in tables):
        o.err("message_grouping", "is false, so tables cannot set group_column_names")

    batch_size = o.int("batch_size", default=1, lo=1, hi=10000)
    max_retry_count = o.int("max_retry_count", default=None, lo=0)
    annotations = o.mapping_value("annotations") or {}
    timestamp_format = o.str("timestamp_format")
    if timestamp_format not in (None, "iso8601"):
        o.err("timestamp_format", f"{timestamp_format!r} is not supported yet; pgsink sends iso8601")
    shedding = o.str("load_shedding_policy")
    if shedding not in (None, "pause_on_full"):
        o.err("load_shedding_policy", f"{shedding!r} is not supported yet; pgsink pauses the sink's "
                                      "intake at max_ack_pending (pause_on_full)")
    functions = _read_functions(o)
    initial_backfill = _read_initial_backfill(o, selection["include_tables"], tables)
    o.ignore("active_backfill", "active_backfills", "consumer_start", "health",
             "id", "inserted_at", "updated_at", "account_id")

    batch_timeout_ms = o.int("batch_timeout_ms", default=50, lo=0)
    request_timeout_ms = o.int("request_timeout_ms", default=30000, lo=1)
    max_ack_pending = o.int("max_ack_pending", default=10000, lo=1)
    lane_count = o.int("lane_count", default=64, lo=1, hi=1024)
    endpoint, path, batch = _read_destination(o)
    if not batch and (batch_size or 1) > 1:
        o.err("batch_size", f"is {batch_size} but destination.batch is false: without batching every "
                            "request carries one message; set batch: true or batch_size: 1")
    o.finish()
    if not o.ok or not (name and database and endpoint):
        return None

    def tup(v: list[str] | None) -> tuple[str, ...] | None:
        return tuple(v) if v is not None else None

    return SinkSpec(
        name=name, source=database, http_endpoint=endpoint, http_endpoint_path=path,
        status=status or "active", include_schemas=tup(selection["include_schemas"]),
        exclude_schemas=tup(selection["exclude_schemas"]), include_tables=tup(selection["include_tables"]),
        exclude_tables=tup(selection["exclude_tables"]), actions=canonical, message_grouping=bool(grouping),
        tables=tuple(tables), batch=batch, batch_size=batch_size or 1,
        batch_timeout_ms=batch_timeout_ms if batch_timeout_ms is not None else 50,
        request_timeout_ms=request_timeout_ms or 30000, max_ack_pending=max_ack_pending or 10000,
        max_retry_count=max_retry_count, annotations=annotations, lane_count=lane_count or 64,
        **functions, initial_backfill=initial_backfill, line=o.node.line,
    )


def _read_initial_backfill(o: _Obj, include_tables: list[str] | None, tables: list[TableSpec]) -> tuple[str, ...]:
    """initial_backfill: true (every table the sink names) or {tables: [...]}: backfilled when the sink is created."""
    node = o.raw("initial_backfill")
    if isinstance(node, _Map):
        sub = _Obj(o.report, node, f"{o.what}: initial_backfill")
        names = sub.strs("tables")
        sub.finish()
        if not names:
            sub.err("tables", "give the tables to backfill, e.g. tables: [public.orders]")
            o.ok = o.ok and sub.ok
            return ()
        o.ok = o.ok and sub.ok
        return tuple(_qualify(n) for n in names)
    if not o.bool("initial_backfill", False):
        return ()
    named = list(dict.fromkeys([*(include_tables or []), *(t.name for t in tables)]))
    if not named:
        o.err("initial_backfill", "true needs the sink's tables (table: or source.include_tables:); "
                                  "or give initial_backfill: {tables: [schema.table, ...]}")
        return ()
    return tuple(named)


_FUNCTION_KINDS = {"filter": ("sql", "python"), "transform": ("path", "python"), "routing": ("python",),
                   "enrichment": ("sql",)}
_FUNCTION_FIELDS = {("filter", "sql"): "filter_sql", ("filter", "python"): "filter_function",
                    ("transform", "path"): "transform_path", ("transform", "python"): "transform_function",
                    ("routing", "python"): "route_function", ("enrichment", "sql"): "enrichment_sql"}
_TRANSFORM_PATH = re.compile(r"^record(\.[A-Za-z0-9_$-]+)*$|^(changes|action|metadata)(\.[A-Za-z0-9_$-]+)*$")


def _read_functions(o: _Obj) -> dict[str, Any]:
    """filters (column filters), filter/transform/routing ({sql|path|python: ...} or none), function_timeout_ms."""
    out: dict[str, Any] = {"filters": _read_column_filters(o)}
    for key, forms in _FUNCTION_KINDS.items():
        node = o.raw(key)
        if node is None or _function_none(node):
            continue
        if isinstance(node, _Scalar):
            o.err(key, f"named functions (Sequin's functions: section) are not supported yet by pgsink: "
                       f"give the function inline, e.g. {key}: {{{forms[-1]}: ...}} (one of {', '.join(forms)})")
            continue
        f = o.obj(key)
        if f is None:
            continue
        given = [form for form in forms if f.has(form)]
        if len(given) != 1:
            f.err(None, f"give exactly one of {', '.join(forms)}")
            f.finish()
            o.ok = False
            continue
        form = given[0]
        value = f.str(form, required=True)
        f.finish()
        if not f.ok or value is None:
            o.ok = False
            continue
        try:
            _check_function(key, form, value)
        except ConfigError as e:
            f.err(form, str(e).removeprefix("filter_sql: ").removeprefix("enrichment sql: "))
            o.ok = False
            continue
        out[_FUNCTION_FIELDS[(key, form)]] = value
    timeout = o.int("function_timeout_ms", default=1000, lo=1, hi=600_000)
    out["function_timeout_ms"] = timeout or 1000
    return out


def _check_function(key: str, form: str, value: str) -> None:
    if key == "enrichment":
        enrichment_mod.check_sql(value)
    elif form == "sql":
        filters_mod.compile_sql(value)
    elif form == "path":
        if not _TRANSFORM_PATH.match(value):
            raise ConfigError(f"{value!r} is not a path like record, record.id or record.address.city")
    elif not value.strip() or any(c.isspace() for c in value):
        raise ConfigError(f"{value!r} is not module:function or a path to a .py file")


def _read_column_filters(o: _Obj) -> tuple[dict[str, Any], ...]:
    seq = o.seq("filters")
    out: list[dict[str, Any]] = []
    for item in seq or []:
        line = getattr(item, "line", o.line("filters"))
        if not isinstance(item, _Map):
            o.report.error(line, f"{o.what}: filters: each entry is {{column_name, operator, comparison_value}}")
            o.ok = False
            continue
        f = _Obj(o.report, item, f"{o.what}: filters")
        spec: dict[str, Any] = {"column_name": f.str("column_name", required=True),
                                "operator": f.str("operator", required=True)}
        node = f.raw("comparison_value")
        if node is not None:
            try:
                spec["comparison_value"] = _plain(node)
            except _BadValue as e:
                f.err("comparison_value", str(e))
        for key in ("field_path", "field_type"):
            if (value := f.str(key)) is not None:
                spec[key] = value
        f.finish()
        if spec["operator"] is not None:
            spec["operator"] = " ".join(spec["operator"].lower().split())
        problem = filters_mod.check_column_filter(spec) if f.ok else None
        if problem:
            f.err(None, problem)
        if not f.ok:
            o.ok = False
            continue
        out.append(spec)
    return tuple(out)


_TOP_KEYS = ("databases", "http_endpoints", "sinks")
_TOP_IGNORED = {
    "account": "pgsink has no accounts",
    "users": "pgsink has no users: access is whatever the state database grants",
    "api_tokens": "pgsink has no API tokens",
}
_TOP_UNSUPPORTED = {
    "functions": "functions (transform, filter, routing, enrichment)",
    "transforms": "transforms",
    "change_retentions": "change retention into your own tables (pgsink keeps pgsink.changes)",
    "wal_pipelines": "WAL pipelines",
}


def _read_list(report: _Report, root: _Map, key: str, what: str,
               reader: Callable[[_Obj], Any]) -> list[Any]:
    node = root.get(key)
    line = root.key_lines.get(key, 0)
    if node is None or (isinstance(node, _Scalar) and _is_null(node)):
        return []
    if not isinstance(node, _Seq):
        report.error(line, f"{key} must be a list of {what} entries (- name: ...)")
        return []
    out = []
    seen: dict[str, int] = {}
    for i, item in enumerate(node):
        item_line = getattr(item, "line", line)
        if not isinstance(item, _Map):
            report.error(item_line, f"{key}[{i}] must be a mapping (name: ..., ...)")
            continue
        spec = reader(_Obj(report, item, f"{key}[{i}]"))
        if spec is None:
            continue
        if spec.name in seen:
            report.error(item_line, f"{what} {spec.name!r} is defined twice (first at line {seen[spec.name]})")
            continue
        seen[spec.name] = item_line
        out.append(spec)
    return out


def parse_config(text: str, *, filename: str = "<config>", env: Mapping[str, str] | None = None) -> Desired:
    """Parse and validate a sequin.yaml-style document; raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    report = _Report(filename)
    loader = _Loader(text)
    try:
        root_node = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        detail = "; ".join(x for x in (e.context, e.problem) if x)
        raise ConfigError(f"{where}: YAML syntax error: {detail}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{filename}: not valid YAML ({type(e).__name__})") from None
    finally:
        loader.dispose()
    if root_node is None:
        return Desired(warnings=[f"{filename}: the file is empty: nothing to do"], filename=filename)
    if not isinstance(root_node, yaml.MappingNode):
        raise ConfigError(f"{filename}:{root_node.start_mark.line + 1}: the top level must be a mapping "
                          "with databases, http_endpoints and sinks")
    root = _Builder(report, env).build(root_node)
    assert isinstance(root, _Map)
    template_keys = {k.value for k, v in root_node.value
                     if isinstance(k, yaml.ScalarNode) and id(v) in loader.anchored}
    for key in root:
        line = root.key_lines.get(key, 0)
        if key in _TOP_KEYS:
            continue
        if key in _TOP_IGNORED:
            report.warn(line, f"{key} is ignored: {_TOP_IGNORED[key]}")
        elif key in _TOP_UNSUPPORTED:
            report.error(line, f"{key}: not supported yet by pgsink: {_TOP_UNSUPPORTED[key]}")
        elif key in template_keys:
            continue  # an &anchored template, used through << merges
        else:
            report.error(line, f"unknown top-level key {key!r}{_suggest(key, _TOP_KEYS)} "
                               f"(known: {', '.join(_TOP_KEYS)}; other keys must hold an &anchor template)")
    desired = Desired(
        sources=_read_list(report, root, "databases", "database", _read_database),
        endpoints=_read_list(report, root, "http_endpoints", "http endpoint", _read_endpoint),
        sinks=_read_list(report, root, "sinks", "sink", _read_sink),
        filename=filename,
    )
    report.raise_if_errors()
    desired.warnings = report.warnings
    return desired


def _from_options(reader: Callable[[_Obj], Any], what: str, options: Mapping[str, Any]) -> Any:
    report = _Report("command line")
    node = _from_python({k: v for k, v in options.items() if v is not None})
    assert isinstance(node, _Map)
    spec = reader(_Obj(report, node, what))
    report.raise_if_errors()
    return spec


def source_from_options(options: Mapping[str, Any]) -> SourceSpec:
    """A SourceSpec from CLI options shaped like a ``databases:`` entry (same validation)."""
    return _from_options(_read_database, "source", options)  # type: ignore[no-any-return]


def endpoint_from_options(options: Mapping[str, Any]) -> EndpointSpec:
    return _from_options(_read_endpoint, "endpoint", options)  # type: ignore[no-any-return]


def sink_from_options(options: Mapping[str, Any]) -> SinkSpec:
    return _from_options(_read_sink, "sink", options)  # type: ignore[no-any-return]


# ====================================================================== current state as specs


def source_spec(s: Source) -> SourceSpec:
    return SourceSpec(
        name=s.name, hostname=s.hostname, port=s.port, database=s.database, username=s.username,
        password=s.password, sslmode=s.sslmode, slot_name=s.slot_name, create_slot=s.create_slot,
        publication_name=s.publication_name, create_publication=s.create_publication,
        publication_init_sql=s.publication_init_sql, decoder=s.decoder,
        retention_seconds=int(round(s.retention_seconds)), annotations=dict(s.annotations),
    )


def endpoint_spec(e: HttpEndpoint) -> EndpointSpec:
    return EndpointSpec(name=e.name, url=e.url, headers=dict(e.headers), encrypted_headers=dict(e.encrypted_headers),
                        signing=e.signing is not None, signing_secret=e.signing.current if e.signing else None,
                        block_private_addresses=e.block_private_addresses, ca_bundle=e.ca_bundle,
                        rate_limit=e.rate_limit)


def sink_spec(k: Sink, config: Config) -> SinkSpec:
    return SinkSpec(
        name=k.name, source=config.sources[k.source_id].name,
        http_endpoint=config.endpoints[k.http_endpoint_id].name, http_endpoint_path=k.http_endpoint_path,
        status=k.status, include_schemas=k.include_schemas, exclude_schemas=k.exclude_schemas,
        include_tables=k.include_tables, exclude_tables=k.exclude_tables,
        actions=tuple(a for a in ACTIONS if a in k.actions), message_grouping=k.message_grouping,
        tables=tuple(TableSpec(f"{t.schema}.{t.name}", t.group_column_names) for t in k.table_options),
        batch=k.batch, batch_size=k.batch_size, batch_timeout_ms=k.batch_timeout_ms,
        request_timeout_ms=k.request_timeout_ms, max_ack_pending=k.max_ack_pending,
        max_retry_count=k.max_retry_count, annotations=dict(k.annotations), lane_count=k.lane_count,
        filters=tuple(dict(f) for f in k.filters), filter_sql=k.filter_sql, filter_function=k.filter_function,
        transform_path=k.transform_path, transform_function=k.transform_function,
        route_function=k.route_function, function_timeout_ms=k.function_timeout_ms,
        enrichment_sql=k.enrichment_sql,
    )


def current_specs(config: Config) -> Desired:
    return Desired(
        sources=[source_spec(s) for s in config.sources.values()],
        endpoints=[endpoint_spec(e) for e in config.endpoints.values()],
        sinks=[sink_spec(k, config) for k in config.sinks.values()],
    )


# ====================================================================== plan

# Field names as the YAML spells them, for plan output.
_LABELS = {
    "retention_seconds": "retention", "slot_name": "slot.name", "create_slot": "slot.create_if_not_exists",
    "publication_name": "publication.name", "create_publication": "publication.create_if_not_exists",
    "publication_init_sql": "publication.init_sql", "source": "database",
    "http_endpoint": "destination.http_endpoint", "http_endpoint_path": "destination.http_endpoint_path",
    "batch": "destination.batch", "include_schemas": "source.include_schemas",
    "exclude_schemas": "source.exclude_schemas", "include_tables": "source.include_tables",
    "exclude_tables": "source.exclude_tables",
}
_SECRET_FIELDS = {"password", "encrypted_headers", "signing_secret"}


def show_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, TableSpec):
        cols = f" grouped by {', '.join(value.group_column_names)}" if value.group_column_names else ""
        return value.name + cols
    if isinstance(value, tuple | list):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


@dataclass(frozen=True)
class FieldChange:
    field: str
    old: Any = field(repr=False)
    new: Any = field(repr=False)

    def describe(self) -> str:
        """One line; secrets are described by what happened to them, never by value."""
        label = _LABELS.get(self.field, self.field)
        if self.field == "signing_secret":
            what = "set" if self.old is None else "removed" if self.new is None else "rotated"
            return f"{label}: ({what})"
        if self.field == "password":
            what = "set" if self.old is None else "removed" if self.new is None else "changed"
            return f"{label}: ({what})"
        if self.field == "encrypted_headers":
            old, new = self.old or {}, self.new or {}
            parts = [f"{k} (added)" for k in new if k not in old]
            parts += [f"{k} (changed)" for k in new if k in old and old[k] != new[k]]
            parts += [f"{k} (removed)" for k in old if k not in new]
            return f"{label}: {', '.join(parts)}"
        if self.field == "retention_seconds":
            return f"{label}: {format_retention(self.old)} -> {format_retention(self.new)}"
        return f"{label}: {show_value(self.old)} -> {show_value(self.new)}"


@dataclass(frozen=True)
class Change:
    action: str  # create | update | delete
    kind: str  # source | endpoint | sink
    name: str
    fields: tuple[FieldChange, ...] = ()
    spec: Any = field(default=None, repr=False, compare=False)

    def title(self) -> str:
        sign = {"create": "+", "update": "~", "delete": "-"}[self.action]
        return f"{sign} {self.action} {self.kind} {self.name}"


@dataclass
class Plan:
    changes: list[Change]
    warnings: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.changes

    def count(self, action: str) -> int:
        return sum(1 for c in self.changes if c.action == action)

    def summary(self) -> str:
        if self.empty:
            return "No changes: the state database already matches."
        return (f"Plan: {self.count('create')} to create, {self.count('update')} to update, "
                f"{self.count('delete')} to delete.")

    def lines(self) -> list[str]:
        out = []
        for c in self.changes:
            out.append(c.title())
            out += [f"    {f.describe()}" for f in c.fields]
        return out


def _diff(old: Any, new: Any) -> tuple[FieldChange, ...]:
    return tuple(
        FieldChange(f.name, getattr(old, f.name), getattr(new, f.name))
        for f in fields(new)
        if f.compare and f.name != "name" and getattr(old, f.name) != getattr(new, f.name)
    )


def _line(spec: Any) -> str:
    return f":{spec.line}" if getattr(spec, "line", 0) else ""


def make_plan(desired: Desired, current: Config, *, prune: bool = False) -> Plan:
    """The changes that turn the current rows into the desired ones (pure).

    Raises ConfigError for references to unknown sources or endpoints, a
    changed lane_count, and (with prune) deletions that would orphan a sink.
    """
    now = current_specs(current)
    desired = _keep_signing_secrets(desired, now)
    problems: list[str] = []
    changes: list[Change] = []
    for kind, want, have in (("source", desired.sources, now.sources),
                             ("endpoint", desired.endpoints, now.endpoints),
                             ("sink", desired.sinks, now.sinks)):
        existing = {s.name: s for s in have}
        for spec in want:
            old = existing.get(spec.name)
            if old is None:
                changes.append(Change("create", kind, spec.name, spec=spec))
            elif old != spec:
                changes.append(Change("update", kind, spec.name, _diff(old, spec), spec=spec))
    source_names = {s.name for s in desired.sources} | {s.name for s in now.sources}
    endpoint_names = {e.name for e in desired.endpoints} | {e.name for e in now.endpoints}
    current_sinks = {k.name: k for k in now.sinks}
    for k in desired.sinks:
        where = f"{desired.filename}{_line(k)}: sink {k.name!r}"
        if k.source not in source_names:
            problems.append(f"{where}: database {k.source!r} is neither in this file nor in pgsink "
                            f"(known: {', '.join(sorted(source_names)) or 'none'})")
        if k.http_endpoint not in endpoint_names:
            problems.append(f"{where}: destination.http_endpoint {k.http_endpoint!r} is neither in this "
                            f"file nor in pgsink (known: {', '.join(sorted(endpoint_names)) or 'none'})")
        old_sink = current_sinks.get(k.name)
        if old_sink is not None and old_sink.lane_count != k.lane_count:
            problems.append(
                f"{where}: lane_count cannot change ({old_sink.lane_count} -> {k.lane_count}): a group's "
                "lane is a hash modulo the lane count, so changing it would split groups across lanes "
                "and break their order. Keep it, or remove the sink and create it again.")
    if prune:
        changes += _prune(desired, now, problems)
    if problems:
        raise ConfigError("\n".join(problems))
    return Plan(changes, list(desired.warnings))


def _keep_signing_secrets(desired: Desired, now: Desired) -> Desired:
    """``signing: true`` without a secret keeps the endpoint's current secret (export writes it so)."""
    secrets_now = {e.name: e.signing_secret for e in now.endpoints if e.signing_secret}
    endpoints = [dataclasses.replace(e, signing_secret=secrets_now[e.name])
                 if e.signing and e.signing_secret is None and e.name in secrets_now else e
                 for e in desired.endpoints]
    return dataclasses.replace(desired, endpoints=endpoints)


def _prune(desired: Desired, now: Desired, problems: list[str]) -> list[Change]:
    """Deletions of everything absent from the file, sinks first."""
    keep = {"source": {s.name for s in desired.sources}, "endpoint": {e.name for e in desired.endpoints},
            "sink": {k.name for k in desired.sinks}}
    remaining_sinks = [k for k in now.sinks if k.name in keep["sink"]] + [
        k for k in desired.sinks if k.name not in {s.name for s in now.sinks}]
    out = [Change("delete", "sink", k.name) for k in now.sinks if k.name not in keep["sink"]]
    for kind, have, attr in (("endpoint", now.endpoints, "http_endpoint"), ("source", now.sources, "source")):
        for obj in have:
            if obj.name in keep[kind]:
                continue
            users = sorted(k.name for k in remaining_sinks if getattr(k, attr) == obj.name)
            if users:
                problems.append(f"cannot prune {kind} {obj.name!r}: sinks {', '.join(users)} still use it")
            else:
                out.append(Change("delete", kind, obj.name))
    return out


# ====================================================================== apply


@dataclass
class ApplyResult:
    plan: Plan
    warnings: list[str]


def _secret_blob(data: bytes | None) -> bytes | None:
    return secrets.encrypt(data) if data else None


def _source_params(s: SourceSpec) -> dict[str, Any]:
    return {
        "name": s.name, "hostname": s.hostname, "port": s.port, "database": s.database,
        "username": s.username, "password_encrypted": _secret_blob(s.password.encode() if s.password else None),
        "sslmode": s.sslmode, "slot_name": s.slot_name, "create_slot": s.create_slot,
        "publication_name": s.publication_name, "create_publication": s.create_publication,
        "publication_init_sql": s.publication_init_sql, "decoder": s.decoder,
        "retention": timedelta(seconds=s.retention_seconds), "annotations": Jsonb(s.annotations),
    }


def _endpoint_params(e: EndpointSpec) -> dict[str, Any]:
    return {
        "name": e.name, "url": e.url, "headers": Jsonb(e.headers),
        "encrypted_headers": _secret_blob(orjson.dumps(e.encrypted_headers) if e.encrypted_headers else None),
    }


def _sink_params(k: SinkSpec) -> dict[str, Any]:
    def arr(v: tuple[str, ...] | None) -> list[str] | None:
        return list(v) if v is not None else None

    options = [{"name": t.name, **({"group_column_names": list(t.group_column_names)}
                                   if t.group_column_names else {})} for t in k.tables]
    return {
        "name": k.name, "source": k.source, "http_endpoint": k.http_endpoint,
        "http_endpoint_path": k.http_endpoint_path, "status": k.status,
        "include_schemas": arr(k.include_schemas), "exclude_schemas": arr(k.exclude_schemas),
        "include_tables": arr(k.include_tables), "exclude_tables": arr(k.exclude_tables),
        "actions": list(k.actions), "message_grouping": k.message_grouping, "table_options": Jsonb(options),
        "batch": k.batch, "batch_size": k.batch_size, "batch_timeout_ms": k.batch_timeout_ms,
        "request_timeout_ms": k.request_timeout_ms, "max_ack_pending": k.max_ack_pending,
        "max_retry_count": k.max_retry_count, "annotations": Jsonb(k.annotations), "lane_count": k.lane_count,
    }


_WRITES: dict[tuple[str, str], tuple[str, Callable[[Any], dict[str, Any]]]] = {
    ("create", "source"): ("source_insert", _source_params),
    ("update", "source"): ("source_update", _source_params),
    ("create", "endpoint"): ("endpoint_insert", _endpoint_params),
    ("update", "endpoint"): ("endpoint_update", _endpoint_params),
    ("update", "sink"): ("sink_update", _sink_params),
}
_DELETES = {"source": "source_delete", "endpoint": "endpoint_delete", "sink": "sink_delete"}
_ORDER = {("create", "source"): 0, ("update", "source"): 0, ("create", "endpoint"): 1, ("update", "endpoint"): 1,
          ("create", "sink"): 2, ("update", "sink"): 2, ("delete", "sink"): 3, ("delete", "endpoint"): 4,
          ("delete", "source"): 5}


async def _write(conn: psycopg.AsyncConnection, plan: Plan) -> None:
    """Execute a plan's changes, dependencies first (sources, endpoints, sinks; deletions reversed)."""
    for c in sorted(plan.changes, key=lambda c: _ORDER[(c.action, c.kind)]):
        log.info("%s %s %s", c.action, c.kind, c.name, extra={c.kind: c.name})
        try:
            await _write_one(conn, c)
        except psycopg.Error as e:
            # Only the primary message: a DETAIL line would echo the row, ciphertext included.
            raise ConfigError(f"Cannot {c.action} {c.kind} {c.name!r}: {e.diag.message_primary or type(e).__name__}. "
                              "Nothing was applied.") from None


async def _write_one(conn: psycopg.AsyncConnection, c: Change) -> None:
    if c.action == "delete":
        await conn.execute(QUERIES[_DELETES[c.kind]], {"name": c.name})
    elif (c.action, c.kind) == ("create", "sink"):
        cur = await conn.execute(QUERIES["sink_insert"], _sink_params(c.spec))
        row = await cur.fetchone()
        assert row is not None
        await conn.execute(QUERIES["sink_lanes_insert"], {"id": row[0], "lane_count": c.spec.lane_count})
        for table in c.spec.initial_backfill:  # same transaction: the sink and its backfills, or neither
            await conn.execute(QUERIES["backfill_initial"], {"sink": c.spec.name, "table": table})
    else:
        query, params = _WRITES[(c.action, c.kind)]
        await conn.execute(QUERIES[query], params(c.spec))  # type: ignore[index]
    if c.kind == "endpoint" and c.action != "delete":
        await _write_endpoint_security(conn, c.spec)
    if c.kind == "sink" and c.action != "delete":
        k: SinkSpec = c.spec
        await conn.execute(QUERIES["sink_functions_set"], {
            "name": k.name, "filters": Jsonb(list(k.filters)), "filter_sql": k.filter_sql,
            "filter_function": k.filter_function, "transform_path": k.transform_path,
            "transform_function": k.transform_function, "route_function": k.route_function,
            "function_timeout_ms": k.function_timeout_ms, "enrichment_sql": k.enrichment_sql})


async def _write_endpoint_security(conn: psycopg.AsyncConnection, e: EndpointSpec) -> None:
    """Signing secrets (a changed secret is a rotation: the old one signs on for a grace period),
    the private-address block, CA bundle and rate limit (migration 0003's columns)."""
    cur = await conn.execute(QUERIES["endpoint_security_get"], {"name": e.name})
    row = await cur.fetchone()
    old_blob = row[0] if row else None
    blob: bytes | None = None
    if e.signing:
        secret = e.signing_secret or signing_mod.generate_secret()
        old = signing_mod.SigningKeys.decrypt(old_blob) if old_blob else None
        if old is not None and old.current == secret:
            blob = old_blob
        elif old is not None:
            blob = old.rotated(secret, grace_seconds=signing_mod.DEFAULT_GRACE_SECONDS).encrypt()
        else:
            blob = signing_mod.SigningKeys.of(secret).encrypt()
    await conn.execute(QUERIES["endpoint_security_set"], {
        "name": e.name, "signing_secrets_encrypted": blob, "block_private_addresses": e.block_private_addresses,
        "ca_bundle": e.ca_bundle, "rate_limit": e.rate_limit})


def _sources_to_check(plan: Plan, desired: Desired, current: Config) -> dict[str, tuple[Source, set[tuple[str, str]]]]:
    """Sources touched by the plan, each with the tables its sinks (after the plan) name."""
    by_name = {s.name: s for s in current.sources.values()}
    wanted = {s.name: s for s in desired.sources}
    final_sinks = {k.name: k for k in current_specs(current).sinks}
    final_sinks.update({k.name: k for k in desired.sinks})
    for c in plan.changes:
        if c.action == "delete" and c.kind == "sink":
            final_sinks.pop(c.name, None)
    touched: set[str] = set()
    for c in plan.changes:
        if c.action != "delete" and c.kind == "source":
            touched.add(c.name)
        if c.action != "delete" and c.kind == "sink":
            touched.add(c.spec.source)
    out: dict[str, tuple[Source, set[tuple[str, str]]]] = {}
    for name in sorted(touched):
        existing = by_name.get(name)
        model = wanted[name].to_model(existing.id if existing else None) if name in wanted else existing
        assert model is not None
        tables: set[tuple[str, str]] = set()
        for k in final_sinks.values():
            if k.source == name:
                tables |= k.explicit_tables()
        out[name] = (model, tables)
    return out


async def _prepare_sources(checks: dict[str, tuple[Source, set[tuple[str, str]]]]) -> list[str]:
    """Create slots/publications allowed to be created, then check every touched source."""
    warnings: list[str] = []
    for name, (src, tables) in checks.items():
        for w in await source_checks.prepare_source(src, sorted(tables)):
            warnings.append(f"source {name!r}: {w}")
    return warnings


async def _load(conn: psycopg.AsyncConnection) -> Config:
    try:
        return await load_config(conn)
    except psycopg.errors.UndefinedTable:
        raise ConfigError("The state database has no pgsink schema yet: run `pgsink migrate` first.") from None


async def read_config(dsn: str) -> Config:
    async with connection(dsn, autocommit=True) as conn:
        return await _load(conn)


async def plan_config(dsn: str, desired: Desired, *, prune: bool = False) -> Plan:
    """What apply would change; reads the state database, writes nothing, contacts no source."""
    return make_plan(desired, await read_config(dsn), prune=prune)


async def apply_config(dsn: str, desired: Desired, *, prune: bool = False, create_only: bool = False
                       ) -> ApplyResult:
    """Validate touched sources, then write every change in one transaction and NOTIFY workers.

    Slot and publication creation happen before the state transaction (a
    logical slot waits for open transactions with an xid to finish). A
    failing check raises before anything is written to the state database.
    """
    current = await read_config(dsn)
    plan = make_plan(desired, current, prune=prune)
    if create_only:
        _refuse_existing(plan)
    if plan.empty:
        return ApplyResult(plan, [])
    checks = _sources_to_check(plan, desired, current)
    warnings = await _prepare_sources(checks)
    async with connection(dsn, autocommit=True) as conn:
        async with conn.transaction():
            await conn.execute(QUERIES["config_lock"])
            latest = await _load(conn)
            plan = make_plan(desired, latest, prune=prune)
            if create_only:
                _refuse_existing(plan)
            if set(_sources_to_check(plan, desired, latest)) - set(checks):
                raise ConfigError("The config changed while it was being applied; run the command again.")
            await _write(conn, plan)
            await conn.execute(QUERIES["config_notify"], {"what": "apply"})
    return ApplyResult(plan, warnings)


def _refuse_existing(plan: Plan) -> None:
    for c in plan.changes:
        if c.action != "create":
            raise ConfigError(
                f"{c.kind} {c.name!r} already exists. Remove it first (pgsink {c.kind} remove {c.name}) "
                "or change it with `pgsink config apply`.")


def _remove_hint(kind: str, name: str, users: list[str]) -> str:
    return (f"Cannot remove {kind} {name!r}: sink{'s' if len(users) > 1 else ''} {', '.join(users)} "
            f"use{'' if len(users) > 1 else 's'} it. Remove {'them' if len(users) > 1 else 'it'} first "
            f"(pgsink sink remove NAME).")


async def _remove(dsn: str, kind: str, name: str, users_query: str | None) -> None:
    async with connection(dsn, autocommit=True) as conn:
        async with conn.transaction():
            await conn.execute(QUERIES["config_lock"])
            if users_query is not None:
                cur = await conn.execute(QUERIES[users_query], {"name": name})  # type: ignore[index]
                users = [r[0] for r in await cur.fetchall()]
                if users:
                    raise ConfigError(_remove_hint(kind, name, users))
            cur = await conn.execute(QUERIES[_DELETES[kind]], {"name": name})
            if cur.rowcount == 0:
                raise ConfigError(f"There is no {kind} named {name!r} (see pgsink {kind} list).")
            await conn.execute(QUERIES["config_notify"], {"what": f"remove {kind}"})


async def remove_source(dsn: str, name: str, *, drop_slot: bool = False) -> Source:
    """Delete a source no sink uses; optionally drop its replication slot afterwards."""
    config = await read_config(dsn)
    src = config.source_named(name)
    await _remove(dsn, "source", name, "sinks_using_source")
    assert src is not None
    if drop_slot:
        await source_checks.drop_slot(src)
    return src


async def remove_endpoint(dsn: str, name: str) -> None:
    await _remove(dsn, "endpoint", name, "sinks_using_endpoint")


async def remove_sink(dsn: str, name: str) -> None:
    await _remove(dsn, "sink", name, None)


async def set_sink_status(dsn: str, name: str, status: str) -> bool:
    """Pause, resume or disable a sink; False when it already had that status."""
    if status not in STATUSES:
        raise ConfigError(f"status must be one of {', '.join(STATUSES)}")
    async with connection(dsn, autocommit=True) as conn:
        async with conn.transaction():
            await conn.execute(QUERIES["config_lock"])
            cur = await conn.execute(QUERIES["sink_status"], {"name": name})
            row = await cur.fetchone()
            if row is None:
                raise ConfigError(f"There is no sink named {name!r} (see pgsink sink list).")
            if row[0] == status:
                return False
            await conn.execute(QUERIES["sink_set_status"], {"name": name, "status": status})
            await conn.execute(QUERIES["config_notify"], {"what": f"sink {status}"})
    return True


# ====================================================================== export


class _Quoted(str):
    """A string dumped double-quoted, so a ${VAR} placeholder stays a string after substitution."""


class _Dumper(yaml.SafeDumper):
    pass


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)
_Dumper.add_representer(_Quoted, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", str(v), style='"'))


def _env_name(*parts: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^A-Z0-9]", "_", "_".join(("PGSINK", *parts)).upper())).strip("_")


def _escape(value: Any) -> Any:
    """Make values survive substitution on re-apply: a literal ${ is written $${."""
    if isinstance(value, _Quoted):
        return value
    if isinstance(value, str):
        return value.replace("${", "$${")
    if isinstance(value, dict):
        return {k: _escape(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escape(v) for v in value]
    return value


class _Placeholders:
    def __init__(self) -> None:
        self.names: list[str] = []

    def make(self, *parts: str) -> _Quoted:
        name = base = _env_name(*parts)
        n = 2
        while name in self.names:
            name, n = f"{base}_{n}", n + 1
        self.names.append(name)
        return _Quoted(f"${{{name}}}")


def _export_source(s: Source, ph: _Placeholders) -> dict[str, Any]:
    out: dict[str, Any] = {"name": s.name, "hostname": s.hostname, "port": s.port, "database": s.database,
                           "username": s.username}
    if s.password:
        out["password"] = ph.make("DB", s.name, "PASSWORD")
    out["sslmode"] = s.sslmode
    out["slot"] = {"name": s.slot_name, "create_if_not_exists": s.create_slot}
    pub: dict[str, Any] = {"name": s.publication_name, "create_if_not_exists": s.create_publication}
    if s.publication_init_sql:
        pub["init_sql"] = s.publication_init_sql
    out["publication"] = pub
    out["decoder"] = s.decoder
    out["retention"] = format_retention(int(round(s.retention_seconds)))
    if s.annotations:
        out["annotations"] = s.annotations
    return out


def _export_endpoint(e: HttpEndpoint, ph: _Placeholders) -> dict[str, Any]:
    out: dict[str, Any] = {"name": e.name, "url": e.url}
    if e.headers:
        out["headers"] = [{"key": k, "value": v} for k, v in e.headers.items()]
    if e.encrypted_headers:
        out["encrypted_headers"] = [{"key": k, "value": ph.make("ENDPOINT", e.name, k)}
                                    for k in e.encrypted_headers]
    if e.signing is not None:
        out["signing"] = True  # the secret stays in pgsink: applying this keeps it
    if e.block_private_addresses:
        out["block_private_addresses"] = True
    if e.ca_bundle:
        out["ca_bundle"] = e.ca_bundle
    if e.rate_limit is not None:
        out["rate_limit"] = e.rate_limit
    return out


def _export_sink(k: SinkSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"name": k.name, "database": k.source}
    selection = {key: list(v) for key in ("include_schemas", "exclude_schemas", "include_tables", "exclude_tables")
                 if (v := getattr(k, key)) is not None}
    if selection:
        out["source"] = selection
    out["status"] = k.status
    out["actions"] = list(k.actions)
    out["message_grouping"] = k.message_grouping
    if k.tables:
        out["tables"] = [{"name": t.name, **({"group_column_names": list(t.group_column_names)}
                                             if t.group_column_names else {})} for t in k.tables]
    out["batch_size"] = k.batch_size
    if k.max_retry_count is not None:
        out["max_retry_count"] = k.max_retry_count
    if k.annotations:
        out["annotations"] = k.annotations
    out.update(batch_timeout_ms=k.batch_timeout_ms, request_timeout_ms=k.request_timeout_ms,
               max_ack_pending=k.max_ack_pending, lane_count=k.lane_count)
    if k.filters:
        out["filters"] = [dict(f) for f in k.filters]
    for (key, form), attr in _FUNCTION_FIELDS.items():
        if (value := getattr(k, attr)) is not None:
            out[key] = {form: value}
    if k.function_timeout_ms != 1000:
        out["function_timeout_ms"] = k.function_timeout_ms
    out["destination"] = {"type": "webhook", "http_endpoint": k.http_endpoint,
                          "http_endpoint_path": k.http_endpoint_path, "batch": k.batch}
    return out


def export_yaml(config: Config) -> str:
    """sequin.yaml text for the whole config; applying it back is a no-op plan.

    Secrets are never written: each is a ``${PGSINK_...}`` placeholder, listed
    in the header comment, to be set in the environment before applying.
    """
    ph = _Placeholders()
    specs = current_specs(config)
    doc: dict[str, Any] = {
        "databases": [_escape(_export_source(s, ph)) for s in config.sources.values()],
        "http_endpoints": [_escape(_export_endpoint(e, ph)) for e in config.endpoints.values()],
        "sinks": [_escape(_export_sink(k)) for k in specs.sinks],
    }
    header = ["# pgsink config, exported in sequin.yaml format (pgsink config apply FILE)."]
    if ph.names:
        header.append("# Secrets are not exported. Set these environment variables before applying:")
        header += [f"#   {n}" for n in ph.names]
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)
    return "\n".join(header) + "\n" + body


async def export_config(dsn: str) -> str:
    return export_yaml(await read_config(dsn))

