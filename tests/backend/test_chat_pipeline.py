"""The chat API serving models that the pipeline itself produced, not hand-made run directories.

The session's trained tiny run (data -> sft -> reward -> ppo -> evaluate, a few steps each: `trained_run`) is
`runs/job-1` of a data directory whose database says job 1 succeeded; a real `edgerlhf backend` then serves it.
Chatting greedily through the `openai` client, `job-1/sft` must answer what `sft/merged` answers and `job-1/ppo`
what `sft/merged` + `ppo/adapter` answer, each loaded here with transformers and peft directly, and the two policies
must differ: a registry that served the SFT weights for the PPO id, or dropped the adapter, fails.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch

from backend.chat_models import GenerationParams, LoadedModel, ModelSpec
from db import init_db, make_engine, make_sessionmaker, queue
from edgerlhf.dialogue import render_chat
from tests.support.backend import CHAT_ENV, CHAT_TOKEN, start_backend

pytestmark = pytest.mark.slow

QUESTIONS = ["How far can spiders jump?", "What should I cook tonight?"]
MAX_TOKENS = 12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the backend's (OMP_NUM_THREADS=1): the same sums, so the same greedy tokens; and on
    2 shared cores a second thread mostly waits on the first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, trained_run):
    """A data directory whose job 1 succeeded, its run directory a copy of the session's trained run."""
    data_dir = tmp_path_factory.mktemp("chat-pipeline")
    trained_run.copy_to(data_dir / "runs" / "job-1")
    engine = make_engine(f"sqlite:///{data_dir / 'edgerlhf.db'}")
    init_db(engine)
    with make_sessionmaker(engine)() as session:
        job = queue.create_job(session, name="tiny pipeline", preset="tiny", config=trained_run.config.to_dict())
        assert queue.claim_next(session, "test-worker").id == job.id == 1
        assert queue.finish(session, 1, "test-worker")
    engine.dispose()
    return data_dir


def _reference_models(run_dir):
    """SFT and PPO policies loaded without the backend: `sft/merged`, and it with `ppo/adapter` (unmerged)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = run_dir / "sft" / "merged"
    sft = AutoModelForCausalLM.from_pretrained(merged).eval()
    ppo = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(merged), str(run_dir / "ppo" / "adapter"))
    return {"sft": sft, "ppo": ppo.eval()}, AutoTokenizer.from_pretrained(merged)


def _prompt_ids(tokenizer, question: str) -> list[int]:
    return tokenizer(render_chat([{"role": "user", "content": question}]))["input_ids"]


def _greedy(model, tokenizer, question: str) -> str:
    """The API's greedy answer to one user message, computed with the backend's own token loop."""
    loaded = LoadedModel(ModelSpec("reference", 1, "sft", Path(), 0), model, tokenizer, "cpu")
    params = GenerationParams(max_tokens=MAX_TOKENS, temperature=0.0)
    return loaded.generate(_prompt_ids(tokenizer, question), params)[0].text


def test_chat_serves_the_sft_and_ppo_policies_the_pipeline_trained(data_dir):
    run_dir = data_dir / "runs" / "job-1"
    for path in ("sft/merged/config.json", "ppo/adapter/adapter_config.json", "ppo/adapter/value_head.pt",
                 "sft/report.json", "ppo/report.json"):
        assert (run_dir / path).is_file(), path

    models, tokenizer = _reference_models(run_dir)
    prompt = torch.tensor([_prompt_ids(tokenizer, QUESTIONS[0])])  # (1, P)
    with torch.inference_mode():
        shift = (models["ppo"](prompt).logits - models["sft"](prompt).logits).abs().max().item()
    assert shift > 0.05, f"PPO's adapter barely changes the policy (max logit change {shift:.2g})"
    expected = {which: [_greedy(model, tokenizer, q) for q in QUESTIONS] for which, model in models.items()}
    assert expected["sft"] != expected["ppo"], "the two policies answer alike: the test could not tell them apart"

    backend = start_backend(data_dir, **CHAT_ENV)
    try:
        with openai.OpenAI(base_url=f"{backend.url}/v1", api_key=CHAT_TOKEN, max_retries=0, timeout=120) as client:
            assert {"job-1/sft", "job-1/ppo"} <= {m.id for m in client.models.list()}
            answers = {which: [client.chat.completions.create(
                model=f"job-1/{which}", messages=[{"role": "user", "content": q}], max_tokens=MAX_TOKENS,
                temperature=0).choices[0].message.content for q in QUESTIONS] for which in ("sft", "ppo")}
    finally:
        backend.stop()
    assert answers == expected
