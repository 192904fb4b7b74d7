"""Request and response bodies, a Create/Public pair per entity (fastapi/full-stack-fastapi-template style).

Floats that are not finite (a diverged loss) are sent as `null`: JSON has no NaN.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pathlib import Path

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from db.models import (INT64_MAX, MAX_GPU_MEMORY_MB, Artifact, Dataset, Job, JobStatus, LogLine, Metric, Sample,
                       StageRun, Worker)
from edgerlhf.locations import HUB_ID
from edgerlhf.contract import ALGORITHMS, StageStatus
from edgerlhf.plan import MemoryPlan
from edgerlhf.reports import EvalReport, Interval


def jsonable(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (recursively)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


MAX_OVERRIDE_DEPTH = 8
"""Deepest nesting of a job's `overrides` (a config is a section, a field and a list: 3 levels)."""


def _shallow(value: Any) -> Any:
    """`value` unchanged, or a ValueError when it nests deeper than `MAX_OVERRIDE_DEPTH` (checked without recursion,
    so any depth the JSON parser took is measured)."""
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth >= MAX_OVERRIDE_DEPTH:
                raise ValueError(f"nested deeper than {MAX_OVERRIDE_DEPTH} levels; a config has 3 "
                                 "(section, field, list)")
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return value


Overrides = Annotated[dict[str, Any], BeforeValidator(_shallow)]
"""A job's overrides: nested fields to change, at most `MAX_OVERRIDE_DEPTH` deep (422 beyond)."""


# --- jobs ------------------------------------------------------------------------------------------


DatasetId = Annotated[int, Field(strict=True, ge=1, le=INT64_MAX)]


class DatasetRefs(BaseModel):
    """The data sets a job reads, by config section (`backend.datasets`); a section left out reads what the
    overrides and the preset say."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"data": 1, "sft_data": 2}]})

    data: DatasetId | None = Field(None, description="`data.source`: preference pairs (or any kind) for the data "
                                                     "stage, the reward model, DPO and KTO (thumbs too)")
    sft_data: DatasetId | None = Field(None, description="`sft_data.source`: SFT's demonstrations (or pairs: their "
                                                  "preferred answers)")
    prompt_data: DatasetId | None = Field(None, description="`prompt_data.source`: the prompts of PPO, GRPO, RLOO "
                                                            "and the evaluation")

    def chosen(self) -> dict[str, int]:
        """Section -> data set id, for the sections given."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class JobCreate(BaseModel):
    """A new job: a preset plus overrides of any of its fields."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"name": "tiny smoke run", "preset": "tiny", "overrides": {"ppo": {"steps": 5}}}]})

    name: str | None = Field(None, min_length=1, max_length=200, description="Shown in lists; default: the preset name")
    preset: str = Field(min_length=1, max_length=100, description="A name from GET /api/presets")
    overrides: Overrides = Field(default_factory=dict,
                                 description="Nested fields to change, e.g. {\"ppo\": {\"steps\": 5}}")
    min_gpu_memory_mb: int | None = Field(
        None, strict=True, ge=1, le=MAX_GPU_MEMORY_MB,
        description="Only a worker whose GPU has at least this much memory (MB) runs the job; default: any worker")
    override_memory_plan: bool = Field(
        False, description="Queue the job even if the memory planner says a stage does not fit the GPU it is "
                           "checked against (see POST /api/plan); default: such a job is refused with 409")
    datasets: DatasetRefs | None = Field(
        None, description="Data sets (ids from GET /api/datasets) the job reads, by config section; each becomes "
                          "that section's source, format and columns (the overrides' other fields of the section win)")


class PlanRequest(BaseModel):
    """A configuration to plan: the same preset and overrides a job would have."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"preset": "qwen2.5-0.5b-8gb", "overrides": {"ppo": {"mini_batch_size": 1}},
                      "gpu_memory_mb": 8192}]})

    preset: str = Field(min_length=1, max_length=100, description="A name from GET /api/presets")
    overrides: Overrides = Field(default_factory=dict, description="Nested fields to change, as for a job")
    gpu_memory_mb: int | None = Field(
        None, strict=True, ge=1, le=MAX_GPU_MEMORY_MB,
        description="The GPU memory to check against (a job's min_gpu_memory_mb); default: as a new job is "
                    "checked, the largest GPU memory of the registered workers (none: figures only)")
    device: Literal["cuda", "cpu"] | None = Field(
        None, description="Plan for a bf16 GPU or fp32 CPU tensors; default: cpu for a config on the CPU, else cuda")


class PlanPublic(MemoryPlan):
    """The planner's answer (`edgerlhf.plan.MemoryPlan`) and which GPU it was checked against."""

    gpu_source: str
    """Where `gpu_memory_bytes` came from: the request, the largest registered worker, or nowhere."""


EVALUATE_STAGE = "evaluate"
"""The stage of `edgerlhf.contract.STAGES` whose report (`EvalReport`) holds a job's result."""


class StagePublic(BaseModel):
    stage: str
    """Its stored name (`edgerlhf.contract.STAGES`): the alignment stage is `ppo` whichever algorithm ran."""
    status: str
    """pending, running, succeeded, failed, cancelled or interrupted."""
    progress: float
    done: int | None = None
    """Units of work done (steps, batches ...) as the stage last reported them; None until it reports."""
    total: int | None = None
    """Units of work it will do."""
    first_done: int | None = None
    """`done` at its first report in this attempt: its step rate counts from there."""
    first_progress_at: datetime | None = None
    """When that first report came; None while it loads and warms up (or before it began)."""
    progress_at: datetime | None = None
    """When its latest report came."""
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @classmethod
    def of(cls, name: str, run: StageRun | None) -> Self:
        if run is None:
            return cls(stage=name, status=StageStatus.pending.value, progress=0.0)
        return cls(stage=name, status=run.status.value, progress=run.progress, done=run.done, total=run.total,
                   first_done=run.first_done, first_progress_at=run.first_progress_at, progress_at=run.progress_at,
                   started_at=run.started_at, finished_at=run.finished_at)


class JobResult(BaseModel):
    """A job's headline result from its evaluate stage's stored report (`EvalReport`): what a job list shows
    without fetching each job's reports. Differences are aligned − SFT per prompt with their bootstrap interval;
    None where the report has no such measure."""

    reward_diff: Interval | None
    """Reward (the reward model's or function's score) aligned − SFT."""
    gold_diff: Interval | None
    """Gold score aligned − SFT (the known-answer task only)."""
    judge_win_rate: Interval | None
    """How often the judge preferred the aligned answer (0.5: no preference; with `evaluate.judge` only)."""
    kl: float | None
    """KL of the aligned policy from SFT, nats per response."""
    length_diff: Interval | None
    """Response tokens aligned − SFT."""

    @classmethod
    def of(cls, report: dict[str, Any] | None) -> Self | None:
        """From the evaluate stage's stored report; None without one, or for a report of an older shape."""
        if report is None:
            return None
        try:
            ev = EvalReport.model_validate(report)
        except ValidationError:
            return None
        return cls(reward_diff=ev.reward_diff, gold_diff=ev.gold_diff, judge_win_rate=ev.judge_win_rate,
                   kl=jsonable(ev.kl), length_diff=ev.length_diff)


class JobSummary(BaseModel):
    """A job without its config: what a job list and a status event carry (a config is kilobytes, and a list of
    200 jobs polled every few seconds would carry each one every time). `GET /api/jobs/{id}` has the config."""

    id: int
    name: str
    status: JobStatus
    preset: str
    algorithm: str
    """The alignment algorithm of its config (`PipelineConfig.algorithm`; `ppo` for a job stored before there was
    a choice)."""
    stage: str | None
    progress: float
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    error: str | None
    """One line; the traceback stays in the database and the worker's log."""
    attempts: int
    worker_id: str | None
    cancel_requested: bool
    queue_position: int | None
    """1 = the next job a worker takes; None unless queued."""
    min_gpu_memory_mb: int | None
    """Only a worker whose GPU has at least this much memory (MB) claims the job; None: any worker."""
    waiting_for: str | None
    """Why a queued job waits when no live worker could ever take it (`waiting for a worker with ≥ M MB ...`);
    None otherwise."""
    stages: list[StagePublic]
    result: JobResult | None
    """Its evaluate stage's headline numbers once that stage succeeded; None before (or without one)."""
    parent_id: int | None
    """The job this one continues (`POST /api/jobs/{id}/continue`): it started from that job's aligned policy; None
    for a round 1."""
    round: int
    """Which round of RLHF the job is: 1 from a base model, its parent's round + 1 (`GET /api/jobs/{id}/rounds`)."""

    @classmethod
    def of(cls, job: Job, runs: list[StageRun], queue_position: int | None,
           waiting_for: str | None = None) -> Self:
        by_stage = {r.stage: r for r in runs}
        stages = [StagePublic.of(name, by_stage.get(name)) for name in job.config.get("stages", [])]
        evaluated = by_stage.get(EVALUATE_STAGE)
        result = JobResult.of(evaluated.report) if evaluated is not None and \
            evaluated.status == StageStatus.succeeded else None
        extra = {"config": jsonable(job.config)} if "config" in cls.model_fields else {}
        return cls(id=job.id, name=job.name, status=job.status, preset=job.preset,
                   algorithm=job.config.get("algorithm", "ppo"), **extra, stage=job.stage,
                   progress=job.progress or 0.0, created_at=job.created_at,
                   started_at=job.started_at, finished_at=job.finished_at, heartbeat_at=job.heartbeat_at,
                   error=job.error, attempts=job.attempts, worker_id=job.worker_id,
                   cancel_requested=job.cancel_requested,
                   queue_position=queue_position if job.status == JobStatus.queued else None,
                   min_gpu_memory_mb=job.min_gpu_memory_mb,
                   waiting_for=waiting_for if job.status == JobStatus.queued else None, stages=stages,
                   result=result, parent_id=job.parent_id, round=job.round or 1)


class JobPublic(JobSummary):
    """A job with its whole config (`PipelineConfig.to_dict()`)."""

    config: dict[str, Any]


class JobsPublic(BaseModel):
    items: list[JobSummary]
    total: int
    """Jobs matching the filter (all pages)."""
    limit: int
    offset: int


# --- rows read with a cursor -------------------------------------------------------------------------


class MetricPublic(BaseModel):
    id: int
    cursor: int
    """This row's place in its job's stream: `after=<cursor>` returns the rows written after it."""
    stage: str
    key: str
    step: int
    value: float | None
    time: float

    @classmethod
    def of(cls, m: Metric) -> MetricPublic:
        return cls(id=m.id, cursor=m.row_seq, stage=m.stage, key=m.key, step=m.step, value=jsonable(m.value),
                   time=m.time)


class SamplePublic(BaseModel):
    id: int
    cursor: int
    """This row's place in its job's stream: `after=<cursor>` returns the rows written after it."""
    stage: str
    kind: str
    checkpoint: str | None
    step: int
    prompt: str
    response: str
    reward: float | None
    parts: dict[str, float | None] | None = None
    """With stated rewards (`ppo.rewards`): each component's score of the response, unweighted."""
    time: float

    @classmethod
    def of(cls, s: Sample) -> SamplePublic:
        return cls(id=s.id, cursor=s.row_seq, stage=s.stage, kind=s.kind, checkpoint=s.checkpoint, step=s.step,
                   prompt=s.prompt, response=s.response, reward=jsonable(s.reward), parts=jsonable(s.parts),
                   time=s.time)


class LogPublic(BaseModel):
    id: int
    cursor: int
    """This row's place in its job's stream: `after=<cursor>` returns the rows written after it."""
    time: float
    level: str
    stage: str | None
    message: str

    @classmethod
    def of(cls, line: LogLine) -> LogPublic:
        return cls(id=line.id, cursor=line.row_seq, time=line.time, level=line.level, stage=line.stage,
                   message=line.message)


class MetricsPage(BaseModel):
    items: list[MetricPublic]
    cursor: int
    """Pass as `after` for the next page; unchanged when there were no new rows."""
    more: bool
    """The page was full: ask again at once for the rest."""


class SamplesPage(BaseModel):
    items: list[SamplePublic]
    cursor: int
    more: bool


class LogsPage(BaseModel):
    items: list[LogPublic]
    cursor: int
    more: bool


class ArtifactPublic(BaseModel):
    id: int
    stage: str | None
    kind: str
    path: str
    """Relative to the job's run directory when inside it."""
    size: int | None
    created_at: datetime

    @classmethod
    def of(cls, a: Artifact, run_dir: str) -> ArtifactPublic:
        path = a.path
        if path.startswith(run_dir.rstrip("/") + "/"):
            path = path[len(run_dir.rstrip("/")) + 1:]
        return cls(id=a.id, stage=a.stage, kind=a.kind, path=path, size=a.size, created_at=a.created_at)


# --- system ----------------------------------------------------------------------------------------


class PresetPublic(BaseModel):
    name: str
    model: str
    """The model the preset loads (a hub id or local path; "(random weights)" for a random_init model)."""
    description: str
    config: dict[str, Any]


class RangePublic(BaseModel):
    low: float
    high: float
    low_open: bool
    """True: the low bound itself is excluded."""
    high_open: bool


class ConfigFieldPublic(BaseModel):
    path: str
    """Dotted path, as in a job's `overrides` (`ppo.steps`)."""
    type: str
    """`int`, `float`, `bool`, `str`, `list[str]`, with ` | None` when it may be null."""
    default: Any
    """The value in `PipelineConfig()`; presets change some."""
    help: str
    range: RangePublic | None
    """The values a numeric field accepts."""


class WorkerPublic(BaseModel):
    alive: bool
    """A worker heartbeated within the last few heartbeat intervals."""
    id: str | None = None
    host: str | None = None
    pid: int | None = None
    gpu_index: int | None = None
    """The GPU the worker owns (nvidia-smi's index); None: none named or found."""
    gpu_name: str | None = None
    gpu_memory_mb: int | None = None
    """Its memory; None: unknown (the worker then takes only jobs without a minimum)."""
    state: str | None = None
    """`idle`, `busy` or `stopped`."""
    job_id: int | None = None
    """The job it runs now."""
    started_at: datetime | None = None
    last_heartbeat: datetime | None = None

    @classmethod
    def of(cls, w: Worker, alive: bool) -> WorkerPublic:
        return cls(alive=alive, id=w.id, host=w.hostname, pid=w.pid, gpu_index=w.gpu_index, gpu_name=w.gpu_name,
                   gpu_memory_mb=w.gpu_memory_mb, state=w.state, job_id=w.job_id, started_at=w.started_at,
                   last_heartbeat=w.heartbeat_at)


class SystemPublic(BaseModel):
    gpus: list[dict[str, Any]]
    """index, name, memory_total_mb, memory_used_mb per visible NVIDIA GPU."""
    cpu: dict[str, Any]
    worker: WorkerPublic
    """The live worker that heartbeated last (else the last one seen); `workers` has them all."""
    workers: list[WorkerPublic]
    """Every worker seen (at most the 20 that heartbeated last), alive or not, most recent first."""
    queue_length: int
    """Queued jobs."""
    jobs: dict[str, int]
    """Job count per status."""


# --- data sets -------------------------------------------------------------------------------------


DatasetFormat = Literal["auto", "preference", "demonstration", "prompt", "unpaired"]
"""What a data set holds (`edgerlhf.formats.KINDS`); `auto`: detected from its columns."""


def _no_nul(value: str) -> str:
    if "\x00" in value:  # PostgreSQL refuses NUL in text
        raise ValueError("contains a NUL character")
    return value


NoNul = Annotated[str, AfterValidator(_no_nul)]
"""Text a database row stores: no NUL character."""
Text200 = Annotated[NoNul, Field(min_length=1, max_length=200)]


class DatasetHubCreate(BaseModel):
    """A hub data set to register: read once now (its format detected), downloaded by the jobs that read it."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"hub_id": "Anthropic/hh-rlhf", "data_dir": "harmless-base", "split": "train"}]})

    hub_id: str = Field(min_length=1, max_length=193, pattern=HUB_ID.pattern, description="`org/name` on the hub")
    name: Text200 | None = Field(None, description="Shown in lists; default: the hub id")
    hub_name: Text200 | None = Field(None, description="The data set's configuration "
                                                       "(`datasets.load_dataset(id, name)`)")
    data_dir: str | None = Field(None, min_length=1, max_length=300, description="A subset folder of the data set")
    split: str = Field("train", min_length=1, max_length=100, description="`train`, `test`, `train[:1000]` ...")
    format: DatasetFormat = Field("auto", description="What it holds; `auto`: detected from its columns")
    columns: dict[str, str] | None = Field(None, description="Column mapping, its name -> the format's, "
                                                             "e.g. {\"question\": \"prompt\"}")
    skip_bad_rows: bool = Field(False, description="Register it without its bad rows (counted and shown) instead "
                                                   "of refusing it on the first one")


class DatasetPublic(BaseModel):
    """A data set: what it holds (detected when it was added), where it comes from, and who reads it now."""

    id: int
    name: str
    origin: Literal["upload", "hub"]
    created_at: datetime
    kind: str
    """preference, demonstration, prompt or unpaired (`edgerlhf.formats.KINDS`)."""
    conversational: bool
    """Its texts are lists of `{"role", "content"}` messages."""
    reason: str
    """Why this format was detected."""
    format: str
    """The format asked for when it was added (`auto`: detected); a job reads it so."""
    columns: dict[str, str] | None
    """The column mapping it is read with."""
    rows: int
    records: int
    """Records read from the rows (a multi-turn conversation gives one demonstration per assistant turn)."""
    bad_rows: int
    """Rows skipped as unreadable (only when it was added with `skip_bad_rows`)."""
    bad_row_examples: list[str]
    """The first few, `file:line: what is wrong`."""
    source: str
    """What a job's config names to read it: the stored file's absolute path, or the hub id."""
    file_name: str | None
    sha256: str | None
    size: int | None
    """Bytes of the stored file."""
    hub_id: str | None
    hub_name: str | None
    data_dir: str | None
    split: str | None
    sections: list[str]
    """The config sections a job can fill with it (`JobCreate.datasets`): `data`, `sft_data` (not a prompt set),
    `prompt_data`."""
    used_by: list[int]
    """Queued or running jobs that read it: while there are any it cannot be deleted."""

    @classmethod
    def of(cls, d: Dataset, data_dir: Path, used_by: list[int]) -> Self:
        from backend.datasets import SECTIONS

        return cls(sections=[s for s, kinds in SECTIONS.items() if d.kind in kinds], id=d.id, name=d.name,
                   origin="hub" if d.hub_id else "upload", created_at=d.created_at,
                   kind=d.kind, conversational=d.conversational, reason=d.reason, format=d.format, columns=d.columns,
                   rows=d.rows, records=d.records, bad_rows=d.bad_rows, bad_row_examples=d.bad_row_examples or [],
                   source=str(data_dir / d.path) if d.path else d.hub_id,
                   file_name=Path(d.path).name if d.path else None, sha256=d.sha256, size=d.size, hub_id=d.hub_id,
                   hub_name=d.hub_name, data_dir=d.data_dir, split=d.split, used_by=used_by)


class DatasetAdded(DatasetPublic):
    """The data set an upload or registration made, or the one already stored with the same content."""

    duplicate: bool
    """True: the same file (or hub coordinates) was stored already, and this is that data set."""


class DatasetsPublic(BaseModel):
    items: list[DatasetPublic]
    """Newest first."""


class HistogramPublic(BaseModel):
    """Token lengths in equal-width bins from 0: `counts[i]` lengths in `[edges[i], edges[i+1])`."""

    edges: list[int]
    counts: list[int]
    mean: float | None
    p50: int | None
    p95: int | None
    max: int | None


class PreviewAnswer(BaseModel):
    role: str
    """`chosen`, `rejected` or `completion`."""
    text: str
    """As the model is taught it (its chat template's end of turn, or a space before and EOS after)."""
    tokens: int
    """Its length as `max_response_tokens` counts it."""


class PreviewRow(BaseModel):
    prompt: str
    """As the model sees it: its chat template up to where the answer begins, or the HH dialogue."""
    prompt_tokens: int
    """Its length as `max_prompt_tokens` counts it (the stored prompt, no template)."""
    answers: list[PreviewAnswer]
    """Empty for a prompt set."""
    label: bool | None
    """Unpaired feedback: whether the answer is a good one."""
    extra: dict[str, Any]
    """The record's other fields (a prompt set's extra columns)."""


class DatasetPreview(BaseModel):
    """A data set as one model would read it: its first rows rendered, the token lengths, and what given budgets
    would drop (`backend.datasets.preview`)."""

    dataset_id: int
    model: str
    """Whose tokenizer rendered and counted."""
    chat_template: bool
    """The tokenizer has a chat template (else the HH text is what the model sees)."""
    kind: str
    conversational: bool
    reason: str
    rows: int
    records: int
    bad_rows: int
    measured: int
    """Records measured for the histograms and the drops (the first ones, at most 20,000)."""
    max_prompt_tokens: int
    max_response_tokens: int
    prompt_tokens: HistogramPublic
    answer_tokens: HistogramPublic | None
    """None for a prompt set."""
    dropped: dict[str, int]
    """What the data stage's cleaning would drop of the measured records, by reason, with these budgets
    (`prompt_too_long`, `response_too_long`, `duplicate`, `empty_response` ...)."""
    kept: int
    """Measured records it would keep."""
    rows_shown: list[PreviewRow]
    problems: list[str]
    """The bad rows, `file:line: what is wrong`."""


# --- rounds -------------------------------------------------------------------------------------------


REWARD_DATA = ("votes", "feedback", "dataset", "parent")
"""What the next round's reward model trains on (`ContinueCreate.reward_data`)."""


class ContinueCreate(BaseModel):
    """The next round of RLHF from a finished job: a new job whose SFT policy is that job's aligned policy (merged),
    whose reward model trains on `reward_data`, and which aligns again. Everything else is the parent's config."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"reward_data": "votes"},
        {"reward_data": "votes", "votes_weight": 0.5, "algorithm": "grpo", "name": "round 2, votes and old pairs"},
        {"reward_data": "dataset", "dataset": 4, "overrides": {"ppo": {"steps": 50}}}]})

    name: NoNul | None = Field(None, min_length=1, max_length=200,
                             description="Shown in lists; default: the parent's name with its round (`… · round 2`)")
    reward_data: Literal[REWARD_DATA] = Field(  # type: ignore[valid-type]
        "votes", description="What the round's data stage (its reward model, DPO, KTO) reads: `votes`, the arena votes "
                             "with the parent's aligned model (`job-N/ppo`) on either side, snapshot now "
                             "(`data.votes_file`); `feedback`, the chat feedback about that model, snapshot now as a "
                             "data set (better answer ≻ reply; thumbs for KTO); `dataset`, the data set `dataset`; "
                             "`parent`, the parent's own data again")
    dataset: DatasetId | None = Field(None, description="With reward_data=dataset: the data set (an id from GET "
                                                        "/api/datasets, such as a feedback snapshot) it reads")
    votes_weight: float = Field(1.0, gt=0, le=1, allow_inf_nan=False,
                                description="With reward_data=votes: the votes' share of the training pairs; 1, the "
                                            "votes alone; below 1, mixed with the parent's data set "
                                            "(`data.votes_weight`)")
    sft_dataset: DatasetId | None = Field(None, description="Demonstrations (a data set id) to fine-tune the parent's "
                                                            "policy on first (`sft_data.source`); default: SFT trains "
                                                            "nothing")
    algorithm: Literal[ALGORITHMS] | None = Field(  # type: ignore[valid-type]
        None, description="The round's alignment algorithm; default: the parent's")
    overrides: Overrides = Field(default_factory=dict,
                                 description="Nested fields to change on top of the parent's config, as for a job")
    override_memory_plan: bool = Field(False, description="As for a new job: queue it even if the memory plan says "
                                                          "a stage does not fit")


class RoundsPublic(BaseModel):
    """A chain of rounds: the jobs a job continues, back to round 1, itself, and the jobs continued from it."""

    items: list[JobSummary]
    """Ordered by round, then id."""
