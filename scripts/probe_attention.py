"""Probe: block attention on the GPU, kernel vs torch, at the Llama-3.1-8B decode shape (development aid)."""
import torch, triton
from localkv.offload.attention import block_attention_lse, attention_lse
Hkv, G, P, D = 8, 4, 256, 128
for n in (16, 64, 128):
    block = torch.randn(n, 2, Hkv, P, D, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, Hkv * G, D, device="cuda", dtype=torch.bfloat16)
    o1, l1 = block_attention_lse(q, block, use_kernel=True)
    o2, l2 = block_attention_lse(q, block, use_kernel=False)
    err = (o1.float() - o2.float()).abs().max().item(), (l1 - l2).abs().max().item()
    t1 = triton.testing.do_bench(lambda: block_attention_lse(q, block, use_kernel=True), return_mode="median")
    t2 = triton.testing.do_bench(lambda: block_attention_lse(q, block, use_kernel=False), return_mode="median")
    gb = block.numel() * 2 / 1e9
    print(f"n={n} pages ({gb*1e3:.0f} MB): kernel {t1*1e3:.0f} us ({gb/t1*1e3:.0f} GB/s), torch {t2*1e3:.0f} us ({gb/t2*1e3:.0f} GB/s), err {err}")
