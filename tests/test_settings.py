"""Service settings: one prefix, safe defaults, any SQLAlchemy URL; a service module the pipeline never loads."""

import subprocess
import sys

from edgerlhf.pipeline import STAGE_MODULES
from edgerlhf.settings import Settings

from tests.support.procs import REPO_ROOT


def test_defaults_are_local_and_safe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Settings(_env_file=None)
    assert s.backend_host == "127.0.0.1"
    assert s.db_url == f"sqlite:///{tmp_path / 'edgerlhf-data' / 'edgerlhf.db'}"
    assert s.api_url == "http://127.0.0.1:8000"
    assert s.api_token is None


def test_environment_variables_use_one_prefix(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGERLHF_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("EDGERLHF_BACKEND_PORT", "9123")
    monkeypatch.setenv("EDGERLHF_DATABASE_URL", "postgresql+psycopg://u@db/edgerlhf")
    monkeypatch.setenv("EDGERLHF_API_TOKEN", "s3cret")
    s = Settings(_env_file=None)
    assert s.data_dir == tmp_path / "d"
    assert s.backend_port == 9123 and s.api_url.endswith(":9123")
    assert s.db_url == "postgresql+psycopg://u@db/edgerlhf"
    assert s.api_token == "s3cret"
    assert s.runs_dir == tmp_path / "d" / "runs"


def test_the_ml_library_and_the_command_load_no_service_code():
    """`edgerlhf.settings` and `edgerlhf.cli` are service modules kept in the ML package (their docstrings say
    why); they stay leaves: the pipeline and its stages never load the settings, and the command's module
    loads a service package only when its subcommand runs."""
    code = (
        "import importlib, sys\n"
        f"for name in {['edgerlhf.cli', 'edgerlhf.pipeline', *STAGE_MODULES.values()]!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'edgerlhf.settings' or m.split('.')[0] in\n"
        "             ('backend', 'worker', 'db', 'frontend', 'fastapi', 'sqlalchemy', 'streamlit', 'pydantic_settings')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
