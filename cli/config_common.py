"""Shared plumbing of the config commands (source, endpoint, sink, config): running, output, flags."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Coroutine
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from pgsink.engine import config as cfg
from pgsink.engine.errors import PgsinkError
from pgsink.engine.model import Config

from .common import console, dsn, err_console, run

T = TypeVar("T")

async def escaped(coro: Coroutine[Any, Any, T]) -> T:
    """Escape rich markup in error text: messages quote user values such as '[x]'."""
    try:
        return await coro
    except PgsinkError as e:
        raise type(e)(escape(str(e))) from None


def run_config(coro: Coroutine[Any, Any, T]) -> T:
    return run(escaped(coro))


_wide_console: Console | None = None


def out_console() -> Console:
    """stdout; when piped, a wide console so names in tables are never cut or wrapped."""
    global _wide_console
    if console.is_terminal:
        return console
    if _wide_console is None:
        _wide_console = Console(width=max(console.width, 200))
    return _wide_console


def print_out(renderable: Any) -> None:
    out_console().print(renderable, highlight=False, soft_wrap=not isinstance(renderable, Table))


def warn(lines: list[str]) -> None:
    for line in lines:
        err_console.print(Text(f"warning: {line}", style="yellow"), highlight=False, soft_wrap=True)


def pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {key!r}=...", param_hint=flag)
        out[key.strip()] = value
    return out


def env_pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    """KEY=ENV_VAR -> KEY=value of ENV_VAR: keeps secrets out of shell history and `ps`."""
    out: dict[str, str] = {}
    for key, var in pairs(values, flag).items():
        if var not in os.environ:
            raise typer.BadParameter(f"environment variable {var} is not set", param_hint=flag)
        out[key] = os.environ[var]
    return out


def new_table(*columns: str, title: str | None = None) -> Table:
    t = Table(title=title, title_justify="left", show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    return t


def kv_table(title: str, rows: list[tuple[str, str]]) -> Table:
    t = Table(title=title, title_justify="left", show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    for k, v in rows:
        t.add_row(k, Text(v))
    return t


def join_list(values: tuple[str, ...] | list[str] | None, empty: str = "-") -> str:
    return ", ".join(values) if values else empty


def load_config(database_url: str | None) -> Config:
    return run_config(cfg.read_config(dsn(database_url)))


def default_object_name(prefix: str, name: str) -> str:
    return (prefix + re.sub(r"[^a-z0-9_]", "_", name.lower()))[:63]

def run_quiet(coro: Coroutine[Any, Any, T]) -> T:
    """Run without common.run's exit-on-error: the caller turns errors into warnings."""
    return asyncio.run(coro)
