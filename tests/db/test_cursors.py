"""The cursor pages never miss or repeat a row, with writer processes inserting a job's rows concurrently.

On PostgreSQL, ids from a sequence commit out of order: a transaction that drew id 118 can commit after
one that drew id 120, and a reader that already passed 120 would never see 118. A job's rows are numbered
under a lock on the job row instead (`db.read`'s docstring). With the old global-id cursor this test failed on
PostgreSQL in 12 runs of 12, the reader missing 2-57 of the 4,800 metric rows and some samples and log lines
each time (SQLite passed: one writer at a time); it passes on both engines now. The reader is the real
backend route.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

from fastapi.testclient import TestClient

from backend.main import create_app
from db import queue
from edgerlhf.settings import Settings

from tests.support.procs import REPO_ROOT

WRITER = r"""
import sys, time
from pathlib import Path
from db import make_engine, make_sessionmaker, queue
url, job_id, w, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ready, go = Path(sys.argv[5]), Path(sys.argv[6])
name = f"w{w}"
sessions = make_sessionmaker(make_engine(url))
with sessions() as s:
    queue.touch(s)
ready.touch()
while not go.exists():
    time.sleep(0.001)
for b in range(batches):
    # One batch as the worker's context writes it: metrics, a sample and log lines in one transaction.
    with sessions() as s:
        queue.record(s, job_id,
                     metrics=[("sft", f"{name}/m", b * 4 + i, float(b), time.time()) for i in range(4)],
                     samples=[{"stage": "sft", "kind": "sample", "checkpoint": None, "step": b, "seq": w,
                               "prompt": name, "response": str(b), "reward": None, "time": time.time()}],
                     logs=[(time.time(), "info", "sft", f"{name} batch {b} line {i}") for i in range(2)],
                     progress=("sft", b / batches, b / batches))
"""
WRITERS = 3
BATCHES = 400
"""Enough that the old cursor missed rows in every run (150 batches: in about two runs of three)."""
PAGE = 40
"""Small pages: the reader follows the cursor through many of them while the writers go on."""


def _start_writers(db_url: str, job_id: int, tmp_path) -> list[subprocess.Popen]:
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(WRITERS)]
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, db_url, str(job_id), str(i), str(BATCHES),
                               str(ready[i]), str(go)], cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
             for i in range(WRITERS)]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready):
        assert time.monotonic() < deadline, "the writers never got ready"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    go.touch()
    return procs


def test_a_reader_following_the_cursors_gets_every_row_of_concurrent_writers_exactly_once(db_url, tmp_path):
    app = create_app(Settings(data_dir=tmp_path / "data", database_url=db_url, api_token=None))
    with TestClient(app, base_url="http://localhost") as client:
        with app.state.sessions() as s:
            job_id = queue.create_job(s, name="cursors", preset="tiny", config={"stages": ["sft"]}).id
            queue.claim_next(s, "w")
        procs = _start_writers(db_url, job_id, tmp_path)
        seen: dict[str, list] = {"metrics": [], "samples": [], "logs": []}
        cursors = dict.fromkeys(seen, 0)
        pages = 0

        def follow() -> None:
            nonlocal pages
            for kind in seen:
                while True:
                    page = client.get(f"/api/jobs/{job_id}/{kind}", params={"after": cursors[kind], "limit": PAGE})
                    assert page.status_code == 200, page.text
                    body = page.json()
                    seen[kind] += body["items"]
                    cursors[kind] = body["cursor"]
                    pages += 1
                    if not body["more"]:
                        break

        while any(p.poll() is None for p in procs):  # read while they write
            follow()
        for p in procs:
            assert p.wait(timeout=60) == 0, p.stderr.read()
        follow()  # and the rest, once they are done
    app_rows = {"metrics": [(m["key"], m["step"]) for m in seen["metrics"]],
                "samples": [(x["prompt"], x["step"]) for x in seen["samples"]],
                "logs": [line["message"] for line in seen["logs"] if " batch " in line["message"]]}
    expected = {"metrics": [(f"w{w}/m", b * 4 + i) for w in range(WRITERS) for b in range(BATCHES) for i in range(4)],
                "samples": [(f"w{w}", b) for w in range(WRITERS) for b in range(BATCHES)],
                "logs": [f"w{w} batch {b} line {i}" for w in range(WRITERS) for b in range(BATCHES) for i in range(2)]}
    report = {}
    for kind, rows in app_rows.items():
        counts = Counter(rows)
        missed = set(expected[kind]) - set(counts)
        repeated = {row: n for row, n in counts.items() if n > 1}
        report[kind] = {"written": len(expected[kind]), "received": len(rows), "missed": len(missed),
                        "repeated": len(repeated)}
    assert pages > 3 * WRITERS, "the reader must have followed the cursor while the writers wrote"
    assert all(r["missed"] == 0 and r["repeated"] == 0 for r in report.values()), json.dumps(report)
    # Within a job, the rows arrive in the order they were written (each writer's own rows included).
    for w in range(WRITERS):
        mine = [step for key, step in app_rows["metrics"] if key == f"w{w}/m"]
        assert mine == sorted(mine)
