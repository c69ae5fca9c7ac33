"""A sink's functions in sequin.yaml: column filters, and filter / transform / routing /
enrichment given inline (``{sql|path|python: ...}`` or ``none``), each checked before use
(SQL parsed with pglast, paths and module references by their form)."""

from __future__ import annotations

import re
from typing import Any

from .. import enrichment as enrichment_mod
from .. import filters as filters_mod
from ..errors import ConfigError
from .yaml_tree import _UNSET, _BadValue, _Map, _Node, _Obj, _plain, _Scalar

_FUNCTION_KINDS = {"filter": ("sql", "python"), "transform": ("path", "python"), "routing": ("python",),
                   "enrichment": ("sql",)}
FUNCTION_FIELDS = {("filter", "sql"): "filter_sql", ("filter", "python"): "filter_function",
                    ("transform", "path"): "transform_path", ("transform", "python"): "transform_function",
                    ("routing", "python"): "route_function", ("enrichment", "sql"): "enrichment_sql"}
_TRANSFORM_PATH = re.compile(r"^record(\.[A-Za-z0-9_$-]+)*$|^(changes|action|metadata)(\.[A-Za-z0-9_$-]+)*$")


def read_functions(o: _Obj) -> dict[str, Any]:
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
        out[FUNCTION_FIELDS[(key, form)]] = value
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


def _function_none(node: _Node) -> bool:
    return isinstance(node, _Scalar) and (node.text if node.py is _UNSET else str(node.py)) == "none"
