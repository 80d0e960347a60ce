"""Rotary position embedding applied in one pass: ``x * cos + rotate_half(x) * sin``.

``x (T, H, D)`` (any strides with D contiguous: the q or k columns of a fused qkv product are read in
place), ``cos, sin (T, D)`` the tables of the T positions (`localkv.models.rope`). With ``x = (x1, x2)``
the two halves of the last dim, ``rotate_half(x) = (-x2, x1)``, so

    out1 = x1 * cos1 - x2 * sin1,    out2 = x2 * cos2 + x1 * sin2.

Math in fp32, one rounding to x's dtype at the end. Eager torch spends five kernels on it (split, negate,
concatenate, two products and a sum); at decode every one of them is launch-bound. One program per
(token, BLOCK_H heads).
"""

from __future__ import annotations

import torch

from ._common import KERNEL_CALLS, check, next_pow2, tl, triton, use_triton


@triton.jit
def _rope_kernel(
    x_ptr, stride_xt, stride_xh,        # x (T, H, D): elements between tokens / heads; D contiguous
    cos_ptr, sin_ptr, stride_ct,        # tables (T, D), same strides for both
    out_ptr, stride_ot, stride_oh,      # out (T, H, D)
    H, HALF,                            # heads, D / 2
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    mask = (offs_h < H)[:, None] & mask_d[None, :]
    cos1 = tl.load(cos_ptr + t * stride_ct + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + t * stride_ct + HALF + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + t * stride_ct + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + t * stride_ct + HALF + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    row = x_ptr + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]   # (BLOCK_H, BLOCK_HALF)
    x1 = tl.load(row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + HALF, mask=mask, other=0.0).to(tl.float32)
    o = out_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(o, (x1 * cos1 - x2 * sin1).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o + HALF, (x2 * cos2 + x1 * sin2).to(out_ptr.dtype.element_ty), mask=mask)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Torch RoPE (the rotate-half form transformers uses), in x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x (T, H, D)`` rotated by the tables ``cos, sin (T, D)``; a new contiguous tensor in x's dtype."""
    check(x.dim() == 3 and cos.shape == (x.shape[0], x.shape[2]) and sin.shape == cos.shape,
          f"rope: x {tuple(x.shape)}, cos {tuple(cos.shape)}: want (T, H, D) and (T, D)")
    T, H, D = x.shape
    if not use_triton(x, cos, sin) or D % 2:
        return rope_ref(x, cos, sin)
    if x.stride(2) != 1:
        x = x.contiguous()
    if cos.stride(1) != 1 or sin.stride(1) != 1 or cos.stride(0) != sin.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if T and H:
        KERNEL_CALLS["rope"] += 1
        BLOCK_H = min(16, next_pow2(H))
        _rope_kernel[(T, -(-H // BLOCK_H))](x, x.stride(0), x.stride(1), cos, sin, cos.stride(0),
                                            out, out.stride(0), out.stride(1), H, D // 2,
                                            BLOCK_H=BLOCK_H, BLOCK_HALF=next_pow2(D // 2))
    return out
