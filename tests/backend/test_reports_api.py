"""`GET /api/jobs/{id}/report`: the stages' typed reports (edgerlhf.reports), described field by field in
/openapi.json, served from what a real stage wrote."""

import json

from edgerlhf.config import HH_PREFS_SAMPLE, load_config
from edgerlhf.context import RunContext
from edgerlhf.contract import STAGES, job_run_dir
from edgerlhf.pipeline import run_stage
from edgerlhf.reports import STAGE_REPORTS


def test_openapi_names_every_field_of_every_stage_report(client):
    spec = client.get("/openapi.json").json()
    schema = spec["paths"]["/api/jobs/{job_id}/report"]["get"]["responses"]["200"]["content"]["application/json"]
    components = spec["components"]["schemas"]
    job_reports = components[schema["schema"]["$ref"].split("/")[-1]]
    assert set(job_reports["properties"]) == set(STAGES) == set(STAGE_REPORTS)
    for stage, model in STAGE_REPORTS.items():
        assert set(components[model.__name__]["properties"]) == set(model.model_fields), stage
    assert "precisions" in components["RewardReport"]["properties"]
    assert "accuracy" in components["PrecisionResult"]["properties"]


def test_report_serves_what_the_stage_wrote_and_skips_a_stale_one(client, settings):
    job = client.post("/api/jobs", json={"preset": "tiny", "overrides": {
        "stages": ["data", "sft"], "data": {"source": HH_PREFS_SAMPLE, "max_pairs": 40}}}).json()
    run_dir = job_run_dir(settings.runs_dir, job["id"])
    written = run_stage("data", load_config("tiny", {"data": {"source": HH_PREFS_SAMPLE, "max_pairs": 40}}),
                        RunContext(run_dir))

    body = client.get(f"/api/jobs/{job['id']}/report").json()
    assert body["data"] == json.loads(written.model_dump_json())
    assert body["data"]["train"] == written.train > 0 and body["sft"] is None

    # A report written by an older stage (a renamed field) is left out, not a server error.
    stale = json.loads((run_dir / "data" / "report.json").read_text())
    stale["n_train"] = stale.pop("train")
    (run_dir / "data" / "report.json").write_text(json.dumps(stale))
    response = client.get(f"/api/jobs/{job['id']}/report")
    assert response.status_code == 200 and response.json()["data"] is None
