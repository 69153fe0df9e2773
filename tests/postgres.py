"""A real PostgreSQL cluster for the tests, in a temporary directory on a free port, started and removed by the test
run itself (Debian's `postgresql` package; `./dev test` installs it when it runs as root and it is missing).

PostgreSQL refuses to run as root: as root the cluster belongs to the `postgres` user the package creates and runs
as that user (``runuser``); as anyone else it runs as that user. It listens on 127.0.0.1 only, with trust
authentication for the superuser ``llorch`` (a test cluster no one else can reach).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from itertools import count
from pathlib import Path

START_TIMEOUT_S = 60
_databases = count(1)


def binaries() -> Path | None:
    """The directory of PostgreSQL's server binaries (initdb, pg_ctl), newest version first."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]),
                            reverse=True):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


def unavailable_reason() -> str | None:
    if binaries() is None:
        return ("PostgreSQL's server binaries (initdb, pg_ctl) are not installed: `./dev test` installs Debian's "
                "postgresql package when it runs as root")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg package is not installed (`pip install -e .` installs it)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no `postgres` user to run PostgreSQL as (it refuses root)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresCluster:
    """``with PostgresCluster() as cluster:`` a running cluster; ``cluster.new_database()`` a fresh, empty database's
    URL (``postgresql://llorch@127.0.0.1:PORT/NAME``)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="llorch-pg-"))
        self.data, self.sockets = self.root / "data", self.root / "run"
        self.bin = binaries()

    def _as_owner(self, *argv: str) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run(prefix + list(argv), capture_output=True, text=True, timeout=START_TIMEOUT_S)

    def __enter__(self) -> "PostgresCluster":
        self.sockets.mkdir()
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in (self.root, self.sockets):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        done = self._as_owner(str(self.bin / "initdb"), "-D", str(self.data), "-U", "llorch", "--auth=trust",
                              "--encoding=UTF8", "--no-sync")
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr[-2000:]}")
        options = (f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
                   f"-c max_connections=60")
        done = self._as_owner(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l",
                              str(self.root / "server.log"), "-w", "-t", str(START_TIMEOUT_S), "start")
        if done.returncode != 0:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stderr[-1000:]} {log[-2000:]}")
        return self

    def __exit__(self, *exc_info) -> None:
        self._as_owner(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://llorch@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        import psycopg
        name = f"t{os.getpid()}_{next(_databases)}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
