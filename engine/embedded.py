"""A throwaway Postgres cluster for tests, the demo and benchmarks.

Started from the local server binaries with ``wal_level=logical``, listening on
a free port on 127.0.0.1, its socket and data inside a temporary directory.
Postgres refuses to run as root, so when we are root the cluster is owned by
and run as the ``postgres`` OS user (through ``runuser``).

A small watchdog process outlives us: if the parent dies, even by ``kill -9``,
it stops the cluster and removes the directory, so no orphaned server is left.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PgsinkError

SERVER_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "64",
    "max_wal_senders": "64",
    "max_connections": "300",
    "listen_addresses": "127.0.0.1",
    # logical decoding only sees flushed WAL: keep commits synchronous
    "synchronous_commit": "on",
    "shared_buffers": "256MB",
    "max_wal_size": "4GB",
    "log_min_messages": "warning",
    "logging_collector": "off",
}

# Durability does not matter for a test cluster; speed does.
TEST_SETTINGS = {"fsync": "off", "full_page_writes": "off"}

INSTALL_HINT = (
    "No PostgreSQL server binaries found. Install them (Debian/Ubuntu: "
    "`apt-get install postgresql`), set PGSINK_PG_BINDIR to the folder holding "
    "`postgres` and `initdb`, or point the tests at a server with "
    "PGSINK_TEST_DSN=postgresql://... (it needs wal_level=logical)."
)

WATCHDOG = r"""
import os, shutil, subprocess, sys, time
parent, pg_ctl, datadir, topdir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
prefix = sys.argv[5:]
while True:
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        break
    if not os.path.isdir(datadir):
        sys.exit(0)
    time.sleep(0.5)
subprocess.run(prefix + [pg_ctl, "stop", "-D", datadir, "-m", "immediate", "-w"],
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
shutil.rmtree(topdir, ignore_errors=True)
"""


def find_bindir() -> Path:
    """Where `postgres`, `initdb` and `pg_ctl` live, or a clear error."""
    candidates: list[str] = []
    if os.environ.get("PGSINK_PG_BINDIR"):
        candidates.append(os.environ["PGSINK_PG_BINDIR"])
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
            candidates.append(out.stdout.strip())
        except (subprocess.CalledProcessError, OSError):
            pass  # fall through to the well-known locations
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    for c in candidates:
        if (Path(c) / "postgres").exists() and (Path(c) / "initdb").exists():
            return Path(c)
    raise PgsinkError(INSTALL_HINT)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EmbeddedPostgres:
    """A private Postgres cluster; use as a context manager or call start()/stop()."""

    for_tests: bool = True
    settings: dict[str, str] = field(default_factory=dict)
    port: int = 0
    topdir: Path | None = None
    _bindir: Path | None = None
    _prefix: list[str] = field(default_factory=list)
    _watchdog: subprocess.Popen[bytes] | None = None

    @property
    def datadir(self) -> Path:
        assert self.topdir is not None
        return self.topdir / "data"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> EmbeddedPostgres:
        self._bindir = find_bindir()
        self.topdir = Path(tempfile.mkdtemp(prefix="pgsink-pg-"))
        if os.geteuid() == 0:
            # Postgres refuses to run as root: hand the directory to `postgres`.
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError as e:
                raise PgsinkError(
                    "Running as root, but there is no `postgres` OS user to run the "
                    "embedded server as. Create one (`useradd -r postgres`) or run as "
                    "a normal user."
                ) from e
            os.chown(self.topdir, pw.pw_uid, pw.pw_gid)
            os.chmod(self.topdir, 0o700)
            self._prefix = ["runuser", "-u", "postgres", "--"]
        sock = self.topdir / "sock"
        self._run("initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        self._run_as_owner(["mkdir", "-p", str(sock)])
        settings = {**SERVER_SETTINGS, **(TEST_SETTINGS if self.for_tests else {}), **self.settings}
        settings["unix_socket_directories"] = str(sock)
        self._start_watchdog()
        atexit.register(self.stop)
        last_error = ""
        for _ in range(5):  # the free port may be taken between probe and bind
            self.port = free_port()
            settings["port"] = str(self.port)
            opts = " ".join(f"-c {k}={v}" for k, v in settings.items())
            res = subprocess.run(
                self._prefix + [str(self._bindir / "pg_ctl"), "start", "-D", str(self.datadir),
                                "-w", "-t", "60", "-l", str(self.topdir / "server.log"), "-o", opts],
                capture_output=True, text=True,
            )
            if res.returncode == 0:
                return self
            last_error = res.stderr + self._log_tail()
        raise PgsinkError(f"Embedded Postgres did not start: {last_error.strip()}")

    def stop(self) -> None:
        if self.topdir is None or not self.topdir.exists():
            return
        if self._bindir is not None and (self.datadir / "postmaster.pid").exists():
            subprocess.run(
                self._prefix + [str(self._bindir / "pg_ctl"), "stop", "-D", str(self.datadir),
                                "-m", "fast", "-w", "-t", "30"],
                capture_output=True,
            )
        shutil.rmtree(self.topdir, ignore_errors=True)
        if self._watchdog is not None:
            self._watchdog.terminate()
            self._watchdog.wait()
            self._watchdog = None

    def restart(self) -> None:
        """Restart the server on the same port (used to test reconnects)."""
        assert self._bindir is not None
        assert self.topdir is not None
        self._run("pg_ctl", "restart", "-D", str(self.datadir), "-m", "fast", "-w", "-t", "60",
                  "-l", str(self.topdir / "server.log"))

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- helpers

    def _run(self, tool: str, *args: str) -> None:
        assert self._bindir is not None
        res = subprocess.run(self._prefix + [str(self._bindir / tool), *args],
                             capture_output=True, text=True, cwd=self.topdir)
        if res.returncode != 0:
            raise PgsinkError(f"{tool} failed: {res.stderr.strip() or res.stdout.strip()}")

    def _run_as_owner(self, argv: list[str]) -> None:
        subprocess.run(self._prefix + argv, check=True, cwd=self.topdir)

    def _log_tail(self) -> str:
        log = self.topdir / "server.log" if self.topdir else None
        if log and log.exists():
            return "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-10:])
        return ""

    def _start_watchdog(self) -> None:
        assert self._bindir is not None and self.topdir is not None
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", WATCHDOG, str(os.getpid()), str(self._bindir / "pg_ctl"),
             str(self.datadir), str(self.topdir), *self._prefix],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )


def wait_until_ready(dsn: str, timeout: float = 30.0) -> None:
    """Block until a server accepts connections (used after restarts)."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(dsn, connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
