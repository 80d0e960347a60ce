"""Simulation (development aid, CPU): how many block reductions `kernels.topk_ids` spends on a row.

    python scripts/sim_topk_search.py [--rows 64] [--seed 0]

Rows shaped like a 128K ShadowKV step's: 16,380 chunks, scores ``max_g softmax_c(q_g · l_c / sqrt(D))`` over a
GQA group of 4, with landmarks the means of 8 random keys (as `localkv bench --synthetic-kv` makes them) and
45 chunks excluded (-inf: the sink and the outliers), k = 257. The search is replayed in Python step for step
as the kernel runs it (one reduction for the row's range, one per step, one for the bracket's end), and
counted three ways: as kept (the -inf of excluded chunks left out of the first bracket), with the -inf in the
first bracket, and with the two thresholds of a step placed by interpolating the counts instead of at the
thirds. The kernel before this search took 22 reductions on every row (21 steps and a final count).
"""
import argparse

import numpy as np
import torch

NEG_INF_KEY = -2139095041


def ordered_keys(x: np.ndarray) -> np.ndarray:
    """The kernel's int32 keys (as int64): ordered as the fp32 scores."""
    b = np.where(x == 0.0, 0.0, x).astype(np.float32).view(np.int32).astype(np.int64)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


def reductions(keys: np.ndarray, k: int, *, skip_inf: bool = True, interpolate: bool = False) -> int:
    """Block reductions of the kernel's search on one row (and a check that it finds the k-th key)."""
    finite = keys > NEG_INF_KEY
    if skip_inf and finite.sum() >= k:
        lo, c_lo = int(keys[finite].min()), int(finite.sum())
    else:
        lo, c_lo = int(keys.min()), len(keys)
    hi, c_hi, count, margin = int(keys.max()), 0, 1, 1 / 16
    while lo < hi and k - c_hi != 1 and c_lo != k:
        if interpolate:   # thresholds where a linear count between lo and hi+1 would be k + s and k - s
            n_b, span, s = c_lo - c_hi, hi + 1 - lo, max(1.0, margin * (c_lo - c_hi))
            a = min(max(lo + int(span * (c_lo - min(c_lo, k + s)) / n_b), lo + 1), hi)
            b = min(max(lo + int(span * (c_lo - max(c_hi, k - s)) / n_b) + 1, a), hi)
        else:
            d = hi - lo
            a, b = lo + (d + 2) // 3, lo + (2 * d + 2) // 3
        ca, cb = int((keys >= a).sum()), int((keys >= b).sum())
        count += 1
        hit = ca >= k > cb
        if cb >= k:
            lo, c_lo = b, cb
        elif ca >= k:
            lo, c_lo, hi, c_hi = a, ca, b - 1, cb
        else:
            hi, c_hi = a - 1, ca
        margin = margin / 4 if hit else min(0.5, margin * 4)
    inside = keys[(keys >= lo) & (keys <= hi)]
    t = lo if lo == hi else (inside.max() if k - c_hi == 1 else inside.min())
    assert t == np.sort(keys)[::-1][k - 1]
    return count + 1


ap = argparse.ArgumentParser()
ap.add_argument("--rows", type=int, default=64)
ap.add_argument("--seed", type=int, default=0)
a = ap.parse_args()
torch.manual_seed(a.seed)
N, G, D, K, EXCLUDED = 16380, 4, 128, 257, 45
counts = {"kept: -inf left out": [], "-inf in the first bracket": [], "interpolated thresholds": []}
for _ in range(a.rows):
    landmarks = torch.randn(N, 8, D).mean(1)
    scores = torch.softmax(torch.randn(G, D) @ landmarks.T / D ** 0.5, -1).amax(0)
    scores[torch.randperm(N)[:EXCLUDED]] = float("-inf")
    keys = ordered_keys(scores.numpy())
    counts["kept: -inf left out"].append(reductions(keys, K))
    counts["-inf in the first bracket"].append(reductions(keys, K, skip_inf=False))
    counts["interpolated thresholds"].append(reductions(keys, K, interpolate=True))
print(f"{a.rows} rows of {N:,} landmark scores ({EXCLUDED} excluded), k = {K}; block reductions a row")
print(f"{'search':<28}{'mean':>6}{'max':>6}")
for name, c in counts.items():
    print(f"{name:<28}{np.mean(c):>6.1f}{max(c):>6}")
print(f"{'before (fixed 21 steps)':<28}{22:>6.1f}{22:>6}")
