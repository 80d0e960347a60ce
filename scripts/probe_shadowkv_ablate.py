"""Probe (development aid): what a graphed ShadowKV decode step's critical path holds, by taking parts out.

    python scripts/probe_shadowkv_ablate.py [--ctx 131072] [--gpu-tier 2.9] [--values-only]

Synthesizes the context of the Llama-3.1-8B shape into the tiers (``--gpu-tier`` GB of store pages on the GPU,
the rest in pinned CPU memory; ``--values-only``: ``exact_keys=False``), then times graphed steps, each
synchronized before and after as `localkv bench` times them: as they are, without the key rebuild
(`kernels.lowrank_rope`), without the value fetch (`kernels.gather_pages`), without either, and as they are
again. A step with a part taken out computes garbage; only its time means anything. What a part costs the
step is the difference, which is less than the part's own GPU time when it overlaps other work (the fetch
runs on a side stream beside the rebuild).
"""
import argparse
import time

import torch

import localkv.offload.policies.shadowkv_layer as layer_mod
from localkv.bench.model import random_model
from localkv.bench.shapes import shape_args
from localkv.bench.synthetic import synth_fill
from localkv.offload import make_cache
from localkv.offload.policies.shadowkv_fetch import StoreChunks
from localkv.offload.store import Budgets
from localkv.runtime.graphs import DecodeGraphs

ap = argparse.ArgumentParser()
ap.add_argument("--ctx", type=int, default=131072)
ap.add_argument("--gpu-tier", type=float, default=2.9, help="GB of store pages on the GPU")
ap.add_argument("--values-only", action="store_true", help="exact_keys=False: the store holds V alone")
ap.add_argument("--steps", type=int, default=24)
a = ap.parse_args()
args = shape_args("llama3-8b")
model = random_model(args, "cuda", torch.bfloat16)
cache = make_cache("shadowkv", args, a.ctx + 64, device="cuda", dtype=torch.bfloat16,
                   budgets=Budgets(int(a.gpu_tier * 1e9), 64 * 2**30, None), exact_keys=not a.values_only)
tok = torch.tensor([1], device="cuda")
rebuild, fetch = layer_mod.lowrank_rope, StoreChunks.fetch
no_rebuild = lambda u, sv, idx, cos, sin, out, **kw: out   # noqa: E731
no_fetch = lambda self, *rest, **kw: None                  # noqa: E731
rows = []
with torch.inference_mode():
    synth_fill(cache, args, a.ctx, device="cuda", dtype=torch.bfloat16)
    for label, r, f in [("as is", rebuild, fetch), ("no key rebuild", no_rebuild, fetch),
                        ("no value fetch", rebuild, no_fetch), ("neither", no_rebuild, no_fetch),
                        ("as is, again", rebuild, fetch)]:
        layer_mod.lowrank_rope, StoreChunks.fetch = r, f
        graphs = DecodeGraphs(model, cache)     # captured anew: the graph holds whichever parts are in
        times = []
        for i in range(3 + a.steps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            if graphs(1) is None:
                model(tok, cache, decode=True)
            torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t))
        cache.truncate(a.ctx)                   # back to the same context for the next variant
        times = sorted(times[3:])
        rows.append((label, times[len(times) // 2], times[0]))
        print(rows[-1], flush=True)
    layer_mod.lowrank_rope, StoreChunks.fetch = rebuild, fetch
base = rows[0][1]
print(f"\nctx {a.ctx:,}, GPU tier {a.gpu_tier} GB, {'values only' if a.values_only else 'K and V'} in the store; "
      f"graphed steps, each synchronized, median of {a.steps}")
print(f"{'step':<16}{'ms/step':>9}{'min':>8}{'vs as is':>10}")
for label, med, low in rows:
    print(f"{label:<16}{med:>9.2f}{low:>8.2f}{med - base:>+10.2f}")
