"""The decode step at the speed of memory: Llama-3.1-8B shape, random bf16 weights, 8K tokens of KV on the GPU.

    python scripts/bench_decode.py [--ctx 8192] [--steps 64]

One run measures the HBM copy bandwidth, then ms/token of: localkv's eager decode step, the same step through
CUDA graphs (what `localkv run` uses when the KV fits on the GPU), and Hugging Face transformers' eager decode
with its full DynamicCache. The floor is the weights streamed once (bytes / HBM copy bandwidth) plus the KV
read once. JSON goes to $OUT/bench_decode.json (default ./.out); the table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_store import LLAMA31_8B, build_model, gpu_time, synth_fill  # noqa: E402

from localkv.models.args import ModelArgs  # noqa: E402
from localkv.offload import make_cache  # noqa: E402
from localkv.runtime.graphs import DecodeGraphs  # noqa: E402


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
def hf_eager_ms(model, n_tokens: int, steps: int) -> float | None:
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    a = model.args
    cfg = LlamaConfig(hidden_size=a.dim, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
                      num_key_value_heads=a.n_kv_heads, intermediate_size=a.ffn_dim, vocab_size=a.vocab_size,
                      rms_norm_eps=a.norm_eps, max_position_embeddings=a.max_seq_len, rope_theta=a.rope_theta,
                      rope_scaling=a.rope_scaling, torch_dtype="bfloat16")
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    state = {("model." + k if not k.startswith("lm_head") else k): v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, assign=True, strict=False)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(cfg, device="cuda")
    hf.eval()
    cache = DynamicCache(config=cfg)
    for layer in range(a.n_layers):
        k = torch.randn(1, a.n_kv_heads, n_tokens, a.head_dim, device="cuda", dtype=torch.bfloat16)
        cache.layers[layer].update(k, torch.randn_like(k))
    tok = torch.tensor([[1]], device="cuda")
    times = []
    for i in range(3 + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        hf(tok, past_key_values=cache, use_cache=True)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(1e3 * (time.perf_counter() - t))
        for lay in cache.layers:
            lay.keys, lay.values = lay.keys[..., :n_tokens, :], lay.values[..., :n_tokens, :]
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=64)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode: needs a CUDA GPU", file=sys.stderr)
        return 2
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    hbm = 2 * x.numel() / gpu_time(lambda: y.copy_(x)) / 1e9
    del x, y
    args = ModelArgs(**LLAMA31_8B)
    model = build_model(args)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = a.ctx * args.n_layers * 2 * args.n_kv_heads * args.head_dim * 2
    floor = 1e3 * (weights + kv_bytes) / (hbm * 1e9)
    cache = make_cache("exact", args, 2 * a.ctx)
    with torch.inference_mode():
        synth_fill(cache, model, a.ctx)
        tok = torch.tensor([1], device="cuda")
        eager = timed_steps(lambda: model(tok, cache, decode=True), cache, a.steps)
        graphs = DecodeGraphs(model, cache)
        graphed = timed_steps(lambda: graphs(1), cache, a.steps)
    del cache
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
              "graphs_p90_ms": p90(graphed), "hf_eager_ms": hf, "graph_captures": graphs.captures}
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
