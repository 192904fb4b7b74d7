"""The reward stage on a tiny random GPT-2: the precision study (bf16, int8, int4 on the CPU), the saved
format read back by `load_reward_model` (scores equal the trained classifier's), metrics, and Spearman."""

import math
import shutil

import pytest
import torch

from edgerlhf import reward
from edgerlhf.context import RunContext
from edgerlhf.data import read_prefs
from edgerlhf.models import load_reward_model, load_tokenizer
from tests.support.tiny import REWARD_STUDY, data_and_random_sft, tiny_config


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """data/ (gold labels) and an sft/merged random model, as the earlier stages leave them."""
    return data_and_random_sft(tmp_path_factory.mktemp("reward-base"))


def new_run(tmp_path, base_run):
    shutil.copytree(base_run, tmp_path, dirs_exist_ok=True)
    ctx = RunContext(tmp_path)
    ctx.begin_stage("reward")
    return ctx


def test_spearman_exact_values():
    assert reward.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert reward.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks a = (1, 2, 3), b = (1.5, 1.5, 3): cov = 1.5, var_a = 2, var_b = 1.5 -> 1.5 / sqrt(3)
    assert reward.spearman([1, 2, 3], [5, 5, 7]) == pytest.approx(1.5 / math.sqrt(3.0))
    assert math.isnan(reward.spearman([1, 2, 3], [2, 2, 2]))


def test_precision_study(tmp_path, base_run):
    config = tiny_config(REWARD_STUDY)
    ctx = new_run(tmp_path, base_run)
    report = reward.run(config, ctx).model_dump()
    test = read_prefs(ctx.run_dir / "data" / "test_prefs.jsonl")
    assert report["test_pairs"] == len(test)
    study = report["precisions"]
    assert list(study) == ["bf16", "int8", "int4"]
    for precision, row in study.items():
        assert 0.0 <= row["accuracy"] <= 1.0 and math.isfinite(row["mean_margin"])
        assert row["memory_footprint_bytes"] > 0 and row["throughput_pairs_per_s"] > 0
        assert row["peak_train_mb"] > 0 and row["peak_source"] in ("process_rss", "cuda_max_allocated")
        if row["peak_source"] == "process_rss":  # the high-water mark since the reset covers the RSS at the reset
            assert row["peak_train_mb"] >= row["rss_before_train_mb"] and row["peak_train_delta_mb"] >= 0
        assert row["compute_dtype"] == "float32"  # the CPU computes "bf16" in fp32, and says so
        assert -1.0 <= row["spearman_vs_bf16"] <= 1.0
        for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "score_head.pt",
                     "reward_model.json"):
            assert (ctx.run_dir / "reward" / precision / name).exists()
    assert study["bf16"]["spearman_vs_bf16"] == pytest.approx(1.0)
    assert study["int4"]["memory_footprint_bytes"] < study["int8"]["memory_footprint_bytes"] \
        < study["bf16"]["memory_footprint_bytes"]

    keys = {k for _, k, _, _ in ctx.metrics}
    for precision in ("bf16", "int8", "int4"):
        assert {f"reward/{precision}/loss", f"reward/{precision}/accuracy", f"reward/{precision}/eval_accuracy",
                f"reward/{precision}/test_accuracy"} <= keys
    # per-precision curves overlay (steps 1..6 each); the memory curve runs through the stage
    assert max(s for s, _ in ctx.metric_series("reward/int4/loss")) == 6
    assert max(s for s, _ in ctx.metric_series("mem/rss_mb")) > 12
    assert ctx.progress_by_stage["reward"] == 1.0

    # the saved heads are normalised: mean 0, std 1 over the training responses
    train = read_prefs(ctx.run_dir / "data" / "train_prefs.jsonl")
    rm = load_reward_model(ctx.run_dir, "int8", "cpu")
    responses = [r["chosen"] for r in train] + [r["rejected"] for r in train]
    train_scores = rm.score([r["prompt"] for r in train] * 2, responses)
    assert abs(train_scores.mean().item()) < 1e-3 and train_scores.std().item() == pytest.approx(1.0, abs=1e-3)
    assert study["int8"]["normalization"]["samples"] == 2 * len(train)

    # every precision loads, scores, and its layers are really quantized
    layer_types = {"bf16": "Linear", "int8": "Linear8bitLt", "int4": "Linear4bit"}
    prompts, responses = [r["prompt"] for r in test[:5]], [r["chosen"] for r in test[:5]]
    for precision, layer in layer_types.items():
        rm = load_reward_model(ctx.run_dir, precision, "cpu")
        c_attn = rm.model.get_base_model().transformer.h[0].attn.c_attn.base_layer
        assert type(c_attn).__name__ == (layer if precision != "bf16" else "Conv1D")
        scores = rm.score(prompts, responses)
        assert scores.shape == (5,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_saved_model_scores_like_the_trained_classifier(tmp_path, base_run, precision):
    """The saved adapter + score head, loaded on a causal LM, reproduce the sequence classifier's rewards."""
    config = tiny_config(REWARD_STUDY, reward={"precisions": [precision], "max_steps": 3})
    ctx = new_run(tmp_path, base_run)
    device = torch.device("cpu")
    tokenizer = load_tokenizer(ctx.run_dir / "sft" / "merged")
    model = reward.load_for_training(ctx.run_dir, precision, device, config.seed)
    trainer = reward.build_trainer(config, ctx, precision, model, tokenizer, device)
    trainer.train()
    test = read_prefs(ctx.run_dir / "data" / "test_prefs.jsonl")[:6]
    prompts, responses = [r["prompt"] for r in test], [r["rejected"] for r in test]

    classifier = trainer.model.eval()
    expected = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):  # exactly what RewardTrainer feeds it: prompt + " " + response + EOS
            ids = tokenizer(p + " " + r + tokenizer.eos_token, return_tensors="pt")
            expected.append(classifier(**ids).logits[0, 0].float())
    expected = torch.stack(expected)
    assert expected.std() > 0  # the scores depend on the text, or the comparison below means nothing

    reward.save_reward_model(classifier, ctx.run_dir / "reward" / precision, precision, 96, device)
    got = load_reward_model(ctx.run_dir, precision, device).score(prompts, responses)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("pooling", ["mean", "both", "ends"])
def test_pooled_reward_is_the_pooling_of_per_token_scores_over_the_response(tmp_path, base_run, pooling):
    """`reward.pooling="mean"`: the classifier trained through `running_response_mean` and the saved model
    both give each response the mean of the score head's per-token outputs over the response's tokens;
    `"both"`: that mean plus the last token's score; `"ends"`: the response's first token's score plus its
    last's."""
    config = tiny_config(REWARD_STUDY, reward={"precisions": ["bf16"], "max_steps": 3, "pooling": pooling})
    ctx = new_run(tmp_path, base_run)
    device = torch.device("cpu")
    tokenizer = load_tokenizer(ctx.run_dir / "sft" / "merged")
    model = reward.load_for_training(ctx.run_dir, "bf16", device, config.seed)
    trainer = reward.build_trainer(config, ctx, "bf16", model, tokenizer, device)
    trainer.train()
    test = read_prefs(ctx.run_dir / "data" / "test_prefs.jsonl")[:6]
    prompts, responses = [r["prompt"] for r in test], [r["chosen"] for r in test]

    classifier = trainer.model.eval()
    per_token = {}
    head = classifier.get_submodule("base_model.model.score")
    handle = head.register_forward_hook(lambda _m, _a, out: per_token.update(scores=out[0, :, 0].float()))
    expected, last = [], []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            n_prompt = len(tokenizer(p)["input_ids"])  # GPT-2 BPE: the response's first token carries the space
            ids = tokenizer(p + " " + r, return_tensors="pt")
            classifier(**ids)
            response = per_token["scores"][n_prompt:]
            expected.append(response[0] if pooling == "ends" else response.mean())
            last.append(per_token["scores"][-1])
    handle.remove()
    expected, last = torch.stack(expected), torch.stack(last)
    assert not torch.allclose(expected, last, atol=1e-3)  # the pooling changes the scores
    if pooling != "mean":  # the head on the sum of the two hidden states (its bias, if it has one, once)
        bias = head.modules_to_save["default"].bias
        expected = expected + last - (0 if bias is None else bias.float())

    reward.save_reward_model(classifier, ctx.run_dir / "reward" / "bf16", "bf16", 96, device, pooling)
    loaded = load_reward_model(ctx.run_dir, "bf16", device)
    assert loaded.pooling == pooling
    torch.testing.assert_close(loaded.score(prompts, responses), expected, rtol=1e-3, atol=1e-3)
