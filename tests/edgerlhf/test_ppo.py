"""The PPO stage on a tiny run directory: one copy of the network, adapters, training, checkpoints, resume."""

import copy
import math

import pytest
import torch

from edgerlhf import memory, models
from edgerlhf import align
from edgerlhf.align import loop, policy, ppo
from edgerlhf.config import ConfigError, load_config
from edgerlhf.context import RunContext
from edgerlhf.generation import Sampling, forward_response, generate, logprobs_from_logits, response_lengths
from tests.support.tiny import make_tiny_run, tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("ppo-run"), precisions=("bf16", "int8", "int4"))


@pytest.fixture(scope="module")
def ppo_models(run_dir):
    return policy.build_models(tiny_config(), run_dir, torch.device("cpu"))


def _base_param_count(model) -> int:
    """Bytes of a model's weights, each shared storage counted once (GPT-2 may tie its embeddings)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def test_ppo_holds_exactly_one_copy_of_the_base_weights(run_dir):
    sft_model, _ = models.load_policy(run_dir, "sft")
    base_bytes = _base_param_count(sft_model)
    del sft_model

    before = memory.tensor_bytes()
    built = policy.build_models(tiny_config(), run_dir, torch.device("cpu"))
    grown = memory.tensor_bytes() - before

    # Every object PPO holds (policy+reference network, value head, reward model) reaches one set of base weights.
    held = policy.base_weight_storages(built.modules())
    assert sum(held.values()) == base_bytes
    assert built.reward_shared and built.reward_model.model is built.model
    # Nothing else in the process grew by a second copy either (adapters and heads are tiny).
    assert base_bytes <= grown < 1.5 * base_bytes

    # The counter does see a second copy: the naive design with a separate reference model has two.
    naive_reference = copy.deepcopy(built.model.get_base_model())
    assert sum(policy.base_weight_storages(built.modules() + [naive_reference]).values()) == 2 * base_bytes


def _int8_config(**ppo_fields):
    return load_config("tiny", {**tiny_config().to_dict(), "reward": {"precisions": ["bf16", "int8"]},
                                "ppo": {**tiny_config().ppo.__dict__, "reward_precision": "int8", **ppo_fields}})


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_reward_copy_is_measured_and_bounded_by_its_size(run_dir, precision):
    """An int8/int4 reward model adds one quantized copy: measured growth = the bf16 network + that copy."""
    sft_model, _ = models.load_policy(run_dir, "sft")
    network = _base_param_count(sft_model)
    del sft_model
    standalone = models.load_reward_model(run_dir, precision)
    quantized = memory.tensor_bytes()  # measured with the quantized copy alive ...
    del standalone
    quantized -= memory.tensor_bytes()  # ... and without it
    assert 0 < quantized < network  # int8/nf4 linear layers are smaller than the fp32 ones

    before = memory.tensor_bytes()
    built = policy.build_models(_int8_config() if precision == "int8" else _int4_config(), run_dir, torch.device("cpu"))
    grown = memory.tensor_bytes() - before
    assert not built.reward_shared
    assert network + 0.9 * quantized <= grown < 1.1 * (network + quantized), (grown, network, quantized)


def test_quantized_reward_model_is_a_separate_copy(run_dir):
    built = policy.build_models(_int8_config(), run_dir, torch.device("cpu"))
    assert not built.reward_shared
    scores = built.score(["\n\nHuman: hi\n\nAssistant:"] * 2, ["hello", "a much longer answer"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    standalone = models.load_reward_model(run_dir, "int8").score(["\n\nHuman: hi\n\nAssistant:"] * 2,
                                                                  ["hello", "a much longer answer"])
    torch.testing.assert_close(scores, standalone)


def _int4_config():
    return load_config("tiny", {**tiny_config().to_dict(), "reward": {"precisions": ["bf16", "int4"]},
                                "ppo": {**tiny_config().ppo.__dict__, "reward_precision": "int4"}})


def test_quantized_policy_shares_one_int8_network(run_dir):
    """`ppo.quantized_policy`: policy, reference and int8 reward model all on one int8 network (QLoRA-style)."""
    config = _int8_config(quantized_policy=True)
    built = policy.build_models(config, run_dir, torch.device("cpu"))
    assert built.reward_shared and built.reward_model.model is built.model
    assert any(p.dtype == torch.int8 for p in built.model.parameters())
    held = policy.base_weight_storages(built.modules())
    assert held == policy.base_weight_storages([built.model])  # nothing beyond the one (quantized) network
    prompts = ["\n\nHuman: hi\n\nAssistant:"] * 2
    standalone = models.load_reward_model(run_dir, "int8").score(prompts, ["hello", "a longer answer"])
    torch.testing.assert_close(built.score(prompts, ["hello", "a longer answer"]), standalone)
    optimizer = torch.optim.AdamW(built.policy_parameters(), lr=1e-2)
    before = [p.detach().clone() for p in built.policy_parameters()]
    metrics, _, _ = ppo.ppo_step(built, optimizer, ppo.FixedKLController(0.1), prompts * 2, config.ppo)
    assert all(map(math.isfinite, metrics.values()))
    assert any(not torch.equal(a, b) for a, b in zip(before, built.policy_parameters()))


def test_shared_reward_adapter_scores_like_the_standalone_reward_model(run_dir, ppo_models):
    prompts = ["\n\nHuman: How far can spiders jump?\n\nAssistant:"] * 3
    responses = ["About a metre.", "", "They can jump many times their body length, often more than a metre."]
    standalone = models.load_reward_model(run_dir, "bf16").score(prompts, responses)
    shared = ppo_models.score(prompts, responses)
    torch.testing.assert_close(shared, standalone, rtol=1e-5, atol=1e-5)
    # Scoring hands the network back to the policy: its LoRA is trainable again, the reward LoRA frozen.
    named = dict(ppo_models.model.named_parameters())
    assert all(p.requires_grad for n, p in named.items() if "lora_" in n and ".policy." in n)
    assert not any(p.requires_grad for n, p in named.items() if "lora_" in n and ".reward." in n)
    assert ppo_models.model.active_adapter == policy.POLICY


def test_reference_is_the_sft_model_with_the_adapter_disabled(run_dir, ppo_models):
    tokenizer = ppo_models.tokenizer
    torch.manual_seed(0)
    prompts = ["\n\nHuman: Hi\n\nAssistant:", "\n\nHuman: What is a cat?\n\nAssistant:"]
    rollouts = generate(ppo_models.model, tokenizer, prompts, 6, Sampling(top_k=50, top_p=0.95))
    args = (rollouts.query_ids, rollouts.query_mask, rollouts.response_ids, rollouts.response_mask)
    lora_b = [p for n, p in ppo_models.model.named_parameters() if "lora_B" in n and ".policy." in n]
    saved = [p.detach().clone() for p in lora_b]
    with torch.no_grad():
        for p in lora_b:
            p.normal_(std=0.5)  # make the policy differ from the reference
        tokens = rollouts.response_ids
        policy_logp = logprobs_from_logits(ppo_models.forward(*args)[0], tokens)
        ref_logp = logprobs_from_logits(ppo_models.reference_logits(*args), tokens)
        sft_model, _ = models.load_policy(run_dir, "sft")
        sft_logp = logprobs_from_logits(forward_response(sft_model, *args)[0], tokens)
        for p, s in zip(lora_b, saved):
            p.copy_(s)
    mask = rollouts.response_mask.bool()
    torch.testing.assert_close(ref_logp[mask], sft_logp[mask])
    assert not torch.allclose(policy_logp[mask], sft_logp[mask])


def test_forward_response_reproduces_the_sampling_log_probs(ppo_models):
    # With left padding, log-probs recomputed in one pass must match those the sampler used.
    model, tokenizer = ppo_models.model, ppo_models.tokenizer
    prompts = ["\n\nHuman: Hi\n\nAssistant:", "\n\nHuman: Tell me a long story about a cat and a dog\n\nAssistant:"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=5, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        response_ids = out.sequences[:, batch["input_ids"].shape[1]:]
        step_logp = torch.stack([torch.log_softmax(s, -1) for s in out.scores], 1).gather(
            -1, response_ids.unsqueeze(-1)).squeeze(-1)
        logits, _ = forward_response(model, batch["input_ids"], batch["attention_mask"], response_ids,
                                         torch.ones_like(response_ids))
        logp = logprobs_from_logits(logits, response_ids)
    torch.testing.assert_close(logp, step_logp, rtol=1e-4, atol=1e-4)


def test_response_lengths_stop_at_eos_or_a_stop_marker(ppo_models):
    tok = ppo_models.tokenizer
    eos = tok.eos_token_id
    hello = tok(" Hello there")["input_ids"]
    human = tok("\n\nHuman: more")["input_ids"]
    rows = [hello + [eos, eos, eos], hello + human, hello + tok(" friend")["input_ids"] + [5] * 6]  # no end: all of it
    width = max(map(len, rows))
    ids = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
    lengths, texts = response_lengths(tok, ids)
    # "\n\nHuman:" ends on its ':' token: the response includes the marker tokens, the text does not.
    n_marker = len(tok("\n\nHuman:")["input_ids"])
    assert lengths == [len(hello) + 1, len(hello) + n_marker, width]
    assert texts[:2] == ["Hello there", "Hello there"]


def test_ppo_config_validates_grad_accum():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", {"ppo": {"batch_size": 8, "mini_batch_size": 2, "grad_accum": 3}})
    assert err.value.field == "ppo.grad_accum"


class StopAfter(RunContext):
    """A context whose run is cancelled once `n` PPO steps have been logged (as a user would cancel it)."""

    def __init__(self, run_dir, n):
        super().__init__(run_dir)
        self.n = n

    def _poll_cancel(self):
        return len(self.metric_series("ppo/kl")) >= self.n


def test_ppo_trains_checkpoints_and_resumes_with_the_same_steps(tmp_path):
    from edgerlhf.context import Cancelled

    config = tiny_config(ppo=dict(steps=4, checkpoint_every=2, grad_accum=2, batch_size=8, lr_warmup_steps=3))
    run_dir = make_tiny_run(tmp_path / "run", config)
    lr = config.ppo.learning_rate

    ctx = StopAfter(run_dir, 3)
    ctx.begin_stage("ppo")
    with pytest.raises(Cancelled):
        align.run(config, ctx)
    first = {k: dict(ctx.metric_series(k)) for k in ("ppo/reward_mean", "ppo/kl", "ppo/policy_loss")}
    assert sorted(first["ppo/kl"]) == [1, 2, 3]
    expected_keys = {"ppo/reward_mean", "ppo/reward_std", "ppo/kl", "ppo/kl_coef", "ppo/entropy", "ppo/policy_loss",
                     "ppo/value_loss", "ppo/clip_frac", "ppo/approx_kl", "ppo/response_length", "ppo/tokens_per_s",
                     "ppo/learning_rate", "mem/rss_mb"}
    assert expected_keys <= {k for _, k, step, _ in ctx.metrics if step == 1}
    assert dict(ctx.metric_series("ppo/learning_rate")) == pytest.approx({1: lr / 3, 2: 2 * lr / 3, 3: lr})
    assert (run_dir / "ppo" / "checkpoint" / loop.CHECKPOINT_FILE).exists()
    probes = {s.checkpoint for s in ctx.samples if s.kind == "probe"}
    assert probes == {"ppo/step-0", "ppo/step-2"}
    # Probes are on the SFT probes' scale: the gold score of the known-answer task, not the reward model's.
    from edgerlhf import gold

    assert all(s.reward == gold.score(s.prompt, s.response) for s in ctx.samples if s.kind == "probe")
    assert any(s.kind == "sample" and s.reward is not None for s in ctx.samples)

    resumed = RunContext(run_dir)
    resumed.begin_stage("ppo")
    report = align.run(config, resumed).model_dump()
    assert report["resumed_from_step"] == 2
    assert sorted(dict(resumed.metric_series("ppo/kl"))) == [3, 4]
    assert dict(resumed.metric_series("ppo/learning_rate")) == pytest.approx({3: lr, 4: lr})  # the warm-up went on
    # Step 3 again, from the checkpoint, is the same step 3: same prompts, samples and update.
    for key, series in first.items():
        assert dict(resumed.metric_series(key))[3] == pytest.approx(series[3], rel=1e-5, abs=1e-7)
    assert report["final"]["ppo/kl"] is not None and report["held_bytes"] > 0

    # The trained adapter is a standard peft adapter: the shared loader applies it to sft/merged.
    adapter = run_dir / "ppo" / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / policy.VALUE_HEAD_FILE).exists()
    trained, _ = models.load_policy(run_dir, "ppo")
    sft, _ = models.load_policy(run_dir, "sft")
    changed = [not torch.equal(a, b) for (n, a), (_, b) in zip(trained.named_parameters(), sft.named_parameters())
               if "c_attn" in n and n.endswith("weight")]
    assert any(changed)  # the LoRA update moved the merged weights

    # A stage that already finished resumes at its end and trains no more.
    again = RunContext(run_dir)
    again.begin_stage("ppo")
    assert align.run(config, again).resumed_from_step == 4
    assert again.metric_series("ppo/kl") == []

    # A checkpoint trained against other sft/reward models does not apply to this run directory.
    signature = loop._signature(config, run_dir)
    weights = next((run_dir / "sft" / "merged").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())
    assert loop._signature(config, run_dir) != signature


def _runs_code(marker: str) -> dict:
    """What unpickling `_CodeInAPickle` calls: proof that loading a checkpoint ran code of the file's choosing."""
    from pathlib import Path

    Path(marker).write_text("ran")
    return {}


class _CodeInAPickle:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return _runs_code, (self.marker,)


def test_checkpoints_load_weights_only_and_one_that_needs_a_full_unpickle_is_ignored(run_dir, ppo_models, tmp_path,
                                                                                     caplog):
    """A checkpoint holds tensors and plain data only (the RNG states too), so it loads with `weights_only=True`; a
    file that only a full unpickle could read (an old checkpoint, or one planted in the run directory) is never
    unpickled: the stage warns and starts afresh."""
    import logging

    import numpy as np

    config = tiny_config()
    optimizer = torch.optim.AdamW(ppo_models.policy_parameters(), lr=1e-3)
    kl_ctl = ppo.kl_controller(config)
    ckpt = tmp_path / "checkpoint"
    np.random.seed(7)
    loop.save_checkpoint(ckpt, 3, ppo_models, optimizer, kl_ctl, config, run_dir)
    state = torch.load(ckpt / loop.CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    assert state["step"] == 3
    numpy_state = np.random.get_state()
    assert state["rng"]["numpy"][0] == numpy_state[0]
    assert np.array_equal(np.asarray(state["rng"]["numpy"][1]), numpy_state[1])
    assert loop.load_checkpoint(ckpt, ppo_models, optimizer, kl_ctl, config, run_dir) == 3

    marker = tmp_path / "ran"
    torch.save(_CodeInAPickle(marker), ckpt / loop.CHECKPOINT_FILE)
    with caplog.at_level(logging.WARNING):
        assert loop.load_checkpoint(ckpt, ppo_models, optimizer, kl_ctl, config, run_dir) is None
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert "weights_only" in caplog.text and "starting afresh" in caplog.text
