"""The exact policy with the whole KV on the model's device: the correctness oracle for every other one.

Keys are rotated as they are written (this policy never needs them unrotated) and kept with the values in
per-layer buffers (Hkv, capacity, D) that grow by doubling up to the context limit, so a short chat on
a long ``--ctx`` does not reserve the whole context up front.

``static_view`` serves a CUDA-graphed decode step (``localkv.runtime.graphs``): the buffers are grown to a fixed
number of rows first, and the step writes at, and attends up to, positions it reads from device tensors.
"""

from __future__ import annotations

import weakref

import torch

from ....models.args import ModelArgs
from ....models.rope import RotaryPositions
from ...attention import causal_attention
from ...kv import KVCache

_MIN_ALLOC = 256


class _ExactLayer:
    def __init__(self, cache: "DeviceExactKV"):
        self.cache = weakref.proxy(cache)  # no cycle: the KV goes as soon as its cache does
        self.k: torch.Tensor | None = None  # (Hkv, allocated, D) rotated keys
        self.v: torch.Tensor | None = None
        self.written = 0   # positions ever written (a session load writes before the cache commits its length)

    def _store(self, k: torch.Tensor, v: torch.Tensor, rp: RotaryPositions) -> int:
        start = rp.start
        self.write(start, rp.rotate(k), v)
        return start

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store rotated keys and values (T, Hkv, D) at positions start.."""
        end = start + k.shape[0]
        if self.k is None or self.k.shape[1] < end:
            self._grow(end, k)
        self.k[:, start:end] = k.transpose(0, 1)
        self.v[:, start:end] = v.transpose(0, 1)
        self.written = end

    def _grow(self, needed: int, like: torch.Tensor) -> None:
        size = max(_MIN_ALLOC, self.k.shape[1] if self.k is not None else 0)
        while size < needed:
            size *= 2
        size = min(max(size, needed), self.cache.capacity)
        _, Hkv, D = like.shape
        k = like.new_empty(Hkv, size, D)
        v = like.new_empty(Hkv, size, D)
        if self.k is not None:
            n = min(max(self.cache.length, self.written), self.k.shape[1])   # graphs write past `written`
            k[:, :n], v[:, :n] = self.k[:, :n], self.v[:, :n]
        self.k, self.v = k, v

    def prefill(self, q, k, v, rp):
        start = self._store(k, v, rp)
        end = start + k.shape[0]
        return causal_attention(rp.rotate(q), self.k[:, :end], self.v[:, :end], start)

    decode = prefill  # exact attention is the same computation for 1 token or a prompt chunk


class _StaticDecodeLayer:
    """One layer's decode inside a CUDA graph: nothing depends on a host value, so a replay is valid at any
    position below the view's row count."""

    def __init__(self, layer: _ExactLayer, view: "StaticDecodeView"):
        self.layer, self.view = layer, view

    def decode(self, q, k, v, rp):
        from ....kernels.sparse_attention import sparse_attention

        lay, rows = self.layer, self.view.rows
        lay.k.index_copy_(1, rp.pos, rp.rotate(k).transpose(0, 1))  # write at the step's position (T,)
        lay.v.index_copy_(1, rp.pos, v.transpose(0, 1))
        out, _ = sparse_attention(rp.rotate(q), lay.k[:, :rows], lay.v[:, :rows], causal=True,
                                  dense_len=self.view.length)  # rows past the filled length are not read
        return out

    prefill = decode


class StaticDecodeView:
    """The cache as a graphed decode step sees it: ``rows`` buffered tokens, ``length`` (1,) int32 filled."""

    def __init__(self, cache: "DeviceExactKV", rows: int, length: torch.Tensor):
        self.rows, self.length = rows, length
        self.layers = [_StaticDecodeLayer(lay, self) for lay in cache.layers]

    def layer(self, i: int) -> _StaticDecodeLayer:
        return self.layers[i]


class DeviceExactKV(KVCache):
    """Exact attention, all KV in memory of the model's device (GPU, or CPU on a machine without one)."""

    name = "exact"

    def __init__(self, args: ModelArgs, capacity: int):
        super().__init__(capacity)
        self.args = args
        self.n_layers = args.n_layers
        self.layers = [_ExactLayer(self) for _ in range(args.n_layers)]

    def layer(self, i: int) -> _ExactLayer:
        return self.layers[i]

    def static_view(self, rows: int, length: torch.Tensor) -> StaticDecodeView | None:
        """A view for a graphed decode step over ``rows`` buffered tokens (buffers grown to hold them), or
        None while a layer has no buffer yet (nothing prefilled)."""
        if any(lay.k is None for lay in self.layers):
            return None
        for lay in self.layers:
            if lay.k.shape[1] < rows:
                lay._grow(rows, lay.k.transpose(0, 1))
        return StaticDecodeView(self, rows, length)

    def buffers(self) -> tuple[int, ...]:
        """Addresses of the KV buffers: a graph captured over them is valid while these stay the same."""
        return tuple(t.data_ptr() for lay in self.layers for t in (lay.k, lay.v) if t is not None)

    def token_runs(self, layer, n_tokens):
        lay = self.layers[layer]
        if n_tokens:
            yield lay.k[:, :n_tokens], lay.v[:, :n_tokens]

    def load_tokens(self, layer, start, k, v):
        self.layers[layer].write(start, k, v)

    def stats(self):
        held = sum(l.k.numel() * l.k.element_size() * 2 for l in self.layers if l.k is not None)
        return {**super().stats(), "device_bytes": held}
