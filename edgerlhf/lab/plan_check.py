"""Accuracy of the memory planner on the CPU: each stage's measured peak of tensor memory against its plan.

    python -m edgerlhf.lab.plan_check                    # every configuration of the README's table (minutes)
    python -m edgerlhf.lab.plan_check --only gpt2-small  # one of them
    python -m edgerlhf.lab.plan_check --json out.json

Each configuration runs the real stages of its `stages`, `pipeline.run_stage` of sft, reward (once per
precision), ppo (one step, or two of DPO or KTO; the alignment stage runs the configuration's `algorithm`: PPO,
GRPO, RLOO, DPO or KTO) and evaluate, one after the other on a fresh run directory, exactly as a job runs them, on a
random model of its architecture (`model.random_init`, the GPT-2 tokenizer). The data are written so that every
pair has exactly the planner's worst case: prompts of `data.max_prompt_tokens` tokens, responses of
`data.max_response_tokens`, and the random policy rarely stops before `response_length`.

What is measured is the peak of live tensor storage on the CPU while the stage runs (`TensorPeak`: a
`TorchDispatchMode` that registers the storage of every tensor an operation reads or returns and watches it
die; not the process RSS, which also counts the Python runtime, the allocator's caches and the libraries).
Against it, `edgerlhf.plan.plan(config, device="cpu")`'s `tensor_bytes`: the same quantity, planned.
With `--device cuda` the stages run on the GPU in bf16 and the measure is `torch.cuda.max_memory_allocated`
(`CudaPeak`) against the plan's GPU tensor figure. Figures are printed, never asserted on timing; the test
suite checks two small configurations' ratios on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from edgerlhf.contract import TEST_PREFS, TRAIN_PREFS, merge_overrides

MiB = 2**20
TOLERANCE = 0.20
"""The planner's target: within +-20 % of the measured peak, stage by stage."""

SMALL = {"warmup": {"steps": 0},
         "sft": {"max_steps": 2, "eval_every": 1000, "sample_every": 1000, "n_sample_prompts": 1},
         "reward": {"max_steps": 2, "eval_every": 1000},
         "ppo": {"steps": 1, "ppo_epochs": 1, "samples_per_prompt": 1, "n_probe_prompts": 0, "sample_every": 1000,
                 "checkpoint_every": 1000},
         "dpo": {"max_steps": 2, "eval_every": 1000, "checkpoint_every": 1000, "n_probe_prompts": 1},
         "kto": {"max_steps": 2, "eval_every": 1000, "checkpoint_every": 1000, "n_probe_prompts": 1},
         "evaluate": {"n_show": 1, "samples_per_prompt": 1, "n_bootstrap": 10}}
"""Budgets that keep each stage to a step or two: the peak of a step is the peak of the stage."""

CONFIGS: dict[str, dict[str, Any]] = {
    # GPT-2 blocks (LayerNorm, learned positions, GELU, Conv1D, dropout in SFT); the tiny preset's LoRA on
    # c_attn + c_proj, its untied output layer trained in full, and the three reward precisions.
    "gpt2-small": {
        "model": {"architecture": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 128, "n_positions": 512},
        "data": {"max_prompt_tokens": 48, "max_response_tokens": 24},
        "sft": {"batch_size": 4, "max_length": 128},
        "reward": {"precisions": ["bf16", "int8", "int4"], "batch_size": 4, "max_length": 128},
        "ppo": {"batch_size": 8, "mini_batch_size": 4, "response_length": 24, "reward_precision": "bf16"},
        "evaluate": {"n_prompts": 8, "response_length": 24},
    },
    # Deeper and wider GPT-2, every linear adapted, no fully trained head, and the random base's warm-up
    # (every parameter trained) before SFT.
    "gpt2-wide": {
        "model": {"architecture": "gpt2", "n_layer": 4, "n_head": 8, "n_embd": 256, "n_positions": 512,
                  "tie_word_embeddings": True},
        "data": {"max_prompt_tokens": 96, "max_response_tokens": 32},
        "warmup": {"steps": 2, "batch_size": 4, "max_length": 160, "eval_every": 1000},
        "sft": {"batch_size": 8, "max_length": 160, "target_modules": ["all-linear"], "modules_to_save": []},
        "reward": {"precisions": ["bf16"], "batch_size": 4, "max_length": 160},
        "ppo": {"batch_size": 8, "mini_batch_size": 2, "response_length": 32},
        "evaluate": {"n_prompts": 8, "response_length": 32},
    },
    # GPT-2 with an int8 reward model held as a separate quantized copy beside the fp32 policy, and
    # sampling from the whole vocabulary (no top-k: full-vocabulary log-softmax and entropy).
    "gpt2-int8-reward": {
        "model": {"architecture": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 128, "n_positions": 512},
        "data": {"max_prompt_tokens": 40, "max_response_tokens": 16},
        "sft": {"batch_size": 2, "max_length": 96},
        "reward": {"precisions": ["int8"], "batch_size": 2, "max_length": 96},
        "ppo": {"batch_size": 8, "mini_batch_size": 4, "response_length": 16, "top_k": 0, "top_p": 1.0},
        "evaluate": {"n_prompts": 8, "response_length": 16},
    },
    # Llama blocks (RMSNorm, RoPE, gated SiLU MLP), LoRA on every linear.
    "llama-small": {
        "model": {"architecture": "llama", "n_layer": 2, "n_head": 4, "n_embd": 128, "intermediate_size": 384,
                  "n_positions": 512},
        "sft": {"batch_size": 4, "max_length": 128, "target_modules": ["all-linear"], "modules_to_save": []},
        "data": {"max_prompt_tokens": 48, "max_response_tokens": 24},
        "reward": {"precisions": ["bf16", "int4"], "batch_size": 4, "max_length": 128},
        "ppo": {"batch_size": 8, "mini_batch_size": 4, "response_length": 24, "reward_precision": "bf16"},
        "evaluate": {"n_prompts": 8, "response_length": 24},
    },
    # Llama, deeper, longer sequences, LoRA on q/v only, a 4-bit network shared by policy, reference and
    # reward (`ppo.quantized_policy`).
    "llama-4bit-policy": {
        "model": {"architecture": "llama", "n_layer": 4, "n_head": 8, "n_embd": 256, "intermediate_size": 768,
                  "n_positions": 512, "tie_word_embeddings": True},
        "data": {"max_prompt_tokens": 96, "max_response_tokens": 32},
        "sft": {"batch_size": 4, "max_length": 160, "target_modules": ["q_proj", "v_proj"], "modules_to_save": []},
        "reward": {"precisions": ["int4"], "batch_size": 4, "max_length": 160},
        "ppo": {"batch_size": 8, "mini_batch_size": 2, "response_length": 32, "quantized_policy": True},
        "evaluate": {"n_prompts": 8, "response_length": 32},
    },
    # Qwen2 blocks (biases on q/k/v) with grouped-query attention (2 key/value heads for 8).
    "qwen2-gqa": {
        "model": {"architecture": "qwen2", "n_layer": 3, "n_head": 8, "n_kv_head": 2, "n_embd": 256,
                  "intermediate_size": 640, "n_positions": 512, "tie_word_embeddings": True},
        "data": {"max_prompt_tokens": 64, "max_response_tokens": 32},
        "sft": {"batch_size": 4, "max_length": 128, "target_modules": ["all-linear"], "modules_to_save": []},
        "reward": {"precisions": ["bf16"], "batch_size": 4, "max_length": 128},
        "ppo": {"batch_size": 8, "mini_batch_size": 4, "response_length": 32},
        "evaluate": {"n_prompts": 8, "response_length": 32},
    },
    # A deeper, wider Llama on longer prompts: activations, not the vocabulary, dominate every training
    # pass, as they do for the real presets' models.
    "llama-deep": {
        "model": {"architecture": "llama", "n_layer": 8, "n_head": 6, "n_embd": 384, "intermediate_size": 1024,
                  "n_positions": 512, "tie_word_embeddings": True},
        "data": {"max_prompt_tokens": 128, "max_response_tokens": 32},
        "sft": {"batch_size": 4, "max_length": 192, "target_modules": ["all-linear"], "modules_to_save": []},
        "reward": {"precisions": ["bf16"], "batch_size": 4, "max_length": 192},
        "ppo": {"batch_size": 8, "mini_batch_size": 4, "response_length": 16},
        "evaluate": {"n_prompts": 8, "response_length": 16},
    },
    # The alignment stage per algorithm (`algorithm`): GRPO with 4 samples a prompt and no value head (its policy
    # pass keeps no hidden states), on GPT-2 with the shared bf16 reward adapter.
    "gpt2-grpo": {
        "algorithm": "grpo",
        "model": {"architecture": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 128, "n_positions": 512},
        "data": {"max_prompt_tokens": 48, "max_response_tokens": 24},
        "sft": {"batch_size": 4, "max_length": 128},
        "reward": {"precisions": ["bf16"], "batch_size": 4, "max_length": 128},
        "ppo": {"batch_size": 8, "samples_per_prompt": 4, "mini_batch_size": 4, "response_length": 24},
        "evaluate": {"n_prompts": 8, "response_length": 24},
    },
    # RLOO on a deeper Llama against a separate int4 reward copy.
    "llama-rloo": {
        "algorithm": "rloo",
        "model": {"architecture": "llama", "n_layer": 4, "n_head": 4, "n_embd": 256, "intermediate_size": 640,
                  "n_positions": 512, "tie_word_embeddings": True},
        "data": {"max_prompt_tokens": 96, "max_response_tokens": 24},
        "sft": {"batch_size": 4, "max_length": 160, "target_modules": ["all-linear"], "modules_to_save": []},
        "reward": {"precisions": ["int4"], "batch_size": 4, "max_length": 160},
        "ppo": {"batch_size": 8, "samples_per_prompt": 2, "mini_batch_size": 4, "response_length": 24},
        "evaluate": {"n_prompts": 8, "response_length": 24},
    },
    # PPO scored by a Python function (`ppo.reward_function`): no reward stage, no reward adapter, no scoring pass.
    "llama-reward-fn": {
        "stages": ["data", "sft", "ppo", "evaluate"],
        "model": {"architecture": "llama", "n_layer": 2, "n_head": 4, "n_embd": 128, "intermediate_size": 384,
                  "n_positions": 512},
        "data": {"max_prompt_tokens": 48, "max_response_tokens": 24},
        "sft": {"batch_size": 4, "max_length": 128, "target_modules": ["all-linear"], "modules_to_save": []},
        "ppo": {"batch_size": 8, "mini_batch_size": 4, "response_length": 24, "reward_function": "question"},
        "evaluate": {"n_prompts": 8, "response_length": 24},
    },
    # DPO (TRL's DPOTrainer, the CPU's answer-only log-prob head) without a reward stage: the evaluation has no
    # reward model either.
    "gpt2-dpo": {
        "algorithm": "dpo",
        "stages": ["data", "sft", "ppo", "evaluate"],
        "model": {"architecture": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 128, "n_positions": 512},
        "data": {"max_prompt_tokens": 48, "max_response_tokens": 24},
        "sft": {"batch_size": 4, "max_length": 128},
        "dpo": {"batch_size": 4, "max_length": 128, "lora_r": 8},
        "ppo": {"response_length": 24},
        "evaluate": {"n_prompts": 8, "response_length": 24},
    },
    # DPO on a deeper Llama with LoRA on every linear and longer pairs: activations dominate its training step.
    "llama-dpo": {
        "algorithm": "dpo",
        "model": {"architecture": "llama", "n_layer": 6, "n_head": 6, "n_embd": 384, "intermediate_size": 1024,
                  "n_positions": 512, "tie_word_embeddings": True},
        "data": {"max_prompt_tokens": 128, "max_response_tokens": 32},
        "sft": {"batch_size": 4, "max_length": 192, "target_modules": ["all-linear"], "modules_to_save": []},
        "reward": {"precisions": ["bf16"], "batch_size": 4, "max_length": 192},
        "dpo": {"batch_size": 4, "max_length": 192, "lora_r": 16},
        "ppo": {"response_length": 16},
        "evaluate": {"n_prompts": 8, "response_length": 16},
    },
    # KTO (TRL's KTOTrainer, the CPU's answer-only log-prob head) on the pairs split into labelled answers, without
    # a reward stage.
    "gpt2-kto": {
        "algorithm": "kto",
        "stages": ["data", "sft", "ppo", "evaluate"],
        "model": {"architecture": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 128, "n_positions": 512},
        "data": {"max_prompt_tokens": 48, "max_response_tokens": 24},
        "sft": {"batch_size": 4, "max_length": 128},
        "kto": {"batch_size": 8, "max_length": 128, "lora_r": 8},
        "ppo": {"response_length": 24},
        "evaluate": {"n_prompts": 8, "response_length": 24},
    },
    # KTO on the deeper Llama of llama-dpo: activations dominate its training step.
    "llama-kto": {
        "algorithm": "kto",
        "model": {"architecture": "llama", "n_layer": 6, "n_head": 6, "n_embd": 384, "intermediate_size": 1024,
                  "n_positions": 512, "tie_word_embeddings": True},
        "data": {"max_prompt_tokens": 128, "max_response_tokens": 32},
        "sft": {"batch_size": 4, "max_length": 192, "target_modules": ["all-linear"], "modules_to_save": []},
        "reward": {"precisions": ["bf16"], "batch_size": 4, "max_length": 192},
        "kto": {"batch_size": 8, "max_length": 192, "lora_r": 16},
        "ppo": {"response_length": 16},
        "evaluate": {"n_prompts": 8, "response_length": 16},
    },
}
"""The configurations of the README's accuracy table: overrides of the `tiny` preset (+ `SMALL`)."""

CHECKPOINTING = {section: {"gradient_checkpointing": True} for section in ("sft", "reward", "ppo", "dpo", "kto")}
"""Gradient checkpointing in every training stage: each layer's input kept, one layer recomputed in the backward."""
# The deep Llamas again with it.
CONFIGS["llama-deep-checkpointing"] = merge_overrides(CONFIGS["llama-deep"], CHECKPOINTING)
CONFIGS["llama-dpo-checkpointing"] = merge_overrides(CONFIGS["llama-dpo"], CHECKPOINTING)
CONFIGS["llama-kto-checkpointing"] = merge_overrides(CONFIGS["llama-kto"], CHECKPOINTING)


# --- measuring tensor memory ---------------------------------------------------------------------


class TensorPeak(TorchDispatchMode):
    """The peak bytes of live tensor storage on a device while the mode is on (each storage counted once).

    On entry it registers every tensor the garbage collector can reach; then the storage of every tensor an
    operation reads or returns (a weight loaded from disk is registered by its first use). A weak reference
    on each storage removes it when it is freed, so `peak` is the high-water mark of what is alive, the
    CPU's counterpart of `torch.cuda.max_memory_allocated`.
    """

    def __init__(self, device: str = "cpu"):
        super().__init__()
        self.device = device
        self.live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = 0
        self.peak = 0
        self.start = 0

    def _track(self, tensor: Any) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != self.device or tensor.is_meta:
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or otherwise storage-less tensors
            return
        key, size = storage._cdata, storage.nbytes()
        known = self.live.get(key)
        if known is not None:
            if known[1] != size:  # resized in place
                self.current += size - known[1]
                self.live[key] = (known[0], size)
            return

        def freed(_ref, key=key):
            entry = self.live.pop(key, None)
            if entry is not None:
                self.current -= entry[1]

        self.live[key] = (weakref.ref(storage, freed), size)
        self.current += size

    def __enter__(self):
        gc.collect()
        with warnings.catch_warnings():  # isinstance() on some module attributes warns
            warnings.simplefilter("ignore")
            for obj in gc.get_objects():
                try:
                    if isinstance(obj, torch.Tensor):
                        self._track(obj)
                except Exception:  # objects that refuse isinstance()
                    continue
        self.start = self.peak = self.current
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten((args, kwargs, out))[0]:
            self._track(tensor)
        self.peak = max(self.peak, self.current)
        return out

    @property
    def stage_peak(self) -> int:
        """The peak above what was alive on entry."""
        return self.peak - self.start


class CudaPeak:
    """`TensorPeak`'s counterpart on a GPU: the CUDA allocator's own peak (`torch.cuda.max_memory_allocated`)."""

    def __enter__(self):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()

    @property
    def stage_peak(self) -> int:
        return self.peak - self.start


# --- the run -------------------------------------------------------------------------------------


def check_config(name: str, device: str = "cpu"):
    """The pipeline config of configuration `name` (the `tiny` preset with `SMALL` and its overrides)."""
    from edgerlhf.config import load_config

    return load_config("tiny", merge_overrides(SMALL, {**CONFIGS[name], "device": device}))


def worst_case_prefs(tokenizer, prompt_tokens: int, response_tokens: int, n: int) -> list[dict[str, str]]:
    """`n` distinct preference pairs of exactly `prompt_tokens` prompt tokens and `response_tokens` response
    tokens (counted as the data stage counts them): every batch has the planner's worst-case shape."""
    letters, digits = "abcdefghijklmnopqrstuvwxyz", "0123456789"
    frame = "\n\nHuman:" + "{}" + "\n\nAssistant:"
    words = prompt_tokens - len(tokenizer(frame.format(""), add_special_tokens=False)["input_ids"])
    rows = []
    for i in range(n):  # single-token words: a letter and a digit make each prompt different
        prompt = frame.format(f" {letters[i % 26]} {digits[i // 26 % 10]}" + f" {letters[i % 26]}" * (words - 2))
        chosen = " ".join([letters[(i + 1) % 26]] * response_tokens)
        rejected = " ".join([letters[(i + 2) % 26]] * response_tokens)
        for text, want in ((prompt, prompt_tokens), (" " + chosen, response_tokens), (" " + rejected, response_tokens)):
            got = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if got != want:
                raise ValueError(f"the synthetic text has {got} tokens, not {want}: {text[:40]!r}")
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def measure(config, run_dir: Path, stages: list[str] | None = None) -> dict[str, int]:
    """Run `stages` (default: those of `config` but data) on a fresh `run_dir`; the peak tensor bytes of each
    (reward: per precision; ppo: the alignment stage of `config.algorithm`)."""
    from edgerlhf.config import load_config
    from edgerlhf.context import RunContext
    from edgerlhf.models import load_tokenizer
    from edgerlhf.pipeline import run_stage

    run_dir = Path(run_dir)
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.name_or_path)
    # Enough training pairs for a full scoring batch of the reward model (2 texts a pair), enough held-out
    # prompts for the evaluation.
    rows = worst_case_prefs(tokenizer, config.data.max_prompt_tokens, config.data.max_response_tokens, 24)
    for name, part in ((TRAIN_PREFS, rows[:16]), (TEST_PREFS, rows[16:])):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    (run_dir / "config.json").write_text(config.to_json())
    ctx = RunContext(run_dir)
    peaks: dict[str, int] = {}
    for stage in stages or [s for s in config.stages if s != "data"]:
        runs = [(stage, config)]
        if stage == "reward":  # one run per precision, each measured alone
            base = {k: v for k, v in config.to_dict().items() if k != "preset"}
            runs = [(f"reward/{p}", load_config(config.preset, merge_overrides(
                base, {"reward": {"precisions": [p]}, "ppo": {"reward_precision": p}})))
                for p in config.reward.precisions]
        for label, stage_config in runs:
            gc.collect()
            with TensorPeak() if config.device == "cpu" else CudaPeak() as meter:
                run_stage(stage, stage_config, ctx)
            peaks[label] = meter.stage_peak
    return peaks


def compare(name: str, work: Path, stages: list[str] | None = None, device: str = "cpu") -> list[dict[str, Any]]:
    """One row per stage of configuration `name`: planned and measured bytes, their ratio."""
    from edgerlhf.plan import plan

    config = check_config(name, device)
    planned = {s.stage: s for s in plan(config, device=device).stages}
    started = time.perf_counter()
    measured = measure(config, work, stages)
    seconds = time.perf_counter() - started
    return [{"config": name, "stage": stage, "planned_bytes": planned[stage].tensor_bytes, "measured_bytes": value,
             "ratio": planned[stage].tensor_bytes / value, "phase": planned[stage].phase,
             "largest_term": planned[stage].items[0].name, "seconds": round(seconds, 1)}
            for stage, value in measured.items()]


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'configuration':<18} {'stage':<12} {'planned MiB':>11} {'measured MiB':>12} {'ratio':>6}  "
             f"{'planned peak in':<18} largest planned term", "-" * 110]
    for r in rows:
        flag = "" if abs(r["ratio"] - 1) <= TOLERANCE else "  <- outside +-20 %"
        lines.append(f"{r['config']:<18} {r['stage']:<12} {r['planned_bytes'] / MiB:>11.1f} "
                     f"{r['measured_bytes'] / MiB:>12.1f} {r['ratio']:>6.2f}  {r['phase']:<18} "
                     f"{r['largest_term']}{flag}")
    ratios = [r["ratio"] for r in rows]
    if ratios:
        inside = sum(abs(x - 1) <= TOLERANCE for x in ratios)
        lines.append(f"{inside}/{len(ratios)} stages within +-20 %; ratio planned/measured from {min(ratios):.2f} "
                     f"to {max(ratios):.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgerlhf.lab.plan_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=sorted(CONFIGS), help="run only this configuration (repeatable)")
    parser.add_argument("--stages", help="comma-separated subset of sft,reward,ppo,evaluate (later stages need the "
                                         "earlier; default: the configuration's own stages)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared CPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: fp32, live tensor storage; cuda: bf16, torch.cuda.max_memory_allocated")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    rows: list[dict[str, Any]] = []
    for name in args.only or list(CONFIGS):
        print(f"[plan_check] {name} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="edgerlhf-plan-check-") as tmp:
            rows += compare(name, Path(tmp), stages, args.device)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(abs(r["ratio"] - 1) <= TOLERANCE for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
