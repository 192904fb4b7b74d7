"""Training on the GPU: SFT and reward steps under bf16 autocast, int8 and nf4 reward models on bitsandbytes'
CUDA kernels ranking texts as the bf16 one does, and a PPO step that holds one copy of the network, measured by
`torch.cuda.memory_allocated`.

The stages run as a job runs them (`pipeline.run_stage`) on the `tiny` preset's known-answer data, moved to the
GPU and sized to seconds.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from edgerlhf import models
from edgerlhf.align import policy, ppo
from edgerlhf.config import PRECISIONS, load_config
from edgerlhf.context import RunContext
from edgerlhf.contract import CONFIG_FILE, RANDOM_BASE, SFT_MERGED, TEST_PREFS, TRAIN_PREFS, reward_dir
from edgerlhf.data import read_prefs
from edgerlhf.pipeline import run_stage
from edgerlhf.reward import spearman

from .helpers import release_this_process

pytestmark = pytest.mark.gpu

TRAINING = {"device": "cuda", "warmup": {"steps": 0}, "data": {"max_pairs": 400},
            "sft": {"max_steps": 20, "eval_every": 1000, "sample_every": 1000, "n_sample_prompts": 0},
            "reward": {"precisions": list(PRECISIONS), "max_steps": 150, "eval_every": 1000},
            "ppo": {"batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1, "response_length": 16,
                    "reward_precision": "bf16"}}
"""The `tiny` preset (a random GPT-2 on the known-answer task, `concise` gold) on the GPU: a short SFT, and a
reward model per precision trained long enough to rank held-out pairs (accuracy ~0.95 on the CPU)."""

MIN_ACCURACY = 0.75
"""Held-out accuracy every precision's reward model must reach (chance is 0.5)."""
MIN_SPEARMAN_TRAINED = 0.9
"""Rank agreement with bf16 of int8/int4 reward models trained on their own (0.9996-0.9999 on the CPU)."""
MIN_SPEARMAN_QUANTIZED = 0.95
"""Rank agreement with bf16 of the bf16-trained reward loaded in int8/int4 (0.9999 on the CPU)."""


class DtypeProbe:
    """The dtype and device of what trainable fp32 linear layers (LoRA, score head, heads trained in full) output
    in passes that record gradients: bf16 under autocast, fp32 without it."""

    def __init__(self):
        self.seen: Counter = Counter()

    def __call__(self, module, args, output):
        if isinstance(module, torch.nn.Linear) and isinstance(output, torch.Tensor) and torch.is_grad_enabled() \
                and module.weight.requires_grad and module.weight.dtype == torch.float32:
            self.seen[(str(output.dtype), output.device.type)] += 1

    @contextmanager
    def watching(self):
        handle = torch.nn.modules.module.register_module_forward_hook(self)
        try:
            yield self
        finally:
            handle.remove()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """data -> sft -> reward (bf16, int8, int4) on the GPU, each stage's trainable layers watched."""
    run_dir = tmp_path_factory.mktemp("gpu-run")
    config = load_config("tiny", TRAINING)
    (run_dir / CONFIG_FILE).write_text(config.to_json())
    ctx = RunContext(run_dir)
    run_stage("data", config, ctx)
    with DtypeProbe().watching() as sft_probe:
        sft_report = run_stage("sft", config, ctx)
    with DtypeProbe().watching() as reward_probe:
        reward_report = run_stage("reward", config, ctx)
    release_this_process()
    return SimpleNamespace(run_dir=run_dir, config=config, sft=sft_report, reward=reward_report,
                           sft_dtypes=sft_probe.seen, reward_dtypes=reward_probe.seen)


def test_sft_trains_its_lora_under_bf16_autocast_on_the_gpu(trained, record):
    report = trained.sft
    assert report.device.startswith("cuda") and report.compute_dtype == "bfloat16"
    # fp32 trainable layers produced bf16 activations on the GPU: the steps ran under bf16 autocast.
    assert set(trained.sft_dtypes) == {("torch.bfloat16", "cuda")}, trained.sft_dtypes
    assert sum(trained.sft_dtypes.values()) >= TRAINING["sft"]["max_steps"]
    assert math.isfinite(report.first_loss) and math.isfinite(report.final_loss)
    from safetensors.torch import load_file

    base = load_file(trained.run_dir / RANDOM_BASE / "model.safetensors")
    merged = load_file(trained.run_dir / SFT_MERGED / "model.safetensors")
    changed = [k for k in base if k in merged and not torch.equal(base[k].float(), merged[k].float())]
    assert any("c_attn" in k for k in changed), "the LoRA merged into the attention weights"
    record(sft_steps=report.steps, sft_seconds=report.train_seconds, sft_first_loss=report.first_loss,
           sft_final_loss=report.final_loss, sft_memory=report.memory)


def test_reward_models_train_under_bf16_autocast_in_every_precision(trained, record):
    rows = trained.reward.precisions
    assert set(rows) == set(PRECISIONS)
    assert set(trained.reward_dtypes) == {("torch.bfloat16", "cuda")}, trained.reward_dtypes
    for precision, row in rows.items():
        assert row.compute_dtype == "bfloat16" and row.peak_source == "cuda_max_allocated", (precision, row)
        assert (row.quantization is None) == (precision == "bf16"), (precision, row.quantization)
        assert math.isfinite(row.train_loss) and row.accuracy >= MIN_ACCURACY, (precision, row)
    for precision in ("int8", "int4"):
        assert rows[precision].spearman_vs_bf16 >= MIN_SPEARMAN_TRAINED, (precision, rows[precision])
    footprint = {p: row.memory_footprint_bytes for p, row in rows.items()}
    assert footprint["int4"] < footprint["int8"] < footprint["bf16"], footprint
    record(what=f"tiny known-answer model, `{trained.config.data.gold_scorer}` gold, {trained.reward.test_pairs} "
                f"held-out pairs, {TRAINING['reward']['max_steps']} steps per precision",
           precision_study={p: json.loads(r.model_dump_json()) for p, r in rows.items()})


def _reward_copies(run_dir: Path, into: Path) -> Path:
    """A run directory whose int8 and int4 reward models are the bf16 one: what loading alone does to it."""
    shutil.copytree(run_dir / "sft", into / "sft")
    shutil.copy(run_dir / CONFIG_FILE, into / CONFIG_FILE)
    for precision in PRECISIONS:
        target = into / reward_dir(precision)
        shutil.copytree(run_dir / reward_dir("bf16"), target)
        meta = json.loads((target / models.REWARD_META_FILE).read_text())
        (target / models.REWARD_META_FILE).write_text(json.dumps({**meta, "precision": precision}))
    return into


def test_int8_and_nf4_reward_models_load_on_the_gpu_and_rank_like_bf16(trained, tmp_path, record):
    import bitsandbytes as bnb

    run_dir = _reward_copies(trained.run_dir, tmp_path / "run")
    pairs = read_prefs(trained.run_dir / TEST_PREFS)
    prompts = [p["prompt"] for p in pairs] * 2
    responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    layer = {"int8": (bnb.nn.Linear8bitLt, torch.int8), "int4": (bnb.nn.Linear4bit, torch.uint8)}
    scores, footprints = {}, {}
    for precision in PRECISIONS:
        reward_model = models.load_reward_model(run_dir, precision, "cuda")
        if precision in layer:
            kind, dtype = layer[precision]
            quantized = [m for m in reward_model.modules() if isinstance(m, kind)]
            assert quantized and all(m.weight.device.type == "cuda" and m.weight.dtype == dtype for m in quantized)
        scores[precision] = reward_model.score(prompts, responses)
        footprints[precision] = reward_model.memory_footprint()
        del reward_model
        release_this_process()
    agreement = {p: spearman(scores[p], scores["bf16"]) for p in ("int8", "int4")}
    assert all(torch.isfinite(s).all() for s in scores.values())
    assert min(agreement.values()) >= MIN_SPEARMAN_QUANTIZED, agreement
    assert footprints["int4"] < footprints["int8"] < footprints["bf16"], footprints
    record(quantization_only_spearman=agreement, quantization_only_footprint_bytes=footprints)


def test_a_ppo_step_on_the_gpu_holds_one_copy_of_the_network(trained, record):
    device = torch.device("cuda")
    release_this_process()
    sft_model, _ = models.load_policy(trained.run_dir, "sft", device)
    network = sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                   for p in sft_model.parameters()}.values())
    del sft_model
    release_this_process()

    before = torch.cuda.memory_allocated(device)
    built = policy.build_models(trained.config, trained.run_dir, device)
    torch.cuda.synchronize(device)
    built_bytes = torch.cuda.memory_allocated(device) - before
    # Policy, reference (adapters off), value head and reward (a second adapter) share one set of weights.
    assert built.reward_shared and built.reward_model.model is built.model
    assert sum(policy.base_weight_storages(built.modules()).values()) == network
    assert network <= built_bytes < 1.25 * network, (built_bytes, network)

    optimizer = torch.optim.AdamW(built.policy_parameters(), lr=1e-3)
    policy_before = [p.detach().clone() for p in built.policy_parameters()]
    prompts = [row["prompt"] for row in read_prefs(trained.run_dir / TRAIN_PREFS)][:TRAINING["ppo"]["batch_size"]]
    torch.cuda.reset_peak_memory_stats(device)
    metrics, rollouts, _ = ppo.ppo_step(built, optimizer, ppo.FixedKLController(0.1), prompts, trained.config.ppo)
    torch.cuda.synchronize(device)
    step_peak = torch.cuda.max_memory_allocated(device) - before - built_bytes
    after_step = torch.cuda.memory_allocated(device) - before
    assert rollouts.response_ids.device.type == "cuda"
    assert all(math.isfinite(v) for v in metrics.values() if v is not None), metrics
    assert any(not torch.equal(a, b) for a, b in zip(policy_before, built.policy_parameters(), strict=True))
    assert after_step < built_bytes + 0.25 * network, "the step left no second copy behind (AdamW's state is tiny)"

    # The measure sees a second copy when there is one: the naive design's separate reference network.
    naive_reference = copy.deepcopy(built.model.get_base_model())
    torch.cuda.synchronize(device)
    assert torch.cuda.memory_allocated(device) - before >= after_step + 0.9 * network
    assert sum(policy.base_weight_storages(built.modules() + [naive_reference]).values()) == 2 * network
    record(ppo_network_bytes=network, ppo_built_bytes=built_bytes, ppo_step_peak_bytes=step_peak,
           ppo_metrics={k: v for k, v in metrics.items() if k.endswith(("reward_mean", "kl", "step_s"))})
