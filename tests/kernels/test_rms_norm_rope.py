"""rms_norm and rope: Triton kernels against their torch references (the model's own formulas)."""

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, assert_close

from localkv.kernels import rms_norm, rms_norm_ref, rope, rope_ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R,N", [(1, 64), (7, 576), (3, 1000)])
def test_rms_norm_matches_reference(R, N, dtype, kernel_ran):
    x = torch.randn(R, N, dtype=dtype, device=DEVICE) * 3
    w = (1 + 0.1 * torch.randn(N, device=DEVICE)).to(dtype)
    out = rms_norm(x, w, 1e-5)
    kernel_ran("rms_norm")
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, rms_norm_ref(x, w, 1e-5), dtype, "rms_norm")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,H,D", [(1, 8, 64), (5, 3, 128), (2, 17, 80)])
def test_rope_matches_reference_on_strided_input(T, H, D, dtype, kernel_ran):
    """x is a column slice of a fused projection (rows strided), as the model hands it over."""
    fused = torch.randn(T, (H + 2) * D, dtype=dtype, device=DEVICE)
    x = fused[:, D:(H + 1) * D].view(T, H, D)
    ang = torch.rand(T, D // 2, device=DEVICE) * 100
    cos = torch.cat((ang, ang), -1).cos().to(dtype)
    sin = torch.cat((ang, ang), -1).sin().to(dtype)
    out = rope(x, cos, sin)
    kernel_ran("rope")
    assert out.shape == (T, H, D) and out.dtype == dtype
    want = rope_ref(x.float(), cos.float(), sin.float())   # fp32 math: the kernel rounds once, at the end
    assert_close(out, want, dtype, "rope")
