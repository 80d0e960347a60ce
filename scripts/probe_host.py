"""Probe (development aid): the host's work per decode token of ShadowKV outside the GPU's step, on this machine's CPU.

    python scripts/probe_host.py [--shape llama3-8b] [--ctx 4096]

Times what a graphed token costs the host besides launching its graph: preparing the step's view (is the step
plain, readying its buffers) and the cache's signature (`DecodeGraphs._prepare`), and the cache's stats (which
the chat loop reads). The index is built over synthesized KV on the CPU; these costs grow with the layers, not
the context. Before this was measured, both ran while the GPU waited: `_prepare` now runs during the step before,
and token events carry stats at most every `engine.STATS_INTERVAL_S`.
"""
import argparse
import platform
import time

import torch

from localkv.bench.shapes import shape_args
from localkv.bench.synthetic import synth_fill
from localkv.offload import make_cache
from localkv.offload.policies.shadowkv_graph import ShadowKVGraphView, plain_step, signature

ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="llama3-8b")
ap.add_argument("--ctx", type=int, default=4096)
a = ap.parse_args()
args = shape_args(a.shape)
cache = make_cache("shadowkv", args, a.ctx + 164, device="cpu", dtype=torch.bfloat16)


def per_call_us(fn, n=50):
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


with torch.inference_mode():
    synth_fill(cache, args, a.ctx + 100, device="cpu", dtype=torch.bfloat16)   # past a chunk boundary: plain
    length = torch.zeros(1, dtype=torch.int32)
    assert plain_step(cache), "the next step should be plain"
    rows = [("is the step plain (readies its buffers)", per_call_us(lambda: plain_step(cache))),
            ("the view", per_call_us(lambda: ShadowKVGraphView(cache, cache.length, length))),
            ("the cache's signature", per_call_us(lambda: signature(cache))),
            ("the cache's stats", per_call_us(lambda: cache.stats(), 20))]
print(f"{a.shape}, {args.n_layers} layers, ShadowKV over {a.ctx + 100:,} tokens; "
      f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
print("| host work per token | µs |\n|---|---|")
for name, us in rows:
    print(f"| {name} | {us:,.0f} |")
print(f"| preparing a graphed step (plain + view + signature) | {rows[0][1] + rows[1][1] + rows[2][1]:,.0f} |")
