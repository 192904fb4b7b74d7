"""Every model family end to end: data -> sft -> reward (bf16, int8, int4) -> ppo -> evaluate, then the chat API.

One tiny random-weight model per architecture `model.random_init` can build (GPT-2, Llama, Qwen2, Qwen3,
Mistral, Gemma, Gemma 2, Gemma 3, Phi-3) runs the real pipeline for a few steps. Half of them see the HH
dialogues through a chat template (the GPT-2 tokenizer given ChatML's tokens and template), the others as
raw HH text. For each family: the one-copy check of PPO holds (measured tensor storages), with a bf16
policy and again with the one network in 4-bit; the PPO policy answers through `/v1/chat/completions`, and
for a template family the server's prompt is exactly `apply_chat_template`'s (counted by the usage the
API reports); an exported policy reloads with plain transformers and gives the job's logits.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import httpx
import openai
import pytest
import torch

from db import init_db, make_engine, make_sessionmaker, queue
from edgerlhf.config import RANDOM_ARCHITECTURES, load_config
from edgerlhf.context import RunContext
from edgerlhf.pipeline import run_pipeline, run_stage
from tests.support.backend import CHAT_ENV, CHAT_TOKEN, start_backend
from tests.support.tiny import FAMILIES, chat_template_tokenizer

pytestmark = pytest.mark.slow

TEMPLATE_FAMILIES = {"llama", "qwen2", "gemma2", "phi3"}
"""Families run through the ChatML template; the others see raw HH text."""

QLORA_SFT = {"mistral": "int4", "qwen3": "int8"}
"""Families whose SFT trains its LoRA on a quantized base (QLoRA), merged into the bf16 weights after."""
JOB_IDS = {arch: i + 1 for i, arch in enumerate(RANDOM_ARCHITECTURES)}


def family_config(arch: str, tokenizer_dir: Path):
    overrides = json.loads(json.dumps(FAMILIES))
    overrides["model"]["architecture"] = arch
    if arch in TEMPLATE_FAMILIES:
        overrides["model"]["tokenizer"] = str(tokenizer_dir)
    overrides["sft"]["precision"] = QLORA_SFT.get(arch, "bf16")
    return load_config("tiny", overrides)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data directory whose job i is the finished pipeline of the i-th family."""
    data_dir = tmp_path_factory.mktemp("families")
    tokenizer_dir = data_dir / "chatml-tokenizer"
    chat_template_tokenizer(tokenizer_dir)
    engine = make_engine(f"sqlite:///{data_dir / 'edgerlhf.db'}")
    init_db(engine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores a second thread mostly waits on the first
    try:
        with make_sessionmaker(engine)() as session:
            for arch, job_id in JOB_IDS.items():
                config = family_config(arch, tokenizer_dir)
                job = queue.create_job(session, name=arch, preset="tiny", config=config.to_dict())
                assert queue.claim_next(session, "test-worker").id == job.id == job_id
                run_pipeline(config, RunContext(data_dir / "runs" / f"job-{job_id}"))
                assert queue.finish(session, job_id, "test-worker")
    finally:
        torch.set_num_threads(threads)
        engine.dispose()
    return data_dir


def _report(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "report.json").read_text())


@pytest.mark.parametrize("arch", RANDOM_ARCHITECTURES)
def test_every_stage_runs_and_ppo_holds_one_network(data_dir, arch, tmp_path):
    run_dir = data_dir / "runs" / f"job-{JOB_IDS[arch]}"
    config = json.loads((run_dir / "config.json").read_text())
    assert json.loads((run_dir / "sft" / "merged" / "config.json").read_text())["model_type"] == arch
    assert _report(run_dir, "sft")["steps"] == config["sft"]["max_steps"]
    # QLoRA or not, sft/merged holds plain weights that every later stage loads in its own precision
    assert "quantization_config" not in json.loads((run_dir / "sft" / "merged" / "config.json").read_text())
    reward = _report(run_dir, "reward")
    assert set(reward["precisions"]) == {"bf16", "int8", "int4"}
    ppo = _report(run_dir, "ppo")
    # held_bytes is measured (live tensor storages before and after building PPO's models), network_bytes
    # counted from the network's weights: policy, reference and reward all hang on the one network.
    assert 1.0 <= ppo["network_copies"] < 1.2, ppo["network_copies"]
    assert ppo["steps"] == config["ppo"]["steps"]
    evaluation = _report(run_dir, "evaluate")
    assert evaluation["n_prompts"] == config["evaluate"]["n_prompts"]

    # The same PPO with the one network in 4-bit (QLoRA-style): policy LoRA, reference and int4 reward on it.
    quantized = tmp_path / "run"
    quantized.mkdir()
    shutil.copy(run_dir / "config.json", quantized)
    for part in ("data", "sft", "reward"):
        shutil.copytree(run_dir / part, quantized / part)
    overrides = {**json.loads(json.dumps(FAMILIES)), "stages": ["ppo"]}
    overrides["model"] = config["model"]
    overrides["ppo"].update(quantized_policy=True, reward_precision="int4")
    four_bit = run_stage("ppo", load_config("tiny", overrides), RunContext(quantized)).model_dump()
    assert 1.0 <= four_bit["network_copies"] < 1.2, four_bit["network_copies"]
    assert four_bit["held_bytes"] < ppo["held_bytes"], "the 4-bit network must hold less than the bf16 one"


def test_every_family_answers_through_the_chat_api(data_dir):
    from transformers import AutoTokenizer

    backend = start_backend(data_dir, **CHAT_ENV)
    url = backend.url
    messages = [{"role": "user", "content": "How far can spiders jump?"}]
    try:
        with openai.OpenAI(base_url=f"{url}/v1", api_key=CHAT_TOKEN, max_retries=0, timeout=300) as client:
            for arch, job_id in JOB_IDS.items():
                answer = client.chat.completions.create(model=f"job-{job_id}/ppo", messages=messages,
                                                        max_tokens=6, temperature=0)
                assert answer.choices[0].finish_reason in ("stop", "length"), arch
                if arch in TEMPLATE_FAMILIES:
                    tokenizer = AutoTokenizer.from_pretrained(data_dir / "runs" / f"job-{job_id}" / "sft" / "merged")
                    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                             return_dict=True)["input_ids"]
                    assert answer.usage.prompt_tokens == len(expected), arch

        # Export over the API: the .tar holds a model directory that plain transformers loads.
        job_id = JOB_IDS["qwen2"]
        headers = {"Authorization": f"Bearer {CHAT_TOKEN}"}
        exported = httpx.post(f"{url}/api/jobs/{job_id}/export", headers=headers, timeout=300)
        assert exported.status_code == 200, exported.text
        assert "model.safetensors" in {f["name"] for f in exported.json()["files"]}
        tar = httpx.get(f"{url}{exported.json()['download']}", headers=headers, timeout=300)
        assert tar.status_code == 200 and tar.headers["content-type"] == "application/x-tar"
        unpacked = data_dir / "unpacked"
        with tarfile.open(fileobj=io.BytesIO(tar.content)) as archive:
            archive.extractall(unpacked, filter="data")
        assert_same_policy(unpacked / f"edgerlhf-job-{job_id}", data_dir / "runs" / f"job-{job_id}")
        assert httpx.post(f"{url}/api/jobs/999/export", headers=headers).status_code == 404
    finally:
        backend.stop()


def assert_same_policy(exported_dir: Path, run_dir: Path) -> None:
    """The model in `exported_dir`, loaded with transformers alone, computes what the job's PPO policy computes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgerlhf.dialogue import PromptFormat
    from edgerlhf.models import load_policy

    exported = AutoModelForCausalLM.from_pretrained(exported_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported_dir)
    policy, _ = load_policy(run_dir, "ppo", "cpu")
    sft, _ = load_policy(run_dir, "sft", "cpu")
    fmt = PromptFormat.of(tokenizer)  # the chat template travelled with the export, when there is one
    text = fmt.prompt("\n\nHuman: How far can spiders jump?\n\nAssistant:")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=fmt.add_special_tokens)["input_ids"]
    with torch.no_grad():
        ours, theirs, before = policy(ids).logits, exported(ids).logits, sft(ids).logits
    assert (ours - before).abs().max() > 1e-3, "PPO did not change the policy: the comparison would prove nothing"
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_edgerlhf_export_reloads_with_the_jobs_logits(data_dir, arch, tmp_path):
    from edgerlhf.cli import main as cli

    run_dir = data_dir / "runs" / f"job-{JOB_IDS[arch]}"
    assert cli(["export", str(run_dir), "--out", str(tmp_path / "model")]) == 0
    assert bool((tmp_path / "model" / "chat_template.jinja").exists()) == (arch in TEMPLATE_FAMILIES)
    assert_same_policy(tmp_path / "model", run_dir)
