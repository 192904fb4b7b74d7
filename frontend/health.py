"""Which part of the service is down, in one line of the sidebar: the backend, its database, or every worker.

`edgerlhf up` restarts a child that dies, but while one is down the dashboard says which: the backend (no answer at
all; the page's banner says so too, `frontend.ui.backend_down`), its database (`GET /healthz` answers 503 and names
the problem), or the workers (the backend answers, but no worker heartbeats: queued jobs wait). From `GET /healthz`
and `GET /api/system`'s `workers` and `queue_length`, refreshed every `REFRESH_SECONDS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from frontend.api_client import ApiClient, ApiError, BackendDown, get_client

REFRESH_SECONDS = 15
"""How often the sidebar's line asks again (two small requests)."""
UP, DOWN = "✓", "✗"


@dataclass(frozen=True)
class ServiceStatus:
    """What the dashboard knows of each part of the service."""

    backend: bool
    """The backend answered (any status)."""
    database: str | None
    """`ok`, or what `/healthz` says of the database (`unreachable`, `not answering`); None: not known."""
    workers_alive: int | None
    """Workers heartbeating now; None: not known (the backend or its database is down, or it refused to say)."""
    queued: int = 0
    """Jobs waiting for a worker."""

    @property
    def ok(self) -> bool:
        return self.backend and self.database == "ok" and bool(self.workers_alive)


def check(client: ApiClient) -> ServiceStatus:
    """Ask the backend how it, its database and its workers are."""
    try:
        health = client.health()
    except BackendDown:
        return ServiceStatus(backend=False, database=None, workers_alive=None)
    except ApiError as exc:  # 503: `{"status": "error", "database": "unreachable"}`
        said = exc.detail.get("database") if isinstance(exc.detail, dict) else None
        return ServiceStatus(backend=True, database=str(said or f"error {exc.status}"), workers_alive=None)
    try:
        system = client.system()
    except BackendDown:
        return ServiceStatus(backend=False, database=None, workers_alive=None)
    except ApiError as exc:  # 500: the database failed between the two requests; 401: the login comes first
        return ServiceStatus(backend=True, database=None if exc.status < 500 else f"error {exc.status}",
                             workers_alive=None)
    return ServiceStatus(backend=True, database=str(health.get("database", "ok")),
                         workers_alive=sum(bool(w["alive"]) for w in system["workers"]),
                         queued=system["queue_length"])


def status_line(status: ServiceStatus) -> str:
    """`backend ✓ · database ✓ · worker ✗ (none alive: …)`: each part, and for one that is down what follows and
    what to start."""
    if not status.backend:
        return f"backend {DOWN} (unreachable: start `edgerlhf backend`, or `edgerlhf up`)"
    parts = [f"backend {UP}"]
    if status.database == "ok":
        parts.append(f"database {UP}")
    elif status.database is not None:
        parts.append(f"database {DOWN} ({status.database}: see the backend's log)")
    if status.workers_alive is None:
        parts.append("worker ?")
    elif status.workers_alive == 0:
        waiting = f"{status.queued} queued job(s) wait" if status.queued else "a new job would wait"
        parts.append(f"worker {DOWN} (none alive, {waiting}: start `edgerlhf worker`)")
    else:
        parts.append(f"worker {UP}" + (f" ({status.workers_alive} alive)" if status.workers_alive > 1 else ""))
    return " · ".join(parts)


@st.fragment(run_every=REFRESH_SECONDS)
def sidebar_status() -> None:
    """The line, in a container keyed `service-status`: a caption while every part is up, a warning otherwise."""
    status = check(get_client())
    with st.container(key="service-status"):
        if status.ok:
            st.caption(status_line(status))
        else:
            st.warning(status_line(status), icon=":material/error:")
