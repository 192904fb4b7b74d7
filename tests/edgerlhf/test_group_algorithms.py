"""GRPO and RLOO: their math against hand-computed values, a step on the tiny network, one copy of the base
weights (measured), checkpoints and resume through the alignment stage."""

import contextlib
import math

import pytest
import torch

from edgerlhf import align, memory, models
from edgerlhf.align import grpo, loop, losses, policy, ppo, rloo, rollout
from edgerlhf.config import load_config
from edgerlhf.context import Cancelled, RunContext
from edgerlhf.generation import Sampling, forward_response, generate, policy_stats
from edgerlhf.oom import allocation_limit
from tests.support.tiny import make_tiny_run, tiny_config

ALGORITHMS = ("grpo", "rloo")
COMMON_METRICS = ("reward_mean", "reward_std", "kl", "response_length", "cap_hit_rate", "entropy", "policy_loss",
                  "clip_frac", "step_s", "tokens_per_s", "generation_s")


def algorithm_config(algorithm: str, **ppo_fields):
    """The shrunk `tiny` config of the PPO tests (4 samples per prompt) with `algorithm` set."""
    return load_config("tiny", {**tiny_config(ppo=ppo_fields).to_dict(), "algorithm": algorithm})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("group-run"))


# --- the math ----------------------------------------------------------------------------------------


def test_group_advantages_normalise_each_group_by_its_own_mean_and_std():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # unbiased std of the first group (mean 3)
    expected = torch.tensor([-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0])
    expected[:4] /= std + 1e-4
    torch.testing.assert_close(grpo.group_advantages(scores, 4), expected)
    # Groups are consecutive runs: (0, 2) has mean 1 and std sqrt(2), (7, 3) mean 5 and std sqrt(8).
    pairs = grpo.group_advantages(torch.tensor([0.0, 2.0, 7.0, 3.0]), 2)
    a, b = 1 / (math.sqrt(2) + 1e-4), 2 / (math.sqrt(8) + 1e-4)
    torch.testing.assert_close(pairs, torch.tensor([-a, a, b, -b]))


def test_rloo_puts_the_kl_in_the_reward_and_subtracts_the_mean_of_the_others():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    seq_kl = torch.tensor([0.0, 1.0, 2.0, 4.0])
    rewards = rloo.rloo_rewards(scores, seq_kl, beta=0.5)
    torch.testing.assert_close(rewards, torch.tensor([1.0, 1.5, 2.0, 4.0]))
    advantages = rloo.rloo_advantages(rewards, 4)
    # 1 - (1.5 + 2 + 4) / 3, 1.5 - (1 + 2 + 4) / 3, 2 - (1 + 1.5 + 4) / 3, 4 - (1 + 1.5 + 2) / 3
    torch.testing.assert_close(advantages, torch.tensor([-1.5, 1.5 - 7 / 3, 2 - 6.5 / 3, 2.5]))
    # Two prompts of two: each against its sibling only.
    torch.testing.assert_close(rloo.rloo_advantages(torch.tensor([1.0, 3.0, 10.0, 4.0]), 2),
                               torch.tensor([-2.0, 2.0, 6.0, -6.0]))


def test_k3_is_nonnegative_zero_at_the_reference_and_pulls_the_policy_back():
    torch.manual_seed(0)
    ref = torch.randn(64).log_softmax(0)
    logp = torch.randn(64).log_softmax(0)
    k3 = losses.kl_estimate(logp, ref, "k3")
    assert (k3 >= 0).all() and k3.sum() > 0
    assert losses.kl_estimate(ref, ref, "k3").abs().max() == 0
    # By hand: log p = log 0.5, log q = log 0.25 -> q/p - 1 - log(q/p) = 0.5 - 1 + log 2.
    torch.testing.assert_close(losses.kl_estimate(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]), "k3"),
                               torch.tensor([math.log(2) - 0.5]))
    # In GRPO's loss (zero advantages, so only the KL term): the gradient lowers a log-prob above the
    # reference's and raises one below it.
    logprobs = torch.tensor([[-1.0, -3.0]], requires_grad=True)
    ref_logprobs = torch.tensor([[-2.0, -2.0]])
    loss, stats = grpo.grpo_loss(logprobs, logprobs, logprobs.detach(), ref_logprobs, torch.zeros(1),
                                 torch.ones(1, 2), cliprange=0.2, beta=1.0)
    loss.backward()
    assert logprobs.grad[0, 0] > 0 and logprobs.grad[0, 1] < 0  # gradient descent moves both towards -2
    assert stats["k3_kl"] > 0


@pytest.mark.parametrize("advantage, ratio, clipped", [(1.0, 1.5, True), (1.0, 0.5, False),
                                                       (-1.0, 0.5, True), (-1.0, 1.5, False), (1.0, 1.1, False)])
def test_ratio_clipping_stops_the_gradient_only_beyond_the_trust_region_on_the_advantage_side(
        advantage, ratio, clipped):
    """A ratio already moved past 1 + eps in the direction the advantage favours (up for A > 0, down for
    A < 0) gets no more gradient; one on the other side keeps its full gradient, whose sign follows A."""
    old = torch.tensor([[-2.0]])
    new = (old + math.log(ratio)).requires_grad_(True)
    loss, stats = grpo.grpo_loss(new, new, old, new.detach(), torch.tensor([advantage]), torch.ones(1, 1), 0.2, 0.0)
    loss.backward()
    seq = (old[:, 0] + math.log(ratio)).requires_grad_(True)
    seq_loss, seq_stats = rloo.rloo_loss(seq, old[:, 0], torch.tensor([advantage]), 0.2)
    seq_loss.backward()
    for grad, frac in ((new.grad.item(), stats["clip_frac"].item()), (seq.grad.item(), seq_stats["clip_frac"].item())):
        if clipped:
            assert grad == 0.0 and frac == 1.0
        else:
            assert frac == 0.0
            assert grad == pytest.approx(-advantage * ratio)  # d(-A r)/d log pi = -A r: descent raises log pi if A > 0


def test_minibatch_pieces_are_weighted_by_their_share_of_the_loss_units():
    """The shared update loop: a minibatch cut into pieces of 1 (after out-of-memory errors) gives the
    gradient of the whole when rows count for different numbers of units (tokens of unequal responses)."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(batch_size=4, mini_batch_size=4, ppo_epochs=1, grad_accum=1, max_grad_norm=1e9)
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 3.0]])
    row_weights = torch.tensor([1.0, 2.0, 3.0, 6.0])  # e.g. response lengths

    def piece_loss(rows):  # a mean over the piece's units, as every algorithm's loss is
        loss = (row_weights[rows, None] * features[rows] * weight).sum() / row_weights[rows].sum()
        return loss, {"loss": loss}

    after = {}
    for size in (4, 1):
        weight = torch.nn.Parameter(torch.ones(2))
        micro = rollout.StepMicroBatches.of(SimpleNamespace(batch_size=4, mini_batch_size=4))
        micro.passes.size = size
        stats = rollout.minibatch_updates([weight], torch.optim.SGD([weight], lr=1.0), cfg, micro, 1, row_weights,
                                      piece_loss)
        after[size] = weight.detach().clone(), stats["loss"]
    gradient = (row_weights[:, None] * features).sum(0) / row_weights.sum()  # of the mean over all units
    whole_loss = (row_weights * features.sum(1)).sum() / row_weights.sum()  # at the weights before the step
    for size in (4, 1):
        torch.testing.assert_close(after[size][0], 1 - gradient)
        assert after[size][1] == pytest.approx(whole_loss.item())


# --- on the tiny network ------------------------------------------------------------------------------


def _sequence_logprobs(built, rollouts, sampling):
    logits, _ = forward_response(built.model, rollouts.query_ids, rollouts.query_mask, rollouts.response_ids,
                                 rollouts.response_mask, sampling)
    stats = policy_stats(logits, rollouts.response_ids, sampling)
    return stats, (stats.logprobs * rollouts.response_mask).sum(1)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_one_update_raises_the_log_prob_of_the_better_response(run_dir, algorithm):
    """Four responses to one prompt, the first scored best and the last worst: one gradient step on the
    algorithm's loss makes the first more likely and the last less likely."""
    config = algorithm_config(algorithm)
    built = policy.build_models(config, run_dir, torch.device("cpu"))
    sampling = Sampling.of(config.ppo)
    torch.manual_seed(3)
    rollouts = generate(built.model, built.tokenizer, ["\n\nHuman: What is a cat?\n\nAssistant:"] * 4, 8, sampling)
    assert len(set(rollouts.responses)) == 4
    scores = torch.tensor([2.0, 0.5, 0.0, -1.0])
    mask = rollouts.response_mask.float()
    with torch.no_grad():
        old_logp, old_seq = _sequence_logprobs(built, rollouts, sampling)
    optimizer = torch.optim.SGD(built.policy_parameters(), lr=0.05)
    logp, seq = _sequence_logprobs(built, rollouts, sampling)
    if algorithm == "grpo":
        loss, _ = grpo.grpo_loss(logp.logprobs, logp.full_logprobs, old_logp.logprobs, old_logp.full_logprobs,
                                 grpo.group_advantages(scores, 4), mask, 0.2, 0.1)
    else:
        advantages = rloo.rloo_advantages(rloo.rloo_rewards(scores, torch.zeros(4), 0.1), 4)
        loss, _ = rloo.rloo_loss(seq, old_seq, advantages, 0.2)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        _, new_seq = _sequence_logprobs(built, rollouts, sampling)
    change = new_seq - old_seq
    assert change[0] > 0 > change[3], change


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_step_trains_the_adapter_alone_on_one_copy_of_the_network(run_dir, algorithm):
    config = algorithm_config(algorithm, batch_size=8, mini_batch_size=4, ppo_epochs=2)
    sft_model, _ = models.load_policy(run_dir, "sft")
    base_bytes = sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                      for p in sft_model.parameters()}.values())
    del sft_model

    built = policy.build_models(config, run_dir, torch.device("cpu"))
    assert built.value_head is None  # the group is the baseline: no critic to train or save
    params = built.policy_parameters()
    assert params and all("lora_" in n and ".policy." in n for n, p in built.model.named_parameters()
                          if any(p is q for q in params))
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    before_step = memory.tensor_bytes()
    weights = [p.detach().clone() for p in params]
    step = align.STEPS[algorithm]
    torch.manual_seed(0)
    prompts = [p for p in ("\n\nHuman: Hi\n\nAssistant:", "\n\nHuman: What is a cat?\n\nAssistant:") for _ in range(4)]
    metrics, rollouts, scores = step(built, optimizer, ppo.kl_controller(config), prompts, config.ppo)
    grown = memory.tensor_bytes() - before_step

    assert {f"{algorithm}/{name}" for name in COMMON_METRICS} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics[f"{algorithm}/kl"] == 0.0  # the policy sampled before any update is the reference
    assert scores.shape == (8,) and rollouts.response_mask.sum() > 0
    assert any(not torch.equal(a, b) for a, b in zip(weights, params))
    # Everything the step touched reaches one set of base weights, none of them in the optimizer, and the
    # step left no second copy behind (Adam's state and the rollouts are tiny beside the network).
    held = policy.base_weight_storages(built.modules())
    assert sum(held.values()) == base_bytes
    optimized = {p.untyped_storage().data_ptr() for group in optimizer.param_groups for p in group["params"]}
    assert not optimized & set(held)
    assert grown < 0.5 * base_bytes, (grown, base_bytes)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_out_of_memory_halves_the_passes_and_gives_the_same_update(run_dir, algorithm):
    """Out of memory in a pass of 4 rollouts, the step retries in passes of 2 (`edgerlhf.oom`): the same
    rollouts, the same gradients (GRPO weighs the halves by tokens, RLOO by responses), the same adapter."""
    config = algorithm_config(algorithm, batch_size=8, mini_batch_size=4, response_length=16, ppo_epochs=2)
    step = align.STEPS[algorithm]
    prompts = [f"\n\nHuman: Question {i}?\n\nAssistant:" for i in range(2) for _ in range(4)]
    after = {}
    # Logits of a pass: rows x 17 positions x 50,257 tokens x 4 bytes = 3.4 MB a row; 8 MB hold 2 rows, not 4.
    for limit in (None, 8):
        torch.manual_seed(0)
        built = policy.build_models(config, run_dir, torch.device("cpu"))
        # SGD: Adam's first steps are about sign(gradient) and would hide a wrongly weighted half.
        optimizer = torch.optim.SGD(built.policy_parameters(), lr=0.1)
        micro = rollout.StepMicroBatches.of(config.ppo)
        torch.manual_seed(1)  # the same rollouts for both
        with allocation_limit(limit) if limit else contextlib.nullcontext():
            metrics, _, _ = step(built, optimizer, ppo.kl_controller(config), prompts, config.ppo, micro, 1)
        after[limit] = ([p.detach().clone() for p in built.policy_parameters()], metrics, micro)
    assert after[None][2].passes.size == 4 and after[8][2].passes.size == 2
    assert after[8][2].rollouts.size == 8  # generation fitted: the rollouts are the same
    for whole, halves in zip(after[None][0], after[8][0]):
        torch.testing.assert_close(halves, whole, rtol=1e-4, atol=1e-6)
    for key in ("policy_loss", "clip_frac", "approx_kl", "reward_mean"):
        key = f"{algorithm}/{key}"
        assert after[8][1][key] == pytest.approx(after[None][1][key], rel=1e-4, abs=1e-7), key


def ends_about_half(built, prompts: list[str], steps: int, sampling: Sampling) -> None:
    """Give the base's LM head a bias towards end-of-text so that about half of the `steps`-token answers to
    `prompts` end early (the shrunk tiny policy never ends by itself): the same bias for policy and reference,
    found by bisection on the sampler's probability of ending at the first token."""
    head = built.model.get_output_embeddings()
    eos = built.tokenizer.eos_token_id
    target = 1 - 0.5 ** (1 / steps)  # P(no end in `steps` tokens) = 1/2, if each token ended alike
    with torch.no_grad():
        logits = torch.stack([built.model(**built.tokenizer(p, return_tensors="pt")).logits[0, -1] for p in prompts])
        low, high = -50.0, 50.0
        for _ in range(40):
            bias = torch.zeros(logits.shape[-1])
            bias[eos] = (low + high) / 2
            p_end = torch.softmax(sampling.warp(logits + bias), -1)[:, eos].mean()
            low, high = (bias[eos].item(), high) if p_end < target else (low, bias[eos].item())
    head.bias = torch.nn.Parameter(bias, requires_grad=False)


def same_reward(prompt: str, response: str) -> float:
    """A reward function that scores every answer alike (`ppo.reward_function`)."""
    return 1.0


@pytest.mark.parametrize("algorithm", ["ppo", *ALGORITHMS])
def test_an_answer_cut_at_the_cap_is_flagged_logged_and_penalised(run_dir, algorithm):
    """Every answer scores the same, so only `ppo.missing_eos_penalty` tells them apart: the rollouts that ran into
    `response_length` are flagged (as `capped_responses` reads them), their share is logged, and the scores each
    algorithm learns from are the reward less the penalty of the capped ones."""
    from edgerlhf.generation import capped_responses

    penalty = 0.7
    config = algorithm_config(algorithm, batch_size=8, mini_batch_size=4, response_length=3, samples_per_prompt=4,
                              missing_eos_penalty=penalty, reward_function=f"{__name__}:same_reward")
    built = policy.build_models(config, run_dir, torch.device("cpu"))
    prompts = [p for p in ("\n\nHuman: Hi\n\nAssistant:", "\n\nHuman: What is a cat?\n\nAssistant:") for _ in range(4)]
    ends_about_half(built, prompts[::4], 3, Sampling.of(config.ppo))
    optimizer = torch.optim.SGD(built.policy_parameters(), lr=0.0)
    torch.manual_seed(0)
    metrics, rollouts, scores = align.STEPS[algorithm](built, optimizer, ppo.kl_controller(config), prompts, config.ppo)

    capped = torch.tensor(capped_responses(built.tokenizer, rollouts.response_ids, rollouts.response_mask, 3))
    assert torch.equal(rollouts.capped.cpu(), capped) and 0 < capped.sum() < 8, capped  # some cut, some ended
    assert metrics[f"{algorithm}/cap_hit_rate"] == pytest.approx(capped.float().mean().item())
    assert metrics[f"{algorithm}/reward_mean"] == 1.0  # the reward model's (here the function's) own scores
    assert metrics[f"{algorithm}/length_slope"] == 0.0  # every length scores alike
    learned = rollout.training_scores(scores, rollouts, config.ppo)
    torch.testing.assert_close(learned, 1.0 - penalty * capped.float())
    if algorithm == "grpo":
        assert metrics["grpo/advantage_abs_mean"] == pytest.approx(grpo.group_advantages(learned, 4).abs().mean().item())
    if algorithm == "rloo":  # the first step's policy is the reference: no KL penalty
        assert metrics["rloo/rlhf_reward_mean"] == pytest.approx(learned.mean().item())


def test_length_control_learns_the_scores_at_equal_length():
    """`ppo.length_control`: the batch's linear trend of score on length is removed, about its mean length, so a
    longer answer earns nothing for its length; answers of one length keep their differences, the batch its mean."""
    from types import SimpleNamespace

    lengths = torch.tensor([2, 2, 5, 5, 9, 9, 12, 12])
    quality = torch.tensor([0.3, -0.3, 0.5, -0.5, 0.2, -0.2, 0.1, -0.1])  # no trend on length
    scores = 0.25 * lengths + quality
    rollouts = SimpleNamespace(response_mask=torch.arange(12) < lengths[:, None],  # what training_scores reads
                               capped=torch.zeros(8, dtype=torch.bool))
    assert rollout.length_slope(scores, lengths) == pytest.approx(0.25)
    cfg = algorithm_config("grpo", length_control=True, missing_eos_penalty=0.0).ppo
    learned = rollout.training_scores(scores, rollouts, cfg)
    assert rollout.length_slope(learned, lengths) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(learned[::2] - learned[1::2], quality[::2] - quality[1::2])
    assert learned.mean().item() == pytest.approx(scores.mean().item())
    cfg.length_control = False
    torch.testing.assert_close(rollout.training_scores(scores, rollouts, cfg), scores)


@pytest.mark.parametrize("algorithm", ["ppo", "rloo"])
def test_the_kl_penalty_is_no_bonus_for_a_flattened_policy(run_dir, algorithm):
    """A policy flatter than its reference (logits x 0.6, on a base whose logits have a trained model's spread),
    sampled with top-k 50 / top-p 0.95: its KL penalty must cost, not pay. Measured: +1.8 nats per answer (the exact
    KL of the two whole distributions: 15.8); a k1 of the policy's whole distribution against the reference's paid
    7.6 nats instead (the tail it raised above the reference is one the sampler never draws)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = algorithm_config(algorithm, batch_size=8, mini_batch_size=4, response_length=12, samples_per_prompt=4,
                              reward_function=f"{__name__}:same_reward", adaptive_kl=False)
    built = policy.build_models(config, run_dir, torch.device("cpu"))
    head = built.model.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(40.0)  # logits with a std of a few units, for policy and reference
    adapted = next(m for m in built.model.modules() if isinstance(m, BaseTunerLayer))
    # The policy (adapters on) samples and scores with logits x 0.6, the reference (adapters off) with the base's.
    head.register_forward_hook(lambda module, args, out: out if adapted.disable_adapters else 0.6 * out)
    optimizer = torch.optim.SGD(built.policy_parameters(), lr=0.0)
    prompts = [p for p in ("\n\nHuman: Hi\n\nAssistant:", "\n\nHuman: What is a cat?\n\nAssistant:") for _ in range(4)]
    torch.manual_seed(0)
    metrics, _, _ = align.STEPS[algorithm](built, optimizer, ppo.kl_controller(config), prompts, config.ppo)
    assert metrics[f"{algorithm}/kl"] > 0  # the exact KL of the two distributions
    assert metrics[f"{algorithm}/non_score_reward"] < 0, metrics  # -beta x the penalty: a cost


class StopAfter(RunContext):
    """A context whose run is cancelled once `n` steps of `algorithm` have been logged."""

    def __init__(self, run_dir, algorithm, n):
        super().__init__(run_dir)
        self.key, self.n = f"{algorithm}/kl", n

    def _poll_cancel(self):
        return len(self.metric_series(self.key)) >= self.n


# Resume is tested once per loop: PPO's (test_ppo.py), the group algorithms' here with GRPO (RLOO's step runs in the
# same loop and checkpoint: its own maths and step are tested above), and DPO's trainer (test_dpo.py).
@pytest.mark.parametrize("algorithm", ["grpo"])
def test_stage_holds_one_network_checkpoints_and_resumes_with_the_same_steps(tmp_path, algorithm):
    config = algorithm_config(algorithm, steps=4, checkpoint_every=2, batch_size=8, grad_accum=2)
    run_dir = make_tiny_run(tmp_path / "run", config)

    ctx = StopAfter(run_dir, algorithm, 3)
    ctx.begin_stage("ppo")
    with pytest.raises(Cancelled):
        align.run(config, ctx)
    first = {k: dict(ctx.metric_series(f"{algorithm}/{k}")) for k in ("reward_mean", "kl", "policy_loss")}
    assert sorted(first["kl"]) == [1, 2, 3]
    assert not ctx.metric_series("ppo/kl")  # one namespace per algorithm
    state = torch.load(run_dir / "ppo" / "checkpoint" / loop.CHECKPOINT_FILE, weights_only=False)
    assert state["step"] == 2 and state["value_head"] is None

    resumed = RunContext(run_dir)
    resumed.begin_stage("ppo")
    report = align.run(config, resumed)
    assert report.algorithm == algorithm and report.resumed_from_step == 2
    assert sorted(dict(resumed.metric_series(f"{algorithm}/kl"))) == [3, 4]
    # Step 3 again, from the checkpoint, is the same step 3: same prompts, samples and update.
    for key, series in first.items():
        assert dict(resumed.metric_series(f"{algorithm}/{key}"))[3] == pytest.approx(series[3], rel=1e-5, abs=1e-7)
    assert set(report.final) and all(k.startswith(f"{algorithm}/") for k in report.first)
    assert report.kl_coef_final == config.ppo.init_kl_coef
    # One copy of the network, measured around building the models: the adapters add a few percent.
    assert report.held_bytes >= report.network_bytes and 1.0 <= report.network_copies < 1.5

    adapter = run_dir / "ppo" / "adapter"
    assert (adapter / "adapter_config.json").exists() and not (adapter / policy.VALUE_HEAD_FILE).exists()
    trained, _ = models.load_policy(run_dir, "ppo")  # a standard peft adapter, merged into sft/merged
    sft, _ = models.load_policy(run_dir, "sft")
    assert any(not torch.equal(a, b) for (n, a), (_, b) in zip(trained.named_parameters(), sft.named_parameters())
               if "c_attn" in n and n.endswith("weight"))

    # The final checkpoint resumes under this algorithm only (a PPO run would find no value head in it).
    def resumes_at(cfg):
        built = policy.build_models(cfg, run_dir, torch.device("cpu"))
        optimizer = torch.optim.AdamW(built.policy_parameters(), lr=1e-3)
        return loop.load_checkpoint(run_dir / "ppo" / "checkpoint", built, optimizer, ppo.FixedKLController(0.1),
                                   cfg, run_dir)

    assert resumes_at(config) == 4
    for other in {"ppo", "grpo", "rloo"} - {algorithm}:
        assert resumes_at(load_config("tiny", {**config.to_dict(), "algorithm": other})) is None


def words_with_e(prompt: str, response: str) -> float:
    """A plain Python reward function for the test below: the share of the response's words that hold an 'e'."""
    words = response.split()
    return sum("e" in w for w in words) / max(len(words), 1)


def test_a_python_function_or_a_gold_scores_the_rollouts_without_a_reward_model(tmp_path):
    """`ppo.reward_function`: no reward model is loaded or needed, every logged reward is the function's value,
    and the evaluation scores both policies with it."""
    import json
    import shutil

    from edgerlhf import evaluate, gold

    function = f"{__name__}:words_with_e"
    config = load_config("tiny", {**algorithm_config("grpo", steps=2).to_dict(),
                                  "stages": ["ppo", "evaluate"], "ppo": {
                                      **algorithm_config("grpo", steps=2).to_dict()["ppo"],
                                      "reward_function": function}})
    run_dir = make_tiny_run(tmp_path / "run", config)
    shutil.rmtree(run_dir / "reward")  # nothing to fall back on
    ctx = RunContext(run_dir)
    ctx.begin_stage("ppo")
    report = align.run(config, ctx)
    assert report.reward_model == "python function" and report.reward_precision is None
    assert ctx.samples and all(s.reward == pytest.approx(words_with_e(s.prompt, s.response))
                               for s in ctx.samples if s.kind == "sample")
    ctx.begin_stage("evaluate")
    evaluated = evaluate.run(config, ctx)
    assert evaluated.reward_function == function and evaluated.reward_precision is None
    shown = json.loads(evaluated.model_dump_json())["samples"]
    assert shown and all(row["ppo_reward"] == pytest.approx(words_with_e(row["prompt"], row["ppo"])) for row in shown)
    # A gold scorer's name is the gold itself.
    assert gold.reward_function("question") is gold.SCORERS["question"].score
    with pytest.raises(ValueError, match="has no function"):
        gold.reward_function(f"{__name__}:no_such_function")
