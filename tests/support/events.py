"""What a run in another process logged, read back from its TensorBoard event files (`<run dir>/tensorboard/`).

Kept apart from `tests.support.runs`, which the GPU run imports: the GPU kit carries no tensorboard."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def event_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every scalar in the event files under `logdir`, in the order written."""
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every point, no sampling
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
