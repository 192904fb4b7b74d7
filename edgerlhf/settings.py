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

import ipaddress
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

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
    frontend_host: str = "127.0.0.1"
    """Interface the dashboard binds to; 127.0.0.1 keeps it off the network. Anyone who reaches the dashboard can do
    what the API token allows once they type it (README: "Security")."""
    backend_port: int = Field(8000, ge=1, le=65535)
    """Backend (API) port."""
    frontend_port: int = Field(8501, ge=1, le=65535)
    """Dashboard port."""
    backend_url: str | None = None
    """How the dashboard reaches the backend; default `http://<backend_host>:<backend_port>`."""
    api_token: str | None = None
    """When set, every request but `/healthz` must send `Authorization: Bearer <token>` (the dashboard asks each
    browser session for it)."""
    trusted_hosts: list[str] = Field(default_factory=list)
    """Host names (the `Host` header, without the port) the backend answers besides the loopback names,
    `backend_host` and the host of `backend_url`, e.g. `["rlhf.example.com"]`; `["*"]`: any (only behind a proxy
    that checks it). Refusing other names stops DNS rebinding."""
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
    judge_urls: list[str] = Field(default_factory=list)
    """OpenAI-compatible endpoints (base URLs, e.g. `["http://127.0.0.1:11434/v1"]` for a local Ollama) that a job's
    judge reward may call, besides the service's own `/v1`; a job naming any other URL is refused (no request to
    a host of the job's choosing)."""
    max_body_bytes: int = Field(1_000_000, gt=0)
    """Largest request body the backend accepts (but a data set upload's: `max_upload_bytes`)."""
    max_upload_bytes: int = Field(200 * 2**20, gt=0)
    """Largest data set file the backend accepts (`POST /api/datasets`, multipart): 200 MiB by default."""
    chat_max_tokens: int = Field(256, gt=0)
    """Upper bound of `max_tokens` in chat completions."""
    chat_max_prompt_tokens: int = Field(768, gt=0)
    """Upper bound of a chat prompt's length in tokens."""
    chat_cache_size: int = Field(2, ge=1)
    """How many chat models stay loaded (LRU), and the most in memory at once (counting one a request still uses)."""
    chat_wait_seconds: float = Field(30.0, ge=0)
    """How long a chat request waits for room to load its model (every loaded one in use) before a 429."""
    chat_max_queue: int = Field(8, ge=0, le=1000)
    """Chat requests that may wait for one model while it generates for another; more answer 429 with `Retry-After`."""
    arena_max_votes: int = Field(50_000, ge=1)
    """The most arena votes stored; more are refused (409) until some are deleted."""
    arena_votes_per_minute: int = Field(60, ge=1)
    """The most arena votes accepted in any minute; more answer 429 with `Retry-After`."""
    max_download_bytes: int = Field(20 * 2**30, gt=0)
    """The largest hub download (a model or data set snapshot, the files it would fetch) a job may start."""
    log_level: str = "INFO"
    """Python logging level."""
    verbose: bool = False
    """Log what is only noise while all is well: the backend's access log (a line per request), transformers' model
    loading reports and its warnings about expected conditions (`edgerlhf up --verbose` sets it for its children)."""
    dashboard_hide_flagged: bool = True
    """The dashboard's landing views (a job's overview, its verdict's examples and samples) hide prompts flagged as
    offensive until asked to show them (HH-RLHF's red-team prompts include slurs); False shows them at once."""

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
    def datasets_dir(self) -> Path:
        """Where uploaded data sets are stored, one directory per content hash (`backend.datasets`)."""
        return self.data_dir / "datasets"

    @property
    def db_url_for_logs(self) -> str:
        """`db_url` with its password hidden (`***`), for log lines."""
        from sqlalchemy.engine import make_url  # lazily: importing the settings stays light

        try:
            return make_url(self.db_url).render_as_string(hide_password=True)
        except Exception:  # not a URL SQLAlchemy can parse: the engine will say so; never print it
            return "*** (a database URL SQLAlchemy cannot parse)"

    @property
    def allowed_hosts(self) -> frozenset[str]:
        """The `Host` names the backend answers (lower case, no port): `trusted_hosts` and the defaults."""
        hosts = {"localhost", "127.0.0.1", "::1", *(h.strip().lower().strip("[]") for h in self.trusted_hosts)}
        if not is_wildcard(self.backend_host):
            hosts.add(self.backend_host.lower().strip("[]"))
        if self.backend_url and urlsplit(self.backend_url).hostname:
            hosts.add(urlsplit(self.backend_url).hostname.lower())
        return frozenset(hosts)

    @property
    def api_url(self) -> str:
        host = "127.0.0.1" if self.backend_host in ("0.0.0.0", "::") else self.backend_host
        return self.backend_url or f"http://{host}:{self.backend_port}"

    @property
    def allowed_judge_urls(self) -> tuple[str, ...]:
        """The endpoints a job's judge may call (`ppo.rewards`, kind judge): `judge_urls` and the service's own
        OpenAI-compatible `/v1`, which serves every finished job's model."""
        return (*self.judge_urls, self.api_url.rstrip("/") + "/v1")


def is_wildcard(host: str) -> bool:
    """Whether binding `host` listens on every interface (`0.0.0.0`, `::`, empty)."""
    return host.strip("[]") in ("", "0.0.0.0", "::")


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a server on this machine (`127.0.0.1`, `::1`, `localhost`)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache
def get_settings() -> Settings:
    return Settings()
