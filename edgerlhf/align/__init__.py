"""Stage 4 — the alignment stage: PPO, GRPO, RLOO, DPO or KTO on the SFT policy, with one copy of the network.

`run(config, ctx)` is the stage (the pipeline's `ppo`, a name older than the other algorithms). The package
is laid out in floors, each importing only those below it (as TRL keeps its utilities below its trainers,
and verl/OpenRLHF their loop above `core_algos`/`experience_maker`):

    __init__.py   run: the algorithm's step (STEPS) to the loop; DPO and KTO to their trainers (TRAINERS)
    loop.py       the sampling algorithms' loop: prompts, resume, steps, samples, probes, checkpoints, report
    ppo.py, grpo.py, rloo.py
                  each algorithm's own step: its advantages and its loss, term by term in one place
    dpo.py, kto.py
                  DPO and KTO through TRL's DPOTrainer and KTOTrainer: each one's data and trainer
    rollout.py    what every sampling step shares: rollouts and their scores, log-probs, minibatch updates,
                  the common metrics
    offline.py    what the offline trainers share: the stage around the trainer (checkpoints, resume, report,
                  the policy saved), the CPU's answer-only log-prob head
    policy.py     the one network: policy adapter, reference (adapter off), value head, reward adapter
    losses.py     pure maths on (B, T) tensors

An algorithm's traits (value head, samples per prompt, config section) are `contract.ALGORITHM_TABLE`'s.
"""

from __future__ import annotations

from edgerlhf.align import dpo, grpo, kto, loop, ppo, rloo
from edgerlhf.config import PipelineConfig
from edgerlhf.context import RunContext
from edgerlhf.reports import PPOReport

STEPS: dict[str, loop.Step] = {"ppo": ppo.ppo_step, "grpo": grpo.grpo_step, "rloo": rloo.rloo_step}
"""The step of each algorithm that samples (`contract.Algorithm.samples`), one signature for all (`loop.Step`)."""
TRAINERS = {"dpo": dpo.run, "kto": kto.run}
"""The stage of each algorithm that trains offline (on preference pairs, or on labelled answers), through its own
trainer."""


def run(config: PipelineConfig, ctx: RunContext) -> PPOReport:
    """The alignment stage with `config.algorithm`; returns the stage report."""
    if config.algorithm in STEPS:
        return loop.run(config, ctx, STEPS[config.algorithm])
    return TRAINERS[config.algorithm](config, ctx)
