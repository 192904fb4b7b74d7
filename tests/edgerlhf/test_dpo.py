"""The alignment stage with `algorithm=dpo` on a tiny run directory: data format, the LM head and KL it computes, one
copy of the network, training, checkpoints and resume, cancel, the saved policy, and evaluation without a reward stage."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from edgerlhf import memory, models
from edgerlhf.align import dpo, offline, policy
from edgerlhf.config import PipelineConfig
from edgerlhf.context import Cancelled, RunContext
from edgerlhf.contract import PPO_ADAPTER, SFT_MERGED, TRAIN_PREFS, merge_overrides
from edgerlhf.data import read_prefs
from edgerlhf.dialogue import PromptFormat
from edgerlhf.pipeline import run_pipeline, run_stage
from tests.support.tiny import chat_template_tokenizer, make_tiny_run, tiny_config


def dpo_config(**fields) -> PipelineConfig:
    """The tiny test config with DPO as the alignment algorithm, a few steps of 4 pairs."""
    dpo_fields = {"max_steps": 2, "batch_size": 4, "learning_rate": 0.05, "max_length": 96, "eval_every": 100,
                  "checkpoint_every": 100, "lora_r": 4, "lora_alpha": 8, "n_probe_prompts": 1, **fields}
    return PipelineConfig.from_dict(merge_overrides(tiny_config().to_dict(), {"algorithm": "dpo", "dpo": dpo_fields}))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("dpo-run"), dpo_config())


def _trainer(run_dir, config, ref_model=None):
    device = torch.device("cpu")
    tokenizer = models.load_tokenizer(run_dir / SFT_MERGED)
    model = models.load_causal_lm(run_dir / SFT_MERGED, device)
    ctx = RunContext(run_dir)
    return dpo.build_trainer(config, ctx, model, tokenizer, device, ref_model=ref_model)


def _batch(trainer, n=4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def test_pairs_are_tokenized_in_the_prompt_format_within_max_length(run_dir, tmp_path):
    tokenizer = models.load_tokenizer(run_dir / SFT_MERGED)
    rows = read_prefs(run_dir / TRAIN_PREFS)
    fmt = PromptFormat.of(tokenizer)
    data = dpo.preference_dataset(run_dir / TRAIN_PREFS, tokenizer, max_length=1000)
    first = data[0]
    assert first["prompt_ids"] == tokenizer(fmt.prompt(rows[0]["prompt"]))["input_ids"]
    assert tokenizer.decode(first["chosen_ids"]) == fmt.answer(rows[0]["chosen"])  # " answer<|endoftext|>"
    assert first["rejected_ids"][-1] == tokenizer.eos_token_id

    short = dpo.preference_dataset(run_dir / TRAIN_PREFS, tokenizer, max_length=40)
    for full, cut in zip(data, short):
        assert len(cut["prompt_ids"]) + max(len(cut["chosen_ids"]), len(cut["rejected_ids"])) <= 40
        assert full["prompt_ids"][len(full["prompt_ids"]) - len(cut["prompt_ids"]):] == cut["prompt_ids"]  # its end
        assert full["chosen_ids"][:len(cut["chosen_ids"])] == cut["chosen_ids"]  # an answer keeps its start
        assert len(cut["prompt_ids"]) >= min(len(full["prompt_ids"]), 20)

    # A chat model: the prompt through its template, each answer closed by the template's end of turn.
    chat = chat_template_tokenizer(tmp_path / "chat-tok")
    pair = dpo.preference_dataset(run_dir / TRAIN_PREFS, chat, max_length=1000)[0]
    assert chat.decode(pair["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert chat.decode(pair["chosen_ids"]).endswith("<|im_end|>\n")


def test_cpu_head_and_kl_match_a_full_forward(run_dir):
    """The plain LM head gives TRL's per-token log-probs; `chosen_kl` is the exact KL summed over chosen answers."""
    trainer = _trainer(run_dir, dpo_config())
    model = trainer.model
    with torch.no_grad():  # move the policy away from the reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    batch = _batch(trainer)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        fused = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                      fused_lm_head=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        with model.disable_adapter():
            ref_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logp, ref_logp = F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1)
    mask = labels[:, 1:] != -100
    expected = logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1) * mask
    assert torch.allclose(fused.log_probs, expected, atol=1e-5)
    assert torch.equal(fused.label_mask, mask)

    n = len(batch["input_ids"]) // 2
    kl = ((logp.exp() * (logp - ref_logp)).sum(-1) * mask)[:n].sum(1)  # (B,) chosen answers only
    assert torch.allclose(dpo.chosen_kl(model, batch), kl, rtol=1e-4, atol=1e-5)
    assert (kl > 0).all()
    for name, p in model.named_parameters():  # a zero LoRA update: the policy is the reference again
        if "lora_B" in name:
            p.data.zero_()
    assert dpo.chosen_kl(model, batch).abs().max() < 1e-5


def test_dpo_holds_one_copy_of_the_network_and_the_check_sees_a_second(run_dir):
    sft_model = models.load_causal_lm(run_dir / SFT_MERGED, "cpu")
    base_bytes = sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                      for p in sft_model.parameters()}.values())
    del sft_model

    before = memory.tensor_bytes()
    trainer = _trainer(run_dir, dpo_config())
    grown = memory.tensor_bytes() - before
    assert trainer.ref_model is None  # TRL's reference: the same peft model with the adapter disabled
    assert sum(offline.held_base_storages(trainer).values()) == base_bytes
    assert base_bytes <= grown < 1.5 * base_bytes

    # The naive design, a reference model beside the policy, holds two copies and the check says so.
    naive = _trainer(run_dir, dpo_config(), ref_model=copy.deepcopy(trainer.model.get_base_model()))
    assert sum(offline.held_base_storages(naive).values()) == 2 * base_bytes


class StopAfter(RunContext):
    """A context whose run is cancelled once `n` DPO steps have been logged (as a user would cancel it)."""

    def __init__(self, run_dir, n):
        super().__init__(run_dir)
        self.n = n

    def _poll_cancel(self):
        return len(self.metric_series("dpo/loss")) >= self.n


def test_dpo_trains_checkpoints_resumes_and_saves_a_loadable_policy(tmp_path):
    config = dpo_config(max_steps=4, checkpoint_every=2, eval_every=2)
    run_dir = make_tiny_run(tmp_path / "run", config)

    ctx = StopAfter(run_dir, 3)  # cancelled at the end of step 4, before its log and checkpoint
    ctx.begin_stage("ppo")
    with pytest.raises(Cancelled):
        run_stage("ppo", config, ctx)
    keys = ("dpo/loss", "dpo/accuracy", "dpo/margin", "dpo/kl", "dpo/chosen_reward", "dpo/rejected_reward")
    first = {k: dict(ctx.metric_series(k)) for k in keys}
    assert sorted(first["dpo/loss"]) == [1, 2, 3]
    assert {*keys, "dpo/learning_rate", "dpo/step_s", "mem/rss_mb"} <= {k for _, k, s, _ in ctx.metrics if s == 1}
    assert {"dpo/eval_loss", "dpo/eval_accuracy", "dpo/eval_kl"} <= {k for _, k, s, _ in ctx.metrics if s == 2}
    assert first["dpo/kl"][1] == pytest.approx(0.0, abs=1e-6)  # a fresh LoRA is the reference: no divergence
    assert first["dpo/kl"][3] > 0.0
    assert not (run_dir / PPO_ADAPTER).exists()  # a cancelled stage leaves no policy behind
    assert {s.checkpoint for s in ctx.samples if s.kind == "probe"} == {"ppo/step-0", "ppo/step-2"}

    resumed = RunContext(run_dir)
    resumed.begin_stage("ppo")
    report = run_stage("ppo", config, resumed).model_dump()
    assert report["algorithm"] == "dpo" and report["reward_model"] == "none" and report["reward_precision"] is None
    assert report["resumed_from_step"] == 2
    assert sorted(dict(resumed.metric_series("dpo/loss"))) == [3, 4]
    # Step 3 again, from the step-2 checkpoint, is the same step 3: same pairs, same adapter and optimizer.
    for key, series in first.items():
        assert dict(resumed.metric_series(key))[3] == pytest.approx(series[3], rel=1e-4, abs=1e-6)
    assert 0.5 < report["network_copies"] < 1.5 and report["held_bytes"] > 0
    assert report["final"]["dpo/loss"] is not None and report["kl_coef_final"] is None

    # The policy is a standard peft adapter on sft/merged, with no value head, where every loader looks.
    adapter = run_dir / PPO_ADAPTER
    assert (adapter / "adapter_config.json").exists() and not (adapter / policy.VALUE_HEAD_FILE).exists()
    trained, _ = models.load_policy(run_dir, "ppo")
    sft, _ = models.load_policy(run_dir, "sft")
    changed = [not torch.equal(a, b) for (n, a), (_, b) in zip(trained.named_parameters(), sft.named_parameters())
               if "c_attn" in n and n.endswith("weight")]
    assert any(changed)
    from peft import PeftModel

    named = PeftModel.from_pretrained(models.load_causal_lm(run_dir / SFT_MERGED), str(adapter), adapter_name="policy")
    assert named.active_adapter == "policy"

    # A finished stage resumes at its end and trains no more; another sft model voids the checkpoint.
    again = RunContext(run_dir)
    again.begin_stage("ppo")
    assert run_stage("ppo", config, again).resumed_from_step == 4 and again.metric_series("dpo/loss") == []
    weights = next((run_dir / SFT_MERGED).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())
    assert offline.resumable_checkpoint(config, run_dir, "dpo", config.dpo) is None
    assert not list((run_dir / "ppo" / "checkpoint").glob("checkpoint-*"))

    # Evaluated with the run's reward model when there is one.
    evaluated = run_stage("evaluate", config, RunContext(run_dir)).model_dump()
    assert evaluated["algorithm"] == "dpo" and evaluated["reward_precision"] == "bf16"
    assert evaluated["reward_diff"] is not None and evaluated["ppo"]["reward"]["mean"] is not None
    assert math.isfinite(evaluated["kl"]) and evaluated["kl"] != 0.0  # the sampled estimate of a policy that moved


def test_pipeline_with_dpo_and_no_reward_stage(tmp_path, trained_run):
    """data, sft, ppo (DPO) and evaluate, no reward stage: the evaluation reports gold, length and KL, no rewards.
    The data and sft stages are the session's trained run's (copied without its reward models); the pipeline runs
    the rest."""
    config = PipelineConfig.from_dict(merge_overrides(dpo_config().to_dict(), {
        "stages": ["data", "sft", "ppo", "evaluate"]}))
    ctx = RunContext(trained_run.copy_to(tmp_path / "run", parts=("data", "base", "sft")))
    reports = run_pipeline(config, ctx, skip={"data", "sft"})
    assert list(reports) == ["ppo", "evaluate"]
    assert not (ctx.run_dir / "reward").exists()
    assert reports["ppo"].algorithm == "dpo"
    report = reports["evaluate"].model_dump()
    assert report["algorithm"] == "dpo" and report["reward_precision"] is None
    assert report["reward_diff"] is None and report["win_rate"] is None and report["ppo"]["reward"] is None
    assert report["gold_diff"] is not None and report["gold_diff_equal_length"] is not None
    assert report["length_diff"] is not None and math.isfinite(report["kl"])
    assert all(s["sft_reward"] is None and s["ppo_gold"] is not None for s in report["samples"])
    assert "SFT vs DPO" in (ctx.run_dir / "evaluate" / "report.md").read_text()
    assert "evaluate/reward_ppo" not in {k for _, k, _, _ in ctx.metrics}
    assert json.loads((ctx.run_dir / "evaluate" / "report.json").read_text())["reward_diff"] is None


@pytest.mark.parametrize("scale, cap", [(1.0, None), (0.5, 1.5)])  # plain; scaled and soft-capped (Cohere, Gemma 2)
def test_the_chunked_head_gives_autograds_gradients_without_a_whole_vocabulary_tensor(monkeypatch, scale, cap):
    """`AnswerLogprobs` recomputes each piece's softmax in its backward: its log-probs and the gradient of any loss
    on them, with respect to the hidden states, are what autograd gives through the whole log-softmax of the
    family's logits, also when the pieces split the positions unevenly; the entropy, mean logit and top-1 flags
    are the whole tensor's."""
    torch.manual_seed(0)
    n, h, v = 11, 8, 50
    hidden = torch.randn(n, h, requires_grad=True)
    head = torch.nn.Linear(h, v)
    targets = torch.randint(0, v, (n,))
    weights = torch.randn(n)  # a loss that weighs the positions differently
    monkeypatch.setattr(offline, "KL_CHUNK", 4 * v)  # pieces of 4 positions: 4 + 4 + 3

    token_logp, entropy, mean_logits, is_top1 = offline.AnswerLogprobs.apply(hidden, head.weight.detach(),
                                                                             head.bias.detach(), targets, scale, cap)
    (token_logp * weights).sum().backward()
    got = hidden.grad.clone()
    hidden.grad = None

    logits = models.transform_logits(head(hidden), scale, cap)
    logp = F.log_softmax(logits, -1)
    expected = logp.gather(-1, targets[:, None]).squeeze(-1)
    (expected * weights).sum().backward()
    torch.testing.assert_close(token_logp, expected.detach())
    torch.testing.assert_close(got, hidden.grad)
    torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(-1).detach())
    torch.testing.assert_close(mean_logits, logits.mean(-1).detach())
    assert torch.equal(is_top1, logits.argmax(-1) == targets)
