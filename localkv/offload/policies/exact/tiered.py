"""The exact policy over the tiered store: full attention however far the KV has spread.

Every step is `offload.streamed.StreamedAttention`: the stored prefix streamed from whatever tier holds it, the
open page and the new tokens, merged by log-sum-exp. Decode moves every offloaded page once per token, the floor
this policy is measured against.
"""

from __future__ import annotations

import torch

from ....models.args import ModelArgs
from ...kv import KVCache
from ...pages import PageGeometry
from ...pipeline import BlockReader
from ...store import Budgets, KVStore
from ...streamed import StreamedAttention, token_runs


class TieredExactKV(KVCache):
    """Exact attention with the KV spread over GPU, pinned CPU and disk under the given budgets."""

    name = "exact"

    def __init__(self, args: ModelArgs, capacity: int, *, budgets: Budgets, device: torch.device | str,
                 dtype: torch.dtype, page_tokens: int = 256, block_pages: int = 64, ring_blocks: int = 4):
        super().__init__(capacity)
        self.args = args
        self.n_layers = args.n_layers
        geometry = PageGeometry(args.n_layers, args.n_kv_heads, args.head_dim, page_tokens, dtype)
        self.store = KVStore(geometry, budgets, torch.device(device))
        self.reader = BlockReader(self.store, block_pages=block_pages, ring_blocks=ring_blocks)
        self.layers = [StreamedAttention(self, i) for i in range(args.n_layers)]

    def layer(self, i: int) -> StreamedAttention:
        return self.layers[i]

    def reserve(self, n: int) -> int:
        start = super().reserve(n)
        self.reader.begin(start)  # every layer will read the prefix: start moving it now
        return start

    def truncate(self, n: int) -> None:
        super().truncate(n)
        self.reader.drain()
        self.store.truncate(n)

    def token_runs(self, layer, n_tokens):
        return token_runs(self.store, layer, n_tokens)

    def load_tokens(self, layer, start, k, v):
        self.store.write(layer, start, k, v)

    def stats(self):
        return {**super().stats(), **self.store.stats()}
