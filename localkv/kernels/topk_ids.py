"""The ids of the k largest scores of each row, in ascending id order: which chunks a decode step selects.

``torch.topk`` over 16K chunk scores with k = 257 took 75 µs a row block on an H100, and the sort of its ids
another 25 µs: a tenth of a ShadowKV decode step. The selection needs neither the order of the scores nor
more than one pass of real work, so one program per row does it as a *radix select* by ternary search:

1. Each fp32 score maps to an int32 key with the same order: the bits as an int for x >= 0, with the
   magnitude bits flipped for x < 0 (``b ^ ((b >> 31) & 0x7fffffff)``); -0.0 first becomes 0.0.
2. Search for the k-th largest key T, the row in registers when it fits in one block. The bracket starts at
   the row's extremes (leaving out the -inf of excluded chunks while k keys are above them). Each step is a
   block reduction, mostly latency, so each counts at two thresholds in one reduction (the two counts packed
   in one int32) and keeps a third of the bracket. The search stops as soon as T is the largest or the
   smallest key in its bracket, which one more reduction finds: 9.0 reductions a row in all on rows shaped
   like a 128K step's (the search replayed in Python on such rows), where searching the key range down to one
   key takes 22.
3. Compact in id order: every key > T, then the first ``k - #(key > T)`` keys equal to T (ties go to
   the lowest ids). One scan, of both counts packed in an int32, gives each taken element its output slot.

The result is sorted ids, no sort needed. Ties are broken by id, as the reference's stable sort does.
NaN scores are not expected. (-inf is a score like any other: excluded chunks are -inf, and k never
exceeds the chunks that are not.)
"""

from __future__ import annotations

import torch

from ._common import KERNEL_CALLS, check, interpreting, next_pow2, tl, triton, use_triton

MAX_BLOCK = 16384
"""Scores per block: a row up to this long is loaded once and searched in registers."""

ALIGN = 16
"""Columns a caller pads rows to (`topk_ids`'s ``valid``). Triton vectorizes a row's loads only when it can
prove the row length and the row stride multiples of 16. On an H100 (graphed, one run; 8 rows of landmark
scores, k = 257): 17.7 µs at 16,384 columns, 21.5 at 16,380 (docs/benchmarks.md, "Kernels")."""

WARPS = 8
"""Warps of a program whose block is 8K scores or more (4 below that). On an H100 at the 128K ShadowKV shape
(8 rows of 16,384 landmark scores, k = 257; graphed, one run): 17.7 µs at 8 warps, 18.8 at 16, 31.1 at 4; with
a compaction of two scans rather than one, 21.7 at 8."""


@triton.jit
def _ordered_keys(s_ptr, e_ptr, offs, N, NV, HAS_EX: tl.constexpr):
    """int32 keys ordered as the fp32 scores at ``offs`` (out of range: INT_MIN, below every score); a score
    marked in the exclusion mask ``e_ptr`` (uint8), or in the padding at ``NV`` and after, counts as -inf."""
    x = tl.load(s_ptr + offs, mask=offs < N, other=0.0)
    if HAS_EX:
        x = tl.where(tl.load(e_ptr + offs, mask=offs < N, other=0) != 0, float("-inf"), x)
    x = tl.where(offs < NV, x, float("-inf"))
    x = tl.where(x == 0.0, 0.0, x)                  # -0.0 ties with 0.0, as float comparison has it
    b = x.to(tl.int32, bitcast=True)
    key = b ^ ((b >> 31) & 0x7FFFFFFF)
    return tl.where(offs < N, key, -2147483648)


@triton.jit
def _count_at_least(s_ptr, e_ptr, keys, N, NV, a, b, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
                    HAS_EX: tl.constexpr):
    """(#(key >= a), #(key >= b)) over the row (``keys``: the row's keys when it is one block).

    Both counts come out of one reduction: a block holds at most 16K keys, so each count fits in 16 bits and
    the pair is summed as ``(key >= a) + ((key >= b) << 16)`` in int32."""
    if ONE_BLOCK:
        packed = tl.sum((keys >= a).to(tl.int32) + ((keys >= b).to(tl.int32) << 16), 0)
        ca = packed & 0xFFFF
        cb = packed >> 16
    else:
        ca = 0
        cb = 0
        for n0 in range(0, N, BLOCK_N):
            kb = _ordered_keys(s_ptr, e_ptr, n0 + tl.arange(0, BLOCK_N), N, NV, HAS_EX)
            packed = tl.sum((kb >= a).to(tl.int32) + ((kb >= b).to(tl.int32) << 16), 0)
            ca += packed & 0xFFFF
            cb += packed >> 16
    return ca, cb


NEG_INF_KEY = tl.constexpr(-2139095041)
"""The key of -inf (0xFF800000 ordered): what an excluded chunk scores."""


@triton.jit
def _max_min_sum(top_a, bottom_a, n_a, top_b, bottom_b, n_b):
    return tl.maximum(top_a, top_b), tl.minimum(bottom_a, bottom_b), n_a + n_b


@triton.jit
def _range_within(s_ptr, e_ptr, keys, N, NV, lo, hi, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
                  HAS_EX: tl.constexpr):
    """(largest, smallest, how many) of the row's keys in [lo, hi], in one reduction; the largest and smallest
    are INT_MIN and INT_MAX when there are none."""
    offs = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        inside = (offs < N) & (keys >= lo) & (keys <= hi)
        top, bottom, n = tl.reduce((tl.where(inside, keys, -2147483648), tl.where(inside, keys, 2147483647),
                                    inside.to(tl.int32)), 0, _max_min_sum)
    else:
        top = tl.full((), -2147483648, tl.int32)
        bottom = tl.full((), 2147483647, tl.int32)
        n = tl.full((), 0, tl.int32)
        for n0 in range(0, N, BLOCK_N):
            kb = _ordered_keys(s_ptr, e_ptr, n0 + offs, N, NV, HAS_EX)
            inside = (n0 + offs < N) & (kb >= lo) & (kb <= hi)
            t_b, b_b, n_b = tl.reduce((tl.where(inside, kb, -2147483648), tl.where(inside, kb, 2147483647),
                                       inside.to(tl.int32)), 0, _max_min_sum)
            top = tl.maximum(top, t_b)
            bottom = tl.minimum(bottom, b_b)
            n += n_b
    return top, bottom, n


@triton.jit
def _kth_largest(s_ptr, e_ptr, keys, N, NV, k, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
                 HAS_EX: tl.constexpr):
    """(T, above) for ``1 <= k``: T the k-th largest key of the row, ``above`` how many keys > T the top k
    take (the other ``k - above`` are ties at T). ``keys``: the row's keys when it is one block (keys past N
    are INT_MIN), else unused and each block is read again from ``s_ptr``, ``e_ptr``."""
    # T lies in [lo, hi] with c_lo = #(key >= lo) >= k and c_hi = #(key > hi) < k.
    # Start from the row's extremes, leaving out the -inf of excluded chunks when k keys are above them
    # (a decode step's rows hold a few: their key would stretch the bracket over half the key range).
    # int64 bounds: no overflow at the ends of the key range.
    top, bottom, n_above = _range_within(s_ptr, e_ptr, keys, N, NV, NEG_INF_KEY + 1, 2147483647,
                                         BLOCK_N, ONE_BLOCK, HAS_EX)
    enough = n_above >= k
    lo = tl.where(enough, bottom, -2147483648).to(tl.int64)
    hi = tl.where(n_above > 0, top, NEG_INF_KEY).to(tl.int64)
    c_lo = tl.where(enough, n_above, N)
    c_hi = tl.full((), 0, tl.int32)
    # Each step splits the bracket in three at a <= b (both in (lo, hi] while lo < hi) with the two counts of
    # one reduction, and keeps the third that holds T. It stops as soon as T is an end of the keys in the
    # bracket: the largest when k - c_hi == 1 (T is the first key below the c_hi above hi), the smallest when
    # c_lo == k (every key >= lo is taken). On a 128K step's rows that comes after 7 steps on average, 10 at
    # most (the search replayed in Python on such rows); at worst it takes the bracket down to one key, 21 steps
    # for the 2^32 keys (3^21 > 2^32, checked for this rounding).
    while (lo < hi) & (k - c_hi != 1) & (c_lo != k):
        d = hi - lo
        a = lo + (d + 2) // 3
        b = lo + (2 * d + 2) // 3
        ca, cb = _count_at_least(s_ptr, e_ptr, keys, N, NV, a.to(tl.int32), b.to(tl.int32),
                                 BLOCK_N, ONE_BLOCK, HAS_EX)
        a_ok = ca >= k
        b_ok = cb >= k
        c_hi = tl.where(b_ok, c_hi, tl.where(a_ok, cb, ca))
        hi = tl.where(b_ok, hi, tl.where(a_ok, b - 1, a - 1))
        c_lo = tl.where(b_ok, cb, tl.where(a_ok, ca, c_lo))
        lo = tl.where(b_ok, b, tl.where(a_ok, a, lo))
    top, bottom, _ = _range_within(s_ptr, e_ptr, keys, N, NV, lo.to(tl.int32), hi.to(tl.int32),
                                   BLOCK_N, ONE_BLOCK, HAS_EX)
    first = k - c_hi == 1
    t = tl.where(lo == hi, lo.to(tl.int32), tl.where(first, top, bottom))
    # Keys above T to take: c_hi when T = lo = hi or T is the largest in the bracket; when T is the smallest,
    # exactly k keys are >= T and all of them are taken (as ties: k - above = k covers every one).
    above = tl.where((lo == hi) | first, c_hi, 0)
    return t, above


@triton.jit
def _take_top(s_ptr, e_ptr, keys, N, NV, t, above, k, out_ptr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
              HAS_EX: tl.constexpr):
    """Writes the ids of the top k (every key > T, then the first ``k - above`` keys equal to T) to
    ``out_ptr[0 .. k-1]``, ascending, in ``out_ptr``'s dtype."""
    offs = tl.arange(0, BLOCK_N)
    need_eq = k - above
    gt_seen = 0
    eq_seen = 0
    for n0 in range(0, N, BLOCK_N):
        if not ONE_BLOCK:
            keys = _ordered_keys(s_ptr, e_ptr, n0 + offs, N, NV, HAS_EX)
        gt = (keys > t).to(tl.int32)
        eq = (keys == t).to(tl.int32)
        # One scan gives both running counts, packed as in `_count_at_least`. An element's output slot is the
        # keys above T up to it plus the ties taken up to it (at most need_eq): one less, counting from 0.
        both = tl.cumsum(gt + (eq << 16), 0)
        gt_upto = gt_seen + (both & 0xFFFF)
        eq_upto = eq_seen + (both >> 16)
        take = (gt != 0) | ((eq != 0) & (eq_upto <= need_eq))
        slot = gt_upto + tl.minimum(eq_upto, need_eq) - 1
        tl.store(out_ptr + slot, (n0 + offs).to(out_ptr.dtype.element_ty), mask=take)
        if not ONE_BLOCK:
            total = tl.sum(gt + (eq << 16), 0)
            gt_seen += total & 0xFFFF
            eq_seen += total >> 16


@triton.jit
def _topk_ids_kernel(
    s_ptr, stride_s,          # scores (R, N) fp32: elements between rows; last dim contiguous
    e_ptr, stride_e,          # exclusion mask (R, N) uint8 (when HAS_EX): nonzero scores count as -inf
    out_ptr, stride_o,        # ids (R, k) int64
    N, NV, k,                 # row length, scores in it (the rest: padding, read as -inf), ids to take
    BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr, HAS_EX: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    s_ptr += r * stride_s
    e_ptr += r * stride_e
    out_ptr += r * stride_o
    keys = _ordered_keys(s_ptr, e_ptr, tl.arange(0, BLOCK_N), N, NV, HAS_EX)  # the row when ONE_BLOCK, else unused
    t, above = _kth_largest(s_ptr, e_ptr, keys, N, NV, k, BLOCK_N, ONE_BLOCK, HAS_EX)
    _take_top(s_ptr, e_ptr, keys, N, NV, t, above, k, out_ptr, BLOCK_N, ONE_BLOCK, HAS_EX)


def topk_ids_ref(scores: torch.Tensor, k: int, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Torch version of `topk_ids`: a stable descending sort (ties to the lowest id), the first k, sorted."""
    if excluded is not None:
        scores = scores.masked_fill(excluded, float("-inf"))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=1).values


def topk_ids(scores: torch.Tensor, k: int, out: torch.Tensor | None = None,
             excluded: torch.Tensor | None = None, valid: int | None = None) -> torch.Tensor:
    """The ids of the ``k`` largest entries of each row of ``scores`` (R, N) fp32, ascending: (R, k) int64.

    Ties go to the lowest ids. ``0 <= k <= valid``. ``excluded``, an optional (R, N) bool mask, makes its
    entries score -inf (read in the same pass: no masked copy of the scores). ``valid`` (default N): only the
    first ``valid`` columns are scores; the rest of each row is padding, read (whatever it holds) but never
    taken. A caller pads rows to a multiple of 16 columns, in a buffer whose row stride is one too: the kernel's
    loads are then vectorized: on an H100 a 128K step's select takes 17.7 µs, not 21.5 (``ALIGN``).
    """
    check(scores.dim() == 2 and scores.dtype == torch.float32, "scores must be (R, N) fp32")
    R, N = scores.shape
    valid = N if valid is None else valid
    check(0 <= k <= valid <= N, f"k={k} must be in [0, valid={valid}], valid in [0, N={N}]")
    check(excluded is None or excluded.shape == (R, N) and excluded.dtype == torch.bool,
          f"excluded must be a ({R}, {N}) bool mask")
    if out is None:
        out = torch.empty((R, k), dtype=torch.long, device=scores.device)
    check(out.shape == (R, k) and out.dtype == torch.long and out.stride(1) == 1, "out must be (R, k) int64")
    if not use_triton(scores, out, excluded):
        out.copy_(topk_ids_ref(scores[:, :valid], k, None if excluded is None else excluded[:, :valid]))
        return out
    if R == 0 or k == 0:
        return out
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    mask = scores   # a placeholder pointer when there is no mask (HAS_EX off)
    if excluded is not None:
        mask = (excluded if excluded.stride(1) == 1 else excluded.contiguous()).view(torch.uint8)
    BLOCK_N = min(next_pow2(N), 256 if interpreting() else MAX_BLOCK)
    KERNEL_CALLS["topk_ids"] += 1
    _topk_ids_kernel[(R,)](scores, scores.stride(0), mask, mask.stride(0), out, out.stride(0), N, valid, k,
                           BLOCK_N=BLOCK_N, ONE_BLOCK=BLOCK_N >= N, HAS_EX=excluded is not None,
                           num_warps=WARPS if BLOCK_N >= 8192 else 4)
    return out
