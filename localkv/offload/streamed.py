"""Exact attention over the tiered store: the stored prefix streamed, the open page, the new tokens.

A forward of T new tokens at positions start.. attends, per layer, to
    the sealed pages of the prefix  (streamed block by block by the pipeline, from whatever tier holds them)
    + the open page                 (the prefix's last, partly filled page, on the device)
    + the new tokens themselves     (causal)
each part giving (out, lse), merged exactly by log-sum-exp; then the new K, V are appended to the store.
The same code serves a prefill chunk and a decode step: chunked prefill never needs the whole KV on the
GPU. The exact policy runs every step through it; sparse policies run their prefill through it, and share
`SparseStoreCache`, the plumbing of a cache whose layers do.
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterator

import torch

from .attention import ChunkAttention
from .kv import KVCache
from .pages import KEYS, VALUES
from .store import KVStore


KeySource = Callable[[int, int], torch.Tensor]
"""``keys(a, b)``: the rotated keys (Hkv, b-a, D) of stored tokens a..b-1 (``a`` a page start), for a store that
keeps values only."""


class StreamedAttention:
    """One layer's exact attention over everything stored, for a cache with ``store`` (`KVStore`) and ``reader``
    (`BlockReader`): the exact policy's every step, and the prefill of the sparse ones."""

    def __init__(self, cache, layer: int):
        self.cache, self.layer = weakref.proxy(cache), layer  # no cycle: the store goes with its cache

    def prefill(self, q, k, v, rp, keys: KeySource | None = None, held: tuple | None = None, write: bool = True):
        """Attention over the stored prefix and the chunk; stores the chunk. ``keys`` gives the prefix's keys
        when the pages hold none (ShadowKV with ``exact_keys=False``); by default they are read from the pages.
        ``held``: rotated (K, V) (Hkv, t, D) of the t tokens before the chunk that the store does not hold yet
        (a policy that stores tokens when it indexes them); ``write=False`` leaves the chunk out of the store."""
        cache, store = self.cache, self.cache.store
        start = rp.start
        stored = start - (held[0].shape[1] if held is not None else 0)   # tokens the store holds
        g = store.geometry
        P, Hkv, D, V = g.page_tokens, g.n_kv_heads, g.head_dim, g.part_index(VALUES)
        q, k = rp.rotate(q), rp.rotate(k)
        attn = ChunkAttention(q)
        for first, kv in cache.reader.blocks(self.layer):  # (n, parts, Hkv, P, D)
            if keys is None:
                attn.add_pages(kv)
            else:
                n = kv.shape[0]
                attn.add(keys(first * P, (first + n) * P), kv[:, V].transpose(0, 1).reshape(Hkv, n * P, D))
        # The open page's filled rows and the new tokens, one short causal run.
        partial = stored % P
        kt, vt = k.transpose(0, 1), v.transpose(0, 1)  # (Hkv, T, D)
        if held is not None:
            kt, vt = torch.cat([held[0].to(kt.dtype), kt], dim=1), torch.cat([held[1].to(vt.dtype), vt], dim=1)
        if partial:
            page = store.open_page(self.layer)
            rows = page[KEYS, :, :partial] if keys is None else keys(stored - partial, stored)
            kt = torch.cat([rows.to(kt.dtype), kt], dim=1)
            vt = torch.cat([page[V, :, :partial].to(vt.dtype), vt], dim=1)
        attn.add(kt, vt, causal=True)
        if write:
            store.write(self.layer, start, k, v)
        return attn.result()

    decode = prefill


def token_runs(store: KVStore, layer: int, n_tokens: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The stored (rotated K, V) of tokens 0..n_tokens-1 of ``layer``, page by page (`KVCache.token_runs`)."""
    P = store.geometry.page_tokens
    for index in range(store.sealed_pages(layer, n_tokens)):
        page = store.read_page(layer, index)
        yield page[0], page[1]
    rest = n_tokens % P
    if rest and n_tokens // P == len(store.pages[layer]):
        page = store.open_page(layer)
        yield page[0, :, :rest], page[1, :, :rest]


class SparseStoreCache(KVCache):
    """What a sparse policy's cache over the store shares: ``store``, ``reader`` and ``layers`` (set by the
    subclass; each layer has ``load``, ``covered`` and ``last_step``), the prefill stream started once per
    forward, the session paths, and `attended` from the layers' last selection."""

    _prefill_from: int | None = None

    def layer(self, i: int):
        return self.layers[i]

    def reserve(self, n: int) -> int:
        self._prefill_from = None   # the prefill stream starts with the first layer that prefills
        return super().reserve(n)

    def begin_prefill(self, start: int) -> None:
        """Start streaming the stored prefix to the layers (once per forward; decode steps never stream)."""
        if self._prefill_from != start:
            self.reader.begin(start)
            self._prefill_from = start

    def token_runs(self, layer, n_tokens):
        return token_runs(self.store, layer, n_tokens)

    def load_tokens(self, layer, start, k, v):
        self.layers[layer].load(start, k, v)

    def attended(self, layer: int) -> torch.Tensor:
        lay = self.layers[layer]
        return lay.covered(*lay.last_step)
