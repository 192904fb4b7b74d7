"""Memory readings for metrics and benchmarks: CUDA allocated/peak per device, process RSS on the CPU."""

from __future__ import annotations

import os

import psutil
import torch

MB = 1024 * 1024


def snapshot(device: torch.device | str | None = None) -> dict[str, float]:
    """Current memory as namespaced metrics: `mem/allocated_mb`, `mem/peak_mb` (CUDA), `mem/rss_mb` (process)."""
    out = {"mem/rss_mb": psutil.Process(os.getpid()).memory_info().rss / MB}
    device = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        out["mem/allocated_mb"] = torch.cuda.memory_allocated(device) / MB
        out["mem/peak_mb"] = torch.cuda.max_memory_allocated(device) / MB
        out["mem/reserved_mb"] = torch.cuda.memory_reserved(device) / MB
    return out


def reset_peak(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux `ru_maxrss`)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_info() -> list[dict[str, float | str]]:
    """Every visible CUDA device with its name and memory total/used in MB (empty on the CPU)."""
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            gpus.append({"index": i, "name": torch.cuda.get_device_name(i),
                         "memory_total_mb": total / MB, "memory_used_mb": (total - free) / MB})
    return gpus
