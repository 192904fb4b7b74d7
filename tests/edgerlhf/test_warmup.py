"""The causal-LM warm-up of a random base: what it trains on, its schedule, that it learns (held-out loss
down, every parameter moved), its metrics, and that the SFT stage saves the warmed-up weights as base/."""

import math

import pytest
import torch

from edgerlhf import sft, warmup
from edgerlhf.context import Cancelled, RunContext
from edgerlhf.data import read_prefs
from edgerlhf.data import run as run_data
from edgerlhf.dialogue import PromptFormat
from edgerlhf.models import load_base_model, load_policy, load_tokenizer
from tests.support.tiny import WARMUP_STEPS, tiny_config


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    ctx = RunContext(tmp_path_factory.mktemp("warmup-data"))
    ctx.begin_stage("data")
    run_data(tiny_config(WARMUP_STEPS), ctx)
    return ctx.run_dir


def new_context(tmp_path, data_run):
    import shutil

    shutil.copytree(data_run / "data", tmp_path / "data")
    ctx = RunContext(tmp_path)
    ctx.begin_stage("sft")
    return ctx


def test_training_texts_are_prompt_and_each_response_held_out_ones_score_the_answer(data_run):
    tokenizer = load_tokenizer(tiny_config(WARMUP_STEPS).model.tokenizer)
    rows = read_prefs(data_run / "data" / "train_prefs.jsonl")
    train = warmup.encode(rows, tokenizer, max_length=4096, both=True)
    distinct = {(r["prompt"], r[side]) for r in rows for side in ("chosen", "rejected") if r[side]}
    assert len(train) == len(distinct)  # chosen and rejected alike, each text once, no empty answer
    fmt = PromptFormat.of(tokenizer)
    prompt, response = sorted(distinct)[0]
    ids, mask = train[0]
    assert ids == tokenizer(fmt.prompt(prompt) + fmt.answer(response))["input_ids"]
    assert mask == [0] + [1] * (len(ids) - 1)  # every token but the first is predicted

    held_out = warmup.encode(rows[:3], tokenizer, max_length=4096, both=False)
    for (ids, mask), row in zip(held_out, sorted(rows[:3], key=lambda r: (r["prompt"], r["chosen"]))):
        n_answer = len(tokenizer(fmt.answer(row["chosen"]), add_special_tokens=False)["input_ids"])
        assert mask == [0] * (len(ids) - n_answer) + [1] * n_answer  # the answer only, as sft/perplexity
    cut = warmup.encode(rows[:3], tokenizer, max_length=10, both=True)
    assert all(len(ids) == len(mask) <= 10 for ids, mask in cut)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    lr = [warmup.learning_rate(step, 100, 1.0) for step in range(100)]
    assert lr[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # 5 % of the steps
    assert all(a >= b for a, b in zip(lr[4:], lr[5:]))
    assert lr[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 94 / 95)))
    assert warmup.learning_rate(100, 100, 1.0) == pytest.approx(0.1)


def test_warm_up_trains_every_parameter_and_lowers_the_held_out_loss(tmp_path, data_run):
    config = tiny_config(WARMUP_STEPS)
    ctx = new_context(tmp_path, data_run)
    tokenizer = load_tokenizer(config.model.tokenizer)
    model = load_base_model(config.model, "cpu", tokenizer=tokenizer, seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = warmup.warm_up(config, ctx, model, tokenizer)

    assert result["steps"] == 40
    assert result["eval_loss"] < result["eval_loss_before"] - 2.0, result  # from ~ln(50257) = 10.8
    assert result["perplexity"] == pytest.approx(math.exp(result["eval_loss"]))
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert moved == list(before), set(before) - set(moved)
    assert [s for s, _ in ctx.metric_series("warmup/loss")] == [10, 20, 30, 40]
    assert [s for s, _ in ctx.metric_series("warmup/perplexity")] == [0, 20, 40]
    assert ctx.metric_series("warmup/eval_loss")[-1][1] == pytest.approx(result["eval_loss"])
    assert all(math.isfinite(v) for _, v in ctx.metric_series("warmup/loss"))


def test_no_steps_no_warm_up_and_a_small_data_set_gets_fewer_steps(tmp_path, data_run):
    config = tiny_config(WARMUP_STEPS, warmup=dict(steps=0))
    ctx = new_context(tmp_path / "none", data_run)
    tokenizer = load_tokenizer(config.model.tokenizer)
    model = load_base_model(config.model, "cpu", tokenizer=tokenizer, seed=0)
    weights = model.lm_head.weight.detach().clone()
    assert warmup.warm_up(config, ctx, model, tokenizer) == {}
    assert torch.equal(model.lm_head.weight, weights) and not ctx.metrics

    n_texts = len(warmup.encode(read_prefs(data_run / "data" / "train_prefs.jsonl"), tokenizer, 4096, both=True))
    config = tiny_config(WARMUP_STEPS, warmup=dict(steps=1000, max_epochs=0.5, eval_every=1000))
    result = warmup.warm_up(config, new_context(tmp_path / "capped", data_run), model, tokenizer)
    assert result["steps"] == math.ceil(0.5 * n_texts / 4) < 1000


def test_sft_saves_the_warmed_up_base(tmp_path, data_run):
    config = tiny_config(WARMUP_STEPS, warmup=dict(steps=10, eval_every=10))
    ctx = new_context(tmp_path, data_run)
    sft.run(config, ctx)
    base, tokenizer = load_policy(ctx.run_dir, "base")
    random = load_base_model(config.model, "cpu", tokenizer=tokenizer, seed=config.seed)
    assert not torch.equal(base.lm_head.weight, random.lm_head.weight)  # base/ holds the warmed-up weights
    assert [s for s, _ in ctx.metric_series("warmup/perplexity")] == [0, 10]


def test_warm_up_honours_cancel(tmp_path, data_run):
    ctx = new_context(tmp_path, data_run)
    ctx.request_cancel()
    config = tiny_config(WARMUP_STEPS)
    tokenizer = load_tokenizer(config.model.tokenizer)
    with pytest.raises(Cancelled):
        warmup.warm_up(config, ctx, load_base_model(config.model, "cpu", tokenizer=tokenizer), tokenizer)


@pytest.mark.parametrize("architecture, template", [("llama", True), ("gemma2", False)])
def test_warm_up_any_family_in_its_prompt_format(tmp_path, data_run, architecture, template):
    from tests.support.tiny import chat_template_tokenizer

    config = tiny_config(WARMUP_STEPS, warmup=dict(steps=12, eval_every=12))
    config.model.architecture, config.model.n_kv_head, config.model.intermediate_size = architecture, 1, 64
    if template:
        config.model.tokenizer = str(tmp_path / "tokenizer")
        chat_template_tokenizer(tmp_path / "tokenizer")
    tokenizer = load_tokenizer(config.model.tokenizer)
    assert PromptFormat.of(tokenizer).chat_template is template
    model = load_base_model(config.model, "cpu", tokenizer=tokenizer, seed=0)
    result = warmup.warm_up(config, new_context(tmp_path / "run", data_run), model, tokenizer)
    assert result["eval_loss"] < result["eval_loss_before"]
