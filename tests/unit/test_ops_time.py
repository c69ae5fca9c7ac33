"""Times given to `pgsink replay --since/--until`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pgsink.engine.errors import PgsinkError
from pgsink.engine.ops import parse_time

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("text,expected", [
    ("30m", NOW - timedelta(minutes=30)),
    ("2h", NOW - timedelta(hours=2)),
    (" 1.5d ", NOW - timedelta(days=1.5)),
    ("1w", NOW - timedelta(weeks=1)),
    ("2026-11-27T10:00:00Z", datetime(2026, 11, 27, 10, tzinfo=UTC)),
    ("2026-11-27 10:00", datetime(2026, 11, 27, 10, tzinfo=UTC)),  # no offset: UTC
    ("2026-11-27T10:00:00+02:00", datetime(2026, 11, 27, 8, tzinfo=UTC)),
])
def test_parse_time(text: str, expected: datetime) -> None:
    assert parse_time(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["soon", "5 parsecs", ""])
def test_unreadable_time_says_what_to_give(text: str) -> None:
    with pytest.raises(PgsinkError, match="ISO time .* or a duration ago"):
        parse_time(text, now=NOW)
