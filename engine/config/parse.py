"""Reading sequin.yaml (its webhook subset) into validated ``Desired`` specs.

One reader per entry kind (``databases``, ``http_endpoints``, ``sinks`` and
their nested blocks) on top of the line-numbered tree in ``yaml_tree``;
``parse_config`` collects every problem of a file into one ConfigError. The
CLI's ``source/endpoint/sink add`` build their specs through the same readers
(``*_from_options``), so both paths validate alike.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
import yaml
from psycopg.conninfo import conninfo_to_dict

from .. import signing as signing_mod
from ..errors import ConfigError
from .functions import read_functions
from .specs import (
    ACTIONS,
    DECODERS,
    DEFAULT_LANE_COUNT,
    DEFAULT_RETENTION_SECONDS,
    SSLMODES,
    STATUSES,
    Desired,
    EndpointSpec,
    SinkSpec,
    SourceSpec,
    TableSpec,
    parse_retention,
)
from .yaml_tree import (
    _UNSET,
    _BadValue,
    _Builder,
    _from_python,
    _is_null,
    _Loader,
    _Map,
    _Node,
    _Obj,
    _Report,
    _resolve,
    _Scalar,
    _Seq,
    _suggest,
)


_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_SLOT = re.compile(r"^[a-z0-9_]{1,63}$")
_HEADER_KEY = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


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
    functions = read_functions(o)
    initial_backfill = _read_initial_backfill(o, selection["include_tables"], tables)
    o.ignore("active_backfill", "active_backfills", "consumer_start", "health",
             "id", "inserted_at", "updated_at", "account_id")

    batch_timeout_ms = o.int("batch_timeout_ms", default=50, lo=0)
    request_timeout_ms = o.int("request_timeout_ms", default=30000, lo=1)
    max_ack_pending = o.int("max_ack_pending", default=10000, lo=1)
    lane_count = o.int("lane_count", default=DEFAULT_LANE_COUNT, lo=1, hi=1024)
    lane_count_given = o.has("lane_count")
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
        max_retry_count=max_retry_count, annotations=annotations, lane_count=lane_count or DEFAULT_LANE_COUNT,
        **functions, initial_backfill=initial_backfill, lane_count_given=lane_count_given,
        line=o.node.line,
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
