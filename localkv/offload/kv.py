"""The contract between the model and the KV cache: what an attention layer hands over and gets back.

``models/`` knows nothing of tiers. Each attention layer gives its per-layer KV object the new tokens'
queries, keys and values (keys and queries *before* RoPE, with the positions' rotary tables) and gets the
attention output back. What the object keeps, where, and what each step attends to is the policy's business:

    layer_kv.prefill(q, k, v, rp) -> out   exact causal attention for a prompt chunk; stores its KV
    layer_kv.decode(q, k, v, rp)  -> out   attention for 1..γ new tokens (sparse policies select here)

and the sequence-level cache around them:

    start = cache.reserve(n)   positions start .. start+n-1 are about to be written (raises on overflow)
    cache.commit(n)            every layer has stored them: they are part of the sequence now
    cache.truncate(n)          keep only the first n tokens (speculative rollback, editing the last turn)
    cache.stats()              occupancy, bytes moved, hits: what the UI and benchmarks show

A forward that fails between ``reserve`` and ``commit`` leaves the cache as it was: whatever a layer wrote
past ``length`` is overwritten by the next forward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterator, Protocol

import torch

from ..errors import ContextOverflowError
from ..models.rope import RotaryPositions


class LayerKV(Protocol):
    """One layer's view of the cache, as the model's attention uses it. Shapes: q (T, Hq, D); k, v (T, Hkv, D)."""

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rp: RotaryPositions) -> torch.Tensor:
        ...

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rp: RotaryPositions) -> torch.Tensor:
        ...


class KVCache(ABC):
    """The KV of one sequence over all layers, under one policy."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        """Most tokens this cache may hold (the user's ``--ctx``)."""
        self.length = 0
        """Tokens committed so far."""
        self.n_layers = 0
        """Set by each policy."""
        self.epoch = 0
        """Counts `reserve` and `truncate` calls: work prepared for the next step (a graphed decode's view) is
        still good while this has moved only by that step's own `reserve`."""

    @abstractmethod
    def layer(self, i: int) -> LayerKV:
        """The per-layer object handed to attention layer ``i``."""

    def reserve(self, n: int) -> int:
        """Announce ``n`` new tokens; returns the position of the first. Raises when the context is full."""
        if self.length + n > self.capacity:
            raise ContextOverflowError(
                f"{self.length + n:,} tokens do not fit in the context of {self.capacity:,} tokens "
                f"({self.length:,} used, {n:,} new); start with a larger --ctx")
        self.epoch += 1
        return self.length

    def commit(self, n: int) -> None:
        """Every layer has stored the ``n`` reserved tokens."""
        self.length += n

    def truncate(self, n: int) -> None:
        """Drop every token from position ``n`` on."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self.epoch += 1
        self.length = n

    # -- sessions on disk: the KV of a layer as fixed pages (rotated keys), and back ------------------------
    @abstractmethod
    def token_runs(self, layer: int, n_tokens: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rotated keys and values of tokens 0..n_tokens-1 of ``layer``, in order, as (Hkv, t, D) runs."""

    @abstractmethod
    def load_tokens(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store rotated keys and values (T, Hkv, D) of tokens start.. of ``layer`` as they are."""

    def export_pages(self, layer: int, n_tokens: int, page_tokens: int) -> Iterator[torch.Tensor]:
        """Pages (2, Hkv, page_tokens, D) covering the first ``n_tokens`` tokens (the last zero-padded)."""
        buf, filled = None, 0
        for k, v in self.token_runs(layer, n_tokens):
            i = 0
            while i < k.shape[1]:
                if buf is None:
                    buf = k.new_zeros(2, k.shape[0], page_tokens, k.shape[2])
                n = min(page_tokens - filled, k.shape[1] - i)
                buf[0, :, filled:filled + n] = k[:, i:i + n]
                buf[1, :, filled:filled + n] = v[:, i:i + n]
                filled, i = filled + n, i + n
                if filled == page_tokens:
                    yield buf
                    buf, filled = None, 0
        if buf is not None:
            yield buf

    def import_pages(self, layer: int, pages: torch.Tensor, n_tokens: int) -> None:
        """Inverse of ``export_pages``: pages (n, 2, Hkv, P, D) holding the layer's first ``n_tokens``."""
        P = pages.shape[3]
        for i in range(pages.shape[0]):
            t = min(P, n_tokens - i * P)
            if t <= 0:
                break
            page = pages[i]
            self.load_tokens(layer, i * P, page[0, :, :t].transpose(0, 1), page[1, :, :t].transpose(0, 1))

    def attended(self, layer: int) -> torch.Tensor | None:
        """The tokens the last decode step of ``layer`` attended to, (Hkv, n) bool over the n tokens it saw; None
        when every step attends to every token (the exact policies). A sparse policy answers it for its eager step
        (the bench's needle recall)."""
        return None

    def step_kind(self) -> str | None:
        """What the last decode step did, for a policy whose steps differ in kind (LouisKV: "retrieve" or "reuse");
        None for one whose steps are all alike. The bench times each kind apart."""
        return None

    def stats(self) -> dict[str, Any]:
        """Numbers for the UI and benchmarks (tokens held, bytes per tier, bytes moved, hit rate)."""
        return {"tokens": self.length, "capacity": self.capacity}
