"""silu_mul: SwiGLU's gating in one kernel against eager torch's ``F.silu(gate) * up``, in units in the last
place of the dtype."""

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, INTERPRET, assert_close

from localkv.kernels import silu_mul, silu_mul_ref

# Units in the last place the kernel's 16-bit results may be from torch's. Both compute silu in fp32 and round
# it, but their fp32 ``exp`` may differ in its last bits, which can flip silu's rounding (rare: 3e-4 of fp16
# elements on an H100, no bf16 one in 58.7M); a flip moves the product by a unit or, when the product's
# exponent is a step above silu's, two. The interpreter also truncates fp32 to bf16 (Triton 3.9) where torch
# rounds to nearest, at each of the two roundings.
MAX_ULPS = {torch.float16: 2, torch.bfloat16: 3 if INTERPRET else 2}


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Representable values between a and b (finite, same 16-bit dtype), elementwise."""

    def ordered(t):   # sign-magnitude bits as integers in the order of the values they encode
        i = t.view(torch.int16).long()
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return (ordered(a) - ordered(b)).abs()


def _check(out: torch.Tensor, gate_up: torch.Tensor) -> None:
    want = silu_mul_ref(gate_up)
    assert out.shape == want.shape and out.dtype == gate_up.dtype
    assert_close(out, want, out.dtype, "silu_mul")
    if out.dtype != torch.float32:
        assert ulps(out, want).max() <= MAX_ULPS[out.dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,F", [(1, 64), (7, 576), (3, 1000), (2, 4096)])
def test_silu_mul_matches_torch(T, F, dtype, kernel_ran):
    gate_up = torch.randn(T, 2 * F, dtype=dtype, device=DEVICE) * 4   # silu's whole range: tail, bend, line
    out = silu_mul(gate_up)
    kernel_ran("silu_mul")
    _check(out, gate_up)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_strided_rows(dtype, kernel_ran):
    """gate_up a column slice of a wider tensor (rows strided), and a leading batch dim."""
    T, F = 5, 1000
    wide = torch.randn(T, 2 * F + 48, dtype=dtype, device=DEVICE) * 4
    gate_up = wide[:, 16:16 + 2 * F]
    _check(silu_mul(gate_up), gate_up)
    kernel_ran("silu_mul")
    batched = torch.randn(2, 3, 2 * 64, dtype=dtype, device=DEVICE)
    _check(silu_mul(batched), batched)


def test_silu_mul_rejects_odd_width():
    with pytest.raises(ValueError, match="even"):
        silu_mul(torch.randn(2, 7, device=DEVICE))
