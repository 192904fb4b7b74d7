"""The API and stated rewards: a component the config refuses is a 422 naming its field, and a job whose rewards
are valid is queued with them."""


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
