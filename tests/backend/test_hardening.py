"""Round 3's attacks on a running backend, each refused: a real `edgerlhf backend` process over a SQLite file, real
tiny models in its run directories, real concurrent clients (threads), real tar files read back.

The module shares one backend. Its jobs (`db.queue` creates, claims and ends them; `make_run_dir` and `_gpt2_run`
write their files): 1 succeeded (sft + ppo, the chat and arena model), 2 succeeded (an sft model with 1,024
positions, for long generations), 3 succeeded (a 128-wide model with a PPO adapter: a ~30 MB export), 4 succeeded (a
copy of 3, deleted while it exports), 5 failed after its ppo stage (never exported).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.backend import start_backend
from tests.support.procs import wait_for
from tests.support.runs import make_run_dir, save_policy_adapter

TOKEN = "hardening-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
MAX_QUEUE = 3
VOTES_PER_MINUTE = 4
MAX_VOTES = 300
ENV = {"EDGERLHF_API_TOKEN": TOKEN, "EDGERLHF_DEVICE": "cpu", "EDGERLHF_CHAT_MAX_TOKENS": "1000",
       "EDGERLHF_CHAT_CACHE_SIZE": "2", "EDGERLHF_CHAT_MAX_QUEUE": str(MAX_QUEUE),
       "EDGERLHF_ARENA_VOTES_PER_MINUTE": str(VOTES_PER_MINUTE), "EDGERLHF_ARENA_MAX_VOTES": str(MAX_VOTES)}
USER = [{"role": "user", "content": "Tell me a long story about spiders."}]


def _gpt2_run(run_dir: Path, n_embd: int = 32, n_positions: int = 128, with_ppo: bool = False) -> None:
    """A finished run of a random one-layer GPT-2 of this size: sft/merged (+ a LoRA adapter with B != 0 as ppo)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from edgerlhf.config import TINY_TOKENIZER_DIR, load_config

    run_dir.mkdir(parents=True)
    config = load_config("tiny", {"model": {"n_embd": n_embd, "n_positions": n_positions}})
    (run_dir / "config.json").write_text(config.to_json())
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=n_embd, n_positions=n_positions))
    merged = run_dir / "sft" / "merged"
    model.save_pretrained(merged)
    AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR).save_pretrained(merged)
    (run_dir / "sft" / "report.json").write_text("{}")
    if with_ppo:
        save_policy_adapter(model, run_dir)
        (run_dir / "ppo" / "report.json").write_text("{}")


def _make_jobs(data_dir: Path) -> None:
    from db import init_db, make_engine, make_sessionmaker, queue
    from edgerlhf.config import load_config

    runs = data_dir / "runs"
    make_run_dir(runs / "job-1")
    _gpt2_run(runs / "job-2", n_positions=1024)
    _gpt2_run(runs / "job-3", n_embd=128, with_ppo=True)
    shutil.copytree(runs / "job-3", runs / "job-4")
    shutil.copytree(runs / "job-1", runs / "job-5")
    engine = make_engine(f"sqlite:///{data_dir / 'edgerlhf.db'}")
    init_db(engine)
    config = load_config("tiny").to_dict()
    with make_sessionmaker(engine)() as session:
        for job_id in range(1, 6):
            assert queue.create_job(session, name=f"job {job_id}", preset="tiny", config=config).id == job_id
            assert queue.claim_next(session, "test-worker").id == job_id
            if job_id == 5:
                assert queue.fail(session, job_id, "RuntimeError: evaluate diverged", worker_id="test-worker")
            else:
                assert queue.finish(session, job_id, "test-worker")
    engine.dispose()


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("hardening") / "data"
    _make_jobs(data_dir)
    backend = start_backend(data_dir, **ENV)
    yield backend
    backend.stop()


def _chat(backend, timeout: float = 120, **body) -> httpx.Response:
    return httpx.post(f"{backend.url}/v1/chat/completions", headers=HEADERS, timeout=timeout,
                      json={"model": "job-1/sft", "messages": USER, "max_tokens": 8, **body})


# --- chat -------------------------------------------------------------------------------------------------------


def test_a_tiny_temperature_answers_greedily_not_empty(backend):
    """`temperature: 5e-324` divided the logits into inf: NaN probabilities, and the sampler drew the last token
    (end of text), an empty answer every time. A temperature that small is the arg max: the greedy answer."""
    greedy = _chat(backend, temperature=0)
    assert greedy.status_code == 200, greedy.text
    text = greedy.json()["choices"][0]["message"]["content"]
    assert text
    for seed in (1, 2):
        tiny = _chat(backend, temperature=5e-324, seed=seed)
        assert tiny.status_code == 200, tiny.text
        assert tiny.json()["choices"][0]["message"]["content"] == text


def test_a_long_stop_string_is_refused_before_it_reaches_the_model(backend):
    """Each new token looks for a stop string starting at the end of the text, at a cost that grows with the square
    of its length: stop strings are capped (and so is their number)."""
    for stop in (["x" * 10_000], ["y" * 257], ["a", "b", "c", "d", "e"]):
        r = _chat(backend, stop=stop, max_tokens=2)
        assert r.status_code == 400, (len(stop), r.text[:200])
        assert r.json()["error"]["param"] == "stop"
    assert _chat(backend, stop=["z" * 256], max_tokens=2).status_code == 200


def test_queued_chats_neither_stall_the_api_nor_outlive_their_clients(backend):
    """45 long non-streamed chats at once for one model: beyond the model's queue (one generating, MAX_QUEUE waiting)
    they are refused at once with 429 and `Retry-After`; the ones admitted run in the chat's own threads, so the
    rest of the API (whose shared thread pool has 40) answers meanwhile; and a client that gives up stops its
    generation (its log line says `finish=cancelled`)."""
    results: list[httpx.Response | Exception] = []

    def ask() -> None:
        try:  # 900 tokens x 4 completions: a few seconds each; the client gives up after 4 s
            results.append(_chat(backend, timeout=4, model="job-2/sft", max_tokens=900, n=4, seed=1))
        except httpx.HTTPError as exc:
            results.append(exc)

    assert _chat(backend, model="job-2/sft", max_tokens=1).status_code == 200  # loaded: nothing waits on a load
    threads = [threading.Thread(target=ask) for _ in range(45)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    jobs = httpx.get(f"{backend.url}/api/jobs", headers=HEADERS, timeout=3)  # the shared pool is free
    assert jobs.status_code == 200 and jobs.json()["total"] >= 5
    for t in threads:
        t.join()
    refused = [r for r in results if isinstance(r, httpx.Response) and r.status_code == 429]
    assert len(refused) >= 45 - (MAX_QUEUE + 1) - 2, [getattr(r, "status_code", r) for r in results]
    assert all(int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "model_busy" for r in refused)
    assert any(isinstance(r, httpx.TimeoutException) for r in results), "no client gave up: generation too fast?"
    wait_for(lambda: "finish=cancelled" in backend.log(), 60, "a cancelled generation in the backend's log")
    # And the model serves the next request at once, the abandoned ones gone.
    assert _chat(backend, model="job-2/sft", max_tokens=4, timeout=30).status_code == 200


# --- the job's data ---------------------------------------------------------------------------------------------


def test_the_hub_subset_of_a_job_cannot_leave_the_snapshot(backend):
    body = {"preset": "tiny", "overrides": {"data": {"source": "Anthropic/hh-rlhf", "data_dir": "../../../../tmp/x"}}}
    r = httpx.post(f"{backend.url}/api/jobs", headers=HEADERS, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][-2:] == ["data", "data_dir"]


# --- export -----------------------------------------------------------------------------------------------------


def _export(backend, job_id: int) -> httpx.Response:
    return httpx.post(f"{backend.url}/api/jobs/{job_id}/export", headers=HEADERS, timeout=300)


def _slow_client() -> httpx.Client:
    """A client that reads slowly: a 64 KB receive buffer (the kernel would otherwise take a whole tiny export at
    once, up to `tcp_rmem`'s 32 MB here), so the server's writes wait for it as they would for a slow network."""
    transport = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)])
    return httpx.Client(transport=transport, timeout=120)


def test_slow_downloads_hold_no_database_connection(backend):
    """16 downloads that read slowly (more than the pool's 15 connections): the API and `/healthz` still answer."""
    assert _export(backend, 3).status_code == 200
    clients, streams, readers = [], [], []
    try:
        for _ in range(16):
            client = _slow_client()
            clients.append(client)
            stream = client.stream("GET", f"{backend.url}/api/jobs/3/export.tar", headers=HEADERS)
            response = stream.__enter__()
            streams.append(stream)
            assert response.status_code == 200
            readers.append(response.iter_raw(4096))  # kept: a reader dropped would close its download
            next(readers[-1])  # started, then left waiting
        assert httpx.get(f"{backend.url}/api/jobs", headers=HEADERS, timeout=10).status_code == 200
        assert httpx.get(f"{backend.url}/healthz", timeout=10).status_code == 200
    finally:
        for stream in streams:
            stream.__exit__(None, None, None)
        for client in clients:
            client.close()


class _FreezingProxy:
    """A TCP proxy in front of a database server that can stop passing bytes on (`freeze`), as a server that hangs
    or a network that drops packets does, and start again (`thaw`)."""

    def __init__(self, port: int):
        self.upstream = ("127.0.0.1", port)
        self.open = threading.Event()
        self.open.set()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, dest: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self.open.wait()  # frozen: held here, neither lost nor passed on
                dest.sendall(data)
        except OSError:
            pass

    def freeze(self) -> None:
        self.open.clear()

    def thaw(self) -> None:
        self.open.set()

    def close(self) -> None:
        self.thaw()
        for sock in self.sockets:
            sock.close()


def test_healthz_answers_503_at_once_when_the_database_hangs(postgres, tmp_path):
    """A database that stops answering (no error, no bytes) made `/healthz` hang with it; it answers 503 within
    seconds, and 200 again once the database answers."""
    from sqlalchemy.engine import make_url

    url = postgres.create_database()
    proxy = _FreezingProxy(make_url(url).port)
    server = None
    try:
        server = start_backend(tmp_path / "data", EDGERLHF_DATABASE_URL=str(make_url(url).set(port=proxy.port)))
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
        proxy.freeze()
        hung = httpx.get(f"{server.url}/healthz", timeout=15)
        assert hung.status_code == 503 and hung.json()["status"] == "error", hung.text
        proxy.thaw()
        wait_for(lambda: httpx.get(f"{server.url}/healthz", timeout=15).status_code == 200, 30, "/healthz to recover")
    finally:
        if server is not None:
            server.stop()
        proxy.close()
        postgres.drop_database(url)


def _members(tar_bytes: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_export_only_of_succeeded_jobs_and_never_through_a_symlink(backend, tmp_path):
    failed = _export(backend, 5)
    assert failed.status_code == 409 and "failed" in failed.json()["detail"], failed.text
    assert httpx.get(f"{backend.url}/api/jobs/5/export.tar", headers=HEADERS).status_code == 409
    assert _export(backend, 99).status_code == 404

    assert _export(backend, 3).status_code == 200
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.txt").write_text("the server's private key")
    out = backend.data_dir / "runs" / "job-3" / "export" / "model"
    (out / "leak.txt").symlink_to(secret / "key.txt")
    (out / "leak_dir").symlink_to(secret)
    try:
        r = httpx.get(f"{backend.url}/api/jobs/3/export.tar", headers=HEADERS, timeout=120)
    finally:
        (out / "leak.txt").unlink()
        (out / "leak_dir").unlink()
    assert r.status_code == 200
    assert b"private key" not in r.content
    names = {name.split("/", 1)[1] for name in _members(r.content)}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(name.startswith("leak") for name in names), names


def test_a_re_export_during_a_download_neither_mixes_nor_cuts_it(backend):
    """A download gets the export it started from, whole, while a re-export (of a changed policy and tokenizer)
    replaces the directory under it: not the new export's files after the old one's weights, not a cut archive."""
    assert _export(backend, 3).status_code == 200
    run_dir = backend.data_dir / "runs" / "job-3"
    out = run_dir / "export" / "model"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.is_symlink()}
    with _slow_client() as client, \
            client.stream("GET", f"{backend.url}/api/jobs/3/export.tar", headers=HEADERS) as response:
        assert response.status_code == 200
        chunks = response.iter_raw(65536)
        body = [next(chunks)]  # the weights are being sent; the tokenizer files come after them
        tokenizer_config = run_dir / "sft" / "merged" / "tokenizer_config.json"
        tokenizer_config.write_text(json.dumps({**json.loads(tokenizer_config.read_text()), "model_max_length": 77}))
        os.utime(run_dir / "ppo" / "report.json")  # a newer policy: the next export is a new one
        assert _export(backend, 3).status_code == 200
        body += list(chunks)
    members = {name.split("/", 1)[1]: data for name, data in _members(b"".join(body)).items()}
    assert members == before
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 77  # the new export


def test_a_delete_during_an_export_leaves_nothing_behind(backend):
    """A delete while the export loads and writes the model (a second or more) waits for it, or the export finds
    the job gone: no half-written export in a removed run directory, no 500."""
    run_dir = backend.data_dir / "runs" / "job-4"
    exported: list[httpx.Response] = []
    exporting = threading.Thread(target=lambda: exported.append(_export(backend, 4)))
    exporting.start()
    time.sleep(0.3)
    deleted = httpx.delete(f"{backend.url}/api/jobs/4", headers=HEADERS, timeout=60)
    exporting.join(300)
    if deleted.status_code == 409:  # the export took longer than a delete waits for it: once it is done
        deleted = httpx.delete(f"{backend.url}/api/jobs/4", headers=HEADERS, timeout=60)
    assert deleted.status_code == 204, deleted.text
    assert exported[0].status_code in (200, 404), exported[0].text
    assert not run_dir.exists(), sorted(str(p) for p in run_dir.rglob("*"))


# --- arena votes ------------------------------------------------------------------------------------------------

VOTE = {"prompt": "How far can spiders jump?", "model_a": "job-1/sft", "model_b": "job-1/ppo",
        "answer_a": "About 25 times their length.", "answer_b": "No idea.", "choice": "a"}


def test_votes_are_rate_limited(backend):
    codes = [httpx.post(f"{backend.url}/api/arena/votes", headers=HEADERS, json=VOTE)
             for _ in range(VOTES_PER_MINUTE + 1)]
    assert [r.status_code for r in codes] == [201] * VOTES_PER_MINUTE + [429], [r.text for r in codes]
    assert 1 <= int(codes[-1].headers["Retry-After"]) <= 60


def _add_votes(backend, n: int) -> None:
    from db import arena, make_engine, make_sessionmaker

    engine = make_engine(backend.db_url)
    with make_sessionmaker(engine)() as session:
        for i in range(n):
            arena.add_vote(session, prompt=f"\n\nHuman: question {i}?\n\nAssistant:", model_a="job-1/sft",
                           model_b="job-1/ppo", answer_a=f"answer {i} " * 50, answer_b="no", choice="a")
    engine.dispose()


def test_votes_are_bounded_exported_as_a_stream_and_snapshots_of_the_same_votes_are_one_file(backend):
    total = httpx.get(f"{backend.url}/api/arena/votes", headers=HEADERS).json()["total"]
    _add_votes(backend, MAX_VOTES - total)
    full = httpx.post(f"{backend.url}/api/arena/votes", headers=HEADERS, json=VOTE)
    assert full.status_code == 409 and "EDGERLHF_ARENA_MAX_VOTES" in full.json()["detail"], full.text

    with httpx.stream("GET", f"{backend.url}/api/arena/votes/export", headers=HEADERS) as response:
        assert response.status_code == 200
        assert "content-length" not in response.headers  # streamed, never built whole
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert len(lines) == MAX_VOTES and [row["vote_id"] for row in lines] == sorted(row["vote_id"] for row in lines)

    first = httpx.post(f"{backend.url}/api/arena/votes/snapshot", headers=HEADERS, timeout=60)
    second = httpx.post(f"{backend.url}/api/arena/votes/snapshot", headers=HEADERS, timeout=60)
    assert first.status_code == second.status_code == 201, (first.text, second.text)
    assert first.json() == second.json() and first.json()["votes"] == MAX_VOTES
    files = sorted(p.name for p in (backend.data_dir / "arena").iterdir())
    assert files == [Path(first.json()["path"]).name]
    assert len(Path(first.json()["path"]).read_text().splitlines()) == MAX_VOTES
