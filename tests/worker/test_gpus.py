"""Workers that own a GPU, as real processes on a real SQLite file: which jobs each claims by its GPU memory,
the GPU its job processes see, what it records about its GPU, and a dead worker's job taken over by others.

GPUs are played by a stand-in `nvidia-smi` (tests/fake_gpus.py) or given with `--gpu-memory-mb`, and a
worker of unknown memory by `CUDA_VISIBLE_DEVICES=""`, so these run the same with or without a GPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from db import JobStatus, queue, read
from edgerlhf.config import load_config
from worker.gpu import GPUError, WorkerGPU, resolve

from tests.support.fake_gpus import FAKE_GPUS, fake_nvidia_smi_path
from tests.support.procs import REPO_ROOT, wait_for
from tests.support.tiny import DATA_ONLY, sft_job


def add_job(service, overrides: dict, name: str, min_gpu_memory_mb: int) -> int:
    """A job only a worker whose GPU has `min_gpu_memory_mb` may run."""
    with service.sessions() as s:
        return queue.create_job(s, name=name, preset="tiny", config=load_config("tiny", overrides).to_dict(),
                                min_gpu_memory_mb=min_gpu_memory_mb).id


def claims(service, job_id: int) -> list[str]:
    return [m for m in service.logs(job_id) if m.startswith("claimed by")]


def worker_rows(service) -> dict:
    with service.sessions() as s:
        return {w.id: w for w in read.workers(s)}


def test_a_job_with_a_minimum_gpu_memory_is_left_to_the_worker_that_has_it(service):
    big = add_job(service, DATA_ONLY, "needs 6 GB", min_gpu_memory_mb=6000)
    small = service.add_job(DATA_ONLY, name="any GPU")

    # A 2 GB worker and a worker of unknown memory run until nothing they may take is left.
    two_gb = service.start_worker("--once", "--gpu-memory-mb", "2000", "--worker-id", "two-gb")
    assert two_gb.wait(timeout=240) == 0, service.worker_logs()
    service.env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU, no memory figure: only jobs without a minimum
    unknown = service.start_worker("--once", "--worker-id", "no-gpu")
    del service.env["CUDA_VISIBLE_DEVICES"]
    assert unknown.wait(timeout=240) == 0, service.worker_logs()
    assert service.job(small).status == JobStatus.succeeded and claims(service, small) == \
        ["claimed by worker two-gb (attempt 1)"]
    job = service.job(big)
    assert (job.status, job.attempts, job.worker_id) == (JobStatus.queued, 0, None), "skipped by both"
    assert claims(service, big) == []
    rows = worker_rows(service)
    assert (rows["two-gb"].gpu_memory_mb, rows["no-gpu"].gpu_memory_mb) == (2000, None)

    # An 8 GB worker takes it.
    eight_gb = service.start_worker("--once", "--gpu-memory-mb", "8000", "--worker-id", "eight-gb")
    assert eight_gb.wait(timeout=240) == 0, service.worker_logs()
    job = service.job(big)
    assert job.status == JobStatus.succeeded, (job.error, service.worker_logs())
    assert claims(service, big) == ["claimed by worker eight-gb (attempt 1)"]


def test_gpu_n_makes_it_the_job_processes_only_gpu_and_cuda_visible_devices_is_passed_on(service):
    pinned = service.add_job(DATA_ONLY, name="pinned")
    worker = service.start_worker("--max-jobs", "1", "--gpu", "3", "--gpu-memory-mb", "1000", "--worker-id", "gpu-3")
    assert worker.wait(timeout=240) == 0, service.worker_logs()
    inherited = service.add_job(DATA_ONLY, name="inherited")
    service.env["CUDA_VISIBLE_DEVICES"] = "5"  # no --gpu: the environment's GPU, left as it is
    worker = service.start_worker("--max-jobs", "1", "--gpu-memory-mb", "1000", "--worker-id", "env-5")
    del service.env["CUDA_VISIBLE_DEVICES"]
    assert worker.wait(timeout=240) == 0, service.worker_logs()

    for job_id, visible in ((pinned, "3"), (inherited, "5")):
        assert service.job(job_id).status == JobStatus.succeeded, service.worker_logs()
        # Written by the job process from its own environment.
        said = [m for m in service.logs(job_id) if m.startswith("job process on")]
        assert len(said) == 1 and said[0].endswith(f"CUDA_VISIBLE_DEVICES={visible}"), said
    rows = worker_rows(service)
    assert (rows["gpu-3"].gpu_index, rows["gpu-3"].gpu_memory_mb) == (3, 1000)
    assert (rows["env-5"].gpu_index, rows["env-5"].gpu_memory_mb) == (5, 1000)


def test_the_worker_reads_its_gpus_name_and_memory_from_nvidia_smi_and_refuses_a_gpu_it_lacks(service):
    service.env["PATH"] = fake_nvidia_smi_path(service.tmp_path / "bin")
    worker = service.start_worker("--once", "--gpu", "1", "--worker-id", "gpu-1")
    assert worker.wait(timeout=120) == 0, service.worker_logs()
    row = worker_rows(service)["gpu-1"]
    assert (row.gpu_index, row.gpu_name, row.gpu_memory_mb) == (1, *FAKE_GPUS[1])

    missing = subprocess.run([sys.executable, "-m", "edgerlhf.cli", "worker", "--once", "--gpu", "7"], cwd=REPO_ROOT,
                             env=service.env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert "--gpu 7: nvidia-smi -i 7: No devices were found" in missing.stderr, missing.stderr
    assert "--gpu-memory-mb" in missing.stderr


def test_resolve_the_gpu_from_the_flag_the_environment_or_gpu_0(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_nvidia_smi_path(tmp_path / "bin"))
    (zero, zero_mb), (one, one_mb) = FAKE_GPUS
    assert resolve(1, None, {}) == WorkerGPU(1, one, one_mb, visible_devices="1")
    assert resolve(1, 4000, {}) == WorkerGPU(1, one, 4000, visible_devices="1"), "--gpu-memory-mb overrides"
    assert resolve(None, None, {"CUDA_VISIBLE_DEVICES": "1,0"}) == WorkerGPU(1, one, one_mb, visible_devices=None)
    assert resolve(None, None, {}) == WorkerGPU(0, zero, zero_mb, visible_devices=None)
    for hidden in ("", "-1"):
        assert resolve(None, None, {"CUDA_VISIBLE_DEVICES": hidden}) == WorkerGPU()
    with pytest.raises(GPUError, match="No devices were found"):
        resolve(7, None, {})
    assert resolve(7, 4000, {}) == WorkerGPU(7, None, 4000, visible_devices="7")
    # Not named, or named through the environment, and not found: unknown memory, no error.
    assert resolve(None, None, {"CUDA_VISIBLE_DEVICES": "7"}) == WorkerGPU(7, None, None, visible_devices=None)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no nvidia-smi at all: a CPU-only machine
    assert resolve(None, None, {}) == WorkerGPU()
    assert resolve(2, None, {}) == WorkerGPU(2, None, None, visible_devices="2")


@pytest.mark.slow
def test_a_dead_workers_job_is_requeued_by_a_worker_that_cannot_take_it_and_claimed_by_one_that_can(service):
    job_id = add_job(service, sft_job(max_steps=199), "needs 6 GB", min_gpu_memory_mb=6000)  # still training at the kill
    big = service.start_worker("--gpu-memory-mb", "8000", "--worker-id", "big-a")
    wait_for(lambda: service.job(job_id).worker_id == "big-a", 120, "the 8 GB worker to claim the job")
    small = service.start_worker("--gpu-memory-mb", "2000", "--worker-id", "small-b")
    wait_for(lambda: (w := worker_rows(service).get("small-b")) and w.state == "idle", 120, "the 2 GB worker")
    os.kill(big.pid, signal.SIGKILL)
    big.wait(timeout=10)

    # Only the 2 GB worker is alive: it requeues the stalled job, and right after (same loop turn) fails to claim it.
    job = wait_for(lambda: (j := service.job(job_id)).status == JobStatus.queued and j, 60, "the stalled job's requeue")
    assert job.attempts == 1 and job.worker_id is None
    assert any("worker big-a stopped heartbeating; requeued" in m for m in service.logs(job_id))
    assert small.poll() is None

    other = service.start_worker("--gpu-memory-mb", "8000", "--worker-id", "big-c")
    job = wait_for(lambda: (j := service.job(job_id)).worker_id == "big-c" and j, 120, "another 8 GB worker's claim")
    assert job.attempts == 2
    assert claims(service, job_id) == ["claimed by worker big-a (attempt 1)", "claimed by worker big-c (attempt 2)"]
    other.send_signal(signal.SIGTERM)  # no need to train: it gives the job back
    assert other.wait(timeout=60) == 0, service.worker_logs()
