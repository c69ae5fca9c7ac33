"""Wal2JsonDecoder on literal payloads; the same workload captured from both plugins
(PostgreSQL 15, wal2json 2.5) must decode to the same events.

Workload (table ``items`` with an enum column and a ``big`` text column stored
out of line)::

    insert (1, 'Widget "A", large', 19.90, '{a,"b c",NULL}', '{"k": [1, 2.50]}',
            '2024-10-28 21:37:01.12747+00', 'happy', repeat('x', 2100));
    update price = 21.00                        -- big: unchanged TOAST
    alter table items replica identity full;
    update name = 'w', m = 'sad'                -- old row known: changes
    alter table items replica identity default;
    update id = 2                               -- key changed: old key only
    delete where id = 2;
    truncate items;
    select pg_logical_emit_message(true, 'pgsink:annotations', '{"user":"x"}');
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest

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
from pgsink.engine.framing import DecodeError
from pgsink.engine.jsontext import RawJson, dumps
from pgsink.engine.values import TypeRegistry
from pgsink.engine.wal2json import WAL2JSON_OPTIONS, Wal2JsonDecoder

BIG = "x" * 2100
MOOD = 16476
ITEMS = 16481

# rows of the types_relations / types_by_oid queries for this workload
ITEMS_ROW = (ITEMS, "public", "items", "d", ["id"], ["id"],
             ["id", "name", "price", "tags", "meta", "at", "m", "big"],
             [23, 25, 1700, 1009, 3802, 1184, MOOD, 25], [4, -1, -1, -1, -1, 8, 4, -1], [False] * 8,
             None, None, None)
MOOD_ROW: tuple[Any, ...] = (MOOD, "mood", "public", "e", "E", 0, 0, ",", [], [])

_COLS = (b'\x00\x08\x01id\x00\x00\x00\x00\x17\xff\xff\xff\xff\x00name\x00\x00\x00\x00\x19\xff\xff\xff\xff\x00price'
         b'\x00\x00\x00\x06\xa4\x00\n\x00\x06\x00tags\x00\x00\x00\x03\xf1\xff\xff\xff\xff\x00meta\x00\x00\x00\x0e\xda'
         b'\xff\xff\xff\xff\x00at\x00\x00\x00\x04\xa0\xff\xff\xff\xff\x00m\x00\x00\x00@\\\xff\xff\xff\xff\x00big\x00'
         b'\x00\x00\x00\x19\xff\xff\xff\xff')
_COLS_FULL = _COLS.replace(b"\x00name", b"\x01name").replace(b"\x00price", b"\x01price").replace(
    b"\x00tags", b"\x01tags").replace(b"\x00meta", b"\x01meta").replace(b"\x00at\x00", b"\x01at\x00").replace(
    b"\x00m\x00", b"\x01m\x00").replace(b"\x00big", b"\x01big")
_REL_D = b'R\x00\x00@apublic\x00items\x00d' + _COLS
_REL_F = b'R\x00\x00@apublic\x00items\x00f' + _COLS_FULL
_MOOD_TYPE = b'Y\x00\x00@\\public\x00mood\x00'
_V = (b't\x00\x00\x00\x11Widget "A", larget\x00\x00\x00\x0519.90t\x00\x00\x00\x0e{a,"b c",NULL}'
      b't\x00\x00\x00\x10{"k": [1, 2.50]}t\x00\x00\x00\x1c2024-10-28 21:37:01.12747+00')
_V21 = _V.replace(b"19.90", b"21.00")
_VW = _V21.replace(b'\x11Widget "A", large', b"\x01w")

PGOUTPUT = [
    b'B\x00\x00\x00\x00\x01g\xee\xd0\x00\x03\x04AZ>5b\x00\x00\x03\t',
    _MOOD_TYPE,
    _REL_D,
    b'I\x00\x00@aN\x00\x08t\x00\x00\x00\x011' + _V + b't\x00\x00\x00\x05happyt\x00\x00\x084' + BIG.encode(),
    b'C\x00\x00\x00\x00\x00\x01g\xee\xd0\x00\x00\x00\x00\x01g\xef\x00\x00\x03\x04AZ>5b',
    b'B\x00\x00\x00\x00\x01g\xf0\x10\x00\x03\x04AZ>7\xf1\x00\x00\x03\n',
    b'U\x00\x00@aN\x00\x08t\x00\x00\x00\x011' + _V21 + b't\x00\x00\x00\x05happyu',
    b'C\x00\x00\x00\x00\x00\x01g\xf0\x10\x00\x00\x00\x00\x01g\xf0@\x00\x03\x04AZ>7\xf1',
    b'B\x00\x00\x00\x00\x01g\xfdP\x00\x03\x04AZ>;c\x00\x00\x03\x0c',
    _MOOD_TYPE,
    _REL_F,
    b'U\x00\x00@aO\x00\x08t\x00\x00\x00\x011' + _V21 + b't\x00\x00\x00\x05happyt\x00\x00\x084' + BIG.encode()
    + b'N\x00\x08t\x00\x00\x00\x011' + _VW + b't\x00\x00\x00\x03sadu',
    b'C\x00\x00\x00\x00\x00\x01g\xfdP\x00\x00\x00\x00\x01g\xfd\x80\x00\x03\x04AZ>;c',
    b'B\x00\x00\x00\x00\x01h\x00\xa0\x00\x03\x04AZ>>(\x00\x00\x03\x0e',
    _MOOD_TYPE,
    _REL_D,
    b'U\x00\x00@aK\x00\x08t\x00\x00\x00\x011nnnnnnnN\x00\x08t\x00\x00\x00\x012' + _VW + b't\x00\x00\x00\x03sadu',
    b'C\x00\x00\x00\x00\x00\x01h\x00\xa0\x00\x00\x00\x00\x01h\x00\xd0\x00\x03\x04AZ>>(',
    b'B\x00\x00\x00\x00\x01h\x01\x80\x00\x03\x04AZ>?w\x00\x00\x03\x0f',
    b'D\x00\x00@aK\x00\x08t\x00\x00\x00\x012nnnnnnn',
    b'C\x00\x00\x00\x00\x00\x01h\x01\x80\x00\x00\x00\x00\x01h\x01\xb0\x00\x03\x04AZ>?w',
    b'B\x00\x00\x00\x00\x01h\x0e\xa8\x00\x03\x04AZ>K+\x00\x00\x03\x10',
    _MOOD_TYPE,
    _REL_D,
    b'T\x00\x00\x00\x01\x00\x00\x00@a',
    b'C\x00\x00\x00\x00\x00\x01h\x0e\xa8\x00\x00\x00\x00\x01h\x10\x18\x00\x03\x04AZ>K+',
    b'B\x00\x00\x00\x00\x01h\x10p\x00\x03\x04AZ>N\xda\x00\x00\x03\x11',
    b'M\x01\x00\x00\x00\x00\x01h\x10ppgsink:annotations\x00\x00\x00\x00\x0c{"user":"x"}',
    b'C\x00\x00\x00\x00\x00\x01h\x10p\x00\x00\x00\x00\x01h\x10\xa0\x00\x03\x04AZ>N\xda',
]

_C = ('{"name":"id","type":"integer","typeoid":23,"value":%s},'
      '{"name":"name","type":"text","typeoid":25,"value":%s},'
      '{"name":"price","type":"numeric(10,2)","typeoid":1700,"value":%s},'
      '{"name":"tags","type":"text[]","typeoid":1009,"value":"{a,\\"b c\\",NULL}"},'
      '{"name":"meta","type":"jsonb","typeoid":3802,"value":"{\\"k\\": [1, 2.50]}"},'
      '{"name":"at","type":"timestamp with time zone","typeoid":1184,"value":"2024-10-28 21:37:01.12747+00"},'
      '{"name":"m","type":"mood","typeoid":16476,"value":"%s"}')
_BIGCOL = ',{"name":"big","type":"text","typeoid":25,"value":"' + BIG + '"}'
_PK = '"pk":[{"name":"id","type":"integer","typeoid":23}]'
_ID1 = '"identity":[{"name":"id","type":"integer","typeoid":23,"value":1}]'
_W = '"Widget \\"A\\", large"'
_HDR = '"xid":%d,"timestamp":"2026-11-27 14:07:43.%s+00","lsn":"0/%s"'

WAL2JSON = [
    '{"action":"B",' + _HDR % (777, "54365", "167EED0") + ',"nextlsn":"0/167EF00"}',
    '{"action":"I",' + _HDR % (777, "54365", "167ED58") + ',"schema":"public","table":"items","columns":['
    + _C % (1, _W, "19.90", "happy") + _BIGCOL + '],' + _PK + '}',
    '{"action":"C",' + _HDR % (777, "54365", "167EED0") + ',"nextlsn":"0/167EF00"}',
    '{"action":"B",' + _HDR % (778, "544305", "167F010") + ',"nextlsn":"0/167F040"}',
    '{"action":"U",' + _HDR % (778, "544305", "167EF38") + ',"schema":"public","table":"items","columns":['
    + _C % (1, _W, "21.00", "happy") + '],' + _ID1 + ',' + _PK + '}',
    '{"action":"C",' + _HDR % (778, "544305", "167F010") + ',"nextlsn":"0/167F040"}',
    '{"action":"B",' + _HDR % (779, "544743", "167F320") + ',"nextlsn":"0/167F388"}',
    '{"action":"C",' + _HDR % (779, "544743", "167F320") + ',"nextlsn":"0/167F388"}',
    '{"action":"B",' + _HDR % (780, "545187", "167FD50") + ',"nextlsn":"0/167FD80"}',
    '{"action":"U",' + _HDR % (780, "545187", "167F3C0") + ',"schema":"public","table":"items","columns":['
    + _C % (1, '"w"', "21.00", "sad") + '],"identity":[' + _C % (1, _W, "21.00", "happy") + _BIGCOL + '],'
    + _PK + '}',
    '{"action":"C",' + _HDR % (780, "545187", "167FD50") + ',"nextlsn":"0/167FD80"}',
    '{"action":"B",' + _HDR % (781, "545509", "167FED0") + ',"nextlsn":"0/167FF38"}',
    '{"action":"C",' + _HDR % (781, "545509", "167FED0") + ',"nextlsn":"0/167FF38"}',
    '{"action":"B",' + _HDR % (782, "545896", "16800A0") + ',"nextlsn":"0/16800D0"}',
    '{"action":"U",' + _HDR % (782, "545896", "167FF70") + ',"schema":"public","table":"items","columns":['
    + _C % (2, '"w"', "21.00", "sad") + '],' + _ID1 + ',' + _PK + '}',
    '{"action":"C",' + _HDR % (782, "545896", "16800A0") + ',"nextlsn":"0/16800D0"}',
    '{"action":"B",' + _HDR % (783, "546231", "1680180") + ',"nextlsn":"0/16801B0"}',
    '{"action":"D",' + _HDR % (783, "546231", "16800D0") + ',"schema":"public","table":"items",'
    '"identity":[{"name":"id","type":"integer","typeoid":23,"value":2}],' + _PK + '}',
    '{"action":"C",' + _HDR % (783, "546231", "1680180") + ',"nextlsn":"0/16801B0"}',
    '{"action":"B",' + _HDR % (784, "549227", "1680EA8") + ',"nextlsn":"0/1681018"}',
    '{"action":"T",' + _HDR % (784, "549227", "1680E78") + ',"schema":"public","table":"items"}',
    '{"action":"C",' + _HDR % (784, "549227", "1680EA8") + ',"nextlsn":"0/1681018"}',
    '{"action":"B",' + _HDR % (785, "55017", "1681070") + ',"nextlsn":"0/16810A0"}',
    '{"action":"M",' + _HDR % (785, "55017", "1681070") + ',"transactional":true,"prefix":"pgsink:annotations",'
    '"content":"{\\"user\\":\\"x\\"}"}',
    '{"action":"C",' + _HDR % (785, "55017", "1681070") + ',"nextlsn":"0/16810A0"}',
]


def load_catalog(types: TypeRegistry) -> None:
    """What TypeRegistry.load would read from this server's catalog."""
    types.add_relation_rows([ITEMS_ROW])
    types.add_type_rows([MOOD_ROW], attempted=[MOOD])


def run(decoder: PgoutputDecoder | Wal2JsonDecoder, payloads: list[bytes] | list[str]) -> list[Event]:
    """Feed like the reader: on RelationSeen load the catalog, then resume if paused."""
    out: list[Event] = []
    for p in payloads:
        events = decoder.feed(p)
        while True:
            for e in events:
                out.append(e)
                if isinstance(e, RelationSeen):
                    load_catalog(decoder.types)
            if not decoder.pending:
                break
            events = decoder.resume()
    return out


def changes_only(events: list[Event]) -> list[Event]:
    return [e for e in events if not isinstance(e, RelationSeen)]


def ts(us: int) -> datetime:
    return datetime(2026, 11, 27, 14, 7, 43, us, tzinfo=UTC)


ROW1 = {"id": 1, "name": 'Widget "A", large', "price": RawJson("19.90"), "tags": ["a", "b c", None],
        "meta": RawJson('{"k": [1, 2.50]}'), "at": "2024-10-28T21:37:01.127470Z", "m": "happy"}
EXPECTED = [
    TxBegin(0x167EED0, ts(543650), 777),
    RowChange("insert", ITEMS, "public", "items", {**ROW1, "big": BIG}, None, ("id",), ()),
    TxCommit(0x167EED0, 0x167EF00),
    TxBegin(0x167F010, ts(544305), 778),
    RowChange("update", ITEMS, "public", "items", {**ROW1, "price": RawJson("21.00")}, None, ("id",), ("big",)),
    TxCommit(0x167F010, 0x167F040),
    TxBegin(0x167FD50, ts(545187), 780),
    RowChange("update", ITEMS, "public", "items", {**ROW1, "name": "w", "price": RawJson("21.00"), "m": "sad"},
              {"name": 'Widget "A", large', "m": "happy"}, ("id",), ("big",)),
    TxCommit(0x167FD50, 0x167FD80),
    TxBegin(0x16800A0, ts(545896), 782),
    RowChange("update", ITEMS, "public", "items",
              {**ROW1, "id": 2, "name": "w", "price": RawJson("21.00"), "m": "sad"}, None, ("id",), ("big",)),
    TxCommit(0x16800A0, 0x16800D0),
    TxBegin(0x1680180, ts(546231), 783),
    RowChange("delete", ITEMS, "public", "items", {"id": 2, "name": None, "price": None, "tags": None,
                                                   "meta": None, "at": None, "m": None, "big": None},
              None, ("id",), ()),
    TxCommit(0x1680180, 0x16801B0),
    TxBegin(0x1680EA8, ts(549227), 784),
    TableTruncate(((ITEMS, "public", "items"),), cascade=False, restart_identity=False),
    TxCommit(0x1680EA8, 0x1681018),
    TxBegin(0x1681070, ts(550170), 785),
    LogicalMessage(True, "pgsink:annotations", b'{"user":"x"}'),
    TxCommit(0x1681070, 0x16810A0),
]


def test_pgoutput_capture_decodes_as_expected() -> None:
    assert changes_only(run(PgoutputDecoder(TypeRegistry()), PGOUTPUT)) == EXPECTED


def test_wal2json_capture_decodes_to_the_same_events() -> None:
    events = run(Wal2JsonDecoder(TypeRegistry()), WAL2JSON)
    assert changes_only(events) == EXPECTED
    # and the same JSON bytes
    pg = changes_only(run(PgoutputDecoder(TypeRegistry()), PGOUTPUT))
    for a, b in zip(changes_only(events), pg, strict=True):
        if isinstance(a, RowChange):
            assert dumps(a.record) == dumps(b.record) and dumps(a.changes) == dumps(b.changes)


def test_wal2json_announces_a_table_once_and_pauses_for_the_catalog() -> None:
    d = Wal2JsonDecoder(TypeRegistry())
    assert d.feed(WAL2JSON[0]) == []
    first = d.feed(WAL2JSON[1])
    assert first == [RelationSeen(0, "public", "items", (23, 25, 1700, 1009, 3802, 1184, MOOD, 25))]
    assert d.pending and d.types.needs_load(first[0].type_oids)
    load_catalog(d.types)
    events = d.resume()
    assert [type(e) for e in events] == [TxBegin, RowChange]
    assert events[1].table_oid == ITEMS and events[1].record["m"] == "happy"
    assert not d.pending
    assert d.feed(WAL2JSON[2]) == [TxCommit(0x167EED0, 0x167EF00)]


def test_wal2json_without_a_catalog_still_decodes() -> None:
    """No load at all (e.g. the catalog is unreachable): names and pk come from the payloads."""
    d = Wal2JsonDecoder(TypeRegistry())
    out: list[Event] = []
    for p in WAL2JSON[:6]:
        out += d.feed(p)
        while d.pending:
            out += d.resume()
    rows = [e for e in out if isinstance(e, RowChange)]
    assert rows[0].table_oid == 0 and rows[0].key_columns == ("id",)
    assert rows[0].record["price"] == RawJson("19.90")
    assert rows[1].unchanged_toast == ("big",)


def test_wal2json_numbers_keep_their_digits_and_special_values() -> None:
    d = Wal2JsonDecoder(TypeRegistry())
    payloads = [
        '{"action":"B","xid":1,"timestamp":"2026-11-27 16:07:43.5+02","lsn":"0/10","nextlsn":"0/20"}',
        '{"action":"I","xid":1,"lsn":"0/8","schema":"s","table":"n","columns":['
        '{"name":"a","typeoid":1700,"value":123.4500},{"name":"b","typeoid":701,"value":1.5e+300},'
        '{"name":"c","typeoid":20,"value":9223372036854775807},{"name":"d","typeoid":1700,"value":"NaN"},'
        '{"name":"e","typeoid":701,"value":null},{"name":"f","typeoid":16,"value":false},'
        '{"name":"g","typeoid":17,"value":"0102ff"}],"pk":[]}',
        '{"action":"C","xid":1,"lsn":"0/10","nextlsn":"0/20"}',
    ]
    out: list[Event] = []
    for p in payloads:
        out += d.feed(p)
        while d.pending:
            out += d.resume()
    row = next(e for e in out if isinstance(e, RowChange))
    assert dumps(row.record) == (b'{"a":123.4500,"b":1.5e+300,"c":9223372036854775807,"d":"NaN","e":null,'
                                 b'"f":false,"g":"\\\\x0102ff"}')
    begin = next(e for e in out if isinstance(e, TxBegin))
    assert begin.committed_at == datetime(2026, 11, 27, 14, 7, 43, 500000, tzinfo=UTC)
    assert begin.committed_at.tzinfo is UTC


def test_wal2json_truncates_of_one_statement_merge_and_map_partitions_to_the_root() -> None:
    types = TypeRegistry()
    types.add_relation_rows([
        (100, "public", "pt", "d", ["id"], ["id"], ["id"], [23], [4], [False], None, None, None),
        (101, "public", "pt_a", "d", ["id"], ["id"], ["id"], [23], [4], [False], 100, "public", "pt"),
        (102, "public", "pt_b", "d", ["id"], ["id"], ["id"], [23], [4], [False], 100, "public", "pt"),
        (103, "public", "other", "d", ["id"], ["id"], ["id"], [23], [4], [False], None, None, None),
    ])
    d = Wal2JsonDecoder(types, partition_root=True)
    head = '{"action":"B","xid":9,"timestamp":"2026-11-27 14:07:43+00","lsn":"0/50","nextlsn":"0/60"}'
    t = '{"action":"T","xid":9,"lsn":"0/40","schema":"public","table":"%s"}'
    out: list[Event] = []
    for p in [head, t % "pt_a", t % "pt_b", t % "other",
              '{"action":"C","xid":9,"lsn":"0/50","nextlsn":"0/60"}']:
        out += d.feed(p)
        while d.pending:
            out += d.resume()
    assert changes_only(out)[1:] == [
        TableTruncate(((100, "public", "pt"), (103, "public", "other")), cascade=False, restart_identity=False),
        TxCommit(0x50, 0x60),
    ]


def test_wal2json_dropped_column_is_not_mistaken_for_unchanged_toast() -> None:
    types = TypeRegistry()
    rel = (7, "public", "t", "d", ["id"], ["id"], ["id", "a", "b"], [23, 25, 25], [4, -1, -1], [False] * 3,
           None, None, None)
    types.add_relation_rows([rel])
    d = Wal2JsonDecoder(types)
    head = '{"action":"B","xid":9,"timestamp":"2026-11-27 14:07:43+00","lsn":"0/50","nextlsn":"0/60"}'
    ins = ('{"action":"I","xid":9,"lsn":"0/40","schema":"public","table":"t","columns":['
           '{"name":"id","typeoid":23,"value":1},{"name":"a","typeoid":25,"value":"x"},'
           '{"name":"b","typeoid":25,"value":"y"}],"pk":[{"name":"id","typeoid":23}]}')
    upd = ('{"action":"U","xid":9,"lsn":"0/40","schema":"public","table":"t","columns":['
           '{"name":"id","typeoid":23,"value":1},{"name":"a","typeoid":25,"value":"z"}],'
           '"identity":[{"name":"id","typeoid":23,"value":1}],"pk":[{"name":"id","typeoid":23}]}')
    assert d.feed(head) == []
    first = d.feed(ins)
    assert isinstance(first[0], RelationSeen)
    assert d.resume()[1].record == {"id": 1, "a": "x", "b": "y"}
    # the update lacks b: the decoder re-reads the catalog before deciding
    seen = d.feed(upd)
    assert [type(e) for e in seen] == [RelationSeen] and d.pending
    types.add_relation_rows([(7, "public", "t", "d", ["id"], ["id"], ["id", "a"], [23, 25], [4, -1],
                              [False] * 2, None, None, None)])  # b was dropped
    row = d.resume()[0]
    assert isinstance(row, RowChange)
    assert row.record == {"id": 1, "a": "z"} and row.unchanged_toast == ()
    # the same shape again needs no catalog read
    assert [type(e) for e in d.feed(upd)] == [RowChange]


def test_generated_columns_are_left_out_like_pgoutput_does() -> None:
    types = TypeRegistry()
    types.add_relation_rows([(8, "public", "g", "d", ["id"], ["id"], ["id", "twice"], [23, 23], [4, 4],
                              [False, True], None, None, None)])
    d = Wal2JsonDecoder(types)
    d.feed('{"action":"B","xid":9,"timestamp":"2026-11-27 14:07:43+00","lsn":"0/50","nextlsn":"0/60"}')
    ins = ('{"action":"I","xid":9,"lsn":"0/40","schema":"public","table":"g","columns":['
           '{"name":"id","typeoid":23,"value":2},{"name":"twice","typeoid":23,"value":4}],'
           '"pk":[{"name":"id","typeoid":23}]}')
    d.feed(ins)
    assert d.resume()[1].record == {"id": 2}


def test_non_transactional_message_and_empty_transactions() -> None:
    d = Wal2JsonDecoder(TypeRegistry())
    assert d.feed(WAL2JSON[6]) == [] and d.feed(WAL2JSON[7]) == []  # empty (DDL) transaction
    msg = ('{"action":"M","xid":null,"timestamp":null,"lsn":"0/151D4A8","transactional":false,'
           '"prefix":"nt","content":"hello"}')
    assert d.feed(msg) == [LogicalMessage(False, "nt", b"hello")]


@pytest.mark.parametrize("payload, match", [
    ("not json", "not JSON"),
    ('{"change":[]}', "format-version 2"),
    ('{"action":"X"}', "unknown wal2json action"),
])
def test_wal2json_errors(payload: str, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        Wal2JsonDecoder(TypeRegistry()).feed(payload)


def test_options_are_the_documented_ones() -> None:
    assert WAL2JSON_OPTIONS["format-version"] == "2"
    assert {k for k, v in WAL2JSON_OPTIONS.items() if v == "1"} == {
        "include-xids", "include-timestamp", "include-lsn", "include-type-oids", "include-transaction", "include-pk"}


def test_row_change_events_compare_by_value() -> None:
    a = EXPECTED[1]
    assert isinstance(a, RowChange)
    assert dataclasses.replace(a, record=dict(a.record)) == a
