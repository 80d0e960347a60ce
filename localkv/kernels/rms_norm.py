"""RMSNorm in one pass: ``weight * (x / sqrt(mean(x²) + eps))``, normalised in fp32 whatever x's dtype.

The rounding follows the reference implementation (transformers' LlamaRMSNorm): the normalised row is rounded
to x's dtype, then multiplied by the weight. In eager torch that is six kernels a norm; a decode step of an
8B model runs 65 norms, so on a GPU the launches alone cost more than the reads. One program per row.

``add_rms_norm`` also adds the residual first (``x + residual``, rounded to x's dtype as torch rounds it) and
writes that sum beside the norm: the residual add before each of a block's norms becomes part of the norm's
kernel instead of a launch of its own. Both ops are the one kernel, the add switched on by a constexpr.
"""

from __future__ import annotations

import torch

from ._common import KERNEL_CALLS, check, next_pow2, tl, triton, use_triton

_MAX_N = 65536   # one program holds a row; wider rows take the reference


@triton.jit
def _rms_norm_kernel(
    x_ptr, stride_xr,        # x (R, N): elements between rows; last dim contiguous
    res_ptr, stride_rr,      # residual (R, N), added to x when HAS_RESIDUAL (else unused)
    sum_ptr, stride_sr,      # sum (R, N), written when HAS_RESIDUAL: x + residual in x's dtype (else unused)
    w_ptr,                   # weight (N,)
    out_ptr, stride_or,      # out (R, N): elements between rows
    N, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    x = tl.load(x_ptr + r * stride_xr + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + r * stride_rr + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)   # added in fp32, rounded as torch's x + residual
        tl.store(sum_ptr + r * stride_sr + offs, x, mask=mask)
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


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch ``x + residual`` and its RMSNorm, as two ops."""
    s = x + residual
    return s, rms_norm_ref(s, weight, eps)


def _rows(x: torch.Tensor, N: int) -> torch.Tensor:
    """x (..., N) as (R, N) rows with a contiguous last dim (a view where it can be)."""
    x2 = x.reshape(-1, N)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch(op: str, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
            ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(x + residual, None without a residual; the norm of the sum, or of x), both shaped like x, in one launch."""
    N = x.shape[-1]
    has_residual = residual is not None
    x2 = _rows(x, N)
    res2 = _rows(residual, N) if has_residual else x2                                   # not read without
    s = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if has_residual else x2   # not written without
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x2.shape[0]:
        KERNEL_CALLS[op] += 1
        BLOCK_N = next_pow2(N)
        _rms_norm_kernel[(x2.shape[0],)](x2, x2.stride(0), res2, res2.stride(0), s, s.stride(0), weight,
                                         out, out.stride(0), N, eps, HAS_RESIDUAL=has_residual,
                                         BLOCK_N=BLOCK_N, num_warps=4 if BLOCK_N <= 4096 else 8)
    return (s.view(x.shape) if has_residual else None), out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the rows of ``x`` (..., N) with ``weight`` (N,); the result has the dtype of ``weight * x``."""
    N = x.shape[-1]
    check(weight.shape == (N,), f"weight {tuple(weight.shape)}: want ({N},)")
    if not use_triton(x, weight) or N > _MAX_N:
        return rms_norm_ref(x, weight, eps)
    return _launch("rms_norm", x, None, weight, eps)[1]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the RMSNorm after it, in one kernel.

    Args:
        x: (..., N) activations.
        residual: (..., N), x's shape and dtype: the output of the sublayer to add.
        weight: (N,) the norm's weight.
        eps: added to the mean square.

    Returns:
        ``(sum, normed)``: ``sum = x + residual`` (..., N) in x's dtype, bit-equal to torch's, and
        ``normed = rms_norm(sum, weight, eps)`` (..., N) in the dtype of ``weight * x``.
    """
    N = x.shape[-1]
    check(residual.shape == x.shape, f"residual {tuple(residual.shape)}: want x's {tuple(x.shape)}")
    check(residual.dtype == x.dtype, f"residual {residual.dtype}: want x's {x.dtype}")
    check(weight.shape == (N,), f"weight {tuple(weight.shape)}: want ({N},)")
    if not use_triton(x, residual, weight) or N > _MAX_N:
        return add_rms_norm_ref(x, residual, weight, eps)
    return _launch("add_rms_norm", x, residual, weight, eps)
