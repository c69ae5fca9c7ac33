"""Back-off, and the pure decisions about a batch: what is sent, parked, discarded."""

from __future__ import annotations

import asyncio
import hashlib
import random
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from pgsink.engine.queue import (
    Copy,
    LaneLease,
    QueuedMessage,
    backoff_delay,
    backoff_floor,
    lane_for,
    message_lane,
    parked_outcome,
    plan_batch,
    plan_failure,
)
from pgsink.engine.render import RenderContext
from pgsink.engine.sink_functions import SinkFunctions
from pgsink.engine.sink_runner import SinkRunner, SinkSetup, _prepare


def msg(id: int, group: str | None = "g", **kw: Any) -> QueuedMessage:
    base: dict[str, Any] = dict(
        id=id, group_key=group, action="insert", commit_lsn=1, commit_idx=id, commit_timestamp="t",
        table_schema="public", table_name="t", record="{}", changes=None, transaction_annotations=None,
        backfill_id=None, record_pk=group, group_parked=False, group_blocked=False, attempts=0)
    return QueuedMessage(**{**base, **kw})


def test_delays_grow_until_the_cap_and_stay_in_their_band() -> None:
    rng = random.Random(7)
    for _ in range(200):
        delays = [backoff_delay(n, 1.0, 180.0, rng) for n in range(1, 12)]
        for n, d in enumerate(delays, start=1):
            ceiling = min(180.0, 2.0 ** (n - 1))
            assert ceiling * 2 / 3 <= d <= ceiling
            assert d >= backoff_floor(n, 1.0, 180.0)
        uncapped = delays[:8]  # 1, 2, 4, ... 128 s
        assert all(b > a for a, b in zip(uncapped, uncapped[1:], strict=False)), uncapped
        assert max(delays) <= 180.0


def test_delays_are_jittered() -> None:
    rng = random.Random(1)
    assert len({round(backoff_delay(5, 1.0, 180.0, rng), 6) for _ in range(50)}) > 40


def test_huge_failure_counts_do_not_overflow() -> None:
    assert 120.0 <= backoff_delay(10_000, 1.0, 180.0) <= 180.0
    assert backoff_delay(0, 1.0, 180.0) <= 1.0


def test_lane_for_is_stable_and_in_range() -> None:
    assert lane_for("1234", 64) == lane_for("1234", 64)
    assert all(0 <= lane_for(str(i), 7) < 7 for i in range(1000))
    assert len({lane_for(str(i), 64) for i in range(2000)}) == 64
    # the first 4 bytes of the key's MD5, big-endian, as SQL pgsink.lane_for computes it
    for key in ("public.t:1", "public.t:é,\u4e2d", ""):
        assert lane_for(key, 1000) == int(hashlib.md5(key.encode()).hexdigest()[:8], 16) % 1000
    assert message_lane(130, None, 64) == 2
    assert message_lane(130, "k", 64) == lane_for("k", 64)


def test_plan_splits_blocked_drained_and_broken() -> None:
    batch = [
        msg(1, "a"),
        msg(2, "b", group_parked=True, group_blocked=True),
        msg(3, "c", group_parked=True),             # parked group with nothing left: unparked
        msg(4, "d", record=None),                   # change pruned
        msg(5, "b", group_parked=True, group_blocked=True),
    ]
    plan = plan_batch(batch)
    assert [m.id for m in plan.deliver] == [1, 3]
    assert [m.id for m in plan.behind] == [2, 5]
    assert [m.id for m in plan.broken] == [4]
    assert plan.unpark_keys == ["c"]
    assert plan.behind_keys == ["b"]
    assert plan.last_id == 5
    assert plan.copies_on_success() == [Copy(2, "parked", 0), Copy(5, "parked", 0), Copy(4, "discarded", 0)]
    assert not plan.simple and plan_batch([msg(1), msg(2, "x")]).simple


def test_a_later_message_never_overtakes_its_blocked_group_in_a_topped_up_batch() -> None:
    # first read: 101 is blocked behind g's parked message; the batch was short, so a second read
    # added 105 after g's retrier had drained the group: 105 looks free but must wait behind 101
    batch = [msg(101, "g", group_parked=True, group_blocked=True), msg(102, "h"),
             msg(105, "g"), msg(106, "g", group_parked=True)]
    plan = plan_batch(batch)
    assert [m.id for m in plan.deliver] == [102]
    assert [m.id for m in plan.behind] == [101, 105, 106]
    assert plan.behind_keys == ["g"] and plan.unpark_keys == []


def test_failure_backs_off_then_parks_then_discards() -> None:
    plan = plan_batch([msg(1, "a"), msg(2, "a"), msg(3, None), msg(4, "z", group_parked=True, group_blocked=True)])
    kw: dict[str, Any] = dict(park_after=3, base=1.0, cap=10.0, rng=random.Random(3))
    first = plan_failure(plan, failures=1, max_retry_count=None, may_park=True, **kw)
    assert first.kind == "backoff" and 2 / 3 <= first.delay <= 1.0 and not first.copies
    park = plan_failure(plan, failures=3, max_retry_count=None, may_park=True, **kw)
    assert park.kind == "park"
    assert [(g.group_key, g.in_flight, g.attempts) for g in park.groups] == [("a", 2, 3), ("pgsink:message:3", 1, 3)]
    assert park.copies == [Copy(1, "parked", 3), Copy(2, "parked", 3), Copy(3, "parked", 3), Copy(4, "parked", 0)]
    held = plan_failure(plan, failures=3, max_retry_count=None, may_park=False, **kw)
    assert held.kind == "backoff"  # the endpoint fails for everyone: parking would only copy
    gone = plan_failure(plan, failures=2, max_retry_count=1, may_park=True, **kw)
    assert gone.kind == "discard"
    assert gone.copies[:3] == [Copy(1, "discarded", 2), Copy(2, "discarded", 2), Copy(3, "discarded", 2)]
    assert gone.copies[3] == Copy(4, "parked", 0)


def test_max_retry_count_zero_discards_on_first_failure() -> None:
    plan = plan_batch([msg(1)])
    assert plan_failure(plan, failures=1, max_retry_count=0, park_after=3, may_park=True, base=1, cap=1).kind == "discard"


@pytest.mark.parametrize(("attempts", "max_retry", "expect_moved_on", "pending"), [
    ([3, 0], None, False, 2),
    ([3, 0], 5, False, 2),
    ([3, 0], 3, True, 1),
    ([4, 4], 3, True, 0),
])
def test_parked_outcome(attempts: list[int], max_retry: int | None, expect_moved_on: bool, pending: int) -> None:
    messages = [msg(i, attempts=a) for i, a in enumerate(attempts, start=1)]
    delay, left, moved_on = parked_outcome(messages, group_attempts=3, max_retry_count=max_retry, base=1, cap=100)
    assert (moved_on, left) == (expect_moved_on, pending)
    assert (delay == 0) == expect_moved_on
    if not moved_on:
        assert backoff_floor(4, 1, 100) <= delay <= 8


def test_functions_run_only_on_what_the_batch_sends(tmp_path: Any) -> None:
    """A later message of a blocked group goes behind it (plan_batch): no transform runs on it, so
    its failure or its route cannot cut the batch of messages that are sent."""
    hook = tmp_path / "t.py"
    hook.write_text("def transform(action, record, changes, metadata):\n"
                    "    if record.get('boom'):\n"
                    "        raise ValueError('boom')\n"
                    "    return record\n")
    functions = SinkFunctions("s", None, f"{hook}:transform", None, 5.0)
    ctx = RenderContext(orjson.Fragment(b"{}"), orjson.Fragment(b"{}"), "db", True)
    setup = SinkSetup(sink=None, ctx=ctx, target=None, functions=functions)  # type: ignore[arg-type]
    batch = [msg(101, "g", group_parked=True, group_blocked=True), msg(102, "h"),
             msg(105, "g", record='{"boom": true}'), msg(106, "k")]
    prepared = asyncio.run(_prepare(setup, batch))
    assert prepared is not None and prepared.error is None
    assert [m.id for m in prepared.messages] == [101, 102, 105, 106]
    assert sorted(prepared.bodies) == [102, 106]


def test_a_batch_read_ahead_is_cut_to_the_sink_as_reloaded() -> None:
    """The next batch is read with the last ack; a reload in between may have lowered batch_size or
    turned batch off (one message per request): only that many go, the rest is read again later."""
    ctx = RenderContext(orjson.Fragment(b"{}"), orjson.Fragment(b"{}"), "db", False)
    sink = SimpleNamespace(id=None, batch_size=1, batch_timeout_ms=50, source_id=None)
    setup = SinkSetup(sink=sink, ctx=ctx, target=None)  # type: ignore[arg-type]

    async def read_ahead() -> list[QueuedMessage]:
        runner = SinkRunner(None, setup)  # type: ignore[arg-type]
        lease = LaneLease(None, 0, 0, 0, 100)  # type: ignore[arg-type]
        return await runner._read_filled(setup, lease, 1, [msg(1), msg(2), msg(3)])

    assert [m.id for m in asyncio.run(read_ahead())] == [1]
