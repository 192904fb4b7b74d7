"""The GPU itself: CUDA starts, bf16 is supported (the compute dtype of every stage on a GPU) and computes."""

from __future__ import annotations

import pytest
import torch

from edgerlhf.models import compute_dtype, resolve_device

pytestmark = pytest.mark.gpu


def test_cuda_computes_in_bf16(record):
    device = resolve_device("auto")
    assert device.type == "cuda"
    assert compute_dtype(device) == torch.bfloat16, "bf16 needs an Ampere or newer GPU"
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(256, 256, device=device, generator=g)
    b = torch.randn(256, 256, device=device, generator=g)
    exact = a.double() @ b.double()
    product = (a.bfloat16() @ b.bfloat16()).double()
    assert product.dtype == torch.float64 and product.device.type == "cuda"
    # bf16 keeps 8 bits of mantissa: each product term is off by ~2^-8 relative, the sum of 256 by ~16 * 2^-8.
    error = ((product - exact).abs().max() / exact.abs().max()).item()
    assert 0 < error < 0.02, error
    record(device=torch.cuda.get_device_name(device), bf16_matmul_relative_error=error)
