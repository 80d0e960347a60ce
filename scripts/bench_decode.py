"""The decode step at the speed of memory: Llama-3.1-8B shape, random bf16 weights, 8K tokens of KV on the GPU.

    python scripts/bench_decode.py [--ctx 8192] [--steps 64]

One run measures the HBM copy bandwidth, then ms/token of: localkv's eager decode step, the same step through
CUDA graphs (what `localkv run` uses when the KV fits on the GPU), and Hugging Face transformers' eager decode
with its full DynamicCache (its context grows by a token a step). The floor is the weights streamed once
(bytes / HBM copy bandwidth) plus the KV read once. JSON goes to $OUT/bench_decode.json (default ./.out);
the table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from localkv.bench.ceilings import copy_rate
from localkv.bench.model import random_model
from localkv.bench.peer_hf import hf_decode_times, hf_fill, hf_model
from localkv.bench.shapes import shape_args
from localkv.bench.synthetic import synth_fill
from localkv.offload import make_cache
from localkv.runtime.graphs import DecodeGraphs


def timed_steps(step, cache, steps: int, warmup: int = 3) -> list[float]:
    """ms of each of ``steps`` decode steps at a fixed context (the new token is dropped after each)."""
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - t))
        cache.truncate(cache.length - 1)
    return times


@torch.inference_mode()
def hf_eager_ms(model, n_tokens: int, steps: int) -> float:
    """transformers' eager decode on the same weights, full DynamicCache of ``n_tokens`` on the GPU."""
    hf = hf_model(model)
    cache, _ = hf_fill(hf, n_tokens, offloaded=False, synthetic=True, chunk=8192)
    hf_decode_times(hf, cache, 3)
    return 1e3 * statistics.median(hf_decode_times(hf, cache, steps))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=64)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode: needs a CUDA GPU", file=sys.stderr)
        return 2
    hbm = copy_rate(2 * 2**30, "cuda") / 1e9
    args = shape_args("llama3-8b")
    model = random_model(args, "cuda", torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = a.ctx * args.n_layers * 2 * args.n_kv_heads * args.head_dim * 2
    floor = 1e3 * (weights + kv_bytes) / (hbm * 1e9)
    cache = make_cache("exact", args, 2 * a.ctx)
    with torch.inference_mode():
        synth_fill(cache, args, a.ctx, device="cuda", dtype=torch.bfloat16)
        tok = torch.tensor([1], device="cuda")
        eager = timed_steps(lambda: model(tok, cache, decode=True), cache, a.steps)
        graphs = DecodeGraphs(model, cache)
        graphed = timed_steps(lambda: graphs(1), cache, a.steps)
    captures = graphs.captures
    cache = graphs = None  # free the KV before transformers fills its own
    torch.cuda.empty_cache()
    try:
        hf = hf_eager_ms(model, a.ctx, min(a.steps, 16))
    except Exception as e:  # the peer must not hide our numbers
        print(f"transformers: {type(e).__name__}: {e}", file=sys.stderr)
        hf = None
    med = statistics.median
    p90 = lambda t: sorted(t)[int(0.9 * (len(t) - 1))]  # noqa: E731
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ctx": a.ctx,
              "hbm_copy_GBps": hbm, "weights_GB": weights / 1e9, "kv_GB": kv_bytes / 1e9, "floor_ms": floor,
              "eager_ms": med(eager), "eager_p90_ms": p90(eager), "graphs_ms": med(graphed),
              "graphs_p90_ms": p90(graphed), "hf_eager_ms": hf, "graph_captures": captures}
    out = os.environ.get("OUT") or "./.out"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench_decode.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{result['device']}, torch {torch.__version__}, HBM copy {hbm:.0f} GB/s, weights {weights / 1e9:.1f} GB, "
          f"KV {kv_bytes / 1e9:.2f} GB ({a.ctx} tokens)")
    print(f"{'decode step':<34}{'ms/token':>10}{'p90':>8}{'x floor':>9}")
    rows = [("floor: weights + KV at HBM copy", floor, None), ("localkv eager", med(eager), p90(eager)),
            ("localkv CUDA graphs", med(graphed), p90(graphed)), ("transformers eager (DynamicCache)", hf, None)]
    for name, ms, p in rows:
        if ms is None:
            print(f"{name:<34}{'n/a':>10}")
            continue
        print(f"{name:<34}{ms:>10.2f}{(f'{p:.2f}' if p else ''):>8}{ms / floor:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
