"""Named SQL queries, kept in ``sql/queries/*.sql`` under ``-- name: <name>`` headers.

Loaded once; code refers to them by name (``QUERIES["claim_lane"]``), so every
statement the engine runs can be read, reviewed and parsed in one place.
"""

from __future__ import annotations

import re
from importlib.resources import files
from typing import LiteralString, cast

_HEADER = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def sql_dir():  # noqa: ANN201 - a Traversable
    return files("pgsink.sql")


def parse_queries(text: str) -> dict[str, str]:
    """Split a file into {name: sql}; text before the first header is ignored."""
    parts = _HEADER.split(text)
    out: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        body = body.strip()
        if name in out:
            raise ValueError(f"query {name!r} defined twice")
        out[name] = body
    return out


def load_queries() -> dict[str, LiteralString]:
    out: dict[str, LiteralString] = {}
    qdir = sql_dir() / "queries"
    for entry in sorted(qdir.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        for name, body in parse_queries(entry.read_text()).items():
            if name in out:
                raise ValueError(f"query {name!r} defined in two files")
            out[name] = cast(LiteralString, body)
    return out


QUERIES: dict[str, LiteralString] = load_queries()
