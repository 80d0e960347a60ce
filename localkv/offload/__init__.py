"""The KV cache and the policies over it (the tiered store arrives with the "tiered KV store" issue)."""

from .kv import KVCache, LayerKV
from .policies import POLICIES, make_cache

__all__ = ["KVCache", "LayerKV", "POLICIES", "make_cache"]
