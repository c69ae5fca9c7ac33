"""Postgres text output -> JSON, type by type (pgsink.engine.values)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from pgsink.engine.jsontext import RawJson, dumps, json_default, jsonb_refuses
from pgsink.engine.values import (
    BUILTIN_CONVERTERS,
    TypeRegistry,
    make_array_converter,
    parse_array,
    parse_record,
)

R = TypeRegistry()


def j(type_oid: int, text: str | None, registry: TypeRegistry = R) -> bytes:
    """The JSON a user gets for one value."""
    return dumps(registry.convert(type_oid, text))


# ----------------------------------------------------------------- scalars: (type oid, Postgres text, JSON)

SCALARS: list[tuple[str, int, str, bytes]] = [
    ("bool t", 16, "t", b"true"),
    ("bool f", 16, "f", b"false"),
    ("int2", 21, "-32768", b"-32768"),
    ("int4", 23, "2147483647", b"2147483647"),
    ("int8", 20, "-9223372036854775808", b"-9223372036854775808"),
    ("oid", 26, "4294967295", b"4294967295"),
    ("numeric keeps digits", 1700, "123.4500", b"123.4500"),
    ("numeric huge", 1700, "123456789012345678901234567890.000000000000000000001",
     b"123456789012345678901234567890.000000000000000000001"),
    ("numeric negative small", 1700, "-0.0000001", b"-0.0000001"),
    ("numeric NaN", 1700, "NaN", b'"NaN"'),
    ("numeric Infinity", 1700, "Infinity", b'"Infinity"'),
    ("numeric -Infinity", 1700, "-Infinity", b'"-Infinity"'),
    ("float8", 701, "1.5", b"1.5"),
    ("float8 exponent", 701, "1e+100", b"1e+100"),
    ("float8 tiny", 701, "5e-324", b"5e-324"),
    ("float8 shortest", 701, "0.1", b"0.1"),
    ("float8 NaN", 701, "NaN", b'"NaN"'),
    ("float8 Infinity", 701, "Infinity", b'"Infinity"'),
    ("float8 -Infinity", 701, "-Infinity", b'"-Infinity"'),
    ("float4", 700, "3.14", b"3.14"),
    ("float4 NaN", 700, "NaN", b'"NaN"'),
    ("text", 25, 'he said "hi"\n', b'"he said \\"hi\\"\\n"'),
    ("varchar", 1043, "v", b'"v"'),
    ("bpchar keeps padding", 1042, "ab  ", b'"ab  "'),
    ('"char"', 18, "x", b'"x"'),
    ("name", 19, "pg_class", b'"pg_class"'),
    ("uuid", 2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", b'"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"'),
    ("jsonb nested, exact numbers", 3802, '{"a": 1.50, "b": [1, null, true]}', b'{"a": 1.50, "b": [1, null, true]}'),
    ("json kept verbatim", 114, '{"b":1,  "a":[2.0]}', b'{"b":1,  "a":[2.0]}'),
    ("jsonb scalar string", 3802, '"x"', b'"x"'),
    ("bytea hex as printed", 17, "\\x0102ff", b'"\\\\x0102ff"'),
    ("date", 1082, "2024-02-29", b'"2024-02-29"'),
    ("date infinity", 1082, "infinity", b'"infinity"'),
    ("date BC", 1082, "0044-03-15 BC", b'"0044-03-15 BC"'),
    ("time", 1083, "04:05:06", b'"04:05:06.000000"'),
    ("time fraction", 1083, "04:05:06.789", b'"04:05:06.789000"'),
    ("time 24:00", 1083, "24:00:00", b'"24:00:00.000000"'),
    ("timetz", 1266, "04:05:06.5+02", b'"04:05:06.500000+02:00"'),
    ("timetz utc", 1266, "04:05:06+00", b'"04:05:06.000000Z"'),
    ("timetz half hour", 1266, "04:05:06-03:30", b'"04:05:06.000000-03:30"'),
    ("timestamp", 1114, "2024-10-28 21:37:01.12747", b'"2024-10-28T21:37:01.127470"'),
    ("timestamp whole", 1114, "2024-10-28 21:37:01", b'"2024-10-28T21:37:01.000000"'),
    ("timestamp six digits", 1114, "2024-10-28 21:37:01.127471", b'"2024-10-28T21:37:01.127471"'),
    ("timestamp BC six digits", 1114, "0044-03-15 12:00:00.123456 BC", b'"0044-03-15 12:00:00.123456 BC"'),
    ("timestamp BC 26 chars", 1114, "0044-03-15 12:00:00.123 BC", b'"0044-03-15 12:00:00.123 BC"'),
    ("timestamp other datestyle 26 chars", 1114, "10/28/2024 21:37:01.127471", b'"10/28/2024 21:37:01.127471"'),
    ("timestamp infinity", 1114, "infinity", b'"infinity"'),
    ("timestamp BC", 1114, "0044-03-15 12:00:00 BC", b'"0044-03-15 12:00:00 BC"'),
    ("timestamptz utc", 1184, "2024-10-28 21:37:01.12747+00", b'"2024-10-28T21:37:01.127470Z"'),
    ("timestamptz whole", 1184, "2024-10-28 21:37:01+00", b'"2024-10-28T21:37:01.000000Z"'),
    ("timestamptz micro", 1184, "2024-10-28 21:37:01.000001+00", b'"2024-10-28T21:37:01.000001Z"'),
    ("timestamptz six digits", 1184, "2024-10-28 21:37:01.127471+00", b'"2024-10-28T21:37:01.127471Z"'),
    ("timestamptz six digits offset", 1184, "2024-10-28 23:37:01.127471+02", b'"2024-10-28T21:37:01.127471Z"'),
    ("timestamptz BC 29 chars", 1184, "0044-03-15 12:00:00.123+00 BC", b'"0044-03-15 12:00:00.123+00 BC"'),
    ("timestamptz offset -> utc", 1184, "2024-10-28 23:37:01.5+02", b'"2024-10-28T21:37:01.500000Z"'),
    ("timestamptz half hour", 1184, "2024-10-29 03:07:01+05:30", b'"2024-10-28T21:37:01.000000Z"'),
    ("timestamptz lmt seconds", 1184, "1850-01-01 00:00:00-04:56:02", b'"1850-01-01T04:56:02.000000Z"'),
    ("timestamptz early year", 1184, "0099-01-01 00:00:00+00", b'"0099-01-01T00:00:00.000000Z"'),
    ("timestamptz infinity", 1184, "-infinity", b'"-infinity"'),
    ("timestamptz BC", 1184, "0044-03-15 12:00:00+00 BC", b'"0044-03-15 12:00:00+00 BC"'),
    ("timestamptz year 12345", 1184, "12345-01-01 00:00:00+00", b'"12345-01-01 00:00:00+00"'),
    ("interval as printed", 1186, "1 year 2 mons 3 days 04:05:06.7", b'"1 year 2 mons 3 days 04:05:06.7"'),
    ("inet", 869, "192.168.0.1/24", b'"192.168.0.1/24"'),
    ("cidr", 650, "10.0.0.0/8", b'"10.0.0.0/8"'),
    ("macaddr", 829, "08:00:2b:01:02:03", b'"08:00:2b:01:02:03"'),
    ("money as printed", 790, "$1,234.50", b'"$1,234.50"'),
    ("int4range", 3904, "[1,10)", b'"[1,10)"'),
    ("tstzrange", 3910, '["2024-01-01 00:00:00+00",)', b'"[\\"2024-01-01 00:00:00+00\\",)"'),
    ("point", 600, "(1,2)", b'"(1,2)"'),
    ("xml", 142, "<a/>", b'"<a/>"'),
    ("unknown user type", 99999, "whatever", b'"whatever"'),
]


@pytest.mark.parametrize("oid, text, expected", [s[1:] for s in SCALARS], ids=[s[0] for s in SCALARS])
def test_scalar(oid: int, text: str, expected: bytes) -> None:
    assert j(oid, text) == expected


def test_null_is_null_for_every_type() -> None:
    for _, oid, _, _ in SCALARS:
        assert R.convert(oid, None) is None


def test_python_values_are_natural() -> None:
    assert R.convert(23, "7") == 7 and isinstance(R.convert(23, "7"), int)
    assert R.convert(16, "t") is True
    assert R.convert(701, "2.5") == 2.5
    assert R.convert(1700, "1.10") == RawJson("1.10")
    assert str(R.convert(1700, "1.10")) == "1.10"
    assert R.convert(3802, '{"a": [1]}').value == {"a": [1]}


# ----------------------------------------------------------------- arrays

ARRAYS: list[tuple[str, int, str, bytes]] = [
    ("int4[]", 1007, "{1,2,3}", b"[1,2,3]"),
    ("empty", 1007, "{}", b"[]"),
    ("NULL elements", 1007, "{1,NULL,3}", b"[1,null,3]"),
    ("2-d with NULL", 1007, "{{1,2},{3,NULL}}", b"[[1,2],[3,null]]"),
    ("3-d", 1007, "{{{1},{2}},{{3},{4}}}", b"[[[1],[2]],[[3],[4]]]"),
    ("non-default bounds", 1007, "[0:1]={7,8}", b"[7,8]"),
    ("2-d bounds", 1007, "[1:1][0:1]={{7,8}}", b"[[7,8]]"),
    ("text quoting", 1009, '{"a,b","c\\"d",NULL,"NULL","e\\\\f",plain,"{x}"," sp "}',
     b'["a,b","c\\"d",null,"NULL","e\\\\f","plain","{x}"," sp "]'),
    ("text empty string", 1009, '{"",x}', b'["","x"]'),
    ("text unicode", 1009, '{caf\u00e9,"\u00fc ber"}', '["caf\u00e9","\u00fc ber"]'.encode()),
    ("text 2-d quoted", 1009, '{{"a b",c},{NULL,"}"}}', b'[["a b","c"],[null,"}"]]'),
    ("numeric[] exact + NaN", 1231, "{1.50,NaN,-Infinity,0.001}", b'[1.50,"NaN","-Infinity",0.001]'),
    ("float8[]", 1022, "{1.5,Infinity,-0}", b'[1.5,"Infinity",-0.0]'),
    ("bool[]", 1000, "{t,f,NULL}", b"[true,false,null]"),
    ("int8[]", 1016, "{9223372036854775807}", b"[9223372036854775807]"),
    ("jsonb[]", 3807, '{"{\\"a\\": 1.0}","[1, 2]",NULL}', b'[{"a": 1.0},[1, 2],null]'),
    ("json[] scalar", 199, '{"\\"s\\"",3}', b'["s",3]'),
    ("timestamptz[]", 1185, '{"2024-10-28 21:37:01.12747+00",NULL}', b'["2024-10-28T21:37:01.127470Z",null]'),
    ("timestamp[]", 1115, '{"2024-10-28 21:37:01"}', b'["2024-10-28T21:37:01.000000"]'),
    ("date[]", 1182, "{2024-01-01,infinity}", b'["2024-01-01","infinity"]'),
    ("time[]", 1183, "{04:05:06.5}", b'["04:05:06.500000"]'),
    ("timetz[]", 1270, '{"04:05:06+02"}', b'["04:05:06.000000+02:00"]'),
    ("interval[]", 1187, '{"1 day","-00:00:01"}', b'["1 day","-00:00:01"]'),
    ("uuid[]", 2951, "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}", b'["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]'),
    ("bytea[]", 1001, '{"\\\\x01ff",NULL}', b'["\\\\x01ff",null]'),
    ("inet[]", 1041, "{10.0.0.1,::1/128}", b'["10.0.0.1","::1/128"]'),
    ("cidr[]", 651, "{10.0.0.0/8}", b'["10.0.0.0/8"]'),
    ("macaddr[]", 1040, "{08:00:2b:01:02:03}", b'["08:00:2b:01:02:03"]'),
    ("money[]", 791, '{"$1.00","$1,000.00"}', b'["$1.00","$1,000.00"]'),
    ("varchar[]", 1015, "{a,b}", b'["a","b"]'),
    ("bpchar[]", 1014, '{"a  "}', b'["a  "]'),
    ("int4range[]", 3905, '{"[1,2)","[3,4)"}', b'["[1,2)","[3,4)"]'),
    ("box[] uses ;", 1020, "{(1,1),(0,0);(2,2),(1,1)}", b'["(1,1),(0,0)","(2,2),(1,1)"]'),
]


@pytest.mark.parametrize("oid, text, expected", [a[1:] for a in ARRAYS], ids=[a[0] for a in ARRAYS])
def test_array(oid: int, text: str, expected: bytes) -> None:
    assert j(oid, text) == expected


def test_parse_array_structure() -> None:
    assert parse_array('{{"a\\"b",NULL},{"",c}}') == [['a"b', None], ["", "c"]]
    assert parse_array("{}") == []
    assert parse_array("{{},{}}") == [[], []]
    with pytest.raises(ValueError):
        parse_array('{"unterminated')
    with pytest.raises(ValueError):
        parse_array("{1,2")


def test_array_converter_with_a_plain_element() -> None:
    conv = make_array_converter(None)
    assert conv("{a,NULL}") == ["a", None]
    assert conv('{"x y"}') == ["x y"]


# ----------------------------------------------------------------- user types from the catalog

MOOD, POSINT, PRICE, ADDR, PERSON, ADDR_ARR, MOOD_ARR, POSINT_ARR, PERSON_ARR, VECTOR, ANYDOM = range(20001, 20012)
CATALOG_ROWS: list[tuple[Any, ...]] = [
    # oid, name, schema, typtype, category, elem, base, delim, attnames, atttypes
    (MOOD, "mood", "public", "e", "E", 0, 0, ",", [], []),
    (POSINT, "posint", "public", "d", "N", 0, 23, ",", [], []),
    (PRICE, "price", "public", "d", "N", 0, 1700, ",", [], []),
    (ADDR, "addr", "public", "c", "C", 0, 0, ",", ["street", "zip", "tags", "geo"], [25, POSINT, 1009, 1022]),
    (PERSON, "person", "public", "c", "C", 0, 0, ",", ["name", "home", "moods", "born"],
     [25, ADDR, MOOD_ARR, 1184]),
    (ADDR_ARR, "_addr", "public", "b", "A", ADDR, 0, ",", [], []),
    (MOOD_ARR, "_mood", "public", "b", "A", MOOD, 0, ",", [], []),
    (POSINT_ARR, "_posint", "public", "b", "A", POSINT, 0, ",", [], []),
    (PERSON_ARR, "_person", "public", "b", "A", PERSON, 0, ",", [], []),
    (VECTOR, "vector", "public", "b", "U", 0, 0, ",", [], []),
    (ANYDOM, "jdom", "public", "d", "U", 0, 3802, ",", [], []),
]


@pytest.fixture(scope="module")
def reg() -> TypeRegistry:
    r = TypeRegistry()
    r.add_type_rows(CATALOG_ROWS, attempted=[row[0] for row in CATALOG_ROWS])
    return r


USER: list[tuple[str, int, str, bytes]] = [
    ("enum", MOOD, "happy", b'"happy"'),
    ("domain over int", POSINT, "5", b"5"),
    ("domain over numeric", PRICE, "19.90", b"19.90"),
    ("domain over jsonb", ANYDOM, '{"a": 1}', b'{"a": 1}'),
    ("composite", ADDR, '("Main ""st"", 1",12345,"{x,""y z""}","{1.5,NaN}")',
     b'{"street":"Main \\"st\\", 1","zip":12345,"tags":["x","y z"],"geo":[1.5,"NaN"]}'),
    ("composite NULL fields", ADDR, "(,,,)", b'{"street":null,"zip":null,"tags":null,"geo":null}'),
    ("composite empty string", ADDR, '("",1,{},)', b'{"street":"","zip":1,"tags":[],"geo":null}'),
    ("composite backslash", ADDR, '("a\\\\b",1,,)', b'{"street":"a\\\\b","zip":1,"tags":null,"geo":null}'),
    ("nested composite", PERSON,
     '(ann,"(""1 Main"",2,{a},)","{happy,sad}","2024-10-28 21:37:01+00")',
     b'{"name":"ann","home":{"street":"1 Main","zip":2,"tags":["a"],"geo":null},"moods":["happy","sad"],'
     b'"born":"2024-10-28T21:37:01.000000Z"}'),
    ("array of enum", MOOD_ARR, "{happy,NULL,sad}", b'["happy",null,"sad"]'),
    ("array of domain", POSINT_ARR, "{{1,2},{3,4}}", b"[[1,2],[3,4]]"),
    ("array of composite", ADDR_ARR, '{"(a,1,,)",NULL,"(\\"b c\\",2,{},)"}',
     b'[{"street":"a","zip":1,"tags":null,"geo":null},null,{"street":"b c","zip":2,"tags":[],"geo":null}]'),
    ("array of nested composite", PERSON_ARR, '{"(p,\\"(s,1,,)\\",{ok},)"}',
     b'[{"name":"p","home":{"street":"s","zip":1,"tags":null,"geo":null},"moods":["ok"],"born":null}]'),
    ("pgvector", VECTOR, "[1,2.5,-3]", b"[1.0,2.5,-3.0]"),
]


@pytest.mark.parametrize("oid, text, expected", [u[1:] for u in USER], ids=[u[0] for u in USER])
def test_user_type(reg: TypeRegistry, oid: int, text: str, expected: bytes) -> None:
    assert j(oid, text, reg) == expected


def test_parse_record_structure() -> None:
    assert parse_record("()") == [None]
    assert parse_record('(a,"b ""c""",,"")') == ["a", 'b "c"', None, ""]
    assert parse_record('(1,"x\\\\y")') == ["1", "x\\y"]
    with pytest.raises(ValueError):
        parse_record("a,b")


def test_registry_knows_builtins_and_asks_for_the_rest(reg: TypeRegistry) -> None:
    fresh = TypeRegistry()
    assert fresh.knows(23) and fresh.knows(9999)
    assert not fresh.knows(MOOD)
    assert fresh.missing([23, MOOD, 1009]) == [MOOD]
    assert fresh.needs_load([MOOD]) and not fresh.needs_load([23])
    fresh.want_relation(42)
    assert fresh.needs_load([23])
    assert reg.knows(MOOD) and not reg.needs_load([MOOD, ADDR])
    # a type the catalog did not return (dropped) is not asked for again, and converts as text
    fresh2 = TypeRegistry()
    fresh2.add_type_rows([], attempted=[30000])
    assert fresh2.knows(30000) and fresh2.convert(30000, "x") == "x"


def test_version_grows_on_every_catalog_change() -> None:
    r = TypeRegistry()
    v0 = r.version
    r.add_type_rows([CATALOG_ROWS[0]])
    assert r.version > v0


def test_relation_rows_and_key_columns() -> None:
    r = TypeRegistry()
    r.want_relation_named("public", "t")
    [info] = r.add_relation_rows([(7, "public", "t", "f", [], [], ["a", "b"], [23, 25], [4, -1], [False, True],
                                   None, None, None)])
    assert not r.needs_load()
    assert info.key_columns == () and info.replica_identity == "f"
    assert [c.varlena for c in info.columns] == [False, True]
    assert [c.generated for c in info.columns] == [False, True]
    assert r.relation(7) is info and r.relation_named("public", "t") is info
    # a rename: the old name is forgotten
    [renamed] = r.add_relation_rows([(7, "public", "t2", "i", ["a"], ["b"], ["a", "b"], [23, 25], [4, -1],
                                      [False, False], 5, "public", "root")])
    assert r.relation_named("public", "t") is None and r.relation_named("public", "t2") is renamed
    assert renamed.key_columns == ("a",) and renamed.root == (5, "public", "root")


ODD: list[tuple[str, int, str]] = [
    ("int garbage", 23, "12abc"),
    ("float garbage", 701, "one"),
    ("timestamptz garbage", 1184, "2024-13-45 99:99:99+00:00:00:00"),
    ("timestamptz other datestyle", 1184, "Mon Oct 28 21:37:01.12747 2024 UTC"),
    ("time garbage", 1083, "4:5"),
    ("timetz garbage", 1266, "xx"),
    ("array unterminated", 1007, "{1,2"),
    ("array of ints with garbage", 1007, "{1,x}"),
    ("array not an array", 1009, "abc"),
]


@pytest.mark.parametrize("oid, text", [o[1:] for o in ODD], ids=[o[0] for o in ODD])
def test_odd_input_keeps_the_text_and_never_raises(oid: int, text: str) -> None:
    assert R.convert(oid, text) == text


def test_odd_composite_keeps_the_text(reg: TypeRegistry) -> None:
    assert reg.convert(ADDR, "not a record") == "not a record"
    assert reg.convert(ADDR, '("unterminated,1,,)') == '("unterminated,1,,)'


# ----------------------------------------------------------------- serialisation


def test_raw_json_value_semantics() -> None:
    a, b = RawJson("1.50"), RawJson("1.50")
    assert a == b and hash(a) == hash(b) and a != RawJson("1.5") and a != "1.50"
    assert {a: 1}[b] == 1
    assert repr(a) == "RawJson('1.50')" and str(a) == "1.50"


def test_dumps_writes_raw_json_verbatim_and_plain_orjson_refuses_it() -> None:
    record = {"n": RawJson("1.50"), "j": RawJson('{"x": [1.0]}'), "l": [RawJson("2")]}
    assert dumps(record) == b'{"n":1.50,"j":{"x": [1.0]},"l":[2]}'
    assert dumps(record, option=orjson.OPT_SORT_KEYS) == b'{"j":{"x": [1.0]},"l":[2],"n":1.50}'
    assert orjson.dumps(record, default=json_default) == dumps(record)
    with pytest.raises(TypeError):
        orjson.dumps(record)  # loud, never silently wrong
    with pytest.raises(TypeError):
        dumps({"x": object()})


def test_a_changed_composite_is_rebuilt_with_the_types_that_contain_it() -> None:
    a, a_arr = 21001, 21002
    r = TypeRegistry()
    r.add_type_rows([(a, "a", "public", "c", "C", 0, 0, ",", ["x"], [23]),
                     (a_arr, "_a", "public", "b", "A", a, 0, ",", [], [])])
    assert r.convert(a_arr, '{"(1)"}') == [{"x": 1}]
    # a value with another number of fields than the catalog said (ALTER TYPE since the load):
    # keep the text rather than put values under the wrong names
    assert r.convert(a, "(1,z)") == "(1,z)"
    r.add_type_rows([(a, "a", "public", "c", "C", 0, 0, ",", ["x", "y"], [23, 25])])
    assert r.convert(a, "(1,z)") == {"x": 1, "y": "z"}
    assert r.convert(a_arr, '{"(1,z)"}') == [{"x": 1, "y": "z"}]


def test_loads_exact_keeps_every_number_and_dumps_writes_them_back() -> None:
    from decimal import Decimal

    from pgsink.engine.jsontext import loads_exact
    doc = loads_exact('{"big": 123456789012345678901234567890, "huge": 1e400, "tiny": -1e-400,'
                      ' "price": 19.99, "scaled": 1.10, "n": 7}')
    assert doc == {"big": 123456789012345678901234567890, "huge": Decimal("1e400"), "tiny": Decimal("-1e-400"),
                   "price": 19.99, "scaled": 1.1, "n": 7}
    assert type(doc["price"]) is float and type(doc["n"]) is int  # the usual types where nothing is lost
    assert loads_exact(dumps(doc).decode()) == doc
    assert dumps(doc).startswith(b'{"big":123456789012345678901234567890,"huge":1E+400,"tiny":-1E-400,')
    assert dumps([[2 ** 64, -(2 ** 63) - 1]]) == b"[[18446744073709551616,-9223372036854775809]]"
    assert loads_exact("[12345678.123456789, -9999999.99999999999]") == [
        Decimal("12345678.123456789"), Decimal("-9999999.99999999999")]  # digits split by the point count too
    with pytest.raises(ValueError, match="nested too deeply"):
        loads_exact("[" * 5000 + "]" * 5000)
    with pytest.raises(ValueError):
        loads_exact("{not json")


def test_json_that_jsonb_refuses_is_kept_as_its_text() -> None:
    # json takes these, jsonb (the retention log) refuses them: such a document stays text
    json_conv = BUILTIN_CONVERTERS[114]
    # (1e1001: PostgreSQL 15 takes it, older state servers do not)
    refused = [r'{"a": "x\u0000"}', r'{"a": "x\\\u0000"}', r'["\ud800"]', r'{"\uDC00": 1}', "1e131072",
               "[1.5e-16383]", '{"n": 2E+200000}', "1e1001", "[-1e-1001]", "0." + "0" * 16383 + "1"]
    for text in refused:
        assert jsonb_refuses(text) and json_conv(text) == text, text
    taken = [r'{"a": "x\\u0000"}', r'["\ud83d\ude00"]', "1e1000", "-1e-1000", '{"n": 1.50}',
             '"a1e12345b"', r'"\\u0000"', "[]", "1" * 2000, '"%s"' % ("1" * 2000)]
    for text in taken:
        assert not jsonb_refuses(text) and json_conv(text) == RawJson(text), text
