"""GPU memory as the driver counts it, read from outside the processes that hold it (nvidia-smi, i.e. NVML)."""

from __future__ import annotations

import os
import subprocess

import psutil


def physical_gpu() -> str:
    """nvidia-smi's index of the GPU CUDA calls device 0 (the first of CUDA_VISIBLE_DEVICES, else 0)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible or "0"


def gpu_used_mib() -> float:
    """Memory in use on the GPU, every process's (CUDA contexts, allocators' caches): what the driver would give a
    new process less."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                          "-i", physical_gpu()], capture_output=True, text=True, check=True, timeout=30)
    return float(out.stdout.strip().splitlines()[0])


def gpu_processes() -> dict[int, float]:
    """pid -> MiB of the processes nvidia-smi sees on the GPU (may be empty in a virtual machine that hides them)."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits",
                          "-i", physical_gpu()], capture_output=True, text=True, timeout=30)
    apps = {}
    for line in out.stdout.strip().splitlines():
        pid, used = (x.strip() for x in line.split(","))
        if pid.isdigit():
            apps[int(pid)] = float(used) if used.replace(".", "").isdigit() else 0.0
    return apps


def release_this_process() -> None:
    """Return what this (test) process's CUDA allocator caches, so the device's usage stays put while it idles."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
