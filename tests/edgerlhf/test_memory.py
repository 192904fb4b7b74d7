"""Peak memory, the one way every stage and benchmark measures it (edgerlhf.memory): a peak is measured
from the last `reset_peak`, and it sees an allocation that is gone again by the time it is read."""

import os

import pytest
import torch

from edgerlhf import memory


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable VmHWM")
def test_cpu_peak_starts_at_the_reset_and_catches_a_spike():
    cpu = torch.device("cpu")
    spike = torch.ones(50_000_000)  # 200 MB, written, so resident
    del spike
    memory.reset_peak(cpu)
    start = memory.peak_mb(cpu)
    assert start < memory.current_mb(cpu) + 100, "the earlier 200 MB spike survived the reset"
    spike = torch.ones(50_000_000)
    del spike
    assert memory.peak_mb(cpu) >= start + 150  # freed before the reading, still in the peak
