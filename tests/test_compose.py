"""docker-compose.yml cannot run here (no Docker engine), so check what can go wrong on paper:
every service's command is a real `edgerlhf` subcommand whose code exists, and ports, volumes and URLs
agree with the settings the containers are given; the `postgres` profile's database is the one the
documented `EDGERLHF_DATABASE_URL` names, and that URL works with the driver the image installs."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from pathlib import Path
from unittest.mock import patch
from urllib.parse import urlparse

import pytest
import yaml

from sqlalchemy import text
from sqlalchemy.engine import make_url

from db import make_engine
from edgerlhf import cli
from edgerlhf.settings import Settings

from tests.support.procs import REPO_ROOT

COMPOSE_TEXT = (REPO_ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES = COMPOSE["services"]
APP_SERVICES = {name: s for name, s in SERVICES.items() if "profiles" not in s}
"""What `docker compose up` starts: the services of no profile."""
POSTGRES = SERVICES["postgres"]


def documented_url(text_: str) -> str:
    """The `EDGERLHF_DATABASE_URL=postgresql+psycopg://...@postgres...` a reader is told to set."""
    (url,) = set(re.findall(r"EDGERLHF_DATABASE_URL=(postgresql\+psycopg://\S+@postgres\S*)", text_))
    return url


def settings_of(service: dict) -> Settings:
    """The Settings a container would see: its environment only (no .env, no host variables)."""
    env = {k: v for k, v in service["environment"].items() if not str(v).startswith("${")}
    with patch.dict(os.environ, env, clear=True):
        return Settings(_env_file=None)


def test_the_three_services_exist_and_postgres_only_in_its_profile():
    assert set(APP_SERVICES) == {"backend", "worker", "frontend"}
    assert set(SERVICES) - set(APP_SERVICES) == {"postgres"} and POSTGRES["profiles"] == ["postgres"]


@pytest.mark.parametrize("name", ["backend", "worker", "frontend"])
def test_command_refers_to_an_existing_entry_point(name):
    command = SERVICES[name]["command"]
    assert command[0] == "edgerlhf"
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert 'edgerlhf = "edgerlhf.cli:main"' in pyproject
    sub = command[1]
    if sub == "frontend":
        assert cli.FRONTEND_APP.is_file()
        return
    module_name, func_name = cli.DISPATCH[sub].split(":")
    assert importlib.util.find_spec(module_name) is not None, f"{module_name} missing"
    assert callable(getattr(importlib.import_module(module_name), func_name))


def test_ports_agree_with_settings():
    backend = settings_of(SERVICES["backend"])
    published = [str(p).rsplit(":", 1)[-1] for p in SERVICES["backend"]["ports"]]
    assert str(backend.backend_port) in published
    frontend = settings_of(SERVICES["frontend"])
    assert str(frontend.frontend_port) in [str(p).rsplit(":", 1)[-1] for p in SERVICES["frontend"]["ports"]]
    # Inside the compose network the dashboard reaches the backend by service name and port.
    url = urlparse(frontend.api_url)
    assert url.hostname == "backend" and url.port == backend.backend_port
    # Containers must listen beyond their own loopback to be reachable through the published port.
    assert backend.backend_host == "0.0.0.0"
    healthcheck = " ".join(SERVICES["backend"]["healthcheck"]["test"])
    assert f":{backend.backend_port}/healthz" in healthcheck


def test_services_share_one_volume_at_the_data_dir():
    mounts = set()
    for name, service in APP_SERVICES.items():
        data_dir = settings_of(service).data_dir
        (volume,) = service["volumes"]
        source, target = volume.split(":")[:2]
        assert Path(target) == data_dir, name
        mounts.add(source)
    assert len(mounts) == 1 and mounts.pop() in COMPOSE["volumes"]


def test_worker_reserves_one_nvidia_gpu():
    (device,) = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]


def test_dockerfile_copies_every_package():
    dockerfile = (REPO_ROOT / COMPOSE["services"]["backend"]["build"]["dockerfile"]).read_text()
    for package in ("edgerlhf", "backend", "worker", "frontend", "db"):
        assert f"COPY {package} " in dockerfile


def test_without_a_database_url_the_services_keep_sqlite_in_the_data_volume():
    for name in ("backend", "worker"):
        assert SERVICES[name]["environment"]["EDGERLHF_DATABASE_URL"] == "${EDGERLHF_DATABASE_URL:-}"
        with patch.dict(os.environ, {"EDGERLHF_DATA_DIR": "/data", "EDGERLHF_DATABASE_URL": ""}, clear=True):
            assert Settings(_env_file=None).db_url == "sqlite:////data/edgerlhf.db"


def test_the_documented_database_url_names_the_postgres_service_its_user_database_and_password():
    url = make_url(documented_url(COMPOSE_TEXT))
    assert documented_url((REPO_ROOT / "README.md").read_text()) == documented_url(COMPOSE_TEXT), \
        "README and docker-compose.yml tell the same URL"
    env = POSTGRES["environment"]
    assert url.drivername == "postgresql+psycopg"
    assert url.host == "postgres" and url.port in (None, 5432)  # the service name, inside the compose network
    assert url.username == env["POSTGRES_USER"] and url.database == env["POSTGRES_DB"]
    password_var = re.fullmatch(r"\$\{(\w+):-[^}]*\}", env["POSTGRES_PASSWORD"]).group(1)
    assert f"{password_var}={url.password}" in COMPOSE_TEXT, "the comment sets the password the URL uses"
    assert any(str(p).endswith(":5432:5432") for p in POSTGRES["ports"])
    assert "pg_isready" in POSTGRES["healthcheck"]["test"]
    (volume,) = POSTGRES["volumes"]
    assert volume.split(":")[0] in COMPOSE["volumes"] and volume.endswith(":/var/lib/postgresql/data")


def test_backend_and_worker_wait_for_a_healthy_database_only_when_its_profile_is_on():
    for name in ("backend", "worker"):
        assert SERVICES[name]["depends_on"]["postgres"] == {"condition": "service_healthy", "required": False}


def test_the_image_installs_the_postgresql_driver_the_url_names():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert '"psycopg[binary]' in pyproject  # `pip install -c constraints.txt -e .` in the Dockerfile
    pins = dict(line.split("==") for line in (REPO_ROOT / "constraints.txt").read_text().split() if "==" in line)
    assert {"psycopg", "psycopg-binary"} <= set(pins)
    import psycopg

    assert psycopg.__version__ == pins["psycopg"]
    engine = make_engine(documented_url(COMPOSE_TEXT))  # the dialect and driver load; nothing connects
    assert engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
    engine.dispose()


def test_the_documented_url_reaches_a_real_postgresql(postgres):
    """The same URL shape, on the test session's PostgreSQL server: the service connects and makes its schema."""
    from db import init_db

    url = make_url(documented_url(COMPOSE_TEXT))
    local = make_url(postgres.create_database())
    engine = make_engine(str(url.set(host=local.host, port=local.port, username=local.username, password=None,
                                     database=local.database)))
    init_db(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 0
    engine.dispose()


def test_the_postgresql_password_has_no_default():
    """A published PostgreSQL (`EDGERLHF_POSTGRES_BIND=0.0.0.0`) with a password everyone can read in this file is
    open to anyone: compose passes the variable as it is (empty when unset, so the postgres image refuses to
    initialise), never a fallback. (`${VAR:?}` would do it too, but compose interpolates every service, the
    profile's too, so plain `docker compose up` on SQLite would then fail without it.)"""
    assert POSTGRES["environment"]["POSTGRES_PASSWORD"] == "${EDGERLHF_POSTGRES_PASSWORD:-}"
    assert "EDGERLHF_POSTGRES_PASSWORD" in (REPO_ROOT / "README.md").read_text()
