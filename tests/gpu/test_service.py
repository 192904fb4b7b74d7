"""The service on the GPU: a cancelled job's process gives back all of its GPU memory (measured from outside it,
through the driver), and the OpenAI-compatible chat endpoint generates on the GPU."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from db import JobStatus, init_db, make_engine, make_sessionmaker, queue, read
from edgerlhf.config import load_config
from tests.support.backend import start_backend
from tests.support.procs import wait_for
from tests.support.runs import make_run_dir
from tests.support.workers import Service

from .helpers import gone, gpu_processes, gpu_used_mib, release_this_process

pytestmark = pytest.mark.gpu

LONG_SFT = {"device": "cuda", "stages": ["data", "sft"], "warmup": {"steps": 0},
            "model": {"n_layer": 4, "n_head": 4, "n_embd": 256}, "data": {"max_pairs": 60},
            "sft": {"max_steps": 5000, "batch_size": 8, "max_length": 128, "n_sample_prompts": 0,
                    "eval_every": 100_000, "sample_every": 100_000}}
"""A job that trains on the GPU for minutes (logging its loss every 50 steps), cancelled after its first loss."""

HELD_MIB = 100
"""A training job process holds at least this much GPU memory (its CUDA context alone is a few hundred MiB)."""
LEFT_MIB = 64
"""What may differ after the cancel from before the job (the driver's own bookkeeping): nothing of the job's."""


@pytest.mark.parametrize("how", ["cooperative", "hung"])
def test_a_cancelled_job_process_gives_back_all_of_its_gpu_memory(tmp_path, record, how):
    """cooperative: the job process sees the cancel after its step and exits; hung: it is frozen mid-step
    (SIGSTOP, as in a stuck CUDA call) and the worker kills it after the grace period."""
    release_this_process()
    before = gpu_used_mib()
    service = Service(tmp_path)
    try:
        job_id = service.add_job(LONG_SFT, name=f"cancel-{how}")
        service.start_worker("--max-jobs", "1", "--cancel-grace", "30" if how == "cooperative" else "2")
        wait_for(lambda: service.points(job_id, "sft/loss"), 240, "the first SFT loss on the GPU")
        with service.sessions() as s:
            child = next(w.child_pid for w in read.workers(s) if w.job_id == job_id)
        during = gpu_used_mib()
        listed = gpu_processes()
        if how == "hung":
            os.kill(child, signal.SIGSTOP)
        with service.sessions() as s:
            queue.request_cancel(s, job_id)
        job = wait_for(lambda: (j := service.job(job_id)).status != JobStatus.running and j, 90, "the job to stop")
        assert job.status == JobStatus.cancelled, service.worker_logs()
        wait_for(lambda: gone(child), 30, "the job process to exit")
        deadline, after = time.monotonic() + 30, gpu_used_mib()
        while after > before + LEFT_MIB and time.monotonic() < deadline:  # the driver frees a dead context at once,
            time.sleep(0.5)                                                # but give it a moment
            after = gpu_used_mib()
        logs = service.worker_logs()
    finally:
        service.close()
    record(how=how, gpu_used_mib={"before": before, "during": during, "after": after},
           job_process_listed_by_nvidia_smi=child in listed, job_process_mib=listed.get(child))
    assert during >= before + HELD_MIB, f"the job's GPU memory must show from outside: {before} -> {during} MiB"
    assert after <= before + LEFT_MIB, f"GPU memory not given back: {before} before, {during} during, {after} after"
    if how == "hung":
        assert "ignored the cancel" in logs, logs
    else:
        assert "ignored the cancel" not in logs, logs


def _finished_job(data_dir: Path) -> None:
    """Job 1, succeeded, in the data directory's SQLite database (its run directory is made separately)."""
    engine = make_engine(f"sqlite:///{data_dir / 'edgerlhf.db'}")
    init_db(engine)
    with make_sessionmaker(engine)() as session:
        queue.create_job(session, name="done", preset="tiny", config=load_config("tiny").to_dict())
        assert queue.claim_next(session, "gpu-test").id == 1
        assert queue.finish(session, 1, "gpu-test")
    engine.dispose()


def chat_on(device: str, tmp_path: Path) -> dict:
    """A finished tiny job served by a real backend with chat on `device`: one plain and one streamed completion
    of the same seeded request. Returns what they gave, with timings and the backend's log."""
    data_dir = tmp_path / "data"
    make_run_dir(data_dir / "runs" / "job-1")
    _finished_job(data_dir)
    backend = start_backend(data_dir, EDGERLHF_DEVICE=device, EDGERLHF_CHAT_MAX_TOKENS="64")
    url = backend.url
    body = {"model": "job-1/ppo", "messages": [{"role": "user", "content": "How far can spiders jump?"}],
            "max_tokens": 48, "temperature": 1.0, "seed": 11}
    try:
        plain = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=180)
        assert plain.status_code == 200, plain.text
        pieces, first = [], None
        t0 = time.perf_counter()
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=180) as stream:
            assert stream.status_code == 200
            for line in stream.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                delta = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
                if delta:
                    first = first or time.perf_counter()
                    pieces.append(delta)
        stream_s = time.perf_counter() - t0
    finally:
        backend.stop()
    return {"plain": plain.json(), "streamed": "".join(pieces), "stream_s": stream_s,
            "first_token_s": (first - t0) if first else None, "log": (data_dir / "backend.log").read_text()}


def test_the_chat_endpoint_generates_on_the_gpu(tmp_path, record):
    out = chat_on("cuda", tmp_path)
    answer = out["plain"]["choices"][0]["message"]["content"]
    tokens = out["plain"]["usage"]["completion_tokens"]
    assert tokens > 0 and answer
    assert out["streamed"] == answer, "the same seed gives the same answer, streamed or not"
    assert "job-1/ppo on cuda" in out["log"], out["log"]
    record(chat_completion_tokens=tokens, chat_tokens_per_s=tokens / out["stream_s"],
           chat_first_token_ms=1000 * out["first_token_s"])
