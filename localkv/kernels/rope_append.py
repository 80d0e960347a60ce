"""A decode step's new tokens in one launch: RoPE on their queries and keys, and their K/V written into place.

At decode a layer's own tokens are a few hundred bytes, and each thing done to them is a kernel: rotate the
queries, rotate the keys, write K and V into the open page of the store, write them again into the exact
dense buffer attention reads, park the pre-RoPE key for the low-rank basis (in fp32). Done one by one, in a
ShadowKV graphed step, that is eight kernels a layer of about 2 µs each, all launch latency (torch profiler,
H100, a 128K step); this op is one.

Inputs ``q (T, Hq, D)``, ``k, v (T, Hkv, D)`` before RoPE, the positions' tables ``cos, sin (T, D)``.
Each destination is ``(k_buf, v_buf, row)``: buffers ``(Hkv, N, D)`` and ``row (1,)`` int64 on the device, the
first of T consecutive rows (a graph replays with the row read from the device, not baked in). ``raw`` is
``(buf (N, Hkv*D) fp32, row (1,))``: the keys before RoPE, flattened. The rotation is `rope`'s:
``out1 = x1 cos1 - x2 sin1, out2 = x2 cos2 + x1 sin2`` in fp32, one rounding to each destination's dtype.
One program per (token, KV head) does the head's key and value and its GQA group of queries.
"""

from __future__ import annotations

import torch

from ._common import KERNEL_CALLS, check, next_pow2, tl, triton, use_triton
from .rope import rope_ref

Destination = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(k_buf (Hkv, N, D), v_buf (Hkv, N, D), row (1,) int64): where a run of T tokens' rotated K and V go."""


@triton.jit
def _rotate(ptr, cos1, cos2, sin1, sin2, HALF, mask):
    """Rotated halves (fp32) of the rows at ``ptr`` (offsets of the first half; the second is HALF on)."""
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2, x1, x2


@triton.jit
def _rope_append_kernel(
    q_ptr, stride_qt, stride_qh,            # q (T, Hq, D), D contiguous
    k_ptr, stride_kt, stride_kh,            # k, v (T, Hkv, D), same strides
    v_ptr,
    cos_ptr, sin_ptr, stride_ct,            # tables (T, D)
    qo_ptr, stride_qot, stride_qoh,         # rotated queries (T, Hq, D)
    k0_ptr, v0_ptr, s0_h, s0_n, row0_ptr,   # destination 0: k/v buffers (Hkv, N, D) with strides, first row
    k1_ptr, v1_ptr, s1_h, s1_n, row1_ptr,   # destination 1 (when N_DST == 2)
    raw_ptr, stride_raw, rowr_ptr,          # pre-RoPE keys (N, Hkv*D) fp32 (when HAS_RAW)
    HALF, G,
    N_DST: tl.constexpr, HAS_RAW: tl.constexpr, G_PAD: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    mask = offs < HALF
    tab = t * stride_ct + offs
    cos1 = tl.load(cos_ptr + tab, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + tab + HALF, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + tab, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + tab + HALF, mask=mask, other=0.0).to(tl.float32)

    # The key and value of KV head h, to every destination.
    k1, k2, raw1, raw2 = _rotate(k_ptr + t * stride_kt + h * stride_kh + offs, cos1, cos2, sin1, sin2, HALF, mask)
    v_row = v_ptr + t * stride_kt + h * stride_kh + offs
    v1 = tl.load(v_row, mask=mask, other=0.0)
    v2 = tl.load(v_row + HALF, mask=mask, other=0.0)
    at = h * s0_h + (tl.load(row0_ptr) + t) * s0_n + offs
    tl.store(k0_ptr + at, k1.to(k0_ptr.dtype.element_ty), mask=mask)
    tl.store(k0_ptr + at + HALF, k2.to(k0_ptr.dtype.element_ty), mask=mask)
    tl.store(v0_ptr + at, v1.to(v0_ptr.dtype.element_ty), mask=mask)
    tl.store(v0_ptr + at + HALF, v2.to(v0_ptr.dtype.element_ty), mask=mask)
    if N_DST == 2:
        at = h * s1_h + (tl.load(row1_ptr) + t) * s1_n + offs
        tl.store(k1_ptr + at, k1.to(k1_ptr.dtype.element_ty), mask=mask)
        tl.store(k1_ptr + at + HALF, k2.to(k1_ptr.dtype.element_ty), mask=mask)
        tl.store(v1_ptr + at, v1.to(v1_ptr.dtype.element_ty), mask=mask)
        tl.store(v1_ptr + at + HALF, v2.to(v1_ptr.dtype.element_ty), mask=mask)
    if HAS_RAW:
        at = (tl.load(rowr_ptr) + t) * stride_raw + h * 2 * HALF + offs
        tl.store(raw_ptr + at, raw1, mask=mask)
        tl.store(raw_ptr + at + HALF, raw2, mask=mask)

    # The queries of its GQA group, (G_PAD, BLOCK_HALF) at once.
    g = tl.arange(0, G_PAD)
    mask_q = (g < G)[:, None] & mask[None, :]
    q_rows = q_ptr + t * stride_qt + (h * G + g)[:, None] * stride_qh + offs[None, :]
    q1, q2, _, _ = _rotate(q_rows, cos1[None, :], cos2[None, :], sin1[None, :], sin2[None, :], HALF, mask_q)
    o_rows = qo_ptr + t * stride_qot + (h * G + g)[:, None] * stride_qoh + offs[None, :]
    tl.store(o_rows, q1.to(qo_ptr.dtype.element_ty), mask=mask_q)
    tl.store(o_rows + HALF, q2.to(qo_ptr.dtype.element_ty), mask=mask_q)


def rope_append_ref(q, k, v, cos, sin, dsts: list[Destination], raw: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Torch version of `rope_append` (the rotation in the inputs' dtype, as the model's eager RoPE does)."""
    T = k.shape[0]
    k_rot = rope_ref(k, cos, sin).transpose(0, 1)                      # (Hkv, T, D)
    for k_buf, v_buf, row in dsts:
        rows = row + torch.arange(T, device=row.device)
        k_buf.index_copy_(1, rows, k_rot.to(k_buf.dtype))
        v_buf.index_copy_(1, rows, v.transpose(0, 1).to(v_buf.dtype))
    if raw is not None:
        buf, row = raw
        buf.index_copy_(0, row + torch.arange(T, device=row.device), k.reshape(T, -1).float())
    return rope_ref(q, cos, sin)


def rope_append(q, k, v, cos, sin, dsts: list[Destination], raw: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Rotate the new tokens' queries and keys and write their K/V into place; returns the rotated queries.

    Args:
        q: (T, Hq, D) queries before RoPE; k, v: (T, Hkv, D) keys before RoPE and values. D contiguous.
        cos, sin: (T, D) the tokens' RoPE tables.
        dsts: one or two ``(k_buf, v_buf, row)``: buffers (Hkv, N, D) (D contiguous, the two alike), and
            ``row`` (1,) int64 on the device: the tokens go to rows row .. row+T-1 of each.
        raw: optional ``(buf, row)``: the keys before RoPE, fp32 (T, Hkv*D), go to rows row.. of ``buf``
            (N, Hkv*D) fp32.

    Returns:
        (T, Hq, D) rotated queries in q's dtype (a new tensor).
    """
    T, Hq, D = q.shape
    check(k.dim() == 3 and k.shape[0] == T and k.shape[2] == D and v.shape == k.shape,
          f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: want (T, Hq, D) and (T, Hkv, D)")
    Hkv = k.shape[1]
    check(Hq % Hkv == 0 and D % 2 == 0, f"Hq={Hq} must be a multiple of Hkv={Hkv}, D={D} even")
    check(cos.shape == (T, D) and sin.shape == (T, D), f"cos/sin {tuple(cos.shape)}: want (T, D) = ({T}, {D})")
    check(1 <= len(dsts) <= 2, f"one or two destinations, got {len(dsts)}")
    for k_buf, v_buf, row in dsts:
        check(k_buf.dim() == 3 and k_buf.shape[0] == Hkv and k_buf.shape[2] == D and v_buf.shape == k_buf.shape
              and v_buf.stride() == k_buf.stride() and k_buf.stride(2) == 1,
              f"destination {tuple(k_buf.shape)}: want two (Hkv={Hkv}, N, D={D}) buffers, same strides")
        check(row.shape == (1,) and row.dtype == torch.long, "a destination's row must be a (1,) int64 tensor")
    if raw is not None:
        check(raw[0].dim() == 2 and raw[0].shape[1] == Hkv * D and raw[0].dtype == torch.float32
              and raw[0].stride(1) == 1, f"raw buffer {tuple(raw[0].shape)}: want (N, {Hkv * D}) fp32")
    if not use_triton(q, k, v, cos, *(t for d in dsts for t in d), *(raw or ())):
        return rope_append_ref(q, k, v, cos, sin, dsts, raw)
    check(q.stride(2) == 1 and k.stride(2) == 1 and v.stride() == k.stride(), "q, k, v: D contiguous, k and v alike")
    if cos.stride(1) != 1 or sin.stride(1) != 1 or cos.stride(0) != sin.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    if T == 0:
        return out
    d0 = dsts[0]
    d1 = dsts[1] if len(dsts) == 2 else d0
    raw_buf, raw_row = raw if raw is not None else (out, d0[2])   # unused when HAS_RAW is off
    KERNEL_CALLS["rope_append"] += 1
    _rope_append_kernel[(T, Hkv)](
        q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v, cos, sin, cos.stride(0),
        out, out.stride(0), out.stride(1),
        d0[0], d0[1], d0[0].stride(0), d0[0].stride(1), d0[2],
        d1[0], d1[1], d1[0].stride(0), d1[0].stride(1), d1[2],
        raw_buf, raw_buf.stride(0), raw_row, D // 2, Hq // Hkv,
        N_DST=len(dsts), HAS_RAW=raw is not None, G_PAD=next_pow2(Hq // Hkv), BLOCK_HALF=next_pow2(D // 2),
        num_warps=1)
    return out
