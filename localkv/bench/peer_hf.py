"""The peer: Hugging Face transformers running the same weights, with its full and its offloaded KV cache.

The transformers model shares localkv's weight tensors (no second copy), uses SDPA attention, and keeps its
KV in a ``DynamicCache`` either whole on the device ("hf full") or with ``offloading=True`` ("hf offloaded",
every layer's KV in CPU memory, the next layer prefetched on a side stream; CUDA only). The context is
prefilled in chunks, or synthesized straight into the cache as localkv's is.
"""

from __future__ import annotations

import time

import torch

from ..models.args import ModelArgs
from .ceilings import Ceilings
from .measure import OOM, sync
from .model import weights_bytes
from .rows import failed_row, kv_bytes_per_token, make_row

PEER_CACHES = ("full", "offloaded")


def hf_model(model) -> torch.nn.Module:
    """A transformers CausalLM of ``model``'s architecture whose parameters are ``model``'s own tensors."""
    import transformers

    a: ModelArgs = model.args
    qwen = a.arch == "qwen2"
    config_cls = transformers.Qwen2Config if qwen else transformers.LlamaConfig
    model_cls = transformers.Qwen2ForCausalLM if qwen else transformers.LlamaForCausalLM
    cfg = config_cls(hidden_size=a.dim, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
                     num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim, intermediate_size=a.ffn_dim,
                     vocab_size=a.vocab_size, rms_norm_eps=a.norm_eps, max_position_embeddings=a.max_seq_len,
                     rope_theta=a.rope_theta, rope_scaling=a.rope_scaling, tie_word_embeddings=a.tie_embeddings,
                     attention_bias=a.o_bias, mlp_bias=a.mlp_bias)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = model_cls(cfg)
    state = {(k if k.startswith("lm_head") else "model." + k): v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, assign=True, strict=False)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(cfg).to(model.device)  # its buffers were on meta
    return hf.eval()


@torch.inference_mode()
def hf_fill(hf, n_tokens: int, *, offloaded: bool, synthetic: bool, chunk: int):
    """A ``DynamicCache`` holding ``n_tokens`` of context, by chunked prefill or synthesized; (cache, seconds)."""
    from transformers import DynamicCache

    cfg, device = hf.config, hf.device
    cache = DynamicCache(config=cfg, offloading=offloaded)
    sync(device)
    t = time.perf_counter()
    if synthetic:
        shape = (1, cfg.num_key_value_heads, n_tokens, cfg.head_dim)  # (B, Hkv, T, D)
        for layer in cache.layers:
            k = torch.randn(shape, device=device, dtype=hf.dtype)
            layer.update(k, torch.randn_like(k))
            if offloaded:
                layer.offload()
        if offloaded:
            cache.prefetch(0)  # as the last layer of a prefill leaves it: layer 0 on its way back
    else:
        ids = torch.randint(0, cfg.vocab_size, (1, n_tokens), device=device)
        for s in range(0, n_tokens, chunk):
            hf(ids[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    sync(device)
    return cache, time.perf_counter() - t


@torch.inference_mode()
def hf_decode_times(hf, cache, steps: int) -> list[float]:
    """``steps`` decode steps of one random token each on top of ``cache``; seconds of each."""
    device = hf.device
    tokens = torch.randint(0, hf.config.vocab_size, (steps, 1, 1), device=device)
    times = []
    for i in range(steps):
        sync(device)
        t = time.perf_counter()
        hf(tokens[i], past_key_values=cache, use_cache=True)
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def peer_row(hf, kind: str, model, ctx: int, *, synthetic: bool, warmup: int, steps: int, chunk: int,
             ceilings: Ceilings) -> dict:
    """One transformers row: its ``full`` or ``offloaded`` cache at ``ctx``, as ``runner.run_policy`` does ours."""
    import psutil

    label, device = f"hf {kind}", model.device
    if kind == "offloaded" and device.type != "cuda":
        return failed_row(label, ctx, "n/a (needs a GPU)")
    per_token = kv_bytes_per_token(model.args, model.dtype)
    total = ctx + warmup + steps
    on_host = kind == "offloaded" or device.type == "cpu"
    if on_host and per_token * total > 0.8 * psutil.virtual_memory().available:  # spare us the OOM killer
        return failed_row(label, ctx, "OOM")
    try:
        cache, fill_s = hf_fill(hf, ctx, offloaded=kind == "offloaded", synthetic=synthetic, chunk=chunk)
        hf_decode_times(hf, cache, warmup)
        times = hf_decode_times(hf, cache, steps)
        del cache
    except OOM:
        return failed_row(label, ctx, "OOM")
    tokens = {"gpu": total, "cpu": 0, "disk": 0} if kind == "full" else {"gpu": 0, "cpu": total, "disk": 0}
    extra = {"policy": label, "peak_bytes": {t: n * per_token for t, n in tokens.items()}}
    if device.type == "cuda":
        extra["gpu_allocated_peak"] = torch.cuda.max_memory_allocated(device)
    return make_row(label, ctx, "synthesized" if synthetic else "prefill", None if synthetic else fill_s, times,
                    tokens, per_token, weights_bytes(model), ceilings, **extra)
