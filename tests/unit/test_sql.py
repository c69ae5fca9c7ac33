"""Every SQL file parses with pglast; every named query is used by the engine."""

from __future__ import annotations

import re
from pathlib import Path

import pglast
import pytest

from pgsink.engine.queries import QUERIES, parse_queries

ROOT = Path(__file__).parents[2]
SQL_FILES = sorted((ROOT / "sql").rglob("*.sql"))


def _parseable(query: str) -> str:
    """psycopg placeholders become positional parameters, which pglast understands."""
    n = 0

    def number(_: re.Match[str]) -> str:
        nonlocal n
        n += 1
        return f"${n}"

    return re.sub(r"%(?:\(\w+\))?s", number, query.replace("%%", "%"))


@pytest.mark.parametrize("path", SQL_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_sql_file_parses(path: Path) -> None:
    text = path.read_text()
    if "queries" in path.parts:
        for name, query in parse_queries(text).items():
            try:
                pglast.parse_sql(_parseable(query))
            except pglast.parser.ParseError as e:
                pytest.fail(f"{path.name}: query {name!r} does not parse: {e}")
    else:
        pglast.parse_sql(text)


def test_every_named_query_is_used() -> None:
    code = "\n".join(p.read_text() for p in [*(ROOT / "engine").rglob("*.py"), *(ROOT / "cli").rglob("*.py")])
    unused = [name for name in QUERIES if f'"{name}"' not in code and f"'{name}'" not in code]
    assert not unused, f"named queries nobody runs: {unused}"
