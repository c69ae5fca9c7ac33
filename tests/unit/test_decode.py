"""pgsink.engine.decode on literal bytes: hand-written from the protocol spec
("Streaming Replication Protocol" / "Logical Replication Message Formats") and
captured from a PostgreSQL 15 server with pg_logical_slot_peek_binary_changes."""

from __future__ import annotations

from datetime import UTC, datetime

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
    convert_row,
)
from pgsink.engine.framing import (
    DecodeError,
    Keepalive,
    XLogData,
    format_lsn,
    parse_copy_data,
    parse_lsn,
    pg_timestamp,
    standby_status_update,
)
from pgsink.engine.pgoutput import (
    PAD,
    UNCHANGED_TOAST,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    PgoutputParser,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    Type,
    Update,
    make_plain_record_reader,
)
from pgsink.engine.jsontext import RawJson, dumps
from pgsink.engine.values import BUILTIN_CONVERTERS, TypeRegistry

T0 = datetime(2000, 1, 1, tzinfo=UTC)
T1 = datetime(2000, 1, 1, 0, 0, 1, tzinfo=UTC)


def run(decoder: PgoutputDecoder, payloads: list[bytes]) -> list[Event]:
    """Feed everything, resuming after every pause (no catalog to load in unit tests)."""
    out: list[Event] = []
    for p in payloads:
        out += decoder.feed(p)
        while decoder.pending:
            out += decoder.resume()
    return out


# ===================================================================== LSN and framing


def test_lsn_text_round_trip() -> None:
    assert format_lsn(0x16B374D848) == "16/B374D848"
    assert parse_lsn("16/B374D848") == 0x16B374D848
    assert parse_lsn("0/0") == 0
    assert format_lsn(parse_lsn("FFFFFFFF/FFFFFFFF")) == "FFFFFFFF/FFFFFFFF"


@pytest.mark.parametrize("bad", ["", "16", "16/", "/1", "x/1", "123456789/0", "1/2/3"])
def test_parse_lsn_rejects_garbage_with_a_clear_error(bad: str) -> None:
    with pytest.raises(DecodeError, match="is not an LSN"):
        parse_lsn(bad)


def test_xlogdata_frame() -> None:
    buf = (b"w" + b"\x00\x00\x00\x16\xb3\x74\xd8\x48" + b"\x00\x00\x00\x16\xb3\x74\xd9\x00"
           + b"\x00\x00\x00\x00\x00\x0f\x42\x40" + b"B-payload")
    msg = parse_copy_data(buf)
    assert msg == XLogData(0x16B374D848, 0x16B374D900, 1_000_000, b"B-payload")
    assert msg.send_time == T1


def test_keepalive_frame() -> None:
    msg = parse_copy_data(b"k" + b"\x00\x00\x00\x00\x01\x50\x8e\x50" + b"\x00" * 8 + b"\x01")
    assert msg == Keepalive(0x1508E50, T0, True)
    msg = parse_copy_data(b"k" + b"\x00\x00\x00\x00\x01\x50\x8e\x50" + b"\x00" * 8 + b"\x00")
    assert msg == Keepalive(0x1508E50, T0, False)


def test_framing_errors() -> None:
    with pytest.raises(DecodeError, match="unknown replication message"):
        parse_copy_data(b"x123")
    with pytest.raises(DecodeError, match="truncated"):
        parse_copy_data(b"k\x00\x00")


def test_standby_status_update_bytes() -> None:
    got = standby_status_update(0x16B374D848, 0x16B374D800, 0, reply=True, now=T1)
    assert got == (b"r" + b"\x00\x00\x00\x16\xb3\x74\xd8\x48" + b"\x00\x00\x00\x16\xb3\x74\xd8\x00"
                   + b"\x00" * 8 + b"\x00\x00\x00\x00\x00\x0f\x42\x40" + b"\x01")
    assert len(standby_status_update(1, 1, 1)) == 34
    # the clock is "now" in microseconds since 2000-01-01
    now = datetime.now(UTC)
    sent = int.from_bytes(standby_status_update(1, 1, 1)[25:33], "big")
    assert abs((pg_timestamp(sent) - now).total_seconds()) < 5


# ===================================================================== parser, hand-written fixtures


REL_ORDERS = (b"R" + b"\x00\x00\x40\x01" + b"public\x00" + b"orders\x00" + b"d" + b"\x00\x02"
              + b"\x01" + b"id\x00" + b"\x00\x00\x00\x17" + b"\xff\xff\xff\xff"
              + b"\x00" + b"note\x00" + b"\x00\x00\x00\x19" + b"\xff\xff\xff\xff")
BEGIN_1 = b"B" + b"\x00\x00\x00\x16\x00\x00\x01\x00" + b"\x00" * 8 + b"\x00\x00\x02\xd5"
COMMIT_1 = (b"C\x00" + b"\x00\x00\x00\x16\x00\x00\x01\x00" + b"\x00\x00\x00\x16\x00\x00\x01\x30"
            + b"\x00\x00\x00\x00\x00\x0f\x42\x40")
INSERT_1 = b"I" + b"\x00\x00\x40\x01" + b"N" + b"\x00\x02" + b"t\x00\x00\x00\x0242" + b"t\x00\x00\x00\x05hello"


def test_parse_begin_commit_origin() -> None:
    p = PgoutputParser()
    assert p.parse(BEGIN_1) == Begin(0x1600000100, T0, 725)
    assert p.parse(COMMIT_1) == Commit(0, 0x1600000100, 0x1600000130, T1)
    assert p.parse(b"O" + b"\x00\x00\x00\x00\x00\x00\x00\x2a" + b"node_a\x00") == Origin(42, "node_a")


def test_parse_relation_and_type() -> None:
    p = PgoutputParser()
    assert p.parse(REL_ORDERS) == Relation(
        0x4001, "public", "orders", "d",
        (Column(True, "id", 23, -1), Column(False, "note", 25, -1)),
    )
    assert p.parse(b"Y" + b"\x00\x00\x40\x02" + b"public\x00mood\x00") == Type(0x4002, "public", "mood")


def test_parse_insert_with_every_tuple_kind() -> None:
    p = PgoutputParser()
    assert p.parse(INSERT_1) == Insert(0x4001, ("42", "hello"))
    buf = (b"I" + b"\x00\x00\x40\x01" + b"N" + b"\x00\x04" + b"n" + b"u" + b"t\x00\x00\x00\x00"
           + b"b\x00\x00\x00\x02\x01\xff")
    assert p.parse(buf) == Insert(0x4001, (None, UNCHANGED_TOAST, "", b"\x01\xff"))


def test_parse_update_variants() -> None:
    p = PgoutputParser()
    new = b"N\x00\x02t\x00\x00\x00\x0242u"
    assert p.parse(b"U\x00\x00\x40\x01" + new) == Update(0x4001, None, None, ("42", UNCHANGED_TOAST))
    old_key = b"K\x00\x02t\x00\x00\x00\x0241n"
    assert p.parse(b"U\x00\x00\x40\x01" + old_key + new) == Update(
        0x4001, "K", ("41", None), ("42", UNCHANGED_TOAST))
    old_row = b"O\x00\x02t\x00\x00\x00\x0242t\x00\x00\x00\x03old"
    assert p.parse(b"U\x00\x00\x40\x01" + old_row + new) == Update(
        0x4001, "O", ("42", "old"), ("42", UNCHANGED_TOAST))


def test_parse_delete_truncate_message() -> None:
    p = PgoutputParser()
    assert p.parse(b"D\x00\x00\x40\x01K\x00\x02t\x00\x00\x00\x0242n") == Delete(0x4001, "K", ("42", None))
    assert p.parse(b"D\x00\x00\x40\x01O\x00\x01t\x00\x00\x00\x0242") == Delete(0x4001, "O", ("42",))
    assert p.parse(b"T" + b"\x00\x00\x00\x02" + b"\x03" + b"\x00\x00\x40\x01" + b"\x00\x00\x40\x05") == Truncate(
        (0x4001, 0x4005), cascade=True, restart_identity=True)
    assert p.parse(b"T\x00\x00\x00\x01\x02\x00\x00\x40\x01") == Truncate((0x4001,), False, True)
    msg = (b"M\x01" + b"\x00\x00\x00\x00\x01\x51\xd4\x38" + b"pgsink:annotations\x00" + b"\x00\x00\x00\x0c"
           + b'{"user":"x"}')
    assert p.parse(msg) == Message(True, 0x151D438, "pgsink:annotations", b'{"user":"x"}')
    msg = b"M\x00" + b"\x00\x00\x00\x00\x01\x51\xd4\xa8" + b"nt\x00" + b"\x00\x00\x00\x03" + b"\x00\xff\x01"
    assert p.parse(msg) == Message(False, 0x151D4A8, "nt", b"\x00\xff\x01")


def test_parse_stream_messages_and_xid_prefix() -> None:
    p = PgoutputParser()
    assert p.parse(b"S\x00\x00\x03\x02\x01") == StreamStart(770, True)
    assert p.in_stream
    # inside a stream block, data messages carry the (sub)transaction xid first
    assert p.parse(b"I\x00\x00\x03\x03" + INSERT_1[1:]) == Insert(0x4001, ("42", "hello"), xid=771)
    rel = p.parse(b"R\x00\x00\x03\x02" + REL_ORDERS[1:])
    assert isinstance(rel, Relation) and rel.xid == 770 and rel.name == "orders"
    assert p.parse(b"E") == StreamStop()
    assert not p.in_stream
    assert p.parse(INSERT_1) == Insert(0x4001, ("42", "hello"))
    commit = (b"c\x00\x00\x03\x02\x00" + b"\x00\x00\x00\x00\x01\x5f\xe8\x58" + b"\x00\x00\x00\x00\x01\x5f\xe8\x90"
              + b"\x00\x00\x00\x00\x00\x0f\x42\x40")
    assert p.parse(commit) == StreamCommit(770, 0, 0x15FE858, 0x15FE890, T1)
    assert p.parse(b"A\x00\x00\x03\x02\x00\x00\x03\x03") == StreamAbort(770, 771)
    v4 = b"A\x00\x00\x03\x02\x00\x00\x03\x02" + b"\x00\x00\x00\x00\x01\x5f\xe8\x58" + b"\x00" * 8
    assert p.parse(v4) == StreamAbort(770, 770, 0x15FE858, T0)


@pytest.mark.parametrize("payload, match", [
    (b"Z\x00", "unsupported pgoutput message type"),
    (b"P\x00", "unsupported pgoutput message type"),
    (b"I\x00\x00", "malformed"),
    (b"I\x00\x00\x40\x01X\x00\x00", "insert without a new tuple"),
    (b"I\x00\x00\x40\x01N", "too short"),
    (b"I\x00\x00\x40\x01N\x00\x01z", "unknown tuple column kind"),
    (b"U\x00\x00\x40\x01Q\x00\x00", "update without a new tuple"),
    (b"D\x00\x00\x40\x01N\x00\x00", "delete without an old tuple"),
    (b"I\x00\x00\x40\x01N\x00\x01t\x00\x00", "malformed"),
])
def test_parser_errors_are_decode_errors(payload: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        PgoutputParser().parse(payload)
    # the decoder's fast path for row messages says the same
    decoder = PgoutputDecoder(TypeRegistry())
    decoder.feed(REL_ORDERS)
    with pytest.raises(DecodeError, match=match):
        decoder.feed(payload)


# ===================================================================== captured from the server (proto 1)
# create table items (id int primary key, name text, price numeric(10,2), tags text[], meta jsonb, at timestamptz);
# insert (1, 'Widget "A", large', 19.90, '{a,"b c",NULL}', '{"k": [1, 2.50]}', '2024-10-28 21:37:01.12747+00');
# replica identity full; update price = 21.00; replica identity default; update id = 2; delete;
# truncate items restart identity; pg_logical_emit_message(true, 'pgsink:annotations', '{"user":"x"}')

_ITEMS_COLS_D = (b"\x00\x06\x01id\x00\x00\x00\x00\x17\xff\xff\xff\xff\x00name\x00\x00\x00\x00\x19\xff\xff\xff\xff"
                 b"\x00price\x00\x00\x00\x06\xa4\x00\n\x00\x06\x00tags\x00\x00\x00\x03\xf1\xff\xff\xff\xff"
                 b"\x00meta\x00\x00\x00\x0e\xda\xff\xff\xff\xff\x00at\x00\x00\x00\x04\xa0\xff\xff\xff\xff")
_ROW1 = (b't\x00\x00\x00\x011t\x00\x00\x00\x11Widget "A", larget\x00\x00\x00\x0519.90t\x00\x00\x00\x0e{a,"b c",NULL}'
         b't\x00\x00\x00\x10{"k": [1, 2.50]}t\x00\x00\x00\x1c2024-10-28 21:37:01.12747+00')
_ROW1_21 = _ROW1.replace(b"19.90", b"21.00")
CAPTURED_ITEMS = [
    b'B\x00\x00\x00\x00\x01T\x8c\xf8\x00\x03\x04AXU\x89B\x00\x00\x02\xf5',
    b'R\x00\x00@8public\x00items\x00d' + _ITEMS_COLS_D,
    b'I\x00\x00@8N\x00\x06' + _ROW1,
    b'C\x00\x00\x00\x00\x00\x01T\x8c\xf8\x00\x00\x00\x00\x01T\x8d(\x00\x03\x04AXU\x89B',
    b'B\x00\x00\x00\x00\x01T\x900\x00\x03\x04AXU\x8eY\x00\x00\x02\xf7',
    b'R\x00\x00@8public\x00items\x00f\x00\x06\x01id\x00\x00\x00\x00\x17\xff\xff\xff\xff\x01name\x00\x00\x00\x00'
    b'\x19\xff\xff\xff\xff\x01price\x00\x00\x00\x06\xa4\x00\n\x00\x06\x01tags\x00\x00\x00\x03\xf1\xff\xff\xff\xff'
    b'\x01meta\x00\x00\x00\x0e\xda\xff\xff\xff\xff\x01at\x00\x00\x00\x04\xa0\xff\xff\xff\xff',
    b'U\x00\x00@8O\x00\x06' + _ROW1 + b'N\x00\x06' + _ROW1_21,
    b'C\x00\x00\x00\x00\x00\x01T\x900\x00\x00\x00\x00\x01T\x90`\x00\x03\x04AXU\x8eY',
    b'B\x00\x00\x00\x00\x01T\x93(\x00\x03\x04AXU\x91\xf2\x00\x00\x02\xf9',
    b'R\x00\x00@8public\x00items\x00d' + _ITEMS_COLS_D,
    b'U\x00\x00@8K\x00\x06t\x00\x00\x00\x011nnnnnN\x00\x06' + _ROW1_21.replace(b"\x011", b"\x012", 1),
    b'C\x00\x00\x00\x00\x00\x01T\x93(\x00\x00\x00\x00\x01T\x93X\x00\x03\x04AXU\x91\xf2',
    b'B\x00\x00\x00\x00\x01T\x93\x98\x00\x03\x04AXU\x93H\x00\x00\x02\xfa',
    b'D\x00\x00@8K\x00\x06t\x00\x00\x00\x012nnnnn',
    b'C\x00\x00\x00\x00\x00\x01T\x93\x98\x00\x00\x00\x00\x01T\x93\xc8\x00\x03\x04AXU\x93H',
    b'B\x00\x00\x00\x00\x01T\x9f\xa0\x00\x03\x04AXU\x98\x15\x00\x00\x02\xfb',
    b'R\x00\x00@8public\x00items\x00d' + _ITEMS_COLS_D,
    b'T\x00\x00\x00\x01\x02\x00\x00@8',
    b'C\x00\x00\x00\x00\x00\x01T\x9f\xa0\x00\x00\x00\x00\x01T\xa1(\x00\x03\x04AXU\x98\x15',
    b'B\x00\x00\x00\x00\x01T\xa1\x80\x00\x03\x04AXU\x9cx\x00\x00\x02\xfc',
    b'M\x01\x00\x00\x00\x00\x01T\xa1\x80pgsink:annotations\x00\x00\x00\x00\x0c{"user":"x"}',
    b'C\x00\x00\x00\x00\x00\x01T\xa1\x80\x00\x00\x00\x00\x01T\xa1\xb0\x00\x03\x04AXU\x9cx',
]


def test_captured_messages_parse() -> None:
    p = PgoutputParser()
    msgs = [p.parse(b) for b in CAPTURED_ITEMS]
    assert msgs[0] == Begin(0x1548CF8, datetime(2026, 11, 27, 14, 7, 11, 518018, tzinfo=UTC), 757)
    assert msgs[1] == Relation(0x4038, "public", "items", "d", (
        Column(True, "id", 23, -1), Column(False, "name", 25, -1), Column(False, "price", 1700, 0xA0006),
        Column(False, "tags", 1009, -1), Column(False, "meta", 3802, -1), Column(False, "at", 1184, -1)))
    assert msgs[2] == Insert(0x4038, ("1", 'Widget "A", large', "19.90", '{a,"b c",NULL}', '{"k": [1, 2.50]}',
                                      "2024-10-28 21:37:01.12747+00"))
    assert msgs[3] == Commit(0, 0x1548CF8, 0x1548D28, datetime(2026, 11, 27, 14, 7, 11, 518018, tzinfo=UTC))
    assert isinstance(msgs[5], Relation) and msgs[5].replica_identity == "f"
    assert all(c.is_key for c in msgs[5].columns)  # FULL flags every column
    assert isinstance(msgs[6], Update) and msgs[6].old_kind == "O" and msgs[6].old[2] == "19.90"
    assert isinstance(msgs[10], Update) and msgs[10].old == ("1", None, None, None, None, None)
    assert msgs[13] == Delete(0x4038, "K", ("2", None, None, None, None, None))
    assert msgs[17] == Truncate((0x4038,), cascade=False, restart_identity=True)
    assert msgs[20] == Message(True, 0x154A180, "pgsink:annotations", b'{"user":"x"}')


ITEMS_RELATION_ROW = (0x4038, "public", "items", "d", ["id"], ["id"],
                      ["id", "name", "price", "tags", "meta", "at"], [23, 25, 1700, 1009, 3802, 1184],
                      [4, -1, -1, -1, -1, 8], [False] * 6, None, None, None)


def test_captured_stream_decodes_to_events() -> None:
    types = TypeRegistry()
    types.add_relation_rows([ITEMS_RELATION_ROW])
    events = run(PgoutputDecoder(types), CAPTURED_ITEMS)
    seen = RelationSeen(0x4038, "public", "items", (23, 25, 1700, 1009, 3802, 1184))
    row1 = {"id": 1, "name": 'Widget "A", large', "price": RawJson("19.90"), "tags": ["a", "b c", None],
            "meta": RawJson('{"k": [1, 2.50]}'), "at": "2024-10-28T21:37:01.127470Z"}
    row21 = {**row1, "price": RawJson("21.00")}
    ts = [datetime(2026, 11, 27, 14, 7, 11, us, tzinfo=UTC) for us in (518018, 519321, 520242, 520584, 521813, 522936)]
    assert events == [
        seen, TxBegin(0x1548CF8, ts[0], 757),
        RowChange("insert", 0x4038, "public", "items", row1, None, ("id",), ()),
        TxCommit(0x1548CF8, 0x1548D28),
        seen, TxBegin(0x1549030, ts[1], 759),
        RowChange("update", 0x4038, "public", "items", row21, {"price": RawJson("19.90")}, ("id",), ()),
        TxCommit(0x1549030, 0x1549060),
        seen, TxBegin(0x1549328, ts[2], 761),
        RowChange("update", 0x4038, "public", "items", {**row21, "id": 2}, None, ("id",), ()),
        TxCommit(0x1549328, 0x1549358),
        TxBegin(0x1549398, ts[3], 762),
        RowChange("delete", 0x4038, "public", "items",
                  {"id": 2, "name": None, "price": None, "tags": None, "meta": None, "at": None}, None, ("id",), ()),
        TxCommit(0x1549398, 0x15493C8),
        seen, TxBegin(0x1549FA0, ts[4], 763),
        TableTruncate(((0x4038, "public", "items"),), cascade=False, restart_identity=True),
        TxCommit(0x1549FA0, 0x154A128),
        TxBegin(0x154A180, ts[5], 764),
        LogicalMessage(True, "pgsink:annotations", b'{"user":"x"}'),
        TxCommit(0x154A180, 0x154A1B0),
    ]
    # the JSON a user gets, its keys in jsonb's order (shorter first, then bytewise)
    assert dumps(events[2].record) == (
        b'{"at":"2024-10-28T21:37:01.127470Z","id":1,"meta":{"k": [1, 2.50]},"name":"Widget \\"A\\", large",'
        b'"tags":["a","b c",null],"price":19.90}')


def test_relation_seen_comes_before_tx_begin_when_the_relation_precedes_the_first_change() -> None:
    events = run(PgoutputDecoder(TypeRegistry()), CAPTURED_ITEMS[:4])
    assert [type(e) for e in events] == [RelationSeen, TxBegin, RowChange, TxCommit]


def test_key_columns_without_the_catalog_come_from_the_relation_flags() -> None:
    events = run(PgoutputDecoder(TypeRegistry()), CAPTURED_ITEMS[:8])
    rows = [e for e in events if isinstance(e, RowChange)]
    assert rows[0].key_columns == ("id",)
    assert rows[1].key_columns == ()  # FULL flags every column: unknown without the catalog


# ===================================================================== hand-written decoder scenarios


def test_empty_transactions_produce_no_events() -> None:
    assert run(PgoutputDecoder(TypeRegistry()), [BEGIN_1, COMMIT_1]) == []
    assert run(PgoutputDecoder(TypeRegistry()), [BEGIN_1, REL_ORDERS, COMMIT_1]) == [
        RelationSeen(0x4001, "public", "orders", (23, 25))]


def test_ddl_mid_stream_uses_the_newest_relation() -> None:
    rel3 = (b"R\x00\x00\x40\x01public\x00orders\x00d\x00\x02"
            b"\x01id\x00\x00\x00\x00\x17\xff\xff\xff\xff"
            b"\x00note_text\x00\x00\x00\x00\x19\xff\xff\xff\xff")
    rel4 = (b"R\x00\x00\x40\x01public\x00orders\x00d\x00\x03"
            b"\x01id\x00\x00\x00\x00\x17\xff\xff\xff\xff"
            b"\x00note_text\x00\x00\x00\x00\x19\xff\xff\xff\xff"
            b"\x00qty\x00\x00\x00\x00\x15\xff\xff\xff\xff")
    ins3 = b"I\x00\x00\x40\x01N\x00\x03t\x00\x00\x00\x0243t\x00\x00\x00\x01xt\x00\x00\x00\x017"
    events = run(PgoutputDecoder(TypeRegistry()),
                 [REL_ORDERS, BEGIN_1, INSERT_1, COMMIT_1, rel3, rel4, BEGIN_1, ins3, COMMIT_1])
    rows = [e for e in events if isinstance(e, RowChange)]
    assert rows[0].record == {"id": 42, "note": "hello"}
    assert rows[1].record == {"id": 43, "note_text": "x", "qty": 7}
    assert [e.type_oids for e in events if isinstance(e, RelationSeen)] == [(23, 25), (23, 25), (23, 25, 21)]


def test_unchanged_toast_is_listed_and_absent_from_the_record() -> None:
    upd = b"U\x00\x00\x40\x01N\x00\x02t\x00\x00\x00\x0242u"
    events = run(PgoutputDecoder(TypeRegistry()), [REL_ORDERS, BEGIN_1, upd, COMMIT_1])
    row = events[2]
    assert isinstance(row, RowChange)
    assert row.record == {"id": 42}
    assert row.unchanged_toast == ("note",)
    assert row.changes is None


def test_full_update_changes_skip_unchanged_toast_and_equal_values() -> None:
    upd = (b"U\x00\x00\x40\x01O\x00\x02t\x00\x00\x00\x0241t\x00\x00\x00\x03old"
           b"N\x00\x02t\x00\x00\x00\x0242u")
    upd_same = (b"U\x00\x00\x40\x01O\x00\x02t\x00\x00\x00\x0242t\x00\x00\x00\x03old"
                b"N\x00\x02t\x00\x00\x00\x0242t\x00\x00\x00\x03old")
    events = run(PgoutputDecoder(TypeRegistry()), [REL_ORDERS, BEGIN_1, upd, upd_same, COMMIT_1])
    rows = [e for e in events if isinstance(e, RowChange)]
    assert rows[0].changes == {"id": 41}
    assert rows[1].changes == {}


def test_change_before_its_relation_is_a_clear_error() -> None:
    with pytest.raises(DecodeError, match="before its Relation message"):
        run(PgoutputDecoder(TypeRegistry()), [BEGIN_1, INSERT_1])


def test_binary_values_and_odd_text_never_fail_a_row() -> None:
    rel = (b"R\x00\x00\x40\x09public\x00odd\x00d\x00\x03"
           b"\x01id\x00\x00\x00\x00\x17\xff\xff\xff\xff"
           b"\x00n\x00\x00\x00\x00\x17\xff\xff\xff\xff"
           b"\x00b\x00\x00\x00\x00\x11\xff\xff\xff\xff")
    ins = b"I\x00\x00\x40\x09N\x00\x03t\x00\x00\x00\x011t\x00\x00\x00\x03abcb\x00\x00\x00\x02\x01\xff"
    events = run(PgoutputDecoder(TypeRegistry()), [rel, BEGIN_1, ins, COMMIT_1])
    assert events[2].record == {"id": 1, "n": "abc", "b": "\\x01ff"}


def test_text_rows_that_fail_conversion_take_the_careful_path() -> None:
    # an int column holding text and invalid UTF-8: plain text-only tuples are decoded in one pass,
    # and when that pass fails the row is redone value by value, keeping the odd texts
    ins = b"I\x00\x00\x40\x01N\x00\x02t\x00\x00\x00\x03abct\x00\x00\x00\x02\xff!"
    events = run(PgoutputDecoder(TypeRegistry()), [REL_ORDERS, BEGIN_1, ins, COMMIT_1])
    assert events[2].record == {"id": "abc", "note": "\ufffd!"}
    truncated = b"I\x00\x00\x40\x01N\x00\x02t\x00\x00\x00\x0242t\x00\x00\x00\x09short"
    with pytest.raises(DecodeError, match="ends inside"):
        run(PgoutputDecoder(TypeRegistry()), [REL_ORDERS, BEGIN_1, truncated, COMMIT_1])


def test_truncate_and_non_transactional_message_outside_a_transaction() -> None:
    msg = b"M\x00" + b"\x00\x00\x00\x00\x01\x51\xd4\xa8" + b"nt\x00" + b"\x00\x00\x00\x05" + b"hello"
    trunc = b"T\x00\x00\x00\x02\x01\x00\x00\x40\x01\x00\x00\x40\x07"
    events = run(PgoutputDecoder(TypeRegistry()), [msg, REL_ORDERS, BEGIN_1, trunc, COMMIT_1])
    assert events == [
        LogicalMessage(False, "nt", b"hello"),
        RelationSeen(0x4001, "public", "orders", (23, 25)),
        TxBegin(0x1600000100, T0, 725),
        TableTruncate(((0x4001, "public", "orders"), (0x4007, "", "")), cascade=True, restart_identity=False),
        TxCommit(0x1600000100, 0x1600000130),
    ]


# ===================================================================== protocol 2: streamed transactions
# Captured: begin; insert (10); savepoint s; insert (11); <1500 unpublished rows>; rollback to s;
# insert (12); commit.  Then: insert (20) + message 'in-stream'; commit.  Then: insert (30); rollback
# (the server had not flushed that abort yet, so its 'A' is hand-written below).

_ITEMS2 = (b"\x00\x00@Mpublic\x00items\x00d\x00\x02\x01id\x00\x00\x00\x00\x17\xff\xff\xff\xff"
           b"\x00name\x00\x00\x00\x00\x19\xff\xff\xff\xff")
CAPTURED_STREAM = [
    b'S\x00\x00\x03\x02\x01',
    b'R\x00\x00\x03\x02' + _ITEMS2,
    b'I\x00\x00\x03\x02\x00\x00@MN\x00\x02t\x00\x00\x00\x0210t\x00\x00\x00\x03ten',
    b'I\x00\x00\x03\x03\x00\x00@MN\x00\x02t\x00\x00\x00\x0211t\x00\x00\x00\x06eleven',
    b'E',
    b'A\x00\x00\x03\x02\x00\x00\x03\x03',
    b'S\x00\x00\x03\x02\x00',
    b'R\x00\x00\x03\x04' + _ITEMS2,
    b'I\x00\x00\x03\x04\x00\x00@MN\x00\x02t\x00\x00\x00\x0212t\x00\x00\x00\x06twelve',
    b'E',
    b'c\x00\x00\x03\x02\x00\x00\x00\x00\x00\x01_\xe8X\x00\x00\x00\x00\x01_\xe8\x90\x00\x03\x04AX\xf5\x16\xd2',
    b'S\x00\x00\x03\x05\x01',
    b'R\x00\x00\x03\x05' + _ITEMS2,
    b'I\x00\x00\x03\x05\x00\x00@MN\x00\x02t\x00\x00\x00\x0220t\x00\x00\x00\x07aborted',
    b'E',
    b'S\x00\x00\x03\x05\x00',
    b'E',
    b'S\x00\x00\x03\x05\x00',
    b'M\x00\x00\x03\x05\x01\x00\x00\x00\x00\x01c\x95\x90m\x00\x00\x00\x00\tin-stream',
    b'E',
    b'c\x00\x00\x03\x05\x00\x00\x00\x00\x00\x01c\x95\x90\x00\x00\x00\x00\x01c\x95\xc0\x00\x03\x04AX\xf5&j',
    b'S\x00\x00\x03\x06\x01',
    b'R\x00\x00\x03\x06' + _ITEMS2,
    b'I\x00\x00\x03\x06\x00\x00@MN\x00\x02t\x00\x00\x00\x0230t\x00\x00\x00\x0frolled back top',
    b'E',
    b'S\x00\x00\x03\x06\x00',
    b'E',
    b'A\x00\x00\x03\x06\x00\x00\x03\x06',  # hand-written: top-level abort (xid == subxid)
]
SEEN2 = RelationSeen(0x404D, "public", "items", (23, 25))


def _row(i: int, name: str) -> RowChange:
    return RowChange("insert", 0x404D, "public", "items", {"id": i, "name": name}, None, ("id",), ())


def test_streamed_transactions_are_buffered_until_stream_commit() -> None:
    d = PgoutputDecoder(TypeRegistry())
    for p in CAPTURED_STREAM[:10]:
        assert d.feed(p) == []  # nothing is emitted before the stream commits
    events = run(d, CAPTURED_STREAM[10:])
    t1 = datetime(2026, 11, 27, 14, 7, 21, 974482, tzinfo=UTC)
    t2 = datetime(2026, 11, 27, 14, 7, 21, 978474, tzinfo=UTC)
    assert events == [
        SEEN2, TxBegin(0x15FE858, t1, 770), _row(10, "ten"), SEEN2, _row(12, "twelve"),  # 11: subxact aborted
        TxCommit(0x15FE858, 0x15FE890),
        SEEN2, TxBegin(0x163_9590, t2, 773), _row(20, "aborted"),
        LogicalMessage(True, "m", b"in-stream"),
        TxCommit(0x1639590, 0x16395C0),
        # xid 774 was aborted at the top level: nothing
    ]
    assert not d.pending and not d._streams


def test_stream_replay_pauses_after_a_relation_whose_types_need_loading() -> None:
    """The reader loads types between RelationSeen and the rows that use them."""
    rel_enum = (b"R\x00\x00\x03\x02" + b"\x00\x00@Mpublic\x00items\x00d\x00\x02"
                b"\x01id\x00\x00\x00\x00\x17\xff\xff\xff\xff\x00m\x00\x00\x00@\x01\xff\xff\xff\xff")
    d = PgoutputDecoder(TypeRegistry())
    for p in [b"S\x00\x00\x03\x02\x01", rel_enum, CAPTURED_STREAM[2], b"E"]:
        assert d.feed(p) == []
    first = d.feed(CAPTURED_STREAM[10])
    assert first == [RelationSeen(0x404D, "public", "items", (23, 0x4001))]
    assert d.pending
    assert d.types.needs_load(first[0].type_oids)
    # what TypeRegistry.load would do, without a database
    d.types.add_relation_rows([(0x404D, "public", "items", "d", ["id"], ["id"], ["id", "m"], [23, 0x4001],
                                [4, 4], [False, False], None, None, None)])
    d.types.add_type_rows([(0x4001, "mood", "public", "e", "E", 0, 0, ",", [], [])], attempted=[0x4001])
    assert not d.types.needs_load(first[0].type_oids)
    rest = d.resume()
    assert [type(e) for e in rest] == [TxBegin, RowChange, TxCommit]
    assert rest[1].record == {"id": 10, "m": "ten"}
    assert not d.pending


def test_a_new_feed_resumes_a_paused_replay_first() -> None:
    d = PgoutputDecoder(TypeRegistry())
    for p in CAPTURED_STREAM[:10]:
        d.feed(p)
    assert d.feed(CAPTURED_STREAM[10]) == [SEEN2]
    assert d.pending
    msg = b"M\x00" + b"\x00\x00\x00\x00\x01\x51\xd4\xa8" + b"nt\x00" + b"\x00\x00\x00\x01" + b"!"
    # order is kept: the replay continues, pauses again, and the new message waits its turn
    assert [type(e) for e in d.feed(msg)] == [TxBegin, RowChange, RelationSeen]
    assert d.pending
    assert [type(e) for e in d.resume()] == [RowChange, TxCommit, LogicalMessage]
    assert not d.pending


def test_annotations_that_jsonb_cannot_hold_are_ignored_not_fatal() -> None:
    """1e1001 is JSON but beyond Postgres numeric: written to the retention log it failed the capture
    transaction on every restart."""
    from pgsink.engine.capture import _annotations

    assert _annotations(b'{"user": "ann", "x": 1e400}', "src") == b'{"user":"ann","x":1E+400}'
    assert _annotations(b'{"x": 1e1001}', "src") is None
    assert _annotations(b'{"x": [1, {"y": -1e-1001}]}', "src") is None
    assert _annotations(b"not json", "src") is None


def _tuple_data(values: list[bytes | None | str]) -> bytes:
    """TupleData: 't' + length + text, 'n' for None, 'u' for the string "u"."""
    out = len(values).to_bytes(2, "big")
    for v in values:
        if v is None:
            out += b"n"
        elif v == "u":
            out += b"u"
        else:
            assert isinstance(v, bytes)
            out += b"t" + len(v).to_bytes(4, "big") + v
    return out


def test_generated_record_reader_matches_the_careful_path() -> None:
    # column names that would break pasted source code; int, numeric, jsonb, timestamptz, text[], text
    names = ('id', "it's", 'a"b', "x\n}", "{name0: 1}", "é")
    convs = tuple(BUILTIN_CONVERTERS.get(oid) for oid in (20, 1700, 3802, 1184, 1009, 25))
    read = make_plain_record_reader(names, convs)
    rows: list[list[bytes | None | str]] = [
        [b"1", b"12.50", b'{"a": [1, 2]}', b"2024-01-02 03:04:05.5+00", b'{a,"b,c",NULL}', "é\\t".encode()],
        [None, None, None, None, None, None],
        [b"-9223372036854775808", b"NaN", b"null", b"infinity", b"{}", b""],
    ]
    for row in rows:
        payload = _tuple_data(row) + PAD
        texts = [v.decode() if isinstance(v, bytes) else v for v in row]
        fast, careful = read(payload, 0, len(payload) - len(PAD)), convert_row(names, convs, texts)[0]
        assert fast == careful
        # both in jsonb's key order: shorter first (in bytes: "é" is 2), then bytewise ("i" < 0xC3)
        assert list(fast) == list(careful) == ["id", "é", 'a"b', "x\n}", "it's", "{name0: 1}"]
    # anything unusual is left to the careful path: None
    odd = [
        _tuple_data([b"1", None, None, None, None, "u"]),           # unchanged TOAST
        _tuple_data([b"1", None, None, None, None]),                # a column short
        _tuple_data([b"x1", None, None, None, None, None]),         # an int that is not one
        _tuple_data([b"1", None, None, None, None, b"\xff"]),       # not UTF-8
        _tuple_data([b"1", None, None, None, None, b"abc"])[:-1],   # truncated
        _tuple_data([b"1", None, None, None, None, None])[:-1] + b"b\x00\x00\x00\x00",  # binary
    ]
    for data in odd:
        payload = data + PAD
        assert read(payload, 0, len(data)) is None, data
    no_columns = _tuple_data([]) + PAD
    assert make_plain_record_reader((), ())(no_columns, 0, 2) == {}


def test_record_readers_are_compiled_once_per_shape() -> None:
    # Relation messages repeat (restarts, cache invalidations); the same columns reuse the reader
    decoder = PgoutputDecoder(TypeRegistry())
    run(decoder, [REL_ORDERS, BEGIN_1, INSERT_1, COMMIT_1])
    first = decoder._relations[0x4001].read_plain
    events = run(decoder, [REL_ORDERS, BEGIN_1, INSERT_1, COMMIT_1])
    assert decoder._relations[0x4001].read_plain is first
    assert [e.record for e in events if isinstance(e, RowChange)] == [{"id": 42, "note": "hello"}]
