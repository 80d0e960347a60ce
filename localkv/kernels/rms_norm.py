"""RMSNorm in one pass: ``weight * (x / sqrt(mean(x²) + eps))``, normalised in fp32 whatever x's dtype.

The rounding follows the reference implementation (transformers' LlamaRMSNorm): the normalised row is rounded
to x's dtype, then multiplied by the weight. In eager torch that is six kernels a norm; a decode step of an
8B model runs 65 norms, so on a GPU the launches alone cost more than the reads. One program per row.
"""

from __future__ import annotations

import torch

from ._common import KERNEL_CALLS, check, next_pow2, tl, triton, use_triton


@triton.jit
def _rms_norm_kernel(
    x_ptr, stride_xr,        # x (R, N): elements between rows; last dim contiguous
    w_ptr,                   # weight (N,)
    out_ptr, stride_or,      # out (R, N): elements between rows
    N, eps,
    BLOCK_N: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    x = tl.load(x_ptr + r * stride_xr + offs, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)            # rsqrt of the mean square, fp32
    y = (xf * inv).to(x.dtype)                                    # rounded like the reference, then scaled
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = y.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + r * stride_or + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Torch RMSNorm, as transformers computes it."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the rows of ``x`` (..., N) with ``weight`` (N,); the result has the dtype of ``weight * x``."""
    N = x.shape[-1]
    check(weight.shape == (N,), f"weight {tuple(weight.shape)}: want ({N},)")
    if not use_triton(x, weight) or N > 65536:
        return rms_norm_ref(x, weight, eps)
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x2.shape[0]:
        KERNEL_CALLS["rms_norm"] += 1
        BLOCK_N = next_pow2(N)
        _rms_norm_kernel[(x2.shape[0],)](x2, x2.stride(0), weight, out, out.stride(0), N, eps,
                                         BLOCK_N=BLOCK_N, num_warps=4 if BLOCK_N <= 4096 else 8)
    return out.view(x.shape)
