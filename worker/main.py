"""The GPU worker: a plain synchronous loop that claims one job at a time and runs it in a child process.

    edgerlhf worker                       run forever
    edgerlhf worker --once                run queued jobs until none that fits its GPU is left, then exit
    edgerlhf worker --max-jobs 1          exit after one job
    edgerlhf worker --gpu 1               own GPU 1: its jobs run with CUDA_VISIBLE_DEVICES=1
    edgerlhf worker --gpu-memory-mb 8192  its GPU's memory, instead of asking nvidia-smi

Each worker owns one GPU (`worker.gpu`) and claims only jobs whose minimum GPU memory that GPU meets;
many workers, on one machine or several, share one queue (one database). Per job: claim it atomically
(`db.queue.claim_next`), start `python -m worker.job` (see there for why a process per job) with
`CUDA_VISIBLE_DEVICES` set to the worker's GPU, heartbeat from a background thread while it runs (that
thread also watches the cancel flag and kills a job process that ignores a cancel for `--cancel-grace`
seconds), and decide the final status in `finally` from how the job process ended (a crash after a cancel
request is still a failure), recording it only while the job is still this worker's. On start and every few seconds the
loop requeues jobs whose worker stopped heartbeating; they resume after their last completed stage.
SIGTERM/SIGINT stop the job process and give its job back to the queue. The worker never imports
FastAPI or torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from db import Job, JobStatus, init_db, make_engine, make_sessionmaker, queue
from db.models import MAX_GPU_MEMORY_MB
from edgerlhf.contract import job_run_dir
from edgerlhf.lifeline import die_with_parent
from edgerlhf.log import setup_logging
from edgerlhf.settings import Settings, get_settings
from worker.gpu import GPUError, WorkerGPU, resolve
from worker.job import EXIT_CANCELLED, EXIT_OK

logger = logging.getLogger("edgerlhf.worker")

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Shutdown(BaseException):
    """SIGTERM/SIGINT: stop the current job process, requeue its job, exit."""


def _kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the job process and everything it started (its own process group)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


class _Heartbeat(threading.Thread):
    """Heartbeats the job (and the worker row) and enforces cancellation while the job process runs."""

    def __init__(self, runner: JobRunner):
        super().__init__(name="heartbeat", daemon=True)
        self.runner = runner
        self.stop_event = threading.Event()
        self.lost = False
        """The job is no longer ours (another worker requeued it after a stall, or it was deleted)."""
        self.cancel_seen_at: float | None = None
        self.killed_for_cancel = False

    def run(self) -> None:
        r = self.runner
        while not self.stop_event.is_set():
            try:
                with r.sessions() as session:
                    reply = queue.heartbeat(session, r.job.id, r.worker_id)
                    queue.worker_heartbeat(session, r.worker_id, hostname=socket.gethostname(), pid=os.getpid(),
                                           state="busy", job_id=r.job.id, child_pid=r.proc.pid, **r.gpu.columns())
                if not reply.owned:
                    self.lost = True
                    logger.error("lost the job (requeued or deleted elsewhere); stopping its process",
                                 extra={"job_id": r.job.id})
                    _kill_tree(r.proc)
                    return
                if reply.cancel_requested and self.cancel_seen_at is None:
                    self.cancel_seen_at = time.monotonic()
                    logger.info("cancel requested", extra={"job_id": r.job.id})
            except Exception as exc:  # a busy database must not kill the heartbeat
                logger.warning(f"heartbeat failed: {type(exc).__name__}: {exc}", extra={"job_id": r.job.id})
            if (self.cancel_seen_at is not None and r.proc.poll() is None
                    and time.monotonic() - self.cancel_seen_at > r.cancel_grace):
                logger.warning(f"job process ignored the cancel for {r.cancel_grace:.0f}s; killing it",
                               extra={"job_id": r.job.id})
                self.killed_for_cancel = True
                _kill_tree(r.proc)
            self.stop_event.wait(min(r.heartbeat_seconds, 1.0) if self.cancel_seen_at else r.heartbeat_seconds)


class JobRunner:
    """Runs one claimed job in a child process and records how it ended."""

    def __init__(self, job: Job, sessions: sessionmaker[Session], settings: Settings, worker_id: str,
                 cancel_grace: float, gpu: WorkerGPU = WorkerGPU()):
        self.job = job
        self.sessions = sessions
        self.settings = settings
        self.worker_id = worker_id
        self.cancel_grace = cancel_grace
        self.gpu = gpu
        self.heartbeat_seconds = settings.heartbeat_seconds
        self.run_dir = job_run_dir(settings.runs_dir, job.id)
        self.result_path = self.run_dir / "worker-result.json"
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.result_path.unlink(missing_ok=True)
        env = dict(os.environ)
        # The job process must import this checkout even when the worker was started from elsewhere.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        env["EDGERLHF_DATA_DIR"] = str(self.settings.data_dir)
        if self.settings.database_url:
            env["EDGERLHF_DATABASE_URL"] = self.settings.database_url
        if self.gpu.visible_devices is not None:
            # The job sees only this worker's GPU, as its cuda:0; numbered as nvidia-smi numbers them.
            env["CUDA_VISIBLE_DEVICES"] = self.gpu.visible_devices
            env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        cmd = [sys.executable, "-m", "worker.job", "--job-id", str(self.job.id),
               "--parent-pid", str(os.getpid()), "--result", str(self.result_path)]
        # Own process group: a cancel kills the job process and whatever it started, nothing else.
        return subprocess.Popen(cmd, env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                                preexec_fn=die_with_parent())

    def _read_result(self) -> dict:
        try:
            return json.loads(self.result_path.read_text())
        except (OSError, ValueError):
            return {}

    def run(self) -> JobStatus | None:
        """Run the job to its end; returns its final status (None if the job was taken from us)."""
        job_id = self.job.id
        logger.info(f"running job {job_id} '{self.job.name}' (attempt {self.job.attempts})", extra={"job_id": job_id})
        heart: _Heartbeat | None = None
        interrupted = False
        broken: str | None = None
        code: int | None = None
        try:
            self.proc = self._start()
            heart = _Heartbeat(self)
            heart.start()
            code = self.proc.wait()
        except (Shutdown, KeyboardInterrupt):
            interrupted = True  # the job goes back to the queue
            raise
        except Exception:  # the worker could not run it (e.g. cannot create its run directory): fail, go on
            broken = traceback.format_exc()
            logger.exception("could not run the job", extra={"job_id": job_id})
        finally:
            if heart is not None:
                heart.stop_event.set()
                heart.join(timeout=10)
            if self.proc is not None and self.proc.poll() is None:
                _kill_tree(self.proc, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    _kill_tree(self.proc)
                    self.proc.wait()
            if self.proc is not None:
                _kill_tree(self.proc)  # leftovers of the job's process group, if any
                code = self.proc.returncode
            status = self._record_end(code, interrupted, heart, broken)
        return status

    def _outcome(self, code: int | None, interrupted: bool, heart: _Heartbeat | None, result: dict) -> JobStatus:
        """How the job ended, from what its process did; a pending cancel request alone decides nothing."""
        if code == EXIT_OK and result.get("status") == "succeeded":
            return JobStatus.succeeded
        if code == EXIT_CANCELLED:  # it saw the cancel and stopped between steps
            return JobStatus.cancelled
        if result.get("error"):  # it crashed by itself, cancel or not: keep its error and traceback
            return JobStatus.failed
        if heart is not None and heart.killed_for_cancel:
            return JobStatus.cancelled
        if interrupted:  # we stopped it because the worker is stopping: back to the queue, unless unwanted
            with self.sessions() as session:
                return JobStatus.cancelled if queue.cancel_requested(session, self.job.id) else JobStatus.queued
        return JobStatus.failed

    def _record_end(self, code: int | None, interrupted: bool, heart: _Heartbeat | None,
                    broken: str | None = None) -> JobStatus | None:
        job_id = self.job.id
        extra = {"job_id": job_id}
        if heart is not None and heart.lost:
            return None
        result = self._read_result()
        if broken is not None:
            result = {"error": f"the worker could not run the job: {broken.strip().splitlines()[-1]}",
                      "traceback": broken}
        status = JobStatus.failed if broken is not None else self._outcome(code, interrupted, heart, result)
        error = result.get("error")
        if status == JobStatus.failed and not error:
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
            hint = " (out of memory?)" if code == -signal.SIGKILL else ""
            error = f"job process {how}{hint}"
        # Each write is compare-and-set on (running, this worker): it fails if the job was requeued after a
        # missed heartbeat, and whoever owns it now records its outcome; we write and log nothing.
        with self.sessions() as session:
            if status == JobStatus.succeeded:
                owned = queue.finish(session, job_id, self.worker_id)
            elif status == JobStatus.cancelled:
                owned = queue.mark_cancelled(session, job_id, self.worker_id)
            elif status == JobStatus.queued:
                owned = queue.release(session, job_id, self.worker_id)
            else:
                owned = queue.fail(session, job_id, error, result.get("traceback"), self.worker_id)
        if not owned:
            logger.warning(f"the job is no longer this worker's (requeued or taken over meanwhile): not "
                           f"recording it {status.value}; its owner records the outcome", extra=extra)
            return None
        if status == JobStatus.failed:
            logger.error(f"job failed: {error}", extra=extra)
        elif status == JobStatus.queued:
            logger.warning("worker stopping: job requeued", extra=extra)
        else:
            logger.info(f"job {status.value}", extra=extra)
        return status


class Worker:
    """The loop: requeue stalled jobs, claim, run, repeat."""

    def __init__(self, settings: Settings, worker_id: str | None = None, poll_interval: float = 1.0,
                 cancel_grace: float = 10.0, gpu: WorkerGPU = WorkerGPU()):
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.poll_interval = poll_interval
        self.cancel_grace = cancel_grace
        self.gpu = gpu
        self.engine = make_engine(settings.db_url)
        init_db(self.engine)
        self.sessions = make_sessionmaker(self.engine)
        self._next_requeue = 0.0
        self._next_beat = 0.0

    def _beat(self, state: str = "idle") -> None:
        if time.monotonic() < self._next_beat:
            return
        self._next_beat = time.monotonic() + self.settings.heartbeat_seconds
        with self.sessions() as session:
            queue.worker_heartbeat(session, self.worker_id, hostname=socket.gethostname(), pid=os.getpid(),
                                   state=state, **self.gpu.columns())

    def _requeue_stalled(self) -> None:
        if time.monotonic() < self._next_requeue:
            return
        # Often enough that a stalled job waits little more than stall_seconds, cheap enough to not matter.
        self._next_requeue = time.monotonic() + max(1.0, min(self.settings.stall_seconds / 3, 10.0))
        with self.sessions() as session:
            queue.requeue_stalled(session, self.settings.stall_seconds, self.settings.max_attempts)

    def run_one(self) -> JobStatus | None | bool:
        """Claim and run one job; False when no queued job fits this worker's GPU."""
        self._requeue_stalled()
        with self.sessions() as session:
            job = queue.claim_next(session, self.worker_id, self.gpu.memory_mb)
        if job is None:
            return False
        return JobRunner(job, self.sessions, self.settings, self.worker_id, self.cancel_grace, self.gpu).run()

    def run(self, once: bool = False, max_jobs: int | None = None) -> int:
        logger.info(f"worker {self.worker_id} started on {self.settings.db_url_for_logs} with {self.gpu.describe()}")
        done = 0
        try:
            while max_jobs is None or done < max_jobs:
                try:
                    self._beat()
                    ran = self.run_one()
                except Shutdown:
                    raise
                except Exception:  # the database hiccuped, a result could not be recorded ...: keep serving
                    logger.exception("worker loop error; continuing")
                    time.sleep(self.poll_interval)
                    continue
                if ran is False:
                    if once:
                        break
                    time.sleep(self.poll_interval)
                    continue
                done += 1
        except (Shutdown, KeyboardInterrupt):
            logger.info("worker stopping")
        finally:
            try:
                with self.sessions() as session:
                    queue.worker_stopped(session, self.worker_id)
            except Exception:
                logger.exception("could not mark the worker stopped")
            self.engine.dispose()
        logger.info(f"worker {self.worker_id} stopped after {done} job(s)")
        return 0


def _install_signal_handlers() -> None:
    def handler(signum, _frame):
        raise Shutdown(signal.Signals(signum).name)

    try:
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (embedded use): the caller handles shutdown
        pass


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _memory(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_GPU_MEMORY_MB:
        raise argparse.ArgumentTypeError(f"must be in [1, {MAX_GPU_MEMORY_MB}] (MB), got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgerlhf worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--once", action="store_true",
                        help="run queued jobs until none that fits this worker's GPU is left, then exit")
    parser.add_argument("--max-jobs", type=int, default=None, help="exit after running this many jobs")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between queue polls when idle")
    parser.add_argument("--cancel-grace", type=float, default=10.0,
                        help="seconds a job process gets to stop after a cancel before it is killed")
    parser.add_argument("--worker-id", default=None, help="name in the database (default <hostname>:<pid>)")
    parser.add_argument("--gpu", type=_count, default=None, metavar="N",
                        help="the GPU this worker owns (nvidia-smi's index); its jobs run with CUDA_VISIBLE_DEVICES=N "
                             "(default: the first of CUDA_VISIBLE_DEVICES, else GPU 0 if there is one)")
    parser.add_argument("--gpu-memory-mb", type=_memory, default=None, metavar="M",
                        help="the GPU's memory in MB (default: nvidia-smi's memory.total; unknown without nvidia-smi); "
                             "the worker claims only jobs whose min_gpu_memory_mb it meets")
    args = parser.parse_args(argv)

    settings = get_settings()
    setup_logging("worker", settings.log_level)
    try:
        gpu = resolve(args.gpu, args.gpu_memory_mb, os.environ)
    except GPUError as exc:
        print(f"edgerlhf worker: {exc}", file=sys.stderr)
        return 2
    _install_signal_handlers()
    worker = Worker(settings, worker_id=args.worker_id, poll_interval=args.poll_interval,
                    cancel_grace=args.cancel_grace, gpu=gpu)
    return worker.run(once=args.once, max_jobs=args.max_jobs)


if __name__ == "__main__":
    sys.exit(main())
