"""The arena's loop on a task whose answer we know: votes cast through the API by a script that follows a gold
scorer train, through a real job, a reward model that agrees with that gold on pairs it never saw.

A real `edgerlhf backend` (with its API token) serves two finished jobs (tiny real models, `tests/support/runs.py`).
The script plays the person at the arena: for HH-RLHF prompts it shows two HH responses as the answers of
two of those models (sides drawn at random) and votes as the `concise` gold says (A, B, or a tie when the
gold cannot tell). Then, as the New job page does, it snapshots the votes (`POST /api/arena/votes/snapshot`)
and queues a job whose data is the votes alone (`data.votes_file`), which the real worker (`edgerlhf worker
--once`) runs: data -> sft -> reward. Checked:
- the job's data report counts exactly the votes of the snapshot (those that make a pair), nothing dropped,
  and its `data/votes.jsonl` holds exactly their pairs;
- its reward model agrees with the gold on held-out pairs of prompts never voted on far above chance (≥ 0.8;
  the stage's own held-out accuracy, on the held-out votes, too).

Why HH responses rather than the tiny models' own samples: random-weight models write word salad that runs to
the length cap, on which the gold mostly sees ties; the loop under test (API -> database -> export -> data
stage -> reward model) is the same whoever wrote the answers.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from edgerlhf import gold, models
from edgerlhf.config import SHARED_DIR, TINY_TOKENIZER_DIR, load_config
from frontend.api_client import TOKEN_KEY
from tests.support.backend import CHAT_ENV, CHAT_TOKEN, start_backend
from tests.support.dashboard import APP
from tests.support.procs import REPO_ROOT, service_env
from tests.support.runs import make_jobs
from tests.support.tiny import ARENA_VOTES_JOB

pytestmark = pytest.mark.slow

GOLD = "concise"
N_VOTES = 300
N_HELD_OUT = 120
CONTESTANTS = ("job-1/sft", "job-1/ppo", "job-2/sft")
HH_DIR = os.path.join(SHARED_DIR, "data", "hh-rlhf")
"""The local HH-RLHF files (raw harmless-base test split and the processed sample): ~1,100 prompts fit the budgets."""
WORKER_TIMEOUT_S = 300
WORKER = [sys.executable, "-m", "edgerlhf.cli", "worker", "--once", "--poll-interval", "0.2"]
def hh_pairs() -> list[tuple[str, str, str]]:
    """(prompt, response, response) of the local HH-RLHF files within the job's token budgets, one per prompt."""
    from transformers import AutoTokenizer

    from edgerlhf.data import read_pairs

    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    rows, _ = read_pairs(load_config("tiny", {"data": {"source": HH_DIR}}).data)

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, verbose=False)["input_ids"])

    out, seen = [], set()
    for row in rows:
        prompt, a, b = row["prompt"], row["chosen"], row["rejected"]
        if row.get("mismatch") or prompt in seen or not a or not b or a == b:
            continue
        if n_tokens(prompt) > 120 or max(n_tokens(" " + a), n_tokens(" " + b)) > 60:
            continue
        seen.add(prompt)
        out.append((prompt, a, b))
    return out


@dataclass
class Loop:
    url: str
    """The backend, still serving."""
    snapshot: dict
    job: dict
    report: dict
    run_dir: Path
    held_out: list[tuple[str, str, str]]
    """(prompt, response, response) of prompts nobody voted on."""


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    data = tmp_path_factory.mktemp("arena-loop")
    make_jobs(data, running=False)  # jobs 1 (succeeded: sft, ppo) and 2 (failed after sft: sft)
    pairs = hh_pairs()
    assert len(pairs) >= N_VOTES + N_HELD_OUT, len(pairs)
    rng = random.Random(0)
    rng.shuffle(pairs)
    voted, held_out = pairs[:N_VOTES], pairs[N_VOTES:N_VOTES + N_HELD_OUT]
    # A script votes here, far faster than the 60 votes a minute a person is allowed by default.
    backend = start_backend(data, **CHAT_ENV, EDGERLHF_ARENA_VOTES_PER_MINUTE=str(10 * N_VOTES))
    url = backend.url
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {CHAT_TOKEN}"}, timeout=30) as api:
            for prompt, first, second in voted:  # the script at the arena
                model_a, model_b = rng.sample(CONTESTANTS, 2)
                answer_a, answer_b = (first, second) if rng.random() < 0.5 else (second, first)
                verdict = gold.prefers(prompt, answer_a, answer_b, GOLD)
                choice = "tie" if verdict is None else "a" if verdict else "b"
                response = api.post("/api/arena/votes", json={
                    "prompt": prompt.strip(), "model_a": model_a, "model_b": model_b, "answer_a": answer_a,
                    "answer_b": answer_b, "choice": choice})
                assert response.status_code == 201, response.text
            snapshot = api.post("/api/arena/votes/snapshot").json()
            job = ARENA_VOTES_JOB | {"data": ARENA_VOTES_JOB["data"] | {"votes_file": snapshot["path"]}}
            created = api.post("/api/jobs", json={"preset": "tiny", "name": "on arena votes", "overrides": job})
            assert created.status_code == 201, created.text
            job_id = created.json()["id"]
            worker = subprocess.run(WORKER, cwd=REPO_ROOT, env=service_env(data), capture_output=True, text=True,
                                    timeout=WORKER_TIMEOUT_S)
            finished = api.get(f"/api/jobs/{job_id}").json()
            assert finished["status"] == "succeeded", (finished["error"], worker.stderr[-3000:])
            report = api.get(f"/api/jobs/{job_id}/report").json()
        yield Loop(url, snapshot, finished, report, data / "runs" / f"job-{job_id}", held_out)
    finally:
        backend.stop()


def test_the_job_uses_exactly_the_votes_of_its_snapshot(loop):
    snapshot, job, report, run_dir = loop.snapshot, loop.job, loop.report, loop.run_dir
    assert job["config"]["data"]["votes_file"] == snapshot["path"]
    votes = report["data"]["votes"]
    assert votes["vote_ids"] == snapshot["vote_ids"] and votes["votes_used"] == snapshot["votes"]
    assert votes["dropped"] == {} and votes["pairs_read"] == snapshot["pairs"]
    assert votes["train_pairs"] + votes["test_pairs"] == snapshot["pairs"] and not votes["with_data_set"]
    assert report["data"]["train"] == votes["train_pairs"] and report["data"]["test"] == votes["test_pairs"]
    # Ties made no pair: fewer votes than were cast, but some of every other kind.
    assert 0.4 * N_VOTES < snapshot["votes"] < N_VOTES
    recorded = [json.loads(line) for line in (run_dir / "data" / "votes.jsonl").read_text().splitlines()]
    assert sorted(r["vote_id"] for r in recorded) == snapshot["vote_ids"]
    exported = [json.loads(line) for line in open(snapshot["path"], encoding="utf-8")]
    key = lambda r: (r["vote_id"], r["prompt"], r["chosen"], r["rejected"])  # noqa: E731
    assert sorted(map(key, recorded)) == sorted(map(key, exported))


def test_the_vote_trained_reward_model_agrees_with_the_gold(loop):
    report, run_dir, held_out = loop.report, loop.run_dir, loop.held_out
    # The stage's own figure, on the held-out votes (their prompts were never trained on).
    assert report["reward"]["precisions"]["bf16"]["accuracy"] >= 0.8
    # Ours, on gold-labelled pairs of prompts nobody voted on.
    labelled = [(p, a, b) if v else (p, b, a) for p, a, b in held_out
                if (v := gold.prefers(p, a, b, GOLD)) is not None]
    assert len(labelled) >= 60
    rm = models.load_reward_model(run_dir, "bf16")
    prompts = [p for p, _, _ in labelled]
    with torch.inference_mode():
        better = rm.score(prompts, [c for _, c, _ in labelled])
        worse = rm.score(prompts, [r for _, _, r in labelled])
    agreement = float((better > worse).float().mean())
    print(f"{loop.snapshot['votes']} votes with a pair of {N_VOTES} cast; vote-trained reward model: gold "
          f"agreement {agreement:.3f} on {len(labelled)} held-out pairs "
          f"(held-out votes: {report['reward']['precisions']['bf16']['accuracy']:.3f})")
    assert agreement >= 0.8, agreement


def test_the_job_page_says_which_votes_shaped_the_run(loop, dashboard_env):
    from streamlit.testing.v1 import AppTest

    dashboard_env(loop.url, CHAT_TOKEN)
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.session_state[TOKEN_KEY] = CHAT_TOKEN  # what this browser session typed at the login (frontend/login.py)
    at.query_params["job"] = str(loop.job["id"])
    at.run()
    at.switch_page("app_pages/job.py").run()
    assert not at.exception, at.exception
    (info,) = [i.value for i in at.info if "arena vote" in i.value]
    votes = loop.report["data"]["votes"]
    assert f"Trained on **{votes['votes_used']} arena vote(s)**" in info and "(the votes alone)" in info
    assert info.startswith(f"Trained on **{votes['votes_used']} arena vote(s)** (#{votes['vote_ids'][0]}, ")
