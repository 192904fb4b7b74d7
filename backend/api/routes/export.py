"""Export a job's aligned policy as one Hugging Face model directory or one GGUF file, and download it as a .tar.

    GET  /api/jobs/{id}/export/estimate   roughly how much disk and memory an export needs (edgerlhf.export)
    POST /api/jobs/{id}/export            merge ppo/adapter into sft/merged -> <run dir>/export/model, or with
                                          ?format=gguf&quant=f16|q8_0 -> <run dir>/export/gguf-<quant> (a GGUF file,
                                          an Ollama Modelfile, a README)
    GET  /api/jobs/{id}/export.tar        that directory as an uncompressed tar, streamed (same format and quant)

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
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from backend.api.deps import SettingsDep
from backend.api.errors import SafeJSONResponse
from db import JobStatus, read
from edgerlhf.contract import (EXPORT_FORMATS, EXPORTED_MODEL, GGUF_QUANTS, PPO_ADAPTER, REPORT_FILE, exported_gguf,
                               gguf_file_name, job_run_dir)

router = APIRouter(prefix="/jobs", tags=["export"])

_locks: dict[int, threading.Lock] = {}
_locks_guard = threading.Lock()

FormatQuery = Annotated[Literal[EXPORT_FORMATS], Query(alias="format", description="hf: a Hugging Face model "
                                                                                   "directory; gguf: one GGUF file "
                                                                                   "with an Ollama Modelfile")]
QuantQuery = Annotated[Literal[GGUF_QUANTS], Query(description="with format=gguf: the matrices' type")]


def job_lock(job_id: int) -> threading.Lock:
    """The lock that orders exports, download starts and the delete of job `job_id`."""
    with _locks_guard:
        return _locks.setdefault(job_id, threading.Lock())


class ExportedFile(BaseModel):
    name: str
    bytes: int


class ExportPublic(BaseModel):
    path: str
    """The exported directory on the server: `AutoModelForCausalLM.from_pretrained(path)` loads an `hf` export;
    `ollama create NAME -f path/Modelfile` a `gguf` one."""
    format: str
    quant: str | None
    """The GGUF export's weight type (None for `hf`)."""
    files: list[ExportedFile]
    bytes: int
    """Disk used by the export: the sum of its files."""
    download: str
    """The API path that streams the directory as a .tar."""


class ExportEstimatePublic(BaseModel):
    """`edgerlhf.export.ExportEstimate`: an estimate from the weights' count and sizes, not a measurement."""

    format: str
    quant: str | None
    parameters: int
    disk_bytes: int
    ram_bytes: int


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


def _target(run_dir: Path, fmt: str, quant: str) -> tuple[Path, str]:
    """(the export directory, the file whose presence and age say the export is complete) of a format."""
    if fmt == "gguf":
        return run_dir / exported_gguf(quant), gguf_file_name(quant)
    return run_dir / EXPORTED_MODEL, "config.json"


def _query(fmt: str, quant: str) -> str:
    """The query string that names an export's format and quant (none for the default, `hf`)."""
    return f"?format=gguf&quant={quant}" if fmt == "gguf" else ""


def _fresh(out_dir: Path, marker: str, report: Path) -> bool:
    written = out_dir / marker
    return written.is_file() and not out_dir.is_symlink() and written.stat().st_mtime >= report.stat().st_mtime


def _describe(job_id: int, out_dir: Path, fmt: str, quant: str) -> ExportPublic:
    from edgerlhf.export import exported_files

    files = [ExportedFile(name=p.relative_to(out_dir).as_posix(), bytes=p.stat().st_size)
             for p in exported_files(out_dir)]
    return ExportPublic(path=str(out_dir), format=fmt, quant=quant if fmt == "gguf" else None, files=files,
                        bytes=sum(f.bytes for f in files),
                        download=f"/api/jobs/{job_id}/export.tar{_query(fmt, quant)}")


def _export(request: Request, job_id: int, run_dir: Path, fmt: str, quant: str) -> ExportPublic | SafeJSONResponse:
    from edgerlhf.errors import StageError
    from edgerlhf.export import export_gguf, export_policy

    out_dir, marker = _target(run_dir, fmt, quant)
    with job_lock(job_id):
        _succeeded(request, job_id)  # again, under the lock: a delete or a retry may have come first
        report = _policy_done(run_dir)
        if not _fresh(out_dir, marker, report):
            try:
                if fmt == "gguf":
                    export_gguf(run_dir, quant, out_dir)
                else:
                    export_policy(run_dir, out_dir)
            except StageError as exc:  # a family or tokenizer GGUF cannot write: the message names those it can
                return SafeJSONResponse({"detail": [{"loc": ["query", "format"], "msg": str(exc), "type": "export"}]},
                                        422)
        return _describe(job_id, out_dir, fmt, quant)


@router.get("/{job_id}/export/estimate", response_model=ExportEstimatePublic,
            responses={404: {"description": "No such job"}, 409: {"description": "The job has no SFT model yet"}})
def estimate_export(job_id: int, request: Request, settings: SettingsDep, fmt: FormatQuery = "hf",
                    quant: QuantQuery = "q8_0") -> ExportEstimatePublic:
    """Roughly how much disk and memory exporting the job's policy in this format takes (parameter count x bytes
    per weight, read from the SFT model's file headers: an estimate)."""
    from edgerlhf.errors import StageError
    from edgerlhf.export import estimate_export as estimate

    with request.app.state.sessions() as session:
        if read.get_job(session, job_id) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    try:
        need = estimate(job_run_dir(settings.runs_dir, job_id), fmt, quant)
    except StageError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return ExportEstimatePublic(format=fmt, quant=quant if fmt == "gguf" else None, parameters=need.parameters,
                                disk_bytes=need.disk_bytes, ram_bytes=need.ram_bytes)


@router.post("/{job_id}/export", response_model=ExportPublic,
             responses={404: {"description": "No such job"},
                        409: {"description": "The job has not succeeded, or has no aligned policy"},
                        422: {"description": "A model family or tokenizer the GGUF export cannot write"}})
async def export_job(job_id: int, request: Request, settings: SettingsDep, fmt: FormatQuery = "hf",
                     quant: QuantQuery = "q8_0") -> ExportPublic | SafeJSONResponse:
    """Merge the job's PPO policy into one model directory (with its tokenizer and chat template), or into one GGUF
    file with an Ollama Modelfile (`format=gguf`)."""
    await run_in_threadpool(_succeeded, request, job_id)
    return await run_in_threadpool(_export, request, job_id, job_run_dir(settings.runs_dir, job_id), fmt, quant)


@router.get("/{job_id}/export.tar", response_class=StreamingResponse,
            responses={404: {"description": "No such job"},
                       409: {"description": "The job has not succeeded, or is not exported (since its last policy)"}})
def download_export(job_id: int, request: Request, settings: SettingsDep, fmt: FormatQuery = "hf",
                    quant: QuantQuery = "q8_0") -> StreamingResponse:
    """The exported directory as an uncompressed .tar (POST `/export` with the same format and quant first)."""
    from edgerlhf.export import open_export, tar_stream

    run_dir = job_run_dir(settings.runs_dir, job_id)
    out_dir, marker = _target(run_dir, fmt, quant)
    name = f"edgerlhf-job-{job_id}" + (f"-gguf-{quant}" if fmt == "gguf" else "")
    with job_lock(job_id):
        _succeeded(request, job_id)
        report = run_dir / "ppo" / REPORT_FILE
        if not (out_dir / marker).is_file() or (report.exists() and not _fresh(out_dir, marker, report)):
            first = f"/api/jobs/{job_id}/export{_query(fmt, quant)}"
            raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} has not been exported since its policy last "
                                                          f"changed: POST {first} first")
        files = open_export(out_dir, name)  # what is sent, whatever happens to the directory from now on
    return StreamingResponse(tar_stream(files), media_type="application/x-tar",
                             headers={"Content-Disposition": f'attachment; filename="{name}.tar"'})
