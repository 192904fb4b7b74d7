"""Generation: one definition of the sampling distribution, shared by the sampler and the log-prob maths.

PPO's importance ratios, its KL penalty and the evaluation's KL are only right if the probability a
token is scored with is the probability it was drawn with. Both sides therefore go through `Sampling`:

    scaled = logits / temperature                    (temperature first, as every sampler documents it)
    support = top-k of scaled, then top-p of those   (`sampling_support`, the rules of transformers' warpers)
    p(token) = softmax(scaled) renormalised over the support

`generate` draws with exactly that (`SamplingProcessor`, the only logits processor it uses; every
built-in warper of `transformers.generate` is switched off, because in transformers 5 a custom processor
runs *before* its temperature warper and would see unscaled logits), the chat's token loop draws with
`Sampling.draw` (the same distribution, one step at a time with a KV cache, so it can stream), and
`forward_response` + `policy_stats` score sampled tokens with exactly that, for the importance ratio. The
reference is never renormalised on the policy's support: every KL is taken against its whole temperature-scaled
distribution (`TokenStats`, `kl_per_position`), so a policy collapsing onto one token that the sampler's top-p
would hide is seen.

Also here: `Rollouts` (a batch of sampled responses), where a response ends (a stop token of the model's
`PromptFormat`, EOS or its chat template's end of turn, or the first stop string of `StopRule`;
`StopOnMarkers` applies it during `generate`, `response_lengths` after it, the chat's streaming
`StopScanner` token by token), `sample_probes` (the probe generations every stage logs) and the one-pass
re-scoring of prompt + response. Prompts are stored HH dialogues; `generate` renders them in the model's
`PromptFormat` (its chat template, if it has one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgerlhf.contract import KL_CHUNK
from edgerlhf.dialogue import PromptFormat

# --- the sampling distribution -------------------------------------------------------------------


def sampling_support(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0):
    """The tokens top-k then top-p (nucleus) sampling can draw from `logits` (..., V), already scaled.

    Same rules and order as transformers' `TopKLogitsWarper` / `TopPLogitsWarper`: keep the `top_k`
    largest; then drop the least likely tokens whose cumulative probability stays <= 1 - top_p (the most
    likely token always stays). Returns `(idx, keep)`: candidate token ids (..., K), most likely first,
    and which of them stay (..., K); `(None, None)` when sampling uses the whole vocabulary. With top-k,
    K = top_k and nothing of size V is sorted or materialised (the vocabulary is 50k tokens).
    """
    V = logits.shape[-1]
    if top_k and top_k < V:
        values, idx = torch.topk(logits, top_k, dim=-1)  # (..., K) descending
    elif top_p < 1.0:
        values, idx = torch.sort(logits, dim=-1, descending=True)  # (..., V)
    else:
        return None, None
    keep = torch.ones_like(values, dtype=torch.bool)
    if top_p < 1.0:
        probs = torch.softmax(values.float(), dim=-1)
        # HF's ascending cumulative probability of a token = the mass of it and every less likely token.
        tail = probs.flip(-1).cumsum(-1).flip(-1)
        keep = tail > 1.0 - top_p
        keep[..., 0] = True
    return idx, keep


def support_mask(support, shape) -> torch.Tensor:
    """The support of `sampling_support` as a bool mask over the vocabulary (..., V)."""
    idx, keep = support
    if idx is None:
        return torch.ones(shape, dtype=torch.bool)
    return torch.zeros(shape, dtype=torch.bool, device=idx.device).scatter(-1, idx, keep)


GREEDY_BELOW = 1e-5
"""Temperatures below this draw the arg max: fp32 logits divided by a subnormal temperature (`5e-324`) overflow to
inf and their softmax is NaN, and long before that the distribution is the arg max to float precision."""


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn: temperature, then top-k, then top-p. `greedy` (or a temperature below
    `GREEDY_BELOW`) takes the arg max instead."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self):
        # `not (x >= 0)` is true for NaN too: no NaN or infinite setting reaches a softmax.
        if not (0 <= self.temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (0 <= self.top_p <= 1):
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k!r}")

    @classmethod
    def of(cls, cfg) -> Sampling:
        """The sampling settings of a config section with `temperature`, `top_k`, `top_p` (e.g. `ppo`)."""
        return cls(cfg.temperature, cfg.top_k, cfg.top_p)

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature < GREEDY_BELOW

    def scale(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits in fp32 divided by the temperature: the only place the temperature is applied (never by less
        than `GREEDY_BELOW`, so the result stays finite)."""
        return logits.float() / max(self.temperature, GREEDY_BELOW)

    def support(self, scaled_logits: torch.Tensor):
        """`sampling_support` of already scaled logits with these settings."""
        return sampling_support(scaled_logits, self.top_k, self.top_p)

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """Scaled logits (N, V) with -inf outside the support: their softmax is the sampling distribution."""
        scaled = self.scale(logits)  # (N, V)
        support = self.support(scaled)
        if support[0] is None:
            return scaled
        return scaled.masked_fill(~support_mask(support, scaled.shape), float("-inf"))

    def draw(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Next token ids (N,) from last-position logits (N, V): the arg max when greedy, else one draw per
        row from softmax(`warp(logits)`), the distribution `SamplingProcessor` hands `generate`."""
        if self.is_greedy:
            return logits.argmax(dim=-1)  # (N,)
        probs = torch.softmax(self.warp(logits), dim=-1)  # (N, V), 0 outside the support
        # Inverse-CDF draw: one uniform number per row and a binary search, instead of torch.multinomial's
        # per-token work over GPT-2's 50k vocabulary (the CPU's slowest step of a tiny model's chat loop).
        cdf = torch.cumsum(probs.double(), dim=-1)  # (N, V)
        u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)  # (N,)


class SamplingProcessor:
    """The `generate` logits processor for `Sampling`: `Sampling.warp` of each step's logits."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.sampling.warp(scores)  # (B, V)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution over the last dim: logsumexp(z) - sum(softmax(z) * z)."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token in `tokens` (B, T) under the whole softmax of `logits` (B, T, V): the
    token's logit minus the logsumexp, so the backward keeps no (B, T, V) log-softmax."""
    logits = logits.float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def restricted_logprobs(logits: torch.Tensor, tokens: torch.Tensor, support) -> torch.Tensor:
    """Log-probability of `tokens` (B, T) under softmax(`logits`) renormalised over `support`.

    The sampled token always belongs to the support (a borderline token can fall out of a recomputed
    top-k/top-p set by float rounding; it was drawn, so it is kept).
    """
    idx, keep = support
    logits = logits.float()
    token_logit = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
    if idx is None:
        return token_logit - torch.logsumexp(logits, dim=-1)
    candidates = logits.gather(-1, idx).masked_fill(~keep, float("-inf"))  # (B, T, K)
    log_z = torch.logsumexp(candidates, dim=-1)  # (B, T)
    inside = ((idx == tokens.unsqueeze(-1)) & keep).any(-1)  # (B, T)
    log_z = torch.where(inside, log_z, torch.logaddexp(log_z, token_logit))
    return token_logit - log_z


def restricted_entropy(logits: torch.Tensor, support) -> torch.Tensor:
    """Entropy of softmax(`logits`) renormalised over `support`: (B, T, V) -> (B, T)."""
    idx, keep = support
    if idx is None:
        return entropy_from_logits(logits.float())
    logp = torch.log_softmax(logits.float().gather(-1, idx).masked_fill(~keep, float("-inf")), dim=-1)
    return -(logp.exp() * logp.masked_fill(~keep, 0.0)).sum(-1)


@dataclass
class TokenStats:
    """What the policy's logits say about the sampled tokens, each (B, T).

    Two distributions, each for its own use. The *sampler's* (softmax of the scaled logits renormalised over
    the top-k/top-p support) gives `logprobs` and `entropy`: the importance ratio must use the probability a
    token was drawn with, which also makes the first ratio exactly 1. The *model's* (the whole softmax of the
    scaled logits, untruncated) gives `full_logprobs`. The reference is never renormalised on the policy's
    support: that KL reads 0 wherever one token holds more than `top_p`, and a policy collapsing onto one token
    looks unchanged. So the exact KL of the two whole distributions (`whole_distributions`) is what is reported;
    PPO's and RLOO's k1 penalties take the sampler's log-probs against the reference's own sampler
    (`sampler_logprobs`): 0 for an unchanged policy, and it sees a collapse, where the model's whole log-probs
    would reward flattening (the tail they raise is one the sampler never draws) and the whole reference would
    charge an unchanged policy for the mass top-k/top-p leaves out; GRPO's k3 takes the model's whole log-probs
    against the whole reference, which keeps a gradient where the sampler's support is one token.
    """

    logprobs: torch.Tensor
    full_logprobs: torch.Tensor | None
    entropy: torch.Tensor


def policy_stats(logits: torch.Tensor, tokens: torch.Tensor, sampling: Sampling, whole: bool = True) -> TokenStats:
    """`TokenStats` of `tokens` (B, T) under scaled `logits` (B, T, V) (`forward_response(..., sampling)`); without
    `whole`, `full_logprobs` is None (the rollout pass takes it from `whole_distributions`, in pieces)."""
    support = sampling.support(logits)
    return TokenStats(restricted_logprobs(logits, tokens, support),
                      logprobs_from_logits(logits, tokens) if whole else None, restricted_entropy(logits, support))


def sampler_logprobs(logits: torch.Tensor, tokens: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """log p(token) - log p(support) for `tokens` (B, T) under scaled `logits` (B, T, V), the support being the one
    `sampling` draws from for these logits: the log-probs of a model's own sampler, extended to every token (one
    outside the support keeps its whole-distribution probability over the support's mass instead of -inf).

    The reference side of the k1 penalties: against these, the penalty of an unchanged policy is exactly 0 at
    every token, and a policy collapsed onto one token (its own support that token alone) is charged what the
    reference thinks of it (0.69 nats against a 50/50 reference).
    """
    idx, keep = sampling.support(logits)
    logits = logits.float()
    token_logit = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
    if idx is None:
        return token_logit - torch.logsumexp(logits, dim=-1)
    return token_logit - torch.logsumexp(logits.gather(-1, idx).masked_fill(~keep, float("-inf")), dim=-1)


def whole_distributions(logits: torch.Tensor, ref_logits: torch.Tensor, tokens: torch.Tensor | None = None):
    """The whole (untruncated) distributions of policy and reference at every position of scaled logits (B, T, V),
    no gradient: the log-probs of `tokens` (B, T) under each (None without tokens) and the exact KL(policy ||
    reference) of the two next-token distributions, sum_v p(v) (log p(v) - log q(v)) (B, T).

    The KL is 0 exactly when the two agree, never negative, and grows as the policy sharpens or drifts whatever its
    sampling support (the sampler's own top-k/top-p would hide a collapse): what the logs, the KL controller and the
    evaluation report. Computed `KL_CHUNK` logits at a time with two temporaries of that size (log-softmax of each,
    then their difference and the policy's probabilities in place): nothing of the size of the logits is added.
    """
    shape, V = logits.shape[:-1], logits.shape[-1]
    flat, ref_flat = logits.reshape(-1, V), ref_logits.reshape(-1, V)
    flat_tokens = None if tokens is None else tokens.reshape(-1, 1)
    rows = max(1, KL_CHUNK // V)
    kl, logp_tokens, ref_tokens = [], [], []
    with torch.no_grad():
        for i in range(0, len(flat), rows):
            logp = torch.log_softmax(flat[i:i + rows].float(), dim=-1)  # (rows, V)
            diff = torch.log_softmax(ref_flat[i:i + rows].float(), dim=-1)  # (rows, V): the reference's, for now
            if flat_tokens is not None:
                logp_tokens.append(logp.gather(-1, flat_tokens[i:i + rows]).squeeze(-1))
                ref_tokens.append(diff.gather(-1, flat_tokens[i:i + rows]).squeeze(-1))
            diff.neg_().add_(logp)  # log p - log q
            probs = logp.exp_()  # p, in place of log p
            kl.append((probs.unsqueeze(1) @ diff.unsqueeze(2)).reshape(-1).clamp_(min=0.0))  # (rows,)
            del logp, diff, probs
    if not kl:
        zeros = logits.new_zeros(shape, dtype=torch.float32)
        return (None, None, zeros) if tokens is None else (zeros, zeros.clone(), zeros.clone())
    kl = torch.cat(kl).reshape(shape)
    if tokens is None:
        return None, None, kl
    return torch.cat(logp_tokens).reshape(shape), torch.cat(ref_tokens).reshape(shape), kl


def kl_per_position(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """The exact KL(policy || reference) of the whole next-token distributions at every position (B, T)
    (`whole_distributions`)."""
    return whole_distributions(logits, ref_logits)[2]


# --- sampling responses ----------------------------------------------------------------------------


@dataclass
class Rollouts:
    """A batch of sampled responses. Prompts are left-padded, responses right-padded after their end."""

    prompts: list[str]
    responses: list[str]
    """Response texts as a user sees them (cut at the stop markers)."""
    query_ids: torch.Tensor  # (B, P)
    query_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T) 1 up to and including the token that ended the response
    capped: torch.Tensor  # (B,) bool: ran into the length cap instead of ending by itself (`capped_responses`)


def concat_rollouts(parts: list[Rollouts], pad_token_id: int) -> Rollouts:
    """Rollouts sampled in several `generate` calls as one batch: prompts left-padded and responses
    right-padded to the widest part (masks 0 there), as one call would have laid them out."""
    if len(parts) == 1:
        return parts[0]
    P = max(p.query_ids.shape[1] for p in parts)
    T = max(p.response_ids.shape[1] for p in parts)

    def pad(t: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
        extra = width - t.shape[1]
        return torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=value)

    return Rollouts(
        [x for p in parts for x in p.prompts], [x for p in parts for x in p.responses],
        torch.cat([pad(p.query_ids, P, pad_token_id, True) for p in parts]),
        torch.cat([pad(p.query_mask, P, 0, True) for p in parts]),
        torch.cat([pad(p.response_ids, T, pad_token_id, False) for p in parts]),
        torch.cat([pad(p.response_mask, T, 0, False) for p in parts]),
        torch.cat([p.capped for p in parts]))


def response_lengths(tokenizer, response_ids: torch.Tensor,
                     fmt: PromptFormat | None = None) -> tuple[list[int], list[str]]:
    """Where each sampled response ends, in tokens, and its text.

    A response ends with its first stop token (EOS, or the chat template's end of turn) or with the token
    that completes a stop marker (the model opening the next HH turn); that token is the policy's last
    action and is kept in the mask, everything after it is padding. The text is cut before the marker
    and stripped.
    """
    fmt = fmt or PromptFormat.of(tokenizer)
    rule = fmt.stop_rule()
    stops = set(fmt.stop_token_ids)
    lengths, texts = [], []
    for row in response_ids.tolist():
        n = next((k + 1 for k, token in enumerate(row) if token in stops), len(row))
        text = tokenizer.decode(row[:n], skip_special_tokens=True)
        if rule.find(text) >= 0:
            n = next(k for k in range(1, n + 1) if rule.find(tokenizer.decode(row[:k], skip_special_tokens=True)) >= 0)
        lengths.append(n)
        texts.append(rule.cut(text).strip())
    return lengths, texts


def capped_responses(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor, max_new_tokens: int,
                     fmt: PromptFormat | None = None) -> list[bool]:
    """Whether each response ran into the length cap instead of ending by itself (a stop token, or a stop marker
    completed on its last allowed token). A capped answer is cut, not finished: the reward model sees no end of
    turn, so training penalises it (`ppo.missing_eos_penalty`) and the evaluation counts it."""
    fmt = fmt or PromptFormat.of(tokenizer)
    rule, stops = fmt.stop_rule(), set(fmt.stop_token_ids)
    capped = []
    for ids, n in zip(response_ids.tolist(), response_mask.sum(1).tolist()):
        ended = n < max_new_tokens or ids[n - 1] in stops \
            or rule.find(tokenizer.decode(ids[:n], skip_special_tokens=True)) >= 0
        capped.append(not ended)
    return capped


class StopOnMarkers:
    """A `generate` stopping criterion: a row is done once its generated text holds a stop marker (`StopRule`).

    Only the last `window` generated tokens are decoded each step (a marker is a few tokens), so this
    costs microseconds per row; transformers' `StopStringCriteria` instead scans the whole vocabulary
    when built (about a second for GPT-2, on every `generate` call).
    """

    def __init__(self, tokenizer, prompt_length: int, fmt: PromptFormat, window: int = 12):
        self.tokenizer, self.prompt_length, self.window = tokenizer, prompt_length, window
        self.rule = fmt.stop_rule()

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        start = max(self.prompt_length, input_ids.shape[1] - self.window)
        tails = self.tokenizer.batch_decode(input_ids[:, start:].tolist(), skip_special_tokens=True)
        done = [self.rule.find(tail) >= 0 for tail in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def context_length(model) -> int:
    """The longest sequence `model` takes (GPT-2's `n_positions`, the others' `max_position_embeddings`)."""
    config = model.config
    return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 1024)


def generation_config(sampling: Sampling, max_new_tokens: int, tokenizer, fmt: PromptFormat):
    """A `GenerationConfig` in which `SamplingProcessor` is the only thing shaping the distribution.

    Built from scratch rather than from the model's own `generation_config`, whose defaults (a
    temperature, top-k 50, a repetition penalty ...) would otherwise change what is sampled behind the
    log-prob computation's back.
    """
    from transformers import GenerationConfig

    # transformers fills every field left at None from the model's config, so the neutral values are explicit.
    neutral = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0,
                   eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0)
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not sampling.is_greedy,
                            pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=list(fmt.stop_token_ids), **neutral)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, sampling: Sampling) -> Rollouts:
    """Sample one response per stored HH prompt (rendered in the model's `PromptFormat`, left-padded batch)
    with `sampling`, stopping at a stop token or a stop marker."""
    device = next(model.parameters()).device
    fmt = PromptFormat.of(tokenizer)
    # Left padding and truncation keep each prompt's end next to its response. Only for this call: the
    # tokenizer may be a trainer's (SFT probes), which saves it with the model.
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    try:
        batch = tokenizer([fmt.prompt(p) for p in prompts], return_tensors="pt", padding=True, truncation=True,
                          max_length=max(context_length(model) - max_new_tokens, 1),
                          add_special_tokens=fmt.add_special_tokens).to(device)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
    processors = [] if sampling.is_greedy else [SamplingProcessor(sampling)]
    stops = [StopOnMarkers(tokenizer, batch["input_ids"].shape[1], fmt)] if fmt.stop_strings else []
    out = model.generate(**batch, generation_config=generation_config(sampling, max_new_tokens, tokenizer, fmt),
                         logits_processor=processors, stopping_criteria=stops)  # (B, P + T)
    query_ids = batch["input_ids"]  # (B, P)
    response_ids = out[:, query_ids.shape[1]:]  # (B, T)
    lengths, texts = response_lengths(tokenizer, response_ids, fmt)
    positions = torch.arange(response_ids.shape[1], device=device)
    response_mask = (positions[None, :] < torch.tensor(lengths, device=device)[:, None]).long()  # (B, T)
    # Tokens after the end are padding: make them the pad token so no stray sample leaks into later passes.
    response_ids = torch.where(response_mask.bool(), response_ids, tokenizer.pad_token_id)
    capped = torch.tensor(capped_responses(tokenizer, response_ids, response_mask, max_new_tokens, fmt),
                          dtype=torch.bool, device=device)
    return Rollouts(list(prompts), texts, query_ids, batch["attention_mask"], response_ids, response_mask, capped)


def sample_probes(model, tokenizer, prompts: list[str], config) -> Rollouts:
    """The probe generations of a checkpoint, drawn alike in every stage so the Probes page compares like
    with like: PPO's sampling settings (`Sampling.of(config.ppo)`) and response length, seeded with
    `config.seed` on a forked RNG (the same draws for the same weights, and training's RNG is untouched),
    in eval mode (no dropout: the distribution of the weights, not of a training step).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(config.seed)
            return generate(model, tokenizer, prompts, config.ppo.response_length, Sampling.of(config.ppo))
    finally:
        model.train(was_training)


def forward_response(model, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                     response_mask: torch.Tensor, sampling: Sampling | None = None, value_head=None):
    """One forward pass over prompt + response: scaled logits (and values) at the response tokens.

    Returns `(logits (B, T, V) float32, scaled by `sampling`'s temperature, values (B, T) or None)`.
    Position ids follow the left padding exactly as `generate` built them, so the logits are those of
    the sampling pass.
    """
    P, T = query_ids.shape[1], response_ids.shape[1]
    input_ids = torch.cat([query_ids, response_ids], dim=1)  # (B, P + T)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)  # (B, P + T)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # (B, P + T)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=value_head is not None, logits_to_keep=T + 1, use_cache=False)
    # The logits at position i predict token i + 1: the last T + 1 positions predict the T response tokens.
    logits = (sampling or Sampling()).scale(out.logits[:, :-1])  # (B, T, V)
    values = None
    if value_head is not None:
        values = value_head(out.hidden_states[-1][:, P - 1:-1])  # (B, T): V of the state before each token
    return logits, values
