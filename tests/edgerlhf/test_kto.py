"""The alignment stage with `algorithm=kto` on a tiny run directory: its unpaired examples (from the pairs split, or
read from a data set of thumbs as a feedback snapshot writes it), their tokens and KL partners, the loss term by term,
one copy of the network, training, checkpoints and resume, cancel, the saved policy, evaluation with and without a
reward stage, its config and its memory plan."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from db.feedback import records as feedback_records
from edgerlhf import memory, models, plan
from edgerlhf.align import kto, offline, policy
from edgerlhf.config import ConfigError, PipelineConfig, load_config
from edgerlhf.context import Cancelled, RunContext
from edgerlhf.contract import (PPO_ADAPTER, SFT_MERGED, SFT_TRAIN, TEST_UNPAIRED, TRAIN_PREFS, TRAIN_UNPAIRED,
                               merge_overrides)
from edgerlhf.data import read_prefs, read_unpaired, unpaired, unpaired_of_pairs
from edgerlhf.dialogue import PromptFormat
from edgerlhf.formats import DataError
from edgerlhf.lab import plan_check
from edgerlhf.pipeline import run_pipeline, run_stage
from tests.support.tiny import make_tiny_run, tiny_config

GiB = 2**30


def kto_config(**fields) -> PipelineConfig:
    """The tiny test config with KTO as the alignment algorithm, a few steps of 4 labelled answers."""
    kto_fields = {"max_steps": 2, "batch_size": 4, "learning_rate": 0.05, "max_length": 96, "eval_every": 100,
                  "checkpoint_every": 100, "lora_r": 4, "lora_alpha": 8, "n_probe_prompts": 1, **fields}
    return PipelineConfig.from_dict(merge_overrides(tiny_config().to_dict(), {"algorithm": "kto", "kto": kto_fields}))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("kto-run"), kto_config())


def _trainer(run_dir, config, ref_model=None):
    device = torch.device("cpu")
    tokenizer = models.load_tokenizer(run_dir / SFT_MERGED)
    model = models.load_causal_lm(run_dir / SFT_MERGED, device)
    return kto.build_trainer(config, RunContext(run_dir), model, tokenizer, device, ref_model=ref_model)


# --- data -----------------------------------------------------------------------------------------


def test_a_pair_gives_a_desirable_and_an_undesirable_answer():
    pairs = [{"prompt": "p", "chosen": "good", "rejected": "bad"},
             {"prompt": "p", "chosen": "bad", "rejected": ""},  # the data stage's pair against an empty answer
             {"prompt": "p", "chosen": "good", "rejected": "bad"},  # the same pair again
             {"prompt": "q", "chosen": "bad", "rejected": "worse"}]
    assert unpaired_of_pairs(pairs) == [
        {"prompt": "p", "completion": "good", "label": True}, {"prompt": "p", "completion": "bad", "label": False},
        {"prompt": "p", "completion": "", "label": False},  # the empty answer is bad; "bad" is not made good
        {"prompt": "q", "completion": "bad", "label": True}, {"prompt": "q", "completion": "worse", "label": False}]


def test_a_run_without_unpaired_files_splits_its_pairs(run_dir):
    assert not (run_dir / TRAIN_UNPAIRED).exists()  # as the tests' and the benchmark's run directories are
    assert unpaired(run_dir, "train") == unpaired_of_pairs(read_prefs(run_dir / TRAIN_PREFS))


def test_unpaired_rows_are_read_as_a_data_set_and_a_bad_row_is_named(tmp_path):
    good = tmp_path / "thumbs.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in (
        {"prompt": "Hi there", "completion": "Hello!", "label": True},
        {"prompt": [{"role": "user", "content": "Q?"}], "completion": [{"role": "assistant", "content": "A."}],
         "label": 0, "feedback_id": 3},
        {"prompt": "\n\nHuman: Why?\n\nAssistant:", "completion": " Because. ", "label": "yes"})) + "\n")
    assert read_unpaired(good) == [
        {"prompt": "\n\nHuman: Hi there\n\nAssistant:", "completion": "Hello!", "label": True},
        {"prompt": "\n\nHuman: Q?\n\nAssistant:", "completion": "A.", "label": False},
        {"prompt": "\n\nHuman: Why?\n\nAssistant:", "completion": "Because.", "label": True}]

    bad_label = tmp_path / "bad_label.jsonl"
    bad_label.write_text(json.dumps({"prompt": "p", "completion": "c", "label": True}) + "\n"
                         + json.dumps({"prompt": "p", "completion": "c", "label": "maybe"}) + "\n")
    with pytest.raises(DataError, match=r"bad_label\.jsonl:2: column 'label': expected true or false, got 'maybe'"):
        read_unpaired(bad_label)
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"prompt": "p", "completion": "c", "label": True}) + "\n"
                         + json.dumps({"prompt": "p", "label": False}) + "\n")
    with pytest.raises(DataError, match=r"no_answer\.jsonl:2: column 'completion' is missing"):
        read_unpaired(no_answer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert read_unpaired(empty) == []  # a data set of demonstrations or prompts gives KTO nothing


def test_the_data_stage_writes_a_feedback_snapshot_of_thumbs_for_kto(tmp_path):
    """Thumbs from chat, as `db.feedback.records` makes them into a data set (conversational, a feedback id each):
    the data stage splits them by prompt into KTO's files, and SFT learns the answers that got a thumb up."""
    rows = [SimpleNamespace(id=i, rating=1 if i % 3 else -1, messages=[{"role": "user", "content": f"Question {i}?"}],
                            reply=f"Answer number {i}.", better=None) for i in range(1, 21)]
    snapshot = tmp_path / "feedback-unpaired.jsonl"
    snapshot.write_text("".join(json.dumps(r) + "\n" for r in feedback_records(rows, "unpaired")))
    config = load_config("tiny", {"stages": ["data"], "data": {"source": str(snapshot), "labels": "human",
                                                               "test_fraction": 0.25}})
    ctx = RunContext(tmp_path / "run")
    report = run_stage("data", config, ctx)
    train, test = unpaired(ctx.run_dir, "train"), unpaired(ctx.run_dir, "test")
    assert report.format == "unpaired" and report.unpaired_examples == {"train": len(train), "test": len(test)}
    assert len(train) + len(test) == 20 and len(test) == 5
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    by_answer = {r["completion"]: r["label"] for r in train + test}
    assert by_answer == {f"Answer number {i}.": bool(i % 3) for i in range(1, 21)}
    assert {r["completion"] for r in read_prefs(ctx.run_dir / SFT_TRAIN)} == {r["completion"] for r in train
                                                                              if r["label"]}
    assert read_prefs(ctx.run_dir / TRAIN_PREFS) == []  # no pairs: the reward model and DPO have nothing to read
    kto_ctx = RunContext(ctx.run_dir)
    (ctx.run_dir / TRAIN_UNPAIRED).write_text("")  # a data set of demonstrations leaves KTO's files empty
    with pytest.raises(DataError, match="holds no labelled answers"):
        kto.build_trainer(kto_config(), kto_ctx, None, None, torch.device("cpu"))


# --- tokens, KL partners and the loss -------------------------------------------------------------


def test_each_answer_takes_a_kl_partner_of_another_prompt_in_its_batch():
    assert kto.kl_partners(["a", "b", "c", "d"], 4) == [3, 0, 1, 2]  # TRL's rotation
    assert kto.kl_partners(["a", "a", "b", "b"], 4) == [3, 3, 1, 1]  # a pair's two answers: never each other
    assert kto.kl_partners(["a", "b", "c", "d", "e"], 2) == [1, 0, 3, 2, 4]  # within each batch; a last one alone
    assert kto.kl_partners(["a", "a"], 2) == [1, 0]  # no other prompt: the rotation


def test_answers_are_tokenized_in_the_prompt_format_and_shuffled_with_their_partners(run_dir):
    tokenizer = models.load_tokenizer(run_dir / SFT_MERGED)
    fmt = PromptFormat.of(tokenizer)
    rows = unpaired(run_dir, "train")
    data = kto.unpaired_dataset(rows, tokenizer, max_length=1000, batch_size=4, seed=0)
    assert len(data) == len(rows) and sum(data["label"]) == sum(r["label"] for r in rows)
    texts = {(tokenizer.decode(e["prompt_ids"]), tokenizer.decode(e["completion_ids"]), e["label"]) for e in data}
    assert texts == {(fmt.prompt(r["prompt"]), fmt.answer(r["completion"]), r["label"]) for r in rows}
    assert [e["prompt_ids"] for e in data][:4] != [tokenizer(fmt.prompt(r["prompt"]))["input_ids"] for r in rows[:4]]
    assert data["prompt_ids"] == kto.unpaired_dataset(rows, tokenizer, 1000, 4, seed=0)["prompt_ids"]  # seeded
    for start in range(0, len(data), 4):
        batch = [data[i] for i in range(start, min(start + 4, len(data)))]
        answers = [e["completion_ids"] for e in batch]
        assert all(e["KL_completion_ids"] in answers for e in batch)  # the KL answers are the batch's own

    short = kto.unpaired_dataset(rows, tokenizer, max_length=40, batch_size=4, seed=0)
    for full, cut in zip(data, short):
        assert len(cut["prompt_ids"]) + len(cut["completion_ids"]) <= 40
        assert full["prompt_ids"][len(full["prompt_ids"]) - len(cut["prompt_ids"]):] == cut["prompt_ids"]  # its end
        assert full["completion_ids"][:len(cut["completion_ids"])] == cut["completion_ids"]  # an answer its start


def _sequence_logp(model, ids, attention, completion) -> torch.Tensor:
    """sum over the answer's tokens of log p(token | everything before it) (B,), from the model's whole logits."""
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]  # (B, T-1, V)
    logp = F.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return (logp * completion[:, 1:]).sum(1)


def test_the_loss_is_ktos_term_by_term_and_training_on_it_lowers_it(run_dir):
    """TRL's loss through the stage's trainer (its CPU head, adapter-off reference, KL partners) is the paper's,
    computed here from whole forward passes: r = log pi - log ref of each answer, z = the mean of r over the KL
    sequences clamped at 0, 1 - sigmoid(beta (r - z)) for a desirable answer and 1 - sigmoid(beta (z - r)) for an
    undesirable one, each times its weight, averaged. A few steps on the batch lower it and part the rewards."""
    config = kto_config(beta=0.5, desirable_weight=1.5, undesirable_weight=0.5)
    trainer = _trainer(run_dir, config)
    model = trainer.model
    model.train()  # as the Trainer does (TRL switched dropout off): the metrics go to "train"
    with torch.no_grad():  # move the policy away from the reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    raw_kl = []
    for start in (0, 12):  # two batches of desirable and undesirable answers (the dataset's order is seeded)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(start, start + 4)])
        assert 0 < batch["label"].sum() < 4, "the test wants both kinds of answer in its batch"
        with torch.no_grad():
            loss = trainer.compute_loss(model, batch)

            def log_ratio(prefix: str) -> torch.Tensor:
                args = (batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"],
                        batch[f"{prefix}completion_mask"])
                policy_logp = _sequence_logp(model, *args)
                with model.disable_adapter():
                    return policy_logp - _sequence_logp(model, *args)

            r, kl_ratio = log_ratio(""), log_ratio("KL_")
        z = kl_ratio.mean().clamp(min=0)
        label = batch["label"].bool()
        expected = torch.where(label, 1.5 * (1 - torch.sigmoid(0.5 * (r - z))),
                               0.5 * (1 - torch.sigmoid(0.5 * (z - r))))
        assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-4)
        assert trainer._metrics["train"]["kl"][-1] == pytest.approx(z.item(), rel=1e-4, abs=1e-6)
        raw_kl.append(kl_ratio.mean().item())
    assert raw_kl[0] < 0 < raw_kl[1], "one batch's estimate is clamped to 0, the other's is not"

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        step_loss = trainer.compute_loss(model, batch)
        optimizer.zero_grad()
        step_loss.backward()
        optimizer.step()
        losses.append(step_loss.item())
    assert losses[-1] < losses[0] - 0.01, losses
    assert trainer._metrics["train"]["rewards/chosen"][-1] > trainer._metrics["train"]["rewards/rejected"][-1]


def test_a_step_split_on_out_of_memory_is_the_whole_steps(run_dir):
    """A step retried in halves (`oom.SplitOnOutOfMemory`, as after an out-of-memory error) gives the whole batch's
    loss and gradients: each half keeps the batch's KL sequences, so its z is the batch's."""
    def step(size: int):
        trainer = _trainer(run_dir, kto_config())
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # the same policy, away from the reference, in both
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(generator=generator, std=0.3)
        trainer.model.train()
        trainer.micro.size = size
        trainer.current_gradient_accumulation_steps = 1  # what the Trainer's loop sets before a step
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(12, 16)])
        loss = trainer.training_step(trainer.model, batch)
        return loss, trainer._metrics["train"]["kl"], {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                                       if p.requires_grad}

    (whole_loss, whole_kl, whole), (split_loss, split_kl, split) = step(4), step(2)
    assert len(split_kl) == 2 and split_kl == pytest.approx([whole_kl[0]] * 2) and whole_kl[0] > 0
    assert split_loss.item() == pytest.approx(whole_loss.item(), rel=1e-5)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-7, msg=name)


def test_kto_holds_one_copy_of_the_network_and_the_check_sees_a_second(run_dir):
    sft_model = models.load_causal_lm(run_dir / SFT_MERGED, "cpu")
    base_bytes = sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                      for p in sft_model.parameters()}.values())
    del sft_model

    before = memory.tensor_bytes()
    trainer = _trainer(run_dir, kto_config())
    grown = memory.tensor_bytes() - before
    assert trainer.ref_model is None  # TRL's reference: the same peft model with the adapter disabled
    assert sum(offline.held_base_storages(trainer).values()) == base_bytes
    assert base_bytes <= grown < 1.5 * base_bytes

    naive = _trainer(run_dir, kto_config(), ref_model=copy.deepcopy(trainer.model.get_base_model()))
    assert sum(offline.held_base_storages(naive).values()) == 2 * base_bytes


# --- the stage ------------------------------------------------------------------------------------


class StopAfter(RunContext):
    """A context whose run is cancelled once `n` KTO steps have been logged (as a user would cancel it)."""

    def __init__(self, run_dir, n):
        super().__init__(run_dir)
        self.n = n

    def _poll_cancel(self):
        return len(self.metric_series("kto/loss")) >= self.n


def test_kto_trains_checkpoints_resumes_and_saves_a_loadable_policy(tmp_path):
    config = kto_config(max_steps=4, checkpoint_every=2, eval_every=2)
    run_dir = make_tiny_run(tmp_path / "run", config)

    ctx = StopAfter(run_dir, 3)  # cancelled at the end of step 4, before its log and checkpoint
    ctx.begin_stage("ppo")
    with pytest.raises(Cancelled):
        run_stage("ppo", config, ctx)
    keys = ("kto/loss", "kto/kl", "kto/chosen_reward", "kto/rejected_reward", "kto/grad_norm")
    first = {k: dict(ctx.metric_series(k)) for k in keys}
    assert sorted(first["kto/loss"]) == [1, 2, 3]
    assert {*keys, "kto/learning_rate", "kto/step_s", "kto/entropy", "mem/rss_mb"} <= {
        k for _, k, s, _ in ctx.metrics if s == 1}
    assert {"kto/eval_loss", "kto/eval_kl", "kto/eval_chosen_reward", "kto/eval_rejected_reward"} <= {
        k for _, k, s, _ in ctx.metrics if s == 2}
    # A fresh LoRA is the reference: every answer's value is sigmoid(0), and no divergence.
    assert first["kto/loss"][1] == pytest.approx(0.5) and first["kto/kl"][1] == pytest.approx(0.0, abs=1e-6)
    assert first["kto/chosen_reward"][3] != 0.0 or first["kto/rejected_reward"][3] != 0.0  # the policy moved
    assert not (run_dir / PPO_ADAPTER).exists()  # a cancelled stage leaves no policy behind
    assert {s.checkpoint for s in ctx.samples if s.kind == "probe"} == {"ppo/step-0", "ppo/step-2"}

    resumed = RunContext(run_dir)
    resumed.begin_stage("ppo")
    report = run_stage("ppo", config, resumed).model_dump()
    assert report["algorithm"] == "kto" and report["reward_model"] == "none" and report["reward_precision"] is None
    assert report["resumed_from_step"] == 2
    assert sorted(dict(resumed.metric_series("kto/loss"))) == [3, 4]
    # Step 3 again, from the step-2 checkpoint, is the same step 3: same answers, same adapter and optimizer.
    for key, series in first.items():
        assert dict(resumed.metric_series(key))[3] == pytest.approx(series[3], rel=1e-4, abs=1e-6)
    assert 0.5 < report["network_copies"] < 1.5 and report["held_bytes"] > 0
    assert report["final"]["kto/loss"] is not None and report["kl_coef_final"] is None

    # The policy is a standard peft adapter on sft/merged, with no value head, where every loader looks.
    adapter = run_dir / PPO_ADAPTER
    assert (adapter / "adapter_config.json").exists() and not (adapter / policy.VALUE_HEAD_FILE).exists()
    trained, _ = models.load_policy(run_dir, "ppo")
    sft, _ = models.load_policy(run_dir, "sft")
    changed = [not torch.equal(a, b) for (n, a), (_, b) in zip(trained.named_parameters(), sft.named_parameters())
               if "c_attn" in n and n.endswith("weight")]
    assert any(changed)

    # A finished stage resumes at its end and trains no more; DPO does not resume KTO's checkpoint.
    again = RunContext(run_dir)
    again.begin_stage("ppo")
    assert run_stage("ppo", config, again).resumed_from_step == 4 and again.metric_series("kto/loss") == []
    dpo = PipelineConfig.from_dict(merge_overrides(config.to_dict(), {"algorithm": "dpo"}))
    assert offline.resumable_checkpoint(dpo, run_dir, "dpo", dpo.dpo) is None
    assert not list((run_dir / "ppo" / "checkpoint").glob("checkpoint-*"))

    # Evaluated with the run's reward model when there is one, as after DPO.
    evaluated = run_stage("evaluate", config, RunContext(run_dir)).model_dump()
    assert evaluated["algorithm"] == "kto" and evaluated["reward_precision"] == "bf16"
    assert evaluated["reward_diff"] is not None and evaluated["ppo"]["reward"]["mean"] is not None
    assert math.isfinite(evaluated["kl"]) and evaluated["kl"] != 0.0  # the sampled estimate of a policy that moved


def test_pipeline_with_kto_and_no_reward_stage(tmp_path, trained_run):
    """data, sft, ppo (KTO) and evaluate, no reward stage, on the session's trained run's data (whose data stage
    wrote KTO's files: its pairs split) and SFT: the evaluation reports gold, length and KL, no rewards."""
    run_dir = trained_run.copy_to(tmp_path / "run", parts=("data", "base", "sft"))
    assert read_unpaired(run_dir / TRAIN_UNPAIRED) == unpaired_of_pairs(read_prefs(run_dir / TRAIN_PREFS))
    assert (run_dir / TEST_UNPAIRED).exists()
    config = PipelineConfig.from_dict(merge_overrides(kto_config().to_dict(), {
        "stages": ["data", "sft", "ppo", "evaluate"]}))
    ctx = RunContext(run_dir)
    reports = run_pipeline(config, ctx, skip={"data", "sft"})
    assert list(reports) == ["ppo", "evaluate"] and reports["ppo"].algorithm == "kto"
    assert not (ctx.run_dir / "reward").exists()
    report = reports["evaluate"].model_dump()
    assert report["algorithm"] == "kto" and report["reward_precision"] is None
    assert report["reward_diff"] is None and report["win_rate"] is None and report["ppo"]["reward"] is None
    assert report["gold_diff"] is not None and report["length_diff"] is not None and math.isfinite(report["kl"])
    assert "SFT vs KTO" in (ctx.run_dir / "evaluate" / "report.md").read_text()


# --- config and plan ------------------------------------------------------------------------------


def test_the_kto_config_is_validated_field_by_field():
    config = load_config("tiny", {"algorithm": "kto", "kto": {"beta": 0.2, "desirable_weight": 1.33}})
    assert config.kto.beta == 0.2 and config.kto.desirable_weight == 1.33 and "reward" in config.stages
    for fields, field in (({"batch_size": 1}, "kto.batch_size"), ({"beta": 0.0}, "kto.beta"),
                          ({"undesirable_weight": -1.0}, "kto.undesirable_weight"), ({"max_steps": 0}, "kto.max_steps"),
                          ({"loss_type": "sigmoid"}, "kto.loss_type")):
        with pytest.raises(ConfigError) as raised:
            load_config("tiny", {"algorithm": "kto", "kto": fields})
        assert raised.value.field == field
    with pytest.raises(ConfigError, match=r"kto\.batch_size: .* at least 2 answers per device step, got 1"):
        load_config("tiny", {"kto": {"batch_size": 1}})
    advice = kto.balance_advice(100, 300, 1.0, 1.0)
    assert "kto.desirable_weight in [3.00, 4.00]" in advice
    assert kto.balance_advice(100, 100, 1.0, 1.0) is None and kto.balance_advice(300, 100, 1.0, 3.0) is None


def test_the_planner_plans_ktos_own_step_from_the_kto_fields():
    def peak(overrides: dict) -> int:
        config = load_config("qwen2.5-0.5b-8gb", merge_overrides({"algorithm": "kto"}, overrides))
        return next(s for s in plan.plan(config).stages if s.stage == "ppo").tensor_bytes

    s = next(s for s in plan.plan(load_config("qwen2.5-0.5b-8gb", {"algorithm": "kto"})).stages if s.stage == "ppo")
    assert s.phase.startswith("KTO ") and "rollout generation" not in s.phases and "probe generation" in s.phases
    assert not any("reward" in i.name or "value head" in i.name for i in s.items), [i.name for i in s.items]
    for key, values in (("batch_size", (2, 4, 8)), ("max_length", (64, 128, 256))):
        peaks = [peak({"kto": {key: v}}) for v in values]
        assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks), (key, peaks)
    assert peak({"kto": {"lora_r": 64}}) > peak({"kto": {"lora_r": 8}})
    assert peak({}) == peak({"dpo": {"batch_size": 64}}) == peak({"ppo": {"batch_size": 64, "mini_batch_size": 16}})

    too_big = {"algorithm": "kto", "kto": {"batch_size": 32, "grad_accum": 1}}
    s = next(s for s in plan.plan(load_config("qwen2.5-0.5b-8gb", too_big), 8 * GiB).stages if s.stage == "ppo")
    assert s.fits is False and s.suggestion.change.startswith("kto.batch_size 32 -> "), s.suggestion
    fixed = load_config("qwen2.5-0.5b-8gb", merge_overrides(too_big, s.suggestion.overrides))
    assert fixed.kto.batch_size * fixed.kto.grad_accum == 32 and fixed.kto.batch_size >= 2


def test_the_measured_kto_stage_is_within_20_percent_of_its_plan(tmp_path):
    """The real stage (SFT, then two KTO steps on the planner's worst-case data, `plan_check.measure`): its peak of
    live tensor storage against the CPU plan."""
    torch.set_num_threads(1)
    config = load_config("tiny", merge_overrides(plan_check.SMALL, {
        "algorithm": "kto", "stages": ["data", "sft", "ppo"],
        "model": {"architecture": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128},
        "data": {"max_prompt_tokens": 48, "max_response_tokens": 16}, "sft": {"batch_size": 4, "max_length": 96},
        "kto": {"batch_size": 8, "max_length": 96, "lora_r": 8}}))
    planned = {s.stage: s.tensor_bytes for s in plan.plan(config, device="cpu").stages}
    measured = plan_check.measure(config, tmp_path, ["sft", "ppo"])
    ratio = planned["ppo"] / measured["ppo"]
    assert abs(ratio - 1) <= plan_check.TOLERANCE, (planned, measured)
