"""The next round of RLHF run like any job (issue 32): a real backend continues a finished job (the session's trained
run, as job 1), and a real worker runs the new job from job 1's aligned policy to the end. The worker finds the
parent's run directory as it finds a job's own (under its data dir, by the parent's id), whatever path the config
stored names."""

from __future__ import annotations

import json

import httpx
import torch

from db import queue
from db.models import Job
from edgerlhf.contract import SFT_MERGED
from edgerlhf.export import merged_policy
from tests.support.backend import start_backend

WORKER_TIMEOUT_S = 480


def test_a_worker_runs_the_next_round_from_the_parents_aligned_policy(service, trained_run):
    with service.sessions() as session:
        parent = queue.create_job(session, name="round one", preset="tiny", config=trained_run.config.to_dict()).id
        assert queue.claim_next(session, "test-worker").id == parent
        assert queue.finish(session, parent, "test-worker")
    parent_dir = trained_run.copy_to(service.data_dir / "runs" / f"job-{parent}")

    backend = start_backend(service.data_dir, service.tmp_path / "backend.log")
    try:
        made = httpx.post(f"{backend.url}/api/jobs/{parent}/continue", timeout=30, json={
            "reward_data": "parent", "overrides": {"reward": {"precisions": ["bf16"]}}})
        assert made.status_code == 201, made.text
        child = made.json()
        assert child["config"]["round"] == {"parent_run": str(parent_dir), "number": 2}
        with service.sessions() as session:  # a config naming the parent where this worker would not look
            row = session.get(Job, child["id"])
            row.config = {**row.config, "round": {"parent_run": str(service.data_dir / "elsewhere"), "number": 2}}
            session.commit()

        worker = service.start_worker("--once")
        worker.wait(timeout=WORKER_TIMEOUT_S)
        done = httpx.get(f"{backend.url}/api/jobs/{child['id']}", timeout=30).json()
        assert done["status"] == "succeeded", (done["error"], service.worker_logs()[-4000:])
        assert (done["parent_id"], done["round"]) == (parent, 2)

        report = httpx.get(f"{backend.url}/api/jobs/{child['id']}/report", timeout=30).json()
        assert (report["sft"]["round"], report["sft"]["trained"]) == (2, False)
        assert report["sft"]["parent_run"] == str(parent_dir), "found under the worker's data dir, by the parent's id"
        assert report["evaluate"]["gold_diff"] is not None
        chain = httpx.get(f"{backend.url}/api/jobs/{parent}/rounds", timeout=30).json()["items"]
        assert [(j["id"], j["round"], j["status"]) for j in chain] == [(parent, 1, "succeeded"),
                                                                      (child["id"], 2, "succeeded")]
    finally:
        backend.stop()

    from transformers import AutoModelForCausalLM

    merged, _ = merged_policy(parent_dir)
    started = AutoModelForCausalLM.from_pretrained(service.data_dir / "runs" / f"job-{child['id']}" / SFT_MERGED)
    expected, got = merged.state_dict(), started.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    logged = json.dumps(service.logs(child["id"]))
    assert f"round 2: continues job {parent}" in logged and "SFT trains nothing" in logged
