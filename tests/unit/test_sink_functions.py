"""Transforms see and send numbers exactly; JSON Python cannot hold fails the message, not the worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from pgsink.engine.render import RenderContext
from pgsink.engine.sink_functions import SinkFunctions, render_transformed
from tests.unit.test_backoff import msg

CTX = RenderContext(orjson.Fragment(b"{}"), orjson.Fragment(b"{}"), "db", True)
RECORD = '{"id": 123456789012345678901234567890, "x": 1e400, "price": 19.99}'


def _always(m: Any) -> bool:
    return True


def test_a_path_transform_sends_numbers_exactly() -> None:
    functions = SinkFunctions("s", "record", None, None, 5.0)
    prepared = functions.prepare([msg(1, record=RECORD)], CTX, _always)
    assert prepared.error is None
    body = render_transformed(prepared.messages, prepared.bodies, CTX)
    assert body == b'{"data":[{"id":123456789012345678901234567890,"x":1E+400,"price":19.99}]}'


def test_a_python_transform_gets_exact_values(tmp_path: Path) -> None:
    hook = tmp_path / "t.py"
    hook.write_text("def transform(action, record, changes, metadata):\n"
                    "    return {'next': record['id'] + 1, 'x': record['x'], 'kind': type(record['price']).__name__}\n")
    functions = SinkFunctions("s", None, f"{hook}:transform", None, 5.0)
    prepared = functions.prepare([msg(1, record=RECORD)], CTX, _always)
    assert prepared.error is None
    assert render_transformed(prepared.messages, prepared.bodies, CTX) == (
        b'{"data":[{"next":123456789012345678901234567891,"x":1E+400,"kind":"float"}]}')


def test_json_nested_too_deeply_fails_the_message() -> None:
    functions = SinkFunctions("s", "record", None, None, 5.0)
    prepared = functions.prepare([msg(1, record="[" * 5000 + "]" * 5000)], CTX, _always)
    assert prepared.error is not None and "nested too deeply" in str(prepared.error)
    assert [m.id for m in prepared.messages] == [1]
