"""KV synthesized straight into the tiers, where a real prefill of the context would take too long.

Random pages are written through ``cache.load_tokens``, the path sessions use to read KV back, so they land
in the tiers exactly where a prefill would have put them. Decode speed does not depend on their values;
with `needles.Needles` some 16-token runs get keys a known decode step aligns with, to measure what a sparse
policy finds.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from ..models.args import ModelArgs
from ..offload.kv import KVCache
from .needles import Needles


@torch.inference_mode()
def synth_fill(cache: KVCache, args: ModelArgs, n_tokens: int, *, device: torch.device | str,
               dtype: torch.dtype, chunk: int = 8192, needles: Needles | None = None,
               progress: Callable[[str], None] | None = None) -> float:
    """Append ``n_tokens`` of random K and V to every layer of ``cache``, as a prefill would, computing nothing
    (with ``needles`` planted); returns the seconds it took, reporting to ``progress`` every 10 s."""
    cuda = torch.device(device).type == "cuda"
    start = cache.reserve(n_tokens)
    t0 = last = time.perf_counter()
    for s in range(0, n_tokens, chunk):
        t = min(chunk, n_tokens - s)
        k = torch.randn(t, args.n_kv_heads, args.head_dim, device=device, dtype=dtype)  # (T, Hkv, D)
        v = torch.randn_like(k)
        for layer in range(args.n_layers):
            kl, vl = (k, v) if needles is None else needles.plant(layer, start + s, k, v)
            cache.load_tokens(layer, start + s, kl, vl)
        if progress is not None and time.perf_counter() - last > 10:
            last = time.perf_counter()
            progress(f"  synthesized {s + t:,}/{n_tokens:,} tokens, {(s + t) / (last - t0):,.0f} tok/s")
    cache.commit(n_tokens)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0
