"""Planning: desired specs vs the current rows -> field-level changes (pure).

``make_plan`` compares ``Desired`` with ``current_specs`` of a loaded
``model.Config`` and lists what to create, update and (with prune) delete.
Objects absent from the file are left alone unless pruning is asked for
(Sequin's apply does the same). Secrets are described by what happens to
them, never by value.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import ConfigError
from ..model import Config
from .specs import Desired, SinkSpec, TableSpec, current_specs, format_retention


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
    desired = _keep_lane_counts(_keep_signing_secrets(desired, now), now)
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
    warnings = list(desired.warnings)
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
        if old_sink is not None and _grouping(old_sink) != _grouping(k):
            warnings.append(
                f"{where}: its grouping changes (message_grouping or group_column_names): messages already "
                "queued or parked keep their old groups, so a row's new changes may overtake its pending ones; "
                "change it when `pgsink status` shows nothing pending for this sink")
    if prune and not (desired.sources or desired.endpoints or desired.sinks):
        problems.append(f"{desired.filename}: declares nothing, and --prune would delete every source, endpoint "
                        "and sink; to remove objects, remove them one by one (pgsink sink remove ...)")
    elif prune:
        changes += _prune(desired, now, problems)
    if problems:
        raise ConfigError("\n".join(problems))
    return Plan(changes, warnings)


def _grouping(k: SinkSpec) -> tuple[bool, frozenset[tuple[str, tuple[str, ...] | None]]]:
    """What decides a sink's group keys."""
    return k.message_grouping, frozenset((t.name, t.group_column_names) for t in k.tables if t.group_column_names)


def _keep_signing_secrets(desired: Desired, now: Desired) -> Desired:
    """``signing: true`` without a secret keeps the endpoint's current secret (export writes it so)."""
    secrets_now = {e.name: e.signing_secret for e in now.endpoints if e.signing_secret}
    endpoints = [dataclasses.replace(e, signing_secret=secrets_now[e.name])
                 if e.signing and e.signing_secret is None and e.name in secrets_now else e
                 for e in desired.endpoints]
    return dataclasses.replace(desired, endpoints=endpoints)


def _keep_lane_counts(desired: Desired, now: Desired) -> Desired:
    """A sink whose file leaves lane_count out keeps the count it has (the default changed in 0004)."""
    counts_now = {k.name: k.lane_count for k in now.sinks}
    sinks = [dataclasses.replace(k, lane_count=counts_now[k.name])
             if not k.lane_count_given and k.name in counts_now else k
             for k in desired.sinks]
    return dataclasses.replace(desired, sinks=sinks)


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
