"""docker-compose.yml cannot run here (no Docker engine), so check what can go wrong on paper:
every service's command is a real `edgerlhf` subcommand whose code exists, and ports, volumes and URLs
agree with the settings the containers are given."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from unittest.mock import patch
from urllib.parse import urlparse

import pytest
import yaml

from edgerlhf import cli
from edgerlhf.settings import Settings

from .conftest import REPO_ROOT

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def settings_of(service: dict) -> Settings:
    """The Settings a container would see: its environment only (no .env, no host variables)."""
    env = {k: v for k, v in service["environment"].items() if not str(v).startswith("${")}
    with patch.dict(os.environ, env, clear=True):
        return Settings(_env_file=None)


def test_the_three_services_exist():
    assert set(SERVICES) == {"backend", "worker", "frontend"}


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
    for name, service in SERVICES.items():
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
