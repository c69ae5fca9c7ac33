"""The CLI runs the engine on uvloop unless told otherwise; a bad choice is a clear error."""

from __future__ import annotations

import asyncio

import pytest
import typer
import uvloop

from pgsink.cli.common import EVENT_LOOP_ENV, run


async def loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EVENT_LOOP_ENV, raising=False)
    assert run(loop_type()) is uvloop.Loop


def test_asyncio_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVENT_LOOP_ENV, "asyncio")
    assert not issubclass(run(loop_type()), uvloop.Loop)


def test_an_unknown_loop_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(EVENT_LOOP_ENV, "tokio")
    with pytest.raises(typer.Exit) as exit_info:
        run(loop_type())
    assert exit_info.value.exit_code == 1
    assert "PGSINK_EVENT_LOOP='tokio': use uvloop (the default) or asyncio." in capsys.readouterr().err
