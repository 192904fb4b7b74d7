"""Stated rewards tried before a job runs: `POST /api/rewards/score` scores a few answers with `ppo.rewards`.

The New-job form's **Try it** box calls it with the components being built and a few answers (typed, or drawn
from a prompt data set with its reference answers). It is the job's own code: the components are validated as a
job's are (`validate_job`: the same 422 naming `ppo.rewards[i].<field>`, judges only at the URLs the operator
lists and the service's own `/v1`), and scored by `edgerlhf.rewards.RewardSet`, the class the alignment uses. A
`reward_model` component needs a trained reward model, which a job trains in its reward stage: it is listed as
not scored here, and the total is then the sum of the others.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from backend.api.deps import SettingsDep
from backend.api.schemas import Overrides
from backend.api.validation import JobInvalid, validate_job
from edgerlhf.contract import merge_overrides

logger = logging.getLogger("edgerlhf.backend")

router = APIRouter(prefix="/rewards", tags=["rewards"])

MAX_SAMPLES = 20
"""Answers per request: a preview, not an evaluation (a judge component asks its endpoint once per answer)."""


class RewardSample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=20_000, description="The question, as the prompt data holds it")
    answer: str = Field(max_length=20_000, description="The answer to score")
    reference: dict[str, str] = Field(default_factory=dict, max_length=32,
                                      description="The prompt's other columns (a `reference_answer` component reads "
                                                  "its `column` here)")


class RewardsTry(BaseModel):
    """Components and answers to score; `preset` and `overrides` say whose tokenizer counts `length` in tokens."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "rewards": [{"kind": "reference_answer", "column": "answer", "extract": "last_number", "compare": "number"},
                    {"kind": "regex", "pattern": "^The answer is", "weight": 0.2}],
        "samples": [{"prompt": "What is 2 + 2?", "answer": "The answer is 4.", "reference": {"answer": "4"}}]}]})

    rewards: list[dict[str, Any]] = Field(min_length=1, max_length=32, description="`ppo.rewards`, as a job sets it")
    samples: list[RewardSample] = Field(min_length=1, max_length=MAX_SAMPLES)
    preset: str = Field("tiny", min_length=1, max_length=100, description="The job's preset (its tokenizer)")
    overrides: Overrides = Field(default_factory=dict, description="The job's other overrides")


class RewardScore(BaseModel):
    total: float
    """The weighted sum of the components scored here."""
    parts: dict[str, float]
    """Each component's own score, unweighted."""


class RewardsScored(BaseModel):
    names: list[str]
    """The components' names, as the job logs them (`<algorithm>/rewards/<name>_mean`)."""
    weights: dict[str, float]
    not_scored: list[str]
    """Components that need what only a job has (the reward model it trains)."""
    samples: list[RewardScore]


@router.post("/score", response_model=RewardsScored,
             responses={422: {"description": "A component is invalid (its field is named), or it failed on an answer"}})
def score_rewards(body: RewardsTry, settings: SettingsDep) -> RewardsScored:
    """Score a few answers with stated rewards (`ppo.rewards`), with the code the job will run."""
    import torch

    from edgerlhf.rewards import RewardError, RewardSet, token_counter

    overrides = merge_overrides(body.overrides, {"ppo": {"rewards": body.rewards}})
    try:
        config = validate_job(body.preset, overrides, [*settings.allowed_roots, settings.data_dir],
                              settings.allowed_judge_urls)
    except JobInvalid as exc:  # located in this body: `ppo.rewards[i]` is `rewards[i]` here
        prefix = ["body", "overrides", "ppo", "rewards"]
        raise HTTPException(422, [{**e, "loc": ["body", "rewards", *e["loc"][len(prefix):]]}
                                  if e["loc"][:len(prefix)] == prefix else e for e in exc.errors]) from None
    components = config.ppo.rewards
    counter = token_counter(_tokenizer(config)) if any(c.kind == "length" and c.unit == "tokens"
                                                       for c in components) else None
    rows = {s.prompt: {"prompt": s.prompt, **s.reference} for s in body.samples}
    # The reward model is trained by the job: here it scores NaN and stays out of the total.
    unscored = lambda prompts, responses: torch.full((len(prompts),), float("nan"))  # noqa: E731
    try:
        rewards = RewardSet(components, rows, unscored, count_tokens=counter)
        _, parts = rewards.score([s.prompt for s in body.samples], [s.answer for s in body.samples])
    except RewardError as exc:
        raise HTTPException(422, [{"loc": ["body", "rewards"], "type": "reward", "msg": str(exc)}]) from None
    weights = dict(zip(rewards.names, (c.weight for c in components)))
    not_scored = [name for name, c in zip(rewards.names, components) if c.kind == "reward_model"]
    samples = []
    for i in range(len(body.samples)):
        own = {name: float(values[i]) for name, values in parts.items() if name not in not_scored}
        samples.append(RewardScore(total=sum(weights[name] * value for name, value in own.items()), parts=own))
    return RewardsScored(names=rewards.names, weights=weights, not_scored=not_scored, samples=samples)


def _tokenizer(config):
    """The job's policy tokenizer (`model.tokenizer`, else the model's), for `length` in tokens."""
    from edgerlhf.models import load_tokenizer

    try:
        return load_tokenizer(config.model.tokenizer or config.model.name_or_path)
    except Exception as exc:  # offline, a hub id not cached: say so where the unit is chosen
        raise HTTPException(422, [{"loc": ["body", "rewards"], "type": "reward",
                                   "msg": f"a length in tokens needs the model's tokenizer, which cannot be loaded "
                                          f"({exc}); count in words, or try it where the model is cached"}]) from None
