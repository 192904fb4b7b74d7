"""Memory readings for metrics and benchmarks: CUDA allocated/peak per device, process RSS on the CPU,
and the bytes of tensors a process holds (to measure what building something added)."""

from __future__ import annotations

import gc
import os
import warnings

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
    """Peak resident memory of this process so far: Linux `VmHWM` (`ru_maxrss` would report a forked
    parent's peak as ours), `ru_maxrss` where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tensor_bytes(device: torch.device | str = "cpu") -> int:
    """Bytes of the tensors this process holds on `device`, each storage once.

    On CUDA the allocator's count (`torch.cuda.memory_allocated`); on the CPU the storages of every live
    tensor the garbage collector can reach. The difference around building something is what it holds,
    measured rather than derived from the objects it describes.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance() on deprecated module attributes warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
            except Exception:  # some objects refuse isinstance or storage access (e.g. lazy modules)
                continue
    return sum(storages.values())


def gpu_info() -> list[dict[str, float | str]]:
    """Every visible CUDA device with its name and memory total/used in MB (empty on the CPU)."""
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            gpus.append({"index": i, "name": torch.cuda.get_device_name(i),
                         "memory_total_mb": total / MB, "memory_used_mb": (total - free) / MB})
    return gpus
