"""The job process: runs one claimed job's pipeline and exits. Started by the worker, one per job.

Every tensor, CUDA context and data loader of a job lives in this process, so when it ends (finished,
cancelled, killed) the operating system takes all of it back: nothing of a stopped job survives in the
long-lived worker. It dies with its worker too (the worker starts it with `edgerlhf.lifeline.die_with_parent`,
Linux's `PR_SET_PDEATHSIG`; a watchdog thread here covers other systems), so a `kill -9` of the worker
leaves no orphan training on. A job that names a device this machine lacks (`cuda:99`, or `cuda` without
CUDA) fails before its first stage, with the devices there are. So does a job whose config the service would not
have queued (`edgerlhf.config.service_problems`: a local path outside the allowed roots, an import-path reward
function): the config comes from the database, and whoever can write there is not trusted to run code here. Hub
downloads are bounded by `EDGERLHF_MAX_DOWNLOAD_BYTES` (`edgerlhf.locations.set_download_limit`). A job that continues
another (the next round of RLHF, `Job.parent_id`) reads its parent's run directory where this worker finds run
directories (`contract.job_run_dir` under its data dir), whatever path the backend that queued it saw.

    python -m worker.job --job-id 12 --parent-pid 4711 --result /path/result.json

Exit code 0: succeeded, 3: cancelled, 1: failed; the result file says why (error and traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CANCELLED = 3

logger = logging.getLogger("edgerlhf.worker")


class DeviceUnavailable(RuntimeError):
    """The job asks for a device this machine does not have."""


class JobRefused(ValueError):
    """The job's config asks for what the service refuses (the checks the backend runs before queueing a job)."""


def _watch_parent(parent_pid: int) -> None:
    """Exit when the worker is gone: the fallback for systems without `PR_SET_PDEATHSIG`."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(EXIT_FAILED)
            time.sleep(1.0)

    if os.getppid() != parent_pid:  # the worker died before the watch began
        os._exit(EXIT_FAILED)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _tag_records_with_job(job_id: int) -> None:
    """Every log line of this process names the job (log.py prints `job=<id>`)."""

    def tag(record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id
        return True

    for handler in logging.getLogger().handlers:
        handler.filters.insert(0, tag)  # before log.py's filter formats the job field


def check_device(device: str) -> None:
    """Raise `DeviceUnavailable` unless `device` (`auto`, `cpu`, `cuda`, `cuda:N`) exists here.

    Asked of the torch that will run the job, in the job's environment (`CUDA_VISIBLE_DEVICES` included),
    so the answer is the one training would get, not a guess from outside (nvidia-smi knows no ROCm).
    """
    if not device.startswith("cuda"):
        return  # `cpu` always exists; `auto` falls back to it
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = device.partition(":")[2] or "0"  # plain `cuda` is cuda:0
    if index.isdigit() and int(index) < count:
        return
    have = ", ".join(["cpu", *(f"cuda:{i}" for i in range(count))])
    why = "" if count else f" (torch {torch.__version__} sees no CUDA device)"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = socket.gethostname() + (f", CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "")
    raise DeviceUnavailable(f"device {device!r} was asked for, but this machine ({where}) does not have it; "
                            f"available: {have}{why}")


def _write_result(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)


def run(job_id: int) -> tuple[int, dict]:
    """Run job `job_id` to its end here; returns (exit code, result)."""
    from db import make_engine, make_sessionmaker, queue, read
    from edgerlhf import locations
    from edgerlhf.config import PipelineConfig, service_problems
    from edgerlhf.context import Cancelled
    from edgerlhf.contract import job_run_dir
    from edgerlhf.settings import get_settings
    from worker.context import DBContext

    settings = get_settings()
    engine = make_engine(settings.db_url)
    sessions = make_sessionmaker(engine)
    try:
        with sessions() as session:
            job = read.get_job(session, job_id)
            if job is None:
                return EXIT_FAILED, {"status": "failed", "error": f"job {job_id} not found"}
            config_dict, attempt, parent_id = job.config, job.attempts, job.parent_id
            skip = queue.completed_stages(session, job_id)
        config = PipelineConfig.from_dict(config_dict)  # the config's own checks (ranges, names, data.data_dir ...)
        if parent_id is not None:  # the next round: the parent's run directory is found as this job's own is
            config.round.parent_run = str(job_run_dir(settings.runs_dir, parent_id))
        problems = service_problems(config, [*settings.allowed_roots, settings.data_dir], settings.allowed_judge_urls)
        if problems:  # before anything of the config is used: no path read, no module imported
            raise JobRefused("this job's config is refused by the service: "
                             + "; ".join(f"{field}: {message}" for field, _, message in problems))
        locations.set_download_limit(settings.max_download_bytes)
        if config.device == "auto" and settings.device != "auto":
            config.device = settings.device  # the worker's settings pin the device of jobs that leave it open
        check_device(config.device)  # before any stage: a missing device is this job's error, not a retry
        memory_device = None if config.device == "auto" else config.device  # what the sampler reads

        run_dir = job_run_dir(settings.runs_dir, job_id)
        ctx = DBContext(sessions, job_id, run_dir, stages=config.stages, attempt=attempt,
                        memory_device=memory_device)
        try:
            with ctx:
                # Which machine and GPU ran this attempt: with many workers, the first question about a job.
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                ctx.log(f"job process on {socket.gethostname()} (pid {os.getpid()}), device {config.device}, "
                        + (f"CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "every GPU visible"))
                todo = [s for s in config.stages if s not in skip]
                if skip:
                    ctx.log(f"resuming attempt {attempt}: stage(s) {', '.join(s for s in config.stages if s in skip)} "
                            f"already done, running {', '.join(todo) or 'nothing'}")
                from edgerlhf.pipeline import run_pipeline

                run_pipeline(config, ctx, skip=set(skip))
        except Cancelled:
            return EXIT_CANCELLED, {"status": "cancelled"}
        return EXIT_OK, {"status": "succeeded"}
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the worker
        message = f"{type(exc).__name__}: {exc}".strip()
        logger.error(f"job failed: {message}", extra={"job_id": job_id}, exc_info=True)  # traceback to the log
        return EXIT_FAILED, {"status": "failed", "error": message, "traceback": traceback.format_exc()}
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.job", description=__doc__.split("\n\n")[0])
    parser.add_argument("--job-id", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True, help="exit when this process (the worker) dies")
    parser.add_argument("--result", type=Path, required=True, help="JSON file to write the outcome to")
    args = parser.parse_args(argv)

    _watch_parent(args.parent_pid)
    from edgerlhf.log import setup_logging
    from edgerlhf.settings import get_settings

    setup_logging("job", get_settings().log_level)
    _tag_records_with_job(args.job_id)
    code, result = run(args.job_id)
    _write_result(args.result, result)
    return code


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: stray non-daemon threads of libraries must not keep a finished job alive.
    os._exit(code)
