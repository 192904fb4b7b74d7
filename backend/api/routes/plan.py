"""Memory plans: will a job fit its GPU, stage by stage, before it is queued (`edgerlhf.plan`).

`POST /api/plan` answers the dashboard's New-job form as its fields change; `refusal` is what `POST
/api/jobs` asks before queueing. The GPU a plan is checked against (`gpu_to_check`): the job's
`min_gpu_memory_mb` when it sets one (only such a GPU will run it), else the largest GPU memory among the
registered workers (the best GPU the job could get), else none, and then nothing is refused. A job on
the CPU (`device: cpu`) is never refused: its figures are fp32 tensors in the machine's memory.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException

from backend.api.deps import SessionDep, SettingsDep
from backend.api.schemas import PlanPublic, PlanRequest
from backend.api.validation import JobInvalid, validate_job
from db import read
from edgerlhf.config import PipelineConfig
from edgerlhf.plan import GiB, MemoryPlan, MiB, architecture, judges_asked, plan
from edgerlhf.settings import Settings

logger = logging.getLogger("edgerlhf.backend")

router = APIRouter(prefix="/plan", tags=["plan"])


def gpu_to_check(session, min_gpu_memory_mb: int | None) -> tuple[int | None, str]:
    """(GPU memory in MB, where it comes from) for a job: its minimum, else the largest registered worker's."""
    if min_gpu_memory_mb is not None:
        return min_gpu_memory_mb, "the job's min_gpu_memory_mb"
    known = [w for w in read.workers(session) if w.gpu_memory_mb is not None]
    if not known:
        return None, "no registered worker has a known GPU: figures only, nothing checked"
    best = max(known, key=lambda w: w.gpu_memory_mb)
    return best.gpu_memory_mb, f"the largest GPU of the registered workers ({best.id}, {best.gpu_name or 'GPU'})"


def device_kind(config: PipelineConfig) -> str:
    """`cpu` for a config that runs on the CPU, else `cuda` (`auto` runs on a worker's GPU when it has one)."""
    return "cpu" if config.device == "cpu" else "cuda"


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def served_judges(session, settings: Settings, config: PipelineConfig) -> dict[str, PipelineConfig]:
    """The judges of `config` that this service's own `/v1` serves on the GPU the job will share with it (a
    finished job's model, `job-7/ppo`; the backend loads it on `settings.device`): {model name: that job's
    config}. None of them when the backend serves on the CPU (`device` cpu, or auto without a GPU); a name that is
    no job's is the judge's own error."""
    from backend.chat_models import ModelNotFound, parse_model_id

    own = settings.api_url.rstrip("/") + "/v1"
    if settings.device == "cpu" or (settings.device == "auto" and not _has_gpu()):
        return {}
    found = {}
    for stage in ("ppo", "evaluate"):
        for judge in judges_asked(config, stage):
            if (judge.url or "").rstrip("/") != own or judge.model in found:
                continue
            try:
                job = read.get_job(session, parse_model_id(judge.model)[0])
            except ModelNotFound:
                continue
            if job is not None:
                found[judge.model] = PipelineConfig.from_dict(job.config)
    return found


def planned(config: PipelineConfig, gpu_memory_mb: int | None, source: str, device: str | None = None,
            served: dict[str, PipelineConfig] | None = None) -> PlanPublic:
    """The plan of `config`, checked against `gpu_memory_mb`, counting the judges the service serves on the same
    GPU (`served_judges`); raises `ValueError` when the model's architecture cannot be read (a hub id that is
    neither a preset's nor cached, offline)."""
    device = device or device_kind(config)
    if device == "cpu":
        gpu_memory_mb, source = None, "a CPU job: never refused for memory"
    try:
        architecture(config)  # the model's config.json: from the presets' shapes, a local directory or the hub
        for judged in (served or {}).values():
            architecture(judged)
    except Exception as exc:
        raise ValueError(f"cannot read the architecture of {config.model.name_or_path!r}: {exc}") from exc
    result = plan(config, None if gpu_memory_mb is None else gpu_memory_mb * MiB, device, served=served)
    return PlanPublic(**result.model_dump(), gpu_source=source)


def refusal(result: MemoryPlan) -> str | None:
    """Why a job with this plan is refused (None: it fits, or nothing was checked)."""
    if result.fits is not False:
        return None
    gpu = result.gpu_memory_bytes / GiB
    lines = []
    for s in result.stages:
        if s.fits is False:
            fix = (f"; cheapest change that fits: {s.suggestion.change} ({s.suggestion.peak_bytes / GiB:.2f} GiB)"
                   if s.suggestion else "; no single change tried makes it fit")
            lines.append(f"{s.stage} needs {s.peak_bytes / GiB:.2f} GiB at its {s.phase}{fix}")
    return (f"the memory plan says this job does not fit a {gpu:.2f} GiB GPU: " + "; ".join(lines)
            + ". Set override_memory_plan to queue it anyway.")


@router.post("", response_model=PlanPublic,
             responses={422: {"description": "A field of the config is invalid, or its model's architecture cannot be read"}})
def plan_config(body: PlanRequest, session: SessionDep, settings: SettingsDep):
    """The planned peak memory of each stage of a configuration, itemised, and whether it fits the GPU it is
    checked against (`gpu_memory_mb`, else as a new job is checked); a stage that does not fit names the
    cheapest change that makes it fit."""
    try:
        config = validate_job(body.preset, body.overrides, [*settings.allowed_roots, settings.data_dir],
                              settings.allowed_judge_urls)
    except JobInvalid as exc:
        raise HTTPException(422, exc.errors) from None
    source = "the request's gpu_memory_mb"
    gpu = body.gpu_memory_mb
    if gpu is None:
        gpu, source = gpu_to_check(session, None)
    try:
        return planned(config, gpu, source, body.device, served_judges(session, settings, config))
    except ValueError as exc:
        raise HTTPException(422,
                            [{"loc": ["body", "overrides", "model", "name_or_path"], "type": "plan",
                              "msg": str(exc)}]) from None
