"""Settings of the EdgeRLHF service (backend, worker, dashboard): one pydantic-settings class.

Every field can be set by an environment variable with the `EDGERLHF_` prefix (or a `.env` file),
e.g. `EDGERLHF_DATA_DIR=/srv/edgerlhf`, `EDGERLHF_BACKEND_PORT=9000`. The pipeline itself never reads
these: it gets a `PipelineConfig` and a run directory.

Why a service module lives in the ML package, deliberately: every process of the service reads these
settings (backend, worker, job process, dashboard, `edgerlhf up`), and the only package all of them
import is `edgerlhf`; in any process's own package the others would have to import it (the worker
would import `backend`, i.e. FastAPI; the dashboard talks to the backend only through its API), and
`db` takes a URL, not settings. It stays a leaf: nothing else in `edgerlhf` imports it but the `edgerlhf`
command (`edgerlhf.cli`), and importing the pipeline and its stages never loads it
(tests/test_settings.py checks that).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from edgerlhf.config import SHARED_DIR


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGERLHF_", env_file=".env", extra="ignore")

    data_dir: Path = Path("./edgerlhf-data")
    """Where the database (by default), run artifacts and logs live."""
    database_url: str | None = None
    """Any SQLAlchemy URL; default: SQLite file `<data_dir>/edgerlhf.db` (WAL mode)."""
    backend_host: str = "127.0.0.1"
    """Interface the backend binds to; 127.0.0.1 keeps it off the network."""
    backend_port: int = Field(8000, ge=1, le=65535)
    """Backend (API) port."""
    frontend_port: int = Field(8501, ge=1, le=65535)
    """Dashboard port."""
    backend_url: str | None = None
    """How the dashboard reaches the backend; default `http://<backend_host>:<backend_port>`."""
    api_token: str | None = None
    """When set, every request but `/healthz` must send `Authorization: Bearer <token>`."""
    device: str = "auto"
    """Device for training and chat: `auto` (CUDA when available), `cpu`, `cuda`, `cuda:N`."""
    allowed_roots: list[Path] = Field(default_factory=lambda: [Path(SHARED_DIR)])
    """Local model/data paths in a job must lie under one of these (or under `data_dir`); hub ids are always allowed."""
    heartbeat_seconds: float = Field(2.0, gt=0)
    """How often the worker heartbeats."""
    stall_seconds: float = Field(30.0, gt=0)
    """A running job whose heartbeat is older than this is considered stalled and requeued."""
    max_attempts: int = Field(3, ge=1)
    """A job is failed after this many attempts."""
    max_body_bytes: int = Field(1_000_000, gt=0)
    """Largest request body the backend accepts."""
    chat_max_tokens: int = Field(256, gt=0)
    """Upper bound of `max_tokens` in chat completions."""
    chat_max_prompt_tokens: int = Field(768, gt=0)
    """Upper bound of a chat prompt's length in tokens."""
    chat_cache_size: int = Field(2, ge=1)
    """How many chat models stay loaded (LRU)."""
    log_level: str = "INFO"
    """Python logging level."""

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'edgerlhf.db'}"

    @property
    def worker_alive_seconds(self) -> float:
        """A worker that heartbeated within this many seconds counts as alive (a missed beat or two is no death)."""
        return max(3 * self.heartbeat_seconds, 10.0)

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def api_url(self) -> str:
        host = "127.0.0.1" if self.backend_host in ("0.0.0.0", "::") else self.backend_host
        return self.backend_url or f"http://{host}:{self.backend_port}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
