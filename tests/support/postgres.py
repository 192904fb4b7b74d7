"""A throw-away PostgreSQL server for the test session: Debian's server binaries, a data directory in a temp dir.

`PostgresServer.start()` runs `initdb`, then the server itself as a child of the test process on a free
127.0.0.1 port (and a unix socket in the same temp dir), trust authentication for its one role, durability
switched off (a test database is thrown away, so `fsync` and friends only cost time). PostgreSQL refuses to
run as root, so under root the server runs as the `postgres` user that Debian's package creates (else
`nobody`), owning its temp dir. The server gets SIGTERM when the test process dies, however it dies (the
kernel's parent-death signal; `runuser` passes it on), so a killed test run leaves no server behind.
`create_database()` hands each test a database of its own (`drop_database()` after it: each is a few MB);
`stop()` ends the server and removes the dir.

`make postgres` installs the binaries with apt where they are missing; `tests/conftest.py` starts one
server per session, on first use, and skips (fails under `CI=true`) the PostgreSQL tests when none can run.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from glob import glob
from pathlib import Path

ROLE = "edgerlhf"
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "300",  # racing worker processes, each with a small pool, plus the test itself
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "log_min_messages": "warning",
}


BINDIR_ENV = "EDGERLHF_TEST_PG_BINDIR"
"""Where the server binaries are, to use others than Debian's newest (or none: the skip/fail path is tested so)."""


def find_bindir() -> Path | None:
    """`$EDGERLHF_TEST_PG_BINDIR`, else the newest `/usr/lib/postgresql/<version>/bin` (Debian's layout), else
    the directory of PATH's `initdb`; None where there is no `initdb` and `postgres`."""
    if os.environ.get(BINDIR_ENV):
        bindir = Path(os.environ[BINDIR_ENV])
        return bindir if (bindir / "initdb").is_file() and (bindir / "postgres").is_file() else None
    candidates = sorted(glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and (Path(initdb).parent / "postgres").is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be started here (the message says why)."""


class PostgresServer:
    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.root: Path | None = None
        self.port = 0
        self._names = itertools.count(1)
        self._user: str | None = None
        self._proc: subprocess.Popen | None = None

    # --- life cycle --------------------------------------------------------------------------------

    def start(self) -> PostgresServer:
        if self.bindir is None:
            where = os.environ.get(BINDIR_ENV) or "/usr/lib/postgresql/*/bin or on PATH"
            raise PostgresUnavailable(f"no PostgreSQL server binaries (initdb, postgres) in {where}; "
                                      "`make postgres` installs Debian's postgresql with apt")
        self.root = Path(tempfile.mkdtemp(prefix="edgerlhf-pg-"))
        if os.geteuid() == 0:
            self._user = next((u for u in ("postgres", "nobody") if _user_exists(u)), None)
            if self._user is None:
                raise PostgresUnavailable("running as root and neither a `postgres` nor a `nobody` user exists "
                                          "to run the server as (PostgreSQL refuses root)")
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        data, sockets = self.root / "data", self.root / "sock"
        self._run("mkdir", str(sockets))
        self._run(str(self.bindir / "initdb"), "-D", str(data), "-U", ROLE, "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync", "--no-instructions")
        for attempt in range(3):  # the free port may be taken between finding and binding it
            self.port = _free_port()
            argv = [str(self.bindir / "postgres"), "-D", str(data), "-p", str(self.port), "-k", str(sockets)]
            argv += [arg for name, value in SERVER_SETTINGS.items() for arg in ("-c", f"{name}={value}")]
            with open(self.root / "server.log", "ab") as log:
                self._proc = subprocess.Popen(self._as_user(argv), cwd=self.root, stdout=log,
                                              stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
            if self._wait_ready(timeout=60):
                return self
            if attempt == 2:
                raise PostgresUnavailable(f"the server did not start:\n{self.log()}")
        return self

    def _wait_ready(self, timeout: float) -> bool:
        import psycopg

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._proc.poll() is None:
            try:
                psycopg.connect(self._conninfo(), connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        self._kill()
        return False

    def stop(self) -> None:
        if self.root is None:
            return
        self._kill()
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def _kill(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        # Immediate shutdown: a test process may still hold connections, and nothing here needs to be kept.
        pid_file = self.root / "data" / "postmaster.pid"
        try:
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGQUIT)
        except (OSError, ValueError, IndexError):
            self._proc.terminate()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    # --- databases ---------------------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{ROLE}@127.0.0.1:{self.port}/{database}"

    def _conninfo(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={ROLE} dbname={database}"

    def create_database(self, prefix: str = "test") -> str:
        """A new, empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"{prefix}_{next(self._names)}"
        with psycopg.connect(self._conninfo(), autocommit=True) as conn:
            # FILE_COPY (PostgreSQL 15+): a plain copy of template0's files, faster than WAL_LOG for a tiny one.
            strategy = " STRATEGY FILE_COPY" if conn.info.server_version >= 150000 else ""
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0{strategy}')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database of `create_database` (FORCE: connections a test left open go with it)."""
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self._conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def log(self) -> str:
        path = None if self.root is None else self.root / "server.log"
        return path.read_text(errors="replace") if path is not None and path.exists() else ""

    # --- helpers -----------------------------------------------------------------------------------

    def _as_user(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", self._user, "--", *argv] if self._user is not None else argv

    def _run(self, *argv: str) -> None:
        argv = tuple(self._as_user(list(argv)))
        result = subprocess.run(argv, cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                timeout=120)
        if result.returncode != 0:
            raise PostgresUnavailable(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}\n{self.log()}")


def _die_with_parent() -> None:
    """In the server's process before exec: SIGTERM when the test process dies (Linux's PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
