"""Chat model registry and generation: stop strings, seeded sampling, the LRU cache, unloading.

The models are real: a tiny random GPT-2 saved as `base/` and `sft/merged/` with the GPT-2 tokenizer,
and a real peft LoRA adapter as `ppo/adapter/`, in the run directory layout of the brief, loaded by
`edgerlhf.models.load_policy` (`tests/support/runs.py`: `make_run_dir`).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from backend.chat_models import (ChatModels, GenerationParams, ModelNotFound, StopScanner, available_kinds,
                                 parse_model_id)
from tests.support.runs import make_run_dir


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


def _process_globals():
    """What transformers' `from_pretrained` patches while it builds a model and must put back."""
    import torch
    from transformers import PreTrainedModel

    return {"tie_weights": PreTrainedModel.tie_weights, "init_weights": PreTrainedModel.init_weights,
            "linspace": torch.linspace, "normal_": torch.nn.init.normal_}


def test_concurrent_first_loads_of_different_models_all_succeed(runs_dir, tmp_path):
    """Eight different models (four jobs' base and sft) loaded at once by eight threads, as eight first chat requests
    would: every load succeeds, generates, and leaves transformers' process-global state as it found it."""
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(runs_dir / "job-1", runs / "job-1")
    for job in (2, 3, 4):
        shutil.copytree(runs_dir / "job-2", runs / f"job-{job}")
    registry = ChatModels(runs, device="cpu", cache_size=8)
    specs = [registry.resolve(f"job-{j}/{w}", (j, "succeeded", None)) for j in (1, 2, 3, 4) for w in ("base", "sft")]
    before = _process_globals()
    barrier = threading.Barrier(len(specs))
    errors: list[str] = []

    def first_request(spec):
        barrier.wait()
        try:
            loaded = registry.get(spec)
            loaded.generate(loaded.encode("\n\nHuman: Hi\n\nAssistant:"), GenerationParams(max_tokens=2, seed=0))
        except Exception as exc:  # noqa: BLE001 - collected, asserted below
            errors.append(f"{spec.id}: {type(exc).__name__}: {exc}")

    try:
        threads = [threading.Thread(target=first_request, args=(spec,)) for spec in specs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = _process_globals()
    finally:  # a broken load must not break the rest of this test process
        import torch
        from transformers import PreTrainedModel

        PreTrainedModel.tie_weights, PreTrainedModel.init_weights = before["tie_weights"], before["init_weights"]
        torch.linspace, torch.nn.init.normal_ = before["linspace"], before["normal_"]
    assert errors == []
    assert after == before
    assert sorted(registry.cached()) == sorted(s.id for s in specs)


def test_models_loaded_or_in_use_are_bounded_a_load_waits_for_a_slot_or_is_refused(runs_dir):
    """At most `cache_size` models in memory, counting the ones a request still uses after eviction: a load beyond it
    evicts an idle model, waits for a busy one to be released, or after `wait_seconds` raises `ModelsBusy`."""
    from backend.chat_models import ModelsBusy

    registry = ChatModels(runs_dir, device="cpu", cache_size=1, wait_seconds=0.5)
    sft = registry.resolve("job-1/sft", (1, "succeeded", None))
    other = registry.resolve("job-2/sft", (2, "failed", None))
    with registry.hold(sft):
        with pytest.raises(ModelsBusy):
            with registry.hold(other):
                pass
        assert registry.in_memory() == ["job-1/sft"]

    # A waiting load gets the slot once the model in use is released (a thread waits; the holder releases).
    got: list[str] = []
    held = registry.hold(sft)
    held.__enter__()
    waiter = threading.Thread(target=lambda: got.append(registry.get(other).spec.id))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and got == []  # waiting: job-1/sft is in use
    held.__exit__(None, None, None)
    waiter.join(30)
    assert got == ["job-2/sft"] and registry.in_memory() == ["job-2/sft"]
    registry.get(sft)  # idle models are simply evicted
    assert registry.in_memory() == ["job-1/sft"]
