"""Probe (development aid): where a ShadowKV decode step of the Llama-3.1-8B shape spends its time (profiler).

    python scripts/probe_shadowkv.py [--ctx 32768] [--graphs] [--index-tier cpu]

Synthesizes the context into the tiers, runs a few decode steps, then profiles five: CUDA kernels launched per
step, GPU time against wall time, the top host-side ops and the top kernels. ``--graphs`` decodes through
CUDA graphs (`localkv.runtime.graphs`), as `localkv run` does. ``--index-tier cpu`` keeps U and the
landmarks in pinned CPU memory (`ShadowKVConfig.index_tier`; such steps run eagerly).
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from localkv.bench.model import random_model
from localkv.bench.shapes import shape_args
from localkv.bench.synthetic import synth_fill
from localkv.offload import make_cache
from localkv.offload.store import Budgets
from localkv.runtime.graphs import DecodeGraphs

ap = argparse.ArgumentParser()
ap.add_argument("--ctx", type=int, default=32768)
ap.add_argument("--graphs", action="store_true")
ap.add_argument("--index-tier", default="gpu", choices=["gpu", "cpu"])
a = ap.parse_args()
args = shape_args("llama3-8b")
model = random_model(args, "cuda", torch.bfloat16)
cache = make_cache("shadowkv", args, a.ctx + 64, device="cuda", dtype=torch.bfloat16,
                   budgets=Budgets(2 * 2**30, 64 * 2**30, None), index_tier=a.index_tier)
with torch.inference_mode():
    synth_fill(cache, args, a.ctx, device="cuda", dtype=torch.bfloat16)
    tok = torch.tensor([1], device="cuda")
    graphs = DecodeGraphs(model, cache) if a.graphs else None

    def step():
        if graphs is None or graphs(1) is None:
            model(tok, cache, decode=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    print(f"ctx {a.ctx}, index on {a.index_tier}: {1e2 * (time.perf_counter() - t):.1f} ms/step over 10 steps "
          f"(no profiler); index on the GPU {cache.stats()['index_device_bytes'] / 1e9:.2f} GB, "
          f"on the host {cache.stats()['index_host_bytes'] / 1e9:.2f} GB", flush=True)
    times = []
    for _ in range(10):        # as `localkv bench` times a step: synchronized before and after
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    print(f"ctx {a.ctx}: {1e3 * sorted(times)[5]:.2f} ms/step median of 10, each step synchronized", flush=True)
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / 5
events = prof.key_averages()
kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
gpu_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
print(f"ctx {a.ctx}: wall {1e3 * wall:.1f} ms/step, GPU busy {gpu_us / 5e3:.1f} ms/step, "
      f"{kernels / 5:.0f} kernels/step ({kernels / 5 / args.n_layers:.0f} per layer)")
if graphs is not None:
    print(f"graph captures: {graphs.captures}")
print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
print(events.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
