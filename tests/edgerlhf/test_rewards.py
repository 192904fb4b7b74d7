"""Stated rewards (`edgerlhf.rewards`): every kind against hand-computed scores, the checks that name the field, a
step that logs each component, and a pipeline whose GRPO is scored by the prompt data's reference answers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from edgerlhf import rewards
from edgerlhf.config import ConfigError, RewardComponent, load_config
from edgerlhf.rewards import RewardError, RewardSet

PROMPT = "\n\nHuman: What is 6 times 7?\n\nAssistant:"


def scored(components, response: str, rows=None, prompt: str = PROMPT, **kw) -> dict[str, float]:
    total, parts = RewardSet([RewardComponent(**c) for c in components], rows, **kw).score([prompt], [response])
    return {"total": total.item(), **{name: values.item() for name, values in parts.items()}}


def test_every_kind_scores_what_it_says():
    rows = {PROMPT: {"prompt": PROMPT, "answer": "42", "word": "Forty-two"}}
    got = scored([
        {"kind": "reference_answer", "column": "answer", "extract": "last_number", "compare": "number", "name": "exact"},
        {"kind": "regex", "pattern": r"\.$", "name": "full_stop", "weight": 0.5},
        {"kind": "contains", "words": ["six", "seven", "times"], "name": "words"},
        {"kind": "not_contains", "words": ["maybe"], "name": "sure"},
        {"kind": "length", "target": 4, "tolerance": 4, "name": "short"},
        {"kind": "repetition", "n": 1, "name": "varied", "weight": 2.0},
        {"kind": "gold", "scorer": "starts_with_i", "name": "i"},
    ], "Six times seven is 42.", rows)
    assert got["exact"] == 1.0 and got["full_stop"] == 1.0
    assert got["words"] == pytest.approx(3 / 3) and got["sure"] == 0.0
    assert got["short"] == pytest.approx(1 - abs(5 - 4) / 4)  # five words
    assert got["varied"] == 0.0  # no word twice
    assert got["i"] == 0.0
    assert got["total"] == pytest.approx(1 + 0.5 + 1 + 0 + 0.75 + 0 + 0)
    again = scored([{"kind": "repetition", "n": 1}, {"kind": "not_contains", "words": ["maybe", "perhaps"]}],
                   "maybe maybe maybe yes", rows)
    assert again["repetition0"] == pytest.approx(-2 / 4) and again["not_contains1"] == pytest.approx(-1 / 2)


@pytest.mark.parametrize("extract, response, reference, compare, expected", [
    ("whole", " Forty-two. ", "forty-two", "text", True),
    ("last_number", "first 3, then 1,024", "1024", "number", True),
    ("last_number", "no number here", "42", "number", False),
    ("tag:answer", "I think <answer> 7 </answer> is it", "7", "text", True),
    ("after:####", "work... #### 12", "12", "number", True),
    ("regex:= (\\w+)", "x = blue, y = red", "blue", "text", True),
    ("first_line", "Paris\nbecause it is the capital", "paris", "text", True),
    ("whole", "0.5", "\\frac{1}{2}", "math", True),
    ("whole", "0.25", "\\frac{1}{2}", "math", False),
])
def test_reference_answers_are_extracted_and_compared(extract, response, reference, compare, expected):
    rows = {PROMPT: {"prompt": PROMPT, "answer": reference}}
    got = scored([{"kind": "reference_answer", "column": "answer", "extract": extract, "compare": compare}], response,
                 rows)
    assert got["total"] == float(expected)


def test_a_prompt_without_its_reference_fails_the_step_naming_the_column():
    with pytest.raises(RewardError, match=r"ppo.rewards\[0\]: the prompt has no 'answer' column"):
        scored([{"kind": "reference_answer", "column": "answer"}], "42", {PROMPT: {"prompt": PROMPT}})


@pytest.mark.parametrize("component, field", [
    ({"kind": "regex", "pattern": "("}, "ppo.rewards[1].pattern"),
    ({"kind": "reference_answer"}, "ppo.rewards[1].column"),
    ({"kind": "reference_answer", "column": "a", "extract": "tag:"}, "ppo.rewards[1].extract"),
    ({"kind": "length", "target": 3, "unit": "lines"}, "ppo.rewards[1].unit"),
    ({"kind": "gold", "scorer": "nope"}, "ppo.rewards[1].scorer"),
    ({"kind": "judges"}, "ppo.rewards[1].kind"),
    ({"weight": 2.0}, "ppo.rewards[1].kind"),  # no kind at all: refused, not a crash
    ({"kind": "judge", "model": "m"}, "ppo.rewards[1].url"),
    ({"kind": "judge", "url": "http://127.0.0.1:1/v1", "model": "m", "rubric": "{verdict}"}, "ppo.rewards[1].rubric"),
    ({"kind": "regex", "pattern": "x", "name": "regex0"}, "ppo.rewards[1].name"),
])
def test_an_invalid_component_is_refused_naming_its_field(component, field):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", {"ppo": {"rewards": [{"kind": "regex", "pattern": "y"}, component]}})
    assert info.value.field == field, str(info.value)


def test_rewards_exclude_a_reward_function_and_need_no_reward_stage_unless_they_use_the_model():
    with pytest.raises(ConfigError, match="both say how to score"):
        load_config("tiny", {"ppo": {"rewards": [{"kind": "gold", "scorer": "you"}], "reward_function": "you"}})
    stated = {"ppo": {"rewards": [{"kind": "gold", "scorer": "you"}], "reward_precision": "int4"},
              "reward": {"precisions": ["bf16"]}}
    load_config("tiny", stated)  # no reward model read: its precision is not checked
    with pytest.raises(ConfigError, match="reward_precision"):
        load_config("tiny", {**stated, "ppo": {**stated["ppo"], "rewards": [{"kind": "reward_model"}]}})


# --- in a step and in the pipeline ------------------------------------------------------------------


def test_a_step_is_scored_by_the_weighted_sum_and_logs_each_component(tmp_path):
    from edgerlhf import align
    from edgerlhf.align import policy, ppo
    from tests.support.tiny import make_tiny_run, tiny_config

    config = tiny_config(algorithm="grpo", ppo={"batch_size": 8, "mini_batch_size": 4, "samples_per_prompt": 4,
                                                "rewards": [{"kind": "repetition", "n": 1, "name": "varied"},
                                                            {"kind": "length", "target": 3, "tolerance": 6,
                                                             "unit": "tokens", "weight": -0.5}]})
    run_dir = make_tiny_run(tmp_path / "run", config)
    built = policy.build_models(config, run_dir, torch.device("cpu"))
    assert built.reward_model is None  # no component is the reward model: none is loaded
    prompts = [p for p in ("\n\nHuman: Hi\n\nAssistant:", "\n\nHuman: What is a cat?\n\nAssistant:") for _ in range(4)]
    torch.manual_seed(0)
    metrics, rollouts, scores = align.STEPS["grpo"](built, torch.optim.SGD(built.policy_parameters(), lr=0.0),
                                                    ppo.kl_controller(config), prompts, config.ppo)
    words = [[w.lower() for w in rewards.WORD.findall(r)] for r in rollouts.responses]
    varied = torch.tensor([-(len(w) - len(set(w))) / len(w) if w else 0.0 for w in words])
    tokens = torch.tensor([len(built.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in rollouts.responses])
    length = 1 - (tokens - 3).abs() / 6
    torch.testing.assert_close(scores.cpu(), varied - 0.5 * length)
    assert metrics["grpo/rewards/varied_mean"] == pytest.approx(varied.mean().item())
    assert metrics["grpo/rewards/length1_mean"] == pytest.approx(length.mean().item())
    assert metrics["grpo/reward_mean"] == pytest.approx(scores.mean().item())


def test_grpo_on_own_prompts_is_scored_by_their_reference_answers(tmp_path):
    """A CSV of questions with their answers as the prompt data; GRPO scored by the answer's last number against
    the reference plus a format rule; the evaluation scores both policies with the same sum."""
    from edgerlhf.context import RunContext
    from edgerlhf.pipeline import run_pipeline
    from tests.support.tiny import PIPELINE, tiny_config

    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": f"Add {i} and {i}.", "completion": f"The sum is {2 * i}."}) + "\n"
                             for i in range(30)))
    asks = tmp_path / "asks.csv"
    asks.write_text("question,answer\n" + "".join(f"What is {i} plus {i}?,{2 * i}\n" for i in range(30)))
    from tests.support.judge import ANSWER_MARK, stand_in_judge

    components = [{"kind": "reference_answer", "column": "answer", "extract": "last_number", "compare": "number",
                   "name": "correct"}, {"kind": "regex", "pattern": r"^The sum is", "weight": 0.2, "name": "format"}]
    shorter = pairwise(lambda a, b: "A" if len(a) < len(b) else "B" if len(b) < len(a) else "A")
    with stand_in_judge(shorter) as judge:
        config = tiny_config(PIPELINE, stages=["data", "sft", "ppo", "evaluate"], algorithm="grpo",
                             data={"source": str(demos), "labels": "human"},
                             prompt_data={"source": str(asks), "columns": {"question": "prompt"}},
                             ppo={"samples_per_prompt": 2, "rewards": components},
                             evaluate={"judge": {"kind": "judge", "url": judge.url, "model": "grader",
                                                 "rubric": "{prompt}" + ANSWER_MARK + "{first}|||{second}"}})
        ctx = RunContext(tmp_path / "run")
        reports = run_pipeline(config, ctx)
    assert len(judge.requests) == 2 * config.evaluate.n_prompts * config.evaluate.samples_per_prompt  # both orders
    assert 0.0 <= reports["evaluate"].judge_win_rate.mean <= 1.0
    assert reports["ppo"].rewards == ["correct", "format"] and reports["ppo"].reward_model == "none"
    evaluation = reports["evaluate"]
    assert evaluation.rewards == ["correct", "format"] and evaluation.reward_diff is not None
    parts = evaluation.reward_parts_diff
    assert set(parts) == {"correct", "format"}
    # The total's difference is the weighted sum of the components' (means of per-prompt differences are linear).
    assert evaluation.reward_diff.mean == pytest.approx(parts["correct"].mean + 0.2 * parts["format"].mean, abs=1e-6)
    samples = [s for s in ctx.samples if s.stage == "ppo" and s.kind == "sample"]
    assert samples and all(set(s.parts) == {"correct", "format"} for s in samples)
    assert all(s.reward == pytest.approx(s.parts["correct"] + 0.2 * s.parts["format"]) for s in samples)
    logged = ctx.metric_series("grpo/rewards/correct_mean")
    assert len(logged) == config.ppo.steps and all(0.0 <= v <= 1.0 for _, v in logged)
    assert all(math.isfinite(v) for _, v in ctx.metric_series("grpo/rewards/format_mean"))


# --- the judge -------------------------------------------------------------------------------------


def judge_component(url: str, **fields) -> RewardComponent:
    from tests.support.judge import ANSWER_MARK

    return RewardComponent(kind="judge", url=url, model="grader", rubric="Grade it. {prompt} " + ANSWER_MARK + "{answer}",
                           **fields)


def ends_with_question(answer: str) -> str:
    """The stand-in's rule: 10 for an answer that asks something back, 2 otherwise."""
    return "10" if answer.strip().endswith("?") else "Score: 2"


def test_the_judge_grades_by_its_reply_once_per_answer():
    from tests.support.judge import stand_in_judge

    answers = ["Why do you ask?", "Because.", "Why do you ask?", "Is it blue?"]
    with stand_in_judge(ends_with_question) as judge:
        stated = RewardSet([judge_component(judge.url)])
        total, parts = stated.score([PROMPT] * 4, answers)
        torch.testing.assert_close(total, torch.tensor([1.0, 0.2, 1.0, 1.0]))
        assert sorted(judge.requests) == sorted(["Why do you ask?", "Because.", "Is it blue?"])  # one per answer
        stated.score([PROMPT], ["Because."])
        assert len(judge.requests) == 3  # cached: asked before
    assert "Human" not in judge.requests[0]  # the answer alone went where the rubric puts it


def test_the_judge_retries_then_fails_the_step_naming_the_endpoint():
    from tests.support.judge import stand_in_judge

    with stand_in_judge(ends_with_question, fail_first=2) as judge:
        total, _ = RewardSet([judge_component(judge.url, retries=2)]).score([PROMPT], ["Really?"])
        assert total.item() == 1.0 and len(judge.requests) == 3
    with stand_in_judge(ends_with_question, fail_first=5) as judge:
        with pytest.raises(RewardError, match=rf"ppo.rewards\[0\]: the judge at {judge.url} .* failed 2 times"):
            RewardSet([judge_component(judge.url, retries=1)]).score([PROMPT], ["Really?"])


def test_the_judge_keeps_at_most_concurrency_requests_in_flight_and_scores_an_unreadable_reply_0():
    from tests.support.judge import stand_in_judge

    with stand_in_judge(ends_with_question, delay_s=0.2) as judge:
        RewardSet([judge_component(judge.url, concurrency=3)]).score([PROMPT] * 9, [f"Q{i}?" for i in range(9)])
    assert judge.max_in_flight == 3
    with stand_in_judge(lambda answer: "excellent") as judge:
        stated = RewardSet([judge_component(judge.url)])
        assert stated.score([PROMPT], ["Hm?"])[0].item() == 0.0 and stated._scorers[0].unparsed == 1


def test_the_share_of_unreadable_judge_replies_is_reported_per_batch():
    """A reply without a number scores 0; the batch's share of such answers is kept per judge, for the step's
    `rewards/<name>_unparsed` metric, so a judge that stops following its rubric is seen."""
    from tests.support.judge import ANSWER_MARK, stand_in_judge

    with stand_in_judge(lambda answer: "8" if answer.endswith("?") else "I cannot grade this.") as judge:
        component = RewardComponent(kind="judge", url=judge.url, model="grader", name="asks",
                                    rubric="{prompt}" + ANSWER_MARK + "{answer}")
        rewards = RewardSet([component])
        scores, parts = rewards.score(["\n\nHuman: Hi\n\nAssistant:"] * 4, ["Why?", "No.", "Yes.", "How?"])
        assert parts["asks"].tolist() == pytest.approx([0.8, 0.0, 0.0, 0.8])
        assert rewards.last_unparsed == {"asks": 0.5}
        rewards.score(["\n\nHuman: Hi\n\nAssistant:"] * 2, ["Why?", "What?"])  # one cached, one new: both read
        assert rewards.last_unparsed == {"asks": 0.0}


def test_a_job_may_name_only_the_judges_its_operator_lists():
    from pathlib import Path

    from edgerlhf.config import service_problems

    config = load_config("tiny", {"ppo": {"rewards": [{"kind": "judge", "url": "http://169.254.169.254/v1",
                                                       "model": "m"}]}})
    problems = service_problems(config, [Path("/")], judge_urls=("http://127.0.0.1:11434/v1",))
    assert [field for field, _, _ in problems] == ["ppo.rewards[0].url"]
    assert "EDGERLHF_JUDGE_URLS" in problems[0][2]
    assert not service_problems(config, [Path("/")], judge_urls=("http://169.254.169.254/v1/",))
    evaluated = load_config("tiny", {"evaluate": {"judge": {"kind": "judge", "url": "http://10.0.0.1/v1", "model": "m"}}})
    assert [f for f, _, _ in service_problems(evaluated, [Path("/")])] == ["evaluate.judge.url"]


def test_a_grpo_step_logs_the_judges_grades(tmp_path):
    from edgerlhf import align
    from edgerlhf.align import policy, ppo
    from tests.support.judge import ANSWER_MARK, stand_in_judge
    from tests.support.tiny import make_tiny_run, tiny_config

    with stand_in_judge(ends_with_question) as judge:
        config = tiny_config(algorithm="grpo", ppo={"batch_size": 8, "mini_batch_size": 4, "samples_per_prompt": 4,
                                                    "rewards": [{"kind": "judge", "url": judge.url, "model": "grader",
                                                                 "rubric": "{prompt}" + ANSWER_MARK + "{answer}",
                                                                 "name": "asks_back"}]})
        run_dir = make_tiny_run(tmp_path / "run", config)
        built = policy.build_models(config, run_dir, torch.device("cpu"))
        prompts = [p for p in ("\n\nHuman: Hi\n\nAssistant:", "\n\nHuman: Cats?\n\nAssistant:") for _ in range(4)]
        torch.manual_seed(0)
        metrics, rollouts, scores = align.STEPS["grpo"](built, torch.optim.SGD(built.policy_parameters(), lr=0.0),
                                                        ppo.kl_controller(config), prompts, config.ppo)
    expected = torch.tensor([1.0 if r.strip().endswith("?") else 0.2 for r in rollouts.responses])
    torch.testing.assert_close(scores.cpu(), expected)
    assert metrics["grpo/rewards/asks_back_mean"] == pytest.approx(expected.mean().item())
    assert metrics["grpo/rewards/asks_back_unparsed"] == 0.0  # every reply had its number
    assert len(judge.requests) == len(set(zip(rollouts.prompts, rollouts.responses)))


# --- the evaluation's pairwise judge --------------------------------------------------------------------


def pairwise(rule):
    """A stand-in grader of `first|||second` (the tests' pairwise rubric puts the two answers there)."""
    return lambda text: rule(*text.split("|||"))


def test_the_pairwise_judge_asks_both_orders_and_cancels_a_position_bias():
    from edgerlhf.evaluate import judge_win_rate
    from tests.support.judge import ANSWER_MARK, stand_in_judge

    component = lambda url: RewardComponent(kind="judge", url=url, model="grader",  # noqa: E731
                                            rubric="{prompt}" + ANSWER_MARK + "{first}|||{second}")
    sft, aligned = ["Sure.", "Fine.", "No."] * 2, ["Why?", "Fine.", "Really?"] * 2
    prompts = [PROMPT] * 6
    asks_back = pairwise(lambda a, b: "A" if a.endswith("?") and not b.endswith("?") else
                         "B" if b.endswith("?") and not a.endswith("?") else "A")
    with stand_in_judge(asks_back) as judge:
        got = judge_win_rate(rewards.Judge(component(judge.url), "evaluate.judge"), prompts, sft, aligned, k=2,
                             n_resamples=200)
    # Prompt-major, 2 answers per prompt: (Why? vs Sure.) wins, (Fine. vs Fine.) is position alone, (Really? vs No.)
    # wins, ... -> per-prompt means 0.75, 0.75, 1.0.
    assert got["win_rate"]["mean"] == pytest.approx((0.75 + 0.75 + 1.0) / 3)
    assert got["consistent"] == pytest.approx(4 / 6)
    with stand_in_judge(pairwise(lambda a, b: "A")) as judge:  # always the first: no preference at all
        got = judge_win_rate(rewards.Judge(component(judge.url), "evaluate.judge"), prompts, sft, aligned, k=2,
                             n_resamples=200)
    assert got["win_rate"]["mean"] == 0.5 and got["consistent"] == 0.0
