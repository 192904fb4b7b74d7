"""The test session's PostgreSQL server (`tests/support/postgres.py`): it runs (as an unprivileged user under root),
and where none can run, the PostgreSQL half of the tests says why and is skipped, or fails under `CI=true`."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg

from tests.support.procs import REPO_ROOT
from tests.support.postgres import BINDIR_ENV

A_DB_TEST = "tests/db/test_queue.py::test_claim_takes_oldest_first_and_returns_none_when_empty"


def test_the_session_server_runs_unprivileged_and_hands_out_fresh_databases(postgres):
    first, second = postgres.create_database(), postgres.create_database()
    assert first != second
    with psycopg.connect(first.replace("postgresql+psycopg", "postgresql")) as conn:
        owner = conn.execute("SELECT pg_catalog.pg_get_userbyid(datdba) FROM pg_database "
                             "WHERE datname = current_database()").fetchone()[0]
        assert owner == "edgerlhf"
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0] == 0
        assert conn.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
    pid = int((postgres.root / "data" / "postmaster.pid").read_text().split()[0])
    assert os.stat(f"/proc/{pid}").st_uid != 0, "PostgreSQL never runs as root"
    postgres.drop_database(second)


def _run_without_binaries(ci: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update({BINDIR_ENV: "/nonexistent/postgresql/bin", "CI": ci})
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rsE", A_DB_TEST],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_without_a_server_the_postgresql_tests_are_skipped_and_say_why():
    run = _run_without_binaries(ci="")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed, 1 skipped" in run.stdout, run.stdout
    assert "no PostgreSQL server binaries (initdb, postgres) in /nonexistent/postgresql/bin" in run.stdout
    assert "make postgres" in run.stdout


def test_without_a_server_the_postgresql_tests_fail_under_ci():
    run = _run_without_binaries(ci="true")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 passed, 1 error" in run.stdout, run.stdout
    assert "no PostgreSQL server binaries (initdb, postgres) in /nonexistent/postgresql/bin" in run.stdout
