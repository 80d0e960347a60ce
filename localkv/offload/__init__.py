"""The KV cache: the contract the model sees (``kv``), the tiered store (pages, tiers, disk, the I/O pipeline),
the placement planner, sessions on disk, and the policies that are views over it."""

from .kv import KVCache, LayerKV
from .policies import make_cache

__all__ = ["KVCache", "LayerKV", "make_cache"]
