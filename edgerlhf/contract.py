"""The names every layer shares: stages, precisions, statuses, the run-directory layout, metric namespaces,
and how overrides apply to a preset.

The pipeline, the database, the worker, the backend and the dashboard import these; nobody retypes them.
Plain Python only (no torch, no SQLAlchemy, no FastAPI), so every process can import it cheaply. The
report models of the stages are the other half of the contract (`edgerlhf.reports`).
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STAGES = ("data", "sft", "reward", "ppo", "evaluate")
"""The pipeline's stages, in the order they run."""


@dataclass(frozen=True)
class Algorithm:
    """What every layer needs to know of one alignment algorithm: one row of `ALGORITHM_TABLE`."""

    name: str
    """`PipelineConfig.algorithm`, and the namespace of its metrics (`grpo/kl`)."""
    label: str
    """How a person reads it: PPO, GRPO, RLOO, DPO, KTO."""
    section: str
    """The config section holding its settings: the sampling algorithms share `ppo`; DPO reads `dpo`, KTO `kto`."""
    samples: bool
    """True: samples from the policy and scores the samples with the reward model (or a reward function), in our
    loop (`edgerlhf.align.loop`); False: trains offline through a TRL trainer, on the preference pairs (DPO) or on
    answers labelled desirable or undesirable (KTO)."""
    samples_per_prompt: int
    """The default of `ppo.samples_per_prompt`: 1, or the group a sample is compared with (0: does not sample)."""
    min_samples_per_prompt: int
    """The fewest samples per prompt it can learn from: a group baseline needs at least 2."""
    value_head: bool
    """Trains a critic beside the policy (PPO's value head on the shared trunk)."""
    adaptive_kl: bool
    """Honours `ppo.adaptive_kl` (Ziegler et al.'s controller); the others hold `ppo.init_kl_coef` fixed."""
    exact_kl: bool = True
    """Its `<name>/kl` is an exact KL(policy || reference), zero only where the policy is the reference. False: KTO's
    is TRL's estimate from mismatched answers clamped at 0, which stays at 0 while the policy moves away from the
    reference on them (the dashboard's KL-collapse warning does not read it)."""


ALGORITHM_TABLE = {a.name: a for a in (
    Algorithm("ppo", "PPO", "ppo", samples=True, samples_per_prompt=1, min_samples_per_prompt=1, value_head=True,
              adaptive_kl=True),
    Algorithm("grpo", "GRPO", "ppo", samples=True, samples_per_prompt=4, min_samples_per_prompt=2,
              value_head=False, adaptive_kl=False),
    Algorithm("rloo", "RLOO", "ppo", samples=True, samples_per_prompt=4, min_samples_per_prompt=2,
              value_head=False, adaptive_kl=False),
    Algorithm("dpo", "DPO", "dpo", samples=False, samples_per_prompt=0, min_samples_per_prompt=0,
              value_head=False, adaptive_kl=False),
    Algorithm("kto", "KTO", "kto", samples=False, samples_per_prompt=0, min_samples_per_prompt=0,
              value_head=False, adaptive_kl=False, exact_kl=False),
)}
"""Alignment algorithms the `ppo` stage (the alignment stage; its name predates the others) can run, by name.
Every layer reads an algorithm's traits here instead of comparing its name."""

ALGORITHMS = tuple(ALGORITHM_TABLE)
"""Their names (`PipelineConfig.algorithm`): ppo, grpo, rloo, dpo, kto."""


def algorithm_traits(name: str) -> Algorithm:
    """The row of `ALGORITHM_TABLE` for `name`, or a ValueError naming the choices."""
    if name not in ALGORITHM_TABLE:
        raise ValueError(f"unknown algorithm {name!r}; choose from {list(ALGORITHMS)}")
    return ALGORITHM_TABLE[name]


PRECISIONS = ("bf16", "int8", "int4")
"""Reward-model precisions: bf16 weights, or bitsandbytes int8 / nf4 (int4) quantized weights."""

REWARD_POOLINGS = ("last", "mean", "both", "ends")
"""How a reward model turns the hidden states into one score: the last token's (the usual choice, Ouyang et
al. 2022), their mean over the response's tokens (a score per token, averaged: it sees a property spread
over the answer, such as a share of words, that one position summarises poorly), `both` summed (a
property of one place, such as the closing mark, and one spread over the answer, from the same head), or
`ends`, the response's first token's plus its last token's (how the answer opens, which a small model reads
poorly from the last position, and how it ends; one position each, nothing a policy can add up by repeating
words)."""

ENSEMBLE_SCORES = ("mean_minus_std", "min")
"""The values of `ppo.ensemble_score` (the dashboard's choices too)."""

KEEP_BEST = ("none", "validation", "gold", "auto")
"""The values of `ppo.keep_best` (the dashboard's choices too)."""

# --- sizes the planner mirrors: the stages (which import torch) and the planner (which must not) read these --

SCORE_BATCH = 32
"""Texts per reward-model pass (`models.RewardModel.score`'s batch)."""
EVAL_GEN_BATCH = 16
"""Prompts per `generate` call in the evaluation stage."""
ALL_LINEAR = "all-linear"
"""peft's `target_modules` shorthand for every linear layer but the output head."""
KL_CHUNK = 2 ** 22
"""Logits per piece of DPO's exact KL (`align.dpo.chosen_kl`) and of the offline trainers' CPU log-prob head
(`align.offline.AnswerLogprobs`, DPO's and KTO's),
16 MB in fp32: whole next-token distributions some tens of positions at a time (83 for a 50k vocabulary)."""


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied: a dict merges into a dict key by key, any other value replaces.

    How a job's config is built from its preset (`config.load_config`), the CLI's `--config` and `--set`,
    the benchmark's model and the dashboard's form. Neither argument is changed; the result shares nothing
    with them.
    """
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class JobStatus(str, enum.Enum):
    """Life cycle of a job. Only `db.queue` moves a job from one status to another."""

    queued = "queued"
    """Waiting for a worker; `claim_next` takes the oldest queued job first."""
    running = "running"
    """Claimed by the worker in `worker_id`, which heartbeats; requeued if the heartbeat stops."""
    succeeded = "succeeded"
    """Every stage of the job's config finished."""
    failed = "failed"
    """A stage raised (message and traceback in `error`/`traceback`), or the job ran out of attempts."""
    cancelled = "cancelled"
    """Stopped on request; metrics up to the stop are kept."""


FINISHED = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)
"""Statuses a job never leaves by itself (only `retry` requeues failed or cancelled jobs)."""


class StageStatus(str, enum.Enum):
    """Status of one stage of one job. The API shows a stage not yet begun as `pending` (it has no row)."""

    pending = "pending"
    """Not begun in any attempt (API only; never stored)."""
    running = "running"
    """Begun in the current attempt."""
    succeeded = "succeeded"
    """Finished; its report is stored and a resumed job skips it."""
    failed = "failed"
    """Raised; the job failed with it."""
    cancelled = "cancelled"
    """Was running when the job was cancelled."""
    interrupted = "interrupted"
    """Was running when its worker died; runs again from its start (or its own checkpoint) on resume."""


# --- the run directory ----------------------------------------------------------------------------
#
#   <data dir>/runs/job-<id>/         a job's run directory (`job_run_dir`); `edgerlhf pipeline --run-dir` any
#       config.json                   the whole PipelineConfig
#       <stage>/report.json           each stage's report (edgerlhf.reports)
#       data/train_prefs.jsonl, data/test_prefs.jsonl     preference pairs (reward model, DPO)
#       data/train_unpaired.jsonl, data/test_unpaired.jsonl   answers labelled desirable or not (KTO)
#       data/sft_train.jsonl, data/sft_test.jsonl         demonstrations (SFT)
#       data/prompts_train.jsonl, data/prompts_test.jsonl prompts (PPO, GRPO, RLOO, probes, evaluation)
#       data/votes.jsonl              only with data.votes_file: the arena vote pairs the job used (edgerlhf.votes)
#       base/                         only for model.random_init: the random base LM + tokenizer; in a later round
#                                     (round.parent_run) that has demonstrations: the parent's aligned policy
#       sft/merged/                   the SFT policy, LoRA merged in (save_pretrained); in a later round without
#                                     demonstrations: the parent's aligned policy (edgerlhf.export's merge)
#       reward/<precision>/           adapter/, score_head.pt, reward_model.json
#       reward/validation/            the same files: the validation reward model (reward.validation)
#       reward/ensemble/<i>/          the same files: ensemble member i >= 1 (reward.ensemble)
#       ppo/adapter/                  the aligned policy's LoRA adapter (+ value_head.pt for PPO), whatever the algorithm
#       ppo/checkpoint/               state.pt, to resume
#       export/model/                 the PPO policy merged into one model directory (edgerlhf.export), on request
#       export/gguf-<quant>/          the same policy as one GGUF file + Modelfile + README.md, on request
#       tensorboard/                  every metric as TensorBoard event files (edgerlhf.context)

CONFIG_FILE = "config.json"
REPORT_FILE = "report.json"
TRAIN_PREFS = "data/train_prefs.jsonl"
TEST_PREFS = "data/test_prefs.jsonl"
SFT_TRAIN = "data/sft_train.jsonl"
"""SFT's demonstrations {prompt, completion} (`edgerlhf.data.demonstrations`)."""
SFT_TEST = "data/sft_test.jsonl"
TRAIN_UNPAIRED = "data/train_unpaired.jsonl"
"""KTO's unpaired examples {prompt, completion, label} (`edgerlhf.data.unpaired`): a data set's own, or each
preference pair split into its chosen answer (desirable) and its rejected one (undesirable)."""
TEST_UNPAIRED = "data/test_unpaired.jsonl"
PROMPTS_TRAIN = "data/prompts_train.jsonl"
"""The prompts {prompt, ...} the sampling algorithms train on (`edgerlhf.data.prompts`)."""
PROMPTS_TEST = "data/prompts_test.jsonl"
"""The held-out prompts of the probes and the evaluation."""
VOTES_PAIRS = "data/votes.jsonl"
RANDOM_BASE = "base"
SFT_MERGED = "sft/merged"
PPO_ADAPTER = "ppo/adapter"
EXPORTED_MODEL = "export/model"
"""The aligned policy merged into one Hugging Face model directory (`edgerlhf.export`)."""
EXPORT_FORMATS = ("hf", "gguf")
"""What an export writes: `hf`, one Hugging Face model directory (`EXPORTED_MODEL`); `gguf`, one GGUF file for
llama.cpp, Ollama and LM Studio with an Ollama Modelfile (`exported_gguf`)."""
GGUF_QUANTS = ("f16", "q8_0")
"""Weight types of a GGUF export's matrices: f16 (2 bytes a weight), q8_0 (8-bit blocks of 32 with an f16 scale,
34 bytes per 32 weights). Norms and biases stay float32 in both."""


def exported_gguf(quant: str) -> str:
    """The GGUF export of one quant, relative to a run directory."""
    if quant not in GGUF_QUANTS:
        raise ValueError(f"unknown GGUF quant {quant!r}; choose from {list(GGUF_QUANTS)}")
    return f"export/gguf-{quant}"


def gguf_file_name(quant: str) -> str:
    """The GGUF file in `exported_gguf(quant)` (the Modelfile's `FROM`)."""
    return f"model-{quant}.gguf"
TENSORBOARD_DIR = "tensorboard"
"""TensorBoard event files of every metric the run logged (`RunContext.log_metrics`)."""


def job_run_dir(runs_dir: Path, job_id: int) -> Path:
    """The run directory of job `job_id` under the service's `runs` directory."""
    return Path(runs_dir) / f"job-{int(job_id)}"


def reward_dir(precision: str) -> str:
    """The reward model of one precision, relative to a run directory."""
    return f"reward/{precision}"


VALIDATION_REWARD = "reward/validation"
"""The validation reward model (`reward.validation`), relative to a run directory: the files of a `reward_dir`, trained
on its share of the training pairs (`reward.validation_share`) in `network_precision`, and loaded by the sampling
algorithms as one more frozen adapter on their one network to score the rollouts beside the reward model they train
against."""


ENSEMBLE_REWARD = "reward/ensemble"
"""The extra members of a reward-model ensemble (`reward.ensemble`), relative to a run directory: member i >= 1 in
`ensemble_reward_dir(i)` (member 0 is the main reward model, `reward_dir`), each the files of a `reward_dir`, trained
on a bootstrap resample of the main model's pairs in `network_precision`, and loaded by the sampling algorithms as
frozen adapters on their one network."""


def ensemble_reward_dir(member: int) -> str:
    """Member `member` (>= 1) of the reward-model ensemble, relative to a run directory."""
    return f"{ENSEMBLE_REWARD}/{member}"


def network_precision(reward_precision: str, quantized_policy: bool) -> str:
    """The precision of the alignment stage's one network (`align.policy.build_models`, `plan`): the reward model's
    int8/int4 with `ppo.quantized_policy` (QLoRA-style), else bf16. The validation reward model is trained in it, so
    its adapter scores on the very base it was trained on."""
    return reward_precision if quantized_policy else "bf16"


# --- metric keys ------------------------------------------------------------------------------------

def algorithm_metric(algorithm: str, name: str) -> str:
    """`grpo/reward_mean`: metric `name` of the alignment stage run with `algorithm`. Every algorithm that
    samples logs `reward_mean`, `reward_std`, `kl`, `response_length`, `entropy`, `policy_loss`, `step_s` and
    `tokens_per_s` under its own namespace, and the independent signals of the same rollouts
    (`align.rollout.independent_metrics`): with `reward.validation` `validation_reward_mean` and
    `proxy_validation_spearman`, on the known-answer task `gold_mean` and `proxy_gold_spearman`; DPO logs `loss`,
    `accuracy`, `margin`, `kl`; KTO `loss`, `kl`, `chosen_reward`, `rejected_reward`, `margin`. The dashboard
    reads a job's curves through this, whichever algorithm it ran."""
    return f"{algorithm}/{name}"


MEMORY_PREFIX = "mem/"
"""Memory readings (`mem/peak_mb`, `mem/rss_mb` ...), written by the stages only, at their own steps
(`edgerlhf.memory.snapshot`): the stage knows its device and when it reset the peak."""

MICRO_BATCH_METRIC = MEMORY_PREFIX + "micro_batch"
"""Rows per forward/backward pass after a step ran out of memory and was retried in halves (`edgerlhf.oom`);
logged only when it changes. The dashboard's alerts show it."""

SAMPLED_PREFIX = "sys/"
"""The job process's memory sampled every few seconds, between the stages' steps too (`sys/rss_mb`,
`sys/gpu_used_mb`: `edgerlhf.memory.sampled`), written by the worker's sampler only
(`worker.context.DBContext.sample_memory`). Apart from `mem/*`, so each key has one writer."""
