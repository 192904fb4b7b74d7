"""Export a job's aligned policy as one Hugging Face model directory, and download it as a .tar.

    POST /api/jobs/{id}/export        merge ppo/adapter into sft/merged -> <run dir>/export/model (edgerlhf.export)
    GET  /api/jobs/{id}/export.tar    that directory as an uncompressed tar, streamed

Only a succeeded job is exported or downloaded: a job that is running again (a retry) may be rewriting its policy,
and a failed or cancelled one's files are an earlier attempt's. An export is kept and reused until the policy
changes (a newer `ppo/report.json`, e.g. after a retry); a download of an export older than that policy is refused.
One lock per job (`job_lock`) orders an export, the start of a download (it opens every file, see
`edgerlhf.export.open_export`) and a delete of the job, so none of them sees another half done. The job is looked
up in a short database session that is closed before anything slow begins: a download holds no connection.
Merging a model of a few GB takes a minute on the CPU; it runs in a worker thread, one export per job at a time.
"""

from __future__ import annotations

import threading
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from backend.api.deps import SettingsDep
from db import JobStatus, read
from edgerlhf.contract import EXPORTED_MODEL, PPO_ADAPTER, REPORT_FILE, job_run_dir

router = APIRouter(prefix="/jobs", tags=["export"])

_locks: dict[int, threading.Lock] = {}
_locks_guard = threading.Lock()


def job_lock(job_id: int) -> threading.Lock:
    """The lock that orders exports, download starts and the delete of job `job_id`."""
    with _locks_guard:
        return _locks.setdefault(job_id, threading.Lock())


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


def _succeeded(request: Request, job_id: int) -> None:
    """404 for no such job, 409 unless it succeeded; in a session of its own, closed before the caller goes on."""
    with request.app.state.sessions() as session:
        job = read.get_job(session, job_id)
        if job is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
        job_status = job.status
    if job_status != JobStatus.succeeded:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} is {job_status.value}: only a succeeded job's "
                                                      "policy is exported")


def _policy_done(run_dir: Path) -> Path:
    """The PPO stage's report, written last, once `ppo/adapter` is final."""
    report = run_dir / "ppo" / REPORT_FILE
    if not (report.exists() and (run_dir / PPO_ADAPTER).is_dir()):
        raise HTTPException(status.HTTP_409_CONFLICT, "this job has no aligned policy to export yet: its ppo stage "
                                                      "has not completed")
    return report


def _fresh(out_dir: Path, report: Path) -> bool:
    config = out_dir / "config.json"
    return config.is_file() and not out_dir.is_symlink() and config.stat().st_mtime >= report.stat().st_mtime


def _describe(job_id: int, out_dir: Path) -> ExportPublic:
    from edgerlhf.export import exported_files

    files = [ExportedFile(name=p.relative_to(out_dir).as_posix(), bytes=p.stat().st_size)
             for p in exported_files(out_dir)]
    return ExportPublic(path=str(out_dir), files=files, bytes=sum(f.bytes for f in files),
                        download=f"/api/jobs/{job_id}/export.tar")


def _export(request: Request, job_id: int, run_dir: Path) -> ExportPublic:
    from edgerlhf.export import export_policy

    out_dir = run_dir / EXPORTED_MODEL
    with job_lock(job_id):
        _succeeded(request, job_id)  # again, under the lock: a delete or a retry may have come first
        report = _policy_done(run_dir)
        if not _fresh(out_dir, report):
            export_policy(run_dir, out_dir)
        return _describe(job_id, out_dir)


@router.post("/{job_id}/export", response_model=ExportPublic,
             responses={404: {"description": "No such job"},
                        409: {"description": "The job has not succeeded, or has no aligned policy"}})
async def export_job(job_id: int, request: Request, settings: SettingsDep) -> ExportPublic:
    """Merge the job's PPO policy into one model directory (with its tokenizer and chat template)."""
    await run_in_threadpool(_succeeded, request, job_id)
    return await run_in_threadpool(_export, request, job_id, job_run_dir(settings.runs_dir, job_id))


@router.get("/{job_id}/export.tar", response_class=StreamingResponse,
            responses={404: {"description": "No such job"},
                       409: {"description": "The job has not succeeded, or is not exported (since its last policy)"}})
def download_export(job_id: int, request: Request, settings: SettingsDep) -> StreamingResponse:
    """The exported directory as an uncompressed .tar (POST `/export` first)."""
    from edgerlhf.export import open_export, tar_stream

    run_dir = job_run_dir(settings.runs_dir, job_id)
    out_dir = run_dir / EXPORTED_MODEL
    name = f"edgerlhf-job-{job_id}"
    with job_lock(job_id):
        _succeeded(request, job_id)
        report = run_dir / "ppo" / REPORT_FILE
        if not (out_dir / "config.json").is_file() or (report.exists() and not _fresh(out_dir, report)):
            raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} has not been exported since its policy last "
                                                          f"changed: POST /api/jobs/{job_id}/export first")
        files = open_export(out_dir, name)  # what is sent, whatever happens to the directory from now on
    return StreamingResponse(tar_stream(files), media_type="application/x-tar",
                             headers={"Content-Disposition": f'attachment; filename="{name}.tar"'})
