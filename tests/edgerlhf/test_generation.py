"""The one sampling definition (edgerlhf.generation): what `generate` draws is what PPO scores.

Exact-value checks of the support and restricted log-probs, a chi-square test of `generate`'s empirical
token frequencies against the distribution `forward_response` + `policy_stats` assign, another of the
chat's `Sampling.draw` against the distribution `SamplingProcessor` hands `generate`, the first PPO update
of an unchanged policy (ratio exactly 1, KL exactly 0) for several temperature/top-k/top-p settings, the
one stop rule, and the probe sampling every stage shares.
"""

import math

import pytest
import torch

from edgerlhf.config import TINY_TOKENIZER_DIR, ModelConfig, load_config
from edgerlhf.dialogue import STOP_STRINGS, StopRule
from edgerlhf.generation import (
    Sampling,
    SamplingProcessor,
    entropy_from_logits,
    forward_response,
    generate,
    kl_per_position,
    logprobs_from_logits,
    policy_stats,
    restricted_entropy,
    restricted_logprobs,
    sample_probes,
    sampler_logprobs,
    sampling_support,
    support_mask,
)

SETTINGS = [Sampling(0.7, 50, 0.95), Sampling(1.5, 0, 0.9), Sampling(0.5, 20, 1.0), Sampling(1.0, 50, 0.95),
            Sampling(2.0, 30, 0.8)]


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def close(actual, expected, tol=1e-6):
    assert torch.allclose(torch.as_tensor(actual, dtype=torch.float64), t(expected), atol=tol, rtol=0), actual


def test_entropy_and_logprobs_from_logits():
    close(entropy_from_logits(t([[0.0, 0.0, 0.0, 0.0]])), [math.log(4.0)])
    probs = [0.5, 0.25, 0.25]
    logits = t([[math.log(p) + 3.0 for p in probs]])  # a shift changes nothing
    close(entropy_from_logits(logits), [0.5 * math.log(2) + 0.5 * math.log(4)])
    close(logprobs_from_logits(logits.unsqueeze(0), torch.tensor([[1, 0]])[:, :1]), [[math.log(0.25)]])



def test_sampling_support_follows_top_k_then_top_p():
    logits = t([[math.log(p) for p in (0.05, 0.5, 0.15, 0.3)]])

    def mask(**kw):
        return support_mask(sampling_support(logits, **kw), logits.shape).tolist()

    assert mask() == [[True] * 4]
    assert mask(top_k=2) == [[False, True, False, True]]
    # top-p 0.7: ascending probs .05 .15 .3 .5, cumulative .05 .2 .5 1: drop those <= 0.3 -> keep .3 and .5
    assert mask(top_p=0.7) == [[False, True, False, True]]
    assert mask(top_p=0.9) == [[False, True, True, True]]
    # top-k first, then top-p on the renormalised rest: .5/.95 alone already exceeds 0.5
    assert mask(top_k=3, top_p=0.5) == [[False, True, False, False]]
    assert mask(top_k=3, top_p=0.9) == [[False, True, True, True]]
    assert support_mask(sampling_support(t([[0.0, 0.0]]), top_p=0.01), (1, 2)).sum() == 1  # the best one stays


def test_sampling_support_matches_transformers_warpers():
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    scores = torch.randn(6, 1000) * 3
    for top_k, top_p in ((50, 0.95), (0, 0.9), (20, 1.0), (200, 0.5)):
        warped = scores.clone()
        if top_k:
            warped = TopKLogitsWarper(top_k)(None, warped)
        warped = TopPLogitsWarper(top_p)(None, warped) if top_p < 1 else warped
        ours = support_mask(sampling_support(scores, top_k, top_p), scores.shape)
        assert torch.equal(ours, torch.isfinite(warped)), (top_k, top_p)


def test_restricted_logprobs_and_entropy():
    logits = t([[[math.log(p) for p in (0.05, 0.5, 0.15, 0.3)]]])  # (B=1, T=1, V=4)
    support = sampling_support(logits, top_k=2)
    close(restricted_logprobs(logits, torch.tensor([[1]]), support), [[math.log(0.5 / 0.8)]])
    # A sampled token outside the support is added to it: {1, 3} + {2}
    close(restricted_logprobs(logits, torch.tensor([[2]]), support), [[math.log(0.15 / 0.95)]])
    p = torch.tensor([0.5, 0.3]) / 0.8
    close(restricted_entropy(logits, support), [[float(-(p * p.log()).sum())]])
    full = sampling_support(logits)
    close(restricted_logprobs(logits, torch.tensor([[3]]), full), [[math.log(0.3)]])
    close(restricted_entropy(logits, full), [[-sum(q * math.log(q) for q in (0.05, 0.5, 0.15, 0.3))]])


def test_the_kl_of_an_unchanged_policy_is_exactly_zero():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 50, dtype=torch.float64)
    sampling = Sampling(top_k=10, top_p=0.9)
    tokens = sampling.draw(logits.reshape(10, 50)).reshape(2, 5)  # drawn: inside the sampler's support
    stats = policy_stats(logits, tokens, sampling)
    close(stats.full_logprobs - logprobs_from_logits(logits.clone(), tokens), torch.zeros(2, 5))  # k3: 0
    close(stats.logprobs - sampler_logprobs(logits.clone(), tokens, sampling), torch.zeros(2, 5))  # k1: 0
    assert kl_per_position(logits, logits.clone()).abs().max() == 0
    assert (stats.entropy <= math.log(10) + 1e-9).all()  # the sampler's: at most 10 tokens in the support


def test_a_policy_collapsed_above_top_p_reads_its_true_kl():
    """Reference 50/50, policy 97/3, top_p 0.9: the sampler's support is the first token alone. Restricted to that
    support both distributions read 1 and the KL 0; the whole distributions give KL 0.558 per position
    (0.97 log(0.97/0.5) + 0.03 log(0.03/0.5)), and the k1 penalty of the sampled token log(1/0.5) = 0.69."""
    ref_logits = torch.zeros(1, 1, 2, dtype=torch.float64)
    logits = torch.log(t([[[0.97, 0.03]]]))
    token = torch.tensor([[0]])
    stats = policy_stats(logits, token, Sampling(top_p=0.9))
    assert stats.logprobs.item() == 0.0  # the sampler's probability: 1
    exact = 0.97 * math.log(0.97 / 0.5) + 0.03 * math.log(0.03 / 0.5)
    close(kl_per_position(logits, ref_logits), [[exact]])
    close(stats.full_logprobs - logprobs_from_logits(ref_logits, token), [[math.log(0.97 / 0.5)]])  # GRPO's k3's
    # The k1 penalties': the policy's sampler against the reference's own (both tokens in its top-p 0.9 set).
    close(stats.logprobs - sampler_logprobs(ref_logits, token, Sampling(top_p=0.9)), [[math.log(2)]])


def test_the_kl_of_a_sharpened_policy_rises_with_the_sharpening():
    """Logits x alpha (the ranking unchanged, as a collapsing policy): the KL from the reference grows with alpha,
    also once the top token holds more than top_p and the sampler's support is that token alone."""
    torch.manual_seed(0)
    ref_logits = 2.0 * torch.randn(4, 6, 200)
    kls = [kl_per_position(alpha * ref_logits, ref_logits).sum().item() for alpha in (1.0, 1.5, 2, 3, 5, 8, 13)]
    assert kls[0] == 0.0 and all(b > a for a, b in zip(kls, kls[1:])), kls
    top = torch.softmax(13 * ref_logits, -1).amax(-1)
    assert (top > 0.95).float().mean() > 0.5  # most positions collapsed past the preset top_p


def test_the_kl_has_a_gradient_where_one_token_holds_more_than_top_p():
    """GRPO's k3 term at a position whose sampler's support is one token: with the whole distributions it still
    pulls the policy back towards the reference (on the support alone it would be a constant)."""
    from edgerlhf.align import grpo

    logits = torch.log(t([[[0.97, 0.01, 0.02]]])).requires_grad_(True)
    ref_logits = torch.zeros(1, 1, 3, dtype=torch.float64)
    token = torch.tensor([[0]])
    stats = policy_stats(logits, token, Sampling(top_p=0.9))
    loss, _ = grpo.grpo_loss(stats.logprobs, stats.full_logprobs, stats.logprobs.detach(),
                             logprobs_from_logits(ref_logits, token), torch.zeros(1), torch.ones(1, 1), 0.2, beta=1.0)
    loss.backward()
    assert logits.grad[0, 0, 0] > 0  # gradient descent lowers the collapsed token's logit, towards the reference


@pytest.fixture(scope="module")
def peaked_model():
    """A random 1-layer GPT-2 whose next-token distribution is peaked enough for temperature to matter."""
    from edgerlhf.models import load_tokenizer, random_model

    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    model = random_model(ModelConfig(name_or_path="tiny", random_init=True, n_layer=1, n_head=2, n_embd=32,
                                    n_positions=64), tokenizer, seed=0).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # logits with a std of a few units, as a trained LM has
    return model, tokenizer


def chi_square_critical(dof: int, z: float = 3.719) -> float:
    """Upper quantile of chi-square(dof) at the normal quantile z (Wilson-Hilferty; z = 3.719: p = 1e-4)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("sampling", SETTINGS, ids=str)
def test_generate_draws_from_the_distribution_ppo_scores(peaked_model, sampling):
    model, tokenizer = peaked_model
    prompt = "\n\nHuman: What is a good name for a cat?\n\nAssistant:"
    n, rows = 4000, 500
    torch.manual_seed(0)
    drawn = []
    for _ in range(n // rows):
        rollouts = generate(model, tokenizer, [prompt] * rows, 1, sampling)
        drawn.append(rollouts.response_ids[:, 0])
    drawn = torch.cat(drawn)  # (n,)

    # The distribution PPO assigns to that first token: scaled logits, support, restricted softmax.
    with torch.no_grad():
        logits, _ = forward_response(model, rollouts.query_ids[:1], rollouts.query_mask[:1],
                                     rollouts.response_ids[:1, :1], torch.ones(1, 1, dtype=torch.long), sampling)
    idx, keep = sampling.support(logits[0, 0])
    support = idx[keep] if idx is not None else torch.arange(logits.shape[-1])
    logp = torch.log_softmax(logits[0, 0, support], -1)
    expected = logp.exp() * n  # (K,)
    counts = torch.bincount(drawn, minlength=logits.shape[-1]).double()

    outside = int(counts.sum() - counts[support].sum())
    assert outside == 0, f"{outside} of {n} draws fall outside the support PPO scores ({len(support)} tokens)"
    statistic, dof = pooled_chi_square(expected, counts[support])
    assert dof >= 3, f"the test needs a spread distribution, got {len(support)} support tokens"
    assert statistic < chi_square_critical(dof), (sampling, statistic, dof)


def pooled_chi_square(expected: torch.Tensor, observed: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom, the rare cells pooled so every expected count is
    >= 5 (the chi-square approximation's rule of thumb)."""
    order = torch.argsort(expected, descending=True)
    exp_sorted, obs_sorted = expected[order], observed[order]
    big = exp_sorted >= 5
    exp_cells = torch.cat([exp_sorted[big], exp_sorted[~big].sum(0, keepdim=True)])
    obs_cells = torch.cat([obs_sorted[big], obs_sorted[~big].sum(0, keepdim=True)])
    if exp_cells[-1] < 5:  # a pooled remainder still too small joins the smallest big cell
        exp_cells = torch.cat([exp_cells[:-2], exp_cells[-2:].sum(0, keepdim=True)])
        obs_cells = torch.cat([obs_cells[:-2], obs_cells[-2:].sum(0, keepdim=True)])
    return float(((obs_cells - exp_cells) ** 2 / exp_cells).sum()), len(exp_cells) - 1


@pytest.mark.parametrize("sampling", SETTINGS, ids=str)
def test_chat_draw_samples_what_generate_samples(sampling):
    """`Sampling.draw` (the chat's token loop) draws from softmax of `SamplingProcessor`'s output (`generate`)."""
    torch.manual_seed(0)
    logits = torch.randn(200)  # (V,): spread enough that every setting keeps many tokens
    n = 20_000
    drawn = sampling.draw(logits.expand(n, -1), torch.Generator().manual_seed(1))  # (n,)
    probs = torch.softmax(SamplingProcessor(sampling)(None, logits[None])[0], -1).double()  # (V,)
    counts = torch.bincount(drawn, minlength=200).double()
    support = probs > 0
    assert counts[~support].sum() == 0, "a draw outside the support"
    statistic, dof = pooled_chi_square(probs[support] * n, counts[support])
    assert dof >= 3 and statistic < chi_square_critical(dof), (sampling, statistic, dof)
    assert Sampling(greedy=True).draw(logits.expand(3, -1)).tolist() == [int(logits.argmax())] * 3


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-40, 1e-8])
def test_a_tiny_temperature_is_greedy_never_nan(temperature):
    """Dividing fp32 logits by a subnormal temperature overflows to inf and softmax gives NaN (an empty answer):
    below `GREEDY_BELOW` the distribution is the arg max to float precision, so the draw is the arg max."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 30  # (N, V)
    sampling = Sampling(temperature=temperature, top_p=0.9)
    assert sampling.draw(logits, torch.Generator().manual_seed(1)).tolist() == logits.argmax(-1).tolist()
    assert torch.isfinite(sampling.scale(logits)).all()
    from edgerlhf.generation import GREEDY_BELOW

    assert temperature < GREEDY_BELOW and sampling.is_greedy


@pytest.mark.parametrize("fields", [{"temperature": float("nan")}, {"temperature": float("inf")},
                                    {"temperature": -1.0}, {"top_p": float("nan")}, {"top_p": 1.5}, {"top_k": -1}])
def test_non_finite_or_negative_sampling_settings_are_refused(fields):
    with pytest.raises(ValueError):
        Sampling(**fields)


@pytest.fixture(scope="module")
def tiny_run_dir(tmp_path_factory):
    from tests.support.tiny import make_tiny_run

    return make_tiny_run(tmp_path_factory.mktemp("generation-run"))


@pytest.mark.parametrize("sampling", SETTINGS, ids=str)
def test_unchanged_policy_has_ratio_one_and_kl_zero(tiny_run_dir, sampling):
    """The first minibatch of the first epoch: the policy has not moved, so every ratio is exactly 1 and
    the KL to the reference (the same network, adapters off; the LoRA B is 0) is exactly 0."""
    from edgerlhf.align import policy, ppo
    from tests.support.tiny import tiny_config

    config = tiny_config(ppo=dict(batch_size=4, mini_batch_size=4, ppo_epochs=1, temperature=sampling.temperature,
                                  top_k=sampling.top_k, top_p=sampling.top_p))
    models = policy.build_models(config, tiny_run_dir, torch.device("cpu"))
    optimizer = torch.optim.AdamW(models.policy_parameters(), lr=1e-3)
    torch.manual_seed(0)
    prompts = ["\n\nHuman: Hi\n\nAssistant:", "\n\nHuman: What is a cat?\n\nAssistant:"] * 2
    metrics, rollouts, _ = ppo.ppo_step(models, optimizer, ppo.FixedKLController(0.1), prompts, config.ppo)
    assert rollouts.response_mask.sum() > 0
    assert metrics["ppo/approx_kl"] == 0.0 and metrics["ppo/clip_frac"] == 0.0
    assert metrics["ppo/kl"] == 0.0


def test_one_stop_rule_for_every_generator():
    rule = StopRule()  # the HH turn markers
    assert rule.stops == STOP_STRINGS
    assert rule.find(" Sure.\n\nHuman: thanks\n\nAssistant: ok") == 6 and rule.find(" no stop") == -1
    assert rule.cut(" A.\n\nAssistant: B") == " A." and rule.cut(" A.") == " A."
    # A stream holds back what may still become a marker: "\n\nHu" could be "\n\nHuman:".
    assert rule.pending("Hi\n\nHu") == 4 and rule.pending("Hi\n") == 1 and rule.pending("Hi") == 0
    chat = StopRule([*STOP_STRINGS, "END", "", "END"])  # a chat request's own stops, deduplicated, none empty
    assert chat.stops == (*STOP_STRINGS, "END")
    assert chat.find("a b END c\n\nHuman:") == 4 and chat.pending("a b EN") == 2


def test_probes_are_sampled_as_ppo_samples_them(peaked_model):
    """`sample_probes`: PPO's sampling settings and response length from `config.seed`, whatever the caller's
    RNG, model mode or tokenizer settings, which it leaves as they were (SFT probes a training model)."""
    model, tokenizer = peaked_model
    config = load_config("tiny", {"seed": 3, "ppo": {"response_length": 5, "temperature": 0.8, "top_k": 20}})
    prompts = ["\n\nHuman: Hi\n\nAssistant:", "\n\nHuman: Name a colour.\n\nAssistant:"]
    torch.manual_seed(config.seed)
    expected = generate(model, tokenizer, prompts, 5, Sampling(0.8, 20, config.ppo.top_p))

    model.train()
    sides = tokenizer.padding_side, tokenizer.truncation_side
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    try:
        first = sample_probes(model, tokenizer, prompts, config)
        assert model.training and (tokenizer.padding_side, tokenizer.truncation_side) == sides
        assert torch.equal(torch.get_rng_state(), rng), "probing moved the caller's RNG"
        torch.manual_seed(7)
        second = sample_probes(model, tokenizer, prompts, config)
    finally:
        model.eval()
    assert first.responses == second.responses == expected.responses
    assert torch.equal(first.response_ids, expected.response_ids) and first.response_ids.shape[1] <= 5
