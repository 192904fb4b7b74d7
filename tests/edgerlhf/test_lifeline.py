"""`edgerlhf.lifeline` with real processes: a supervisor is `kill -9`ed and what it started goes with it."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from tests.support.procs import REPO_ROOT

# A child that starts a grandchild in its own process group (as streamlit or uvicorn could) and waits.
CHILD = ("import subprocess, sys, time; "
         "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
         "print(g.pid, flush=True); time.sleep(600)")

SUPERVISOR = r"""
import subprocess, sys, time
from edgerlhf.lifeline import Reaper, die_with_parent
mode, child_code = sys.argv[1], sys.argv[2]
if mode == "reaper":
    reaper = Reaper()
child = subprocess.Popen([sys.executable, "-c", child_code], start_new_session=True,
                         preexec_fn=die_with_parent() if mode == "pdeathsig" else None)
if mode == "reaper":
    reaper.watch(child.pid)
print(child.pid, flush=True)
time.sleep(600)
"""


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def supervise_and_kill(mode: str, child_code: str, n_descendants: int, wait: float = 20) -> list[psutil.Process]:
    """Start a supervisor in `mode`, wait until it and its descendants run, SIGKILL it; the descendants
    still alive `wait` seconds later (a generous deadline: they are polled, not waited for)."""
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, mode, child_code], cwd=REPO_ROOT,
                                  stdout=subprocess.PIPE, text=True)
    try:
        supervisor.stdout.readline()  # the child runs
        deadline = time.monotonic() + 30
        while len(descendants := psutil.Process(supervisor.pid).children(recursive=True)) < n_descendants:
            assert time.monotonic() < deadline, f"only {descendants} started"
            time.sleep(0.05)
    finally:
        supervisor.kill()
        supervisor.wait()
    deadline = time.monotonic() + wait
    while alive(descendants) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = alive(descendants)
    for p in left:  # do not leave them to the next test
        p.kill()
    return left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_a_child_started_with_die_with_parent_is_killed_with_its_parent():
    left = supervise_and_kill("pdeathsig", "import time; time.sleep(600)", n_descendants=1)
    assert not left, f"left behind: {[p.cmdline() for p in left]}"


def test_the_reaper_kills_the_process_groups_of_its_dead_supervisor_grandchildren_included():
    # The child, its grandchild and the reaper itself.
    left = supervise_and_kill("reaper", CHILD, n_descendants=3)
    assert not left, f"left behind: {[p.cmdline() for p in left]}"


def test_without_a_lifeline_the_children_outlive_their_supervisor():
    # The control: the two tests above can only pass because of the lifeline.
    left = supervise_and_kill("none", "import time; time.sleep(600)", n_descendants=1, wait=2)
    assert len(left) == 1
