"""Memory readings for metrics and benchmarks: CUDA allocated/peak per device, process RSS on the CPU,
and the bytes of tensors a process holds (to measure what building something added).

Two writers of memory metrics, each with its own keys: a stage logs `snapshot()` (`mem/*`) at its steps,
and the worker's sampler records `sampled()` (`sys/*`) every few seconds (`edgerlhf.contract`).

Peak memory has one definition, used by the stages and the benchmarks alike: `reset_peak(device)`, then
`peak_mb(device)` = the CUDA peak allocated on a GPU, the peak resident set (`VmHWM`) on the CPU.
"""

from __future__ import annotations

import gc
import os
import warnings

import psutil
import torch

from edgerlhf.contract import MEMORY_PREFIX, SAMPLED_PREFIX

MB = 1024 * 1024


def _on_cuda(device: torch.device | str | None) -> bool:
    """Whether memory on `device` is CUDA memory (`None`: the CUDA device when there is one)."""
    device = torch.device(device) if device is not None else None
    return torch.cuda.is_available() and (device is None or device.type == "cuda")


def snapshot(device: torch.device | str | None = None) -> dict[str, float]:
    """Current memory as namespaced metrics: `mem/allocated_mb`, `mem/peak_mb` (CUDA), `mem/rss_mb` (process)."""
    out = {f"{MEMORY_PREFIX}rss_mb": rss_mb()}
    if _on_cuda(device):
        out[f"{MEMORY_PREFIX}allocated_mb"] = torch.cuda.memory_allocated(device) / MB
        out[f"{MEMORY_PREFIX}peak_mb"] = torch.cuda.max_memory_allocated(device) / MB
        out[f"{MEMORY_PREFIX}reserved_mb"] = torch.cuda.memory_reserved(device) / MB
    return out


def sampled(device: torch.device | str | None = None) -> dict[str, float]:
    """What the worker's sampler records between steps: `sys/rss_mb` (this process) and, once this process
    uses CUDA, `sys/gpu_used_mb`, the device memory in use (total - free, as nvidia-smi counts it: CUDA
    context, the allocator's cache and other processes included, so it is what runs out first)."""
    out = {f"{SAMPLED_PREFIX}rss_mb": rss_mb()}
    if _on_cuda(device) and torch.cuda.is_initialized():  # never the sampler's thread starting CUDA
        free, total = torch.cuda.mem_get_info(device)
        out[f"{SAMPLED_PREFIX}gpu_used_mb"] = (total - free) / MB
    return out


# --- peak memory: the one way every stage and benchmark measures it -------------------------------


def reset_peak(device: torch.device | str | None = None) -> None:
    """Start measuring a new peak for `peak_mb`: CUDA's peak allocated on a GPU; on the CPU this process's
    peak RSS (Linux `clear_refs` 5 resets `VmHWM` to the current RSS; where it cannot, the peak stays
    the process's whole life)."""
    if _on_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mb(device: torch.device | str | None = None) -> float:
    """Peak memory since the last `reset_peak(device)`: CUDA peak allocated on a GPU, peak RSS on the CPU.

    Both are exact high-water marks kept by the allocator or the kernel, so a short spike between two
    readings is not missed (as a polling thread would miss it)."""
    if _on_cuda(device):
        return torch.cuda.max_memory_allocated(device) / MB
    return peak_rss_mb()


def current_mb(device: torch.device | str | None = None) -> float:
    """Memory held now, measured as `peak_mb` measures its peak: CUDA allocated on a GPU, RSS on the CPU."""
    if _on_cuda(device):
        return torch.cuda.memory_allocated(device) / MB
    return rss_mb()


def rss_mb() -> float:
    """Resident memory of this process now."""
    return psutil.Process(os.getpid()).memory_info().rss / MB


def peak_rss_mb() -> float:
    """Peak resident memory of this process (since the last CPU `reset_peak`): Linux `VmHWM`, which
    belongs to the address space, so unlike `ru_maxrss` it does not inherit a forked parent's peak;
    `ru_maxrss` where /proc is missing."""
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


def free_memory(device: torch.device | str | None = None) -> None:
    """Give back what dropped references held: collect the garbage, then return CUDA's cached blocks."""
    gc.collect()
    if _on_cuda(device):
        torch.cuda.empty_cache()
