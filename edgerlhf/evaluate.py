"""Stage 5 — evaluation: the SFT policy against the aligned policy (PPO, GRPO, RLOO or DPO) on held-out prompts.

For each of `evaluate.n_prompts` held-out prompts (data/prompts_test.jsonl), both policies sample fresh
responses with the PPO sampling settings; we report the mean reward of each (the reward model PPO was
trained against), the win rate of PPO over SFT judged by that reward model, the KL of the PPO policy from
the reference (= SFT) policy on its own samples, and, on the known-answer task (`data.labels = "gold"`),
the gold score of both (`edgerlhf.gold`). "PPO" is whichever algorithm trained `ppo/adapter`
(`EvalReport.algorithm`); a DPO run, trained without a reward model, is scored by the run's reward model
when the reward stage ran and has no reward figures otherwise (gold, length and KL stay). Differences PPO - SFT get paired percentile-bootstrap
confidence intervals over prompts (Efron & Tibshirani 1993), so "PPO is better" is a tested claim, as in
the gold-reward-model set-up of Gao et al. 2022.

Content or length: a policy can raise many scores just by answering longer or shorter. So the report also
gives the length difference PPO - SFT (response tokens, with its interval), how often each policy's
responses ran into the length cap (`evaluate.response_length`) or came out empty, and, for a gold, the
gold difference *at equal length* (`stratified_difference`): responses are grouped into strata of equal
length (empty answers, then one stratum per token length; `evaluate.length_strata` quantile bins instead if set) and the
within-stratum differences are averaged, weighted as a regression of the gold on the policy with one
intercept per stratum would weight them; its interval resamples prompts like the others.

Like PPO, it holds one copy of the network: sft/merged with the trained `ppo/adapter`; the SFT policy is
that model with the adapter disabled. Writes evaluate/report.json (returned) and evaluate/report.md.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgerlhf import gold, memory
from edgerlhf.align.policy import build_models, sequence_kl
from edgerlhf.config import PipelineConfig
from edgerlhf.context import RunContext
from edgerlhf.contract import EVAL_GEN_BATCH, PPO_ADAPTER, VALIDATION_REWARD, algorithm_traits, reward_dir
from edgerlhf.data import prompts as prompt_rows
from edgerlhf.errors import require
from edgerlhf.generation import Sampling, concat_rollouts, generate
from edgerlhf.models import SCORE_HEAD_FILE, resolve_device
from edgerlhf.oom import MicroBatch, chunks, planner_hint
from edgerlhf.reports import EvalReport


def bootstrap_ci(values, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Mean of `values` with a percentile-bootstrap confidence interval: {mean, low, high, confidence, n}.

    For paired comparisons pass the per-prompt differences (PPO - SFT); an interval that excludes 0 is a
    significant difference at level 1 - confidence.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "confidence": confidence, "n": 0}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)  # (n_resamples,)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return {"mean": float(x.mean()), "low": float(low), "high": float(high), "confidence": confidence, "n": int(x.size)}


def win_rate(a, b) -> float:
    """Share of pairs where a beats b, ties counting one half."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(((a > b) + 0.5 * (a == b)).mean()) if a.size else float("nan")


def sample_policy(models, prompts: list[str], config, use_adapter: bool, seed: int,
                  micro: MicroBatch | None = None) -> dict[str, Any]:
    """Responses of the PPO policy (`use_adapter`) or the SFT policy (adapter disabled) for `prompts`.

    Returns texts, response lengths in tokens, whether each hit the length cap and, for the PPO policy,
    the KL from the reference of each response (the SFT policy is the reference, its KL is 0). Out of
    memory, a batch is sampled again in `micro`'s halves (`edgerlhf.oom`).
    """

    cfg = config.ppo
    model = models.model
    max_new_tokens = config.evaluate.response_length
    micro = micro or MicroBatch(EVAL_GEN_BATCH, "evaluate")
    responses, lengths, capped, kls = [], [], [], []
    for i in range(0, len(prompts), EVAL_GEN_BATCH):
        batch = prompts[i:i + EVAL_GEN_BATCH]

        def attempt(size: int):
            # The same seed per batch for both policies: common random numbers make the comparison less noisy.
            torch.manual_seed(seed + i)
            with nullcontext() if use_adapter else model.disable_adapter():
                rollouts = concat_rollouts(
                    [generate(model, models.tokenizer, batch[rows], max_new_tokens, Sampling.of(cfg))
                     for rows in chunks(len(batch), size)], models.tokenizer.pad_token_id)
            kl = sequence_kl(models, rollouts, cfg, min(size, cfg.mini_batch_size)) if use_adapter else None
            return rollouts, kl

        rollouts, kl = micro.run(i // EVAL_GEN_BATCH + 1, attempt)
        responses += rollouts.responses
        lengths += rollouts.response_mask.sum(1).tolist()
        capped += rollouts.capped.tolist()
        kls += kl.tolist() if kl is not None else [0.0] * len(rollouts.responses)
    return {"responses": responses, "lengths": lengths, "capped": capped, "kl": kls}


def length_strata(lengths, empty, n_strata: int = 0) -> np.ndarray:
    """The stratum of each response: 0 for an empty answer, else one stratum per token length (`n_strata` = 0,
    the default) or 1 + its bin among `n_strata` quantile bins of the non-empty lengths.

    Only exact lengths hold a pure length effect out: inside a wider bin the longer policy's answers are still
    the longer ones, and a gold that rewards length leaks through: in 50 simulated evaluations of a pure length
    effect, 8 quantile bins put 0 outside the 95 % interval 20 times, exact lengths 3 times
    (`tests/edgerlhf/test_evaluate.py`)."""
    lengths, empty = np.asarray(lengths, dtype=np.float64), np.asarray(empty, dtype=bool)
    filled = lengths[~empty]
    if filled.size == 0:
        return np.zeros(lengths.shape, dtype=np.int64)
    if n_strata == 0:
        return np.where(empty, 0, 1 + lengths.astype(np.int64))
    edges = np.unique(np.quantile(filled, np.linspace(0.0, 1.0, n_strata + 1)[1:-1]))
    return np.where(empty, 0, 1 + np.searchsorted(edges, lengths, side="right"))


def stratified_difference(sft, ppo, strata_sft, strata_ppo, k: int, n_resamples: int = 2000,
                          confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Difference PPO - SFT of `sft`/`ppo` (k responses per prompt, prompt-major) at equal length.

    In each length stratum holding both policies, d_s = mean PPO - mean SFT, weighted by
    w_s = n_sft n_ppo / (n_sft + n_ppo): exactly the policy coefficient of a least-squares regression of the
    value on the policy with one intercept per stratum. A length change alone moves responses between
    strata and leaves every d_s unchanged. The percentile-bootstrap interval resamples prompts (with all
    their responses), as `bootstrap_ci` does; {mean, low, high, confidence, n}, NaN when no stratum holds
    both policies.
    """
    values = np.concatenate([np.asarray(sft, np.float64), np.asarray(ppo, np.float64)])  # (2N,)
    strata = np.concatenate([np.asarray(strata_sft), np.asarray(strata_ppo)])  # (2N,)
    n = len(sft)
    n_prompts, n_strata = n // k, int(strata.max()) + 1
    prompt = np.tile(np.arange(n) // k, 2)  # (2N,)
    cell = strata * 2 + np.repeat([0, 1], n)  # (2N,) stratum x policy
    counts = np.zeros((n_prompts, 2 * n_strata))
    sums = np.zeros((n_prompts, 2 * n_strata))
    np.add.at(counts, (prompt, cell), 1.0)
    np.add.at(sums, (prompt, cell), values)

    def estimate(weights: np.ndarray) -> np.ndarray:  # weights (R, n_prompts): how often each prompt is drawn
        c = (weights @ counts).reshape(-1, n_strata, 2)  # (R, S, 2)
        s = (weights @ sums).reshape(-1, n_strata, 2)  # (R, S, 2)
        with np.errstate(invalid="ignore", divide="ignore"):
            d = np.nan_to_num(s[..., 1] / c[..., 1] - s[..., 0] / c[..., 0])  # (R, S), 0 where a side is missing
            w = c[..., 0] * c[..., 1] / np.maximum(c[..., 0] + c[..., 1], 1.0)  # (R, S), 0 where a side is missing
            return (w * d).sum(1) / w.sum(1)  # (R,)

    point = float(estimate(np.ones((1, n_prompts)))[0])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_prompts, size=(n_resamples, n_prompts))
    weights = np.zeros((n_resamples, n_prompts))
    np.add.at(weights, (np.arange(n_resamples)[:, None], draws), 1.0)
    boot = estimate(weights)
    boot = boot[np.isfinite(boot)]
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha]) if boot.size else (float("nan"), float("nan"))
    return {"mean": point, "low": float(low), "high": float(high), "confidence": confidence, "n": n_prompts}


def judge_win_rate(judge, prompts: list[str], sft: list[str], aligned: list[str], k: int,
                   **boot) -> dict[str, Any]:
    """The pairwise judge's verdict on aligned vs SFT answers (k per prompt, prompt-major): each pair asked in both
    orders, a win counting 1, a loss 0, and a pair the judge decides by position alone (the same letter both times)
    or cannot be read 0.5. Returns the win rate with its bootstrap interval over prompts, and how often the two
    orders agreed."""
    aligned_first = judge.prefers_first(prompts, aligned, sft)  # 1: aligned is A and preferred
    aligned_second = judge.prefers_first(prompts, sft, aligned)  # 0: aligned is B and preferred
    wins, agreed = [], 0
    for a, b in zip(aligned_first, aligned_second):
        if a is None or b is None or a == b:  # unread, or the same letter twice: no preference between the answers
            wins.append(0.5)
        else:
            wins.append(a)  # a = 1 - b: both orders preferred the same answer
            agreed += 1
    return {"win_rate": bootstrap_ci(_per_prompt(wins, k), **boot), "consistent": agreed / max(len(wins), 1)}


def _per_prompt(values, k: int) -> np.ndarray:
    """Average the `k` samples of each prompt: (n_prompts * k,) -> (n_prompts,)."""
    return np.asarray(values, dtype=np.float64).reshape(-1, k).mean(axis=1)


def _summary(values) -> dict[str, float]:
    x = np.asarray(values, dtype=np.float64)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0}


def markdown_report(report: dict[str, Any]) -> str:
    """A short human-readable version of the report (its aligned side named after the algorithm that trained it)."""
    def ci(d):
        return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"

    name = report.get("algorithm", "ppo").upper()
    scored = report["reward_diff"] is not None
    rm = (f"stated rewards {' + '.join(report['rewards'])}" if report.get("rewards") else
          f"reward function {report['reward_function']}" if report.get("reward_function") else
          f"reward model {report['reward_precision']}" if scored else "no reward model")
    lines = [
        f"# Evaluation: SFT vs {name}",
        "",
        f"{report['n_prompts']} held-out prompts x {report['samples_per_prompt']} samples, {rm}, "
        f"{int(report['confidence'] * 100)} % bootstrap intervals.",
        "",
        f"| | SFT | {name} | {name} - SFT |",
        "|---|---|---|---|",
    ]
    if scored:
        lines.append(f"| reward | {report['sft']['reward']['mean']:.3f} | {report['ppo']['reward']['mean']:.3f} | "
                     f"{ci(report['reward_diff'])} |")
    for part, diff in (report.get("reward_parts_diff") or {}).items():
        sides = [f"{report[side]['rewards'][part]['mean']:.3f}" if report[side].get("rewards") else ""
                 for side in ("sft", "ppo")]
        lines.append(f"| reward: {part} | {sides[0]} | {sides[1]} | {ci(diff)} |")
    if report.get("validation_reward_diff"):
        lines.append(f"| validation reward model | {report['sft']['validation_reward']['mean']:.3f} | "
                     f"{report['ppo']['validation_reward']['mean']:.3f} | {ci(report['validation_reward_diff'])} |")
    if report.get("judge_win_rate"):
        lines.append(f"| judge's win rate of {name} | | | {ci(report['judge_win_rate'])} (both orders agreed on "
                     f"{report['judge_consistency']:.0%}) |")
    if report.get("gold_diff"):
        lines += [f"| gold ({report['gold_scorer']}) | {report['sft']['gold']['mean']:.3f} | "
                  f"{report['ppo']['gold']['mean']:.3f} | {ci(report['gold_diff'])} |",
                  f"| gold at equal length | | | {ci(report['gold_diff_equal_length'])} |"]
    lines += [
        f"| response tokens | {report['sft']['response_tokens']['mean']:.1f} | "
        f"{report['ppo']['response_tokens']['mean']:.1f} | {ci(report['length_diff'])} |",
        f"| hit the {report['response_length']}-token cap | {report['sft']['cap_hit_rate']:.1%} | "
        f"{report['ppo']['cap_hit_rate']:.1%} | |",
        f"| empty answers | {report['sft']['empty_rate']:.1%} | {report['ppo']['empty_rate']:.1%} | |",
        "",
        (f"Win rate of {name} over SFT (reward model): {report['win_rate']:.3f}. " if scored else "")
        + f"KL({name} || SFT) per response: {report['ppo']['kl']['mean']:.3f}.",
        "",
        "## Samples",
    ]

    def score(s, side):
        values = [f"{s[f'{side}_{k}']:.2f}" for k in ("reward", "gold") if s.get(f"{side}_{k}") is not None]
        return f" ({', '.join(values)})" if values else ""

    for s in report["samples"]:
        prompt = s["prompt"].strip().replace("\n\n", " / ")
        lines += ["", f"**Prompt:** {prompt}", "",
                  f"- SFT{score(s, 'sft')}: {s['sft']!r}",
                  f"- {name}{score(s, 'ppo')}: {s['ppo']!r}"]
    return "\n".join(lines) + "\n"


def has_reward_model(config: PipelineConfig, run_dir: Path) -> bool:
    """Whether the run directory holds the reward model `ppo.reward_precision` names (the reward stage ran)."""
    return (run_dir / reward_dir(config.ppo.reward_precision) / SCORE_HEAD_FILE).exists()


def run(config: PipelineConfig, ctx: RunContext) -> EvalReport:
    """Compare the SFT and the aligned policy on held-out prompts; returns the report (and writes report.md).

    PPO, GRPO and RLOO were trained against a reward model, which must be there; a DPO run is scored by one
    when the reward stage ran, and otherwise reports gold, length and KL without reward figures."""
    cfg = config.evaluate
    device = resolve_device(config.device)
    run_dir = Path(ctx.run_dir)
    out_dir = ctx.stage_dir("evaluate")
    prompts = [row["prompt"] for row in prompt_rows(run_dir, "test")][: cfg.n_prompts]
    adapter = require(run_dir / PPO_ADAPTER, "ppo")
    k = cfg.samples_per_prompt
    all_prompts = [p for p in prompts for _ in range(k)]  # (n_prompts * k,)

    scored = (algorithm_traits(config.algorithm).samples or config.ppo.reward_function is not None
              or config.ppo.rewards is not None or has_reward_model(config, run_dir))
    # The validation reward model (`reward.validation`), when the run trained one: a second opinion on the held-out
    # answers that the policy was never trained against.
    validation = config.reward.validation and (run_dir / VALIDATION_REWARD / SCORE_HEAD_FILE).exists()
    models = build_models(config, run_dir, device, adapter_dir=adapter, reward=scored, validation=validation)
    ctx.progress(0, 4)
    micro = MicroBatch(EVAL_GEN_BATCH, "evaluate", ctx, device, planner_hint=lambda: planner_hint(config, "evaluate"))
    sft = sample_policy(models, all_prompts, config, use_adapter=False, seed=config.seed, micro=micro)
    ctx.check_cancelled()
    ctx.progress(1, 4)
    ppo = sample_policy(models, all_prompts, config, use_adapter=True, seed=config.seed, micro=micro)
    ctx.check_cancelled()
    ctx.progress(2, 4)
    for result in (sft, ppo):
        total, result["parts"] = models.score_parts(all_prompts, result["responses"]) if scored else (None, {})
        result["reward"] = total.tolist() if scored else [None] * len(all_prompts)
        if validation:
            result["validation"] = models.validation_score(all_prompts, result["responses"]).tolist()
    ctx.progress(3, 4)

    boot = dict(n_resamples=cfg.n_bootstrap, confidence=cfg.confidence, seed=config.seed)
    policies: dict[str, dict[str, Any]] = {}
    for name, result in (("sft", sft), ("ppo", ppo)):
        result["empty"] = [not response for response in result["responses"]]
        policies[name] = {"reward": _summary(result["reward"]) if scored else None,
                          "response_tokens": _summary(result["lengths"]),
                          "cap_hit_rate": float(np.mean(result["capped"])),
                          "empty_rate": float(np.mean(result["empty"])),
                          "rewards": {part: _summary(values.tolist()) for part, values in result["parts"].items()}
                          or None,
                          "validation_reward": _summary(result["validation"]) if validation else None}
    policies["ppo"]["kl"] = _summary(ppo["kl"])
    report: dict[str, Any] = {
        "algorithm": config.algorithm,
        "n_prompts": len(prompts),
        "samples_per_prompt": k,
        "reward_precision": config.ppo.reward_precision if models.reward_model is not None else None,
        "reward_function": config.ppo.reward_function,
        "rewards": models.rewards.names if models.rewards is not None else None,
        "confidence": cfg.confidence,
        "response_length": cfg.response_length,
        **policies,
        "win_rate": win_rate(ppo["reward"], sft["reward"]) if scored else None,
        "reward_diff": bootstrap_ci(_per_prompt(ppo["reward"], k) - _per_prompt(sft["reward"], k), **boot)
        if scored else None,
        "validation_reward_diff": bootstrap_ci(_per_prompt(ppo["validation"], k) - _per_prompt(sft["validation"], k),
                                               **boot) if validation else None,
        "length_diff": bootstrap_ci(_per_prompt(ppo["lengths"], k) - _per_prompt(sft["lengths"], k), **boot),
        "kl": float(np.mean(ppo["kl"])),
        "gold_scorer": None,
        "gold_diff": None,
        # Each stated reward's own difference: which component the aligned policy gained on.
        "reward_parts_diff": {name: bootstrap_ci(_per_prompt(ppo["parts"][name].numpy(), k)
                                                 - _per_prompt(sft["parts"][name].numpy(), k), **boot)
                              for name in ppo["parts"]} or None,
    }
    if config.data.labels == "gold":
        for result in (sft, ppo):
            result["gold"] = gold.score_batch(all_prompts, result["responses"], config.data.gold_scorer)
        report["gold_scorer"] = config.data.gold_scorer
        report["sft"]["gold"] = _summary(sft["gold"])
        report["ppo"]["gold"] = _summary(ppo["gold"])
        report["gold_diff"] = bootstrap_ci(_per_prompt(ppo["gold"], k) - _per_prompt(sft["gold"], k), **boot)
        report["gold_win_rate"] = win_rate(ppo["gold"], sft["gold"])
        strata = length_strata(sft["lengths"] + ppo["lengths"], sft["empty"] + ppo["empty"], cfg.length_strata)
        report["gold_diff_equal_length"] = stratified_difference(sft["gold"], ppo["gold"], strata[:len(sft["gold"])],
                                                                 strata[len(sft["gold"]):], k, **boot)

    if cfg.judge is not None:
        from edgerlhf.rewards import Judge

        judged = judge_win_rate(Judge(cfg.judge, "evaluate.judge"), all_prompts, sft["responses"], ppo["responses"],
                                k, **boot)
        report["judge_win_rate"], report["judge_consistency"] = judged["win_rate"], judged["consistent"]

    samples = []
    for i in range(0, min(cfg.n_show, len(prompts)) * k, k):  # the first sample of the first n_show prompts
        row = {"prompt": all_prompts[i], "sft": sft["responses"][i], "ppo": ppo["responses"][i],
               "sft_reward": sft["reward"][i], "ppo_reward": ppo["reward"][i]}
        if "gold" in sft:
            row.update(sft_gold=sft["gold"][i], ppo_gold=ppo["gold"][i])
        samples.append(row)
        ctx.log_sample(row["prompt"], row["sft"], row["sft_reward"], 0, kind="eval", checkpoint="sft")
        ctx.log_sample(row["prompt"], row["ppo"], row["ppo_reward"], 0, kind="eval", checkpoint="ppo")
    report["samples"] = samples

    metrics = {"evaluate/kl": report["kl"], "evaluate/length_diff": report["length_diff"]["mean"],
               "evaluate/cap_hit_rate_ppo": report["ppo"]["cap_hit_rate"]}
    if scored:
        metrics.update({"evaluate/reward_sft": report["sft"]["reward"]["mean"],
                        "evaluate/reward_ppo": report["ppo"]["reward"]["mean"], "evaluate/win_rate": report["win_rate"]})
    if report["gold_diff"]:
        metrics.update({"evaluate/gold_sft": report["sft"]["gold"]["mean"],
                        "evaluate/gold_ppo": report["ppo"]["gold"]["mean"],
                        "evaluate/gold_diff_equal_length": report["gold_diff_equal_length"]["mean"]})
    metrics.update(memory.snapshot(device))
    ctx.log_metrics(metrics, 0)

    (out_dir / "report.md").write_text(markdown_report(report))  # report.json: written by the pipeline
    ctx.artifact("report", out_dir / "report.md")
    ctx.progress(4, 4)
    return EvalReport(**report)
