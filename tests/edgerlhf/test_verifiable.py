"""The verifiable known-answer task in CI, at one of its reported seeds (issue 30): GRPO on stated rewards alone —
`reference_answer` (the answer's last word is the prompt's word) + 0.2 x a format rule, no reward model — raises the
exact-match rate of held-out prompts over SFT, with a bootstrap interval above 0.

The task is `edgerlhf.lab.verifiable`'s (echo: SFT is taught five wordings, the prompts use three others) with
its written-down settings; `edgerlhf verifiable --seeds 0 1 2` reports every seed and algorithm (README,
"A verifiable known-answer task"). One pipeline run here: warm-up + SFT, 60 GRPO steps, the evaluation.
"""

import math

import pytest
import torch

from edgerlhf.lab import verifiable

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SEED = 0


@pytest.fixture(scope="module")
def row(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reported runs (`--threads 1`): on 2 shared cores, more only wait
    try:
        return verifiable.run_one(SEED, tmp_path_factory.mktemp("verifiable") / f"seed{SEED}", {}, "grpo")
    finally:
        torch.set_num_threads(threads)


def test_grpo_on_stated_rewards_raises_the_exact_match_of_held_out_prompts(row):
    gain = row["correct_diff"]
    assert row["learned"] and gain["low"] > 0.0, (
        f"exact match {row['exact_match']['sft']:.2f} -> {row['exact_match']['aligned']:.2f}, gain "
        f"{gain['mean']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]")
    assert row["exact_match"]["aligned"] > row["exact_match"]["sft"]
    assert gain["n"] >= 20  # held-out prompts, each answered 8 times
    assert math.isfinite(row["kl"]) and row["kl"] > 0.0
    assert row["empty_rate"]["aligned"] <= 0.1 and row["cap_hit_rate"]["aligned"] <= 0.1
