"""Chunk scoring of queries against per-chunk abstracts, reduced over the GQA group: which chunks to fetch.

Queries ``q (Tq, Hq, D)``; abstracts per KV head and chunk, one of:

- **landmarks** ``(Hkv, C, D)`` (ShadowKV: mean post-RoPE key of each chunk). Score of chunk c for KV head h:
  ``max_g Σ_t softmax_c(q[t, h*G+g] · landmark[h, c] * sm_scale)`` (softmax over all C chunks, summed over
  the query positions, max over the group). Values in [0, Tq].
- **min/max keys** ``kmin, kmax (Hkv, C, D)`` (Quest / LeoAM upper bound): ``max_{g,t} Σ_d max(q_d kmin_d,
  q_d kmax_d)``, an upper bound of ``q·k`` over every key of the chunk, *unscaled*. Computed exactly as
  ``q⁺·kmax + q⁻·kmin`` with ``q⁺ = max(q, 0)``, ``q⁻ = min(q, 0)``: two tensor-core dots.

Returns ``(Hkv, C)`` fp32. Tile rows are ``m = g * TQ_PAD + t`` (group member, token), both padded to powers
of two so the group reduction is a reshape. The landmark softmax needs the normaliser over all C chunks:
pass 1 writes the raw scores and per-block (max, Σexp) to scratch, pass 2 folds the block stats into a
per-row LSE and reduces ``exp(s - lse)`` over (t, g). The landmarks are read once.
"""

from __future__ import annotations

import torch

from ._common import KERNEL_CALLS, _dot, check, dot_flags, interpreting, n_sms, next_pow2, tl, triton, use_triton


TILE = {"landmark_chunks": 128, "warps": 8}
"""Pass-1 tile: chunks per program for landmark scoring with few query rows, and warps. Swept on an H100
(scripts/sweep_kernels.py --scores-only, 16K chunks): 64-256 chunks x 2-8 warps all land at 22-26 us for both
passes, pass 1 alone 17-22 us for 32 MB. What remains is per-launch cost, paid twice."""


@triton.jit
def _chunk_scores_kernel(
    q_ptr, stride_qt, stride_qh,            # q (Tq, Hq, D): elements between tokens / heads; D contiguous
    a_ptr, stride_ah, stride_ac,            # landmarks, or kmin, (Hkv, C, D): elements between heads / chunks
    b_ptr, stride_bh, stride_bc,            # kmax (Hkv, C, D) in MINMAX mode (unused otherwise)
    out_ptr, stride_outh,                   # MINMAX: scores (Hkv, C) fp32
    s_ptr, stride_sh, stride_sm,            # landmark: raw scores scratch (Hkv, BLOCK_M, C) fp32, log2 units
    bmax_ptr, bsum_ptr, stride_th, stride_tb,  # landmark: block max / Σexp2 (Hkv, n_blk, BLOCK_M) fp32
    Tq, C, D, qk_scale,                     # query tokens, chunks, head dim, sm_scale * log2(e)
    G: tl.constexpr, G_PAD: tl.constexpr, TQ_PAD: tl.constexpr, BLOCK_M: tl.constexpr,  # BLOCK_M = G_PAD*TQ_PAD
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, MINMAX: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)      # KV head
    blk = tl.program_id(1)                  # block of BLOCK_C chunks
    offs_m = tl.arange(0, BLOCK_M)
    g = offs_m // TQ_PAD                    # group member of each row
    t = offs_m % TQ_PAD                     # query token of each row
    valid_m = (g < G) & (t < Tq)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_c = blk * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    q = tl.load(q_ptr + t[:, None] * stride_qt + (h * G + g)[:, None] * stride_qh + offs_d[None, :],
                mask=valid_m[:, None] & mask_d[None, :], other=0.0)           # (BLOCK_M, BLOCK_D)
    mask_dc = mask_d[:, None] & mask_c[None, :]
    aT = tl.load(a_ptr + h * stride_ah + offs_c[None, :] * stride_ac + offs_d[:, None],
                 mask=mask_dc, other=0.0)                                      # (BLOCK_D, BLOCK_C)
    if MINMAX:
        bT = tl.load(b_ptr + h * stride_bh + offs_c[None, :] * stride_bc + offs_d[:, None],
                     mask=mask_dc, other=0.0)                                  # (BLOCK_D, BLOCK_C) kmax
        qf = q.to(tl.float32)
        q_pos = tl.maximum(qf, 0.0).to(bT.dtype)                               # exact: max with 0
        q_neg = tl.minimum(qf, 0.0).to(aT.dtype)
        s = _dot(q_pos, bT, IEEE, UPCAST) + _dot(q_neg, aT, IEEE, UPCAST)      # (BLOCK_M, BLOCK_C)
        s = tl.where(valid_m[:, None], s, float("-inf"))
        s3 = tl.reshape(s, (G_PAD, TQ_PAD, BLOCK_C))
        best = tl.max(tl.max(s3, 1), 0)                                        # (BLOCK_C,) over t, then g
        tl.store(out_ptr + h * stride_outh + offs_c, best, mask=mask_c)
    else:
        s = _dot(q, aT, IEEE, UPCAST) * qk_scale                               # (BLOCK_M, BLOCK_C)
        s = tl.where(valid_m[:, None] & mask_c[None, :], s, float("-inf"))
        tl.store(s_ptr + h * stride_sh + offs_m[:, None] * stride_sm + offs_c[None, :], s,
                 mask=valid_m[:, None] & mask_c[None, :])   # padded rows are never written: pass 2 skips them
        bmax = tl.max(s, 1)                                                    # (BLOCK_M,)
        bmax_safe = tl.where(bmax == float("-inf"), 0.0, bmax)
        bsum = tl.sum(tl.exp2(s - bmax_safe[:, None]), 1)                      # (BLOCK_M,)
        stats = h * stride_th + blk * stride_tb + offs_m
        tl.store(bmax_ptr + stats, bmax)
        tl.store(bsum_ptr + stats, bsum)


@triton.jit
def _chunk_scores_finish_kernel(
    s_ptr, stride_sh, stride_sm,            # raw scores scratch (Hkv, BLOCK_M, C) fp32, log2 units
    bmax_ptr, bsum_ptr, stride_th, stride_tb,  # block stats (Hkv, n_blk, BLOCK_M) fp32
    out_ptr, stride_outh,                   # scores (Hkv, C) fp32
    C, n_blk, Tq, span,                     # chunks, stat blocks, query tokens, chunks per program
    G: tl.constexpr, G_PAD: tl.constexpr, TQ_PAD: tl.constexpr, BLOCK_M: tl.constexpr,  # BLOCK_M = G_PAD * TQ_PAD
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    # Row LSE over all chunks from the block stats (log2 units).
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    for b0 in range(0, n_blk, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        ptrs = h * stride_th + offs_b[:, None] * stride_tb + offs_m[None, :]
        mask_b = (offs_b < n_blk)[:, None]
        bm = tl.load(bmax_ptr + ptrs, mask=mask_b, other=float("-inf"))       # (BLOCK_B, BLOCK_M)
        bs = tl.load(bsum_ptr + ptrs, mask=mask_b, other=0.0)
        m_new = tl.maximum(m, tl.max(bm, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - m_safe) + tl.sum(bs * tl.exp2(bm - m_safe[None, :]), 0)
        m = m_new
    lse = tl.where(l > 0, tl.where(m == float("-inf"), 0.0, m) + tl.log2(tl.where(l > 0, l, 1.0)), 0.0)
    # Probabilities of this program's chunks, summed over t, max over g, a tile at a time.
    valid_m = (offs_m // TQ_PAD < G) & (offs_m % TQ_PAD < Tq)
    c_start = tl.program_id(1) * span
    for c0 in range(c_start, tl.minimum(c_start + span, C), BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        s = tl.load(s_ptr + h * stride_sh + offs_m[:, None] * stride_sm + offs_c[None, :],
                    mask=valid_m[:, None] & mask_c[None, :], other=float("-inf"))  # (BLOCK_M, BLOCK_C)
        p = tl.exp2(s - lse[:, None])                                          # 0 on padded rows (s = -inf)
        per_g = tl.sum(tl.reshape(p, (G_PAD, TQ_PAD, BLOCK_C)), 1)             # (G_PAD, BLOCK_C), >= 0
        tl.store(out_ptr + h * stride_outh + offs_c, tl.max(per_g, 0), mask=mask_c)


def chunk_scores_ref(q, landmarks=None, *, kmin=None, kmax=None, sm_scale: float | None = None):
    """Torch version of `chunk_scores` (fp32 math)."""
    Tq, Hq, D = q.shape
    Hkv = (landmarks if landmarks is not None else kmin).shape[0]
    qg = q.float().transpose(0, 1).reshape(Hkv, Hq // Hkv, Tq, D)            # (Hkv, G, Tq, D)
    if landmarks is not None:
        scale = sm_scale if sm_scale is not None else D ** -0.5
        s = torch.einsum("hgtd,hcd->hgtc", qg, landmarks.float()) * scale      # (Hkv, G, Tq, C)
        return torch.softmax(s, -1).sum(2).amax(1)
    s = (torch.einsum("hgtd,hcd->hgtc", qg.clamp(min=0), kmax.float())
         + torch.einsum("hgtd,hcd->hgtc", qg.clamp(max=0), kmin.float()))
    return s.amax(2).amax(1)


def chunk_scores(q, landmarks=None, *, kmin=None, kmax=None, sm_scale: float | None = None, out=None):
    """Score every chunk for the current queries, max over each GQA group.

    Args:
        q: (Tq, Hq, D) queries (post-RoPE), fp32/fp16/bf16.
        landmarks: (Hkv, C, D) mean keys per chunk -> summed softmax probabilities (give this, or kmin+kmax).
        kmin, kmax: (Hkv, C, D) elementwise min / max key per chunk -> unscaled upper bound of q·k.
        sm_scale: landmark softmax scale, default 1/sqrt(D).
        out: optional contiguous (Hkv, C) fp32 buffer.

    Returns:
        (Hkv, C) fp32 scores.
    """
    check(q.dim() == 3, f"q must be (Tq, Hq, D), got {tuple(q.shape)}")
    minmax = landmarks is None
    check(minmax == (kmin is not None and kmax is not None) and (kmin is None) == (kmax is None),
          "give landmarks, or kmin and kmax")
    Tq, Hq, D = q.shape
    abstracts = [kmin, kmax] if minmax else [landmarks]
    Hkv, C = abstracts[0].shape[:2]
    for x in abstracts:
        check(x.dim() == 3 and x.shape == (Hkv, C, D), f"abstract {tuple(x.shape)}: want (Hkv, C, D={D})")
        check(x.dtype == q.dtype, f"abstract dtype {x.dtype} != q dtype {q.dtype}")
    check(Hq % Hkv == 0, f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    G = Hq // Hkv
    if out is None:
        out = torch.empty((Hkv, C), dtype=torch.float32, device=q.device)
    check(out.shape == (Hkv, C) and out.dtype == torch.float32 and out.is_contiguous(),
          "out must be a contiguous fp32 (Hkv, C) tensor")
    scale = sm_scale if sm_scale is not None else D ** -0.5
    if not use_triton(q, *abstracts, out):
        out.copy_(chunk_scores_ref(q, landmarks, kmin=kmin, kmax=kmax, sm_scale=scale))
        return out
    if C == 0:
        return out
    check(q.stride(2) == 1 and all(x.stride(2) == 1 for x in abstracts), "last dims must be contiguous")
    G_PAD, TQ_PAD = next_pow2(G), next_pow2(Tq)
    while G_PAD * TQ_PAD < 16:                      # tl.dot needs M >= 16
        TQ_PAD *= 2
    BLOCK_M = G_PAD * TQ_PAD
    check(BLOCK_M <= 256, f"G*Tq padded = {BLOCK_M} query rows per group: at most 256")
    # GPU tiles: landmark (BLOCK_M, 128) unless many rows; min/max reads two abstracts, so half as many chunks
    BLOCK_C = 32 if interpreting() else (TILE["landmark_chunks"] if BLOCK_M <= 32 and not minmax else 64)
    n_blk = -(-C // BLOCK_C)
    a, b = (kmin, kmax) if minmax else (landmarks, landmarks)
    if minmax:   # scratch is unused: pass `out` in its place
        scratch, bmax, bsum = out.view(Hkv, 1, C), out.view(Hkv, 1, C), out.view(Hkv, 1, C)
    else:
        scratch = torch.empty((Hkv, BLOCK_M, C), dtype=torch.float32, device=q.device)
        bmax = torch.empty((Hkv, n_blk, BLOCK_M), dtype=torch.float32, device=q.device)
        bsum = torch.empty_like(bmax)
    KERNEL_CALLS["chunk_scores"] += 1
    _chunk_scores_kernel[(Hkv, n_blk)](
        q, q.stride(0), q.stride(1),
        a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1),
        out, out.stride(0), scratch, scratch.stride(0), scratch.stride(1),
        bmax, bsum, bmax.stride(0), bmax.stride(1),
        Tq, C, D, scale * 1.4426950408889634,
        G=G, G_PAD=G_PAD, TQ_PAD=TQ_PAD, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, BLOCK_D=max(16, next_pow2(D)), MINMAX=minmax,
        **dot_flags(q.dtype), num_warps=TILE["warps"] if BLOCK_M <= 64 else 8,
    )
    if not minmax:
        # Each pass-2 program re-reads every block's stats to form its rows' LSE, then scores `span` chunks a
        # tile at a time: about two programs per SM in all, not one per tile (at 128K chunks the re-reads of a
        # program per tile outweighed the scores themselves).
        BLOCK_C2 = max(32, 8192 // BLOCK_M) if not interpreting() else 64
        per_head = 2 if interpreting() else -(-(2 * n_sms(q.device)) // Hkv)
        span = -(-C // (per_head * BLOCK_C2)) * BLOCK_C2
        _chunk_scores_finish_kernel[(Hkv, -(-C // span))](
            scratch, scratch.stride(0), scratch.stride(1), bmax, bsum, bmax.stride(0), bmax.stride(1),
            out, out.stride(0), C, n_blk, Tq, span,
            G=G, G_PAD=G_PAD, TQ_PAD=TQ_PAD, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C2, BLOCK_B=32, num_warps=4,
        )
    return out
