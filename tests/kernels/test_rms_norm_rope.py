"""rms_norm, add_rms_norm and rope: Triton kernels against their torch references (the model's own formulas)."""

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, INTERPRET, assert_close

from localkv.kernels import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref, rope, rope_ref


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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R,N", [(1, 64), (7, 576), (3, 1000), (2, 4096)])
def test_add_rms_norm_matches_torch(R, N, dtype, kernel_ran):
    """The sum as torch's ``x + residual`` rounds it, and the norm of that sum exactly as rms_norm's."""
    x = torch.randn(R, N, dtype=dtype, device=DEVICE) * 3
    h = torch.randn(R, N, dtype=dtype, device=DEVICE)
    w = (1 + 0.1 * torch.randn(N, device=DEVICE)).to(dtype)
    s, out = add_rms_norm(x, h, w, 1e-5)
    kernel_ran("add_rms_norm")
    want_s, want = add_rms_norm_ref(x, h, w, 1e-5)
    assert s.shape == out.shape == x.shape and s.dtype == out.dtype == dtype
    _assert_sum_equal(s, want_s)
    assert torch.equal(out, rms_norm(s, w, 1e-5))          # the same numbers as the norm's own kernel
    assert_close(out, want, dtype, "add_rms_norm")


def test_add_rms_norm_strided_rows_and_fp32_weight(kernel_ran):
    """x a column slice of a wider product (rows strided), bf16 activations with an fp32 weight: the sum stays
    bf16, the norm takes the promoted dtype, as ``weight * x`` does."""
    T, N = 5, 576
    wide = torch.randn(T, N + 64, dtype=torch.bfloat16, device=DEVICE)
    x, h = wide[:, 32:32 + N], torch.randn(T, N, dtype=torch.bfloat16, device=DEVICE)
    w = 1 + 0.1 * torch.randn(N, device=DEVICE)
    s, out = add_rms_norm(x, h, w, 1e-6)
    kernel_ran("add_rms_norm")
    want_s, want = add_rms_norm_ref(x, h, w, 1e-6)
    assert s.dtype == torch.bfloat16 and out.dtype == torch.float32
    _assert_sum_equal(s, want_s)
    assert_close(out, want, torch.bfloat16, "add_rms_norm")


def test_add_rms_norm_rejects_mismatched_residual():
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, torch.randn(1, 64, device=DEVICE), torch.ones(64, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, x.half(), torch.ones(64, device=DEVICE), 1e-5)


def _assert_sum_equal(s: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-equal: both add in fp32 and round once. The interpreter rounds fp32 to bf16 by truncation (Triton
    3.9), a GPU and torch to nearest: under it a bf16 sum may be one unit in the last place off."""
    rtol = 2 ** -7 if INTERPRET and s.dtype == torch.bfloat16 else 0
    torch.testing.assert_close(s, want, rtol=rtol, atol=0)
