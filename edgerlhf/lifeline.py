"""Child processes that die with their supervisor: the one mechanism the worker (for its job process) and
`edgerlhf up` (for backend, worker and dashboard) share.

* `die_with_parent()` is a `preexec_fn` for `subprocess.Popen`: between fork and exec the child asks the
  Linux kernel to SIGKILL it when its parent dies (`prctl(PR_SET_PDEATHSIG)`, as `tini -p` and
  `bubblewrap --die-with-parent` do). Set before exec, it holds for whatever program the child runs
  (uvicorn, streamlit, `python -m worker.job`), even one that never imports this project. It does not
  reach the child's own children, and other systems have no such call; hence the second layer:
* `Reaper` starts a tiny process that is told the process groups of a supervisor's children through a
  pipe and SIGKILLs those groups once the pipe closes: the supervisor is gone, however it died (a closed
  pipe is portable). The groups hold what the children started themselves (streamlit's or uvicorn's
  helpers), so those go too.

It lives in the library, below both of its users, so `edgerlhf.cli` needs no code of the worker package.

    python -I edgerlhf/lifeline.py      the reaper itself: process group ids on stdin, one a line
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _find_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up here, in the parent: between fork and exec the child should only call it, not load libraries.
_prctl = _find_prctl()


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has the child SIGKILLed when this process dies (Linux; None elsewhere).

    The kernel ties the signal to the *thread* that starts the child: call `Popen` from a thread that
    lives as long as the process (the main thread, in the worker and in `up`).
    """
    if _prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the request took effect: nobody would signal us
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class Reaper:
    """Kills the process groups it is told about when the process that started it dies."""

    def __init__(self):
        # `-I`: only the standard library is needed, so neither the working directory nor PYTHONPATH matter.
        # Its own session: a Ctrl-C in the terminal is for the supervisor, which stops its children itself.
        self.proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     start_new_session=True)

    def watch(self, pgid: int) -> None:
        """Kill process group `pgid` (a child started with `start_new_session=True`: its pid) with us."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{pgid}\n".encode())
        self.proc.stdin.flush()

    def dismiss(self) -> None:
        """The supervisor stopped its children itself: end the reaper without it killing anything."""
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()


def _reap() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups = [int(line) for line in sys.stdin if line.strip()]  # blocks until the pipe closes
    # A group whose members are already gone (PR_SET_PDEATHSIG was faster) answers ProcessLookupError.
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


if __name__ == "__main__":
    _reap()
