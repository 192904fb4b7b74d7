"""EdgeRLHF: RLHF for one consumer GPU (data, LoRA SFT, reward model, alignment, evaluation). The ML library: it
knows nothing of HTTP or the database (the service's processes, `backend/`, `worker/`, `db/`, `frontend/`, import
it; it imports none of them).

    the stages, each `run(config, ctx) -> report`, in the order they run (`pipeline.STAGE_MODULES`):
        data.py, sft.py (+ warmup.py), reward.py, align/ (PPO, GRPO, RLOO, DPO, KTO: the stage `ppo`), evaluate.py
    what the stages share: models.py (loading, LoRA, precisions), generation.py (the one sampler), oom.py
        (out-of-memory halving), memory.py, dialogue.py (prompt formats), gold.py (known-answer scorers),
        votes.py (arena pairs), context.py (how a stage reports), reports.py, errors.py
    configuration and names: contract.py (shared by every layer, torch-free: stages, the algorithm table,
        statuses, run-directory layout), config.py (stage configs, presets, overrides), settings.py (the
        service's environment), locations.py (hub id or local path), architectures.py
    running it: pipeline.py (stages in order), cli.py (`edgerlhf ...`), plan.py (the memory planner),
        export.py, lifeline.py (child processes that die with their parent), log.py
    lab/: the measuring tools nothing in the service imports (bench, plan_check, known_answer)
"""
