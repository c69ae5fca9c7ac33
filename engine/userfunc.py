"""User functions (Python filters, transforms, routes): loading them and cutting them off.

A function is named ``module:function`` (imported once) or ``path/to/file.py``
(optionally ``path/to/file.py:function``); a file's function defaults to the
role's name (``filter``, ``transform``, ``route``). Files are re-read when they
change on disk, so fixing a function and retrying a parked message uses the fix.

A call that runs longer than its budget is cut off with ``FunctionTimeout``:
an interval timer (SIGALRM) raises inside the function, which interrupts pure
Python loops and sleeps alike. It is a BaseException, so the user's ``except
Exception`` does not swallow it, and the timer keeps firing until the call
ends, so neither does a loop that catches everything. Timers work in the main
thread only; elsewhere the function runs without a budget. Any timer already
armed (pytest-timeout uses one) is restored afterwards, minus the time spent.
A ``sys.exit()`` in user code fails the call instead of ending the worker.
"""

from __future__ import annotations

import importlib
import importlib.util
import signal
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from .errors import ConfigError


class FunctionTimeout(BaseException):
    """A user function ran past its time budget (not an Exception: user code must not catch it)."""


class UserFunctionError(Exception):
    """A user function raised, timed out or returned something unusable; ``detail`` holds the traceback."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail

    def describe(self) -> str:
        return f"{self}\n{self.detail}".strip()


_cache: dict[tuple[str, str], tuple[float, Callable[..., Any]]] = {}


def _split(ref: str, default: str) -> tuple[str, str, bool]:
    """(module or file, function name, is a file)."""
    target, sep, name = ref.rpartition(":")
    if not sep or not target or not name.isidentifier():
        target, name = ref, default
    return target, name, target.endswith(".py") or "/" in target


def load(ref: str, role: str) -> Callable[..., Any]:
    """The function ``ref`` names; ConfigError saying what is wrong when it cannot be loaded."""
    target, name, is_file = _split(ref, role)
    mtime = 0.0
    if is_file:
        path = Path(target)
        try:
            mtime = path.stat().st_mtime
        except OSError as e:
            raise ConfigError(f"{role} function {ref!r}: cannot read {target}: {e.strerror}") from None
    cached = _cache.get((ref, role))
    if cached is not None and cached[0] == mtime:
        return cached[1]
    try:
        if is_file:
            spec = importlib.util.spec_from_file_location(f"pgsink_user_{abs(hash((target, mtime)))}", target)
            if spec is None or spec.loader is None:
                raise ConfigError(f"{role} function {ref!r}: {target} is not a Python file")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module failed to import: say how
        raise ConfigError(f"{role} function {ref!r}: importing {target} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{role} function {ref!r}: {target} has no function {name!r} "
                          f"(define def {name}(action, record, changes, metadata))")
    _cache[(ref, role)] = (mtime, fn)
    return fn  # type: ignore[no-any-return]


REARM_SECONDS = 0.05
"""After the budget, the alarm fires again this often until the call gives up."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise FunctionTimeout()


def call(fn: Callable[..., Any], args: tuple[Any, ...], *, timeout: float, what: str) -> Any:
    """Run ``fn(*args)`` within ``timeout`` seconds; any failure becomes UserFunctionError."""
    armed = threading.current_thread() is threading.main_thread()
    previous_handler: Any = None
    previous_timer = (0.0, 0.0)
    started = time.monotonic()
    if armed:
        previous_handler = signal.signal(signal.SIGALRM, _on_alarm)
        previous_timer = signal.setitimer(signal.ITIMER_REAL, timeout, REARM_SECONDS)
    try:
        try:
            return fn(*args)
        finally:
            if armed:  # first thing: an alarm in the cleanup below would escape
                signal.setitimer(signal.ITIMER_REAL, 0)
    except FunctionTimeout:
        raise UserFunctionError(f"{what} ran longer than {timeout * 1000:.0f} ms and was cut off "
                                "(function_timeout_ms)", traceback.format_exc(limit=-8)) from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's code: report, never crash the pipeline
        raise UserFunctionError(f"{what} raised {type(e).__name__}: {e}", traceback.format_exc()) from None
    finally:
        if armed:
            signal.setitimer(signal.ITIMER_REAL, 0)  # again: never leave a timer behind our handler
            signal.signal(signal.SIGALRM, previous_handler)
            if previous_timer[0] > 0:
                left = previous_timer[0] - (time.monotonic() - started)
                signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), previous_timer[1])
