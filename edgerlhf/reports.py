"""What each stage reports: one typed model per stage, the contract between the pipeline, the API and the
dashboard.

A stage's `run(config, ctx)` returns its report model; `pipeline.run_stage` writes it to
`<run_dir>/<stage>/report.json` and the worker stores it with the stage. The backend serves the reports of a
job as `JobReports` (so `/openapi.json` names every field), and the dashboard reads exactly these fields.
Models forbid unknown fields, so a renamed field fails where it is written or read instead of blanking a
chart. Pydantic only: the backend and the dashboard import this without torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class Report(BaseModel):
    # Not-a-number (a diverged loss) is written as null: JSON has no NaN.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="null")

    seconds: float | None = None
    """Wall-clock time of the stage (set by `pipeline.run_stage`)."""


class Part(BaseModel):
    """A nested part of a report."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="null")


# --- data ----------------------------------------------------------------------------------------


class DataSource(Part):
    kind: Literal["local", "hub"]
    files: list[str] | None = None
    """Local files read, in order."""
    dataset: str | None = None
    name: str | None = None
    data_dir: str | None = None
    split: str | None = None
    records: int
    """Lines (local) or rows (hub) read."""
    bad_lines: int
    bad_line_examples: list[str]
    format: str | None = None
    """What the data set holds (`edgerlhf.formats.KINDS`): preference, demonstration, prompt or unpaired."""
    conversational: bool | None = None
    """Message lists rather than text."""
    detected: str | None = None
    """Why it was read as that format (the columns it found)."""


class StageData(Part):
    """A stage's own data set (`sft_data`, `prompt_data`): where it came from and what was kept."""

    source: DataSource
    read: int
    """Records read (a multi-turn conversation gives one demonstration per assistant turn)."""
    dropped: dict[str, int]
    kept: int
    train: int
    test: int


class LengthStats(Part):
    mean: float
    p50: int
    p95: int
    max: int


class SplitLengths(Part):
    """Token lengths of one side of the split."""

    prompt_tokens: LengthStats
    chosen_tokens: LengthStats
    rejected_tokens: LengthStats
    chosen_shorter_fraction: float
    """Among pairs of two non-empty responses, how often chosen is the shorter one."""


class VotesPart(Part):
    """The arena votes a job's data took (`data.votes_file`, `edgerlhf.votes.mix`)."""

    file: str
    pairs_read: int
    """Preference pairs in the votes file."""
    votes_read: int
    """Distinct votes those pairs come from."""
    dropped: dict[str, int]
    """Vote pairs dropped, by reason."""
    votes_used: int
    """Distinct votes with at least one pair in the written train or test split."""
    vote_ids: list[int]
    """Their ids (`/api/arena/votes/{id}`): the feedback that shaped this run."""
    train_pairs: int
    """Distinct vote pairs on the training side (each written `repeats` times)."""
    test_pairs: int
    repeats: int
    weight: float
    """`data.votes_weight`: the share of training pairs asked for."""
    share: float
    """The share of written training pairs that are vote pairs."""
    with_data_set: bool
    """False: the votes alone (`data.votes_weight` = 1), the data set's pairs set aside."""


class DataReport(Report):
    source: DataSource
    labels: Literal["human", "gold"]
    gold_scorer: str | None = None
    gold_agrees_with_human: float | None = None
    """With gold labels: how often the gold prefers the response the human raters chose."""
    gold_empty_pairs_added: int | None = None
    """With gold labels: (response vs "") pairs added to the training side."""
    gold_length_correlation: dict[str, float | None] | None = None
    """With gold labels: for every gold scorer, the Pearson correlation of its score with the response's
    length in words over the labelled pairs' responses, train and test (how much of it length alone could
    buy)."""
    seed: int
    pairs_read: int
    bad_lines: int
    dropped: dict[str, int]
    """Pairs dropped, by reason."""
    kept: int
    capped_by_max_pairs: int
    train: int
    """Training pairs, including the added empty-answer pairs."""
    test: int
    lengths: dict[Literal["train", "test"], SplitLengths | None]
    votes: VotesPart | None = None
    """With `data.votes_file`: the arena votes mixed in (counted in `train` and `test`)."""
    format: str = "preference"
    """What `data.source` holds (`source.format`); the counts above are its pairs (0 for another format)."""
    demonstrations: StageData | None = None
    """SFT's own data set (`sft_data.source`); None: derived from `data.source`."""
    prompts: StageData | None = None
    """The prompts' own data set (`prompt_data.source`); None: derived from `data.source`."""
    sft_examples: dict[Literal["train", "test"], int] | None = None
    """Demonstrations SFT reads (`data/sft_*.jsonl`), train and test."""
    prompt_rows: dict[Literal["train", "test"], int] | None = None
    """Prompts the sampling algorithms and the evaluation read (`data/prompts_*.jsonl`), train and test."""
    unpaired_examples: dict[Literal["train", "test"], int] | None = None
    """Answers labelled desirable or not that KTO reads (`data/*_unpaired.jsonl`), train and test."""


# --- sft -----------------------------------------------------------------------------------------


class Probe(Part):
    step: int
    prompt: str
    response: str
    gold: float | None
    """The gold score of the response on the known-answer task, else None."""


class SFTReport(Report):
    device: str
    compute_dtype: str
    parameters: int
    trainable_parameters: int
    train_examples: int
    eval_examples: int
    steps: int
    train_seconds: float
    first_loss: float | None
    final_loss: float | None
    train_loss: float | None
    eval_loss: float | None
    perplexity: float | None
    """exp(eval loss) on the held-out pairs' chosen responses."""
    completion_only_loss: bool
    memory: dict[str, float]
    """`mem/*` readings at the end of the stage."""
    probes: list[Probe]
    """The fixed held-out prompts sampled at the last probe."""
    round: int = 1
    """Which round of RLHF the run is (`round.number`): 1 from the base model, n + 1 continuing a run of round n."""
    parent_run: str | None = None
    """The run whose aligned policy this run started from (`round.parent_run`); None in round 1."""
    trained: bool = True
    """False: SFT trained nothing, `sft/merged` is the parent's aligned policy (a round without demonstrations)."""


# --- reward --------------------------------------------------------------------------------------


class Normalization(Part):
    mean: float
    std: float
    samples: int


class PrecisionResult(Part):
    """One row of the precision study: a reward model trained and evaluated in one precision."""

    precision: str
    compute_dtype: str
    quantization: str | None
    trainable_parameters: int
    train_seconds: float
    train_loss: float | None
    final_train_accuracy: float | None
    peak_train_mb: float
    peak_source: str
    """`cuda_max_allocated` on a GPU, `process_rss` (VmHWM since the model was loaded) on the CPU."""
    peak_train_delta_mb: float | None
    rss_before_train_mb: float
    normalization: Normalization
    """Scores are shifted and scaled to mean 0, std 1 on the training responses."""
    accuracy: float
    """Held-out pairs the model ranks like the labels."""
    mean_margin: float
    memory_footprint_bytes: int
    memory_footprint_mb: float
    throughput_pairs_per_s: float
    reward_mean: float
    reward_std: float
    spearman_vs_bf16: float | None = None
    """Rank correlation of the held-out scores with the bf16 model's (None without a bf16 model)."""


class ValidationResult(PrecisionResult):
    """The validation reward model (`reward.validation`): trained on its share of the training pairs, in the
    precision of the alignment stage's network, and evaluated on the same test pairs as the main models."""

    train_pairs: int
    """Training pairs it learned from (`reward.validation_share` of them, which the main models did not see)."""
    main_precision: str
    """The main reward model it is compared with: the one the alignment stage trains against."""
    spearman_vs_main: float | None
    """Rank correlation of its held-out scores with the main model's (None when either side is constant)."""


class EnsembleMember(PrecisionResult):
    """One extra member of the reward-model ensemble (`reward.ensemble`): trained on a bootstrap resample of the main
    model's training pairs from its own seed, in the precision of the alignment stage's network, evaluated on the same
    test pairs (member 0 is the main reward model)."""

    member: int
    """Its index, >= 1 (`reward/ensemble/<member>/`)."""
    seed: int
    """The seed it trained from (initialisation, data order, resample)."""
    train_pairs: int
    """Pairs in its resample (as many as the main model's, drawn with replacement)."""
    unique_pairs: int
    """Distinct pairs among them (about 63% of the main model's)."""
    spearman_vs_main: float | None
    """Rank correlation of its held-out scores with the main model's (None when either side is constant)."""


class RewardReport(Report):
    device: str
    test_pairs: int
    labels: str
    train_pairs: int | None = None
    """Training pairs each main reward model learned from: every pair of `data/train_prefs.jsonl`, or one half of
    them with `reward.validation` (None in reports written before the field existed)."""
    precisions: dict[str, PrecisionResult]
    """The precision study, by precision."""
    validation: ValidationResult | None = None
    """With `reward.validation`: the validation reward model, trained on its share of the pairs (the main ones on the
    rest)."""
    ensemble: list[EnsembleMember] = []
    """With `reward.ensemble` >= 2: the ensemble's extra members, 1 to k - 1 (member 0 is the main reward model)."""
    note: str


# --- ppo -----------------------------------------------------------------------------------------


class PPOReport(Report):
    """The alignment stage's report, whichever algorithm ran (`algorithm`); its metrics are `<algorithm>/*`."""

    algorithm: str = "ppo"
    steps: int
    resumed_from_step: int
    reward_precision: str | None
    """The reward model that scored the rollouts; None for DPO, which trains on the pairs, and for a reward
    function (`ppo.reward_function`)."""
    reward_model: Literal["shared adapter", "separate quantized copy", "python function", "none"]
    rewards: list[str] | None = None
    """With `ppo.rewards`: the stated components' names (each logged as `<algorithm>/rewards/<name>_mean`)."""
    validation_reward: bool = False
    """The validation reward model (`reward.validation`) scored every step's rollouts beside the proxy, as one more
    frozen adapter on the one network (`<algorithm>/validation_reward_mean`)."""
    ensemble_members: int = 1
    """Reward models whose conservative score (`ppo.ensemble_score`) was the reward model's score (`reward.ensemble`;
    1: the reward model alone); their disagreement is `<algorithm>/ensemble_std_mean`."""
    gold_scorer: str | None = None
    """The known-answer task's gold scorer that scored every step's rollouts beside the proxy
    (`<algorithm>/gold_mean`); None when there is none, or when the gold is itself the reward trained on."""
    compute_dtype: str
    device: str
    trainable_parameters: int
    network_bytes: int
    """Bytes of one copy of the base network."""
    held_bytes: int
    """Bytes PPO's models hold, measured around building them (CUDA allocated, or live tensor storages)."""
    network_copies: float
    """held_bytes / network_bytes: about 1 for the one-copy design (plus a quantized copy for int8/int4 rewards)."""
    first: dict[str, float | None]
    """`<algorithm>/*` metrics of the first step of this run."""
    final: dict[str, float | None]
    """`<algorithm>/*` metrics averaged over the last 5 steps."""
    kl_coef_final: float | None
    best_signal: Literal["validation", "gold"] | None = None
    """`ppo.keep_best`'s signal, which picked the policy written to `ppo/adapter`; None: the last policy is written."""
    best_step: int | None = None
    """The step whose rollouts the written policy sampled (it had `best_step - 1` updates): where the smoothed signal
    was highest at a weighing (`align.loop.BestPolicy`)."""
    best_value: float | None = None
    """The smoothed signal (`<algorithm>/validation_reward_mean` or `gold_mean`, averaged) at `best_step`."""
    stopped_early_at: int | None = None
    """The step the stage stopped at with `ppo.early_stop_patience`, before `steps`; None when it ran them all."""
    wall_s: float
    peak_rss_mb: float
    memory: dict[str, float]


# --- evaluate ------------------------------------------------------------------------------------


class Summary(Part):
    mean: float | None
    std: float | None


class Interval(Part):
    """A mean with a percentile-bootstrap confidence interval."""

    mean: float | None
    low: float | None
    high: float | None
    confidence: float
    n: int


class PolicyEval(Part):
    reward: Summary | None = None
    """Reward-model score; None when the run has no reward model (a DPO run without the reward stage)."""
    response_tokens: Summary
    gold: Summary | None = None
    kl: Summary | None = None
    """KL from the reference (PPO only; the SFT policy is the reference)."""
    cap_hit_rate: float | None = None
    """Share of responses that ran into the length cap (`EvalReport.response_length`) instead of ending."""
    empty_rate: float | None = None
    """Share of empty responses."""
    rewards: dict[str, Summary] | None = None
    """With `ppo.rewards`: each component's score (unweighted), e.g. the exact-match rate of `reference_answer`."""
    validation_reward: Summary | None = None
    """With `reward.validation`: the validation reward model's score."""


class SamplePair(Part):
    prompt: str
    sft: str
    ppo: str
    sft_reward: float | None = None
    ppo_reward: float | None = None
    sft_gold: float | None = None
    ppo_gold: float | None = None


class EvalReport(Report):
    algorithm: str = "ppo"
    """The alignment algorithm that trained the evaluated policy (`PipelineConfig.algorithm`); whichever it was,
    the report calls that policy's side `ppo` (the alignment stage's name)."""
    n_prompts: int
    samples_per_prompt: int
    reward_precision: str | None
    """The reward model that scored both policies; None when the run has none (DPO without the reward stage):
    then every reward field is None, and gold, length and KL are still measured."""
    reward_function: str | None = None
    """`ppo.reward_function` when a function, not a reward model, scored both policies."""
    rewards: list[str] | None = None
    """`ppo.rewards`' components when their weighted sum scored both policies."""
    confidence: float
    response_length: int | None = None
    """The length cap of the sampled responses, in tokens (`evaluate.response_length`)."""
    sft: PolicyEval
    ppo: PolicyEval
    win_rate: float | None
    """Share of prompts where the PPO response out-scores the SFT one (reward model), ties counting 1/2."""
    reward_diff: Interval | None
    """Reward PPO - SFT, per prompt."""
    reward_parts_diff: dict[str, Interval] | None = None
    """With `ppo.rewards`: each component's difference aligned - SFT, with its interval."""
    validation_reward_diff: Interval | None = None
    """With `reward.validation`: the validation reward model's score aligned - SFT, per prompt. That model never
    scored a rollout the policy trained on, so a `reward_diff` far above it is the proxy being exploited."""
    judge_win_rate: Interval | None = None
    """With `evaluate.judge`: how often the judge preferred the aligned answer, both orders asked (0.5: no
    preference), with its interval over prompts."""
    judge_consistency: float | None = None
    """With `evaluate.judge`: the share of pairs where both orders preferred the same answer."""
    length_diff: Interval | None = None
    """Response tokens PPO - SFT, per prompt."""
    kl: float
    gold_scorer: str | None
    gold_diff: Interval | None
    """Gold score PPO - SFT, per prompt (known-answer task only)."""
    gold_diff_equal_length: Interval | None = None
    """Gold score PPO - SFT at equal length: within length strata (`evaluate.stratified_difference`)."""
    gold_win_rate: float | None = None
    samples: list[SamplePair]


STAGE_REPORTS: dict[str, type[Report]] = {"data": DataReport, "sft": SFTReport, "reward": RewardReport,
                                          "ppo": PPOReport, "evaluate": EvalReport}
"""The report model of each stage."""


class JobReports(BaseModel):
    """The reports of a job's finished stages (`GET /api/jobs/{id}/report`)."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="null")

    data: DataReport | None = None
    sft: SFTReport | None = None
    reward: RewardReport | None = None
    ppo: PPOReport | None = None
    evaluate: EvalReport | None = None
