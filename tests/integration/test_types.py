"""Every supported type, through the real server and both decoders.

Changes are read with the SQL functions (``pg_logical_slot_get_binary_changes``
for pgoutput, ``pg_logical_slot_get_changes`` for wal2json), decoded with the
TypeRegistry loaded from the same connection, and compared: the JSON of each
value against the expected bytes, and the two decoders' events against each
other. The decoding session runs with a non-UTC TimeZone on purpose: values
and commit timestamps must still come out in UTC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, LiteralString

import psycopg
import pytest
from psycopg import sql

from pgsink.engine.decode import (
    Event,
    LogicalMessage,
    PgoutputDecoder,
    RelationSeen,
    RowChange,
    TableTruncate,
    TxBegin,
    TxCommit,
)
from pgsink.engine.jsontext import RawJson, dumps
from pgsink.engine.values import TypeRegistry
from pgsink.engine.wal2json import WAL2JSON_OPTIONS, Wal2JsonDecoder

pytestmark = pytest.mark.wal2json

SCHEMA_SQL = """
create type mood as enum ('sad', 'ok', 'happy');
create domain posint as integer check (value > 0);
create domain price as numeric(10, 2);
create type addr as (street text, zip posint, tags text[]);
create type person as (name text, home addr, moods mood[], born timestamptz);
"""

# column, type, SQL literal, expected JSON of the value
COLUMNS: list[tuple[str, str, str, bytes]] = [
    ("c_int2", "int2", "-32768", b"-32768"),
    ("c_int4", "int4", "2147483647", b"2147483647"),
    ("c_int8", "int8", "9223372036854775807", b"9223372036854775807"),
    ("c_numeric", "numeric", "'123.4500'", b"123.4500"),
    ("c_numeric_big", "numeric", "'12345678901234567890.000000000000000000001'",
     b"12345678901234567890.000000000000000000001"),
    ("c_float4", "float4", "'3.14'", b"3.14"),
    ("c_float8", "float8", "'1.5e300'", b"1.5e+300"),
    ("c_bool", "bool", "true", b"true"),
    ("c_text", "text", "E'he said \"hi\", \\\\ back\\nline'", b'"he said \\"hi\\", \\\\ back\\nline"'),
    ("c_varchar", "varchar(10)", "'v'", b'"v"'),
    ("c_char", "char(3)", "'ab'", b'"ab "'),
    ("c_name", "name", "'pg'", b'"pg"'),
    ("c_uuid", "uuid", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", b'"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"'),
    ("c_json", "json", """'{"b":1,  "a":[2.0]}'""", b'{"b":1,  "a":[2.0]}'),
    ("c_jsonb", "jsonb", """'{"a": 1.50, "n": null, "s": "x"}'""", b'{"a": 1.50, "n": null, "s": "x"}'),
    ("c_bytea", "bytea", "'\\x0102ff'", b'"\\\\x0102ff"'),
    ("c_date", "date", "'2024-02-29'", b'"2024-02-29"'),
    ("c_time", "time", "'04:05:06.789'", b'"04:05:06.789000"'),
    ("c_timetz", "timetz", "'04:05:06.5+02'", b'"04:05:06.500000+02:00"'),
    ("c_timestamp", "timestamp", "'2024-10-28 21:37:01.12747'", b'"2024-10-28T21:37:01.127470"'),
    ("c_timestamptz", "timestamptz", "'2024-10-28 23:37:01.12747+02'", b'"2024-10-28T21:37:01.127470Z"'),
    ("c_interval", "interval", "'1 year 2 months 3 days 04:05:06.7'", b'"1 year 2 mons 3 days 04:05:06.7"'),
    ("c_inet", "inet", "'192.168.0.1/24'", b'"192.168.0.1/24"'),
    ("c_cidr", "cidr", "'10.0.0.0/8'", b'"10.0.0.0/8"'),
    ("c_macaddr", "macaddr", "'08:00:2b:01:02:03'", b'"08:00:2b:01:02:03"'),
    ("c_money", "money", "'1234.5'", b"<money>"),  # locale-dependent: compared with the server's text
    ("c_range", "int4range", "'[1,10)'", b'"[1,10)"'),
    ("c_mood", "mood", "'happy'", b'"happy"'),
    ("c_posint", "posint", "5", b"5"),
    ("c_price", "price", "'19.9'", b"19.90"),
    ("c_addr", "addr", """row('Main "st", 1', 12345, array['x', 'y z'])::addr""",
     b'{"street":"Main \\"st\\", 1","zip":12345,"tags":["x","y z"]}'),
    ("c_person", "person",
     "row('ann', row('1 Main', 2, array['a'])::addr, array['happy', 'sad']::mood[], '2024-10-28 21:37:01+00')::person",
     b'{"name":"ann","home":{"street":"1 Main","zip":2,"tags":["a"]},"moods":["happy","sad"],'
     b'"born":"2024-10-28T21:37:01.000000Z"}'),
    ("c_int_arr", "int4[]", "'{{1,2},{3,NULL}}'", b"[[1,2],[3,null]]"),
    ("c_text_arr", "text[]", """array['a,b', 'c"d', null, 'NULL', 'e\\f', '']""",
     b'["a,b","c\\"d",null,"NULL","e\\\\f",""]'),
    ("c_numeric_arr", "numeric[]", "'{1.50,NaN,-Infinity}'", b'[1.50,"NaN","-Infinity"]'),
    ("c_float_arr", "float8[]", "'{1.5,Infinity}'", b'[1.5,"Infinity"]'),
    ("c_bool_arr", "bool[]", "'{t,f,NULL}'", b"[true,false,null]"),
    ("c_tstz_arr", "timestamptz[]", "array['2024-10-28 21:37:01.5+00'::timestamptz, null]",
     b'["2024-10-28T21:37:01.500000Z",null]'),
    ("c_jsonb_arr", "jsonb[]", """array['{"a": 1.0}'::jsonb, '[1, 2]', null]""", b'[{"a": 1.0},[1, 2],null]'),
    ("c_uuid_arr", "uuid[]", "array['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid]",
     b'["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]'),
    ("c_bytea_arr", "bytea[]", "array['\\x01ff'::bytea, null]", b'["\\\\x01ff",null]'),
    ("c_date_arr", "date[]", "'{2024-01-01,infinity}'", b'["2024-01-01","infinity"]'),
    ("c_interval_arr", "interval[]", "array['1 day'::interval, '-1 second']", b'["1 day","-00:00:01"]'),
    ("c_mood_arr", "mood[]", "'{happy,NULL,sad}'", b'["happy",null,"sad"]'),
    ("c_posint_arr", "posint[]", "array[1, 2]::posint[]", b"[1,2]"),
    ("c_addr_arr", "addr[]", "array[row('a', 1, null)::addr, null, row('b c', 2, '{}')::addr]",
     b'[{"street":"a","zip":1,"tags":null},null,{"street":"b c","zip":2,"tags":[]}]'),
    ("c_int_arr_3d", "int4[]", "'[0:1][1:1][1:2]={{{1,2}},{{3,4}}}'", b"[[[1,2]],[[3,4]]]"),
]


# --------------------------------------------------------------------------- helpers


async def setup_slots(conn: psycopg.AsyncConnection[Any], tables: Sequence[str]) -> None:
    """Publication p (via partition root), a pgoutput slot and a wal2json slot."""
    await conn.execute(sql.SQL("create publication p for table {} with (publish_via_partition_root = true)").format(
        sql.SQL(", ").join(sql.Identifier(t) for t in tables)))
    await conn.execute("select pg_create_logical_replication_slot('t_pgoutput', 'pgoutput')")
    try:
        await conn.execute("select pg_create_logical_replication_slot('t_wal2json', 'wal2json')")
    except psycopg.Error as e:
        pytest.skip(f"the wal2json output plugin is not installed on this server: {e}")


async def wal2json_can_print_numbers_as_strings(conn: psycopg.AsyncConnection[Any]) -> bool:
    """wal2json >= 2.6 has numeric-data-types-as-string (keeps NaN/Infinity)."""
    try:
        await conn.execute("select count(*) from pg_logical_slot_peek_changes('t_wal2json', NULL, 0, "
                           "'format-version', '2', 'numeric-data-types-as-string', '1')")
    except psycopg.errors.InvalidParameterValue:
        return False
    return True


async def run(conn: psycopg.AsyncConnection[Any], decoder: PgoutputDecoder | Wal2JsonDecoder,
              payloads: Sequence[bytes | str]) -> list[Event]:
    """Decode like the reader does: load the catalog on RelationSeen, resume when paused."""
    out: list[Event] = []
    for p in payloads:
        events = decoder.feed(p)
        while True:
            for e in events:
                out.append(e)
                if isinstance(e, RelationSeen):
                    await decoder.types.load(conn, e.type_oids)
            if not decoder.pending:
                break
            events = decoder.resume()
    return out


async def decode_both(conn: psycopg.AsyncConnection[Any]) -> tuple[list[Event], list[Event], bool]:
    """(pgoutput events, wal2json events, whether wal2json keeps NaN) for everything written so far."""
    await conn.execute("set timezone to 'Asia/Kolkata'")  # values must still come out in UTC
    as_string = await wal2json_can_print_numbers_as_strings(conn)
    cur = await conn.execute(
        "select data from pg_logical_slot_get_binary_changes('t_pgoutput', NULL, NULL, "
        "'proto_version', '1', 'publication_names', 'p', 'messages', 'true')")
    pg_payloads = [bytes(r[0]) for r in await cur.fetchall()]
    options = {**WAL2JSON_OPTIONS, "add-tables": "public.*"}
    if as_string:
        options["numeric-data-types-as-string"] = "1"
    args = [x for kv in options.items() for x in kv]
    query = "select data from pg_logical_slot_get_changes('t_wal2json', NULL, NULL, " + ", ".join(
        ["%s"] * len(args)) + ")"
    cur = await conn.execute(query, args)  # type: ignore[arg-type]
    w2j_payloads = [r[0] for r in await cur.fetchall()]
    pg = await run(conn, PgoutputDecoder(TypeRegistry()), pg_payloads)
    w2j = await run(conn, Wal2JsonDecoder(TypeRegistry(), partition_root=True), w2j_payloads)
    return pg, w2j, as_string


def comparable(events: list[Event]) -> list[Event]:
    """Events the two decoders must agree on. RelationSeen differs by design (wal2json announces
    a table once, with oid 0), and wal2json does not print TRUNCATE's CASCADE/RESTART IDENTITY."""
    out: list[Event] = []
    for e in events:
        if isinstance(e, RelationSeen):
            continue
        if isinstance(e, TableTruncate):
            e = replace(e, cascade=False, restart_identity=False)
        out.append(e)
    return out


def rows(events: list[Event], table: str | None = None) -> list[RowChange]:
    return [e for e in events if isinstance(e, RowChange) and (table is None or e.table == table)]


async def execute(conn: psycopg.AsyncConnection[Any], *statements: LiteralString) -> None:
    for s in statements:
        await conn.execute(s)


# --------------------------------------------------------------------------- tests


async def test_every_type_through_both_decoders(aconn: psycopg.AsyncConnection[Any]) -> None:
    await aconn.execute(SCHEMA_SQL)
    cols = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t, _, _ in COLUMNS)
    await aconn.execute(sql.SQL("create table every_type (id int primary key, {})").format(cols))
    await aconn.execute("create table specials (id int primary key, n numeric, f float8, r real)")
    await setup_slots(aconn, ["every_type", "specials"])

    names = sql.SQL(", ").join(sql.Identifier(c) for c, _, _, _ in COLUMNS)
    literals = sql.SQL(", ").join(sql.SQL(lit) for _, _, lit, _ in COLUMNS)  # type: ignore[arg-type]
    await aconn.execute(sql.SQL("insert into every_type (id, {}) values (1, {})").format(names, literals))
    await aconn.execute("insert into every_type (id) values (2)")  # every other column NULL
    await aconn.execute("insert into specials values (1, 'NaN', 'Infinity', '-Infinity'), (2, 1.10, -0.5, 0.25)")
    money = (await (await aconn.execute("select '1234.5'::money::text")).fetchone())[0]  # type: ignore[index]

    pg, w2j, as_string = await decode_both(aconn)

    [full, empty] = rows(pg, "every_type")
    assert full.action == "insert" and full.key_columns == ("id",) and full.unchanged_toast == ()
    for column, _, _, expected in COLUMNS:
        if expected == b"<money>":
            expected = dumps(money)
        assert dumps(full.record[column]) == expected, column
    # the record's keys come in the order jsonb stores them (the state backend skips a sort)
    stored = await (await aconn.execute("select array(select jsonb_object_keys(%s::jsonb))",
                                        (dumps(full.record).decode(),))).fetchone()
    assert list(full.record) == stored[0]  # type: ignore[index]
    assert set(full.record) == {"id", *(c for c, _, _, _ in COLUMNS)}
    assert empty.record == {"id": 2, **{c: None for c, _, _, _ in COLUMNS}}

    [special, plain] = rows(pg, "specials")
    assert dumps(special.record) == b'{"f":"Infinity","n":"NaN","r":"-Infinity","id":1}'  # jsonb's key order
    assert dumps(plain.record) == b'{"f":-0.5,"n":1.10,"r":0.25,"id":2}'

    # the two decoders agree on everything, but wal2json < 2.6 prints NaN/Infinity as null
    if not as_string:
        [w_special] = [r for r in rows(w2j, "specials") if r.record["id"] == 1]
        assert w_special.record == {"id": 1, "n": None, "f": None, "r": None}
        w_special.record.update(special.record)
    assert comparable(w2j) == comparable(pg)
    assert [dumps(r.record) for r in rows(w2j)] == [dumps(r.record) for r in rows(pg)]
    # commit LSNs and times are the same in both
    assert [e for e in w2j if isinstance(e, TxBegin | TxCommit)] == [e for e in pg if isinstance(e, TxBegin | TxCommit)]
    assert all(e.committed_at.utcoffset().total_seconds() == 0 for e in pg if isinstance(e, TxBegin))  # type: ignore[union-attr]


async def test_updates_deletes_toast_truncate_and_messages(aconn: psycopg.AsyncConnection[Any]) -> None:
    await execute(
        aconn,
        "create table full_t (id int primary key, a text, b numeric, j jsonb)",
        "alter table full_t replica identity full",
        "create table dflt (id int primary key, a text, b int)",
        "create table toasty (id int primary key, small int, big text)",
        "alter table toasty alter column big set storage external",
        "create table gone (id int primary key)",
    )
    await setup_slots(aconn, ["full_t", "dflt", "toasty", "gone"])
    await execute(
        aconn,
        """insert into full_t values (1, 'x', 1.50, '{"k": 1}')""",
        "update full_t set a = 'y', b = 2.50 where id = 1",
        "update full_t set a = a where id = 1",
        "insert into dflt values (1, 'x', 10)",
        "update dflt set a = 'y' where id = 1",
        "update dflt set id = 2 where id = 1",
        "delete from dflt where id = 2",
        "delete from full_t where id = 1",
        "insert into toasty values (1, 1, repeat('0123456789', 1000))",
        "update toasty set small = 2 where id = 1",
        "insert into gone values (1)",
        "truncate gone, dflt restart identity",
    )
    # (a non-transactional message is not flushed by itself: the commit below flushes it)
    await aconn.execute("select pg_logical_emit_message(false, 'pgsink:other', 'not in a tx')")
    async with aconn.transaction():
        await aconn.execute("insert into dflt values (5, 'tx', 5)")
        await aconn.execute("select pg_logical_emit_message(true, 'pgsink:annotations', '{\"user\":\"x\"}')")

    pg, w2j, _ = await decode_both(aconn)

    full = rows(pg, "full_t")
    assert [r.action for r in full] == ["insert", "update", "update", "delete"]
    assert dumps(full[1].record) == b'{"a":"y","b":2.50,"j":{"k": 1},"id":1}'
    assert dumps(full[1].changes) == b'{"a":"x","b":1.50}'  # FULL: old values of changed columns
    assert full[2].changes == {}  # nothing changed
    assert dumps(full[3].record) == b'{"a":"y","b":2.50,"j":{"k": 1},"id":1}'  # FULL: the whole old row

    dflt = rows(pg, "dflt")
    assert [r.action for r in dflt] == ["insert", "update", "update", "delete", "insert"]
    assert dflt[1].changes is None and dflt[1].record == {"id": 1, "a": "y", "b": 10}
    assert dflt[2].changes is None and dflt[2].record["id"] == 2  # key changed: still no old values
    assert dflt[3].record == {"id": 2, "a": None, "b": None}  # default identity: key only
    assert all(r.key_columns == ("id",) for r in dflt + full)

    toast = rows(pg, "toasty")
    assert toast[0].record["big"] == "0123456789" * 1000
    assert toast[1].unchanged_toast == ("big",)
    assert toast[1].record == {"id": 1, "small": 2}

    [trunc] = [e for e in pg if isinstance(e, TableTruncate)]
    assert {t[2] for t in trunc.tables} == {"gone", "dflt"}
    assert trunc.restart_identity and not trunc.cascade

    messages = [e for e in pg if isinstance(e, LogicalMessage)]
    assert messages == [LogicalMessage(False, "pgsink:other", b"not in a tx"),
                        LogicalMessage(True, "pgsink:annotations", b'{"user":"x"}')]
    # the annotation sits inside its transaction, before its commit
    i = pg.index(messages[1])
    assert isinstance(pg[i + 1], TxCommit) and any(isinstance(e, TxBegin) for e in pg[i - 3:i])

    assert comparable(w2j) == comparable(pg)
    assert [(r.changes, r.unchanged_toast) for r in rows(w2j)] == [(r.changes, r.unchanged_toast) for r in rows(pg)]


async def test_partitioned_table_is_published_as_its_root(aconn: psycopg.AsyncConnection[Any]) -> None:
    await execute(
        aconn,
        "create table parted (id int, region text, v numeric, primary key (id, region)) partition by list (region)",
        "create table parted_eu partition of parted for values in ('eu')",
        "create table parted_us partition of parted for values in ('us')",
    )
    await setup_slots(aconn, ["parted"])
    await execute(
        aconn,
        "insert into parted values (1, 'eu', 1.0), (2, 'us', 2.0)",
        "update parted set v = 3.0 where id = 2",
        "delete from parted where id = 1",
    )
    pg, w2j, _ = await decode_both(aconn)
    root = (await (await aconn.execute("select 'parted'::regclass::oid::int8")).fetchone())[0]  # type: ignore[index]
    changes = rows(pg)
    assert [(r.action, r.table, r.table_oid) for r in changes] == [
        ("insert", "parted", root), ("insert", "parted", root), ("update", "parted", root), ("delete", "parted", root)]
    assert changes[0].key_columns == ("id", "region")
    assert dumps(changes[2].record) == b'{"v":3.0,"id":2,"region":"us"}'
    assert changes[3].record == {"id": 1, "region": "eu", "v": None}
    assert comparable(w2j) == comparable(pg)


async def test_ddl_mid_stream(aconn: psycopg.AsyncConnection[Any]) -> None:
    await aconn.execute("create table ddl (id int primary key, a text)")
    await setup_slots(aconn, ["ddl"])
    await execute(
        aconn,
        "insert into ddl values (1, 'x')",
        "alter table ddl add column b int",
        "insert into ddl values (2, 'y', 2)",
        "alter table ddl drop column a",
        "insert into ddl values (3, 3)",
        "alter table ddl rename column b to c",
        "insert into ddl values (4, 4)",
        "alter table ddl alter column c type numeric(6, 2)",
        "insert into ddl values (5, 5)",
        "update ddl set c = 6 where id = 5",
    )
    pg, w2j, _ = await decode_both(aconn)
    assert [dumps(r.record) for r in rows(pg)] == [
        b'{"a":"x","id":1}', b'{"a":"y","b":2,"id":2}', b'{"b":3,"id":3}', b'{"c":4,"id":4}',
        b'{"c":5.00,"id":5}', b'{"c":6.00,"id":5}']
    seen = [e for e in pg if isinstance(e, RelationSeen)]
    assert len(seen) >= 5  # a new Relation message after every DDL
    assert seen[-1].type_oids == (23, 1700)
    assert rows(pg)[-1].record["c"] == RawJson("6.00")
    assert comparable(w2j) == comparable(pg)
    w_seen = [e for e in w2j if isinstance(e, RelationSeen)]
    assert 1 < len(w_seen) <= len(seen)  # wal2json re-announces when the columns change


async def test_registry_load_reads_types_and_relations_from_the_catalog(aconn: psycopg.AsyncConnection[Any]) -> None:
    await aconn.execute(SCHEMA_SQL)
    await execute(
        aconn,
        "create table r (id int, code text not null, p person, twice int generated always as (id * 2) stored,"
        " primary key (id))",
        "create unique index r_code on r (code)",
        "alter table r replica identity using index r_code",
        "create table rp (id int, region text, primary key (id, region)) partition by list (region)",
        "create table rp_eu partition of rp for values in ('eu')",
    )
    oid = (await (await aconn.execute("select 'r'::regclass::oid::int8")).fetchone())[0]  # type: ignore[index]
    types = TypeRegistry()
    types.want_relation(oid)
    types.want_relation_named("public", "rp_eu")
    assert types.needs_load()
    await types.load(aconn, [])
    assert not types.needs_load()
    info = types.relation(oid)
    assert info is not None and info.replica_identity == "i"
    assert info.primary_key == ("id",) and info.identity_columns == ("code",) and info.key_columns == ("id",)
    assert [(c.name, c.varlena, c.generated) for c in info.columns] == [
        ("id", False, False), ("code", True, False), ("p", True, False), ("twice", False, True)]
    leaf = types.relation_named("public", "rp_eu")
    assert leaf is not None and leaf.root is not None and leaf.root[1:] == ("public", "rp")
    # the relation's column types were loaded with it, with everything they reference
    person = info.columns[2].type_oid
    assert types.knows(person)
    value = "(ann,\"(s,1,{a})\",{happy},\"2024-10-28 21:37:01+00\")"
    assert dumps(types.convert(person, value)) == (
        b'{"name":"ann","home":{"street":"s","zip":1,"tags":["a"]},"moods":["happy"],'
        b'"born":"2024-10-28T21:37:01.000000Z"}')
    # a type altered later is re-read at the next load
    await aconn.execute("alter type person add attribute nick text")
    assert types.convert(person, value[:-1] + ",al)") == value[:-1] + ",al)"  # stale: text, nothing misnamed
    await types.load(aconn, [person])
    assert types.convert(person, value[:-1] + ",al)")["nick"] == "al"
