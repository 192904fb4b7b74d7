"""The chat models of finished jobs: which exist, a bounded LRU cache of loaded ones, and generation.

Every finished job serves up to three causal LMs, named as OpenAI names models:

    job-12/base   the base model the job started from: `base/` (random init), a local directory, or a
                  hub id that is in the local Hugging Face cache
    job-12/sft    `sft/merged`, the SFT policy
    job-12/ppo    `sft/merged` + `ppo/adapter`, the PPO policy

A model id is a name (`MODEL_ID_FORMAT`), not a path: the job's files are in `contract.job_run_dir`.

A model exists when its job has finished (succeeded, or failed/cancelled after that stage completed)
and its stage wrote its artifacts and `report.json` into the run directory. Models load lazily through
`edgerlhf.models.load_policy`, one at a time in the whole process (`edgerlhf.models.CONSTRUCTION_LOCK`: transformers'
`from_pretrained` patches process-global state while it builds a model), and stay in an LRU cache of
`settings.chat_cache_size` entries. That is also the most models in memory at once, counting one a request still
uses after it left the cache (`hold`): a load beyond it evicts an idle model, or waits for one in use to be released,
and after `wait_seconds` gives up (`ModelsBusy`, the API's 429). One lock per loaded model serializes its generations
(one network, one KV cache at a time on a small GPU), while different models generate in parallel; `admit` bounds
how many requests wait for it. `unload_job(job_id)` drops a deleted job's models.

Generation is a plain token loop with a KV cache (as nanoGPT's `generate`), so it can stream; what it
samples and where it stops come from `edgerlhf.generation`, as for every other generator: each token is
drawn by `Sampling.draw` (temperature, top-p; OpenAI's temperature 0 is greedy), the messages become a
prompt and the answer stops as the model's `edgerlhf.dialogue.PromptFormat` says (its chat template and
end-of-turn token when its tokenizer has one, else the HH text, EOS and the next HH turn marker), or at one
of the request's `stop` strings. The loop owns a
`torch.Generator` per request, so a `seed` gives the same tokens whether the answer is streamed or not
and whatever other requests run at the same time. Text that could be the beginning of a stop string is
held back, so a stream never shows a half stop marker.

This module knows nothing of HTTP; `backend/api/routes/chat.py` maps its errors to OpenAI's.
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgerlhf.contract import (CONFIG_FILE, FINISHED, PPO_ADAPTER, RANDOM_BASE, REPORT_FILE, SFT_MERGED,
                               job_run_dir)
from edgerlhf.dialogue import PromptFormat, StopRule
from edgerlhf.errors import ModelLoadError

log = logging.getLogger("edgerlhf.chat")

KINDS = ("base", "sft", "ppo")
"""Policies a job can serve, in pipeline order."""

MODEL_ID_FORMAT = "job-{job_id}/{which}"
"""The OpenAI model id of one policy of one job, e.g. `job-12/ppo`: written by `model_id`, read by `parse_model_id`."""
MODEL_ID = re.compile("^" + MODEL_ID_FORMAT.format(job_id=r"(\d+)", which=f"({'|'.join(KINDS)})") + "$")


class ChatModelError(Exception):
    """Base class of the registry's errors (the API maps each to an OpenAI error)."""


class ModelNotFound(ChatModelError):
    """No such model: malformed id, unknown or unfinished job, or the stage did not complete."""


class ModelsBusy(ChatModelError):
    """No room for another model in memory: every loaded one is in use (`hold`). Try again in `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 5):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class ModelSpec:
    """One servable model."""

    id: str
    """OpenAI model id, e.g. `job-12/ppo`."""
    job_id: int
    which: str
    """`base`, `sft` or `ppo` (the `which` of `load_policy`)."""
    run_dir: Path
    created: int
    """Unix time the job finished (or was created), for OpenAI's `created`."""


def model_id(job_id: int, which: str) -> str:
    return MODEL_ID_FORMAT.format(job_id=job_id, which=which)


def parse_model_id(name: str) -> tuple[int, str]:
    """`"job-12/ppo"` -> `(12, "ppo")`; raises `ModelNotFound` for anything else."""
    match = MODEL_ID.match(name or "")
    if not match:
        raise ModelNotFound(f"The model `{name}` does not exist. Model ids look like `job-12/ppo`; "
                            "GET /v1/models lists them.")
    return int(match.group(1)), match.group(2)


def _stage_done(run_dir: Path, stage: str) -> bool:
    # run_stage writes <stage>/report.json only after the stage returned, so its artifacts are complete.
    return (run_dir / stage / REPORT_FILE).is_file()


def _base_available(run_dir: Path) -> bool:
    if (run_dir / RANDOM_BASE / "config.json").is_file():
        return True
    try:  # not random-init: the base is the config's local directory or hub id
        model = json.loads((run_dir / CONFIG_FILE).read_text()).get("model", {})
    except (OSError, ValueError):
        return False
    name = str(model.get("name_or_path") or "")
    if model.get("random_init") or not name:
        return False
    if os.path.isdir(os.path.expanduser(name)):
        return True
    try:  # a hub id serves only when it is in the local cache: chat must not wait on an unreachable hub
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an invalid repo id, a broken cache: no base model then
        return False


def available_kinds(run_dir: Path) -> list[str]:
    """The policies a finished run directory can serve, in pipeline order."""
    run_dir = Path(run_dir)
    kinds = []
    sft = _stage_done(run_dir, "sft") and (run_dir / SFT_MERGED / "config.json").is_file()
    if sft and _base_available(run_dir):
        kinds.append("base")
    if sft:
        kinds.append("sft")
    if sft and _stage_done(run_dir, "ppo") and (run_dir / PPO_ADAPTER / "adapter_config.json").is_file():
        kinds.append("ppo")
    return kinds


# --- stop strings --------------------------------------------------------------------------------


class StopScanner:
    """Turns the growing decoded text of one completion into safe-to-show deltas.

    `feed(text)` takes the whole decoded completion so far and returns `(delta, stopped)`: the new
    text that can be shown, and whether a stop string was found (the text before it is final). Where
    the text ends is `edgerlhf.dialogue.StopRule`'s answer, the rule every generator stops by; this
    class only adds what streaming needs: a suffix that may still become a stop string, or an
    incomplete UTF-8 character (U+FFFD), is held back until the next token decides. Leading whitespace
    is dropped: models answer `prompt + " " + response`, and OpenAI's content starts with the first word.
    """

    def __init__(self, stops: Iterable[str]):
        self.rule = StopRule(stops)
        self.sent = ""
        self.stopped = False

    def _visible(self, text: str, final: bool) -> str:
        end = self.rule.find(text)
        if end >= 0:
            self.stopped = True
        elif final:
            end = len(text)
        else:
            held = self.rule.pending(text)
            while held < len(text) and text[len(text) - held - 1] == "\ufffd":
                held += 1
            end = len(text) - held
        return text[:end].lstrip()

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        visible = self._visible(text, final)
        # Byte-level BPE decodes prefix-stably, so `visible` extends what was sent; be safe if not.
        delta = visible[len(self.sent):] if visible.startswith(self.sent) else ""
        self.sent += delta
        return delta, self.stopped


# --- generation ----------------------------------------------------------------------------------


@dataclass
class Choice:
    """One finished completion."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    """`stop` (stop string or EOS), `length` (max_tokens) or `cancelled` (client went away)."""
    completion_tokens: int = 0


@dataclass
class GenerationParams:
    """A chat request's generation settings, in OpenAI's terms."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    """The request's own stop strings, on top of the model's (`PromptFormat.stop_rule`)."""
    seed: int | None = None
    n: int = 1

    def sampling(self):
        """The `edgerlhf.generation.Sampling` these settings ask for: temperature 0 means greedy, as in
        OpenAI's API (OpenAI has no top-k)."""
        from edgerlhf.generation import Sampling

        if self.temperature <= 0:
            return Sampling(greedy=True)
        return Sampling(temperature=self.temperature, top_p=self.top_p)


class LoadedModel:
    """A policy in memory with its tokenizer; `generate` is serialized by `lock`."""

    def __init__(self, spec: ModelSpec, model, tokenizer, device):
        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.lock = threading.Lock()
        self.pending = 0
        """Requests admitted to generate with this model and not done yet (one generates, the others wait)."""
        self._pending_lock = threading.Lock()
        from edgerlhf.generation import context_length

        self.context_length = context_length(model)
        self.format = PromptFormat.of(tokenizer)
        # Only the last position's logits are needed: (N, P, V) logits of a long prompt would cost
        # P x 50k floats per completion (hundreds of MB for n=8 on a small GPU).
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._forward_kwargs = ({"logits_to_keep": 1}
                                if "logits_to_keep" in inspect.signature(inner.forward).parameters else {})

    def admit(self, max_waiting: int) -> bool:
        """Take a place in this model's queue: False when `max_waiting` requests already wait behind the one
        generating. Give it back with `leave`."""
        with self._pending_lock:
            if self.pending > max_waiting:
                return False
            self.pending += 1
            return True

    def leave(self) -> None:
        with self._pending_lock:
            self.pending -= 1

    def encode(self, text: str) -> list[int]:
        """Token ids of model text (a rendered prompt)."""
        return self.tokenizer(text, add_special_tokens=self.format.add_special_tokens)["input_ids"]

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of OpenAI messages in this model's format (its chat template, or HH text)."""
        return self.encode(self.format.chat(messages))

    def generate(self, prompt_ids: list[int], params: GenerationParams,
                 on_delta: Callable[[int, str], None] | None = None,
                 cancel: threading.Event | None = None) -> list[Choice]:
        """Sample `params.n` completions of the prompt; `on_delta(index, text)` gets each new piece of text."""
        import torch

        sampling = params.sampling()
        choices = [Choice(i) for i in range(params.n)]
        stop_ids = set(self.format.stop_token_ids)
        scanners = [StopScanner(self.format.stop_rule(params.stop).stops) for _ in range(params.n)]
        tokens: list[list[int]] = [[] for _ in range(params.n)]

        def emit(i: int, final: bool = False) -> None:
            text = self.tokenizer.decode(tokens[i], skip_special_tokens=True, clean_up_tokenization_spaces=False)
            delta, stopped = scanners[i].feed(text, final=final)
            if delta:
                choices[i].text += delta
                if on_delta is not None:
                    on_delta(i, delta)
            if stopped and choices[i].finish_reason is None:
                choices[i].finish_reason = "stop"

        waited = time.monotonic()
        with self.lock, torch.inference_mode():
            start = time.monotonic()
            generator = torch.Generator(device=self.device)
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed)
            # All n completions share the prompt, so they batch without padding.
            step_ids = torch.tensor([prompt_ids] * params.n, dtype=torch.long, device=self.device)  # (N, P)
            past = None
            for _ in range(params.max_tokens):
                if cancel is not None and cancel.is_set():
                    for choice in choices:
                        choice.finish_reason = choice.finish_reason or "cancelled"
                    break
                out = self.model(input_ids=step_ids, past_key_values=past, use_cache=True, **self._forward_kwargs)
                past = out.past_key_values
                next_ids = sampling.draw(out.logits[:, -1, :], generator)  # (N,)
                for i, token in enumerate(next_ids.tolist()):
                    if choices[i].finish_reason is not None:
                        continue
                    choices[i].completion_tokens += 1
                    if token in stop_ids:
                        emit(i, final=True)
                        choices[i].finish_reason = "stop"
                        continue
                    tokens[i].append(token)
                    emit(i)
                if all(c.finish_reason is not None for c in choices):
                    break
                step_ids = next_ids[:, None]  # (N, 1)
            for i, choice in enumerate(choices):
                if choice.finish_reason is None:
                    emit(i, final=True)  # release held-back text: it did not become a stop string
                    choice.finish_reason = choice.finish_reason or "length"
        took = time.monotonic() - start
        tokens_out = sum(c.completion_tokens for c in choices)
        log.info(f"chat: {self.spec.id} generated {tokens_out} tokens in {took:.2f}s "
                 f"({tokens_out / max(took, 1e-9):.0f} tok/s, waited {start - waited:.2f}s for the model), "
                 f"finish={','.join(sorted({c.finish_reason or '' for c in choices}))}",
                 extra={"job_id": self.spec.job_id})
        return choices


def check_messages(messages: list[dict[str, str]]) -> None:
    """Raise ValueError (`DialogueError`) for messages no model can answer: unknown role, no user message..."""
    from edgerlhf.dialogue import render_chat

    render_chat(messages)


# --- the registry --------------------------------------------------------------------------------


class ChatModels:
    """Which models exist (from the job table and run directories) and an LRU cache of loaded ones."""

    def __init__(self, runs_dir: Path, device: str = "auto", cache_size: int = 2, precision: str = "bf16",
                 loader: Callable[..., tuple[Any, Any]] | None = None, wait_seconds: float = 30.0):
        self.runs_dir = Path(runs_dir)
        self.device_spec = device
        self.cache_size = max(1, int(cache_size))
        """The most models in memory at once: cached, or still used by a request after leaving the cache."""
        self.precision = precision
        self.wait_seconds = wait_seconds
        """How long a load waits for room (a model in use to be released) before `ModelsBusy`."""
        self._loader = loader
        self._cache: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()  # guards _cache, _loading, _epoch, _users, _reserved
        self._room = threading.Condition(self._lock)  # notified when a model is released or dropped
        self._loading: dict[str, threading.Lock] = {}  # one load at a time per model id
        self._epoch: dict[int, int] = {}  # bumped by unload_job so a load racing a delete is discarded
        self._users: dict[LoadedModel, int] = {}  # models held by requests (`hold`), cached or not
        self._reserved = 0  # loads under way, each counted as a model in memory

    # --- which models exist ----------------------------------------------------------------------

    def list_models(self, jobs: Iterable[tuple[int, str, float | None]]) -> list[ModelSpec]:
        """Specs of every servable model; `jobs` yields `(job_id, status, finished_unix_time)`."""
        specs = []
        for job_id, status, finished in jobs:
            if status not in FINISHED:
                continue
            run_dir = job_run_dir(self.runs_dir, job_id)
            for which in available_kinds(run_dir):
                specs.append(ModelSpec(model_id(job_id, which), job_id, which, run_dir, int(finished or 0)))
        return specs

    def resolve(self, name: str, job: tuple[int, str, float | None] | None) -> ModelSpec:
        """The spec of model `name`, given its job's `(id, status, finished)` (None: no such job)."""
        job_id, which = parse_model_id(name)
        if job is None or job[0] != job_id:
            raise ModelNotFound(f"The model `{name}` does not exist: there is no job {job_id}.")
        if job[1] not in FINISHED:
            raise ModelNotFound(f"The model `{name}` does not exist yet: job {job_id} is {job[1]}; "
                                "its models are served once it has finished.")
        run_dir = job_run_dir(self.runs_dir, job_id)
        if which not in available_kinds(run_dir):
            raise ModelNotFound(f"The model `{name}` does not exist: job {job_id} has no completed "
                                f"{which} stage (it serves {available_kinds(run_dir) or 'no models'}).")
        return ModelSpec(name, job_id, which, run_dir, int(job[2] or 0))

    # --- the cache -------------------------------------------------------------------------------

    def cached(self) -> list[str]:
        """Ids of the loaded models, least recently used first."""
        with self._lock:
            return list(self._cache)

    def in_memory(self) -> list[str]:
        """Ids of every model in memory: the cached ones and those a request still holds after eviction."""
        with self._lock:
            return sorted({m.spec.id for m in self._models_in_memory()})

    def _models_in_memory(self) -> set[LoadedModel]:
        return set(self._cache.values()) | {m for m, n in self._users.items() if n}

    def get(self, spec: ModelSpec) -> LoadedModel:
        """The loaded model for `spec`, loading it (once, even under concurrent requests) if needed."""
        return self._get(spec, hold=False)

    @contextmanager
    def hold(self, spec: ModelSpec) -> Iterator[LoadedModel]:
        """The loaded model for `spec`, kept in memory (counted against `cache_size`) until the block ends."""
        loaded = self._get(spec, hold=True)
        try:
            yield loaded
        finally:
            self.release(loaded)

    def acquire(self, spec: ModelSpec) -> LoadedModel:
        """`hold` for code that releases elsewhere (a stream's worker thread): call `release(model)` once."""
        return self._get(spec, hold=True)

    def release(self, loaded: LoadedModel) -> None:
        with self._room:
            left = self._users.get(loaded, 0) - 1
            if left > 0:
                self._users[loaded] = left
            else:
                self._users.pop(loaded, None)
            self._room.notify_all()

    def _cached(self, spec: ModelSpec, hold: bool) -> LoadedModel | None:
        """The cached model (marked in use with `hold`), or None; under `_lock`."""
        loaded = self._cache.get(spec.id)
        if loaded is not None:
            self._cache.move_to_end(spec.id)
            if hold:
                self._users[loaded] = self._users.get(loaded, 0) + 1
        return loaded

    def _get(self, spec: ModelSpec, hold: bool) -> LoadedModel:
        with self._lock:
            loaded = self._cached(spec, hold)
            if loaded is not None:
                return loaded
            load_lock = self._loading.setdefault(spec.id, threading.Lock())
            epoch = self._epoch.get(spec.job_id, 0)
        with load_lock:
            with self._lock:  # another request may have loaded it while we waited
                loaded = self._cached(spec, hold)
                if loaded is not None:
                    return loaded
            evicted = self._make_room(spec)
            if evicted:
                log.info(f"chat: evicted {', '.join(evicted)} (at most {self.cache_size} models in memory)")
                _free_memory()
            try:
                loaded = self._load(spec)
            finally:
                with self._room:
                    self._reserved -= 1
                    self._room.notify_all()
            with self._lock:
                self._loading.pop(spec.id, None)
                if self._epoch.get(spec.job_id, 0) != epoch:
                    raise ModelNotFound(f"The model `{spec.id}` was deleted while it was loading.")
                self._cache[spec.id] = loaded
                if hold:
                    self._users[loaded] = self._users.get(loaded, 0) + 1
            return loaded

    def _make_room(self, spec: ModelSpec) -> list[str]:
        """Reserve room for one more model: evict idle cached models (least recently used first), or wait for one in
        use to be released; `ModelsBusy` after `wait_seconds`. Returns the evicted ids."""
        evicted = []
        deadline = time.monotonic() + self.wait_seconds
        with self._room:
            while len(self._models_in_memory()) + self._reserved >= self.cache_size:
                idle = next((key for key, m in self._cache.items() if not self._users.get(m)), None)
                if idle is not None:
                    del self._cache[idle]
                    evicted.append(idle)
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ModelsBusy(f"The server holds its most models ({self.cache_size}, EDGERLHF_CHAT_CACHE_SIZE) "
                                     f"and every one is in use; `{spec.id}` cannot be loaded now. Try again shortly.",
                                     retry_after=max(1, round(self.wait_seconds)))
                self._room.wait(left)
            self._reserved += 1
        return evicted

    def _load(self, spec: ModelSpec) -> LoadedModel:
        from edgerlhf.models import CONSTRUCTION_LOCK, resolve_device

        loader = self._loader
        if loader is None:
            from edgerlhf.models import load_policy as loader
        device = resolve_device(self.device_spec)
        start = time.monotonic()
        try:
            with CONSTRUCTION_LOCK:  # one model built at a time in this process (chat and export)
                model, tokenizer = loader(spec.run_dir, spec.which, device, self.precision)
        except Exception as exc:  # the API answers 500 with this message; the log keeps the traceback
            log.exception(f"chat: loading {spec.id} failed")
            raise ModelLoadError(f"The model `{spec.id}` could not be loaded: {type(exc).__name__}: {exc}") from exc
        model.eval()
        log.info(f"chat: loaded {spec.id} on {device} in {time.monotonic() - start:.1f}s", extra={"job_id": spec.job_id})
        return LoadedModel(spec, model, tokenizer, device)

    def unload_job(self, job_id: int) -> list[str]:
        """Drop every cached model of a job (its run directory is going away); returns their ids."""
        with self._lock:
            self._epoch[job_id] = self._epoch.get(job_id, 0) + 1
            gone = [key for key, loaded in self._cache.items() if loaded.spec.job_id == job_id]
            for key in gone:
                del self._cache[key]
            self._room.notify_all()
        if gone:
            log.info(f"chat: unloaded {', '.join(gone)}", extra={"job_id": job_id})
            _free_memory()
        return gone

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self._room.notify_all()
        _free_memory()


def _free_memory() -> None:
    # A request still generating with an evicted model holds a reference; its memory goes when it ends.
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


# --- the process-wide registry -------------------------------------------------------------------

_registry: ChatModels | None = None
_registry_lock = threading.Lock()


def get_registry(settings=None) -> ChatModels:
    """The backend's registry for `settings` (default: `get_settings()`); rebuilt if the data dir changes."""
    global _registry
    if settings is None:
        from edgerlhf.settings import get_settings

        settings = get_settings()
    with _registry_lock:
        if _registry is None or _registry.runs_dir != Path(settings.runs_dir):
            # Plain (unquantized) weights: load_policy computes them in bf16 on a GPU, in fp32 on the CPU.
            _registry = ChatModels(settings.runs_dir, device=settings.device,
                                   cache_size=settings.chat_cache_size, precision="bf16",
                                   wait_seconds=settings.chat_wait_seconds)
        return _registry


def unload_job(job_id: int) -> list[str]:
    """Drop a deleted job's models from the cache (called by the jobs API on DELETE)."""
    with _registry_lock:
        registry = _registry
    return registry.unload_job(int(job_id)) if registry is not None else []
