"""Config as code: the webhook subset of Sequin's sequin.yaml, plan, apply, export.

Layers, each usable on its own, one module each:

- ``specs``: the ``SourceSpec``/``EndpointSpec``/``SinkSpec``/``Desired``
  values every other layer shares, and the current rows as specs.
- ``yaml_tree`` and ``parse`` (pure): YAML text -> ``Desired`` specs. We
  compose the YAML ourselves so every error names the key *and* its line;
  ``${VAR}`` and ``${VAR:-default}`` are substituted inside scalar values
  after parsing, so a variable can never inject YAML structure and line
  numbers stay exact.
- ``plan`` (pure given the current rows): ``Desired`` vs ``model.Config`` ->
  field-level create/update/delete changes. Objects absent from the file are
  left alone unless pruning is asked for (Sequin's apply does the same).
- ``apply``: set up and check every touched source (slot, publication,
  tables) *before* the state transaction starts — creating a logical slot
  waits for every open transaction with an xid, ours included — then write
  all changes in one transaction with ``NOTIFY pgsink_config``.
- ``export``: the current config as sequin.yaml text.

Imports only go down that list (``export`` -> ``apply`` -> ``plan`` ->
``specs``; ``parse`` -> ``yaml_tree``, ``specs``), never back up.

Secrets (source passwords, encrypted header values) are encrypted at rest
with ``engine.secrets`` and never appear in a message, a plan, or an export:
export writes them as ``${PGSINK_...}`` placeholders.

This package re-exports the names callers use, so ``config.X`` works as it
did when all of this was one module.
"""

from __future__ import annotations

from .apply import (
    ApplyResult,
    apply_config,
    plan_config,
    read_config,
    remove_endpoint,
    remove_sink,
    remove_source,
    set_sink_status,
)
from .export import _export_sink, export_config, export_yaml
from .parse import endpoint_from_options, parse_config, sink_from_options, source_from_options
from .plan import Change, FieldChange, Plan, make_plan, show_value
from .specs import (
    ACTIONS,
    DECODERS,
    DEFAULT_RETENTION_SECONDS,
    SSLMODES,
    STATUSES,
    Desired,
    EndpointSpec,
    SinkSpec,
    SourceSpec,
    TableSpec,
    current_specs,
    endpoint_spec,
    format_retention,
    parse_retention,
    sink_spec,
    source_spec,
)
from .yaml_tree import substitute

__all__ = [
    # specs
    "ACTIONS", "DECODERS", "DEFAULT_RETENTION_SECONDS", "SSLMODES", "STATUSES",
    "Desired", "EndpointSpec", "SinkSpec", "SourceSpec", "TableSpec",
    "current_specs", "endpoint_spec", "format_retention", "parse_retention", "sink_spec", "source_spec",
    # parse
    "substitute", "parse_config", "source_from_options", "endpoint_from_options", "sink_from_options",
    # plan
    "Change", "FieldChange", "Plan", "make_plan", "show_value",
    # apply
    "ApplyResult", "apply_config", "plan_config", "read_config",
    "remove_endpoint", "remove_sink", "remove_source", "set_sink_status",
    # export
    "export_config", "export_yaml",
    "_export_sink",  # used by tests/unit/test_filters.py
]
