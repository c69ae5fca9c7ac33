"""Waiting on an event with a deadline: how every stage sleeps between passes yet stops at once."""

from __future__ import annotations

import asyncio
import random


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds; True if it was set."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
        return True
    except TimeoutError:
        return False


def jittered(seconds: float) -> float:
    """``seconds`` ±20%: workers started together do not poll in step."""
    return seconds * random.uniform(0.8, 1.2)
