"""EdgeRLHF: RLHF for one consumer GPU (data, LoRA SFT, reward model, PPO, evaluation)."""
