"""Chunk scoring of queries against per-chunk abstracts, reduced over the GQA group: which chunks to fetch.

Queries ``q (Tq, Hq, D)``; abstracts per KV head and chunk, one of:

- **landmarks** ``(Hkv, C, D)`` (ShadowKV: mean post-RoPE key of each chunk). Score of chunk c for KV head h:
  ``max_g Σ_t softmax_c(q[t, h*G+g] · landmark[h, c] * sm_scale)`` (softmax over all C chunks, summed over
  the query positions, max over the group). Values in [0, Tq].
- **min/max keys** ``kmin, kmax (Hkv, C, D)`` (Quest / LeoAM upper bound): ``max_{g,t} Σ_d max(q_d kmin_d,
  q_d kmax_d)``, an upper bound of ``q·k`` over every key of the chunk, *unscaled*. Computed exactly as
  ``q⁺·kmax + q⁻·kmin`` with ``q⁺ = max(q, 0)``, ``q⁻ = min(q, 0)``: two tensor-core dots. They may be int8
  with a ``scale (Hkv, C)`` per chunk (``k ≈ k_int8 * scale``, kmin rounded down and kmax up by
  `quantize_minmax`, so the bound still holds): half the bytes of bf16, the dots over the int8 values (exact in
  the query's dtype) and the column scaled after.

Returns ``(Hkv, C)`` fp32. Tile rows are ``m = g * TQ_PAD + t`` (group member, token), both padded to powers
of two so the group reduction is a reshape.

The landmark softmax needs each row's normaliser over all C chunks before any chunk's probability, a
grid-wide dependency. One launch handles it: each head's chunks are split among P co-resident programs.
A program scores its span and keeps the raw scores: in registers when there is one query token and the
span is short (`KEEP_SCORES`), else in a scratch buffer (fp32, G*Tq rows: 1/16 of the landmarks' bytes at
D = 128). It publishes each row's (max, Σexp) as one 64-bit word, waits until the head's other programs have
published theirs, forms every row's LSE from them, and turns its own span's scores into probabilities.

The wait needs no counter: the words are the data. A zeroed word means "not yet", a published one is never 0,
and each is written by one 64-bit atomic, seen whole or not at all, so one poll both waits and reads, with no
fence and no atomic round trip on the way (the counter barrier it replaced took ~3 µs of 18.8 at 16K chunks).
Nothing else crosses programs: each reads back only its own scratch, after a CTA barrier. The words come in
two parities: a launch publishes into the parity of its head's epoch and zeroes the other for the next
launch; the head's first program bumps the epoch once all have published (so all have read it). The waiting
needs every program of the grid resident at once, so the launcher sizes P from the compiled kernel's
occupancy and launches cooperatively (CUDA refuses a grid that cannot all be resident). Under the CPU
interpreter programs run one after another, so there P = 1 per head.

The query-token count and head dim are compile-time constants, so their masks fold away: 0.1-0.2 µs of a
16K-chunk call, mostly the per-row predicates of the landmark loads.

On an H100 (Llama-3.1-8B shapes, graphed, L2 cold; scripts/bench_kernels.py, docs/benchmarks.md "Kernels"):
16K chunks in 15.5 µs, 73% of the HBM copy rate, over three runs; 128K chunks (1M tokens) in 107.5 µs, 84-85%.
Timed as a graph of 8 calls alone on an idle GPU, which adds the host's queueing and the graph's start,
0.5-0.9 µs a call: 16.1-16.5 µs, against 19.2 µs for a counter barrier in place of the published words.
"""

from __future__ import annotations

import torch

from ._common import KERNEL_CALLS, _dot, check, dot_flags, interpreting, n_sms, next_pow2, tl, triton, use_triton

KEEP_SCORES = 2048
"""Raw scores (real rows x span, one query token) a program keeps in registers rather than in the scratch: 32 fp32
a thread at 2 warps. An H100's spans at 16K chunks are 512 chunks, kept with G = 4: 16.1-16.5 µs against
16.9-17.3 µs through the scratch, both with stats per tile, in one run (graphs of 8 calls on an idle GPU)."""

TILE = {"block_c": 64, "warps": 2, "stages": 3, "per_sm": 2}
"""Landmark tile and programs: chunks per loop step, warps, pipeline stages, most programs per SM. Swept on
an H100 at 16K and 128K chunks, graphed: 2 warps with 3 stages beat 4-8 warps at every tile, and 2 programs per
SM beat 4 at 16K chunks; 4 warps, 128-chunk tiles, 4 stages or 3 programs per SM come within the ~0.5 µs that
runs differ by, no better."""


@triton.jit
def _minmax_scores_kernel(
    q_ptr, stride_qt, stride_qh,            # q (Tq, Hq, D): elements between tokens / heads; D contiguous
    kmin_ptr, kmax_ptr, stride_ah, stride_ac,  # kmin, kmax (Hkv, C, D), same strides
    scale_ptr, stride_sh,                   # int8 abstracts: scale (Hkv, C) fp32 (unused otherwise)
    out_ptr, stride_outh,                   # scores (Hkv, C) fp32
    Tq, C,
    D: tl.constexpr,                        # head dim: known, its masks fold away when D = BLOCK_D
    G: tl.constexpr, G_PAD: tl.constexpr, TQ_PAD: tl.constexpr, BLOCK_M: tl.constexpr,  # BLOCK_M = G_PAD*TQ_PAD
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    SCALED: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)      # KV head
    offs_m = tl.arange(0, BLOCK_M)
    g = offs_m // TQ_PAD                    # group member of each row
    t = offs_m % TQ_PAD                     # query token of each row
    valid_m = (g < G) & (t < Tq)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_dc = mask_d[:, None] & (offs_c < C)[None, :]
    q = tl.load(q_ptr + t[:, None] * stride_qt + (h * G + g)[:, None] * stride_qh + offs_d[None, :],
                mask=valid_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)   # (BLOCK_M, BLOCK_D)
    at = h * stride_ah + offs_c[None, :] * stride_ac + offs_d[:, None]
    kminT = tl.load(kmin_ptr + at, mask=mask_dc, other=0)                              # (BLOCK_D, BLOCK_C)
    kmaxT = tl.load(kmax_ptr + at, mask=mask_dc, other=0)
    dt = q_ptr.dtype.element_ty
    if SCALED:   # int8 values in [-127, 127]: exact in fp16/bf16/fp32
        kminT, kmaxT = kminT.to(tl.float32).to(dt), kmaxT.to(tl.float32).to(dt)
    q_pos = tl.maximum(q, 0.0).to(kmaxT.dtype)                                         # exact: max with 0
    q_neg = tl.minimum(q, 0.0).to(kminT.dtype)
    s = _dot(q_pos, kmaxT, IEEE, UPCAST) + _dot(q_neg, kminT, IEEE, UPCAST)            # (BLOCK_M, BLOCK_C)
    if SCALED:
        s = s * tl.load(scale_ptr + h * stride_sh + offs_c, mask=offs_c < C, other=0.0)[None, :]
    s = tl.where(valid_m[:, None], s, float("-inf"))
    best = tl.max(tl.max(tl.reshape(s, (G_PAD, TQ_PAD, BLOCK_C)), 1), 0)               # over t, then g
    tl.store(out_ptr + h * stride_outh + offs_c, best, mask=offs_c < C)


@triton.jit
def _pack_stats(m, l):
    """A row's (max, Σexp2) as one int64 word, published by one 64-bit atomic exchange. Never 0: l >= 1 whenever
    m is finite, and m = -inf or NaN has nonzero bits, so a zeroed word reads as "not yet published"."""
    return (m.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (l.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF)


@triton.jit
def _tile_scores(q, a_ptr, stride_ac, offs_d, mask_d, valid_m, c0, c_end, qk_scale,
                 BLOCK_C: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """Raw scores (log2 units) of q against landmarks c0 .. c0+BLOCK_C of a head (a_ptr: its first), -inf past
    c_end and on padded rows; and the tile's chunk ids and where it is real."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mask_c = offs_c < c_end
    a = tl.load(a_ptr + offs_c[:, None] * stride_ac + offs_d[None, :],
                mask=mask_c[:, None] & mask_d[None, :], other=0.0)                     # (BLOCK_C, BLOCK_D)
    s = _dot(q, tl.trans(a), IEEE, UPCAST) * qk_scale                                  # (BLOCK_M, BLOCK_C)
    keep = valid_m[:, None] & mask_c[None, :]
    return tl.where(keep, s, float("-inf")), offs_c, keep


@triton.jit
def _store_probs(out_h, s, lse, offs_c, mask_c, G_PAD: tl.constexpr, TQ2: tl.constexpr, BLOCK_C2: tl.constexpr):
    """Phase 2 for one block of raw scores s (ROWS, BLOCK_C2) read back from the scratch: probabilities
    2^(s - lse), summed over the tokens, max over the group, stored at chunks offs_c of the head's output row."""
    per_g = tl.sum(tl.reshape(tl.exp2(s - lse[:, None]), (G_PAD, TQ2, BLOCK_C2)), 1)   # (G_PAD, BLOCK_C2)
    tl.store(out_h + offs_c, tl.max(per_g, 0), mask=mask_c)


@triton.jit
def _landmark_scores_kernel(
    q_ptr, stride_qt, stride_qh,            # q (Tq, Hq, D): elements between tokens / heads; D contiguous
    a_ptr, stride_ah, stride_ac,            # landmarks (Hkv, C, D)
    s_ptr, stride_sh, stride_sm,            # raw scores scratch (Hkv, G*Tq, C) fp32, log2 units: row g*Tq + t
    word_ptr,                               # published stats (2 parities, Hkv, MAXP, ROWS) int64, zeroed
    epoch_ptr,                              # (Hkv,) int32: launches so far, per head; its parity picks the words
    out_ptr, stride_outh,                   # scores (Hkv, C) fp32
    C, qk_scale, P, MAXP, span, max_spins,  # P programs per head (at most MAXP), `span` chunks each
    Tq: tl.constexpr, D: tl.constexpr,      # query tokens and head dim: known, so their masks fold away
    G: tl.constexpr, G_PAD: tl.constexpr, TQ_PAD: tl.constexpr, BLOCK_M: tl.constexpr,  # BLOCK_M = G_PAD*TQ_PAD
    TQ2: tl.constexpr,                      # next_pow2(Tq): the real query rows are G_PAD*TQ2 (ROWS)
    BLOCK_C: tl.constexpr, BLOCK_C2: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    STAGES: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    KEEP: tl.constexpr, NT: tl.constexpr,   # Tq = 1: the span's raw scores stay in registers, NT tiles of them
):
    h = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    g = offs_m // TQ_PAD
    t = offs_m % TQ_PAD
    valid_m = (g < G) & (t < Tq)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q = tl.load(q_ptr + t[:, None] * stride_qt + (h * G + g)[:, None] * stride_qh + offs_d[None, :],
                mask=valid_m[:, None] & mask_d[None, :], other=0.0)                    # (BLOCK_M, BLOCK_D)
    ROWS: tl.constexpr = G_PAD * TQ2
    offs_r = tl.arange(0, ROWS)             # real rows r = g * TQ2 + t: the stats words, phase 2
    g_r = offs_r // TQ2
    t_r = offs_r % TQ2
    valid_r = (g_r < G) & (t_r < Tq)
    epoch = tl.load(epoch_ptr + h, volatile=True)
    parity = (epoch & 1).to(tl.int64)
    words = word_ptr + (parity * tl.num_programs(0) + h) * MAXP * ROWS             # this launch's, (MAXP, ROWS)
    spare = word_ptr + ((1 - parity) * tl.num_programs(0) + h) * MAXP * ROWS      # the next launch's
    c_start = p * span
    c_end = tl.minimum(c_start + span, C)

    # Phase 1: this span's raw scores s (log2 units) and each real row's (max m, Σexp2(s - m)).
    if KEEP:
        # One query token: row t = 0 of each group member. Tile i of the span goes to slot i of S.
        slots = tl.arange(0, NT)
        S = tl.full((G_PAD, NT, BLOCK_C), float("-inf"), tl.float32)
        for c0 in tl.range(c_start, c_end, BLOCK_C, num_stages=STAGES):
            s, _, _ = _tile_scores(q, a_ptr + h * stride_ah, stride_ac, offs_d, mask_d, valid_m, c0, c_end,
                                   qk_scale, BLOCK_C, IEEE, UPCAST)                    # (BLOCK_M, BLOCK_C)
            s = tl.max(tl.reshape(s, (G_PAD, TQ_PAD, BLOCK_C)), 1)                     # (G_PAD, BLOCK_C): t = 0
            S = tl.where((slots == (c0 - c_start) // BLOCK_C)[None, :, None], s[:, None, :], S)
        # The stats once, after the loop (no reduction across warps per tile); E serves phase 2 as well.
        m = tl.max(tl.max(S, 2), 1)                                                    # (G_PAD,)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        E = tl.exp2(S - m_safe[:, None, None])
        l = tl.sum(tl.sum(E, 2), 1)
        tl.atomic_xchg(words + p * ROWS + offs_r, _pack_stats(m, l), sem="relaxed")
    else:
        s_rows = s_ptr + h * stride_sh + (g * Tq + t)[:, None] * stride_sm             # valid rows only (masked)
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        for c0 in tl.range(c_start, c_end, BLOCK_C, num_stages=STAGES):
            s, offs_c, keep = _tile_scores(q, a_ptr + h * stride_ah, stride_ac, offs_d, mask_d, valid_m, c0, c_end,
                                           qk_scale, BLOCK_C, IEEE, UPCAST)            # (BLOCK_M, BLOCK_C)
            tl.store(s_rows + offs_c[None, :], s, mask=keep)   # padded rows are never written nor read
            m_new = tl.maximum(m, tl.max(s, 1))                # online softmax statistics
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m = m_new
        tl.atomic_xchg(words + p * ROWS + g * TQ2 + t, _pack_stats(m, l), mask=t < TQ2, sem="relaxed")
        # The first phase-2 tile of this program's own scores, loaded while the others finish. The CTA barrier
        # orders the stores above (made by other threads of this program) before these loads.
        s_rows2 = s_ptr + h * stride_sh + (g_r * Tq + t_r)[:, None] * stride_sm
        tl.debug_barrier()
        offs_f = c_start + tl.arange(0, BLOCK_C2)
        mask_f = offs_f < c_end
        s_first = tl.load(s_rows2 + offs_f[None, :], mask=valid_r[:, None] & mask_f[None, :], other=float("-inf"))

    # Zero the next launch's words that this program owns (no one reads them in this launch).
    for j in range(p, MAXP, P):
        tl.store(spare + j * ROWS + offs_r, tl.zeros((ROWS,), tl.int64))

    # Wait until the head's P programs have all published, BLOCK_P programs at a time: every word nonzero.
    # The words are the data, each one 64-bit atomic, so there is no counter and no fence: the poll that sees
    # them all also reads the stats. Each word is written once per launch, so a block seen complete stays so.
    # Bounded, so a grid that was not co-resident cannot hang the GPU (the launcher sizes the grid so it is).
    mx = tl.full((ROWS,), float("-inf"), tl.float32)
    tot = tl.zeros((ROWS,), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_w = (offs_p < P)[:, None] & valid_r[None, :]
        w_ptrs = words + offs_p[:, None] * ROWS + offs_r[None, :]
        w = tl.load(w_ptrs, mask=mask_w, other=1, volatile=True)                       # (BLOCK_P, ROWS)
        spins = 0
        while (tl.min(tl.where(w != 0, 1, 0)) == 0) & (spins < max_spins):
            w = tl.load(w_ptrs, mask=mask_w, other=1, volatile=True)
            spins += 1
        pm = tl.where(mask_w, (w >> 32).to(tl.int32).to(tl.float32, bitcast=True), float("-inf"))
        pl = tl.where(mask_w, (w & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True), 0.0)
        mx_new = tl.maximum(mx, tl.max(pm, 0))
        mx_safe = tl.where(mx_new == float("-inf"), 0.0, mx_new)
        tot = tot * tl.exp2(mx - mx_safe) + tl.sum(pl * tl.exp2(pm - mx_safe[None, :]), 0)
        mx = mx_new
    if p == 0:   # every program of the head has read the epoch by now (each published after reading it)
        tl.store(epoch_ptr + h, epoch + 1)
    lse = tl.where(mx == float("-inf"), 0.0, mx) + tl.log2(tl.where(tot > 0, tot, 1.0))   # (ROWS,); 0 if not real

    # Phase 2: this span's probabilities 2^(s - lse), summed over t, max over g.
    if KEEP:
        prob = E * tl.exp2(m_safe - lse)[:, None, None]                                 # (G_PAD, NT, BLOCK_C)
        offs_k = c_start + slots[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
        tl.store(out_ptr + h * stride_outh + offs_k, tl.max(prob, 0), mask=offs_k < c_end)
    else:
        out_h = out_ptr + h * stride_outh
        _store_probs(out_h, s_first, lse, offs_f, mask_f, G_PAD, TQ2, BLOCK_C2)
        for c0 in range(c_start + BLOCK_C2, c_end, BLOCK_C2):
            offs_c = c0 + tl.arange(0, BLOCK_C2)
            mask_c = offs_c < c_end
            s = tl.load(s_rows2 + offs_c[None, :], mask=valid_r[:, None] & mask_c[None, :], other=float("-inf"))
            _store_probs(out_h, s, lse, offs_c, mask_c, G_PAD, TQ2, BLOCK_C2)


def quantize_minmax(kmin: torch.Tensor, kmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Hkv, C, D) min/max keys as int8 with a scale per chunk and head, (Hkv, C) fp32: kmin rounded down and
    kmax rounded up, so ``kmin_q * scale <= kmin`` and ``kmax_q * scale >= kmax`` and the score stays a bound.
    The scale leaves one step of headroom below 127, and a value that the division rounded across an integer is
    moved one step out, so the inequalities hold exactly in fp32, not just to within rounding."""
    lo, hi = kmin.float(), kmax.float()
    scale = torch.maximum(lo.abs().amax(-1), hi.abs().amax(-1)).clamp_min(1e-30) / 126   # (Hkv, C)
    s = scale[..., None]
    qlo, qhi = (lo / s).floor(), (hi / s).ceil()
    qlo = torch.where(qlo * s > lo, qlo - 1, qlo)
    qhi = torch.where(qhi * s < hi, qhi + 1, qhi)
    return qlo.clamp(-127, 127).to(torch.int8), qhi.clamp(-127, 127).to(torch.int8), scale


def chunk_scores_ref(q, landmarks=None, *, kmin=None, kmax=None, scale=None, sm_scale: float | None = None):
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
    if scale is not None:
        s = s * scale.float()[:, None, None, :]
    return s.amax(2).amax(1)


def chunk_scores(q, landmarks=None, *, kmin=None, kmax=None, scale=None, sm_scale: float | None = None, out=None):
    """Score every chunk for the current queries, max over each GQA group.

    Args:
        q: (Tq, Hq, D) queries (post-RoPE), fp32/fp16/bf16.
        landmarks: (Hkv, C, D) mean keys per chunk -> summed softmax probabilities (give this, or kmin+kmax).
        kmin, kmax: (Hkv, C, D) elementwise min / max key per chunk -> unscaled upper bound of q·k.
            The abstracts may be in pinned CPU memory when q is on a GPU: the kernel reads them over PCIe.
        scale: (Hkv, C) fp32 with int8 kmin, kmax (`quantize_minmax`): the abstracts are ``k_int8 * scale``.
        sm_scale: landmark softmax scale, default 1/sqrt(D).
        out: optional (Hkv, C) fp32 buffer, rows contiguous (a column slice of a wider one is fine).

    Returns:
        (Hkv, C) fp32 scores.

    Landmark calls of one size on one device share their published-stats words, so they must not run
    concurrently on two streams.
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
        want = torch.int8 if scale is not None else q.dtype
        check(x.dtype == want, f"abstract dtype {x.dtype} != {want}")
    check(scale is None or (minmax and scale.shape == (Hkv, C) and scale.dtype == torch.float32
                            and scale.stride(1) == 1), "scale: (Hkv, C) fp32 with contiguous rows, min/max only")
    if minmax:
        check(kmin.stride() == kmax.stride(), "kmin and kmax must have the same strides")
    check(Hq % Hkv == 0, f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    G = Hq // Hkv
    if out is None:
        out = torch.empty((Hkv, C), dtype=torch.float32, device=q.device)
    check(out.shape == (Hkv, C) and out.dtype == torch.float32 and out.stride(1) == 1,
          "out must be an fp32 (Hkv, C) tensor with contiguous rows")
    if not use_triton(q, out, host=tuple(abstracts)):   # abstracts may be pinned host memory, read in place
        host = [x.to(q.device) if x is not None else None for x in (landmarks, kmin, kmax, scale)]
        out.copy_(chunk_scores_ref(q, host[0], kmin=host[1], kmax=host[2], scale=host[3], sm_scale=sm_scale))
        return out
    if C == 0:
        return out
    check(q.stride(2) == 1 and all(x.stride(2) == 1 for x in abstracts), "last dims must be contiguous")
    G_PAD, TQ_PAD = next_pow2(G), next_pow2(Tq)
    while G_PAD * TQ_PAD < 16:                      # tl.dot needs M >= 16
        TQ_PAD *= 2
    BLOCK_M = G_PAD * TQ_PAD
    check(BLOCK_M <= 256, f"G*Tq padded = {BLOCK_M} query rows per group: at most 256")
    shape = dict(D=D, G=G, G_PAD=G_PAD, TQ_PAD=TQ_PAD, BLOCK_M=BLOCK_M, BLOCK_D=max(16, next_pow2(D)),
                 **dot_flags(q.dtype))
    KERNEL_CALLS["chunk_scores"] += 1
    if minmax:
        BLOCK_C = 32 if interpreting() else 64
        _minmax_scores_kernel[(Hkv, -(-C // BLOCK_C))](
            q, q.stride(0), q.stride(1), kmin, kmax, kmin.stride(0), kmin.stride(1),
            out if scale is None else scale, 0 if scale is None else scale.stride(0), out, out.stride(0),
            Tq, C, BLOCK_C=BLOCK_C, SCALED=scale is not None, **shape, num_warps=8)
        return out
    _landmark_scores(q, landmarks, out, Hkv, C, sm_scale if sm_scale is not None else D ** -0.5, shape)
    return out


def _landmark_scores(q, landmarks, out, Hkv, C, scale, shape):
    Tq = q.shape[0]
    tile, most = _landmark_tile(q.device, q.dtype, Hkv, dict(shape, Tq=Tq, TQ2=next_pow2(Tq)))
    bc, rows = tile["BLOCK_C"], shape["G_PAD"] * tile["TQ2"]
    per_head = max(1, min(most, -(-C // bc)))
    span = -(-C // (per_head * bc)) * bc
    per_head = -(-C // span)
    n_tiles = next_pow2(-(-span // bc))
    keep = Tq == 1 and rows * n_tiles * bc <= KEEP_SCORES
    if keep:
        scratch = out[:, None]      # never touched: the raw scores stay in registers (no allocation per call)
    else:
        scratch = torch.empty((Hkv, shape["G"] * Tq, C), dtype=torch.float32, device=q.device)
    words, epoch = _stats_words(q.device, Hkv, most, rows)
    _landmark_scores_kernel[(Hkv, per_head)](
        *_landmark_args(q, landmarks, scratch, words, epoch, out, C, scale, per_head, most, span),
        BLOCK_C2=min(next_pow2(span), _phase2_block(rows)), BLOCK_P=min(next_pow2(per_head), _poll_block(rows)),
        KEEP=keep, NT=n_tiles if keep else 1, **tile)


def _landmark_args(q, landmarks, scratch, words, epoch, out, C, scale, per_head, most, span):
    return (q, q.stride(0), q.stride(1), landmarks, landmarks.stride(0), landmarks.stride(1),
            scratch, scratch.stride(0), scratch.stride(1), words, epoch, out, out.stride(0),
            C, scale * 1.4426950408889634, per_head, most, span, 1 << 22)


def _phase2_block(rows: int) -> int:
    """Chunks per phase-2 step from the scratch: 4,096 scores of the real rows (64 registers a thread at 2 warps)."""
    return max(32, 4096 // rows)


def _poll_block(rows: int) -> int:
    """Programs' words per poll: at most 1,024 of them (BLOCK_P x ROWS), so a poll stays within registers."""
    return max(2, min(64, 1024 // rows))


_TILES: dict[tuple, tuple[dict, int]] = {}


def _landmark_tile(device: torch.device, dtype: torch.dtype, Hkv: int, shape: dict) -> tuple[dict, int]:
    """(launch constexprs and options, most programs per head) for these shapes, worked out once.

    Every program of the grid must be resident at once, since they wait for each other. On a GPU the launch
    is cooperative (CUDA refuses a grid that cannot all be resident, rather than letting it hang), and the
    programs per head are what the compiled kernel's registers and shared memory allow, at most TILE's
    per SM, for both phase-1 variants (scratch, and scores kept in registers) at their largest. The
    interpreter runs programs one after another: one per head there."""
    key = (device, dtype, Hkv, tuple(sorted(shape.items())), tuple(sorted(TILE.items())), interpreting())
    if key in _TILES:
        return _TILES[key]
    BLOCK_M, rows = shape["BLOCK_M"], shape["G_PAD"] * shape["TQ2"]
    tile = dict(shape)
    if interpreting():
        tile.update(BLOCK_C=32, STAGES=1, num_warps=4)
        most = 1
    else:
        tile.update(BLOCK_C=TILE["block_c"] if BLOCK_M <= 32 else 32, STAGES=TILE["stages"],
                    num_warps=TILE["warps"] if BLOCK_M <= 32 else 8, launch_cooperative_grid=True)
        variants = [dict(KEEP=False, NT=1)]
        if shape["TQ2"] == 1 and rows * tile["BLOCK_C"] <= KEEP_SCORES:
            variants.append(dict(KEEP=True, NT=KEEP_SCORES // (rows * tile["BLOCK_C"])))
        q = torch.empty((shape["Tq"], Hkv * shape["G"], shape["D"]), dtype=dtype, device=device)
        lm = torch.empty((Hkv, 1, shape["D"]), dtype=dtype, device=device)
        f32 = torch.empty((Hkv, 1, 1), dtype=torch.float32, device=device)
        words = torch.zeros(1, dtype=torch.int64, device=device)
        epoch = torch.zeros(1, dtype=torch.int32, device=device)
        args = _landmark_args(q, lm, f32, words, epoch, f32[:, 0], 1, 1.0, 1, 1, 1)
        fits = min(_resident(device, _landmark_scores_kernel.warmup(
            *args, grid=(1,), BLOCK_C2=_phase2_block(rows), BLOCK_P=_poll_block(rows), **v, **tile), tile["num_warps"])
            for v in variants)
        most = min(TILE["per_sm"], fits) * n_sms(device) // Hkv
        check(most >= 1, f"landmark scoring: {Hkv} programs cannot all be resident on {device}")
    _TILES[key] = tile, most
    return tile, most


_WORDS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _stats_words(device: torch.device, heads: int, most: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The published-stats words (2 parities x heads x most programs x rows, int64, zeroed) and the per-head
    launch epochs (int32) for launches of this size. Each launch publishes into its epoch's parity and zeroes
    the other for the next one, so they stay consistent across launches and graph replays. Allocated once per
    size: a static address, as CUDA graph replays need."""
    key = (device, heads, most, rows)
    if key not in _WORDS:
        _WORDS[key] = (torch.zeros(2 * heads * most * rows, dtype=torch.int64, device=device),
                       torch.zeros(heads, dtype=torch.int32, device=device))
    return _WORDS[key]


def _resident(device: torch.device, kernel, warps: int) -> int:
    """Programs of a compiled kernel that fit on one SM at once, by registers, shared memory and threads."""
    props = torch.cuda.get_device_properties(device)
    try:
        kernel._init_handles()                  # loads the binary: the register count is known from then on
        n_regs = kernel.n_regs or 255
    except Exception:  # noqa: BLE001 (another Triton's internals: assume the most a thread can use)
        n_regs = 255
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (n_regs * 32 * warps)
    shared = kernel.metadata.shared
    smem = getattr(props, "shared_memory_per_multiprocessor", 100 * 1024)
    by_smem = smem // (shared + 1024) if shared else 32          # the driver reserves 1 KB per block
    by_threads = getattr(props, "max_threads_per_multi_processor", 1536) // (32 * warps)
    return max(0, min(by_regs, by_smem, by_threads, 32))
