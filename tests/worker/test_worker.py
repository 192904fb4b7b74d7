"""The worker as real processes on a real SQLite file (`service`): racing workers, crash and
resume, cancel, failures.

These run the real pipeline (`tiny` preset, very small overrides), so each job process imports the
training stack; the slow ones are marked.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from datetime import timedelta

import psutil
import pytest
from sqlalchemy import update

from db import JobStatus, StageStatus, queue, read
from db.models import Job, utcnow

from tests.support.procs import wait_for
from tests.support.tiny import DATA_ONLY, sft_job


RACED_JOBS = 10


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
def test_two_workers_race_for_queued_jobs_and_run_each_exactly_once(service):
    # 10 jobs, each a job process of its own: both workers keep racing for the next one (claims racing at the SQL
    # level, hundreds of them, on both engines: tests/db/test_queue.py).
    ids = [service.add_job(DATA_ONLY, name=f"race {i}") for i in range(RACED_JOBS)]
    workers = [service.start_worker("--once") for _ in range(2)]
    for w in workers:
        assert w.wait(timeout=600) == 0, service.worker_logs()
    runs_per_worker = Counter()
    for job_id in ids:
        job = service.job(job_id)
        assert job.status == JobStatus.succeeded, (job.error, service.worker_logs())
        assert job.attempts == 1
        runs_per_worker[job.worker_id] += 1
        claims = [m for m in service.logs(job_id) if m.startswith("claimed by")]
        assert len(claims) == 1, claims
        # Each metric point exists once and the data stage ran once (the split's size is data.py's business).
        assert [(stage, step) for stage, step, _ in service.points(job_id, "data/train")] == [("data", 0)]
        assert Counter(m for m in service.logs(job_id))["stage data started"] == 1
    assert sum(runs_per_worker.values()) == RACED_JOBS
    assert len(runs_per_worker) == 2, f"both workers should have taken jobs: {runs_per_worker}"


def test_a_failing_stage_fails_its_job_with_traceback_and_the_worker_goes_on(service):
    missing = service.data_dir / "nonexistent" / "prefs.jsonl"  # under an allowed root: the data stage fails on it
    bad = service.add_job({"stages": ["data"], "data": {"source": str(missing)}}, name="bad")
    good = service.add_job(DATA_ONLY, name="good")
    worker = service.start_worker("--once")
    assert worker.wait(timeout=240) == 0, service.worker_logs()
    failed = service.job(bad)
    assert failed.status == JobStatus.failed
    assert "DataError" in failed.error and str(missing) in failed.error
    assert failed.traceback.startswith("Traceback (most recent call last)")
    assert "edgerlhf/data.py" in failed.traceback
    with service.sessions() as s:
        assert [(r.stage, r.status) for r in read.stage_runs(s, bad)] == [("data", StageStatus.failed)]
    assert any(m.startswith("failed: DataError") for m in service.logs(bad))
    assert service.job(good).status == JobStatus.succeeded


@pytest.mark.slow
def test_cancel_stops_a_running_job_and_its_process(service):
    job_id = service.add_job(sft_job(max_steps=99), name="long")
    service.start_worker("--max-jobs", "1", "--cancel-grace", "30")
    wait_for(lambda: service.points(job_id, "sft/loss"), 240, "the first SFT step")
    with service.sessions() as s:
        child_pid = next(w.child_pid for w in read.workers(s) if w.job_id == job_id)
        assert psutil.pid_exists(child_pid)
        queue.request_cancel(s, job_id)
    # The job process notices between steps and exits itself (the grace before a kill is 30 s).
    job = wait_for(lambda: (j := service.job(job_id)).status != JobStatus.running and j, 30, "the job to stop")
    assert job.status == JobStatus.cancelled, service.worker_logs()
    assert gone(child_pid), "the job process (and its memory) must be gone"
    assert service.points(job_id, "sft/loss"), "partial metrics are kept"
    with service.sessions() as s:
        runs = {r.stage: r.status for r in read.stage_runs(s, job_id)}
    assert runs == {"data": StageStatus.succeeded, "sft": StageStatus.cancelled}
    assert "kill" not in service.worker_logs()  # it stopped by itself, not by the grace-period kill


@pytest.mark.slow
def test_sigkilled_worker_is_followed_by_one_that_resumes_without_duplicate_or_missing_steps(service):
    steps = 60  # enough that the kill lands mid-stage even on a fast machine
    job_id = service.add_job(sft_job(max_steps=steps), name="crash")
    first = service.start_worker("--max-jobs", "1")
    wait_for(lambda: service.points(job_id, "sft/loss"), 240, "the first SFT step")
    with service.sessions() as s:
        child_pid = next(w.child_pid for w in read.workers(s) if w.job_id == job_id)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    # The job process dies with its worker (no orphan keeps training).
    wait_for(lambda: gone(child_pid), 10, "the orphaned job process to die")
    job = service.job(job_id)
    with service.sessions() as s:
        runs = {r.stage: r for r in read.stage_runs(s, job_id)}
    assert job.status == JobStatus.running and runs["sft"].status == StageStatus.running, \
        "the kill must land in the middle of the SFT stage"
    killed_at = [step for _, step, _ in service.points(job_id, "sft/loss")]
    assert 0 < len(killed_at) < steps
    data_started = runs["data"].started_at
    # A dashboard attached before the kill: what it has, and its cursor.
    with service.sessions() as s:
        seen = {(m.stage, m.key, m.step): m.value for m in read.metrics_after(s, job_id, limit=100_000)}
        cursor = max(m.row_seq for m in read.metrics_after(s, job_id, limit=100_000))

    second = service.start_worker("--max-jobs", "1")  # requeues the stalled job after EDGERLHF_STALL_SECONDS
    assert second.wait(timeout=300) == 0, service.worker_logs()
    job = service.job(job_id)
    assert job.status == JobStatus.succeeded, (job.error, service.worker_logs())
    assert job.attempts == 2
    losses = service.points(job_id, "sft/loss")
    assert [step for _, step, _ in losses] == list(range(1, steps + 1)), "each step exactly once"
    # The same dashboard, following its cursor to the end (a resumed point replaces the one it had),
    # ends with exactly what the table holds: nothing missed across the crash, nothing twice.
    with service.sessions() as s:
        while page := read.metrics_after(s, job_id, after=cursor, limit=50):
            seen.update({(m.stage, m.key, m.step): m.value for m in page})
            cursor = page[-1].row_seq
        table = {(m.stage, m.key, m.step): m.value for m in read.metrics_after(s, job_id, limit=100_000)}
    assert seen == table
    with service.sessions() as s:
        runs = {r.stage: r for r in read.stage_runs(s, job_id)}
    assert runs["data"].started_at == data_started, "the completed data stage is not run again"
    assert runs["sft"].status == StageStatus.succeeded and runs["sft"].attempt == 2
    messages = service.logs(job_id)
    assert any("stopped heartbeating; requeued" in m for m in messages)
    assert any(m.startswith("resuming attempt 2") for m in messages)
    assert Counter(messages)["stage data started"] == 1


def _child_of(service, job_id: int) -> int:
    def find():
        with service.sessions() as s:
            return next((w.child_pid for w in read.workers(s) if w.job_id == job_id and w.child_pid), None)
    return wait_for(find, 120, "the job process to start")


def test_a_job_process_that_ignores_a_cancel_is_killed_after_the_grace_period(service):
    job_id = service.add_job(sft_job(max_steps=99), name="hung")
    service.start_worker("--max-jobs", "1", "--cancel-grace", "1")
    child_pid = _child_of(service, job_id)
    os.kill(child_pid, signal.SIGSTOP)  # frozen, as in a hung CUDA call: it can never see the cancel
    with service.sessions() as s:
        queue.request_cancel(s, job_id)
    job = wait_for(lambda: (j := service.job(job_id)).status != JobStatus.running and j, 60, "the job to stop")
    assert job.status == JobStatus.cancelled, service.worker_logs()
    assert gone(child_pid)
    assert "ignored the cancel" in service.worker_logs()


def test_a_crashed_job_process_fails_the_job_and_the_worker_takes_the_next(service):
    crashing = service.add_job(sft_job(max_steps=99), name="crash")
    after = service.add_job(DATA_ONLY, name="after")
    worker = service.start_worker("--max-jobs", "2")
    child_pid = _child_of(service, crashing)
    os.kill(child_pid, signal.SIGKILL)  # as the kernel's OOM killer would
    assert worker.wait(timeout=240) == 0, service.worker_logs()
    job = service.job(crashing)
    assert job.status == JobStatus.failed and job.error == "job process killed by signal 9 (out of memory?)"
    assert service.job(after).status == JobStatus.succeeded


def test_sigterm_stops_the_worker_cleanly_and_gives_the_job_back(service):
    job_id = service.add_job(sft_job(max_steps=99), name="interrupted")
    worker = service.start_worker()
    child_pid = _child_of(service, job_id)
    worker.send_signal(signal.SIGTERM)  # what `edgerlhf up` sends on Ctrl-C
    assert worker.wait(timeout=60) == 0, service.worker_logs()
    assert gone(child_pid), "no job process outlives its worker"
    job = service.job(job_id)
    assert job.status == JobStatus.queued and job.attempts == 0 and job.worker_id is None
    with service.sessions() as s:
        assert [w.state for w in read.workers(s)] == ["stopped"]
    assert any("job requeued" in m for m in service.logs(job_id))


def test_a_job_taken_over_while_its_process_ran_is_not_recorded_by_its_old_worker(service):
    # No second heartbeat: the worker cannot learn of the takeover before the job process ends.
    service.env["EDGERLHF_HEARTBEAT_SECONDS"] = "600"
    job_id = service.add_job(sft_job(max_steps=99), name="taken over")
    worker = service.start_worker("--max-jobs", "1")
    wait_for(lambda: service.points(job_id, "sft/loss"), 240, "the first SFT step")
    # Another worker judged it stalled, requeued and claimed it while its first process still runs.
    with service.sessions() as s:
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=60)))
        s.commit()
        assert queue.requeue_stalled(s, stall_seconds=30, max_attempts=3) == [(job_id, JobStatus.queued)], \
            "the takeover must land while the first job process runs"
        assert queue.claim_next(s, "other-worker").id == job_id
    assert worker.wait(timeout=240) == 0, service.worker_logs()
    job = service.job(job_id)
    assert (job.status, job.worker_id, job.attempts) == (JobStatus.running, "other-worker", 2)
    logs = service.worker_logs()
    assert "job succeeded" not in logs, "only the job's owner may record (and log) its outcome"
    assert "no longer this worker's" in logs
    assert "succeeded" not in service.logs(job_id)


def test_a_job_process_that_crashes_after_a_cancel_request_fails_with_its_own_error(service):
    # Only a real cancellation ends `cancelled`; a crash that merely follows a cancel request is a failure.
    raised = service.add_job(sft_job(max_steps=99), name="raises")
    killed = service.add_job(sft_job(max_steps=99), name="killed")
    worker = service.start_worker("--max-jobs", "2", "--cancel-grace", "60")
    # SIGINT: a Python exception with a traceback; SIGKILL: as the kernel's OOM killer would. Each lands
    # right after the cancel request, long before the job process polls the flag and stops by itself.
    for job_id, crash in ((raised, signal.SIGINT), (killed, signal.SIGKILL)):
        wait_for(lambda job_id=job_id: service.points(job_id, "sft/loss"), 240, "the first SFT step")
        child_pid = _child_of(service, job_id)
        with service.sessions() as s:
            queue.request_cancel(s, job_id)
        os.kill(child_pid, crash)
    assert worker.wait(timeout=240) == 0, service.worker_logs()
    job = service.job(raised)
    assert job.status == JobStatus.failed, service.worker_logs()
    assert job.error.startswith("KeyboardInterrupt")
    assert job.traceback.startswith("Traceback (most recent call last)") and "KeyboardInterrupt" in job.traceback
    job = service.job(killed)
    assert job.status == JobStatus.failed, service.worker_logs()
    assert job.error == "job process killed by signal 9 (out of memory?)"
    assert "job cancelled" not in service.worker_logs()


def test_a_job_asking_for_a_device_this_machine_lacks_fails_at_once_and_the_worker_goes_on(service):
    import torch

    devices = ["cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"])
    bad = {device: service.add_job({**DATA_ONLY, "device": device}, name=device) for device in devices}
    good = service.add_job(DATA_ONLY, name="good")
    worker = service.start_worker("--once")
    assert worker.wait(timeout=240) == 0, service.worker_logs()
    for device, job_id in bad.items():
        job = service.job(job_id)
        assert (job.status, job.attempts) == (JobStatus.failed, 1), (device, job.error)
        assert f"device {device!r} was asked for" in job.error and "available: cpu" in job.error, job.error
        with service.sessions() as s:
            assert read.stage_runs(s, job_id) == [], "no stage starts on a device that does not exist"
    assert service.job(good).status == JobStatus.succeeded


def test_a_job_whose_config_the_service_refuses_fails_before_it_runs(service, tmp_path):
    """The job process trusts nothing it reads from the database: a config the backend would have refused (a local
    path outside the allowed roots, an import-path reward function), written there by anyone, fails at once with
    the service's reason, reads no file of it and imports no module of it."""
    import shutil

    from edgerlhf.config import HH_PREFS_SAMPLE

    outside = tmp_path / "outside" / "pairs.jsonl"
    outside.parent.mkdir()
    shutil.copy(HH_PREFS_SAMPLE, outside)
    marker = tmp_path / "imported"
    (tmp_path / "planted").mkdir()
    module = (f"open({str(marker)!r}, 'w').write('imported')\n"
              "def score(prompts, responses):\n    return [0.0] * len(prompts)\n")
    (tmp_path / "planted" / "reward_fn.py").write_text(module)
    service.env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "planted"), service.env.get("PYTHONPATH", "")])
    path_job = service.add_job({**DATA_ONLY, "data": {**DATA_ONLY["data"], "source": str(outside)}}, name="outside")
    code_job = service.add_job({**DATA_ONLY, "ppo": {"reward_function": "reward_fn:score"}}, name="import path")
    good = service.add_job(DATA_ONLY, name="good")
    worker = service.start_worker("--once")
    assert worker.wait(timeout=240) == 0, service.worker_logs()
    for job_id, field in ((path_job, "data.source"), (code_job, "ppo.reward_function")):
        job = service.job(job_id)
        assert (job.status, job.attempts) == (JobStatus.failed, 1), (field, job.status, job.error)
        assert "refused by the service" in job.error and field in job.error, job.error
        with service.sessions() as s:
            assert read.stage_runs(s, job_id) == [], "no stage starts"
    assert "outside the allowed roots" in service.job(path_job).error
    assert not marker.exists(), "the job process imported the config's reward function module"
    assert service.job(good).status == JobStatus.succeeded
