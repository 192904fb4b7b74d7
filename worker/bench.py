"""Metric write throughput on a real database: one transaction per number vs the worker's batched context.

    python -m worker.bench [--rows 20000] [--dir /tmp/edgerlhf-bench]     # a SQLite file
    python -m worker.bench --url postgresql+psycopg://user:pass@host/db     # an (empty, scratch) PostgreSQL database

Prints rows per second for (1) `db.queue.record` with one metric per transaction, the naive way, and
(2) `worker.context.DBContext`, which buffers `log_metric` calls and writes them from a background
thread; for (2) it also prints what a `log_metric` call costs the training loop.
A measuring tool beside what it measures (`worker.context`); nothing in the service imports it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from db import init_db, make_engine, make_sessionmaker, queue


def _job(sessions) -> int:
    with sessions() as s:
        job = queue.create_job(s, name="bench", preset="tiny", config={"stages": ["sft"]})
        queue.claim_next(s, "bench")
        return job.id


def unbatched(sessions, rows: int) -> float:
    job_id = _job(sessions)
    start = time.perf_counter()
    with sessions() as s:
        for step in range(rows):
            queue.record(s, job_id, metrics=[("sft", "sft/loss", step, 1.0 / (step + 1), time.time())])
    return rows / (time.perf_counter() - start)


def batched(sessions, rows: int, run_dir: Path) -> tuple[float, float]:
    from worker.context import DBContext

    job_id = _job(sessions)
    ctx = DBContext(sessions, job_id, run_dir, stages=["sft"], memory_interval=0)
    ctx.start()
    ctx.stage = "sft"
    start = time.perf_counter()
    for step in range(rows):
        ctx.log_metric("sft/loss", 1.0 / (step + 1), step)
    in_loop = time.perf_counter() - start
    ctx.close()  # waits for the last batch
    total = time.perf_counter() - start
    return rows / total, in_loop / rows * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--dir", type=Path, default=None, help="where the SQLite file goes (default: a temp dir)")
    parser.add_argument("--url", default=None, help="a database URL instead of the SQLite file (its jobs are kept)")
    args = parser.parse_args(argv)
    directory = args.dir or Path(tempfile.mkdtemp(prefix="edgerlhf-bench-"))
    engine = make_engine(args.url or f"sqlite:///{directory / 'bench.db'}")
    init_db(engine)
    sessions = make_sessionmaker(engine)
    naive_rows = min(args.rows, 2_000)  # the naive way is slow; a sample is enough for its rate
    naive = unbatched(sessions, naive_rows)
    fast, per_call_us = batched(sessions, args.rows, directory / "run")
    print(f"database: {engine.dialect.name}")
    print(f"unbatched (1 transaction per metric): {naive:,.0f} rows/s  ({naive_rows} rows)")
    print(f"batched (DBContext, background flush): {fast:,.0f} rows/s  ({args.rows} rows); "
          f"log_metric costs the training loop {per_call_us:.1f} us per call")
    print(f"speed-up: {fast / naive:.0f}x")
    engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
