"""Sink filters, applied at enqueue time: a change that fails them is not queued for the sink.

Three kinds, combined with AND (the sink's ``actions`` come first, in capture):

- **column filters** in sequin.yaml's form: ``column_name``, ``operator``
  (``= != > >= < <= in, not in, is null, is not null``), ``comparison_value``,
  and for jsonb columns ``field_path`` (dotted) with ``field_type``;
- **a SQL boolean expression** over the row (``status = 'shipped' and amount >
  100``, ``changes ? 'status'``), parsed with pglast and compiled once into a
  Python predicate: no round trip per change. Only a whitelist of node types,
  operators and immutable functions is accepted; anything else (subqueries,
  volatile functions, parameters...) is refused with an error pointing at it;
- **a Python function** ``def filter(action, record, changes, metadata) -> bool``.

SQL semantics are kept where they matter: NULL makes comparisons unknown and
an unknown result does not pass. Column names refer to the new row (``record``
for deletes: the old row); ``action`` and ``changes`` (the old values of
changed columns, a mapping) are the two extra names, ``record.col`` and
``changes.col`` qualify a column explicitly. Numeric and json values
(``RawJson``) compare by value: ``amount > 100`` is numeric, exactly.
"""

from __future__ import annotations

import logging
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import pglast
from pglast import ast
from pglast.enums import A_Expr_Kind, BoolExprType, BoolTestType, NullTestType

from . import userfunc
from .errors import ConfigError
from .jsontext import RawJson, dumps, loads_exact

log = logging.getLogger("pgsink.filters")

Predicate = Callable[[str, Mapping[str, Any], Mapping[str, Any] | None, Mapping[str, Any]], bool]
_Eval = Callable[[str, Mapping[str, Any], Mapping[str, Any] | None], Any]

OPERATORS = ("=", "!=", ">", ">=", "<", "<=", "in", "not in", "is null", "is not null")
FIELD_TYPES = ("string", "number", "boolean", "null", "list", "object")


def plain(value: Any) -> Any:
    """A record value for comparisons: numerics exact (Decimal), json documents parsed (numbers kept
    exact); UserFunctionError for a document Python cannot hold, so the change is kept, not lost."""
    if type(value) is RawJson:
        text = value.text
        try:
            if text[:1] in "{[\"tfn":
                return loads_exact(text)
            try:
                return Decimal(text)
            except InvalidOperation:
                return loads_exact(text)
        except ValueError as e:
            raise userfunc.UserFunctionError(f"a JSON value the filter cannot read: {e}") from None
    return value


def _number(value: Any) -> Any:
    """Decimal for JSON floats so they compare exactly with numerics; ints and the rest unchanged."""
    if isinstance(value, float):
        return Decimal(repr(value))
    return value


# ====================================================================== column filters


def _compare(op: str, left: Any, right: Any) -> bool:
    if op == "is null":
        return left is None
    if op == "is not null":
        return left is not None
    if left is None:
        return False  # SQL: a comparison with NULL is not true
    if op in ("in", "not in"):
        found = any(_equal(left, r) for r in right)
        return found if op == "in" else not found
    if op == "=":
        return _equal(left, right)
    if op == "!=":
        return not _equal(left, right)
    try:
        return bool(_ORDER[op](_number(left), _number(right)))
    except TypeError:
        return False


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(_number(a) == _number(b))


_ORDER: dict[str, Callable[[Any, Any], Any]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def check_column_filter(f: Mapping[str, Any]) -> str | None:
    """What is wrong with one column filter, or None."""
    column = f.get("column_name")
    if not isinstance(column, str) or not column:
        return "needs column_name"
    op = f.get("operator")
    if op not in OPERATORS:
        return f"operator {op!r} is not one of {', '.join(OPERATORS)}"
    value = f.get("comparison_value")
    if op in ("is null", "is not null"):
        if value is not None:
            return f"operator {op!r} takes no comparison_value"
    elif op in ("in", "not in"):
        if not isinstance(value, list):
            return f"operator {op!r} needs a list as comparison_value"
    elif value is None:
        return f"operator {op!r} needs a comparison_value (use 'is null' to test for null)"
    field_type = f.get("field_type")
    if field_type is not None and field_type not in FIELD_TYPES:
        return f"field_type {field_type!r} is not one of {', '.join(FIELD_TYPES)}"
    path = f.get("field_path")
    if path is not None and (not isinstance(path, str) or not path or "" in path.split(".")):
        return f"field_path {path!r} must be a dotted path like 'address.city'"
    return None


def _typed(value: Any, field_type: str | None) -> Any:
    """Coerce a comparison value to field_type (YAML may give "100" for a number)."""
    if field_type == "number" and isinstance(value, str):
        try:
            return Decimal(value)
        except InvalidOperation:
            return value
    if field_type == "boolean" and isinstance(value, str):
        return {"true": True, "false": False}.get(value.lower(), value)
    if field_type == "string" and not isinstance(value, str | list) and value is not None:
        return str(value).lower() if isinstance(value, bool) else str(value)
    return value


def column_filter(f: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], bool]:
    """A predicate over a record for one (valid) column filter."""
    problem = check_column_filter(f)
    if problem:
        raise ConfigError(f"column filter on {f.get('column_name')!r}: {problem}")
    column: str = f["column_name"]
    op: str = f["operator"]
    field_type = f.get("field_type")
    path = tuple(f["field_path"].split(".")) if f.get("field_path") else ()
    raw = f.get("comparison_value")
    expected = [_typed(v, field_type) for v in raw] if isinstance(raw, list) else _typed(raw, field_type)

    def test(record: Mapping[str, Any]) -> bool:
        value = plain(record.get(column))
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return _compare(op, _number(value), expected)

    return test


# ====================================================================== SQL expressions

_PREFIX = "select "

_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "=": lambda a, b: _equal(a, b), "<>": lambda a, b: not _equal(a, b), "!=": lambda a, b: not _equal(a, b),
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": lambda a, b: _divide(a, b),
    "%": operator.mod, "||": lambda a, b: _text(a) + _text(b),
    "?": lambda a, b: isinstance(a, dict) and b in a,
    "->": lambda a, b: _field(a, b), "->>": lambda a, b: _text_or_none(_field(a, b)),
    "@>": lambda a, b: _contains(a, b),
}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "lower": lambda s: _text(s).lower(), "upper": lambda s: _text(s).upper(),
    "length": lambda s: len(_text(s)), "char_length": lambda s: len(_text(s)),
    "trim": lambda s: _text(s).strip(), "btrim": lambda s: _text(s).strip(),
    "abs": abs, "round": lambda n, d=0: round(_number(n), int(d)),
    "starts_with": lambda s, p: _text(s).startswith(_text(p)),
    "jsonb_typeof": lambda v: _json_type(v), "jsonb_array_length": lambda v: len(v) if isinstance(v, list) else None,
}
_CASTS: dict[str, Callable[[Any], Any]] = {
    "int2": lambda v: int(_number(v)), "int4": lambda v: int(_number(v)), "int8": lambda v: int(_number(v)),
    "numeric": lambda v: Decimal(str(v)), "float4": lambda v: Decimal(str(v)), "float8": lambda v: Decimal(str(v)),
    "text": lambda v: _text(v), "varchar": lambda v: _text(v),
    "bool": lambda v: v if isinstance(v, bool) else {"true": True, "t": True, "false": False, "f": False}[str(v)],
    "jsonb": lambda v: loads_exact(v) if isinstance(v, str) else v,
    "json": lambda v: loads_exact(v) if isinstance(v, str) else v,
    "date": lambda v: _text(v)[:10], "timestamptz": lambda v: _text(v), "timestamp": lambda v: _text(v),
}


def _divide(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int):
        return int(a / b)  # SQL integer division truncates toward zero
    return _number(a) / _number(b)


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict | list):
        return dumps(v).decode()
    return str(v)


def _text_or_none(v: Any) -> Any:
    return None if v is None else _text(v)


def _field(doc: Any, key: Any) -> Any:
    if isinstance(doc, dict):
        return doc.get(key if isinstance(key, str) else _text(key))
    if isinstance(doc, list) and isinstance(key, int):
        return doc[key] if -len(doc) <= key < len(doc) else None
    return None


def _contains(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return all(k in a and _contains(a[k], v) for k, v in b.items())
    if isinstance(a, list) and isinstance(b, list):
        return all(any(_contains(x, y) for x in a) for y in b)
    if isinstance(a, list):
        return any(_contains(x, b) for x in a)
    return _equal(a, b)


def _json_type(v: Any) -> str | None:
    if v is None:
        return None
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(v), "number")


def _like(value: Any, pattern: Any, *, insensitive: bool) -> bool:
    regex = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in _text(pattern))
    return re.fullmatch(regex, _text(value), re.S | (re.I if insensitive else 0)) is not None


class _Compiler:
    """Turns a pglast expression tree into nested closures; refuses anything off the whitelist."""

    def __init__(self, text: str) -> None:
        self.text = text

    def fail(self, node: Any, what: str) -> ConfigError:
        location = getattr(node, "location", None)
        pointer = ""
        if isinstance(location, int) and location >= len(_PREFIX):
            at = location - len(_PREFIX)
            pointer = f"\n    {self.text}\n    {' ' * at}^"
        return ConfigError(f"filter_sql: {what}{pointer}")

    def compile(self, node: Any) -> _Eval:
        method = getattr(self, f"_{type(node).__name__}", None)
        if method is None:
            raise self.fail(node, f"{_describe(node)} is not allowed in a filter expression")
        return method(node)  # type: ignore[no-any-return]

    def _A_Const(self, node: ast.A_Const) -> _Eval:
        if node.isnull:
            return lambda a, r, c: None
        v = node.val
        value: Any
        if isinstance(v, ast.Integer):
            value = v.ival
        elif isinstance(v, ast.Float):
            value = Decimal(v.fval)
        elif isinstance(v, ast.Boolean):
            value = v.boolval
        elif isinstance(v, ast.String):
            value = v.sval
        else:
            raise self.fail(node, f"the constant {_describe(v)} is not supported")
        return lambda a, r, c: value

    def _ColumnRef(self, node: ast.ColumnRef) -> _Eval:
        names = [f.sval for f in node.fields if isinstance(f, ast.String)]
        if len(names) != len(node.fields):
            raise self.fail(node, "* is not allowed: name the columns")
        if names == ["action"]:
            return lambda a, r, c: a
        if names == ["changes"]:
            return lambda a, r, c: {k: plain(v) for k, v in (c or {}).items()} if c is not None else None
        if len(names) == 1:
            col = names[0]
            return lambda a, r, c: plain(r.get(col))
        if len(names) == 2 and names[0] in ("record", "changes"):
            where, col = names
            if where == "record":
                return lambda a, r, c: plain(r.get(col))
            return lambda a, r, c: plain(c.get(col)) if c else None
        raise self.fail(node, f"{'.'.join(names)} is not a column of the row (use col, record.col or changes.col)")

    def _BoolExpr(self, node: ast.BoolExpr) -> _Eval:
        args = [self.compile(x) for x in node.args]
        if node.boolop == BoolExprType.NOT_EXPR:
            inner = args[0]

            def not_(a: str, r: Any, c: Any) -> Any:
                v = inner(a, r, c)
                return None if v is None else not v
            return not_
        if node.boolop == BoolExprType.AND_EXPR:
            def and_(a: str, r: Any, c: Any) -> Any:
                unknown = False
                for f in args:
                    v = f(a, r, c)
                    if v is None:
                        unknown = True
                    elif not v:
                        return False
                return None if unknown else True
            return and_

        def or_(a: str, r: Any, c: Any) -> Any:
            unknown = False
            for f in args:
                v = f(a, r, c)
                if v is None:
                    unknown = True
                elif v:
                    return True
            return None if unknown else False
        return or_

    def _NullTest(self, node: ast.NullTest) -> _Eval:
        arg = self.compile(node.arg)
        if node.nulltesttype == NullTestType.IS_NULL:
            return lambda a, r, c: arg(a, r, c) is None
        return lambda a, r, c: arg(a, r, c) is not None

    def _BooleanTest(self, node: ast.BooleanTest) -> _Eval:
        arg = self.compile(node.arg)
        want = {BoolTestType.IS_TRUE: (True, True), BoolTestType.IS_NOT_TRUE: (True, False),
                BoolTestType.IS_FALSE: (False, True), BoolTestType.IS_NOT_FALSE: (False, False)}.get(node.booltesttype)
        if want is None:
            return lambda a, r, c: (arg(a, r, c) is None) == (node.booltesttype == BoolTestType.IS_UNKNOWN)
        value, positive = want
        return lambda a, r, c: (arg(a, r, c) is value) == positive

    def _CoalesceExpr(self, node: ast.CoalesceExpr) -> _Eval:
        args = [self.compile(x) for x in node.args]

        def coalesce(a: str, r: Any, c: Any) -> Any:
            for f in args:
                v = f(a, r, c)
                if v is not None:
                    return v
            return None
        return coalesce

    def _TypeCast(self, node: ast.TypeCast) -> _Eval:
        type_name = node.typeName.names[-1].sval if node.typeName and node.typeName.names else "?"
        cast = _CASTS.get(type_name)
        if cast is None:
            raise self.fail(node, f"a cast to {type_name} is not supported (allowed: {', '.join(sorted(_CASTS))})")
        arg = self.compile(node.arg)

        def convert(a: str, r: Any, c: Any) -> Any:
            v = arg(a, r, c)
            try:
                return None if v is None else cast(v)
            except (ValueError, TypeError, KeyError, ArithmeticError):
                return None  # not convertible: unknown, so the change does not pass
        return convert

    def _FuncCall(self, node: ast.FuncCall) -> _Eval:
        name = node.funcname[-1].sval
        fn = _FUNCTIONS.get(name)
        if fn is None or len(node.funcname) > 2 or (len(node.funcname) == 2 and node.funcname[0].sval != "pg_catalog"):
            raise self.fail(node, f"function {name}() is not allowed (allowed, all immutable: "
                                  f"{', '.join(sorted(_FUNCTIONS))})")
        if node.agg_star or node.agg_distinct or node.over is not None or node.agg_order or node.agg_filter:
            raise self.fail(node, f"{name}() may not be an aggregate or window call")
        args = [self.compile(x) for x in node.args or ()]

        def call(a: str, r: Any, c: Any) -> Any:
            values = [f(a, r, c) for f in args]
            if any(v is None for v in values):
                return None  # strict, like these functions in Postgres
            try:
                return fn(*values)
            except (TypeError, ValueError, ArithmeticError):
                return None
        return call

    def _A_Expr(self, node: ast.A_Expr) -> _Eval:
        kind = node.kind
        op = node.name[-1].sval if node.name else ""
        if kind == A_Expr_Kind.AEXPR_OP:
            return self._operator(node, op)
        left = self.compile(node.lexpr)
        if kind == A_Expr_Kind.AEXPR_IN:
            items = [self.compile(x) for x in node.rexpr]
            negate = op == "<>"

            def in_(a: str, r: Any, c: Any) -> Any:
                v = left(a, r, c)
                if v is None:
                    return None
                found = any(_equal(v, f(a, r, c)) for f in items)
                return not found if negate else found
            return in_
        if kind in (A_Expr_Kind.AEXPR_LIKE, A_Expr_Kind.AEXPR_ILIKE):
            right = self.compile(node.rexpr)
            insensitive = kind == A_Expr_Kind.AEXPR_ILIKE
            negate = op.startswith("!")

            def like(a: str, r: Any, c: Any) -> Any:
                v, p = left(a, r, c), right(a, r, c)
                if v is None or p is None:
                    return None
                return _like(v, p, insensitive=insensitive) != negate
            return like
        if kind in (A_Expr_Kind.AEXPR_DISTINCT, A_Expr_Kind.AEXPR_NOT_DISTINCT):
            right = self.compile(node.rexpr)
            distinct = kind == A_Expr_Kind.AEXPR_DISTINCT

            def is_distinct(a: str, r: Any, c: Any) -> Any:
                x, y = left(a, r, c), right(a, r, c)
                same = (x is None and y is None) or (x is not None and y is not None and _equal(x, y))
                return not same if distinct else same
            return is_distinct
        if kind in (A_Expr_Kind.AEXPR_BETWEEN, A_Expr_Kind.AEXPR_NOT_BETWEEN):
            lo, hi = (self.compile(x) for x in node.rexpr)
            negate = kind == A_Expr_Kind.AEXPR_NOT_BETWEEN

            def between(a: str, r: Any, c: Any) -> Any:
                v, low, high = left(a, r, c), lo(a, r, c), hi(a, r, c)
                if v is None or low is None or high is None:
                    return None
                try:
                    inside = _number(low) <= _number(v) <= _number(high)
                except TypeError:
                    return None
                return inside != negate
            return between
        raise self.fail(node, f"{kind.name.lower().replace('aexpr_', '')} expressions are not allowed")

    def _operator(self, node: ast.A_Expr, op: str) -> _Eval:
        fn = _BINARY.get(op)
        if fn is None:
            raise self.fail(node, f"operator {op} is not allowed (allowed: {' '.join(sorted(_BINARY))})")
        right = self.compile(node.rexpr)
        if node.lexpr is None:  # prefix: -x
            if op != "-":
                raise self.fail(node, f"prefix operator {op} is not allowed")
            return lambda a, r, c: None if (v := right(a, r, c)) is None else -_number(v)
        left = self.compile(node.lexpr)
        numeric = op in ("<", "<=", ">", ">=", "+", "-", "*", "%")

        def apply(a: str, r: Any, c: Any) -> Any:
            x, y = left(a, r, c), right(a, r, c)
            if x is None or y is None:
                return None
            try:
                return fn(_number(x), _number(y)) if numeric else fn(x, y)
            except (TypeError, ArithmeticError):
                return None  # incomparable types or division by zero: unknown
        return apply


def _describe(node: Any) -> str:
    names = {"SubLink": "a subquery", "SelectStmt": "a query", "ParamRef": "a parameter",
             "A_Star": "*", "CaseExpr": "CASE", "RowExpr": "a row constructor", "A_ArrayExpr": "an array",
             "SQLValueFunction": "a current_* value (not immutable)", "A_Indirection": "subscripting",
             "CollateClause": "COLLATE", "MinMaxExpr": "GREATEST/LEAST"}
    return names.get(type(node).__name__, type(node).__name__)


def compile_sql(text: str) -> Callable[[str, Mapping[str, Any], Mapping[str, Any] | None], bool]:
    """Compile a SQL boolean expression; ConfigError pointing at the part that is not allowed."""
    if not text or not text.strip():
        raise ConfigError("filter_sql: is empty")
    try:
        stmts = pglast.parse_sql(_PREFIX + text)
    except pglast.parser.ParseError as e:
        at = e.args[1] if len(e.args) > 1 else None
        pointer = f"\n    {text}\n    {' ' * (at - len(_PREFIX))}^" if isinstance(at, int) and at >= len(_PREFIX) else ""
        raise ConfigError(f"filter_sql: not a valid SQL expression: {e.args[0]}{pointer}") from None
    if len(stmts) != 1:
        raise ConfigError("filter_sql: must be one expression, not several statements (no ';')")
    stmt = stmts[0].stmt
    if (not isinstance(stmt, ast.SelectStmt) or stmt.fromClause or stmt.whereClause or stmt.groupClause
            or stmt.sortClause or stmt.limitCount or stmt.withClause or stmt.op != 0
            or not stmt.targetList or len(stmt.targetList) != 1 or stmt.targetList[0].name):
        raise ConfigError("filter_sql: must be a single boolean expression over the row, such as "
                          "status = 'shipped' and amount > 100")
    fn = _Compiler(text).compile(stmt.targetList[0].val)
    return lambda action, record, changes: fn(action, record, changes) is True


# ====================================================================== a sink's predicate


def filter_metadata(sink: Any, schema: str, table: str, commit_timestamp: str | None, commit_lsn: int,
                    commit_idx: int, annotations: Any) -> dict[str, Any]:
    """The ``metadata`` a sink's filter sees (``sink``: its id, name and annotations)."""
    return {"table_schema": schema, "table_name": table, "commit_timestamp": commit_timestamp,
            "commit_lsn": commit_lsn, "commit_idx": commit_idx, "transaction_annotations": annotations,
            "consumer": {"id": str(sink.id), "name": sink.name, "annotations": sink.annotations}}


def retained_change_passes(predicate: Predicate, sink: Any, schema: str, table: str, action: str,
                           record: str | None, changes: str | None, committed_at: datetime | None,
                           commit_lsn: int, commit_idx: int, annotations: str | None) -> bool:
    """Whether a sink's filters keep a change of the retention log, judged as capture judged it.

    The values as close to capture's as the stored jsonb allows (numbers exact,
    nested ones too; its timestamp text); True when the filters cannot judge
    it, as capture then keeps it.
    Used where capture's decision must be redone: backfill's superseded check
    and replay.
    """
    try:
        stamp = committed_at.astimezone(UTC).isoformat() if committed_at else None
        metadata = filter_metadata(sink, schema, table, stamp, commit_lsn, commit_idx,
                                   loads_exact(annotations) if annotations else None)
        return bool(predicate(action, loads_exact(record or "null"), loads_exact(changes) if changes else None,
                              metadata))
    except Exception:  # noqa: BLE001 - as capture: a change its filter could not judge was kept
        return True


def sink_predicate(filters: Sequence[Mapping[str, Any]], filter_sql: str | None,
                   filter_function: str | None, *, timeout: float = 1.0, what: str = "filter") -> Predicate | None:
    """All of a sink's filters as one predicate (AND), or None when it has none."""
    columns = [column_filter(f) for f in filters]
    sql_fn = compile_sql(filter_sql) if filter_sql else None
    if filter_function:
        userfunc.load(filter_function, "filter")  # fail early on a missing file or function
    if not columns and sql_fn is None and not filter_function:
        return None

    def passes(action: str, record: Mapping[str, Any], changes: Mapping[str, Any] | None,
               metadata: Mapping[str, Any]) -> bool:
        for test in columns:
            if not test(record):
                return False
        if sql_fn is not None and not sql_fn(action, record, changes):
            return False
        if filter_function:
            fn = userfunc.load(filter_function, "filter")
            args = (action, {k: plain(v) for k, v in record.items()},
                    {k: plain(v) for k, v in changes.items()} if changes is not None else None, metadata)
            result = userfunc.call(fn, args, timeout=timeout, what=f"{what} {filter_function}")
            if not isinstance(result, bool):
                raise userfunc.UserFunctionError(
                    f"{what} {filter_function} returned {type(result).__name__}, not True or False")
            return result
        return True

    return passes
