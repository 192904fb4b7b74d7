"""Chat model registry and generation: stop strings, seeded sampling, the LRU cache, unloading.

The models are real: a tiny random GPT-2 saved as `base/` and `sft/merged/` with the GPT-2 tokenizer,
and a real peft LoRA adapter as `ppo/adapter/`, in the run directory layout of the brief, loaded by
`edgerlhf.models.load_policy`. `make_run_dir` is shared with the API test.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from backend.chat_models import (ChatModels, GenerationParams, ModelNotFound, StopScanner, available_kinds,
                                 parse_model_id)

N_POSITIONS = 128


def _save_gpt2(path: Path, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from edgerlhf.config import TINY_TOKENIZER_DIR

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=N_POSITIONS))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR).save_pretrained(path)


def make_run_dir(run_dir: Path, with_ppo: bool = True) -> Path:
    """A finished tiny run: config.json, base/, sft/merged + report, ppo/adapter + report."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edgerlhf.config import load_config

    run_dir.mkdir(parents=True, exist_ok=True)
    config = load_config("tiny", {"model": {"n_embd": 32, "n_positions": N_POSITIONS}})
    (run_dir / "config.json").write_text(config.to_json())
    _save_gpt2(run_dir / "base", seed=1)
    _save_gpt2(run_dir / "sft" / "merged", seed=2)
    (run_dir / "sft" / "report.json").write_text(json.dumps({"steps": 0}))
    if with_ppo:
        sft = AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "merged")
        policy = get_peft_model(sft, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM"))
        torch.manual_seed(3)
        with torch.no_grad():  # a trained adapter: B != 0, so the PPO policy differs from SFT
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
        policy.save_pretrained(run_dir / "ppo" / "adapter")
        (run_dir / "ppo" / "report.json").write_text(json.dumps({"steps": 0}))
    return run_dir


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    make_run_dir(runs / "job-1")
    make_run_dir(runs / "job-2", with_ppo=False)
    return runs


# --- stop strings --------------------------------------------------------------------------------


def _feed_all(scanner: StopScanner, pieces: list[str]) -> tuple[list[str], bool]:
    text, deltas, stopped = "", [], False
    for piece in pieces:
        text += piece
        delta, stopped = scanner.feed(text)
        deltas.append(delta)
        if stopped:
            break
    if not stopped:
        deltas.append(scanner.feed(text, final=True)[0])
    return deltas, stopped


def test_stop_marker_is_held_back_and_cut():
    deltas, stopped = _feed_all(StopScanner(["\n\nHuman:"]), [" Hel", "lo.", "\n", "\nHu", "man:", " more"])
    assert stopped
    assert "".join(deltas) == "Hello."
    # The half marker "\n\nHu" was never shown: each delta is a prefix-safe piece of the answer.
    assert deltas[:2] == ["Hel", "lo."] and all("\n" not in d for d in deltas)


def test_partial_marker_that_does_not_complete_is_released():
    deltas, stopped = _feed_all(StopScanner(["\n\nHuman:"]), ["Hi", "\n\nH", "ello"])
    assert not stopped
    assert deltas[1] == "" and "".join(deltas) == "Hi\n\nHello"
    deltas, stopped = _feed_all(StopScanner(["\n\nHuman:"]), ["Hi", "\n\nHum"])  # ends mid-marker: length cut
    assert not stopped and "".join(deltas) == "Hi\n\nHum"


def test_user_stops_incomplete_characters_and_leading_space():
    deltas, stopped = _feed_all(StopScanner(["\n\nHuman:", "END"]), ["  \n", " a", " b E", "N", "D c"])
    assert stopped and "".join(deltas) == "a b "
    scanner = StopScanner([])  # byte-level BPE: "é" may decode as U+FFFD until its second byte arrives
    assert [scanner.feed(" caf"), scanner.feed(" caf\ufffd"), scanner.feed(" café")] == \
        [("caf", False), ("", False), ("é", False)]


# --- model ids and availability --------------------------------------------------------------------


def test_model_ids_and_available_kinds(runs_dir, tmp_path):
    assert parse_model_id("job-12/ppo") == (12, "ppo")
    for bad in ("job-12", "gpt-4o", "job-x/ppo", "job-1/reward", "job-1/ppo/extra"):
        with pytest.raises(ModelNotFound):
            parse_model_id(bad)
    assert available_kinds(runs_dir / "job-1") == ["base", "sft", "ppo"]
    assert available_kinds(runs_dir / "job-2") == ["base", "sft"]
    assert available_kinds(tmp_path / "nothing") == []

    registry = ChatModels(runs_dir, device="cpu")
    jobs = [(1, "succeeded", 0.0), (2, "failed", 0.0), (3, "running", 0.0)]
    assert [s.id for s in registry.list_models(jobs)] == ["job-1/base", "job-1/sft", "job-1/ppo",
                                                          "job-2/base", "job-2/sft"]
    with pytest.raises(ModelNotFound, match="running"):
        registry.resolve("job-3/sft", (3, "running", None))
    with pytest.raises(ModelNotFound, match="no completed ppo"):
        registry.resolve("job-2/ppo", (2, "failed", None))
    with pytest.raises(ModelNotFound, match="no job 9"):
        registry.resolve("job-9/sft", None)


# --- loading, generation, cache --------------------------------------------------------------------


def test_generation_is_seeded_streams_the_same_text_and_honours_stops(runs_dir):
    registry = ChatModels(runs_dir, device="cpu", cache_size=2)
    loaded = registry.get(registry.resolve("job-1/ppo", (1, "succeeded", None)))
    prompt = loaded.encode("\n\nHuman: How far can spiders jump?\n\nAssistant:")
    params = GenerationParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=7, n=2)

    first = loaded.generate(prompt, params)
    pieces: dict[int, list[str]] = {0: [], 1: []}
    second = loaded.generate(prompt, params, on_delta=lambda i, t: pieces[i].append(t))
    assert [c.text for c in first] == [c.text for c in second]
    assert ["".join(pieces[i]) for i in (0, 1)] == [c.text for c in second]
    assert first[0].text and first[0].text != first[1].text  # two samples of one batch differ
    assert all(c.completion_tokens <= 24 for c in first)

    # A stop string taken from the seeded text cuts the same generation right before it.
    text = first[0].text
    words = [w for w in text.split() if len(w) >= 2 and text.find(w) > 0]
    assert words, f"no word to stop at in {text!r}"
    stop = words[len(words) // 2]
    cut = loaded.generate(prompt, GenerationParams(max_tokens=24, top_p=0.9, seed=7, n=2, stop=[stop]))
    assert cut[0].text == text[: text.find(stop)].lstrip()
    assert cut[0].finish_reason == "stop"
    assert cut[0].completion_tokens <= first[0].completion_tokens

    # The KV-cache loop is the model's own: greedy decoding gives what transformers' generate gives.
    import torch

    greedy = loaded.generate(prompt, GenerationParams(max_tokens=16, temperature=0.0))[0]
    with torch.no_grad():
        reference = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                          pad_token_id=loaded.tokenizer.eos_token_id)
    assert greedy.text == loaded.tokenizer.decode(reference[0, len(prompt):], skip_special_tokens=True).lstrip()


def test_ppo_differs_from_sft_and_same_model_is_safe_across_threads(runs_dir):
    registry = ChatModels(runs_dir, device="cpu", cache_size=3)
    sft = registry.get(registry.resolve("job-1/sft", (1, "succeeded", None)))
    ppo = registry.get(registry.resolve("job-1/ppo", (1, "succeeded", None)))
    prompt = sft.encode("\n\nHuman: Hi\n\nAssistant:")
    greedy = GenerationParams(max_tokens=12, temperature=0.0)
    assert sft.generate(prompt, greedy)[0].text != ppo.generate(prompt, greedy)[0].text

    params = GenerationParams(max_tokens=16, seed=3)
    expected = ppo.generate(prompt, params)[0].text
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(ppo.generate(prompt, params)[0].text)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 4


def test_lru_cache_loads_once_evicts_and_unloads(runs_dir):
    from edgerlhf.models import load_policy

    calls: list[tuple[str, str]] = []

    def counting_loader(run_dir, which, device, precision):
        calls.append((Path(run_dir).name, which))
        return load_policy(run_dir, which, device, precision)

    registry = ChatModels(runs_dir, device="cpu", cache_size=2, loader=counting_loader)
    spec = {name: registry.resolve(name, (int(name[4]), "succeeded", None))
            for name in ("job-1/sft", "job-1/ppo", "job-2/sft")}

    got: list = []
    threads = [threading.Thread(target=lambda: got.append(registry.get(spec["job-1/sft"]))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [("job-1", "sft")] and len({id(m) for m in got}) == 1  # loaded once, shared

    registry.get(spec["job-1/ppo"])
    registry.get(spec["job-1/sft"])  # touch: job-1/ppo is now least recently used
    registry.get(spec["job-2/sft"])
    assert registry.cached() == ["job-1/sft", "job-2/sft"]
    assert len(calls) == 3

    assert registry.unload_job(1) == ["job-1/sft"]
    assert registry.cached() == ["job-2/sft"]
    registry.get(spec["job-1/sft"])  # loads again from disk
    assert calls[-1] == ("job-1", "sft") and len(calls) == 4


def test_sampling_draws_from_the_top_p_distribution():
    """The chat's OpenAI settings map onto `edgerlhf.generation.Sampling` (temperature 0: greedy)."""
    import torch

    def sample_next(logits, temperature, top_p, generator):
        return GenerationParams(max_tokens=1, temperature=temperature, top_p=top_p).sampling().draw(logits, generator)

    probs = torch.zeros(50)
    probs[[7, 3, 11]] = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().expand(20_000, -1)  # (N, V): 20k rows sampled in one call
    gen = torch.Generator().manual_seed(0)

    counts = torch.bincount(sample_next(logits, 1.0, 1.0, gen), minlength=50) / 20_000
    assert counts[[7, 3, 11]].tolist() == pytest.approx([0.5, 0.3, 0.2], abs=0.015)
    assert counts.sum() == pytest.approx(1.0) and counts[[7, 3, 11]].sum() == pytest.approx(1.0)
    # top_p=0.75: 0.5 + 0.3 reach it, so token 11 is dropped and the rest renormalised.
    counts = torch.bincount(sample_next(logits, 1.0, 0.75, gen), minlength=50) / 20_000
    assert counts[[7, 3, 11]].tolist() == pytest.approx([0.625, 0.375, 0.0], abs=0.015)
    # temperature 0.5 squares the odds: 25:9:4.
    counts = torch.bincount(sample_next(logits, 0.5, 1.0, gen), minlength=50) / 20_000
    assert counts[[7, 3, 11]].tolist() == pytest.approx([25 / 38, 9 / 38, 4 / 38], abs=0.015)
    assert set(sample_next(logits[:5], 0.0, 1.0, gen).tolist()) == {7}
    assert set(sample_next(logits[:500], 1.0, 0.0, gen).tolist()) == {7}
