"""`edgerlhf up` (behind `make run`): three real processes come up, answer, and all go away on Ctrl-C or
with `up` itself (`kill -9`); a child that dies is restarted; a second `up` on the same data directory or ports says
why it cannot start; `up --workers 2` runs a worker per GPU, and both go with it too. Its output is quiet (no line
per request, the libraries' reports and notes off in every child) unless `--verbose`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from edgerlhf.cli import QUIET_ENVIRONMENT
from tests.support.fake_gpus import FAKE_GPUS, fake_nvidia_smi_path
from tests.support.procs import REPO_ROOT, free_port

ACCESS_LOG = '"GET /healthz HTTP/1.1" 200'
"""What uvicorn's access log writes for each of the tests' health checks."""


def wait_for(url: str, deadline: float) -> httpx.Response:
    last = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response
            last = response.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer 200 in time (last: {last})")


@pytest.mark.slow
def test_up_serves_backend_and_dashboard_and_stops_cleanly_on_ctrl_c(tmp_path):
    backend_port, frontend_port = free_port(), free_port()
    env = {**os.environ, "EDGERLHF_DATA_DIR": str(tmp_path / "data"),
           "EDGERLHF_BACKEND_PORT": str(backend_port), "EDGERLHF_FRONTEND_PORT": str(frontend_port)}
    for name in ("EDGERLHF_API_TOKEN", "EDGERLHF_VERBOSE", *QUIET_ENVIRONMENT):
        env.pop(name, None)
    up = subprocess.Popen([sys.executable, "-m", "edgerlhf.cli", "up"], cwd=REPO_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        health = wait_for(f"http://127.0.0.1:{backend_port}/healthz", deadline)
        assert health.json()["status"] == "ok"
        page = wait_for(f"http://127.0.0.1:{frontend_port}/", deadline)
        assert "<html" in page.text.lower()
        # The worker announces itself through the database; the backend reports it.
        while time.monotonic() < deadline:
            system = httpx.get(f"http://127.0.0.1:{backend_port}/api/system", timeout=5).json()
            if system["worker"]["alive"]:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"worker never reported alive: {system}")
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 3
        for child in psutil.Process(up.pid).children():  # each child, and what it starts, keeps the libraries quiet
            assert {k: child.environ().get(k) for k in QUIET_ENVIRONMENT} == QUIET_ENVIRONMENT, child.cmdline()
    finally:
        up.send_signal(signal.SIGINT)
        output, _ = up.communicate(timeout=60)
    assert up.returncode == 0, output
    assert "backend:" in output and "dashboard:" in output
    assert "HTTP/1.1" not in output, "a line per request (uvicorn's access log) without --verbose"
    time.sleep(0.5)
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {[c.cmdline() for c in alive]}"


def up_env(data_dir, backend_port: int, frontend_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if (not k.startswith("EDGERLHF_") or k == "EDGERLHF_SHARED_DIR") and k not in QUIET_ENVIRONMENT}
    env.update({"EDGERLHF_DATA_DIR": str(data_dir), "EDGERLHF_BACKEND_PORT": str(backend_port),
                "EDGERLHF_FRONTEND_PORT": str(frontend_port), "PYTHONUNBUFFERED": "1"})
    return env


def start_up(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgerlhf.cli", "up", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def refused(env: dict[str, str]) -> tuple[int, str]:
    """Run an `up` that should refuse to start; (exit code, its output)."""
    second = start_up(env)
    try:
        output, _ = second.communicate(timeout=60)
    finally:
        if second.poll() is None:  # it started after all: take it down with everything it started
            for child in psutil.Process(second.pid).children(recursive=True):
                child.kill()
            second.kill()
            second.wait()
    return second.returncode, output


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_kill_9_of_up_takes_every_process_it_started_with_it_and_a_second_up_is_refused(tmp_path):
    ports = free_port(), free_port()
    env = up_env(tmp_path / "data", *ports)
    first = start_up(env)
    descendants: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        wait_for(f"http://127.0.0.1:{ports[0]}/healthz", deadline)
        wait_for(f"http://127.0.0.1:{ports[1]}/", deadline)

        # Same data directory (on free ports): the lock names the running instance.
        code, output = refused(up_env(tmp_path / "data", free_port(), free_port()))
        assert code == 1, output
        assert f"pid {first.pid}" in output and str(tmp_path / "data") in output and "EDGERLHF_DATA_DIR" in output
        assert len(output.strip().splitlines()) == 1, output
        # Same ports (another data directory): the busy port is named, with the setting that moves it.
        code, output = refused(up_env(tmp_path / "other", *ports))
        assert code == 1, output
        assert f"port {ports[0]}" in output and "EDGERLHF_BACKEND_PORT" in output
        assert len(output.strip().splitlines()) == 1, output

        descendants = psutil.Process(first.pid).children(recursive=True)
        started = " ".join(" ".join(p.cmdline()) for p in descendants)
        assert "backend" in started and "worker" in started and "streamlit" in started, started
    finally:
        first.kill()  # SIGKILL: no handler of `up` runs
        first.wait(timeout=30)
        first.stdout.close()  # not read to its end: survivors would keep it open
    deadline = time.monotonic() + 30  # generous: they are polled, not waited for
    while alive(descendants) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = alive(descendants)
    for p in left:  # do not leave them holding ports for the next test
        p.kill()
    assert not left, f"left behind: {[p.cmdline() for p in left]}"


@pytest.mark.slow
def test_a_backend_that_dies_is_restarted_and_answers_again_and_verbose_logs_every_request(tmp_path):
    ports = free_port(), free_port()
    up = start_up(up_env(tmp_path / "data", *ports), "--no-worker", "--verbose")
    try:
        deadline = time.monotonic() + 120
        wait_for(f"http://127.0.0.1:{ports[0]}/healthz", deadline)
        (backend,) = [p for p in psutil.Process(up.pid).children() if "backend" in " ".join(p.cmdline())]
        backend.kill()  # as a crash would: no handler runs
        backend.wait(timeout=30)
        wait_for(f"http://127.0.0.1:{ports[0]}/healthz", time.monotonic() + 120)
        (again,) = [p for p in psutil.Process(up.pid).children() if "backend" in " ".join(p.cmdline())]
        assert again.pid != backend.pid and up.poll() is None  # the rest kept running
        assert again.environ().get("EDGERLHF_VERBOSE") == "1" and "TRANSFORMERS_VERBOSITY" not in again.environ()
    finally:
        up.send_signal(signal.SIGINT)
        output, _ = up.communicate(timeout=60)
    assert up.returncode == 0, output
    assert "backend exited with code -9; restarting it in 1 s" in output and f"backend restarted (pid {again.pid})" in output
    assert ACCESS_LOG in output, "--verbose: uvicorn's access log, a line per request"


@pytest.mark.parametrize("busy", ["backend", "dashboard"])
def test_up_refuses_to_start_on_a_busy_port_and_names_it(tmp_path, busy):
    ports = {"backend": free_port(), "dashboard": free_port()}
    with socket.socket() as holder:  # another program listening on the port
        holder.bind(("127.0.0.1", ports[busy]))
        holder.listen()
        code, output = refused(up_env(tmp_path / "data", ports["backend"], ports["dashboard"]))
    setting = {"backend": "EDGERLHF_BACKEND_PORT", "dashboard": "EDGERLHF_FRONTEND_PORT"}[busy]
    assert code == 1, output
    assert f"port {ports[busy]} ({busy})" in output and setting in output, output
    assert len(output.strip().splitlines()) == 1, output


@pytest.mark.slow
def test_up_with_two_workers_runs_one_per_gpu_both_heartbeat_and_both_die_with_up(tmp_path):
    ports = free_port(), free_port()
    env = up_env(tmp_path / "data", *ports)
    env["PATH"] = fake_nvidia_smi_path(tmp_path / "bin")  # two GPUs, on any machine
    env["EDGERLHF_HEARTBEAT_SECONDS"] = "0.5"
    first = start_up(env, "--workers", "2")
    api = f"http://127.0.0.1:{ports[0]}/api/system"
    descendants: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        wait_for(f"http://127.0.0.1:{ports[0]}/healthz", deadline)

        def live_workers() -> dict[int, dict]:
            return {w["gpu_index"]: w for w in httpx.get(api, timeout=5).json()["workers"] if w["alive"]}

        while len(seen := live_workers()) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert sorted(seen) == [0, 1], f"expected a live worker on GPU 0 and one on GPU 1: {seen}"
        for index, (name, memory) in enumerate(FAKE_GPUS):
            w = seen[index]
            assert (w["gpu_name"], w["gpu_memory_mb"], w["state"], w["host"]) == (name, memory, "idle",
                                                                                 socket.gethostname()), w
        # Both keep heartbeating (not merely once at start).
        while time.monotonic() < deadline:
            now = live_workers()
            if all(now[i]["last_heartbeat"] > seen[i]["last_heartbeat"] for i in (0, 1)):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"not both heartbeating: {seen} then {now}")

        descendants = psutil.Process(first.pid).children(recursive=True)
        pids = {p.pid: p for p in descendants}
        workers = [pids[seen[i]["pid"]] for i in (0, 1)]
        assert [w.cmdline()[-2:] for w in workers] == [["--gpu", "0"], ["--gpu", "1"]]
    finally:
        first.kill()  # SIGKILL: no handler of `up` runs
        first.wait(timeout=30)
        first.stdout.close()
    deadline = time.monotonic() + 30
    while alive(descendants) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = alive(descendants)
    for p in left:
        p.kill()
    assert not left, f"left behind: {[p.cmdline() for p in left]}"
    assert not alive(workers), "both workers die with up"


LOAD_A_MODEL_WITH_A_NEW_HEAD = """
import tempfile
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
directory = tempfile.mkdtemp()
GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=64, n_positions=16)).save_pretrained(directory)
GPT2ForSequenceClassification.from_pretrained(directory)  # a reward model from an LM: a new head, an unused one
"""


def test_the_quiet_environment_silences_transformers_loading_report_and_progress_bars(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENVIRONMENT}
    outputs = {}
    for mode, extra in (("verbose", {}), ("quiet", QUIET_ENVIRONMENT)):
        done = subprocess.run([sys.executable, "-c", LOAD_A_MODEL_WITH_A_NEW_HEAD], env={**env, **extra},
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        outputs[mode] = done.stdout + done.stderr
    assert "LOAD REPORT" in outputs["verbose"] and "Loading weights" in outputs["verbose"], outputs["verbose"]
    assert outputs["quiet"].strip() == "", outputs["quiet"]
