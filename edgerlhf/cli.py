"""The `edgerlhf` command: one entry point for every process of the service and for the pipeline.

    edgerlhf up          backend + worker + dashboard together; a child that dies is restarted; Ctrl-C stops all
                         three, and they die with it (`--workers N`: N workers, worker i on GPU i; `--verbose`:
                         every request and library report in the log, see `quiet_libraries`)
    edgerlhf backend     the FastAPI backend (uvicorn)
    edgerlhf worker      the GPU worker (one job at a time)
    edgerlhf frontend    the Streamlit dashboard
    edgerlhf pipeline    run pipeline stages directly, without the service
    edgerlhf data        read a data set as a job would: its format, counts, problems and first rows
    edgerlhf bench       memory and speed benchmarks of every stage
    edgerlhf plan        will a config fit the GPU: each stage's planned peak memory, itemised
    edgerlhf export      merge a run's aligned policy into one Hugging Face model directory, or a GGUF file
                         with an Ollama Modelfile (`--format gguf --quant f16|q8_0`)
    edgerlhf known-answer  every known-answer gold at several seeds: is content learned, not length
    edgerlhf verifiable  a task with right answers and stated rewards, no reward model: is it learned
    edgerlhf rounds      two rounds of RLHF, the second on a simulated voter's votes: does round 2 beat round 1

Subcommands import their code lazily, so `edgerlhf up` starts fast and `edgerlhf backend` never loads
the training stack it does not need.

Why the service's entry point lives in the ML package, deliberately: `edgerlhf` is the distribution and
the command, and `edgerlhf.cli:main` / `python -m edgerlhf.cli` is what the console script, docker-compose,
`edgerlhf up` (for its children) and the tests start processes with. It is only a dispatcher: it names
the service's modules as strings (`DISPATCH`) and imports one when its subcommand runs, so importing it,
or anything else in `edgerlhf`, loads no backend, worker or dashboard code (tests/test_settings.py).
"""

from __future__ import annotations

import errno
import importlib
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

USAGE = __doc__.split("\n\n")[1]

FRONTEND_APP = Path(__file__).resolve().parent.parent / "frontend" / "streamlit_app.py"

# subcommand -> "module:function" taking argv
DISPATCH = {
    "backend": "backend.main:main",
    "worker": "worker.main:main",
    "pipeline": "edgerlhf.pipeline:main",
    "data": "edgerlhf.formats:main",
    "bench": "edgerlhf.lab.bench:main",
    "plan": "edgerlhf.plan:main",
    "export": "edgerlhf.export:main",
    "known-answer": "edgerlhf.lab.known_answer:main",
    "verifiable": "edgerlhf.lab.verifiable:main",
    "rounds": "edgerlhf.lab.rounds:main",
}


SERVICE_COMMANDS = ("up", "backend", "worker", "frontend")
"""The commands that run the service, whose output is quiet unless `EDGERLHF_VERBOSE` (`up --verbose`)."""


QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",  # its model loading report and its warnings: a table per model loaded
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # progress bars (transformers' too): saving shards, downloads
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # a bar per `map` of a data set (TRL's tokenising)
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",  # the libraries' notes to their developers
}
"""What the service's processes (and the job processes they start) leave out of the log unless verbose. The loading
report warns of weights a model did not use or had to create, which is expected here (a reward head, a value head)."""


def quiet_libraries(verbose: bool) -> None:
    """Unless `verbose`, keep the service's terminal to what matters: `QUIET_ENVIRONMENT`, for this process and every
    process it starts (they inherit the environment); a variable already set is left as it is. The backend's access
    log follows the same setting (`backend.main`)."""
    if verbose:
        return
    if "PYTHONWARNINGS" not in os.environ:  # the variable is read at start-up: this process filters by hand
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def frontend_command(settings) -> list[str]:
    """The Streamlit command line for the dashboard, on its own interface and port (`EDGERLHF_FRONTEND_HOST`,
    `EDGERLHF_FRONTEND_PORT`): binding the backend beyond this machine does not expose the dashboard too."""
    return [sys.executable, "-m", "streamlit", "run", str(FRONTEND_APP),
            "--server.port", str(settings.frontend_port),
            "--server.address", settings.frontend_host,
            "--server.headless", "true",
            "--browser.gatherUsageStats", "false"]


def dashboard_exposure(settings) -> str | None:
    """The warning for a dashboard bound beyond this machine (None on a loopback interface)."""
    from edgerlhf.settings import is_loopback

    if is_loopback(settings.frontend_host):
        return None
    guard = ("every visitor must type the API token to use it" if settings.api_token else
             "and EDGERLHF_API_TOKEN is not set: ANYONE WHO REACHES IT CAN LAUNCH, CANCEL AND DELETE JOBS")
    return (f"the dashboard listens on {settings.frontend_host}:{settings.frontend_port}, beyond this machine; "
            f"{guard}. Its traffic (the token included) is plain HTTP: put a reverse proxy with TLS in front, or "
            "keep EDGERLHF_FRONTEND_HOST=127.0.0.1 and reach it through an SSH tunnel (README: \"Security\").")


def run_frontend(argv: list[str]) -> int:
    from edgerlhf.settings import get_settings
    from edgerlhf.lifeline import die_with_parent

    settings = get_settings()
    if warning := dashboard_exposure(settings):
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    # Streamlit dies with this command, however this command dies (as `up`'s children do).
    return subprocess.call(frontend_command(settings) + argv, preexec_fn=die_with_parent())


class Busy(Exception):
    """Another instance holds what `up` needs (its data directory or a port)."""


def _hold_data_dir(data_dir: Path) -> int:
    """Lock `<data_dir>/up.lock` for the life of this process and write our pid into it; raises `Busy`.

    An flock belongs to the open file, which the kernel closes when we die however we die, so a stale
    lock cannot outlive its `up`. (Children do not inherit the descriptor: Python opens it non-inheritable.)
    """
    import fcntl

    path = data_dir / "up.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's pid must stay readable
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise Busy(f"another `edgerlhf up` (pid {holder}) is running on the data directory {data_dir} "
                   f"(it holds {path}); stop it, or set EDGERLHF_DATA_DIR to another directory") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _port_in_use(host: str, port: int) -> bool:
    """Whether something listens on `host:port`: bind it as the servers will (with SO_REUSEADDR, as
    uvicorn and streamlit's tornado do, so a closed connection in TIME_WAIT is no conflict)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror:
        return False  # an unknown host is the server's error to report
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _check_ports(settings) -> None:
    for name, host, port, variable in (
            ("backend", settings.backend_host, settings.backend_port, "EDGERLHF_BACKEND_PORT"),
            ("dashboard", settings.frontend_host, settings.frontend_port, "EDGERLHF_FRONTEND_PORT")):
        if _port_in_use(host, port):
            raise Busy(f"port {port} ({name}) on {host} is already in use (another "
                       f"`edgerlhf up`?); stop what holds it, or set {variable} to a free port")


def worker_commands(workers: int | None) -> dict[str, list[str]]:
    """The worker processes of `up`: one that takes its GPU from the environment (`workers` None), or
    `workers` of them, worker i owning GPU i (`edgerlhf worker --gpu i`)."""
    base = [sys.executable, "-m", "edgerlhf.cli", "worker"]
    if workers is None:
        return {"worker": base}
    return {f"worker-{i}": [*base, "--gpu", str(i)] for i in range(workers)}


RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Pauses before restarting a child of `up` that died, one more step each time it died within `CRASH_WINDOW_S`."""
CRASH_WINDOW_S = 120.0
MAX_CRASHES = 5
"""A child that dies this many times within `CRASH_WINDOW_S` is crash-looping: `up` stops everything instead."""


def up(argv: list[str]) -> int:
    """Start backend, worker(s) and dashboard as child processes; restart one that dies (after a pause that grows
    while it keeps dying), stop them all on Ctrl-C or when one crash-loops."""
    import argparse

    from edgerlhf.log import setup_logging
    from edgerlhf.settings import get_settings, is_wildcard
    from edgerlhf.lifeline import Reaper, die_with_parent

    parser = argparse.ArgumentParser(prog="edgerlhf up", description=up.__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--no-worker", action="store_true", help="start only backend and dashboard")
    group.add_argument("--workers", type=_positive, default=None, metavar="N",
                       help="start N workers, worker i owning GPU i (`edgerlhf worker --gpu i`); default: one "
                            "worker on the GPU of CUDA_VISIBLE_DEVICES (or GPU 0)")
    parser.add_argument("--verbose", action="store_true",
                        help="log every request to the backend, transformers' model loading reports and its warnings "
                             "(EDGERLHF_VERBOSE=1 does the same); default: quiet")
    args = parser.parse_args(argv)

    if args.verbose:
        os.environ["EDGERLHF_VERBOSE"] = "1"  # for this process's settings and every child's
        get_settings.cache_clear()
    settings = get_settings()
    quiet_libraries(settings.verbose)
    setup_logging("up", settings.log_level)
    import logging

    log = logging.getLogger("edgerlhf.up")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Before starting anything: one line on what is taken, instead of children failing one by one.
    try:
        lock = _hold_data_dir(settings.data_dir)
        _check_ports(settings)
    except Busy as exc:
        print(f"edgerlhf up: {exc}", file=sys.stderr)
        return 1
    # Children read the same settings from the environment; pin the resolved data dir so they agree.
    env = {**os.environ, "EDGERLHF_DATA_DIR": str(settings.data_dir), "PYTHONUNBUFFERED": "1"}
    commands = {"backend": [sys.executable, "-m", "edgerlhf.cli", "backend"]}
    if not args.no_worker:
        commands.update(worker_commands(args.workers))
    commands["frontend"] = frontend_command(settings)

    # Each child gets its own process group so one Ctrl-C in this terminal reaches us only, and we
    # stop the children in order (and their own children, e.g. the worker's job process) ourselves.
    # Should we die without that (kill -9), they die with us: the kernel kills each child
    # (`die_with_parent`) and the reaper kills their process groups, with whatever they started there
    # (the worker's job process has a group of its own and dies with the worker in turn).
    procs: dict[str, subprocess.Popen] = {}
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    reaper = Reaper()

    def start(name: str) -> None:
        procs[name] = subprocess.Popen(commands[name], env=env, start_new_session=True, preexec_fn=die_with_parent())
        reaper.watch(procs[name].pid)

    for name in commands:
        start(name)
    log.info(f"data directory: {settings.data_dir}")
    log.info(f"database:       {settings.db_url_for_logs}")
    if args.workers is not None:
        log.info(f"workers:        {args.workers}, on GPUs {', '.join(str(i) for i in range(args.workers))}")
    log.info(f"backend:        {settings.api_url}  (API docs: {settings.api_url}/docs)")
    shown = "127.0.0.1" if is_wildcard(settings.frontend_host) else settings.frontend_host
    log.info(f"dashboard:      http://{shown}:{settings.frontend_port}")
    if warning := dashboard_exposure(settings):
        log.warning(warning)
    log.info("press Ctrl-C to stop")

    exit_code = 0
    crashes: dict[str, list[float]] = {name: [] for name in commands}
    restart_at: dict[str, float] = {}
    while not stopping:
        now = time.monotonic()
        for name, proc in procs.items():
            if name in restart_at or proc.poll() is None:
                continue
            # A child that died: the others keep serving (a job keeps running while the backend is down); it is
            # started again after a pause, unless it keeps dying.
            crashes[name] = [t for t in crashes[name] if now - t < CRASH_WINDOW_S] + [now]
            if len(crashes[name]) >= MAX_CRASHES:
                log.error(f"{name} exited with code {proc.returncode}, {len(crashes[name])} times in "
                          f"{CRASH_WINDOW_S:.0f} s; stopping the others")
                exit_code = proc.returncode or 1
                stopping = True
                break
            pause = RESTART_BACKOFF_S[min(len(crashes[name]), len(RESTART_BACKOFF_S)) - 1]
            log.error(f"{name} exited with code {proc.returncode}; restarting it in {pause:.0f} s")
            restart_at[name] = now + pause
        for name, when in list(restart_at.items()):
            if not stopping and now >= when:
                del restart_at[name]
                start(name)
                log.info(f"{name} restarted (pid {procs[name].pid})")
        time.sleep(0.3)

    log.info("stopping ...")
    for proc in procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning(f"{name} did not stop in time; killing it")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # Anything a child left in its process group (a job process, streamlit's helpers) goes too.
    for proc in procs.values():
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    reaper.dismiss()
    os.close(lock)
    log.info("stopped")
    return exit_code


def _positive(text: str) -> int:
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command in SERVICE_COMMANDS[1:]:  # `up` decides after reading its `--verbose`
        from edgerlhf.settings import get_settings

        quiet_libraries(get_settings().verbose)
    if command == "up":
        return up(rest)
    if command == "frontend":
        return run_frontend(rest)
    if command not in DISPATCH:
        print(f"edgerlhf: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module_name, func_name = DISPATCH[command].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return func(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
