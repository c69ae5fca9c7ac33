"""Exporting the current config as sequin.yaml text.

The output parses back into specs equal to the current ones, so applying
it is a no-op plan. Secrets never appear: each is written as a
``${PGSINK_...}`` placeholder, listed in the header comment.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from ..model import Config, HttpEndpoint, Source
from .apply import read_config
from .functions import FUNCTION_FIELDS
from .specs import SinkSpec, current_specs, format_retention


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
    for (key, form), attr in FUNCTION_FIELDS.items():
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
