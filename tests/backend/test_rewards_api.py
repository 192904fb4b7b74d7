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
