"""The memory planner against the GPU: each stage's planned tensor memory against `torch.cuda.max_memory_allocated`
(`python -m edgerlhf.lab.plan_check --device cuda`), on the configurations whose terms differ most on a GPU."""

from __future__ import annotations

import pytest

from edgerlhf.lab import plan_check

pytestmark = pytest.mark.gpu

CONFIGS = ["gpt2-small", "llama-4bit-policy", "llama-deep-checkpointing"]
"""GPT-2 with the three reward precisions (bitsandbytes' CUDA layouts, autocast copies, peft's fp32 LoRA inputs),
one nf4 network shared by policy, reference and reward, and gradient checkpointing in every training stage (what
a checkpointed layer keeps under bf16 autocast)."""


@pytest.mark.parametrize("name", CONFIGS)
def test_planned_stage_memory_is_within_20_percent_of_cuda_max_allocated(name, tmp_path, record):
    rows = plan_check.compare(name, tmp_path, device="cuda")
    record(planner=rows)
    assert rows and all(r["measured_bytes"] > 0 for r in rows)
    outside = [r for r in rows if abs(r["ratio"] - 1) > plan_check.TOLERANCE]
    assert not outside, "\n" + plan_check.table(rows)
