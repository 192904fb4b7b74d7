"""Out-of-memory recovery: a step that runs out of memory is retried on half the micro-batch, same maths.

Every stage cuts its batch into micro-batches for the forward/backward passes (SFT and reward:
`batch_size` rows per device step; PPO: `mini_batch_size` rollouts per pass; evaluation: prompts per
`generate` call). When a step raises an out-of-memory error, `MicroBatch.shrink` frees what the failed
attempt held, halves the micro-batch, records a warning (`ctx.log(..., "warning")` and the metric
`mem/micro_batch`, which the dashboard's alerts show), and the step runs again from its start. The
effective batch does not change: the halves are accumulated, each loss weighted by its share of the batch,
so the gradients are those of the whole micro-batch. Below `MicroBatch.floor` rows the stage fails with
`OutOfMemory`, quoting the memory planner's estimate for the configuration.

`allocation_limit` makes the error reproducible on any machine: with `EDGERLHF_MAX_ALLOC_MB` set, any
tensor operation whose result needs more than that many MB raises `torch.OutOfMemoryError`, as CUDA's
allocator does when a request does not fit (the tests use it to run out of memory on a CPU).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

from edgerlhf.contract import MICRO_BATCH_METRIC
from edgerlhf.errors import StageError
from edgerlhf.memory import free_memory

MAX_ALLOC_ENV = "EDGERLHF_MAX_ALLOC_MB"

T = TypeVar("T")


class OutOfMemory(StageError):
    """A step ran out of memory even at the smallest micro-batch."""


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's `torch.OutOfMemoryError`, or the CPU allocator's failure (a RuntimeError that says so)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class MicroBatch:
    """The current micro-batch size of one stage's steps, halved on each out-of-memory error."""

    def __init__(self, size: int, what: str, ctx=None, device=None, floor: int = 1,
                 planner_hint: Callable[[], str] | None = None):
        self.size = size
        self.initial = size
        self.what = what
        self.ctx = ctx
        self.device = device
        self.floor = floor
        self.planner_hint = planner_hint

    def shrink(self, exc: BaseException, step: int) -> None:
        """Halve after `exc`, an out-of-memory error at `step`; raise `OutOfMemory` below the floor."""
        free_memory(self.device)
        if self.size // 2 < self.floor:
            hint = self.planner_hint() if self.planner_hint else ""
            raise OutOfMemory(f"{self.what} ran out of memory at step {step} even with a micro-batch of "
                              f"{self.size} ({exc}). {hint}".strip()) from exc
        self.size //= 2
        message = (f"{self.what}: out of memory at step {step}; retrying with micro-batch {self.size} "
                   f"(accumulating {math.ceil(self.initial / self.size)}x, same effective batch)")
        if self.ctx is not None:
            self.ctx.log(message, "warning")
            self.ctx.log_metrics({MICRO_BATCH_METRIC: float(self.size)}, step)

    def run(self, step: int, attempt: Callable[[int], T]) -> T:
        """`attempt(micro_batch_size)`, retried with half the size after each out-of-memory error."""
        while True:
            try:
                return attempt(self.size)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                self.shrink(exc, step)


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most `size` rows covering `range(n)`."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class _AllocationLimit(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self, max_bytes: int):
        super().__init__()
        self.max_bytes = max_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Only new storages count: a view (a transpose, a slice) allocates nothing.
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and not t.is_meta}
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta and \
                    tensor.untyped_storage().data_ptr() not in inputs and \
                    tensor.untyped_storage().nbytes() > self.max_bytes:
                raise torch.OutOfMemoryError(
                    f"{func} needed {tensor.untyped_storage().nbytes() / 2**20:.1f} MiB, over the "
                    f"{self.max_bytes / 2**20:.1f} MiB limit of {MAX_ALLOC_ENV}")
        return out


@contextmanager
def allocation_limit(max_mb: float | None = None):
    """Within the block, a result larger than `max_mb` (default: `$EDGERLHF_MAX_ALLOC_MB`; unset: no limit)
    raises `torch.OutOfMemoryError` where it was allocated."""
    if max_mb is None:
        max_mb = float(os.environ[MAX_ALLOC_ENV]) if os.environ.get(MAX_ALLOC_ENV) else None
    if max_mb is None:
        yield
        return
    with _AllocationLimit(int(max_mb * 2**20)):
        yield


class SplitOnOutOfMemory:
    """A `transformers.Trainer` mixin: a training step that runs out of memory is retried in smaller pieces.

    The step's micro-batch is cut into `self.micro.size`-row pieces whose losses, each weighted by its share
    of the micro-batch's loss (`loss_share`), accumulate into the same gradients; gradients accumulated by
    a failed attempt, the first one at full size included (an error in the backward leaves the gradients of
    the layers it already passed), are rolled back first. Subclasses say how their batches split (`rows`,
    `part`) and weigh (`loss_share`); set `self.micro` before training.
    """

    micro: MicroBatch
    _loss_weight = 1.0

    def rows(self, inputs) -> int:
        return len(inputs["input_ids"])

    def part(self, inputs, rows: slice):
        return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() and len(v) == self.rows(inputs) else v
                for k, v in inputs.items()}

    def loss_share(self, part, inputs, num_items_in_batch) -> float:
        return self.rows(part) / self.rows(inputs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = super(SplitOnOutOfMemory, self).training_step
        trainable = [p for p in model.parameters() if p.requires_grad]

        def attempt(size: int):
            n = self.rows(inputs)
            saved = [None if p.grad is None else p.grad.clone() for p in trainable]
            try:
                if size >= n:
                    return step(model, inputs, num_items_in_batch)
                total = 0.0
                for rows in chunks(n, size):
                    piece = self.part(inputs, rows)
                    self._loss_weight = self.loss_share(piece, inputs, num_items_in_batch)
                    total = total + step(model, piece, num_items_in_batch)
                return total
            except Exception:
                for p, grad in zip(trainable, saved):
                    p.grad = grad
                raise
            finally:
                self._loss_weight = 1.0

        return self.micro.run(self.state.global_step + 1, attempt)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The evaluation loop's step, split the same way (losses weighted; logits and labels concatenated)."""
        step = super(SplitOnOutOfMemory, self).prediction_step

        def attempt(size: int):
            n = self.rows(inputs)
            if size >= n:
                return step(model, inputs, prediction_loss_only, ignore_keys)
            outs = []
            try:
                for rows in chunks(n, size):
                    piece = self.part(inputs, rows)
                    self._loss_weight = self.loss_share(piece, inputs, None)
                    outs.append(step(model, piece, prediction_loss_only, ignore_keys))
            finally:
                self._loss_weight = 1.0
            losses, logits, labels = zip(*outs)
            loss = None if losses[0] is None else sum(losses)
            return (loss, None if logits[0] is None else torch.cat(logits),
                    None if labels[0] is None else torch.cat(labels))

        return self.micro.run(self.state.global_step, attempt)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self._loss_weight == 1.0:
            return out
        if return_outputs:
            return out[0] * self._loss_weight, out[1]
        return out * self._loss_weight


def planner_hint(config, stage: str) -> str:
    """What the memory planner says of `stage` under `config`, for the message of a stage that ran out."""
    try:
        from edgerlhf.models import resolve_device
        from edgerlhf.plan import plan

        device = resolve_device(config.device)
        report = plan(config, device="cuda" if device.type == "cuda" else "cpu")
        stage_plan = next(s for s in report.stages if s.stage == stage)
    except Exception as exc:  # a hint must never hide the out-of-memory error itself
        return f"(the memory planner could not estimate it: {exc})"
    return f"The memory planner estimates this stage's peak at {stage_plan.peak_bytes / 2**30:.2f} GiB: " \
           f"run `edgerlhf plan` for the itemised estimate and the cheapest change that fits."


class SplitPairsOnOutOfMemory(SplitOnOutOfMemory):
    """`SplitOnOutOfMemory` for preference batches: B chosen rows, then B rejected rows (TRL's collators), so a
    piece takes the same pairs from both halves (the reward and DPO stages)."""

    def rows(self, inputs) -> int:
        return len(inputs["input_ids"]) // 2

    def part(self, inputs, rows: slice):
        n = self.rows(inputs)
        both = torch.cat([torch.arange(n)[rows], torch.arange(n)[rows] + n])
        return {k: (v[both] if len(v) == 2 * n else v[rows]) if isinstance(v, torch.Tensor) and v.dim() else v
                for k, v in inputs.items()}
