"""k-means over a layer's keys, per KV head: the clusters a retrieval policy scores and fetches as units.

Lloyd's algorithm on (H, N, D) keys with K centroids per head. Its cost is the assignment, every key against
every centroid of its head, so that step is a kernel; the update (each centroid the mean of its keys) is two
scatter-adds. The nearest centroid in L2 is the one with the largest

    x·c - |c|²/2        (|x - c|² = |x|² - 2 (x·c - |c|²/2), and |x|² is the same for every c)

so the kernel is a matrix product with a running argmax: one program per (head, block of keys) walks the
head's centroids a block at a time, ``tl.dot`` giving the (keys × centroids) products in fp32, and keeps each
key's best score and its centroid (ties to the lowest id, as ``torch.argmax`` has it).

`kmeans` seeds each head's K centroids with the means of K consecutive runs of N/K keys (keys of nearby tokens
are alike, so this starts close to a good partition, and it is deterministic), then runs ``iters`` rounds of
assignment and update; after each round but the last, a cluster left empty takes the key farthest from its
centroid.
"""

from __future__ import annotations

import torch

from ._common import KERNEL_CALLS, _dot, check, dot_flags, interpreting, next_pow2, tl, triton, use_triton


@triton.jit
def _assign_kernel(
    x_ptr, stride_xh, stride_xn,       # keys (H, N, D), D contiguous
    c_ptr, stride_ch, stride_ck,       # centroids (H, K, D), D contiguous, the keys' dtype
    half_ptr, stride_hh,               # |c|²/2 (H, K) fp32
    out_ptr, stride_oh,                # assignment (H, N) int64
    N, K,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    x = tl.load(x_ptr + h * stride_xh + offs_n[:, None] * stride_xn + offs_d[None, :],
                mask=(offs_n < N)[:, None] & mask_d[None, :], other=0.0)                 # (BLOCK_N, BLOCK_D)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    arg = tl.zeros((BLOCK_N,), tl.int64)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        cT = tl.load(c_ptr + h * stride_ch + offs_k[None, :] * stride_ck + offs_d[:, None],
                     mask=mask_d[:, None] & mask_k[None, :], other=0.0)                   # (BLOCK_D, BLOCK_K)
        half = tl.load(half_ptr + h * stride_hh + offs_k, mask=mask_k, other=0.0)
        s = _dot(x, cT, IEEE, UPCAST) - half[None, :]                                    # (BLOCK_N, BLOCK_K)
        s = tl.where(mask_k[None, :], s, float("-inf"))
        tile_best = tl.max(s, 1)
        # the lowest id among the tile's maxima: ids where s is the max, the rest pushed past every id
        tile_arg = tl.min(tl.where(s == tile_best[:, None], offs_k[None, :], K + BLOCK_K), 1).to(tl.int64)
        better = tile_best > best            # strictly: an earlier tile wins ties, as its ids are lower
        arg = tl.where(better, tile_arg, arg)
        best = tl.where(better, tile_best, best)
    tl.store(out_ptr + h * stride_oh + offs_n, arg, mask=offs_n < N)


def kmeans_assign_ref(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Torch version of `kmeans_assign` (fp32 math)."""
    c = centroids.float()
    s = torch.einsum("hnd,hkd->hnk", x.float(), c) - 0.5 * (c * c).sum(-1)[:, None, :]
    return s.argmax(-1)


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The nearest centroid (L2) of every key: x (H, N, D) and centroids (H, K, D) in one dtype -> (H, N) int64.

    Ties go to the lowest centroid id. Scores are fp32 products of the inputs (IEEE for fp32 inputs)."""
    check(x.dim() == 3 and centroids.dim() == 3 and x.shape[0] == centroids.shape[0]
          and x.shape[2] == centroids.shape[2], f"x (H, N, D) and centroids (H, K, D): got {tuple(x.shape)}, "
          f"{tuple(centroids.shape)}")
    check(x.dtype == centroids.dtype, f"x is {x.dtype}, centroids {centroids.dtype}")
    H, N, D = x.shape
    K = centroids.shape[1]
    check(K >= 1, "at least one centroid")
    if out is None:
        out = torch.empty((H, N), dtype=torch.long, device=x.device)
    check(out.shape == (H, N) and out.dtype == torch.long and out.stride(1) == 1, "out must be (H, N) int64")
    if not use_triton(x, centroids, out):
        out.copy_(kmeans_assign_ref(x, centroids))
        return out
    if N == 0:
        return out
    x = x if x.stride(2) == 1 else x.contiguous()
    centroids = centroids if centroids.stride(2) == 1 else centroids.contiguous()
    c = centroids.float()
    half = (0.5 * (c * c).sum(-1)).contiguous()                                          # (H, K) fp32
    BLOCK_N = 16 if interpreting() else 64
    BLOCK_K = 16 if interpreting() else 64
    KERNEL_CALLS["kmeans_assign"] += 1
    _assign_kernel[(H, triton.cdiv(N, BLOCK_N))](
        x, x.stride(0), x.stride(1), centroids, centroids.stride(0), centroids.stride(1), half, half.stride(0),
        out, out.stride(0), N, K, D=D, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=max(16, next_pow2(D)),
        **dot_flags(x.dtype), num_warps=4)
    return out


def kmeans(x: torch.Tensor, n_clusters: int, iters: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of each head's keys: x (H, N, D) -> (centroids (H, K, D) fp32, assignment (H, N) int64).

    Seeded with the means of K consecutive runs of keys; ``iters`` rounds of assignment (`kmeans_assign`) and
    update. The returned centroids are the means of the keys the returned assignment gives them (a cluster
    that lost every key keeps its last centroid)."""
    H, N, D = x.shape
    check(1 <= n_clusters <= N, f"n_clusters must be in [1, N={N}], got {n_clusters}")
    K = n_clusters
    xf = x.float()
    seed = torch.arange(N, device=x.device) * K // N                                    # run of each key
    assign = seed.expand(H, N).contiguous()
    centroids, _ = _means(xf, assign, K, torch.zeros(H, K, D, device=x.device))
    for i in range(iters):
        assign = kmeans_assign(x, centroids.to(x.dtype))
        centroids, counts = _means(xf, assign, K, centroids)
        if i < iters - 1:
            _reseed(xf, assign, centroids, counts)
    return centroids, assign


def _means(xf: torch.Tensor, assign: torch.Tensor, K: int, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each cluster's mean key (H, K, D) fp32 (``old``'s centroid where a cluster has no key) and its keys (H, K)."""
    H, N, D = xf.shape
    sums = torch.zeros(H, K, D, device=xf.device).scatter_add_(1, assign[..., None].expand(H, N, D), xf)
    ones = torch.ones_like(assign, dtype=torch.float32)
    counts = torch.zeros(H, K, device=xf.device).scatter_add_(1, assign, ones)
    return torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], old), counts


def _reseed(xf: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor) -> None:
    """Give each empty cluster the key farthest from its own centroid (Lloyd's rounds never refill an empty
    cluster, and a seed between two true clusters can end empty while another centroid holds both)."""
    empty = counts == 0
    if not bool(empty.any()):
        return
    H, N, D = xf.shape
    dist = ((xf - centroids.gather(1, assign[..., None].expand(H, N, D))) ** 2).sum(-1)   # (H, N)
    for h in empty.any(1).nonzero().flatten().tolist():
        ids = empty[h].nonzero().flatten()
        centroids[h, ids] = xf[h, dist[h].topk(len(ids)).indices]
