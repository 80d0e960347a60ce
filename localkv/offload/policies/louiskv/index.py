"""The two halves of a layer's LouisKV index: k-means clusters over input keys, segments over generated ones.

Everything is counted in **units** of ``UNIT = 16`` tokens of one KV head, the granule the store is read in
(`offload.chunks`): a unit of head h is 16 consecutive rows of that head in a store page. An index *entry* is a
run of whole units with one representative key, its centroid (mean post-RoPE key); a decode step scores the
entries (`kernels.chunk_scores`, landmark mode: softmax over the entries, max over the GQA group), gives each unit
its entry's score and takes the best units (`kernels.topk_ids`).

**Input (the prompt).** A group of ``N`` prompt tokens (up to ``cluster_tokens``, a multiple of 16) is clustered
per KV head: k-means with ``K = N / 16`` centroids (`kernels.kmeans`), then the tokens are written to the store
in cluster order (`cluster_order`), each head in its own order. Consecutive rows of a head are then keys of one
cluster, so a cluster is fetched as its run of units, one read each, and every unit is an entry of its own whose
centroid is the mean of its 16 keys. A cluster of 40 tokens fills two units of its own; its 8 keys farthest from
its centroid share a unit with other clusters' remainders. Attention is a sum over keys: the order rows are
stored in changes nothing but where a token is found, which the layer's ``order`` (store row -> token) keeps.

**Output (generated tokens).** Critical KV changes at semantic boundaries, so generated tokens are indexed as
segments that start at the boundaries the trigger detected (rounded down to a unit), at most
``max_units`` units long, in position order; an entry per segment, its centroid the mean key of its tokens.
"""

from __future__ import annotations

import torch

from ....kernels.kmeans import kmeans

UNIT = 16
"""Tokens per unit: the granule of the store reads, the selection and the index."""


def cluster_order(keys: torch.Tensor, iters: int) -> torch.Tensor:
    """Each head's tokens in cluster order: keys (Hkv, N, D), N a multiple of `UNIT` -> (Hkv, N) int64, the
    permutation (row r of head h holds token ``perm[h, r]`` of the group).

    k-means with ``N / UNIT`` clusters (`kernels.kmeans`, seeded from consecutive runs, so cluster ids follow
    position). Clusters are not 16 tokens each, so rows are laid out in two parts: first every cluster's whole
    units (its ``16 * floor(size / 16)`` keys nearest the centroid), cluster after cluster, so each of these
    units holds one cluster only; then the rest of every cluster, in cluster order, sharing units with their
    neighbours."""
    Hkv, N, _ = keys.shape
    if N <= UNIT:
        return torch.arange(N, device=keys.device).expand(Hkv, N).contiguous()
    K = N // UNIT
    centroids, assign = kmeans(keys, K, iters=iters)
    dist = (keys.float() - centroids.gather(1, assign[..., None].expand_as(keys))).square().sum(-1)   # (Hkv, N)
    by_dist = dist.argsort(dim=1, stable=True)
    order = by_dist.gather(1, assign.gather(1, by_dist).argsort(dim=1, stable=True))   # by cluster, then distance
    cluster = assign.gather(1, order)
    size = torch.zeros(Hkv, K, dtype=torch.long, device=keys.device).scatter_add_(1, assign, torch.ones_like(assign))
    first = size.cumsum(1) - size                                                      # each cluster's first row
    rank = torch.arange(N, device=keys.device) - first.gather(1, cluster)              # rank within its cluster
    whole = rank < (size // UNIT * UNIT).gather(1, cluster)
    return order.gather(1, ((~whole).long() * K + cluster).argsort(dim=1, stable=True))

def unit_centroids(keys: torch.Tensor) -> torch.Tensor:
    """The mean of every unit of rows: keys (Hkv, N, D), N a multiple of `UNIT` -> (Hkv, N / UNIT, D) fp32."""
    Hkv, N, D = keys.shape
    return keys.float().view(Hkv, N // UNIT, UNIT, D).mean(2)


def segment_units(start: int, end: int, boundaries: list[int], max_units: int) -> list[int]:
    """Units per segment of tokens ``start .. end`` (both multiples of `UNIT`): a segment starts at each boundary
    position (rounded down to a unit) inside the span and runs until the next, cut every ``max_units`` units."""
    cuts = sorted({b // UNIT * UNIT for b in boundaries if start < b // UNIT * UNIT < end})
    sizes, a = [], start
    for b in cuts + [end]:
        while b - a > max_units * UNIT:
            sizes.append(max_units)
            a += max_units * UNIT
        if b > a:
            sizes.append((b - a) // UNIT)
            a = b
    return sizes


def segment_centroids(keys: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The mean key of each segment: keys (Hkv, N, D) in position order, ``sizes`` in units summing to N / 16 ->
    (Hkv, len(sizes), D) fp32."""
    units = unit_centroids(keys)                                             # (Hkv, U, D)
    counts = torch.tensor(sizes, device=keys.device)
    seg = torch.repeat_interleave(torch.arange(len(sizes), device=keys.device), counts)
    sums = torch.zeros(keys.shape[0], len(sizes), keys.shape[2], device=keys.device)
    sums.index_add_(1, seg, units)
    return sums / counts[None, :, None]
