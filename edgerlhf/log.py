"""Readable logs: one line per event with time, component and job id.

    2026-11-24 09:12:03 worker   job=12 INFO  stage ppo started
"""

from __future__ import annotations

import logging
import os
import sys


class _Fields(logging.Filter):
    def __init__(self, component: str):
        super().__init__()
        self.component = component

    def filter(self, record: logging.LogRecord) -> bool:
        record.component = self.component
        job_id = getattr(record, "job_id", None)
        record.job = f"job={job_id}" if job_id is not None else "job=-"
        return True


def setup_logging(component: str, level: str = "INFO") -> None:
    """Route every log record of this process to stderr in the one-line format, tagged `component`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Fields(component))
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(component)-8s %(job)-7s %(levelname)-5s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "urllib3", "watchdog", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not os.environ.get("EDGERLHF_VERBOSE"):  # `edgerlhf up --verbose`: every library's warnings too
        # bitsandbytes warns on every CPU process that an optional kernel package is missing: expected here.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
