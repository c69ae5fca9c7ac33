"""sequin.yaml `initial_backfill`: parsed, and started by `config apply` when it creates the sink."""

from __future__ import annotations

import psycopg
import pytest

from pgsink.engine import config as cfg
from pgsink.engine.errors import ConfigError
from tests.integration.test_config import FIXTURE, desired, env, rows  # noqa: F401 - env is a fixture
from tests.unit.test_config_yaml import MINIMAL, error_of, parse

SINK_LINE = '    message_grouping: true\n'


def test_initial_backfill_true_takes_the_sink_tables_and_a_mapping_names_them() -> None:
    d = parse(MINIMAL.replace("    database: db\n", "    database: db\n    table: orders\n    initial_backfill: true\n"))
    assert d.sinks[0].initial_backfill == ("public.orders",)
    d = parse(MINIMAL.replace("    database: db\n", "    database: db\n    initial_backfill:\n"
                                                      "      tables: [orders, audit.events]\n"))
    assert d.sinks[0].initial_backfill == ("public.orders", "audit.events")
    assert parse(MINIMAL).sinks[0].initial_backfill == ()
    assert parse(MINIMAL.replace("    database: db\n", "    database: db\n    initial_backfill: false\n")
                 ).sinks[0].initial_backfill == ()


@pytest.mark.parametrize(("snippet", "message"), [
    ("    initial_backfill: true\n", "initial_backfill: true needs the sink's tables"),
    ("    initial_backfill: {tables: []}\n", "give the tables to backfill"),
    ("    initial_backfill: {tables: [a], sort: x}\n", "unknown key 'sort'"),
])
def test_initial_backfill_errors_name_key_and_line(snippet: str, message: str) -> None:
    msg = error_of(MINIMAL.replace("    database: db\n", "    database: db\n" + snippet))
    assert "sequin.yaml:13:" in msg or "sequin.yaml:14:" in msg
    assert message in msg


async def test_apply_starts_the_backfills_of_a_new_sink_once(
        fresh_db: str, aconn: psycopg.AsyncConnection, env: dict[str, str]) -> None:  # noqa: F811
    text = FIXTURE.replace(SINK_LINE, SINK_LINE + "    initial_backfill: true\n", 1)
    assert text != FIXTURE
    await cfg.apply_config(fresh_db, desired(text, env))
    assert sorted(await rows(aconn, "select sink, \"table\", state from pgsink.backfill_progress")) == [
        ("orders-to-webhook", "public.order_items", "pending"), ("orders-to-webhook", "public.orders", "pending")]
    # applying again (the sink exists): no new backfill, and the plan shows no change
    result = await cfg.apply_config(fresh_db, desired(text, env))
    assert result.plan.empty
    assert len(await rows(aconn, "select id from pgsink.backfills")) == 2
    with pytest.raises(ConfigError, match="initial_backfill"):
        desired(text.replace("initial_backfill: true", "initial_backfill: maybe"), env)
