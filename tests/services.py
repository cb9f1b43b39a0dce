"""PostgreSQL for the tests: a fresh database on the machine's server per test session, and a private
server (its own cluster, port and socket in a temp dir) for a test that restarts it.

The machine's server is expected at 127.0.0.1:5432 (user postgres, trust authentication; override with
QUANTBENCH_TEST_POSTGRES=postgresql://user@host:port). Where it does not answer, the tests that need it
skip with the reason; under CI (CI=true) they fail instead: a missing service must not pass as green.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVER = os.environ.get("QUANTBENCH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def missing(reason: str) -> None:
    """Skip the test, or fail it under CI."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI: {reason}")
    pytest.skip(reason)


def _admin(dsn: str):
    import psycopg

    return psycopg.connect(dsn, connect_timeout=3, autocommit=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """The URL of a new database on the machine's PostgreSQL (``quantbench_test_<hex>``), dropped at the end."""
    import psycopg

    name = f"quantbench_test_{uuid.uuid4().hex[:12]}"
    try:
        with _admin(f"{SERVER}/postgres") as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as e:
        missing(f"PostgreSQL at {SERVER} does not answer ({' '.join(str(e).split())}); it runs the shared-study tests")
    yield f"{SERVER}/{name}"
    with _admin(f"{SERVER}/postgres") as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateServer:
    """A PostgreSQL cluster of our own in ``folder`` (run as user postgres when we are root)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, _free_port()
        self.data = folder / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str) -> None:
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*as_postgres, *cmd], check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.folder / "log")
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def stop(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        """Stop (closing every client's connection) and start again: what a database restart does to workers."""
        self.stop()
        self.start()


@pytest.fixture
def private_postgres() -> Iterator[PrivateServer]:
    """A private PostgreSQL server on a free port, started; stopped and deleted at the end."""
    if not (PG_BIN / "initdb").exists():
        missing(f"no PostgreSQL 15 server binaries in {PG_BIN}; they run the database-restart test")
    folder = Path(f"/tmp/qb_pg_{uuid.uuid4().hex[:8]}")  # short: the socket path must fit 107 bytes
    server = PrivateServer(folder)
    server.init()
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
