"""Probe (development aid): fused attention backends at the 128K prefill shapes of Llama-3.1-8B on one GPU.

Times, per layer: the baseline's one causal SDPA over 128K tokens, and the pieces a chunked prefill runs
(non-causal blocks with the GQA group folded into the query axis, the causal self-chunk), with each backend
that returns a log-sum-exp (flash, cuDNN). Prints a table; TFLOP/s counts only the visible scores.
"""
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

Hq, Hkv, D, G = 32, 8, 128, 4
dt = torch.bfloat16
dev = "cuda"
aten = torch.ops.aten


def ms(fn, rep=5):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(rep):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


rows = []


def row(name, flops, fn, rep=5):
    try:
        t = ms(fn, rep)
        rows.append((name, t, flops / t / 1e9))
    except Exception as e:  # a backend may not support the shape
        rows.append((name, float("nan"), float("nan")))
        print(f"{name}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)


print("torch", torch.__version__, torch.cuda.get_device_name(), file=sys.stderr)
for attr in ("list_flash_attention_impls", "current_flash_attention_impl"):
    f = getattr(torch.nn.attention, attr, None)
    if f:
        try:
            print(attr, f(), file=sys.stderr)
        except Exception as e:
            print(attr, e, file=sys.stderr)

N = 128 * 1024
C = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
q = torch.randn(1, Hq, N, D, device=dev, dtype=dt)
k = torch.randn(1, Hkv, N, D, device=dev, dtype=dt)
v = torch.randn_like(k)
causal_flops = 4 * Hq * D * N * N / 2
row("base SDPA causal gqa 128K (default)", causal_flops,
    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 3)
for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
    def f(be=be):
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    row(f"base SDPA causal gqa 128K {be.name}", causal_flops, f, 3)
kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
    def f(be=be):
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    row(f"base SDPA causal repeated-kv 128K {be.name}", causal_flops, f, 3)
del kr, vr

# Pieces of a chunked prefill: block of C keys against a chunk of C queries (G folded), and the self chunk.
qc = q[:, :, :C]
qf = qc.reshape(1, Hkv, G * C, D) if False else q[0, :, :C].reshape(Hkv, G, C, D).reshape(1, Hkv, G * C, D)
kb, vb = k[:, :, :C].contiguous(), v[:, :, :C].contiguous()
blk_flops = 4 * Hq * D * C * C
s = D ** -0.5
row(f"block {C}x{C} folded flash", blk_flops,
    lambda: aten._scaled_dot_product_flash_attention(qf, kb, vb, 0.0, False, False, scale=s))
row(f"block {C}x{C} folded cudnn", blk_flops,
    lambda: aten._scaled_dot_product_cudnn_attention(qf, kb, vb, None, True, 0.0, False, False, scale=s))
row(f"block {C}x{C} unfolded cudnn gqa", blk_flops,
    lambda: aten._scaled_dot_product_cudnn_attention(qc.contiguous(), kb, vb, None, True, 0.0, False, False, scale=s))
kbr, vbr = kb.repeat_interleave(G, 1), vb.repeat_interleave(G, 1)
self_flops = 4 * Hq * D * C * C / 2
qcc = qc.contiguous()
row(f"self {C} causal flash (repeat)", self_flops,
    lambda: aten._scaled_dot_product_flash_attention(qcc, kbr, vbr, 0.0, True, False, scale=s))
row(f"self {C} causal cudnn (repeat)", self_flops,
    lambda: aten._scaled_dot_product_cudnn_attention(qcc, kbr, vbr, None, True, 0.0, True, False, scale=s))
row(f"self {C} causal cudnn gqa", self_flops,
    lambda: aten._scaled_dot_product_cudnn_attention(qcc, kb, vb, None, True, 0.0, True, False, scale=s))
# A 4x longer key block (fewer, larger calls)
kb4, vb4 = k[:, :, :4 * C].contiguous(), v[:, :, :4 * C].contiguous()
row(f"block {C}x{4*C} folded flash", 4 * blk_flops,
    lambda: aten._scaled_dot_product_flash_attention(qf, kb4, vb4, 0.0, False, False, scale=s))
row(f"block {C}x{4*C} folded cudnn", 4 * blk_flops,
    lambda: aten._scaled_dot_product_cudnn_attention(qf, kb4, vb4, None, True, 0.0, False, False, scale=s))
# Merge cost: RunningAttention.add on (C, Hq, D) fp32
sys.path.insert(0, ".")
from localkv.offload.attention import RunningAttention
o1 = torch.randn(C, Hq, D, device=dev); l1 = torch.randn(C, Hq, device=dev)
ob = torch.randn(C, Hq, D, device=dev, dtype=dt)
def merge():
    r = RunningAttention(); r.add(o1, l1); r.add(ob, l1)
row(f"RunningAttention.add x1 ({C},{Hq},{D})", 1, merge)
# Linear layers for a chunk
x = torch.randn(C, 4096, device=dev, dtype=dt)
w1 = torch.randn(6144, 4096, device=dev, dtype=dt); w2 = torch.randn(28672, 4096, device=dev, dtype=dt)
w3 = torch.randn(4096, 14336, device=dev, dtype=dt); w4 = torch.randn(4096, 4096, device=dev, dtype=dt)
h = torch.randn(C, 14336, device=dev, dtype=dt)
lin_flops = 2 * C * 4096 * (6144 + 28672 + 4096) + 2 * C * 14336 * 4096
row(f"linears of a layer, {C} tokens", lin_flops,
    lambda: (F.linear(x, w1), F.linear(x, w2), F.linear(h, w3), F.linear(x, w4)))
print(f"\n{'what':<48}{'ms':>10}{'TFLOP/s':>10}")
for name, t, tf in rows:
    print(f"{name:<48}{t:>10.3f}{tf:>10.0f}")
# FlashAttention-3 through torch's registry, where the machine has it.
try:
    torch.nn.attention.activate_flash_attention_impl("FA3")
    rows.clear()
    row(f"FA3: block {C}x{C} folded flash", blk_flops,
        lambda: aten._scaled_dot_product_flash_attention(qf, kb, vb, 0.0, False, False, scale=s))
    row(f"FA3: self {C} causal (repeat)", self_flops,
        lambda: aten._scaled_dot_product_flash_attention(qcc, kbr, vbr, 0.0, True, False, scale=s))
    for name, t, tf in rows:
        print(f"{name:<48}{t:>10.3f}{tf:>10.0f}")
except Exception as e:
    print("FA3:", type(e).__name__, str(e)[:200])
