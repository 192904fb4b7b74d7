"""Run directories of random tiny models and the job rows that serve them, and `JobWriter`, which writes what a
running job writes with the worker's own queue functions; reports as the stages write them.

`make_run_dir` writes a finished run in the layout `edgerlhf.models.load_policy` reads: a tiny random GPT-2 as
`base/` and `sft/merged/` with the GPT-2 tokenizer, and a real peft LoRA adapter (B != 0) as `ppo/adapter/`, so
the PPO policy differs from the SFT one. Nothing is trained: seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

N_POSITIONS = 128
"""The positions of `make_run_dir`'s models (the chat API's context limit in the tests)."""


def _save_gpt2(path: Path, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from edgerlhf.config import TINY_TOKENIZER_DIR

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=N_POSITIONS))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR).save_pretrained(path)


def save_policy_adapter(model, run_dir: Path, target_modules: list[str] | None = None) -> None:
    """A LoRA on `model` as a trained one would be (B != 0, so the policy differs from its base), saved as the run's
    `ppo/adapter/` (`target_modules` default: GPT-2's `c_attn`)."""
    import torch
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules or ["c_attn"],
                                              task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    policy.save_pretrained(run_dir / "ppo" / "adapter")


def make_run_dir(run_dir: Path, with_ppo: bool = True) -> Path:
    """A finished tiny run: config.json, base/, sft/merged + report, ppo/adapter + report."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgerlhf.config import load_config

    run_dir.mkdir(parents=True, exist_ok=True)
    config = load_config("tiny", {"model": {"n_embd": 32, "n_positions": N_POSITIONS}})
    (run_dir / "config.json").write_text(config.to_json())
    _save_gpt2(run_dir / "base", seed=1)
    _save_gpt2(run_dir / "sft" / "merged", seed=2)
    (run_dir / "sft" / "report.json").write_text(json.dumps({"steps": 0}))
    if with_ppo:
        torch.manual_seed(3)
        save_policy_adapter(AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "merged"), run_dir)
        (run_dir / "ppo" / "report.json").write_text(json.dumps({"steps": 0}))
    return run_dir


def make_jobs(data_dir: Path, running: bool = True) -> None:
    """Jobs 1 (succeeded: base, sft, ppo), 2 (failed after sft: base, sft) and, with `running`, 3 (running: nothing),
    in the data directory's SQLite database, their run directories written by `make_run_dir`."""
    from db import init_db, make_engine, make_sessionmaker, queue
    from edgerlhf.config import load_config

    engine = make_engine(f"sqlite:///{data_dir / 'edgerlhf.db'}")
    init_db(engine)
    config = load_config("tiny").to_dict()
    runs = data_dir / "runs"
    make_run_dir(runs / "job-1")
    make_run_dir(runs / "job-2", with_ppo=False)
    names = ("done", "failed-in-ppo", "running")[:3 if running else 2]
    with make_sessionmaker(engine)() as session:
        for name in names:
            queue.create_job(session, name=name, preset="tiny", config=config)
        for job_id in range(1, len(names) + 1):
            assert queue.claim_next(session, "test-worker").id == job_id
        assert queue.finish(session, 1, "test-worker")
        assert queue.fail(session, 2, "RuntimeError: ppo diverged", worker_id="test-worker")
    engine.dispose()


def sft_report(**fields) -> dict:
    """An SFT stage's report as the stage writes it (`edgerlhf.reports.SFTReport`, as JSON data)."""
    from edgerlhf.reports import SFTReport

    report = {"seconds": 12.5, "device": "cpu", "compute_dtype": "float32", "parameters": 120_000,
              "trainable_parameters": 4_096, "train_examples": 480, "eval_examples": 120, "steps": 10,
              "train_seconds": 11.0, "first_loss": 3.0, "final_loss": 2.1, "train_loss": 2.4, "eval_loss": 2.2,
              "perplexity": 9.03, "completion_only_loss": True, "memory": {"mem/rss_mb": 509.0},
              "probes": [{"step": 10, "prompt": "\n\nHuman: hi\n\nAssistant:", "response": "hello", "gold": -1.0}]}
    return SFTReport.model_validate({**report, **fields}).model_dump(mode="json")


def ev_report(algorithm: str, kl: float, sft_reward: float | None, aligned_reward: float | None,
              prompts: list[str], gold: bool = True) -> dict:
    """An evaluate report as the stage writes it (`edgerlhf.reports.EvalReport` as JSON data)."""
    from edgerlhf.reports import EvalReport

    def policy(reward, tokens, gold_mean):
        return {"reward": None if reward is None else {"mean": reward, "std": 0.1},
                "response_tokens": {"mean": tokens, "std": 2.0},
                "gold": {"mean": gold_mean, "std": 0.5} if gold else None, "cap_hit_rate": 0.0, "empty_rate": 0.0}

    diff = lambda m: {"mean": m, "low": m - 0.1, "high": m + 0.1, "confidence": 0.95, "n": len(prompts)}  # noqa: E731
    scored = sft_reward is not None
    return EvalReport.model_validate({
        "algorithm": algorithm, "n_prompts": len(prompts), "samples_per_prompt": 1,
        "reward_precision": "bf16" if scored else None, "confidence": 0.95,
        "sft": policy(sft_reward, 20.0, -1.0), "ppo": {**policy(aligned_reward, 17.0, -0.6), "kl": {"mean": kl, "std": 0.1}},
        "win_rate": 0.7 if scored else None, "reward_diff": diff(aligned_reward - sft_reward) if scored else None,
        "length_diff": diff(-3.0), "kl": kl, "gold_scorer": "question" if gold else None,
        "gold_diff": diff(0.4) if gold else None, "samples": [
            {"prompt": p, "sft": f"sft answer {i}", "ppo": f"{algorithm} answer {i}",
             "sft_reward": sft_reward, "ppo_reward": None if aligned_reward is None else aligned_reward + i,
             "sft_gold": -1.0 if gold else None, "ppo_gold": -0.5 + i if gold else None}
            for i, p in enumerate(prompts)]}).model_dump(mode="json")


class JobWriter:
    """Writes what a worker running a job writes, with the worker's own queue functions."""

    def __init__(self, db_url: str, job_id: int, worker_id: str = "test-worker"):
        from db.session import make_engine, make_sessionmaker

        self.engine = make_engine(db_url)
        self.Session = make_sessionmaker(self.engine)
        self.job_id = job_id
        self.worker_id = worker_id
        self.t = time.time()

    def claim(self) -> None:
        from db import queue

        with self.Session() as s:
            job = queue.claim_next(s, self.worker_id)
            assert job is not None and job.id == self.job_id, "expected to claim the test's job"

    def begin(self, stage: str) -> None:
        from db import queue

        with self.Session() as s:
            queue.begin_stage(s, self.job_id, stage, attempt=1)

    def end(self, stage: str, report: dict | None = None, overall: float | None = None) -> None:
        """End a stage with its report (the JSON data of its `edgerlhf.reports` model, as the worker stores it)."""
        from db import queue

        with self.Session() as s:
            queue.end_stage(s, self.job_id, stage, report, overall)

    def metrics(self, stage: str, rows: dict[str, list[float | None]], start: int = 0) -> int:
        """rows: key -> values for steps start, start+1, ...; returns the number of points written."""
        from db import queue

        batch = []
        for key, values in rows.items():
            for i, v in enumerate(values):
                self.t += 0.01
                batch.append((stage, key, start + i, v, self.t))
        with self.Session() as s:
            queue.record(s, self.job_id, metrics=batch, progress=(stage, 0.5, 0.5))
        return len(batch)

    def samples(self, stage: str, samples: list[dict]) -> None:
        from db import queue

        rows = [{"stage": stage, "kind": "sample", "checkpoint": None, "seq": 0, "time": time.time(), **s}
                for s in samples]
        with self.Session() as s:
            queue.record(s, self.job_id, samples=rows)

    def log(self, message: str, stage: str | None = None) -> None:
        from db import queue

        with self.Session() as s:
            queue.record(s, self.job_id, logs=[(time.time(), "info", stage, message)])

    def finish(self) -> None:
        from db import queue

        with self.Session() as s:
            queue.finish(s, self.job_id, self.worker_id)

    def close(self) -> None:
        self.engine.dispose()
