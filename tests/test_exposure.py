"""What the service exposes besides its API (issue 28): the dashboard binds its own interface, 127.0.0.1 unless told
otherwise, with a loud warning beyond it (finding 1); the backend's trusted Host names (finding 8); and the
PostgreSQL password never reaches a log, neither `edgerlhf up`'s nor a worker's (finding 14)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import yaml
from sqlalchemy.engine import make_url

from edgerlhf import cli
from edgerlhf.settings import Settings

from tests.support.procs import REPO_ROOT, free_port

PASSWORD = "hunter2-never-logged"


def settings(**values) -> Settings:
    return Settings(_env_file=None, **values)


def test_the_dashboard_binds_its_own_interface_loopback_by_default():
    # A backend opened to the network does not open the dashboard with it.
    s = settings(backend_host="0.0.0.0", api_token="t")
    command = cli.frontend_command(s)
    assert command[command.index("--server.address") + 1] == "127.0.0.1"
    assert cli.dashboard_exposure(s) is None
    exposed = settings(frontend_host="0.0.0.0", frontend_port=9999)
    command = cli.frontend_command(exposed)
    assert command[command.index("--server.address") + 1] == "0.0.0.0"
    warning = cli.dashboard_exposure(exposed)
    assert "0.0.0.0:9999" in warning and "ANYONE WHO REACHES IT" in warning and "TLS" in warning
    assert "must type the API token" in cli.dashboard_exposure(settings(frontend_host="10.0.0.5", api_token="t"))
    for loopback in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert cli.dashboard_exposure(settings(frontend_host=loopback)) is None, loopback


def test_edgerlhf_frontend_warns_when_the_dashboard_leaves_this_machine(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGERLHF_")}
    env.update({"EDGERLHF_DATA_DIR": str(tmp_path), "EDGERLHF_FRONTEND_HOST": "0.0.0.0",
                "EDGERLHF_FRONTEND_PORT": str(free_port())})
    # `--version` makes streamlit print and exit: the warning comes first, from `edgerlhf frontend` itself.
    done = subprocess.run([sys.executable, "-m", "edgerlhf.cli", "frontend", "--version"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert "WARNING: the dashboard listens on 0.0.0.0" in done.stderr, done.stderr


def test_in_compose_the_dashboard_listens_in_its_container_published_on_the_hosts_loopback():
    frontend = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]["frontend"]
    assert frontend["environment"]["EDGERLHF_FRONTEND_HOST"] == "0.0.0.0"
    assert all(str(p).startswith("127.0.0.1:") for p in frontend["ports"])


def test_the_backend_answers_loopback_names_its_own_host_and_the_trusted_ones():
    assert settings().allowed_hosts == {"localhost", "127.0.0.1", "::1"}
    assert settings(backend_host="0.0.0.0").allowed_hosts == {"localhost", "127.0.0.1", "::1"}
    assert "192.168.1.20" in settings(backend_host="192.168.1.20").allowed_hosts
    assert "backend" in settings(backend_url="http://backend:8000").allowed_hosts  # compose: the dashboard's URL
    assert {"rlhf.example.com", "::2"} <= settings(trusted_hosts=["RLHF.example.com", "[::2]"]).allowed_hosts


def url_with_password(port: int | None = None, base: str | None = None) -> str:
    url = make_url(base) if base else make_url(f"postgresql+psycopg://edgerlhf@127.0.0.1:{port}/edgerlhf")
    return url.set(password=PASSWORD).render_as_string(hide_password=False)


def test_settings_hide_the_password_of_the_database_url():
    assert settings(database_url=url_with_password(5432)).db_url_for_logs == \
        "postgresql+psycopg://edgerlhf:***@127.0.0.1:5432/edgerlhf"
    assert PASSWORD not in settings(database_url=f"not a url {PASSWORD}").db_url_for_logs


def test_up_logs_the_database_url_without_its_password(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGERLHF_") or k == "EDGERLHF_SHARED_DIR"}
    env.update({"EDGERLHF_DATA_DIR": str(tmp_path / "data"), "EDGERLHF_BACKEND_PORT": str(free_port()),
                "EDGERLHF_FRONTEND_PORT": str(free_port()), "PYTHONUNBUFFERED": "1",
                # Nothing listens there: the backend fails to start and `up` stops; its banner is written by then.
                "EDGERLHF_DATABASE_URL": url_with_password(free_port())})
    done = subprocess.run([sys.executable, "-m", "edgerlhf.cli", "up", "--no-worker"], cwd=REPO_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180)
    assert done.returncode != 0, done.stdout
    assert "database:       postgresql+psycopg://edgerlhf:***@127.0.0.1:" in done.stdout, done.stdout
    assert PASSWORD not in done.stdout


def test_a_worker_logs_the_database_url_without_its_password(tmp_path, postgres, caplog):
    from worker.main import Worker

    url = url_with_password(base=postgres.create_database())  # trust authentication: any password connects
    try:
        worker = Worker(settings(data_dir=tmp_path / "data", database_url=url), worker_id="w1", poll_interval=0.05)
        with caplog.at_level(logging.INFO, logger="edgerlhf.worker"):
            worker.run(once=True)
        worker.engine.dispose()
        started = [r.getMessage() for r in caplog.records if "started on" in r.getMessage()]
        assert started and "edgerlhf:***@127.0.0.1" in started[0], started
        assert PASSWORD not in caplog.text
    finally:
        postgres.drop_database(url)


@pytest.fixture(autouse=True)
def _settings_of_these_tests_only(monkeypatch):
    """No EDGERLHF_* setting of the developer's shell (but the shared directory's), no cached settings."""
    from edgerlhf.settings import get_settings

    for key in [k for k in os.environ if k.startswith("EDGERLHF_") and k != "EDGERLHF_SHARED_DIR"]:
        monkeypatch.delenv(key)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
