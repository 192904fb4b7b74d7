"""Which GPU a worker owns, and how much memory it has: from `--gpu N` or `CUDA_VISIBLE_DEVICES`, and nvidia-smi.

One worker per GPU, as in Ray's and Slurm's GPU scheduling: the worker names its GPU, starts every job
process with `CUDA_VISIBLE_DEVICES` set to it (so a job's `cuda`/`auto` device is that GPU, `cuda:0` inside
the job), and records the GPU's index, name and memory in its `workers` row. The queue gives it only jobs
whose `min_gpu_memory_mb` that memory meets (`db.queue.fits_gpu`).

    --gpu N               the worker owns GPU N (nvidia-smi's numbering; the job gets CUDA_DEVICE_ORDER=PCI_BUS_ID
                          so CUDA numbers the GPUs the same way); a GPU nvidia-smi does not know is an error
    CUDA_VISIBLE_DEVICES  without --gpu: its first entry (an index or a UUID), passed on to jobs unchanged;
                          empty or -1: no GPU
    neither               GPU 0 (what a job's `cuda` means) when nvidia-smi lists one; else none
    --gpu-memory-mb M     the memory, instead of asking nvidia-smi

The memory comes from `nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits -i N`,
which needs no CUDA context (the worker never imports torch). Without nvidia-smi (a CPU-only machine, a ROCm
one) it is unknown (None), and the worker takes only jobs without a minimum.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("edgerlhf.worker")

NO_GPU = ("", "-1", "none", "NoDevFiles")
"""`CUDA_VISIBLE_DEVICES` values that hide every GPU."""


class GPUError(RuntimeError):
    """The GPU named with `--gpu` cannot be found or read."""


@dataclass(frozen=True)
class WorkerGPU:
    """The GPU a worker owns (every field None: none)."""

    index: int | None = None
    """nvidia-smi's index."""
    name: str | None = None
    memory_mb: int | None = None
    """Total memory in MB; None: unknown."""
    visible_devices: str | None = None
    """`CUDA_VISIBLE_DEVICES` for the job processes; None: leave the worker's environment as it is."""

    def columns(self) -> dict[str, Any]:
        """The `workers` row's GPU fields (`db.queue.worker_heartbeat` keywords)."""
        return {"gpu_index": self.index, "gpu_name": self.name, "gpu_memory_mb": self.memory_mb}

    def describe(self) -> str:
        if self.index is None and self.name is None:
            what = "no GPU"
        else:
            what = f"GPU {self.index if self.index is not None else '?'}" + (f" ({self.name})" if self.name else "")
        memory = f"{self.memory_mb} MB" if self.memory_mb is not None else "memory unknown"
        return f"{what}, {memory}"


def query_nvidia_smi(device: str) -> tuple[int, str, int] | str:
    """(index, name, memory.total MB) of `device` (an index or UUID) from nvidia-smi, or why not (a string)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "nvidia-smi not found"
    try:
        out = subprocess.run([exe, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits",
                              "-i", device], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi failed: {type(exc).__name__}: {exc}"
    text = (out.stdout.strip() or out.stderr.strip()).splitlines()
    if out.returncode != 0 or not text:
        return f"nvidia-smi -i {device}: {' '.join(text) or f'exit code {out.returncode}'}"
    parts = [p.strip() for p in text[0].split(",")]
    try:
        # The name may contain commas; index first and memory last do not.
        return int(parts[0]), ", ".join(parts[1:-1]), int(float(parts[-1]))
    except (ValueError, IndexError):
        return f"nvidia-smi -i {device}: unreadable answer {text[0]!r}"


def resolve(gpu: int | None, memory_mb: int | None, environ: Mapping[str, str]) -> WorkerGPU:
    """The worker's GPU from `--gpu` (`gpu`), `--gpu-memory-mb` (`memory_mb`) and its environment.

    Raises `GPUError` when `--gpu N` names a GPU nvidia-smi does not know (and no memory was given); a GPU
    taken from the environment or by default that cannot be read is only logged: its memory is unknown.
    """
    env = environ.get("CUDA_VISIBLE_DEVICES")
    if gpu is not None:
        device, named, visible = str(gpu), True, str(gpu)
    elif env is not None:
        if env.strip() in NO_GPU:
            return WorkerGPU(memory_mb=memory_mb)
        device, named, visible = env.split(",")[0].strip(), True, None
    else:
        device, named, visible = "0", False, None
    index = int(device) if device.isdigit() else None
    found = query_nvidia_smi(device) if memory_mb is None or shutil.which("nvidia-smi") else None
    if isinstance(found, tuple):
        found_index, name, found_mb = found
        return WorkerGPU(found_index, name, memory_mb if memory_mb is not None else found_mb, visible)
    if memory_mb is not None:  # given: nvidia-smi's name is a nicety, its failure no error
        return WorkerGPU(index, None, memory_mb, visible)
    if gpu is not None and found != "nvidia-smi not found":
        raise GPUError(f"--gpu {gpu}: {found}; name a GPU that `nvidia-smi -L` lists, or give its memory with "
                       f"--gpu-memory-mb")
    if not named:  # nothing named and no GPU found: a CPU-only machine
        return WorkerGPU()
    logger.warning(f"GPU {device}: {found}; its memory is unknown, so this worker takes only jobs without a "
                   f"minimum GPU memory (give it with --gpu-memory-mb)")
    return WorkerGPU(index, None, None, visible)
