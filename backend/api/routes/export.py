"""Export a job's aligned policy as one Hugging Face model directory, and download it as a .tar.

    POST /api/jobs/{id}/export        merge ppo/adapter into sft/merged -> <run dir>/export/model (edgerlhf.export)
    GET  /api/jobs/{id}/export.tar    that directory as an uncompressed tar, streamed

An export is kept and reused until the policy changes (a newer `ppo/report.json`, e.g. after a retry).
Merging a model of a few GB takes a minute on the CPU; it runs in a worker thread, one export per job at a time.
"""

from __future__ import annotations

import threading
from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from backend.api.deps import JobDep, SettingsDep
from edgerlhf.contract import EXPORTED_MODEL, PPO_ADAPTER, REPORT_FILE, job_run_dir

router = APIRouter(prefix="/jobs", tags=["export"])

_locks: dict[int, threading.Lock] = {}
_locks_guard = threading.Lock()


class ExportedFile(BaseModel):
    name: str
    bytes: int


class ExportPublic(BaseModel):
    path: str
    """The exported directory on the server: `AutoModelForCausalLM.from_pretrained(path)` loads it."""
    files: list[ExportedFile]
    bytes: int
    download: str
    """The API path that streams the directory as a .tar."""


def _policy_done(run_dir: Path) -> Path:
    """The PPO stage's report, written last, once `ppo/adapter` is final."""
    report = run_dir / "ppo" / REPORT_FILE
    if not (report.exists() and (run_dir / PPO_ADAPTER).is_dir()):
        raise HTTPException(status.HTTP_409_CONFLICT, "this job has no aligned policy to export yet: its ppo stage "
                                                      "has not completed")
    return report


def _describe(job_id: int, out_dir: Path) -> ExportPublic:
    from edgerlhf.export import exported_files

    files = [ExportedFile(name=p.relative_to(out_dir).as_posix(), bytes=p.stat().st_size)
             for p in exported_files(out_dir)]
    return ExportPublic(path=str(out_dir), files=files, bytes=sum(f.bytes for f in files),
                        download=f"/api/jobs/{job_id}/export.tar")


def _export(job_id: int, run_dir: Path) -> ExportPublic:
    from edgerlhf.export import export_policy

    report = _policy_done(run_dir)
    out_dir = run_dir / EXPORTED_MODEL
    with _locks_guard:
        lock = _locks.setdefault(job_id, threading.Lock())
    with lock:
        fresh = (out_dir / "config.json").exists() and (out_dir / "config.json").stat().st_mtime >= report.stat().st_mtime
        if not fresh:
            export_policy(run_dir, out_dir)
    return _describe(job_id, out_dir)


@router.post("/{job_id}/export", response_model=ExportPublic,
             responses={404: {"description": "No such job"}, 409: {"description": "No aligned policy yet"}})
async def export_job(job: JobDep, settings: SettingsDep) -> ExportPublic:
    """Merge the job's PPO policy into one model directory (with its tokenizer and chat template)."""
    return await run_in_threadpool(_export, job.id, job_run_dir(settings.runs_dir, job.id))


@router.get("/{job_id}/export.tar", response_class=StreamingResponse,
            responses={404: {"description": "No such job"}, 409: {"description": "Not exported yet"}})
def download_export(job: JobDep, settings: SettingsDep) -> StreamingResponse:
    """The exported directory as an uncompressed .tar (POST `/export` first)."""
    from edgerlhf.export import tar_stream

    out_dir = job_run_dir(settings.runs_dir, job.id) / EXPORTED_MODEL
    if not (out_dir / "config.json").exists():
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} has not been exported: POST "
                                                      f"/api/jobs/{job.id}/export first")
    name = f"edgerlhf-job-{job.id}"
    return StreamingResponse(tar_stream(out_dir, name), media_type="application/x-tar",
                             headers={"Content-Disposition": f'attachment; filename="{name}.tar"'})
