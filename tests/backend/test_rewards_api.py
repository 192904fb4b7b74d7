"""The API and stated rewards: a component the config refuses is a 422 naming its field, and a job whose rewards
are valid is queued with them; the Try-it route scores answers with them."""

import pytest


def test_an_invalid_reward_component_is_a_422_naming_its_field(client):
    body = {"preset": "tiny", "name": "bad reward", "overrides": {
        "stages": ["data"], "ppo": {"rewards": [{"kind": "gold", "scorer": "you"},
                                                {"kind": "regex", "pattern": "[unclosed"}]}}}
    r = client.post("/api/jobs", json=body)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "overrides", "ppo", "rewards", 1, "pattern"], error
    assert "not a regular expression" in error["msg"]


def test_a_job_with_stated_rewards_is_queued_with_them(client):
    rewards = [{"kind": "reference_answer", "column": "answer", "extract": "last_number", "compare": "number"},
               {"kind": "regex", "pattern": "^The", "weight": 0.2}]
    r = client.post("/api/jobs", json={"preset": "tiny", "name": "stated", "overrides": {
        "stages": ["data"], "ppo": {"rewards": rewards}}})
    assert r.status_code in (200, 201), r.text
    stored = client.get(f"/api/jobs/{r.json()['id']}").json()["config"]["ppo"]["rewards"]
    assert [(c["kind"], c["weight"]) for c in stored] == [("reference_answer", 1.0), ("regex", 0.2)]


def test_a_judge_at_a_url_the_operator_does_not_list_is_refused(tmp_path, db_url):
    from fastapi.testclient import TestClient

    from backend.main import create_app
    from edgerlhf.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, api_token=None,
                        judge_urls=["http://127.0.0.1:11434/v1"])

    def post(url: str):
        rewards = [{"kind": "judge", "url": url, "model": "grader"}]
        return api.post("/api/jobs", json={"preset": "tiny", "name": "judged", "overrides": {
            "stages": ["data"], "ppo": {"rewards": rewards}}})

    with TestClient(create_app(settings), base_url="http://localhost") as api:
        refused = post("http://169.254.169.254/latest")  # a metadata service: no request of the job's choosing
        assert refused.status_code == 422, refused.text
        (error,) = refused.json()["detail"]
        assert error["loc"] == ["body", "overrides", "ppo", "rewards", 0, "url"] and "EDGERLHF_JUDGE_URLS" in error["msg"]
        assert post("http://127.0.0.1:11434/v1").status_code in (200, 201)  # listed by the operator
        assert post(settings.api_url + "/v1").status_code in (200, 201)  # the service's own /v1


QUESTION = "\n\nHuman: What is 2 + 2?\n\nAssistant:"


def test_try_it_scores_answers_with_the_jobs_components_and_leaves_the_reward_model_out(client):
    """`POST /api/rewards/score`, the New-job form's Try-it box: each component's score per answer, the weighted
    total, lengths in the preset's tokenizer's tokens, and the reward model (trained by a job) listed as not
    scored."""
    from edgerlhf.config import TINY_TOKENIZER_DIR
    from edgerlhf.models import load_tokenizer

    rewards = [{"kind": "reference_answer", "column": "answer", "extract": "last_number", "compare": "number",
                "name": "correct"},
               {"kind": "regex", "pattern": "^The answer is", "weight": 0.5, "name": "format"},
               {"kind": "length", "target": 5, "tolerance": 10, "unit": "tokens", "weight": 0.1},
               {"kind": "reward_model", "weight": 2.0}]
    answers = ["The answer is 4.", "It is 5, I think", "The answer is four"]
    r = client.post("/api/rewards/score", json={"rewards": rewards, "samples": [
        {"prompt": QUESTION, "answer": a, "reference": {"answer": "4"}} for a in answers]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["names"] == ["correct", "format", "length2", "reward_model3"]
    assert body["not_scored"] == ["reward_model3"] and body["weights"]["format"] == 0.5
    tokens = [len(load_tokenizer(TINY_TOKENIZER_DIR)(a, add_special_tokens=False)["input_ids"]) for a in answers]
    for sample, correct, format_, n in zip(body["samples"], (1.0, 0.0, 0.0), (1.0, 0.0, 1.0), tokens):
        length = 1.0 - abs(n - 5) / 10
        assert sample["parts"] == pytest.approx({"correct": correct, "format": format_, "length2": length})
        assert sample["total"] == pytest.approx(correct + 0.5 * format_ + 0.1 * length)


def test_try_it_refuses_what_a_job_would_naming_the_component(client):
    bad = client.post("/api/rewards/score", json={"rewards": [{"kind": "regex", "pattern": "^ok"},
                                                              {"kind": "regex", "pattern": "[unclosed"}],
                                                  "samples": [{"prompt": QUESTION, "answer": "ok"}]})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "rewards", 1, "pattern"], bad.text
    judge = client.post("/api/rewards/score", json={"rewards": [{"kind": "judge", "url": "http://10.0.0.1/v1",
                                                                 "model": "m"}],
                                                    "samples": [{"prompt": QUESTION, "answer": "ok"}]})
    assert judge.status_code == 422 and judge.json()["detail"][0]["loc"] == ["body", "rewards", 0, "url"]
    missing = client.post("/api/rewards/score", json={"rewards": [{"kind": "reference_answer", "column": "answer"}],
                                                      "samples": [{"prompt": QUESTION, "answer": "4"}]})
    assert missing.status_code == 422 and "'answer' column" in missing.json()["detail"][0]["msg"], missing.text
