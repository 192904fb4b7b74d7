"""The queue functions on a real database, SQLite and PostgreSQL (`db_url`): atomic claims across processes,
replace-on-resume metrics, stall detection, and the rules of cancel / retry / delete."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text, update

from db import JobStateError, JobStatus, StageStatus, queue, read
from db.models import Job, LogLine, Metric, Sample, StageRun, utcnow

from tests.support.db import sqlite_only
from tests.support.procs import REPO_ROOT

CLAIMER = r"""
import json, sys, time
from pathlib import Path
from db import make_engine, make_sessionmaker, queue, read
url, worker, ready, go, hold = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), float(sys.argv[5])
sessions = make_sessionmaker(make_engine(url))
with sessions() as s:
    queue.touch(s)  # connect (and set the pragmas) before the start line, not after it
ready.touch()
while not go.exists():  # a start barrier: neither process claims before both are ready
    time.sleep(0.001)
claimed = []
while True:
    with sessions() as s:
        job = queue.claim_next(s, worker)
        # None also when it lost every race of one call: stop only once the queue is really empty.
        if job is None and not read.queue_positions(s):
            break
    if job is not None:
        claimed.append(job.id)
        # "Run" it for a moment, as a worker does: SQLite's lock is not fair, and a claimer looping
        # without a pause can hold it so often that the others never get it (the race is still real:
        # all keep going for the oldest queued job).
        time.sleep(hold)
print(json.dumps(claimed))
"""


def make_jobs(sessions, n: int) -> list[int]:
    with sessions() as s:
        return [queue.create_job(s, name=f"j{i}", preset="tiny", config={"stages": ["data"]}).id for i in range(n)]


# Claiming them all takes far longer than the processes need to get past the barrier: 200 jobs "run" for 1 ms,
# or 40 for 20 ms (on PostgreSQL the claimers skip each other's locked candidate: FOR UPDATE SKIP LOCKED).
@pytest.mark.parametrize("processes, jobs, hold", [(2, 200, 0.001), (4, 40, 0.02)], ids=["2x200", "4x40"])
def test_processes_race_to_claim_jobs_and_each_job_is_claimed_exactly_once(sessions, db_url, tmp_path,
                                                                          processes, jobs, hold):
    ids = make_jobs(sessions, jobs)
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-w{i}" for i in range(processes)]
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, db_url, f"w{i}", str(ready[i]), str(go), str(hold)],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready):
        assert time.monotonic() < deadline, "the claimers never got ready"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    go.touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert all(outs), f"every process must win some claims for this to be a race: {[len(o) for o in outs]}"
    claimed = [job_id for out in outs for job_id in out]
    assert len(claimed) == len(set(claimed)), f"claimed twice: {[i for i in set(claimed) if claimed.count(i) > 1]}"
    assert sorted(claimed) == ids
    with sessions() as s:
        rows = {j.id: j for j in s.scalars(select(Job)).all()}
        claim_logs = Counter(s.scalars(select(LogLine.job_id).where(LogLine.message.startswith("claimed by"))).all())
    for i, out in enumerate(outs):
        for job_id in out:
            assert rows[job_id].status == JobStatus.running
            assert rows[job_id].worker_id == f"w{i}"
            assert rows[job_id].attempts == 1
    assert claim_logs == dict.fromkeys(ids, 1), "one claim log line per job: no claim was undone half-way"


def test_claim_takes_oldest_first_and_returns_none_when_empty(sessions):
    ids = make_jobs(sessions, 3)
    with sessions() as s:
        assert read.queue_positions(s) == {ids[0]: 1, ids[1]: 2, ids[2]: 3}
        assert queue.claim_next(s, "w").id == ids[0]
        assert read.queue_positions(s) == {ids[1]: 1, ids[2]: 2}
        assert queue.claim_next(s, "w").id == ids[1]
        assert queue.claim_next(s, "w").id == ids[2]
        assert queue.claim_next(s, "w") is None


def test_rewritten_metric_points_replace_the_old_ones_with_new_cursors(sessions):
    (job_id,) = make_jobs(sessions, 1)
    with sessions() as s:
        queue.claim_next(s, "w")
        queue.record(s, job_id, metrics=[("sft", "sft/loss", step, 10.0 - step, 0.0) for step in range(1, 6)])
        first = read.metrics_after(s, job_id)
        cursor = first[-1].row_seq
        # A resumed stage logs steps 3..7 again (3..5 with different values).
        queue.record(s, job_id, metrics=[("sft", "sft/loss", step, 100.0 + step, 0.0) for step in range(3, 8)])
        # The same point twice in one batch: the last value wins.
        queue.record(s, job_id, metrics=[("sft", "sft/lr", 1, 1.0, 0.0), ("sft", "sft/lr", 1, 2.0, 0.0)])
        points = read.metric_points(s, job_id, "sft/loss")
        assert points == [("sft", 1, 9.0), ("sft", 2, 8.0)] + [("sft", st, 100.0 + st) for st in range(3, 8)]
        newer = read.metrics_after(s, job_id, after=cursor, keys=["sft/loss"])
        assert [m.step for m in newer] == [3, 4, 5, 6, 7], "a cursor reader must see the rewritten points"
        assert read.metric_points(s, job_id, "sft/lr") == [("sft", 1, 2.0)]
        # Replacing the newest row gives the new one a new, larger number (and a fresh id: SQLite AUTOINCREMENT).
        newest = read.metrics_after(s, job_id)[-1]
        queue.record(s, job_id, metrics=[("sft", "sft/lr", 1, 3.0, 0.0)])
        (replaced,) = read.metrics_after(s, job_id, after=newest.row_seq)
        assert replaced.value == 3.0 and replaced.id > newest.id
        # Non-finite values are stored as NULL instead of breaking JSON.
        queue.record(s, job_id, metrics=[("sft", "sft/loss", 8, float("nan"), 0.0),
                                          ("sft", "sft/loss", 9, float("inf"), 0.0)])
        assert read.metric_points(s, job_id, "sft/loss")[-2:] == [("sft", 8, None), ("sft", 9, None)]


def test_resampled_samples_replace_by_position(sessions):
    (job_id,) = make_jobs(sessions, 1)
    row = dict(stage="sft", kind="sample", checkpoint=None, step=30, prompt="p", response="r", reward=1.0, time=0.0)
    with sessions() as s:
        queue.record(s, job_id, samples=[{**row, "seq": 0}, {**row, "seq": 1}])
        queue.record(s, job_id, samples=[{**row, "seq": 0, "response": "again"}])
        got = read.samples_after(s, job_id)
        assert sorted((x.seq, x.response) for x in got) == [(0, "again"), (1, "r")]


def _age_heartbeat(sessions, job_id: int, seconds: float) -> None:
    with sessions() as s:
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))
        s.commit()


def test_requeue_stalled_requeues_then_fails_after_max_attempts(sessions):
    job_a, job_b, job_c = make_jobs(sessions, 3)
    with sessions() as s:
        for _ in range(3):
            queue.claim_next(s, "dead")
        queue.begin_stage(s, job_a, "data", 1)
        queue.end_stage(s, job_a, "data", {"pairs": 3})
        queue.begin_stage(s, job_a, "sft", 1)
        queue.request_cancel(s, job_c)
    _age_heartbeat(sessions, job_a, 60)
    _age_heartbeat(sessions, job_c, 60)
    with sessions() as s:  # job_b heartbeats recently: left alone
        done = dict(queue.requeue_stalled(s, stall_seconds=30, max_attempts=2))
        assert done == {job_a: JobStatus.queued, job_c: JobStatus.cancelled}
        a = read.get_job(s, job_a)
        assert a.status == JobStatus.queued and a.worker_id is None
        runs = {r.stage: r.status for r in read.stage_runs(s, job_a)}
        assert runs == {"data": StageStatus.succeeded, "sft": StageStatus.interrupted}
        assert queue.completed_stages(s, job_a) == {"data"}
        assert read.get_job(s, job_b).status == JobStatus.running
        # The dead worker's late heartbeat and final write are refused: the job is not its own any more.
        assert not queue.heartbeat(s, job_a, "dead").owned
        assert not queue.finish(s, job_a, "dead")
        # Second attempt stalls too: with max_attempts=2 the job fails.
        assert queue.claim_next(s, "w2").id == job_a
    _age_heartbeat(sessions, job_a, 60)
    with sessions() as s:
        assert queue.requeue_stalled(s, stall_seconds=30, max_attempts=2) == [(job_a, JobStatus.failed)]
        a = read.get_job(s, job_a)
        assert a.status == JobStatus.failed and "gave up after 2 attempts" in a.error


def test_cancel_retry_delete_rules(sessions):
    running, done, queued = make_jobs(sessions, 3)
    with sessions() as s:
        assert queue.claim_next(s, "w").id == running
        assert queue.claim_next(s, "w").id == done
        queue.record(s, done, metrics=[("data", "data/pairs", 0, 1.0, 0.0)])
        assert queue.finish(s, done, "w")

        with pytest.raises(JobStateError):
            queue.delete_job(s, running)
        with pytest.raises(JobStateError):
            queue.retry(s, running)
        assert queue.request_cancel(s, running).cancel_requested
        assert read.get_job(s, running).status == JobStatus.running  # its worker stops it
        assert queue.heartbeat(s, running, "w").cancel_requested
        assert queue.mark_cancelled(s, running, "w")
        with pytest.raises(JobStateError):
            queue.request_cancel(s, running)
        job = queue.retry(s, running)
        assert job.status == JobStatus.queued and not job.cancel_requested and job.attempts == 0

        assert queue.request_cancel(s, queued).status == JobStatus.cancelled  # at once: no worker involved
        with pytest.raises(JobStateError):
            queue.request_cancel(s, done)
        queue.delete_job(s, done)
        assert read.get_job(s, done) is None
        for model in (Metric, LogLine, StageRun, Sample):
            assert s.scalar(select(func.count()).select_from(model).where(model.job_id == done)) == 0


def test_release_gives_the_attempt_back(sessions):
    (job_id,) = make_jobs(sessions, 1)
    with sessions() as s:
        queue.claim_next(s, "w")
        assert queue.release(s, job_id, "w")
        job = read.get_job(s, job_id)
        assert job.status == JobStatus.queued and job.attempts == 0


@sqlite_only
def test_sqlite_runs_in_wal_mode(sessions):
    with sessions() as s:
        assert s.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert s.execute(text("PRAGMA busy_timeout")).scalar() >= 1000
