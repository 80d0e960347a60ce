"""Chunk scoring of queries against per-chunk abstracts, reduced over the GQA group: which chunks to fetch.

Queries ``q (Tq, Hq, D)``; abstracts per KV head and chunk, one of:

- **landmarks** ``(Hkv, C, D)`` (ShadowKV: mean post-RoPE key of each chunk). Score of chunk c for KV head h:
  ``max_g Σ_t softmax_c(q[t, h*G+g] · landmark[h, c] * sm_scale)`` (softmax over all C chunks, summed over
  the query positions, max over the group). Values in [0, Tq].
- **min/max keys** ``kmin, kmax (Hkv, C, D)`` (Quest / LeoAM upper bound): ``max_{g,t} Σ_d max(q_d kmin_d,
  q_d kmax_d)``, an upper bound of ``q·k`` over every key of the chunk, *unscaled*. Computed exactly as
  ``q⁺·kmax + q⁻·kmin`` with ``q⁺ = max(q, 0)``, ``q⁻ = min(q, 0)``: two tensor-core dots.

Returns ``(Hkv, C)`` fp32. Tile rows are ``m = g * TQ_PAD + t`` (group member, token), both padded to powers
of two so the group reduction is a reshape.

The landmark softmax needs each row's normaliser over all C chunks before any chunk's probability, a
grid-wide dependency. One launch handles it: each head's chunks are split among P co-resident programs.
A program scores its span, keeping the raw scores in a scratch buffer (fp32, G*Tq rows: 1/16 of the landmarks' bytes
at D = 128) and its rows' running (max, Σexp). It then waits at a per-head barrier (an atomic counter),
forms every row's LSE from the P programs' stats, and turns its own span's scores into probabilities.
The waiting needs every program of the grid resident at once, so the launcher sizes P from the compiled
kernel's occupancy and launches cooperatively (CUDA refuses a grid that cannot all be resident). On an H100
this one launch is faster than two passes with a launch between them (16K chunks: 18.8 µs against 22.5;
128K chunks: 118 µs against 143, one run). At 16K chunks the barrier costs ~3 µs of the 18.8
(docs/benchmarks.md). Under the CPU interpreter programs run one after another, so there P = 1 per head.
"""

from __future__ import annotations

import torch

from ._common import KERNEL_CALLS, _dot, check, dot_flags, interpreting, n_sms, next_pow2, tl, triton, use_triton

TILE = {"block_c": 64, "warps": 2, "stages": 3, "per_sm": 2}
"""Landmark tile and programs: chunks per loop step, warps, pipeline stages, most programs per SM. Swept on
an H100 (scripts/sweep_kernels.py --scores-only; 16K and 128K chunks): 2 warps with 3 stages beat 4-8 warps at every
tile; 2 programs per SM beat 4 at 16K chunks (19.0 µs against 20.0) and are within 2% at 128K."""


@triton.jit
def _minmax_scores_kernel(
    q_ptr, stride_qt, stride_qh,            # q (Tq, Hq, D): elements between tokens / heads; D contiguous
    kmin_ptr, kmax_ptr, stride_ah, stride_ac,  # kmin, kmax (Hkv, C, D), same strides
    out_ptr, stride_outh,                   # scores (Hkv, C) fp32
    Tq, C, D,
    G: tl.constexpr, G_PAD: tl.constexpr, TQ_PAD: tl.constexpr, BLOCK_M: tl.constexpr,  # BLOCK_M = G_PAD*TQ_PAD
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
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
    kminT = tl.load(kmin_ptr + at, mask=mask_dc, other=0.0)                            # (BLOCK_D, BLOCK_C)
    kmaxT = tl.load(kmax_ptr + at, mask=mask_dc, other=0.0)
    q_pos = tl.maximum(q, 0.0).to(kmaxT.dtype)                                         # exact: max with 0
    q_neg = tl.minimum(q, 0.0).to(kminT.dtype)
    s = _dot(q_pos, kmaxT, IEEE, UPCAST) + _dot(q_neg, kminT, IEEE, UPCAST)            # (BLOCK_M, BLOCK_C)
    s = tl.where(valid_m[:, None], s, float("-inf"))
    best = tl.max(tl.max(tl.reshape(s, (G_PAD, TQ_PAD, BLOCK_C)), 1), 0)               # over t, then g
    tl.store(out_ptr + h * stride_outh + offs_c, best, mask=offs_c < C)


@triton.jit
def _landmark_scores_kernel(
    q_ptr, stride_qt, stride_qh,            # q (Tq, Hq, D): elements between tokens / heads; D contiguous
    a_ptr, stride_ah, stride_ac,            # landmarks (Hkv, C, D)
    s_ptr, stride_sh, stride_sm,            # raw scores scratch (Hkv, G*Tq, C) fp32, log2 units: row g*Tq + t
    stat_ptr,                               # (Hkv, P, 2, BLOCK_M) fp32: each program's row max and Σexp2
    count_ptr,                              # (Hkv, 2) int32: arrived (0 between launches), generation
    out_ptr, stride_outh,                   # scores (Hkv, C) fp32
    Tq, C, D, qk_scale, P, span, max_spins,  # P programs per head, `span` chunks each
    G: tl.constexpr, G_PAD: tl.constexpr, TQ_PAD: tl.constexpr, BLOCK_M: tl.constexpr,  # BLOCK_M = G_PAD*TQ_PAD
    BLOCK_C: tl.constexpr, BLOCK_C2: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    STAGES: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
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
    gen0 = tl.load(count_ptr + 2 * h + 1, volatile=True)   # this launch's generation (see the barrier)
    c_start = p * span
    c_end = tl.minimum(c_start + span, C)
    s_rows = s_ptr + h * stride_sh + (g * Tq + t)[:, None] * stride_sm   # valid rows only (masked)

    # Phase 1: raw scores of this span to the scratch, and each row's running max / Σexp2 (online softmax).
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in tl.range(c_start, c_end, BLOCK_C, num_stages=STAGES):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < c_end
        a = tl.load(a_ptr + h * stride_ah + offs_c[:, None] * stride_ac + offs_d[None, :],
                    mask=mask_c[:, None] & mask_d[None, :], other=0.0)                 # (BLOCK_C, BLOCK_D)
        s = _dot(q, tl.trans(a), IEEE, UPCAST) * qk_scale                              # (BLOCK_M, BLOCK_C)
        keep = valid_m[:, None] & mask_c[None, :]
        s = tl.where(keep, s, float("-inf"))
        tl.store(s_rows + offs_c[None, :], s, mask=keep)       # padded rows are never written nor read
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m = m_new
    stats = stat_ptr + (h * P + p) * 2 * BLOCK_M + offs_m
    tl.store(stats, m)
    tl.store(stats + BLOCK_M, l)

    # Per-head barrier, by generations: the counter counts arrivals; the last to arrive resets it and bumps the
    # head's generation, which the others wait to see change from the value read at the start. The arrival's
    # release orders this program's stats and scores before it, its acquire (for the last) and the waiters'
    # acquire order the reads below after everyone's. One atomic round trip fewer on the way out than
    # counting departures too (16K chunks: 19.0 µs against 20.2). Bounded, so a grid that was not
    # co-resident cannot hang the GPU (the launcher sizes the grid so that it is).
    if tl.atomic_add(count_ptr + 2 * h, 1, sem="acq_rel") == P - 1:
        tl.atomic_xchg(count_ptr + 2 * h, 0, sem="relaxed")
        tl.atomic_add(count_ptr + 2 * h + 1, 1, sem="release")
    else:
        gen = tl.atomic_add(count_ptr + 2 * h + 1, 0, sem="acquire")
        spins = 0
        while (gen == gen0) & (spins < max_spins):
            gen = tl.atomic_add(count_ptr + 2 * h + 1, 0, sem="acquire")
            spins += 1

    # Row LSE over every program's (max, Σexp2), BLOCK_P programs at a time. Volatile loads: the stats were
    # written by other SMs.
    mx = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    tot = tl.zeros((BLOCK_M,), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        sp = stat_ptr + (h * P + offs_p[:, None]) * 2 * BLOCK_M + offs_m[None, :]
        mask_p = (offs_p < P)[:, None]
        pm = tl.load(sp, mask=mask_p, other=float("-inf"), volatile=True)              # (BLOCK_P, BLOCK_M)
        pl = tl.load(sp + BLOCK_M, mask=mask_p, other=0.0, volatile=True)
        mx_new = tl.maximum(mx, tl.max(pm, 0))
        mx_safe = tl.where(mx_new == float("-inf"), 0.0, mx_new)
        tot = tot * tl.exp2(mx - mx_safe) + tl.sum(pl * tl.exp2(pm - mx_safe[None, :]), 0)
        mx = mx_new
    lse = tl.where(mx == float("-inf"), 0.0, mx) + tl.log2(tl.where(tot > 0, tot, 1.0))

    # Phase 2: this span's probabilities, summed over t, max over g (its own scores, back from L2).
    for c0 in range(c_start, c_end, BLOCK_C2):
        offs_c = c0 + tl.arange(0, BLOCK_C2)
        mask_c = offs_c < c_end
        s = tl.load(s_rows + offs_c[None, :], mask=valid_m[:, None] & mask_c[None, :], other=float("-inf"))
        prob = tl.exp2(s - lse[:, None])                                               # 0 on padded rows
        per_g = tl.sum(tl.reshape(prob, (G_PAD, TQ_PAD, BLOCK_C2)), 1)                 # (G_PAD, BLOCK_C2)
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
            The abstracts may be in pinned CPU memory when q is on a GPU: the kernel reads them over PCIe.
        sm_scale: landmark softmax scale, default 1/sqrt(D).
        out: optional (Hkv, C) fp32 buffer, rows contiguous (a column slice of a wider one is fine).

    Returns:
        (Hkv, C) fp32 scores.

    Landmark calls on one device share a barrier counter, so they must not run concurrently on two streams.
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
    if minmax:
        check(kmin.stride() == kmax.stride(), "kmin and kmax must have the same strides")
    check(Hq % Hkv == 0, f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    G = Hq // Hkv
    if out is None:
        out = torch.empty((Hkv, C), dtype=torch.float32, device=q.device)
    check(out.shape == (Hkv, C) and out.dtype == torch.float32 and out.stride(1) == 1,
          "out must be an fp32 (Hkv, C) tensor with contiguous rows")
    scale = sm_scale if sm_scale is not None else D ** -0.5
    if not use_triton(q, out, host=tuple(abstracts)):   # abstracts may be pinned host memory, read in place
        host = [x.to(q.device) if x is not None else None for x in (landmarks, kmin, kmax)]
        out.copy_(chunk_scores_ref(q, host[0], kmin=host[1], kmax=host[2], sm_scale=scale))
        return out
    if C == 0:
        return out
    check(q.stride(2) == 1 and all(x.stride(2) == 1 for x in abstracts), "last dims must be contiguous")
    G_PAD, TQ_PAD = next_pow2(G), next_pow2(Tq)
    while G_PAD * TQ_PAD < 16:                      # tl.dot needs M >= 16
        TQ_PAD *= 2
    BLOCK_M = G_PAD * TQ_PAD
    check(BLOCK_M <= 256, f"G*Tq padded = {BLOCK_M} query rows per group: at most 256")
    shape = dict(G=G, G_PAD=G_PAD, TQ_PAD=TQ_PAD, BLOCK_M=BLOCK_M, BLOCK_D=max(16, next_pow2(D)), **dot_flags(q.dtype))
    KERNEL_CALLS["chunk_scores"] += 1
    if minmax:
        BLOCK_C = 32 if interpreting() else 64
        _minmax_scores_kernel[(Hkv, -(-C // BLOCK_C))](
            q, q.stride(0), q.stride(1), kmin, kmax, kmin.stride(0), kmin.stride(1), out, out.stride(0),
            Tq, C, D, BLOCK_C=BLOCK_C, **shape, num_warps=8)
        return out
    _landmark_scores(q, landmarks, out, Hkv, C, D, scale, shape)
    return out


def _landmark_scores(q, landmarks, out, Hkv, C, D, scale, shape):
    tile, most = _landmark_tile(q.device, q.dtype, Hkv, shape)
    per_head = max(1, min(most, -(-C // tile["BLOCK_C"])))
    span = -(-C // (per_head * tile["BLOCK_C"])) * tile["BLOCK_C"]
    per_head = -(-C // span)
    scratch = torch.empty((Hkv, shape["G"] * q.shape[0], C), dtype=torch.float32, device=q.device)
    stats = torch.empty((Hkv, per_head, 2, shape["BLOCK_M"]), dtype=torch.float32, device=q.device)
    _landmark_scores_kernel[(Hkv, per_head)](*_landmark_args(q, landmarks, out, scratch, stats, C, D, scale,
                                                             per_head, span), **tile)


def _landmark_args(q, landmarks, out, scratch, stats, C, D, scale, per_head, span):
    return (q, q.stride(0), q.stride(1), landmarks, landmarks.stride(0), landmarks.stride(1),
            scratch, scratch.stride(0), scratch.stride(1), stats, _counters(q.device, landmarks.shape[0]),
            out, out.stride(0), q.shape[0], C, D, scale * 1.4426950408889634, per_head, span, 1 << 22)


_TILES: dict[tuple, tuple[dict, int]] = {}


def _landmark_tile(device: torch.device, dtype: torch.dtype, Hkv: int, shape: dict) -> tuple[dict, int]:
    """(launch constexprs and options, most programs per head) for these shapes, worked out once.

    Every program of the grid must be resident at once, since they wait for each other. On a GPU the launch
    is cooperative (CUDA refuses a grid that cannot all be resident, rather than letting it hang), and the
    programs per head are what the compiled kernel's registers and shared memory allow, at most TILE's
    per SM. The interpreter runs programs one after another: one per head there."""
    key = (device, dtype, Hkv, tuple(sorted(shape.items())), tuple(sorted(TILE.items())), interpreting())
    if key in _TILES:
        return _TILES[key]
    BLOCK_M = shape["BLOCK_M"]
    tile = dict(BLOCK_C2=max(32, 4096 // BLOCK_M), BLOCK_P=32, **shape)
    if interpreting():
        tile.update(BLOCK_C=32, STAGES=1, num_warps=4)
        most = 1
    else:
        tile.update(BLOCK_C=TILE["block_c"] if BLOCK_M <= 32 else 32, STAGES=TILE["stages"],
                    num_warps=TILE["warps"] if BLOCK_M <= 32 else 8, launch_cooperative_grid=True)
        sms = n_sms(device)
        q = torch.empty((1, Hkv * shape["G"], shape["BLOCK_D"]), dtype=dtype, device=device)
        lm = torch.empty((Hkv, 1, shape["BLOCK_D"]), dtype=dtype, device=device)
        f32 = torch.empty((Hkv, 1, 1), dtype=torch.float32, device=device)
        kernel = _landmark_scores_kernel.warmup(*_landmark_args(q, lm, f32[:, 0], f32, f32, 1, shape["BLOCK_D"], 1.0,
                                                                1, 1), grid=(1,), **tile)
        most = min(TILE["per_sm"] * sms, _resident(device, kernel, tile["num_warps"]) * sms) // Hkv
        check(most >= 1, f"landmark scoring: {Hkv} programs cannot all be resident on {device}")
    _TILES[key] = tile, most
    return tile, most


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, heads: int) -> torch.Tensor:
    """The device's barrier counters, (heads, 2) int32: arrivals (zero between launches: each launch leaves them
    so) and the generation (each launch adds one).
    One buffer per device, grown when more heads come: a static address, as CUDA graph replays need."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < 2 * heads:
        buf = _COUNTERS[device] = torch.zeros(2 * max(heads, 64), dtype=torch.int32, device=device)
    return buf


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
