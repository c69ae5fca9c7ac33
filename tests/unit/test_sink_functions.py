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


def _transform(tmp_path: Path, body: str) -> SinkFunctions:
    hook = tmp_path / "t.py"
    hook.write_text("import sys, time\n\ndef transform(action, record, changes, metadata):\n" + body)
    return SinkFunctions("s", None, f"{hook}:transform", None, 0.2)


def test_a_transform_cannot_swallow_its_timeout(tmp_path: Path) -> None:
    functions = _transform(tmp_path, "    try:\n        while True:\n            pass\n"
                                     "    except Exception:\n        return 'swallowed'\n")
    prepared = functions.prepare([msg(1)], CTX, _always)
    assert prepared.error is not None and "ran longer than 200 ms" in str(prepared.error)


def test_a_transform_calling_sys_exit_fails_its_message(tmp_path: Path) -> None:
    prepared = _transform(tmp_path, "    sys.exit(3)\n").prepare([msg(1)], CTX, _always)
    assert prepared.error is not None and "SystemExit" in str(prepared.error)


def test_a_slow_batch_is_cut_once_its_functions_used_their_time(tmp_path: Path) -> None:
    """Functions run on the event loop: a long batch is cut so that leases get renewed."""
    # the user function is slow on purpose; nothing waits on it
    functions = _transform(tmp_path, "    time.sleep(0.03)\n    return record\n")  # ok-sleep
    prepared = functions.prepare([msg(i, "k" + str(i)) for i in range(1, 11)], CTX, _always, budget=0.05)
    assert prepared.error is None
    assert 2 <= len(prepared.messages) < 10 and sorted(prepared.bodies) == [m.id for m in prepared.messages]
