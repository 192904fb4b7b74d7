"""Out-of-memory recovery: a real allocation limit makes a step run out of memory; the stage halves its
micro-batch, keeps the maths, warns, and finishes its steps; below the floor it fails quoting the planner."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch

from edgerlhf.context import RunContext
from edgerlhf.contract import MICRO_BATCH_METRIC
from edgerlhf.oom import MicroBatch, OutOfMemory, allocation_limit, is_out_of_memory
from edgerlhf.pipeline import run_stage
from tests.support.tiny import make_tiny_run, tiny_config

MB = 2**20


def test_allocation_limit_raises_where_a_large_result_is_allocated():
    layer = torch.nn.Linear(64, 1000)
    x = torch.randn(200, 64)
    with allocation_limit(0.5):
        layer(x[:2]).sum().backward()  # 8 kB of output, and views of the 256 kB weight allocate nothing
        with pytest.raises(torch.OutOfMemoryError) as info:
            layer(x)  # 800 kB
    assert is_out_of_memory(info.value)
    layer(x)  # no limit outside the block


def test_micro_batch_halves_then_fails_at_the_floor():
    sizes = []

    def attempt(size):
        sizes.append(size)
        if size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return size

    micro = MicroBatch(8, "test step", planner_hint=lambda: "the planner says 3 GiB")
    assert micro.run(1, attempt) == 2 and sizes == [8, 4, 2]
    def never_fits(size):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(OutOfMemory, match="even with a micro-batch of 1.*the planner says 3 GiB"):
        MicroBatch(4, "test step", planner_hint=lambda: "the planner says 3 GiB").run(1, never_fits)
    with pytest.raises(ValueError):  # other errors pass through untouched
        micro.run(1, lambda size: (_ for _ in ()).throw(ValueError("not memory")))


def _ppo_config(**ppo):
    return tiny_config(ppo={"batch_size": 8, "mini_batch_size": 4, "samples_per_prompt": 2, "response_length": 16,
                            "steps": 2, "ppo_epochs": 2, **ppo})


def test_ppo_step_in_halves_gives_the_same_update(tmp_path):
    """The same rollouts through one pass of 4 or two passes of 2: the same gradients, the same adapter after."""
    from edgerlhf.align.policy import build_models
    from edgerlhf.align.ppo import FixedKLController, ppo_step
    from edgerlhf.align.rollout import StepMicroBatches

    config = _ppo_config()
    run_dir = make_tiny_run(tmp_path, config)
    prompts = [f"\n\nHuman: Question {i}?\n\nAssistant:" for i in range(4) for _ in range(2)]
    after = {}
    for size in (4, 2):
        torch.manual_seed(0)
        models = build_models(config, run_dir, torch.device("cpu"))
        optimizer = torch.optim.AdamW(models.policy_parameters(), lr=1e-2)
        micro = StepMicroBatches.of(config.ppo)
        micro.passes.size = size
        torch.manual_seed(1)  # the same rollouts for both
        metrics, _, _ = ppo_step(models, optimizer, FixedKLController(0.1), prompts, config.ppo, micro, 1)
        after[size] = ([p.detach().clone() for p in models.policy_parameters()], metrics)
    for whole, halves in zip(after[4][0], after[2][0]):
        torch.testing.assert_close(halves, whole, rtol=1e-4, atol=1e-6)
    for key in ("ppo/policy_loss", "ppo/value_loss", "ppo/approx_kl"):
        assert after[2][1][key] == pytest.approx(after[4][1][key], rel=1e-4, abs=1e-7), key


def test_ppo_out_of_memory_halves_the_micro_batch_and_finishes(tmp_path, caplog):
    config = _ppo_config()
    ctx = RunContext(make_tiny_run(tmp_path, config))
    # Logits of a pass: rows x 17 positions x 50,257 tokens x 4 bytes = 3.4 MB a row. 8 MB holds the
    # network's 6.4 MB matrices and a pass of 2 rows, not of 4.
    with caplog.at_level(logging.WARNING, logger="edgerlhf"), allocation_limit(8):
        report = run_stage("ppo", config, ctx)
    assert report.steps == config.ppo.steps
    assert ctx.metric_series(MICRO_BATCH_METRIC) == [(1, 2.0)]  # halved once, at the first step
    assert any("out of memory at step 1; retrying with micro-batch 2" in r.message for r in caplog.records)
    duplicated = [k for k, n in Counter((key, step) for _, key, step, _ in ctx.metrics).items() if n > 1]
    assert not duplicated, duplicated
    assert [step for step, _ in ctx.metric_series("ppo/reward_mean")] == [1, 2]


def test_ppo_out_of_memory_at_the_floor_fails_quoting_the_planner(tmp_path):
    config = _ppo_config(response_length=48)  # one row's logits: 49 x 50,257 x 4 bytes = 9.9 MB > 8 MB
    ctx = RunContext(make_tiny_run(tmp_path, config))
    with allocation_limit(8), pytest.raises(OutOfMemory) as info:
        run_stage("ppo", config, ctx)
    assert "even with a micro-batch of 1" in str(info.value) and "memory planner" in str(info.value)


def test_sft_and_reward_out_of_memory_split_their_batches(tmp_path, caplog):
    from edgerlhf.config import load_config

    config = load_config("tiny", {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32}, "warmup": {"steps": 0},
        "data": {"max_pairs": 60}, "stages": ["data", "sft", "reward"],
        "sft": {"max_steps": 2, "batch_size": 8, "eval_every": 2, "sample_every": 2, "n_sample_prompts": 0},
        "reward": {"precisions": ["bf16"], "max_steps": 2, "batch_size": 64, "eval_every": 2}})
    ctx = RunContext(tmp_path)
    run_stage("data", config, ctx)
    # SFT's logits at the labelled positions of 8 answers take tens of MB; a quarter of them fit. The reward
    # model reads no logits: its largest results are the activations of 2 x 64 sequences, over 7 MB, while
    # its 6.4 MB embedding matrix loads under that limit.
    with caplog.at_level(logging.WARNING, logger="edgerlhf"):
        with allocation_limit(12):
            sft = run_stage("sft", config, ctx)
        with allocation_limit(7):
            reward = run_stage("reward", config, ctx)
    assert sft.steps == config.sft.max_steps and reward.precisions["bf16"].accuracy is not None
    warnings = [r.message for r in caplog.records if "retrying with micro-batch" in r.message]
    assert any(w.startswith("sft:") for w in warnings), warnings
    assert any(w.startswith("reward (bf16):") for w in warnings), warnings
    assert [v for _, k, _, v in ctx.metrics if k == MICRO_BATCH_METRIC], "the split is recorded as a metric"


def test_evaluate_out_of_memory_samples_in_halves(tmp_path, caplog, trained_run):
    config = _ppo_config(mini_batch_size=8, steps=1)  # the KL passes take 8 rollouts at a time: 27 MB of logits
    ctx = RunContext(trained_run.copy_to(tmp_path / "run"))  # a PPO policy trained on make_tiny_run's model size
    with caplog.at_level(logging.WARNING, logger="edgerlhf"), allocation_limit(8):
        report = run_stage("evaluate", config, ctx)
    assert report.n_prompts == config.evaluate.n_prompts
    assert any(r.message.startswith("evaluate: out of memory") for r in caplog.records)
    assert [v for _, k, _, v in ctx.metrics if k == MICRO_BATCH_METRIC]


class _ThreeLayers(torch.nn.Module):
    """A regression net whose middle layer's backward runs out of memory above `fail_above` rows: by then the
    head's gradients are already accumulated, as when CUDA fails part-way through a real backward."""

    def __init__(self, fail_above: int | None):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)
        self.fail_above = fail_above
        self.b.register_full_backward_hook(self._out_of_memory)

    def _out_of_memory(self, module, grad_input, grad_output):
        if self.fail_above is not None and grad_output[0].shape[0] > self.fail_above:
            raise torch.OutOfMemoryError("CUDA out of memory (raised in the backward)")

    def forward(self, input_ids, labels):
        hidden = torch.relu(self.b(torch.relu(self.a(input_ids))))
        return {"loss": ((self.head(hidden).squeeze(-1) - labels) ** 2).mean()}


def test_a_trainer_step_out_of_memory_in_the_backward_keeps_the_gradient(tmp_path):
    """The first, full-size attempt fails in its backward after the head's gradients accumulated; the halves
    must not add theirs on top (they did: 2x the head's gradient)."""
    from transformers import Trainer, TrainingArguments

    from edgerlhf.oom import SplitOnOutOfMemory

    class StageTrainer(SplitOnOutOfMemory, Trainer):
        pass

    def gradients(fail_above):
        model = _ThreeLayers(fail_above)
        trainer = StageTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                  report_to=[]))
        trainer.micro = MicroBatch(4, "test step")
        trainer.current_gradient_accumulation_steps = 1  # what Trainer's training loop sets before a step
        generator = torch.Generator().manual_seed(1)
        inputs = {"input_ids": torch.randn(4, 4, generator=generator), "labels": torch.randn(4, generator=generator)}
        trainer.training_step(model, inputs)
        return trainer.micro.size, {name: p.grad.clone() for name, p in model.named_parameters()}

    (whole_size, whole), (split_size, split) = gradients(None), gradients(2)
    assert (whole_size, split_size) == (4, 2)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-7, msg=name)
