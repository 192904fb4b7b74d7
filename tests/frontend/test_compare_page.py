"""The pages that follow a job's algorithm, with Streamlit's AppTest against a real backend process and SQLite
file; the jobs' rows are written with the worker's own queue functions (`JobWriter`).

- New job: the algorithm select shows the sampling settings of PPO, GRPO and RLOO or DPO's own, and the job
  stores what was chosen.
- Job page: a GRPO job's curves and warnings come from `grpo/*`, a DPO job's from `dpo/*`.
- Compare: a PPO and a GRPO run overlaid by metric name, on steps or on samples seen; the frontier, the runs
  table, warnings per run, and the held-out prompts answered side by side.
"""

from __future__ import annotations

import json

import httpx
from streamlit.testing.v1 import AppTest

from edgerlhf.reports import PPOReport
from tests.support.dashboard import APP, TIMEOUT, open_job_page, plotly_trace
from tests.support.runs import JobWriter, ev_report

PROMPTS = ["\n\nHuman: Where do owls sleep?\n\nAssistant:", "\n\nHuman: Is tea good?\n\nAssistant:"]


def create(backend, algorithm: str, **overrides) -> dict:
    response = httpx.post(f"{backend.url}/api/jobs", timeout=30, json={
        "preset": "tiny", "name": f"{algorithm}-run", "overrides": {"algorithm": algorithm, **overrides}})
    assert response.status_code == 201, response.text
    return response.json()


def aligned_report(algorithm: str, steps: int, final_reward: float) -> dict:
    return PPOReport(algorithm=algorithm, steps=steps, resumed_from_step=0, reward_precision="bf16",
                     reward_model="shared adapter", compute_dtype="float32", device="cpu", trainable_parameters=100,
                     network_bytes=1000, held_bytes=1000, network_copies=1.0, first={},
                     final={f"{algorithm}/reward_mean": final_reward}, kl_coef_final=0.1, wall_s=3.0,
                     peak_rss_mb=900.0, memory={}).model_dump(mode="json")


def finished_run(backend, algorithm: str, rewards: list[float], kls: list[float], eval_kl: float) -> dict:
    """A job of `algorithm` whose alignment stage logged `rewards` and `kls` at steps 1.. and which evaluated."""
    job = create(backend, algorithm)
    writer = JobWriter(backend.db_url, job["id"])
    writer.claim()
    writer.begin("ppo")
    n = len(rewards)
    writer.metrics("ppo", {f"{algorithm}/reward_mean": rewards, f"{algorithm}/kl": kls,
                           f"{algorithm}/response_length": [12.0] * n, f"{algorithm}/step_s": [2.0] * n}, start=1)
    writer.end("ppo", aligned_report(algorithm, n, rewards[-1]))
    writer.begin("evaluate")
    writer.end("evaluate", ev_report(algorithm, eval_kl, -0.2, rewards[-1], PROMPTS))
    writer.finish()
    writer.close()
    return job


def newest_job(backend) -> dict:
    """The job created last, with its config (a list item has none)."""
    newest = httpx.get(f"{backend.url}/api/jobs", params={"limit": 1}, timeout=30).json()["items"][0]
    return httpx.get(f"{backend.url}/api/jobs/{newest['id']}", timeout=30).json()


def chart(at: AppTest, title: str) -> dict:
    """The plotly figure (as JSON) whose title starts with `title`."""
    for el in at.get("plotly_chart"):
        spec = json.loads(el.proto.spec)
        if spec["layout"].get("title", {}).get("text", "").startswith(title):
            return spec
    raise AssertionError(f"no chart titled {title!r}")


def test_new_job_form_chooses_the_algorithm_and_shows_its_settings(backend, dashboard_env):
    dashboard_env(backend.url)
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.switch_page("app_pages/new_job.py").run()
    assert not at.exception, at.exception
    select = at.selectbox(key="nj:tiny:algorithm")
    assert select.options == ["PPO — clipped policy gradient, value head and GAE, adaptive KL penalty in the reward",
                              "GRPO — each response scored against its group of samples; KL in the loss; no value head",
                              "RLOO — leave-one-out baseline over a prompt's samples; KL in the reward; no value head",
                              "DPO — offline on the preference pairs: no sampling, no reward model needed",
                              "KTO — offline on answers labelled good or bad (thumbs, or the pairs split): no "
                              "sampling, no reward model needed"]
    keys = {w.key for w in at.number_input}
    assert "nj:tiny:ppo.steps" in keys and "nj:tiny:ppo.target_kl" in keys and "nj:tiny:dpo.beta" not in keys

    select.set_value("grpo").run()
    assert not at.exception, at.exception
    assert at.number_input(key="nj:tiny:ppo.steps").label == "GRPO steps"
    assert "nj:tiny:ppo.target_kl" not in {w.key for w in at.number_input}, "the adaptive KL controller is PPO's"
    assert at.number_input(key="nj:tiny:grpo:ppo.samples_per_prompt").value is None  # the config derives it
    [b for b in at.button if "Launch" in (b.label or "")][0].click().run()
    assert not at.exception, at.exception
    grpo = newest_job(backend)
    assert grpo["config"]["algorithm"] == "grpo" and grpo["config"]["ppo"]["samples_per_prompt"] >= 2
    assert any("algorithm **GRPO**" in m.value for m in at.markdown), "the job page says which algorithm"

    at.switch_page("app_pages/new_job.py").run()
    at.selectbox(key="nj:tiny:algorithm").set_value("dpo").run()
    keys = {w.key for w in at.number_input}
    assert "nj:tiny:ppo.steps" not in keys and {"nj:tiny:dpo.beta", "nj:tiny:dpo.max_steps"} <= keys
    assert at.selectbox(key="nj:tiny:dpo.loss_type").value == "sigmoid"
    at.number_input(key="nj:tiny:dpo.beta").set_value(0.25)
    at.number_input(key="nj:tiny:dpo.max_steps").set_value(7)
    [b for b in at.button if "Launch" in (b.label or "")][0].click().run()
    assert not at.exception, at.exception
    dpo = newest_job(backend)
    assert dpo["id"] != grpo["id"] and dpo["config"]["algorithm"] == "dpo"
    assert dpo["config"]["dpo"]["beta"] == 0.25 and dpo["config"]["dpo"]["max_steps"] == 7

    at.switch_page("app_pages/new_job.py").run()
    at.selectbox(key="nj:tiny:algorithm").set_value("kto").run()
    keys = {w.key for w in at.number_input}
    assert "nj:tiny:dpo.beta" not in keys and {"nj:tiny:kto.beta", "nj:tiny:kto.desirable_weight"} <= keys
    at.number_input(key="nj:tiny:kto.desirable_weight").set_value(1.25)
    [b for b in at.button if "Launch" in (b.label or "")][0].click().run()
    assert not at.exception, at.exception
    kto = newest_job(backend)
    assert kto["config"]["algorithm"] == "kto" and kto["config"]["kto"]["desirable_weight"] == 1.25


def test_grpo_and_dpo_job_pages_draw_and_check_their_own_metrics(backend, dashboard_env):
    dashboard_env(backend.url)
    job = create(backend, "grpo", ppo={"target_kl": 2.0})
    writer = JobWriter(backend.db_url, job["id"])
    writer.claim()
    writer.begin("ppo")
    flat_reward, runaway_kl = [0.3] * 9, [0.5, 1, 2, 4, 6, 8, 9, 9, 10]
    writer.metrics("ppo", {"grpo/reward_mean": flat_reward, "grpo/reward_std": [0.1] * 9, "grpo/kl": runaway_kl,
                           "grpo/policy_loss": [0.01] * 9, "grpo/response_length": [15.0] * 9}, start=1)
    at = open_job_page(job["id"])
    assert len(plotly_trace(at, "Reward (GRPO", "reward mean")["y"]) == 9
    assert plotly_trace(at, "KL to the reference", "kl")["y"] == runaway_kl
    assert plotly_trace(at, "Policy loss", "policy_loss")["y"] == [0.01] * 9
    warnings = [w.value for w in at.warning]
    assert any("KL to the reference is 9.33 nats (from 1.17), over 4" in w for w in warnings), warnings
    assert any("algorithm **GRPO**" in m.value for m in at.markdown)
    writer.close()

    # A DPO job: its preference loss, accuracy, margin and implicit rewards, and its KL.
    job = create(backend, "dpo")
    writer = JobWriter(backend.db_url, job["id"])
    writer.claim()
    writer.begin("ppo")  # the alignment stage keeps its name whatever algorithm it runs
    dpo = {"dpo/loss": [0.69, 0.62, 0.55], "dpo/accuracy": [0.5, 0.62, 0.75], "dpo/margin": [0.0, 0.2, 0.4],
           "dpo/chosen_reward": [0.0, 0.05, 0.1], "dpo/rejected_reward": [0.0, -0.15, -0.3], "dpo/kl": [0.0, 0.01, 0.03]}
    writer.metrics("ppo", dpo, start=1)
    at = open_job_page(job["id"])
    for name in ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward"):
        assert plotly_trace(at, "DPO on the preference pairs", name)["y"] == dpo[f"dpo/{name}"]
    assert plotly_trace(at, "KL to the reference", "kl")["y"] == dpo["dpo/kl"]
    # The sidebar's service line warns too (no worker runs in this test): only the job's own warnings count.
    assert not [w.value for w in at.warning if "worker ✗" not in w.value], "a healthy DPO run has no warning"
    writer.close()


def test_compare_page_overlays_a_ppo_and_a_grpo_run(backend, dashboard_env):
    dashboard_env(backend.url)
    ppo = finished_run(backend, "ppo", rewards=[0.0, 0.1, 0.3], kls=[0.1, 0.5, 0.9], eval_kl=1.1)
    grpo = finished_run(backend, "grpo", rewards=[0.2, 0.6], kls=[0.05, 0.2], eval_kl=0.4)
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.switch_page("app_pages/compare.py").run()
    assert not at.exception, at.exception
    assert sorted(at.multiselect(key="compare_jobs").value) == [ppo["id"], grpo["id"]]
    labels = {ppo["id"]: f"#{ppo['id']} ppo-run", grpo["id"]: f"#{grpo['id']} grpo-run"}

    reward = chart(at, "reward_mean")
    assert {t["name"]: (t["x"], t["y"]) for t in reward["data"]} == {
        f"{labels[ppo['id']]} (ppo)": ([1, 2, 3], [0.0, 0.1, 0.3]), f"{labels[grpo['id']]} (grpo)": ([1, 2], [0.2, 0.6])}
    at.radio(key="compare_x").set_value("samples").run()
    assert not at.exception, at.exception
    per_step = {j["id"]: j["config"]["ppo"]["batch_size"] for j in (ppo, grpo)}
    reward = chart(at, "reward_mean")
    assert {t["name"]: t["x"] for t in reward["data"]} == {
        f"{labels[ppo['id']]} (ppo)": [s * per_step[ppo["id"]] for s in (1, 2, 3)],
        f"{labels[grpo['id']]} (grpo)": [s * per_step[grpo["id"]] for s in (1, 2)]}
    assert reward["layout"]["xaxis"]["title"]["text"] == "samples seen"

    frontier = {t["name"]: t for t in chart(at, "Reward vs KL")["data"]}
    assert frontier[f"{labels[grpo['id']]} (grpo) training"]["x"] == [0.05, 0.2]
    assert frontier[f"{labels[ppo['id']]} (ppo) held-out: SFT → PPO"]["x"] == [0.0, 1.1]

    runs = next(t.value for t in at.table if "algorithm" in t.value.columns)
    assert runs.set_index("job")["algorithm"].to_dict() == {labels[ppo["id"]]: "ppo", labels[grpo["id"]]: "grpo"}
    assert runs.set_index("job")["KL (held-out)"].to_dict() == {labels[ppo["id"]]: 1.1, labels[grpo["id"]]: 0.4}
    answers = [t.value for t in at.text]
    assert "ppo answer 0" in answers and "grpo answer 0" in answers and "ppo answer 1" in answers
    quiet = next(c.value for c in at.caption if c.value.startswith("No warning for"))
    assert all(label in quiet for label in labels.values()), quiet
