"""The whole pipeline end to end, on a task whose answer we know and that length cannot game, and on real
HH-RLHF data.

`tiny` preset (random 2-layer GPT-2 warmed up on the training dialogues, HH-RLHF prompts relabelled by the
content gold `question`: an answer is better when it ends by asking the user something, whatever its
length; the labelled pairs are balanced by length): data -> warm-up + sft -> reward (bf16, int8, int4) ->
ppo -> evaluate, run once for the module. We check, with our own computations from the saved artifacts
rather than the stages' reports alone:
- the warm-up gave a base that is not word salad: held-out perplexity far below a random base's;
- the labels are the gold's, balanced by length, and the bf16 reward model agrees with them on >= 90 % of
  the held-out pairs; the int8 and int4 reward models rank the held-out responses like bf16 (Spearman >= 0.9);
- after PPO, fresh samples on held-out prompts score higher on the gold than the SFT policy's *at equal
  length*, with a bootstrap interval that excludes 0, and the answers did not collapse to empty ones;
- the KL from the reference stays finite and is reported, and PPO held one copy of the network;
- DPO, from the same SFT policy and pairs, in its own process beside PPO, raises the gold at equal length too, with a
  finite KL, no collapse and one copy of the network;
- so does GRPO scored by a stated `judge` reward alone (15 steps): a stand-in OpenAI-compatible server
  (`tests/support/judge.py`) that grades each answer by the gold rule, called over HTTP from the job's process.
  (KTO, GRPO and RLOO against the reward model: the suite's table, every gold at three seeds; the suite's time
  budget keeps them out of CI here.)
  (GRPO and RLOO run in the full suite's table; GRPO learns in CI on the verifiable task, test_verifiable.py.)

Then the same pipeline on the real Anthropic raw file (human labels) with tiny budgets: it must run and
write every report. Every gold at three seeds: `python -m edgerlhf.lab.known_answer` (README, "Known-answer suite").
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgerlhf import gold, models
from edgerlhf.config import SHARED_DIR, load_config
from edgerlhf.context import RunContext
from edgerlhf.contract import TENSORBOARD_DIR
from edgerlhf.data import read_prefs
from edgerlhf.pipeline import run_pipeline

# The module fixture trains the whole pipeline and four alignments: minutes, more on loaded cores.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

GOLD = "question"
"""The content gold the CI run learns (`edgerlhf.gold`)."""


def spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on 2 shared cores, two threads per process mostly wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SHARED_STAGES = ("data", "sft", "reward")
JUDGED = "grpo-judge"
"""The run of GRPO against a stand-in judge that grades by the gold (`ppo.rewards`: one `judge` term)."""
JUDGED_STEPS = 15
OTHER_RUNS = {"dpo": "dpo", JUDGED: "grpo"}
"""Aligned from the same pairs and SFT policy as PPO, each in its own process: run name -> algorithm."""


def judge_grade(answer: str) -> str:
    """The stand-in judge's reply: 10 when the gold says the answer asks back, 0 otherwise."""
    return "10" if gold.score("", answer, GOLD) == 1.0 else "0"


def start_alignment(root: Path, base: Path, name: str, judge_url: str) -> tuple[Path, subprocess.Popen]:
    """`edgerlhf pipeline --stages ppo,evaluate --algorithm <algorithm>` on a copy of `base`'s shared stages; the
    judged run's reward is the judge at `judge_url` alone."""
    from tests.support.judge import ANSWER_MARK

    algorithm, run_dir = OTHER_RUNS[name], root / name
    for stage in SHARED_STAGES:
        shutil.copytree(base / stage, run_dir / stage)
    judge = [{"kind": "judge", "name": "judge", "url": judge_url, "model": "grader", "max_score": 10,
              "rubric": "{prompt}" + ANSWER_MARK + "{answer}"}]
    # A reward without the reward model's noise: 15 steps (of the preset's 30) are enough, and the suite's budget.
    sets = ["--set", f"ppo.rewards={json.dumps(judge)}", "--set", f"ppo.steps={JUDGED_STEPS}"] if name == JUDGED else []
    log = (root / f"{name}.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "edgerlhf.cli", "pipeline", "--preset", "tiny", "--run-dir", str(run_dir),
         "--algorithm", algorithm, "--set", f"data.gold_scorer={GOLD}", *sets, "--stages", "ppo,evaluate"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return run_dir, process


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny pipeline with PPO here, and DPO and the judged GRPO in processes started once the reward model exists,
    the stand-in judge serving from this process."""
    from tests.support.judge import stand_in_judge

    root = tmp_path_factory.mktemp("known-answer")
    run_dir = root / "ppo"
    config = load_config("tiny", {"data": {"gold_scorer": GOLD}})
    ctx = RunContext(run_dir)
    shared = load_config("tiny", {"data": {"gold_scorer": GOLD}, "stages": list(SHARED_STAGES)})
    reports = run_pipeline(shared, ctx)
    with stand_in_judge(judge_grade) as judge:
        others = {name: start_alignment(root, run_dir, name, judge.url) for name in OTHER_RUNS}
        try:
            reports.update(run_pipeline(config, ctx, skip=SHARED_STAGES))
            returncodes = {name: process.wait(timeout=1200) for name, (_, process) in others.items()}
        finally:
            for _, process in others.values():
                process.kill()
    reports = {k: r.model_dump() for k, r in reports.items()}
    return {"config": config, "ctx": ctx, "run_dir": run_dir, "reports": reports, "root": root,
            "others": {a: (d, returncodes[a]) for a, (d, _) in others.items()}, "judged": list(judge.requests)}


@pytest.fixture(scope="module")
def tiny_run(runs):
    return runs["config"], runs["ctx"], runs["run_dir"], runs["reports"]


@pytest.fixture(scope="module")
def held_out_scores(tiny_run):
    """Every reward model's scores of the held-out chosen and rejected responses."""
    _, _, run_dir, _ = tiny_run
    test = read_prefs(run_dir / "data" / "test_prefs.jsonl")
    prompts = [r["prompt"] for r in test]
    scores = {}
    for precision in ("bf16", "int8", "int4"):
        rm = models.load_reward_model(run_dir, precision)
        scores[precision] = (rm.score(prompts, [r["chosen"] for r in test]),
                             rm.score(prompts, [r["rejected"] for r in test]))
        del rm
    return test, scores


def test_the_warmed_up_base_is_not_word_salad(tiny_run):
    _, ctx, _, reports = tiny_run
    warmup = ctx.metric_series("warmup/perplexity")
    assert warmup[0][1] > 10_000  # a random base: about the vocabulary's size
    assert warmup[-1][1] < 600, warmup
    assert reports["sft"]["perplexity"] < 450, reports["sft"]["perplexity"]  # a LoRA SFT alone: ~500-900


def test_held_out_pairs_are_labelled_by_the_gold_and_balanced_by_length(tiny_run):
    _, _, run_dir, reports = tiny_run
    test = read_prefs(run_dir / "data" / "test_prefs.jsonl")
    train = [r for r in read_prefs(run_dir / "data" / "train_prefs.jsonl") if r["rejected"]]
    assert len(test) >= 40
    assert all(gold.prefers(r["prompt"], r["chosen"], r["rejected"], GOLD) for r in test + train)
    assert reports["data"]["test"] == len(test)
    longer = [gold.words(r["chosen"]) > gold.words(r["rejected"]) for r in test + train
              if gold.words(r["chosen"]) != gold.words(r["rejected"])]
    assert abs(sum(longer) / len(longer) - 0.5) < 0.05  # the preferred answer is the longer one half the time
    assert abs(reports["data"]["gold_length_correlation"][GOLD]) < 0.3


def test_bf16_reward_model_agrees_with_the_gold(held_out_scores, tiny_run):
    test, scores = held_out_scores
    chosen, rejected = scores["bf16"]
    agreement = (chosen > rejected).float().mean().item()
    assert agreement >= 0.9, f"bf16 reward model agrees with the gold on {agreement:.1%} of {len(test)} pairs"
    assert tiny_run[3]["reward"]["precisions"]["bf16"]["accuracy"] == pytest.approx(agreement, abs=1e-6)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_reward_models_rank_like_bf16(held_out_scores, precision):
    _, scores = held_out_scores
    quantized = torch.cat(scores[precision]).numpy()
    reference = torch.cat(scores["bf16"]).numpy()
    assert np.isfinite(quantized).all()
    rho = spearman(quantized, reference)
    assert rho >= 0.9, f"{precision} vs bf16 Spearman {rho:.3f}"


def test_ppo_beats_sft_on_the_gold_at_equal_length(tiny_run):
    _, _, run_dir, reports = tiny_run
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    equal = report["gold_diff_equal_length"]
    assert report["gold_scorer"] == GOLD
    assert equal["n"] == report["n_prompts"] >= 32
    assert equal["low"] > 0.0, (f"gold PPO - SFT at equal length = {equal['mean']:.3f}, {equal['confidence']:.0%} "
                                f"interval [{equal['low']:.3f}, {equal['high']:.3f}] does not exclude 0 (length "
                                f"PPO - SFT {report['length_diff']['mean']:+.1f} tokens)")
    assert report["ppo"]["gold"]["mean"] > report["sft"]["gold"]["mean"]
    assert reports["evaluate"]["gold_diff_equal_length"]["low"] == equal["low"]


def test_no_collapse_to_empty_answers(tiny_run):
    _, _, run_dir, _ = tiny_run
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    assert report["ppo"]["empty_rate"] <= 0.1, report["ppo"]
    assert report["ppo"]["response_tokens"]["mean"] >= 3.0, report["ppo"]
    # The evaluation window holds the answers: few run into the cap.
    assert report["response_length"] == 48 and report["sft"]["cap_hit_rate"] <= 0.25


def test_kl_is_finite_and_reported(tiny_run):
    config, ctx, run_dir, reports = tiny_run
    kl = ctx.metric_series("ppo/kl")
    assert [step for step, _ in kl] == list(range(1, config.ppo.steps + 1))
    assert all(math.isfinite(v) for _, v in kl)
    assert math.isfinite(reports["ppo"]["final"]["ppo/kl"])
    evaluation = json.loads((run_dir / "evaluate" / "report.json").read_text())
    assert math.isfinite(evaluation["kl"]) and evaluation["kl"] > 0.0  # PPO moved away from the reference
    # bf16 reward: one network for everything. `held_bytes` is measured (live tensor storages before and
    # after building), so a second copy of the network would show as a ratio near 2.
    assert 1.0 <= reports["ppo"]["network_copies"] < 1.2, reports["ppo"]["network_copies"]


def test_every_stage_wrote_its_report(tiny_run):
    _, _, run_dir, _ = tiny_run
    for stage in ("data", "sft", "reward", "ppo", "evaluate"):
        assert json.loads((run_dir / stage / "report.json").read_text()), stage
    assert (run_dir / "ppo" / "adapter" / "adapter_config.json").exists()
    assert (run_dir / "evaluate" / "report.md").exists()


@pytest.mark.parametrize("name", OTHER_RUNS)
def test_every_algorithm_beats_sft_on_the_gold_at_equal_length(runs, name):
    """DPO and GRPO against the judge, from the same SFT policy and pairs as PPO: a gold gain at equal length
    whose interval excludes 0, a finite KL, no collapse, and one copy of the network held."""
    algorithm = OTHER_RUNS[name]
    run_dir, returncode = runs["others"][name]
    log = (runs["root"] / f"{name}.log").read_text()
    assert returncode == 0, log[-3000:]
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    assert report["algorithm"] == algorithm and report["gold_scorer"] == GOLD
    equal = report["gold_diff_equal_length"]
    assert equal["low"] > 0.0, (f"{algorithm}: gold aligned - SFT at equal length = {equal['mean']:.3f}, interval "
                                f"[{equal['low']:.3f}, {equal['high']:.3f}] does not exclude 0 (length "
                                f"{report['length_diff']['mean']:+.1f} tokens)")
    assert math.isfinite(report["kl"]) and report["kl"] > 0.0
    assert report["ppo"]["empty_rate"] <= 0.1 and report["ppo"]["response_tokens"]["mean"] >= 3.0
    aligned = json.loads((run_dir / "ppo" / "report.json").read_text())
    assert aligned["algorithm"] == algorithm
    assert aligned["final"] and all(key.startswith(f"{algorithm}/") for key in aligned["final"])
    # Measured around building the models: a second copy of the network (a reference, a reward model) shows
    # as a ratio near 2. The tiny reward LoRA adapts the token embedding too, a few % of the network.
    assert 1.0 <= aligned["network_copies"] < 1.2, aligned["network_copies"]


def test_the_judged_run_was_scored_by_the_judge_alone(runs):
    """Every GRPO step's reward was the judge's grade (logged as its term), asked over HTTP; its batch mean rose; the
    evaluation scored both policies by the judge alone (no reward model) and reports its term of aligned - SFT."""
    from tests.support.events import event_scalars

    run_dir, _ = runs["others"][JUDGED]
    logged = event_scalars(run_dir / TENSORBOARD_DIR)  # what the job's process logged
    term, total = logged["grpo/rewards/judge_mean"], logged["grpo/reward_mean"]
    assert len(term) == len(total) == JUDGED_STEPS
    assert [v for _, v in term] == pytest.approx([v for _, v in total])  # one term of weight 1: the whole reward
    assert all(0.0 <= v <= 1.0 for _, v in term)  # grades over max_score
    first, last = (sum(v for _, v in part) / len(part) for part in (term[:5], term[-5:]))
    assert last > first  # the policy learned to earn the judge's grade
    assert runs["judged"]  # ... from the stand-in, over HTTP
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    assert report["rewards"] == ["judge"] and report["reward_precision"] is None
    assert report["reward_parts_diff"]["judge"]["low"] > 0.0


def test_pipeline_runs_on_the_real_hh_rlhf_file(tmp_path):
    """Real Anthropic raw data, human labels, tiny budgets: every stage runs and writes its report."""
    source = f"{SHARED_DIR}/data/hh-rlhf/harmless-base/test.jsonl.gz"
    config = load_config("tiny", {
        "data": {"source": source, "labels": "human", "max_pairs": 80},
        "warmup": {"steps": 3, "eval_every": 3},
        "sft": {"max_steps": 3, "batch_size": 4, "eval_every": 3, "sample_every": 3, "n_sample_prompts": 1},
        "reward": {"precisions": ["bf16"], "max_steps": 3, "batch_size": 4, "eval_every": 3},
        "ppo": {"steps": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "response_length": 8,
                "checkpoint_every": 1, "sample_every": 1, "n_probe_prompts": 1},
        "evaluate": {"n_prompts": 4, "response_length": 8, "n_show": 2, "n_bootstrap": 100},
    })
    ctx = RunContext(tmp_path)
    reports = {k: r.model_dump() for k, r in run_pipeline(config, ctx).items()}
    assert list(reports) == ["data", "sft", "reward", "ppo", "evaluate"]
    for stage in reports:
        assert (tmp_path / stage / "report.json").exists()
    assert reports["data"]["train"] > 0 and reports["data"]["test"] > 0
    assert reports["evaluate"]["gold_diff"] is None  # human labels: no gold
    assert math.isfinite(reports["evaluate"]["kl"]) and 0.0 <= reports["evaluate"]["win_rate"] <= 1.0
    assert json.loads((tmp_path / "config.json").read_text())["data"]["labels"] == "human"
