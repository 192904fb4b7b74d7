"""Presets, the machine (GPUs, CPU memory, worker, queue) and the liveness check.

GPU readings come from `nvidia-smi`, which does not create a CUDA context: asking torch
(`edgerlhf.memory.gpu_info`) would make the backend process hold several hundred MB of the very GPU
memory the worker needs. torch is asked only when it is loaded here anyway (the chat models) and
`nvidia-smi` is missing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from typing import Any

import anyio
import anyio.to_thread
import psutil
from fastapi import APIRouter, Request, Response, status

from backend.api.deps import SessionDep, SettingsDep
from backend.api.schemas import ConfigFieldPublic, PresetPublic, SystemPublic, WorkerPublic
from db import queue, read
from edgerlhf.config import PRESETS, field_docs, preset_dict

router = APIRouter(tags=["system"])
health_router = APIRouter(tags=["system"])

PRESET_DESCRIPTIONS = {
    "distilgpt2-8gb": "distilgpt2 on HH-RLHF harmless-base, sized for one 8 GB GPU (the reference run)",
    "tiny": "a tiny random GPT-2 on 1,000 local HH-RLHF pairs with gold labels: the whole pipeline in minutes on a CPU",
    "qwen2.5-0.5b-8gb": "Qwen2.5-0.5B-Instruct through its chat template, bf16 weights with LoRA on every linear layer, "
                        "sized for one 8 GB GPU",
    "smollm2-1.7b-8gb": "SmolLM2-1.7B-Instruct through its chat template with one 4-bit (NF4) network: QLoRA SFT, an "
                        "int4 reward adapter and the policy on the same weights, sized for one 8 GB GPU",
}

HEALTH_TIMEOUT_S = 3.0
"""`/healthz` answers 503 when the database has not answered within this (a health check that hangs is no check)."""

_gpu_cache: tuple[float, list[dict[str, Any]]] = (0.0, [])
_gpu_lock = threading.Lock()


def _nvidia_smi() -> list[dict[str, Any]] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=index,name,memory.total,memory.used",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            try:
                gpus.append({"index": int(parts[0]), "name": parts[1],
                             "memory_total_mb": float(parts[2]), "memory_used_mb": float(parts[3])})
            except ValueError:
                continue
    return gpus


def gpu_info() -> list[dict[str, Any]]:
    """Visible NVIDIA GPUs with name and memory total/used in MB (cached for two seconds)."""
    global _gpu_cache
    with _gpu_lock:
        stamp, cached = _gpu_cache
        if time.monotonic() - stamp < 2.0:
            return cached
        gpus = _nvidia_smi()
        if gpus is None:
            gpus = []
            if "torch" in sys.modules:  # loaded already (chat): asking it costs nothing more
                from edgerlhf.memory import gpu_info as torch_gpu_info

                gpus = torch_gpu_info()
        _gpu_cache = (time.monotonic(), gpus)
        return gpus


@router.get("/presets", response_model=list[PresetPublic])
def presets():
    """Every preset with its full configuration (the base a job's `overrides` apply to)."""
    out = []
    for name in PRESETS:
        config = preset_dict(name)
        model = config["model"]["name_or_path"] + (" (random weights)" if config["model"]["random_init"] else "")
        out.append(PresetPublic(name=name, model=model, description=PRESET_DESCRIPTIONS.get(name, ""), config=config))
    return out


@router.get("/config/fields", response_model=list[ConfigFieldPublic])
def config_fields():
    """Every field of a job's configuration: dotted path, type, default, help and accepted range.

    The help is the field's docstring in `edgerlhf/config.py`, the range its declared `Range`: the one
    source the dashboard's form and the 422 messages both quote.
    """
    return field_docs()


@router.get("/system", response_model=SystemPublic)
def system(session: SessionDep, settings: SettingsDep):
    """GPUs, CPU memory, every worker (host, GPU, state, current job, last heartbeat, alive or not), the queue."""
    mem = psutil.virtual_memory()
    cpu = {"count": psutil.cpu_count(), "percent": psutil.cpu_percent(interval=None),
           "memory_total_mb": mem.total / 2**20, "memory_used_mb": (mem.total - mem.available) / 2**20,
           "memory_percent": mem.percent}
    alive = {w.id for w in read.alive_workers(session, settings.worker_alive_seconds)}
    workers = [WorkerPublic.of(w, alive=w.id in alive) for w in read.workers(session)]
    live = [w for w in workers if w.alive]
    worker = live[0] if live else (workers[0] if workers else WorkerPublic(alive=False))
    counts = read.status_counts(session)
    return SystemPublic(gpus=gpu_info(), cpu=cpu, worker=worker, workers=workers,
                        queue_length=counts["queued"], jobs=counts)


def _touch(sessions) -> None:
    with sessions() as session:
        queue.touch(session)


@health_router.get("/healthz")
async def healthz(request: Request, response: Response) -> dict[str, str]:
    """Liveness: the backend answers and its database does, within `HEALTH_TIMEOUT_S` (else 503). Never needs the API
    token. The round trip runs in a thread of its own (the API's shared ones may all be busy), and a database that
    does not answer (a server that hangs, every pooled connection taken) is a 503, not a hung check."""
    limiter = getattr(request.app.state, "health_limiter", None)
    if limiter is None:
        limiter = request.app.state.health_limiter = anyio.CapacityLimiter(4)
    try:
        with anyio.fail_after(HEALTH_TIMEOUT_S):
            await anyio.to_thread.run_sync(_touch, request.app.state.sessions, limiter=limiter,
                                           abandon_on_cancel=True)
    except TimeoutError:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return {"status": "error", "database": "not answering"}
    except Exception:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return {"status": "error", "database": "unreachable"}
    return {"status": "ok", "database": "ok"}
