"""The job process: runs one claimed job's pipeline and exits. Started by the worker, one per job.

Every tensor, CUDA context and data loader of a job lives in this process, so when it ends (finished,
cancelled, killed) the operating system takes all of it back: nothing of a stopped job survives in the
long-lived worker. It dies with its worker too (Linux `PR_SET_PDEATHSIG`, and a watchdog thread for the
case the worker died before that was set), so a `kill -9` of the worker leaves no orphan training on.

    python -m worker.job --job-id 12 --parent-pid 4711 --result /path/result.json

Exit code 0: succeeded, 3: cancelled, 1: failed; the result file says why (error and traceback).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CANCELLED = 3

logger = logging.getLogger("edgerlhf.worker")


def _die_with_parent(parent_pid: int) -> None:
    try:  # ask the kernel to SIGKILL us when the worker dies (Linux only)
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(EXIT_FAILED)
            time.sleep(1.0)

    if os.getppid() != parent_pid:  # the worker died before prctl took effect
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


def _write_result(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)


def run(job_id: int) -> tuple[int, dict]:
    """Run job `job_id` to its end here; returns (exit code, result)."""
    from db import make_engine, make_sessionmaker, queue, read
    from edgerlhf.config import PipelineConfig
    from edgerlhf.context import Cancelled
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
            config_dict, attempt = job.config, job.attempts
            skip = queue.completed_stages(session, job_id)
        config = PipelineConfig.from_dict(config_dict)
        if config.device == "auto" and settings.device != "auto":
            config.device = settings.device  # the worker's settings pin the device of jobs that leave it open
        memory_device = "cpu" if config.device == "cpu" else None

        run_dir = settings.runs_dir / f"job-{job_id}"
        ctx = DBContext(sessions, job_id, run_dir, stages=config.stages, attempt=attempt,
                        memory_device=memory_device)
        try:
            with ctx:
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

    _die_with_parent(args.parent_pid)
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
