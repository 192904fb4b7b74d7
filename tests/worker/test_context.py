"""The worker's database context in-process on a real database (SQLite and PostgreSQL): batched writes, cancel,
memory, stages."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import event

from db import StageStatus, queue, read
from edgerlhf.config import PipelineConfig
from edgerlhf.context import Cancelled
from edgerlhf.contract import MEMORY_PREFIX, SAMPLED_PREFIX
from edgerlhf.pipeline import run_pipeline
from worker.context import DBContext

from tests.support.db import sqlite_only
from tests.support.procs import wait_for
from tests.support.tiny import sft_job


@pytest.fixture
def service(db_service):
    """The database context writes through the queue's SQL in-process: both engines (`db_service`)."""
    return db_service


def test_metrics_are_written_in_batches_and_all_arrive(service):
    job_id = service.add_job({"stages": ["data", "sft"]})
    commits = []
    event.listen(service.engine, "commit", lambda conn: commits.append(1))
    with service.sessions() as s:
        queue.claim_next(s, "w")
    ctx = DBContext(service.sessions, job_id, service.tmp_path / "run", stages=["data", "sft"],
                    flush_interval=0.2, memory_interval=0)
    with ctx:
        ctx.begin_stage("sft")
        commits.clear()
        for step in range(1, 2001):
            ctx.log_metrics({"sft/loss": 1.0 / step, "sft/learning_rate": 1e-3}, step)
        ctx.log_sample("Human: hi\n\nAssistant:", " hello", 0.5, 10, kind="probe")
        ctx.log_sample("Human: hi\n\nAssistant:", " hello again", 0.7, 10, kind="probe",
                       parts={"correct": 1.0, "format": float("nan")})  # a stated reward's terms; NaN is no number
        ctx.progress(5, 10)
        ctx.artifact("adapter", service.tmp_path / "run")
        # Rows appear without any explicit flush (the background thread writes them).
        wait_for(lambda: len(service.points(job_id, "sft/loss")) == 2000, 30, "the flusher to write every point")
    assert len(commits) < 50, f"{len(commits)} transactions for 4,000 metric rows: not batched"
    assert [step for _, step, _ in service.points(job_id, "sft/loss")] == list(range(1, 2001))
    with service.sessions() as s:
        samples = read.samples_after(s, job_id)
        assert [(x.seq, x.response) for x in samples] == [(0, " hello"), (1, " hello again")]
        assert [x.parts for x in samples] == [None, {"correct": 1.0, "format": None}]
        job = read.get_job(s, job_id)
        assert job.stage == "sft" and abs(job.progress - 0.75) < 1e-9  # stage 2 of 2, half done
        assert [a.kind for a in read.artifacts(s, job_id)] == ["adapter"]
        assert "stage sft started" in [line.message for line in read.logs_after(s, job_id)]


def test_end_stage_lands_after_the_stages_points_and_resume_skips_it(service):
    job_id = service.add_job({"stages": ["data", "sft"]})
    with service.sessions() as s:
        queue.claim_next(s, "w")
    with DBContext(service.sessions, job_id, service.tmp_path / "run", stages=["data", "sft"],
                   flush_interval=60, memory_interval=0) as ctx:  # the timer never fires here
        ctx.begin_stage("data")
        ctx.log_metrics({"data/train": 16}, 0)
        ctx.end_stage("data", {"train": 16})
        assert service.points(job_id, "data/train") == [("data", 0, 16.0)]
    with service.sessions() as s:
        assert queue.completed_stages(s, job_id) == {"data"}
        run = read.stage_runs(s, job_id)[0]
        assert run.status == StageStatus.succeeded and run.report == {"train": 16}


def test_check_cancelled_raises_soon_after_a_cancel_request(service):
    job_id = service.add_job({"stages": ["data"]})
    with service.sessions() as s:
        queue.claim_next(s, "w")
    with DBContext(service.sessions, job_id, service.tmp_path / "run", stages=["data"],
                   flush_interval=0.1, memory_interval=0) as ctx:
        ctx.check_cancelled()  # nothing requested yet
        with service.sessions() as s:
            queue.request_cancel(s, job_id)

        def raises() -> bool:
            try:
                ctx.check_cancelled()
            except Cancelled:
                return True
            return False

        wait_for(raises, 10, "check_cancelled to raise")


def test_memory_is_sampled_as_sys_metrics_at_the_stages_step(service):
    job_id = service.add_job({"stages": ["sft"]})
    with service.sessions() as s:
        queue.claim_next(s, "w")
    with DBContext(service.sessions, job_id, service.tmp_path / "run", stages=["sft"], memory_device="cpu",
                   flush_interval=0.1, memory_interval=0.1) as ctx:
        ctx.begin_stage("sft")
        ctx.log_metric("sft/loss", 2.0, 7)
        wait_for(lambda: service.points(job_id, "sys/rss_mb"), 10, "a memory sample")
        time.sleep(0.3)
    (stage, step, rss), = service.points(job_id, "sys/rss_mb")
    assert stage == "sft" and step == 7 and rss > 10
    assert not service.points(job_id, "mem/rss_mb")  # the stages' key: the sampler leaves it alone


@sqlite_only  # which writer writes which key is the context's business, not the engine's
def test_each_metric_key_has_one_writer_the_stages_or_the_sampler(service):
    """A real data + sft run with the sampler firing all the time: the keys the stages log (`mem/*`
    included) and the keys the sampler records never overlap, and every row in the table is one writer's."""
    job_id = service.add_job(sft_job(6))
    with service.sessions() as s:
        queue.claim_next(s, "w")
        config = PipelineConfig.from_dict(read.get_job(s, job_id).config)
    written: dict[str, set[tuple[str, str, int]]] = {"stages": set(), "sampler": set()}

    class Recording(DBContext):
        def _emit_metrics(self, rows):
            written["stages"].update((stage, key, step) for stage, key, step, _ in rows)
            super()._emit_metrics(rows)

        def sample_memory(self):
            rows = super().sample_memory()
            written["sampler"].update((stage, key, step) for stage, key, step, _ in rows)
            return rows

    with Recording(service.sessions, job_id, service.tmp_path / "run", stages=config.stages, memory_device="cpu",
                   flush_interval=0.05, memory_interval=0.01) as ctx:
        run_pipeline(config, ctx)
    stage_keys = {key for _, key, _ in written["stages"]}
    sampler_keys = {key for _, key, _ in written["sampler"]}
    assert {k for k in stage_keys if k.startswith(MEMORY_PREFIX)}, "the stages log memory at their steps"
    assert "sft" in {stage for stage, _, _ in written["sampler"]}, "the sampler ran while the stages logged"
    assert stage_keys.isdisjoint(sampler_keys), stage_keys & sampler_keys
    assert all(k.startswith(SAMPLED_PREFIX) for k in sampler_keys), sampler_keys
    assert not any(k.startswith(SAMPLED_PREFIX) for k in stage_keys)
    with service.sessions() as s:
        rows = [(m.stage, m.key, m.step) for m in read.metrics_after(s, job_id, 0, limit=100_000)]
    assert set(rows) == written["stages"] | written["sampler"]


def test_progress_stores_the_step_counts_and_when_the_first_step_came(service):
    # The dashboard's ETA is a step rate counted from the first report (loading and warm-up excluded), so the
    # first report's count and time are kept while later reports move `done` and `progress_at`.
    job_id = service.add_job({"stages": ["sft", "ppo"]})
    with service.sessions() as s:
        queue.claim_next(s, "w")
    with DBContext(service.sessions, job_id, service.tmp_path / "run", stages=["sft", "ppo"],
                   flush_interval=60, memory_interval=0) as ctx:  # flushed by hand below
        ctx.begin_stage("sft")
        ctx.flush()
        with service.sessions() as s:
            run = read.stage_runs(s, job_id)[0]
            assert (run.done, run.total, run.first_progress_at) == (None, None, None), "still loading"
        ctx.progress(1, 10)
        ctx.flush()
        with service.sessions() as s:
            first = read.stage_runs(s, job_id)[0]
        assert (first.done, first.total, first.first_done) == (1, 10, 1)
        assert first.first_progress_at is not None and first.progress_at == first.first_progress_at
        time.sleep(0.05)
        ctx.progress(4, 10)
        ctx.progress(6, 10)  # two reports in one batch: the later wins, the first step is not forgotten
        ctx.flush()
        with service.sessions() as s:
            run = read.stage_runs(s, job_id)[0]
        assert (run.done, run.total, run.first_done, run.first_progress_at) == (6, 10, 1, first.first_progress_at)
        assert run.progress_at > first.first_progress_at and abs(run.progress - 0.6) < 1e-9
        ctx.end_stage("sft")

        ctx.begin_stage("ppo")  # a resumed stage: its first report is past step 1
        ctx.progress(51, 100)
        ctx.progress(52, 100)
        ctx.flush()
        with service.sessions() as s:
            sft, ppo = read.stage_runs(s, job_id)
        assert (sft.status, sft.done, sft.total) == (StageStatus.succeeded, 6, 10)  # as it last reported
        assert (ppo.done, ppo.total, ppo.first_done) == (52, 100, 51)

    with service.sessions() as s:  # a new attempt begins the stage afresh: its counts start over
        queue.begin_stage(s, job_id, "ppo", attempt=2)
        ppo = read.stage_runs(s, job_id)[1]
        assert (ppo.done, ppo.total, ppo.first_done, ppo.first_progress_at, ppo.progress_at) == (None,) * 5
