"""Sink filters: column filters (every operator, jsonb paths, nulls), SQL expressions, Python functions."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from pgsink.engine import config as cfg
from pgsink.engine import filters, userfunc
from pgsink.engine.errors import ConfigError
from pgsink.engine.jsontext import RawJson

ROW = {"id": 7, "status": "shipped", "amount": RawJson("150.50"), "qty": 3, "note": None, "vip": True,
       "ratio": 0.5, "doc": RawJson('{"address": {"city": "Paris", "zip": "75001"}, "tags": ["a", "b"], '
                                    '"score": 4.5, "flag": false, "none": null}')}


def cf(**f: Any) -> bool:
    return filters.column_filter(f)(ROW)


# ---------------------------------------------------------------- column filters


@pytest.mark.parametrize(("op", "value", "expected"), [
    ("=", "shipped", True), ("=", "new", False), ("!=", "new", True), ("!=", "shipped", False),
    (">", "ship", True), ("<", "ship", False), (">=", "shipped", True), ("<=", "shipped", True),
    ("in", ["new", "shipped"], True), ("in", ["new"], False), ("not in", ["new"], True),
    ("not in", ["shipped"], False),
])
def test_string_column_operators(op: str, value: Any, expected: bool) -> None:
    assert cf(column_name="status", operator=op, comparison_value=value) is expected


@pytest.mark.parametrize(("op", "value", "expected"), [
    ("=", 150.5, True), ("=", "150.50", True), (">", 100, True), (">", 150.5, False), (">=", 150.5, True),
    ("<", 151, True), ("<=", 150, False), ("!=", 150, True), ("in", [1, 150.5], True), ("not in", [150.5], False),
])
def test_numeric_column_compares_exactly_by_value(op: str, value: Any, expected: bool) -> None:
    assert cf(column_name="amount", operator=op, comparison_value=value, field_type="number") is expected


def test_int_float_and_boolean_columns() -> None:
    assert cf(column_name="qty", operator=">=", comparison_value=3)
    assert cf(column_name="ratio", operator="<", comparison_value=0.75)
    assert cf(column_name="vip", operator="=", comparison_value=True)
    assert not cf(column_name="vip", operator="=", comparison_value=1)  # a boolean is not the number 1
    assert cf(column_name="vip", operator="=", comparison_value="true", field_type="boolean")


def test_nulls_and_missing_columns() -> None:
    assert cf(column_name="note", operator="is null")
    assert not cf(column_name="note", operator="is not null")
    assert cf(column_name="status", operator="is not null")
    assert cf(column_name="absent", operator="is null")
    for op, value in (("=", "x"), ("!=", "x"), (">", 1), ("in", ["x"]), ("not in", ["x"])):
        assert not cf(column_name="note", operator=op, comparison_value=value), op  # NULL never compares


@pytest.mark.parametrize(("path", "op", "value", "ftype", "expected"), [
    ("address.city", "=", "Paris", "string", True),
    ("address.city", "in", ["Lyon", "Paris"], "string", True),
    ("address.zip", "=", 75001, "string", True),
    ("score", ">", "4", "number", True),
    ("score", "<=", 4.5, "number", True),
    ("flag", "=", False, "boolean", True),
    ("none", "is null", None, None, True),
    ("address.missing", "is null", None, None, True),
    ("address.city.deeper", "is null", None, None, True),
    ("tags", "is not null", None, "list", True),
    ("address.city", "!=", "Paris", "string", False),
])
def test_jsonb_field_paths(path: str, op: str, value: Any, ftype: str | None, expected: bool) -> None:
    f: dict[str, Any] = {"column_name": "doc", "field_path": path, "operator": op, "field_type": ftype}
    if value is not None:
        f["comparison_value"] = value
    assert cf(**f) is expected


@pytest.mark.parametrize(("f", "problem"), [
    ({"operator": "="}, "needs column_name"),
    ({"column_name": "a", "operator": "like", "comparison_value": 1}, "operator 'like' is not one of"),
    ({"column_name": "a", "operator": "="}, "needs a comparison_value"),
    ({"column_name": "a", "operator": "in", "comparison_value": 1}, "needs a list"),
    ({"column_name": "a", "operator": "is null", "comparison_value": 1}, "takes no comparison_value"),
    ({"column_name": "a", "operator": "=", "comparison_value": 1, "field_type": "date"}, "field_type 'date'"),
    ({"column_name": "a", "operator": "=", "comparison_value": 1, "field_path": "a..b"}, "dotted path"),
])
def test_invalid_column_filters(f: dict[str, Any], problem: str) -> None:
    assert problem in (filters.check_column_filter(f) or "")


# ---------------------------------------------------------------- SQL expressions


def sql(expr: str, action: str = "update", record: dict[str, Any] | None = None,
        changes: dict[str, Any] | None = None) -> bool:
    return filters.compile_sql(expr)(action, ROW if record is None else record, changes)


@pytest.mark.parametrize(("expr", "expected"), [
    ("status = 'shipped' and amount > 100", True),
    ("status = 'shipped' and amount > 200", False),
    ("amount = 150.5", True),
    ("amount between 150 and 151 and qty not between 4 and 9", True),
    ("status in ('new', 'shipped') and id not in (1, 2)", True),
    ("status like 'ship%' and status not like '%x' and upper(status) ilike 'SHIP_ED'", True),
    ("note is null and status is not null", True),
    ("note = 'x' or status = 'shipped'", True),   # unknown OR true
    ("not (note = 'x')", False),                   # NOT unknown is unknown: does not pass
    ("note is distinct from 'x' and id is not distinct from 7", True),
    ("coalesce(note, 'none') = 'none'", True),
    ("vip and vip is true and not (vip is false)", True),
    ("doc->'address'->>'city' = 'Paris' and (doc->>'score')::numeric > 4", True),
    ("doc ? 'tags' and doc @> '{\"address\": {\"city\": \"Paris\"}}'::jsonb", True),
    ("jsonb_typeof(doc->'tags') = 'array' and jsonb_array_length(doc->'tags') = 2", True),
    ("length(status) = 7 and lower('ABC') || 'd' = 'abcd' and abs(-2) = 2", True),
    ("qty * 2 + 1 = 7 and qty / 2 = 1 and qty % 2 = 1 and -qty < 0", True),
    ("action = 'update' and changes ? 'status' and changes.status = 'new'", True),
    ("record.status <> changes.status", True),
    ("qty / 0 = 1", False),  # division by zero: unknown, not an error
    ("starts_with(status, 'sh') and status::text = 'shipped' and '3'::int = qty", True),
])
def test_sql_expressions(expr: str, expected: bool) -> None:
    assert sql(expr, changes={"status": "new"}) is expected


def test_sql_changes_is_null_for_inserts() -> None:
    assert sql("changes is null and action = 'insert'", action="insert")
    assert not sql("changes ? 'status'", action="insert")


@pytest.mark.parametrize(("expr", "message", "caret_at"), [
    ("status = 'x' and id in (select id from orders)", "a subquery is not allowed", 20),
    ("random() > 0.5", "function random() is not allowed", 0),
    ("created_at > now()", "function now() is not allowed", 13),
    ("created_at > current_timestamp", "a current_* value (not immutable)", 13),
    ("id = $1", "a parameter is not allowed", 5),
    ("a.b.c = 1", "a.b.c is not a column of the row", 0),
    ("case when a then 1 end = 1", "CASE is not allowed", 0),
    ("status ~ 'x'", "operator ~ is not allowed", 7),
    ("count(*) > 1", "function count() is not allowed", 0),
    ("status::regclass = 'x'", "a cast to regclass is not supported", 6),
    ("pg_catalog.pg_sleep(1) is null", "function pg_sleep() is not allowed", 0),
])
def test_rejected_sql_points_at_the_offending_part(expr: str, message: str, caret_at: int) -> None:
    with pytest.raises(ConfigError) as e:
        filters.compile_sql(expr)
    text = str(e.value)
    assert text.startswith("filter_sql: ") and message in text, text
    lines = text.splitlines()
    assert lines[-2].strip() == expr and lines[-1].index("^") - 4 == caret_at, text


@pytest.mark.parametrize(("expr", "message"), [
    ("", "is empty"),
    ("status = 'x'; delete from orders", "one expression, not several statements"),
    ("delete from orders", "single boolean expression"),
    ("status = ", "not a valid SQL expression"),
    ("1 from orders", "single boolean expression"),
    ("a, b", "single boolean expression"),
])
def test_rejected_statements(expr: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        filters.compile_sql(expr)


# ---------------------------------------------------------------- Python functions


def _write(path: Path, code: str) -> str:
    path.write_text(code)
    return str(path)


def test_python_filter_from_a_file_gets_plain_values(tmp_path: Path) -> None:
    ref = _write(tmp_path / "f.py", "def filter(action, record, changes, metadata):\n"
                                    "    return record['amount'] > 100 and metadata['table_name'] == 'orders'\n")
    pred = filters.sink_predicate([], None, ref)
    assert pred is not None
    assert pred("insert", ROW, None, {"table_name": "orders"})
    assert not pred("insert", {**ROW, "amount": RawJson("99.99")}, None, {"table_name": "orders"})


def test_python_filter_by_module_and_named_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "my_hooks_mod.py", "def only_vip(action, record, changes, metadata):\n"
                                         "    return record['vip']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pred = filters.sink_predicate([], None, "my_hooks_mod:only_vip")
    assert pred is not None and pred("insert", ROW, None, {})
    file_pred = filters.sink_predicate([], None, f"{tmp_path}/my_hooks_mod.py:only_vip")
    assert file_pred is not None and file_pred("insert", ROW, None, {})
    sys.modules.pop("my_hooks_mod", None)


def test_all_filters_combine_with_and(tmp_path: Path) -> None:
    ref = _write(tmp_path / "f.py", "def filter(action, record, changes, metadata):\n    return record['qty'] == 3\n")
    pred = filters.sink_predicate([{"column_name": "status", "operator": "=", "comparison_value": "shipped"}],
                                  "amount > 100", ref)
    assert pred is not None and pred("insert", ROW, None, {})
    assert not pred("insert", {**ROW, "qty": 4}, None, {})
    assert not pred("insert", {**ROW, "status": "new"}, None, {})
    assert not pred("insert", {**ROW, "amount": 5}, None, {})
    assert filters.sink_predicate([], None, None) is None


def test_file_functions_are_reloaded_when_they_change(tmp_path: Path) -> None:
    path = tmp_path / "f.py"
    _write(path, "def filter(action, record, changes, metadata):\n    return False\n")
    assert userfunc.load(str(path), "filter")("insert", {}, None, {}) is False
    _write(path, "def filter(action, record, changes, metadata):\n    return True\n")
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert userfunc.load(str(path), "filter")("insert", {}, None, {}) is True


@pytest.mark.parametrize(("code", "ref_suffix", "message"), [
    ("def other(a, r, c, m):\n    return True\n", "", "has no function 'filter'"),
    ("raise RuntimeError('boom at import')\n", "", "importing"),
])
def test_unloadable_functions_say_why(tmp_path: Path, code: str, ref_suffix: str, message: str) -> None:
    ref = _write(tmp_path / "bad.py", code) + ref_suffix
    with pytest.raises(ConfigError, match=message):
        filters.sink_predicate([], None, ref)
    with pytest.raises(ConfigError, match="cannot read"):
        userfunc.load(str(tmp_path / "missing.py"), "filter")
    with pytest.raises(ConfigError, match="importing no_such_module_xyz failed"):
        userfunc.load("no_such_module_xyz:filter", "filter")


def test_raising_and_non_boolean_functions_are_user_function_errors(tmp_path: Path) -> None:
    ref = _write(tmp_path / "f.py", "def filter(action, record, changes, metadata):\n"
                                    "    return 1 / 0 if record['qty'] else 'yes'\n")
    pred = filters.sink_predicate([], None, ref, what="sink s: filter")
    assert pred is not None
    with pytest.raises(userfunc.UserFunctionError) as e:
        pred("insert", ROW, None, {})
    assert "raised ZeroDivisionError" in str(e.value) and "Traceback" in e.value.detail
    with pytest.raises(userfunc.UserFunctionError, match="returned str, not True or False"):
        pred("insert", {**ROW, "qty": 0}, None, {})


def test_a_hanging_function_is_cut_off_and_an_outer_timer_survives() -> None:
    fired: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        def spin() -> None:
            while True:
                pass

        started = time.monotonic()
        with pytest.raises(userfunc.UserFunctionError, match="ran longer than 100 ms and was cut off"):
            userfunc.call(spin, (), timeout=0.1, what="transform t")
        with pytest.raises(userfunc.UserFunctionError, match="cut off"):
            userfunc.call(time.sleep, (30,), timeout=0.1, what="transform t")
        assert time.monotonic() - started < 2
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 3 < remaining <= 5  # the outer timer is still armed, minus the time spent
        assert userfunc.call(lambda x: x + 1, (1,), timeout=0.1, what="f") == 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not fired


def test_outside_the_main_thread_functions_run_without_a_timer() -> None:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(userfunc.call(lambda: 42, (), timeout=0.01, what="f")))
    t.start()
    t.join(5)
    assert out == [42]


def test_plain_values() -> None:
    assert filters.plain(RawJson("1.10")) == Decimal("1.10")
    assert filters.plain(RawJson('{"a": [1]}')) == {"a": [1]}
    assert filters.plain(RawJson("true")) is True
    assert filters.plain("x") == "x"


# ---------------------------------------------------------------- YAML

SINK = """databases:
  - name: db
    hostname: localhost
    database: app
    slot: {name: s1}
    publication: {name: p1}
http_endpoints:
  - name: hook
    url: http://127.0.0.1:9/x
sinks:
  - name: orders
    database: db
%s    destination:
      type: webhook
      http_endpoint: hook
"""


def test_yaml_accepts_filters_and_functions_and_exports_them_back() -> None:
    d = cfg.parse_config(SINK % (
        "    filters:\n"
        "      - column_name: status\n        operator: '='\n        comparison_value: shipped\n"
        "      - column_name: doc\n        field_path: address.city\n        operator: IN\n"
        "        comparison_value: [Paris, Lyon]\n        field_type: string\n"
        "      - column_name: note\n        operator: is null\n"
        "    filter:\n      sql: amount > 100\n"
        "    transform: {path: record.id}\n"
        "    routing: {python: 'hooks:route'}\n"
        "    function_timeout_ms: 250\n"), filename="sequin.yaml")
    k = d.sinks[0]
    assert k.filters == (
        {"column_name": "status", "operator": "=", "comparison_value": "shipped"},
        {"column_name": "doc", "operator": "in", "comparison_value": ["Paris", "Lyon"],
         "field_path": "address.city", "field_type": "string"},
        {"column_name": "note", "operator": "is null"})
    assert (k.filter_sql, k.transform_path, k.route_function, k.function_timeout_ms) == (
        "amount > 100", "record.id", "hooks:route", 250)


@pytest.mark.parametrize(("snippet", "message"), [
    ("    filter:\n      sql: id in (select 1)\n", "sequin.yaml:14: sink 'orders': filter: sql: a subquery is not allowed"),
    ("    filter:\n      sql: a = 1\n      python: x:y\n", "give exactly one of sql, python"),
    ("    filter: my-filter\n", "named functions (Sequin's functions: section) are not supported yet"),
    ("    transform: {path: 'record..x'}\n", "is not a path like record"),
    ("    routing: {sql: 'a = 1'}\n", "give exactly one of python"),
    ("    filters:\n      - column_name: a\n        operator: like\n        comparison_value: x\n",
     "sequin.yaml:14: sink 'orders': filters: operator 'like' is not one of"),
])
def test_yaml_rejects_bad_filters_and_functions(snippet: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg.parse_config(SINK % snippet, filename="sequin.yaml")
    assert message in str(e.value), str(e.value)


def test_cli_shaped_options_build_the_same_spec_as_yaml() -> None:
    spec = cfg.sink_from_options({
        "name": "s", "database": "db",
        "destination": {"type": "webhook", "http_endpoint": "hook"},
        "filters": [{"column_name": "status", "operator": "=", "comparison_value": "paid"}],
        "filter": {"sql": "amount > 100"}, "transform": {"python": "hooks.py"}, "routing": {"python": "m:route"},
        "function_timeout_ms": 300})
    assert (spec.filter_sql, spec.transform_function, spec.route_function, spec.function_timeout_ms) == (
        "amount > 100", "hooks.py", "m:route", 300)
    assert spec.filters == ({"column_name": "status", "operator": "=", "comparison_value": "paid"},)


def test_exported_sink_functions_parse_back_to_the_same_spec() -> None:
    import yaml

    d = cfg.parse_config(SINK % (
        "    filters:\n      - column_name: doc\n        field_path: a.b\n        operator: '>='\n"
        "        comparison_value: 5\n        field_type: number\n"
        "    filter: {python: 'hooks:keep'}\n    transform: {python: t.py}\n    routing: {python: r.py}\n"
        "    function_timeout_ms: 50\n"))
    exported = cfg._export_sink(d.sinks[0])
    doc = {"databases": [], "http_endpoints": [], "sinks": [exported]}
    text = SINK.split("sinks:")[0] + yaml.safe_dump({"sinks": doc["sinks"]}, sort_keys=False)
    assert cfg.parse_config(text).sinks[0] == d.sinks[0]


def test_a_json_document_python_cannot_hold_fails_the_filter_not_the_reader() -> None:
    """Numbers past a float's reach compare exactly; a document nested too deeply for Python raises
    UserFunctionError, which capture answers by keeping the change (never a crash, never a drop)."""
    row = {"doc": RawJson('{"n": 123456789012345678901234567891, "x": 1e400}')}
    exact = filters.column_filter({"column_name": "doc", "field_path": "n", "operator": ">",
                                   "comparison_value": 123456789012345678901234567890, "field_type": "number"})
    assert exact(row)
    huge = filters.column_filter({"column_name": "doc", "field_path": "x", "operator": ">",
                                  "comparison_value": 1, "field_type": "number"})
    assert huge(row)
    deep = {"doc": RawJson("[" * 5000 + "]" * 5000)}
    with pytest.raises(userfunc.UserFunctionError, match="cannot read"):
        filters.column_filter({"column_name": "doc", "operator": "is not null"})(deep)


def test_a_retained_change_is_judged_as_capture_judged_it(tmp_path: Path) -> None:
    """Replay and backfill redo capture's decision from the stored jsonb: numbers nested in a json column
    are plain numbers, as capture gave them, not objects a user's comparison would trip on."""
    from types import SimpleNamespace

    hook = tmp_path / "f.py"
    hook.write_text("def filter(action, record, changes, metadata):\n"
                    "    return record['payload']['price'] > 100 and metadata['consumer']['name'] == 's'\n")
    pred = filters.sink_predicate([], None, str(hook))
    assert pred is not None
    sink = SimpleNamespace(id="x", name="s", annotations={})

    def judged(record: str) -> bool:
        return filters.retained_change_passes(pred, sink, "public", "t", "insert", record, None, None, 1, 0, None)

    assert judged('{"payload": {"price": 150.5}}') is True
    assert judged('{"payload": {"price": 5}}') is False
    assert judged('{"payload": null}') is True  # the filter raised: kept, as capture keeps it


def test_replay_sees_annotation_numbers_exactly_as_capture_did() -> None:
    # capture hands filters annotations read with loads_exact; replay must not round them to floats
    seen: list[Any] = []

    def predicate(action: str, record: Any, changes: Any, metadata: dict[str, Any]) -> bool:
        seen.append(metadata["transaction_annotations"])
        return True

    class Sink:
        id, name, annotations = "s", "s", {}

    annotations = '{"n": 12345678901234567890.1, "i": 98765432109876543210}'
    assert filters.retained_change_passes(predicate, Sink(), "public", "t", "insert", '{"id": 1}', None, None,
                                          1, 0, annotations)
    assert seen == [{"n": Decimal("12345678901234567890.1"), "i": 98765432109876543210}]
