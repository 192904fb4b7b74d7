"""The dashboard's client of the EdgeRLHF backend API (httpx): one per browser session, over one connection pool.

The dashboard talks to the backend and nothing else: every page goes through `get_client()`, which gives the
browser session its own client, carrying the API token that session typed at the login (`frontend.login`) and no
other: the dashboard never calls the backend with the server's `EDGERLHF_API_TOKEN` for a visitor, so reaching the
dashboard is not reaching the API. The sessions' clients share one connection pool (`st.cache_resource`). Errors come
back as two exceptions a page can act on: `BackendDown` (no answer at all: show the banner, keep what is
on screen) and `ApiError` (the backend answered 4xx/5xx; `field_errors` maps a config field such as
`ppo.batch_size` to its message so a form can show it next to the widget).

Paged endpoints (`/metrics`, `/samples`, `/logs`) are read with a cursor: `after` is the `cursor` of the
last page (the last row's place in its job's stream, never a global id), so a live panel only ever downloads
new rows, and misses none that another process committed late.

The client reads exactly the fields of the backend's response schemas (`backend/api/schemas.py`: a page
is `items` + `cursor` + `more`, a job list is `JobsPublic.items`) and parses a job's stage reports into
the models of `edgerlhf.reports`. A field that is missing or renamed raises (`ContractError`, or
pydantic's `ValidationError` for a report) instead of turning into an empty chart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from edgerlhf.plan import MemoryPlan
from edgerlhf.reports import JobReports

TIMEOUT = httpx.Timeout(10.0, connect=2.0)
"""Connect fails fast (the banner should show at once); reads may take a moment on a busy backend."""
EXPORT_TIMEOUT = httpx.Timeout(900.0, connect=2.0)
"""Exporting merges a whole model on the CPU, and its download is the model's size."""


FEEDBACK_FIELDS = ("id", "created_at", "model", "completion_id", "messages", "reply", "rating", "better", "sampling",
                   "author")
"""The fields of `FeedbackPublic` the Feedback page reads."""


class BackendDown(Exception):
    """The backend could not be reached (refused, timed out, DNS ...)."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"backend unreachable at {url}: {reason}")
        self.url = url
        self.reason = reason


@dataclass
class ApiError(Exception):
    """The backend answered with an error status."""

    status: int
    message: str
    field_errors: dict[str, str] = field(default_factory=dict)
    """Config field (dotted path, e.g. `ppo.batch_size`) -> message, from a 422."""
    detail: Any = None
    """The error body's `detail` as sent (the body itself when it has none): what a page reads beyond the message, e.g.
    the memory plan of a refused job (`{"field": "override_memory_plan", "message", "plan"}`)."""

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"


class ContractError(Exception):
    """The backend answered, but without a field its response schema promises (a renamed or dropped field)."""


def _field(data: Any, name: str, where: str) -> Any:
    """`data[name]`, or a `ContractError` naming the endpoint and the missing field."""
    if not isinstance(data, dict) or name not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ContractError(f"{where}: the answer has no `{name}` (got {keys})")
    return data[name]


@dataclass
class Page:
    """One page of a cursor-paged endpoint."""

    items: list[dict[str, Any]]
    cursor: int
    """Pass as `after` to get the rows after this page (unchanged when there were none)."""
    more: bool
    """The page was full: ask again at once for the rest."""


def _field_of(loc: Any) -> str:
    """A FastAPI error location (`["body", "overrides", "ppo", "steps"]`) as a config path."""
    if isinstance(loc, str):
        return loc
    parts = [str(p) for p in (loc or []) if p not in ("body", "query", "path")]
    if parts and parts[0] == "overrides":
        parts = parts[1:]
    return ".".join(parts)


def parse_error(status: int, payload: Any) -> ApiError:
    """Turn an error body into an `ApiError`, whatever shape the backend used.

    Handles FastAPI's `{"detail": [{"loc": [...], "msg": ...}]}`, a config error
    `{"detail": {"field": "ppo.steps", "message": ...}}` and a plain `{"detail": "text"}`.
    """
    detail = payload.get("detail", payload) if isinstance(payload, dict) else payload
    fields: dict[str, str] = {}
    if isinstance(detail, dict):
        if detail.get("field"):
            fields[str(detail["field"])] = str(detail.get("message") or detail.get("msg") or "")
        for err in detail.get("errors") or []:
            if isinstance(err, dict) and (err.get("field") or err.get("loc")):
                fields[str(err.get("field") or _field_of(err.get("loc")))] = str(err.get("message") or err.get("msg"))
        message = str(detail.get("message") or detail.get("msg") or detail.get("error") or detail)
    elif isinstance(detail, list):
        for err in detail:
            if isinstance(err, dict):
                name = err.get("field") or _field_of(err.get("loc"))
                fields[name or "request"] = str(err.get("message") or err.get("msg") or err)
        message = "; ".join(f"{k}: {v}" for k, v in fields.items()) or str(detail)
    else:
        message = str(detail)
    return ApiError(status, message, fields, detail)


class ApiClient:
    """Synchronous client of the backend API with one token (or none). `transport`: a connection pool shared with
    other clients (which `close` then leaves open)."""

    def __init__(self, base_url: str, token: str | None = None, timeout: httpx.Timeout = TIMEOUT,
                 transport: httpx.BaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._owns_transport = transport is None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    @property
    def http(self) -> httpx.Client:
        """The underlying httpx client (base URL and token set), for streaming endpoints such as chat."""
        return self._http

    def close(self) -> None:
        if self._owns_transport:
            self._http.close()

    # --- plumbing --------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            try:
                resp = self._http.request(method, path, **kwargs)
            except (httpx.ReadError, httpx.RemoteProtocolError):
                # A pooled connection the server closed: uvicorn drops the connection of a request that ended in a 500,
                # and the next request on it is reset. A read is asked again, once, on a fresh connection.
                if method not in ("GET", "HEAD"):
                    raise
                resp = self._http.request(method, path, **kwargs)
        except (httpx.TransportError, OSError) as exc:  # refused, reset, timed out, DNS
            raise BackendDown(self.base_url, f"{type(exc).__name__}: {exc}") from exc
        if resp.status_code >= 400:
            try:
                payload = resp.json()
            except ValueError:
                payload = resp.text or resp.reason_phrase
            raise parse_error(resp.status_code, payload)
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            return resp.text

    def _page(self, path: str, after: int, **params: Any) -> Page:
        """One page of a cursor-paged endpoint (`MetricsPage`, `SamplesPage`, `LogsPage`)."""
        params = {k: v for k, v in params.items() if v is not None}
        data = self.request("GET", path, params={"after": after, **params})
        return Page(_field(data, "items", path), _field(data, "cursor", path), _field(data, "more", path))

    # --- endpoints -------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/healthz") or {}

    def presets(self) -> dict[str, dict[str, Any]]:
        """Preset name -> `PresetPublic` (`name`, `model` (what it loads), `description`, `config`: the full configuration)."""
        return {p["name"]: p for p in self.request("GET", "/api/presets")}

    def config_fields(self) -> list[dict[str, Any]]:
        """Every leaf field of a job's configuration (`ConfigFieldPublic`): `path` (`ppo.steps`), `type`,
        `default`, `help` (the field's docstring) and `range` (`low`, `high`, `low_open`, `high_open`, or None)."""
        return self.request("GET", "/api/config/fields")

    def system(self) -> dict[str, Any]:
        """`SystemPublic`: `gpus`, `cpu`, `worker`, `workers`, `queue_length`, `jobs`."""
        return self.request("GET", "/api/system")

    def list_jobs(self, status: str | None = None, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """One page of jobs (`JobsPublic.items`: `JobSummary` objects, a job without its config), newest first."""
        params = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        return _field(self.request("GET", "/api/jobs", params=params), "items", "/api/jobs")

    def get_job(self, job_id: int) -> dict[str, Any]:
        """`JobPublic`: status, `stages` (`stage`, `status`, `progress` ...), config, error ..."""
        return self.request("GET", f"/api/jobs/{job_id}")

    def create_job(self, preset: str, overrides: dict[str, Any] | None = None, name: str | None = None,
                   min_gpu_memory_mb: int | None = None, override_memory_plan: bool = False,
                   datasets: dict[str, int] | None = None) -> dict[str, Any]:
        """`JobCreate`; `min_gpu_memory_mb`: only a worker whose GPU has that much memory runs it (None: any);
        `override_memory_plan`: queue it even if the memory plan says it does not fit (else a 409 says why);
        `datasets`: config section (`data`, `sft_data`, `prompt_data`) -> the id of the data set it reads."""
        body: dict[str, Any] = {"preset": preset, "overrides": overrides or {}}
        if name:
            body["name"] = name
        if datasets:
            body["datasets"] = datasets
        if min_gpu_memory_mb is not None:
            body["min_gpu_memory_mb"] = min_gpu_memory_mb
        if override_memory_plan:
            body["override_memory_plan"] = True
        return self.request("POST", "/api/jobs", json=body)

    def score_rewards(self, rewards: list[dict[str, Any]], samples: list[dict[str, Any]], preset: str = "tiny",
                      overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """`RewardsScored`: `samples` (`prompt`, `answer`, `reference`) scored by stated rewards as a job would."""
        return self.request("POST", "/api/rewards/score", json={"rewards": rewards, "samples": samples,
                                                                "preset": preset, "overrides": overrides or {}})

    def give_feedback(self, **fields: Any) -> dict[str, Any]:
        """`FeedbackCreate` (`model`, `messages`, `reply`, `rating` and/or `better`, `sampling`, `completion_id`):
        the stored `FeedbackPublic`."""
        return self.request("POST", "/api/feedback", json=fields)

    def list_feedback(self, model: str | None = None, rating: int | None = None, has_better: bool | None = None,
                      limit: int = 50, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """One page of feedback (`FeedbacksPublic.items`: `FeedbackPublic` objects), newest first, and how many match
        the filters (`total`): about `model`, thumbs `rating` (1 up, -1 down), with or without a better answer."""
        filters = {"model": model, "rating": rating, "has_better": has_better, "limit": limit, "offset": offset}
        data = self.request("GET", "/api/feedback", params={k: v for k, v in filters.items() if v is not None})
        items = _field(data, "items", "/api/feedback")
        for item in items:
            for name in FEEDBACK_FIELDS:
                _field(item, name, "/api/feedback")
        return items, _field(data, "total", "/api/feedback")

    def delete_feedback(self, feedback_id: int) -> None:
        """Delete one: data sets made from it before keep it (a snapshot never changes); later ones leave it out."""
        self.request("DELETE", f"/api/feedback/{feedback_id}")

    def snapshot_feedback(self, kind: str, model: str | None = None, ids: list[int] | None = None) -> dict[str, Any]:
        """The matching feedback (of `model`, or `ids`; None: all) as a data set of `kind` (`unpaired`,
        `demonstration`, `preference`): `SnapshotPublic` (a `DatasetAdded` with the `feedback_ids` it holds)."""
        body: dict[str, Any] = {"kind": kind}
        if model is not None:
            body["model"] = model
        if ids is not None:
            body["ids"] = ids
        made = self.request("POST", "/api/feedback/snapshot", json=body)
        for name in ("id", "name", "duplicate", "feedback_ids"):
            _field(made, name, "/api/feedback/snapshot")
        return made

    def plan(self, preset: str, overrides: dict[str, Any] | None = None,
             gpu_memory_mb: int | None = None) -> tuple[MemoryPlan, str]:
        """(the plan, which GPU it was checked against) from `PlanPublic`: each stage's planned peak memory
        (`edgerlhf.plan.StagePlan`), checked against `gpu_memory_mb` (None: as a new job is checked)."""
        body: dict[str, Any] = {"preset": preset, "overrides": overrides or {}}
        if gpu_memory_mb is not None:
            body["gpu_memory_mb"] = gpu_memory_mb
        data = self.request("POST", "/api/plan", json=body)
        return MemoryPlan.model_validate({k: v for k, v in data.items() if k != "gpu_source"}), \
            _field(data, "gpu_source", "/api/plan")

    def continue_job(self, job_id: int, reward_data: str = "votes", dataset: int | None = None,
                     votes_weight: float = 1.0, sft_dataset: int | None = None, algorithm: str | None = None,
                     overrides: dict[str, Any] | None = None, name: str | None = None) -> dict[str, Any]:
        """`ContinueCreate`: the next round of RLHF from a finished job, whose aligned policy it starts from; its reward
        model trains on `reward_data` (`votes`: the arena votes about the job's aligned model, `votes_weight` of the
        training pairs beside the job's data; `feedback`: the chat feedback about it; `dataset`: the data set
        `dataset`; `parent`: the job's own data). The new job (`JobPublic`, with `parent_id` and `round`)."""
        body: dict[str, Any] = {"reward_data": reward_data, "votes_weight": votes_weight,
                                "overrides": overrides or {}}
        optional = {"dataset": dataset, "sft_dataset": sft_dataset, "algorithm": algorithm, "name": name}
        body.update({k: v for k, v in optional.items() if v is not None})
        made = self.request("POST", f"/api/jobs/{job_id}/continue", json=body)
        for key in ("id", "parent_id", "round"):
            _field(made, key, f"/api/jobs/{job_id}/continue")
        return made

    def rounds(self, job_id: int) -> list[dict[str, Any]]:
        """The chain of rounds the job belongs to (`RoundsPublic.items`: `JobSummary` objects with `round` and
        `parent_id`, by round then id): the jobs it continues back to round 1, itself, the jobs continued from it."""
        items = _field(self.request("GET", f"/api/jobs/{job_id}/rounds"), "items", f"/api/jobs/{job_id}/rounds")
        for item in items:
            for key in ("id", "name", "status", "round", "parent_id"):
                _field(item, key, f"/api/jobs/{job_id}/rounds")
        return items

    def cancel_job(self, job_id: int) -> dict[str, Any]:
        return self.request("POST", f"/api/jobs/{job_id}/cancel")

    def retry_job(self, job_id: int) -> dict[str, Any]:
        return self.request("POST", f"/api/jobs/{job_id}/retry")

    def delete_job(self, job_id: int) -> None:
        self.request("DELETE", f"/api/jobs/{job_id}")

    def export_job(self, job_id: int, fmt: str = "hf", quant: str = "q8_0") -> dict[str, Any]:
        """Merge the job's PPO policy into one model directory, or one GGUF file with an Ollama Modelfile
        (`fmt="gguf"`, `quant` f16 or q8_0): `ExportPublic` (`path`, `files`, `bytes`, `download`); merging a model
        of a few GB takes a minute."""
        return self.request("POST", f"/api/jobs/{job_id}/export", params={"format": fmt, "quant": quant},
                            timeout=EXPORT_TIMEOUT)

    def export_estimate(self, job_id: int, fmt: str = "hf", quant: str = "q8_0") -> dict[str, Any]:
        """Roughly how much disk and memory that export needs (`ExportEstimatePublic`: `parameters`, `disk_bytes`,
        `ram_bytes`): an estimate from the weights' count."""
        return self.request("GET", f"/api/jobs/{job_id}/export/estimate", params={"format": fmt, "quant": quant})

    def export_tar(self, job_id: int, fmt: str = "hf", quant: str = "q8_0") -> bytes:
        """The exported directory as a .tar (after `export_job` with the same format and quant)."""
        resp = self._http.get(f"/api/jobs/{job_id}/export.tar", params={"format": fmt, "quant": quant},
                              timeout=EXPORT_TIMEOUT)
        if resp.status_code >= 400:
            raise parse_error(resp.status_code, resp.json())
        return resp.content

    def metrics(self, job_id: int, after: int = 0, keys: list[str] | None = None, limit: int | None = None) -> Page:
        return self._page(f"/api/jobs/{job_id}/metrics", after,
                          keys=",".join(keys) if keys else None, limit=limit)

    def samples(self, job_id: int, after: int = 0, kind: str | None = None, limit: int | None = None) -> Page:
        return self._page(f"/api/jobs/{job_id}/samples", after, kind=kind, limit=limit)

    def logs(self, job_id: int, after: int = 0, limit: int | None = None) -> Page:
        return self._page(f"/api/jobs/{job_id}/logs", after, limit=limit)

    def artifacts(self, job_id: int) -> list[dict[str, Any]]:
        return self.request("GET", f"/api/jobs/{job_id}/artifacts")

    def report(self, job_id: int) -> JobReports:
        """The reports of the job's finished stages, parsed into `edgerlhf.reports.JobReports`.

        Raises pydantic's `ValidationError` when a field is renamed, missing or unknown.
        """
        return JobReports.model_validate(self.request("GET", f"/api/jobs/{job_id}/report"))


TOKEN_KEY = "api_token"
"""Session-state key of the API token this browser session typed at the login (absent: none typed)."""
CLIENT_KEY = "api_client"
"""Session-state key of this browser session's `ApiClient`."""


def _shared_transport() -> httpx.HTTPTransport:
    return httpx.HTTPTransport()


try:  # `st.cache_resource` shares one connection pool between all browser sessions (the tokens stay per session).
    import streamlit as st

    _shared_transport = st.cache_resource(show_spinner=False)(_shared_transport)
except ImportError:  # pragma: no cover - the client also works outside Streamlit
    pass


def get_client() -> ApiClient:
    """This browser session's client of the backend named by the settings (`EDGERLHF_BACKEND_URL`), with the token
    the session typed at the login (`TOKEN_KEY`), never one from the server's environment."""
    import streamlit as st

    from edgerlhf.settings import get_settings

    url, token = get_settings().api_url.rstrip("/"), st.session_state.get(TOKEN_KEY) or None
    client = st.session_state.get(CLIENT_KEY)
    if not isinstance(client, ApiClient) or (client.base_url, client.token) != (url, token):
        client = ApiClient(url, token, transport=_shared_transport())
        st.session_state[CLIENT_KEY] = client
    return client
