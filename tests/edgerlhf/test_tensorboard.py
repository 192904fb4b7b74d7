"""Every run's metrics as TensorBoard event files (`edgerlhf.context`), read back with TensorBoard's own reader.

- In process: what a `RunContext` is told is what `<run_dir>/tensorboard/` holds, tag by tag, step by step,
  value by value (TensorBoard keeps scalars as float32), readable as soon as a stage ends.
- A real worker process running a real job writes them through its database context: the event files hold
  exactly the points of the job's `metrics` table (but the worker's memory sampler's `sys/*`, which no stage logs).
- Importing the context loads neither torch nor TensorBoard.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict

import numpy as np

from db import read
from edgerlhf.context import RunContext, tensorboard_tag
from edgerlhf.contract import TENSORBOARD_DIR
from edgerlhf.contract import SAMPLED_PREFIX, job_run_dir
from tests.support.procs import REPO_ROOT
from tests.support.events import event_scalars
from tests.support.tiny import sft_job
from tests.support.workers import Service


def expected_scalars(rows) -> dict[str, list[tuple[int, float]]]:
    """(stage, key, step, value) rows as the event files should hold them: tagged, float32."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for stage, key, step, value in rows:
        out[tensorboard_tag(stage, key)].append((step, float(np.float32(value))))
    return dict(out)


def test_the_event_files_hold_what_the_context_logged(tmp_path):
    ctx = RunContext(tmp_path / "run")
    ctx.begin_stage("sft")
    for step in range(1, 6):
        ctx.log_metrics({"sft/loss": 3.0 / step + 0.123456789, "sft/learning_rate": 2e-3 * step,
                         "mem/peak_mb": 500.0 + step}, step)
    ctx.end_stage("sft")
    ctx.begin_stage("ppo")
    for step in range(1, 4):
        ctx.log_metrics({"grpo/reward_mean": -0.5 + 0.25 * step, "grpo/kl": 0.01 * step ** 2,
                         "mem/peak_mb": 900.0 - step}, step)
    ctx.end_stage("ppo")  # no close: a finished stage is readable while the run goes on

    found = event_scalars(tmp_path / "run" / TENSORBOARD_DIR)
    assert found == expected_scalars(ctx.metrics)
    # Each stage's memory under its own tag: the two stages' steps 1..3 do not overwrite each other.
    assert set(found) == {"sft/loss", "sft/learning_rate", "mem/sft/peak_mb", "grpo/reward_mean", "grpo/kl",
                          "mem/ppo/peak_mb"}
    assert [s for s, _ in found["mem/sft/peak_mb"]] == [1, 2, 3, 4, 5]
    assert found["mem/ppo/peak_mb"] == [(1, 899.0), (2, 898.0), (3, 897.0)]

    ctx.begin_stage("evaluate")  # what comes after the last stage's end is written by close
    ctx.log_metrics({"evaluate/kl": 1.5}, 0)
    ctx.close()
    assert event_scalars(tmp_path / "run" / TENSORBOARD_DIR)["evaluate/kl"] == [(0, 1.5)]


def test_importing_the_context_loads_neither_torch_nor_tensorboard():
    code = "import sys, edgerlhf.context; print(sorted(m for m in ('torch', 'tensorboard') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_job_run_by_a_real_worker_writes_its_metrics_as_event_files(tmp_path):
    service = Service(tmp_path, f"sqlite:///{tmp_path / 'data' / 'edgerlhf.db'}")
    try:
        # data + a few SFT steps (a short warm-up of the random base first): metrics of three stages' kinds.
        job_id = service.add_job({**sft_job(4), "warmup": {"steps": 2, "eval_every": 1}}, name="tensorboard")
        worker = service.start_worker("--once")
        assert worker.wait(timeout=300) == 0, service.worker_logs()
        job = service.job(job_id)
        assert job.status.value == "succeeded", (job.error, service.worker_logs())
        with service.sessions() as s:
            rows = [(m.stage, m.key, m.step, m.value) for m in read.metrics_after(s, job_id, 0, limit=100_000)
                    if not m.key.startswith(SAMPLED_PREFIX)]  # the sampler's: not logged by a stage
    finally:
        service.close()

    found = event_scalars(job_run_dir(service.data_dir / "runs", job_id) / TENSORBOARD_DIR)
    assert {"data/train", "sft/loss", "warmup/loss"} <= set(found), sorted(found)
    expected = expected_scalars(sorted(rows, key=lambda r: (r[1], r[2])))
    assert {tag: sorted(points) for tag, points in found.items()} == expected
    assert [s for s, _ in found["sft/loss"]] == [1, 2, 3, 4]
