"""A worker's heartbeat written as the worker writes it (`db.queue.worker_heartbeat`), without a worker process: for
the pages that read the workers (the memory plan's GPU, the sidebar's service status)."""

from __future__ import annotations

from typing import Any


def register_worker(db_url: str, worker_id: str = "gpu-box:7", **fields: Any) -> None:
    """A live worker `worker_id` (`host:pid`), idle unless `fields` say otherwise (`gpu_memory_mb=8192`, ...)."""
    from db import make_engine, make_sessionmaker, queue

    host, pid = worker_id.split(":")
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as s:
            queue.worker_heartbeat(s, worker_id, hostname=host, pid=int(pid), **{"state": "idle", **fields})
    finally:
        engine.dispose()
