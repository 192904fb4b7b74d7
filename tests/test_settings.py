"""Service settings: one prefix, safe defaults, any SQLAlchemy URL."""

from edgerlhf.settings import Settings


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
