"""Exact merge of attention partials by their log-sum-exp.

A partial is the softmax attention of the same queries over one disjoint part of the keys (one tier, one
split of a long index list): ``out_p = Σ_j exp(s_j - lse_p) v_j`` with ``lse_p = ln Σ_j exp(s_j)``. Over the
union, ``lse = ln Σ_p exp(lse_p)`` and ``out = Σ_p exp(lse_p - lse) out_p``. An empty part has
``lse_p = -inf`` and weighs nothing (its ``out_p`` is ignored, even NaN); if every part is empty the
merged row is 0 with ``lse = -inf``. `sparse_attention` uses this kernel as its split-K reduce.

`merge_into` is the running form a chunked prefill needs: one new partial folded into an fp32 accumulator in
place, ``P = 2`` with the accumulator as the first part, so partials never pile up in memory.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._common import KERNEL_CALLS, check, next_pow2, tl, triton, use_triton


@triton.jit
def _merge_attention_kernel(
    o_ptr,            # partial outputs (P, R, D), any float dtype, last dim contiguous
    lse_ptr,          # partial LSEs (P, R) fp32, natural log
    out_ptr,          # merged output (R, D), last dim contiguous
    lse_out_ptr,      # merged LSE (R,) fp32
    stride_op,        # o: elements between parts
    stride_or,        # o: elements between rows
    stride_lp,        # lse: elements between parts
    stride_lr,        # lse: elements between rows
    stride_out_r,     # out: elements between rows
    stride_lse_out_r,  # lse_out: elements between rows
    P, D,             # number of parts, head dim
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)  # one (token, query head) row per program
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    m = float("-inf")                                 # running max of the LSEs seen (scalar)
    l = 0.0                                           # Σ exp(lse_p - m) (scalar)
    acc = tl.zeros((BLOCK_D,), tl.float32)            # Σ exp(lse_p - m) out_p
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        lse = tl.load(lse_ptr + offs_p * stride_lp + r * stride_lr, mask=mask_p, other=float("-inf"))  # (BLOCK_P,)
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # all -inf so far: keep exp() finite
        w = tl.exp(lse - m_safe)                                 # (BLOCK_P,), 0 for empty parts
        o = tl.load(o_ptr + offs_p[:, None] * stride_op + r * stride_or + offs_d[None, :],
                    mask=mask_p[:, None] & mask_d[None, :], other=0.0).to(tl.float32)  # (BLOCK_P, BLOCK_D)
        contrib = tl.where(w[:, None] > 0, w[:, None] * o, 0.0)  # an empty part's out may be garbage
        alpha = tl.exp(m - m_safe)
        acc = acc * alpha + tl.sum(contrib, 0)
        l = l * alpha + tl.sum(w, 0)
        m = m_new
    has = l > 0
    out = tl.where(has, acc / tl.where(has, l, 1.0), 0.0)
    lse_out = tl.where(has, tl.where(m == float("-inf"), 0.0, m) + tl.log(tl.where(has, l, 1.0)), float("-inf"))
    tl.store(out_ptr + r * stride_out_r + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)
    tl.store(lse_out_ptr + r * stride_lse_out_r, lse_out)


def merge_attention_ref(outs: torch.Tensor, lses: torch.Tensor, out_dtype: torch.dtype | None = None):
    """Torch merge of stacked partials: outs (P, *rows, D), lses (P, *rows) -> (out (*rows, D), lse (*rows))."""
    lses = lses.float()
    m = lses.max(0).values
    m_safe = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    w = torch.exp(lses - m_safe)                                  # (P, *rows)
    contrib = torch.where(w[..., None] > 0, w[..., None] * outs.float(), torch.zeros((), device=outs.device))
    l = w.sum(0)
    out = contrib.sum(0) / torch.where(l > 0, l, torch.ones_like(l))[..., None]
    lse = m_safe + torch.log(l)                                   # log(0) = -inf for rows with no keys
    return out.to(out_dtype or outs.dtype), lse


def merge_attention(
    outs: Sequence[torch.Tensor] | torch.Tensor,
    lses: Sequence[torch.Tensor] | torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
):
    """Merge attention partials over disjoint key sets exactly, by their log-sum-exp.

    Args:
        outs: P partial outputs, each (Tq, Hq, D) (or one stacked (P, Tq, Hq, D) tensor).
        lses: P partial natural-log LSEs of the scaled scores, each (Tq, Hq) (or stacked (P, Tq, Hq)).
        out: optional (Tq, Hq, D) buffer for the merged output.
        lse_out: optional (Tq, Hq) fp32 buffer for the merged LSE.
        out_dtype: dtype of the merged output when ``out`` is not given (default: that of the partials).

    Returns:
        (out (Tq, Hq, D), lse (Tq, Hq) fp32).
    """
    o = outs if isinstance(outs, torch.Tensor) else torch.stack(list(outs))
    lse = lses if isinstance(lses, torch.Tensor) else torch.stack(list(lses))
    check(o.dim() == 4 and lse.shape == o.shape[:3], f"outs {tuple(o.shape)} / lses {tuple(lse.shape)}: "
          "want (P, Tq, Hq, D) / (P, Tq, Hq)")
    check(o.shape[0] >= 1, "merge_attention needs at least one partial")
    P, Tq, Hq, D = o.shape
    out_dtype = out.dtype if out is not None else (out_dtype or o.dtype)
    if out is None:
        out = torch.empty((Tq, Hq, D), dtype=out_dtype, device=o.device)
    if lse_out is None:
        lse_out = torch.empty((Tq, Hq), dtype=torch.float32, device=o.device)
    check(out.shape == (Tq, Hq, D) and lse_out.shape == (Tq, Hq), "out / lse_out shapes must be (Tq, Hq, D) / (Tq, Hq)")
    check(lse_out.dtype == torch.float32, "lse_out must be fp32")
    check(out.is_contiguous() and lse_out.is_contiguous(), "out / lse_out must be contiguous")
    if not use_triton(o, lse, out, lse_out):
        ref_out, ref_lse = merge_attention_ref(o, lse, out_dtype)
        out.copy_(ref_out)
        lse_out.copy_(ref_lse)
        return out, lse_out
    launch_merge(o.reshape(P, Tq * Hq, D), lse.float().reshape(P, Tq * Hq),
                 out.view(Tq * Hq, D), lse_out.view(Tq * Hq))
    return out, lse_out


def launch_merge(o: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, lse_out: torch.Tensor) -> None:
    """Run the merge kernel on flat views: o (P, R, D), lse (P, R) fp32 -> out (R, D), lse_out (R,)."""
    P, R, D = o.shape
    check(o.stride(2) == 1 and out.stride(1) == 1, "merge_attention: last dim of outs / out must be contiguous")
    if R == 0:
        return
    KERNEL_CALLS["merge_attention"] += 1
    _merge_attention_kernel[(R,)](
        o, lse, out, lse_out,
        o.stride(0), o.stride(1), lse.stride(0), lse.stride(1), out.stride(0), lse_out.stride(0),
        P, D, BLOCK_P=min(16, next_pow2(P)), BLOCK_D=next_pow2(D),
    )


@triton.jit
def _merge_into_kernel(
    acc_ptr, acc_lse_ptr,   # accumulator (R, D) fp32 and its LSE (R,) fp32, updated in place
    o_ptr, lse_ptr,         # the new partial (R, D) any float dtype, its LSE (R,) fp32
    stride_ar, stride_or,   # elements between rows of acc / of the partial (last dims contiguous)
    stride_alr, stride_lr,  # elements between rows of acc_lse / of lse
    R, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mask_r = offs_r < R
    offs_d = tl.arange(0, BLOCK_D)
    mask = mask_r[:, None] & (offs_d < D)[None, :]
    la = tl.load(acc_lse_ptr + offs_r * stride_alr, mask=mask_r, other=float("-inf"))  # (BLOCK_R,)
    lb = tl.load(lse_ptr + offs_r * stride_lr, mask=mask_r, other=float("-inf"))
    m = tl.maximum(la, lb)
    m_safe = tl.where(m == float("-inf"), 0.0, m)        # both empty: weights 0, row stays 0 / -inf
    wa = tl.exp(la - m_safe)                             # (BLOCK_R,) weight of what is accumulated
    wb = tl.exp(lb - m_safe)                             # weight of the new partial
    l = wa + wb
    inv = tl.where(l > 0, 1.0 / tl.where(l > 0, l, 1.0), 0.0)
    a = tl.load(acc_ptr + offs_r[:, None] * stride_ar + offs_d[None, :], mask=mask, other=0.0)
    b = tl.load(o_ptr + offs_r[:, None] * stride_or + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    a = tl.where(wa[:, None] > 0, a * (wa * inv)[:, None], 0.0)   # an empty side's values may be garbage
    b = tl.where(wb[:, None] > 0, b * (wb * inv)[:, None], 0.0)
    tl.store(acc_ptr + offs_r[:, None] * stride_ar + offs_d[None, :], a + b, mask=mask)
    tl.store(acc_lse_ptr + offs_r * stride_alr, tl.where(l > 0, m_safe + tl.log(tl.where(l > 0, l, 1.0)),
                                                         float("-inf")), mask=mask_r)


def merge_into_ref(acc: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Torch version of `merge_into`."""
    merged, merged_lse = merge_attention_ref(torch.stack([acc, out.to(acc.dtype)]), torch.stack([acc_lse, lse]))
    acc.copy_(merged)
    acc_lse.copy_(merged_lse)


def merge_into(acc: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Fold one attention partial into a running fp32 accumulator, in place.

    Args:
        acc: (R, D) fp32 accumulated output (rows with ``acc_lse = -inf`` hold nothing yet).
        acc_lse: (R,) fp32 natural-log LSE of what ``acc`` has seen; -inf for nothing.
        out: (R, D) the new partial over disjoint keys, any float dtype (last dim contiguous).
        lse: (R,) fp32 its LSE.
    """
    R, D = acc.shape
    check(acc.dtype == torch.float32 and acc_lse.dtype == torch.float32 and lse.dtype == torch.float32,
          "merge_into: the accumulator and both LSEs must be fp32")
    check(out.shape == (R, D) and acc_lse.shape == (R,) and lse.shape == (R,),
          f"merge_into: acc {tuple(acc.shape)}, out {tuple(out.shape)}, lses {tuple(acc_lse.shape)} / "
          f"{tuple(lse.shape)}")
    if not use_triton(acc, acc_lse, out, lse):
        merge_into_ref(acc, acc_lse, out, lse)
        return
    check(acc.stride(1) == 1 and out.stride(1) == 1, "merge_into: last dims must be contiguous")
    if R == 0:
        return
    KERNEL_CALLS["merge_into"] += 1
    BLOCK_R = 16
    _merge_into_kernel[(-(-R // BLOCK_R),)](
        acc, acc_lse, out, lse, acc.stride(0), out.stride(0), acc_lse.stride(0), lse.stride(0), R, D,
        BLOCK_R=BLOCK_R, BLOCK_D=next_pow2(D), num_warps=4,
    )
