"""The worker supervisor's signal forwarding: it must never reap a child behind the wait loop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from pgsink.cli.worker_cmd import signal_children
from tests.helpers import wait_for


async def test_signalling_an_exited_child_leaves_it_for_the_wait_loop() -> None:
    """A child that exited but is not reaped yet is signalled without being reaped: the
    supervisor's ``os.wait()`` still gets it (with ``Popen.poll()`` in the handler, it raised
    "No child processes" when every child had exited that way)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])

    async def a_zombie() -> bool:
        return Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"

    await wait_for(a_zombie, timeout=30, interval=0.01, what="the child to exit")
    signal_children([child], signal.SIGTERM)
    pid, status = os.waitpid(child.pid, 0)
    assert pid == child.pid
    assert os.waitstatus_to_exitcode(status) == 0
    child.returncode = 0  # reaped here: keep Popen from waiting on it again


def test_signalling_a_child_reaped_but_not_yet_popped_does_not_raise() -> None:
    """A signal between the loop's ``os.wait()`` and its pop of that child: the pid is gone
    (ProcessLookupError), which must not stop the others being signalled."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitpid(gone.pid, 0)
    gone.returncode = 0
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # ok-sleep: a child to signal
    try:
        signal_children([gone, alive], signal.SIGTERM)
        assert alive.wait(timeout=30) == -signal.SIGTERM
    finally:
        if alive.poll() is None:
            alive.kill()
            alive.wait()
