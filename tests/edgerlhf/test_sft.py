"""The SFT stage on a tiny random GPT-2: the completion-only label mask, a few real training steps (LoRA
and head parameters change, loss finite, artifacts saved and loadable), metrics, probes, cancellation."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from edgerlhf import sft
from edgerlhf.context import Cancelled, RunContext
from edgerlhf.data import read_prefs
from edgerlhf.data import run as run_data
from edgerlhf.models import load_base_model, load_policy, load_tokenizer
from tests.support.tiny import SFT_STEPS, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    ctx = RunContext(tmp_path_factory.mktemp("sft-data"))
    ctx.begin_stage("data")
    run_data(tiny_config(SFT_STEPS), ctx)
    return ctx.run_dir / "data"


def new_run(tmp_path, data_dir):
    import shutil

    shutil.copytree(data_dir, tmp_path / "data")
    ctx = RunContext(tmp_path)
    ctx.begin_stage("sft")
    return ctx


@pytest.mark.parametrize("completion_only", [True, False])
def test_labels_mask_the_prompt(tmp_path, data_dir, completion_only):
    config = tiny_config(SFT_STEPS, sft={"completion_only_loss": completion_only})
    ctx = new_run(tmp_path, data_dir)
    tokenizer = load_tokenizer(config.model.tokenizer)
    model = load_base_model(config.model, "cpu", tokenizer=tokenizer)
    trainer = sft.build_trainer(config, ctx, model, tokenizer, torch.device("cpu"))
    examples = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(examples)
    source = {(r["prompt"], " " + r["chosen"]) for r in read_prefs(data_dir / "train_prefs.jsonl")}
    for i, example in enumerate(examples):
        ids, labels = batch["input_ids"][i], batch["labels"][i]  # (T,)
        n = int(batch["attention_mask"][i].sum())
        text = tokenizer.decode(ids[:n])
        prompt = next(p for p, c in source if text == p + c + tokenizer.eos_token)
        n_prompt = len(tokenizer(prompt)["input_ids"])
        assert tokenizer.decode(ids[n - 1:n]) == tokenizer.eos_token  # TRL appended EOS to the completion
        assert (labels[n:] == -100).all()  # padding never counts
        if completion_only:
            assert (labels[:n_prompt] == -100).all()
            assert torch.equal(labels[n_prompt:n], ids[n_prompt:n])
        else:
            assert torch.equal(labels[:n], ids[:n])


def test_loss_equals_trls_own(tmp_path, data_dir):
    """Our plain completion loss gives the number TRL's fused-kernel loss gives, on the same batch."""
    from trl import SFTTrainer

    config = tiny_config(SFT_STEPS)
    ctx = new_run(tmp_path, data_dir)
    tokenizer = load_tokenizer(config.model.tokenizer)
    model = load_base_model(config.model, "cpu", tokenizer=tokenizer)
    trainer = sft.build_trainer(config, ctx, model, tokenizer, torch.device("cpu"))
    with torch.no_grad():
        # a non-zero head adapter copy, so the comparison is not between two uniform distributions
        trainer.model.base_model.model.lm_head.modules_to_save["default"].weight.normal_(std=0.5)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.eval()
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, dict(batch))
        theirs = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch))
    assert abs(ours.item() - math.log(50257)) > 1.0  # not the loss of a uniform head: a real comparison
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-4)


def test_sft_trains_saves_and_reports(tmp_path, data_dir):
    config = tiny_config(SFT_STEPS)
    ctx = new_run(tmp_path, data_dir)
    report = sft.run(config, ctx).model_dump()
    run_dir = ctx.run_dir

    # artifacts: random base, adapter, merged model + tokenizer
    for path in ("base/config.json", "base/tokenizer_config.json", "sft/adapter/adapter_config.json",
                 "sft/adapter/adapter_model.safetensors", "sft/merged/config.json", "sft/merged/tokenizer.json"):
        assert (run_dir / path).exists(), path
    adapter = load_file(run_dir / "sft" / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: training moved it
    assert any("lm_head" in k for k in adapter)  # the tiny preset trains the head in full

    base, _ = load_policy(run_dir, "base")
    merged, _ = load_policy(run_dir, "sft")
    assert not torch.equal(base.transformer.h[0].attn.c_attn.weight, merged.transformer.h[0].attn.c_attn.weight)
    assert not torch.equal(base.lm_head.weight, merged.lm_head.weight)
    assert torch.equal(base.transformer.wte.weight, merged.transformer.wte.weight)  # frozen

    # report and metrics
    assert report["steps"] == 4 and math.isfinite(report["final_loss"]) and math.isfinite(report["eval_loss"])
    assert report["perplexity"] == pytest.approx(math.exp(report["eval_loss"]))
    assert report["trainable_parameters"] < report["parameters"]
    keys = {k for _, k, _, _ in ctx.metrics}
    assert {"sft/loss", "sft/eval_loss", "sft/perplexity", "sft/learning_rate", "sft/tokens_per_s",
            "mem/rss_mb"} <= keys
    assert [s for s, _ in ctx.metric_series("sft/eval_loss")] == [2, 4]
    assert all(math.isfinite(v) for _, v in ctx.metric_series("sft/loss"))
    assert ctx.progress_by_stage["sft"] == 1.0

    # probes: the same fixed held-out prompts at each sampling step, with their gold score
    probes = [s for s in ctx.samples if s.kind == "probe"]
    assert [s.checkpoint for s in probes] == ["sft/step-2"] * 2 + ["sft/step-4"] * 2
    test_prompts = [r["prompt"] for r in read_prefs(data_dir / "test_prefs.jsonl")[:2]]
    assert [s.prompt for s in probes] == test_prompts * 2
    assert all(s.reward is not None for s in probes)
    assert json.loads(json.dumps(report))  # JSON-able


def test_cancel_stops_training(tmp_path, data_dir):
    ctx = new_run(tmp_path, data_dir)
    ctx.request_cancel()
    with pytest.raises(Cancelled):
        sft.run(tiny_config(SFT_STEPS), ctx)
    assert not (ctx.run_dir / "sft" / "merged").exists()
