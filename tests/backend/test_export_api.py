"""The export API in-process (TestClient on a SQLite file) for the GGUF format: the estimate, the export, the streamed
.tar, and the refusals (a job that has not finished, an unknown format, a download before its export)."""

from __future__ import annotations

import io
import tarfile

import pytest

from db import queue
from edgerlhf.settings import Settings
from tests.support.runs import save_policy_adapter


@pytest.fixture
def settings(tmp_path, sqlite_url) -> Settings:
    """Files, not SQL, are what these tests are about: SQLite only."""
    return Settings(data_dir=tmp_path / "data", database_url=sqlite_url, api_token=None)


def _finished_policy(run_dir, architecture: str = "gpt2") -> None:
    """A tiny random model as `sft/merged` and a LoRA adapter with B != 0 as `ppo/adapter`, with the ppo report."""

    from edgerlhf.config import TINY_TOKENIZER_DIR, ModelConfig, load_config
    from edgerlhf.models import load_tokenizer, random_model

    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(load_config("tiny", {"ppo": {"temperature": 0.5}}).to_json())
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    model = random_model(ModelConfig(name_or_path="tiny", random_init=True, architecture=architecture, n_layer=1,
                                     n_head=2, n_embd=32, n_positions=1024), tokenizer)
    model.save_pretrained(run_dir / "sft" / "merged")
    tokenizer.save_pretrained(run_dir / "sft" / "merged")
    save_policy_adapter(model, run_dir, ["c_attn"] if architecture == "gpt2" else ["q_proj", "v_proj"])
    (run_dir / "ppo" / "report.json").write_text("{}")


def _running_job(app):
    from edgerlhf.config import load_config

    with app.state.sessions() as session:
        job = queue.create_job(session, name="gguf", preset="tiny", config=load_config("tiny").to_dict())
        assert queue.claim_next(session, "test-worker").id == job.id
    return job


def test_a_finished_job_exports_as_gguf_with_its_disk_use_and_downloads_as_a_tar(app, client, settings):
    job = _running_job(app)
    _finished_policy(settings.runs_dir / f"job-{job.id}")
    gguf = {"format": "gguf", "quant": "q8_0"}

    # Running: the policy may still change.
    assert client.post(f"/api/jobs/{job.id}/export", params=gguf).status_code == 409
    with app.state.sessions() as session:
        assert queue.finish(session, job.id, "test-worker")

    need = client.get(f"/api/jobs/{job.id}/export/estimate", params=gguf)
    assert need.status_code == 200, need.text
    assert need.json()["parameters"] > 1_000_000 and need.json()["disk_bytes"] < need.json()["ram_bytes"]
    assert client.get(f"/api/jobs/{job.id}/export.tar", params=gguf).status_code == 409  # not exported yet
    for bad in ({"format": "onnx"}, {"format": "gguf", "quant": "q4_k"}):
        assert client.post(f"/api/jobs/{job.id}/export", params=bad).status_code == 422

    exported = client.post(f"/api/jobs/{job.id}/export", params=gguf)
    assert exported.status_code == 200, exported.text
    body = exported.json()
    out = settings.runs_dir / f"job-{job.id}" / "export" / "gguf-q8_0"
    assert body["path"] == str(out) and (body["format"], body["quant"]) == ("gguf", "q8_0")
    on_disk = {p.name: p.stat().st_size for p in out.iterdir()}
    assert {f["name"]: f["bytes"] for f in body["files"]} == on_disk
    assert body["bytes"] == sum(on_disk.values()) and set(on_disk) == {"model-q8_0.gguf", "Modelfile", "README.md"}
    assert "PARAMETER temperature 0.5" in (out / "Modelfile").read_text()
    # an estimate, within a factor of two of what was written
    assert need.json()["disk_bytes"] / 2 < on_disk["model-q8_0.gguf"] < 2 * need.json()["disk_bytes"]

    tar = client.get(body["download"])
    assert tar.status_code == 200 and tar.headers["content-type"] == "application/x-tar"
    assert f'filename="edgerlhf-job-{job.id}-gguf-q8_0.tar"' in tar.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    assert {name: len(data) for name, data in members.items()} == \
        {f"edgerlhf-job-{job.id}-gguf-q8_0/{name}": size for name, size in on_disk.items()}
    assert members[f"edgerlhf-job-{job.id}-gguf-q8_0/model-q8_0.gguf"] == (out / "model-q8_0.gguf").read_bytes()
    # The other quant is its own export: not downloadable until exported.
    assert client.get(f"/api/jobs/{job.id}/export.tar", params={"format": "gguf", "quant": "f16"}).status_code == 409
    assert client.get(f"/api/jobs/{job.id + 1}/export/estimate", params=gguf).status_code == 404


def test_a_family_gguf_cannot_write_is_refused_naming_the_supported_ones(app, client, settings):
    job = _running_job(app)
    _finished_policy(settings.runs_dir / f"job-{job.id}", architecture="gemma")
    with app.state.sessions() as session:
        assert queue.finish(session, job.id, "test-worker")
    refused = client.post(f"/api/jobs/{job.id}/export", params={"format": "gguf", "quant": "f16"})
    assert refused.status_code == 422
    assert "no GGUF reader for Gemma (1)" in refused.text and "supports gpt2, llama" in refused.text
    assert not (settings.runs_dir / f"job-{job.id}" / "export" / "gguf-f16").exists()
    assert client.post(f"/api/jobs/{job.id}/export").status_code == 200  # the Hugging Face export still works
