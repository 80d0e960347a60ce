"""On a CUDA device: the tiered store with its copy stream and staging ring is exact. Skipped without a GPU."""

import pytest
import torch

from localkv.offload import make_cache
from localkv.offload.store import Budgets
from test_model import _hf_and_ours

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gpu_pages,cpu_pages,disk", [(0, 100, False), (2, 3, True), (0, 0, True)])
def test_tiered_matches_in_memory_on_cuda(tmp_path, dtype, gpu_pages, cpu_pages, disk):
    _, model, args = _hf_and_ours("llama")
    model = model.to("cuda", dtype)
    model.rope = type(model.rope)(args, "cuda")
    page = 16
    page_bytes = 2 * args.n_kv_heads * page * args.head_dim * dtype.itemsize
    budgets = Budgets(page_bytes * args.n_layers * gpu_pages, page_bytes * args.n_layers * cpu_pages,
                      tmp_path if disk else None)
    ids = torch.randint(0, 100, (400,), device="cuda")
    outs = []
    for cache in (make_cache("exact", args, 512),
                  make_cache("exact", args, 512, device="cuda", dtype=dtype, budgets=budgets, page_tokens=page,
                             block_pages=3, ring_blocks=2)):
        with torch.inference_mode():
            out = [model(ids[:150], cache, all_logits=True), model(ids[150:380], cache, all_logits=True)]
            out += [model(ids[t:t + 1], cache, decode=True) for t in range(380, 395)]
        outs.append(torch.cat(out))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    scale = outs[0].abs().max()
    assert (outs[0] - outs[1]).abs().max() <= tol * scale


@pytest.mark.parametrize("T,S,Hq,Hkv,D", [(40, 40, 8, 2, 64), (300, 1000, 32, 8, 128), (17, 530, 12, 4, 64)])
def test_chunk_attention_matches_fp32_softmax(T, S, Hq, Hkv, D):
    """The fused (cuDNN or flash) parts, folded by merge_into, equal one fp32 softmax over all the keys."""
    from localkv.offload.attention import ChunkAttention

    q = torch.randn(T, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(Hkv, S, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(Hkv, S, D, device="cuda", dtype=torch.bfloat16)
    attn = ChunkAttention(q)
    assert attn.fused
    cut = (S - T) // 3                     # an all-visible part, then the run ending with the queries
    attn.add(k[:, :cut], v[:, :cut])
    attn.add(k[:, cut:], v[:, cut:], causal=True)
    G = Hq // Hkv
    kr, vr = k.float().repeat_interleave(G, 0), v.float().repeat_interleave(G, 0)   # (Hq, S, D)
    s = torch.einsum("thd,hsd->hts", q.float(), kr) * D ** -0.5
    seen = torch.arange(S, device="cuda")[None, :] <= (S - T + torch.arange(T, device="cuda"))[:, None]
    p = torch.softmax(s.masked_fill(~seen, float("-inf")), -1)
    want = torch.einsum("hts,hsd->thd", p, vr)
    assert (attn.result().float() - want).abs().max() < 2e-2
    lse = torch.logsumexp(s.masked_fill(~seen, float("-inf")), -1)                    # (Hq, T)
    assert (attn.acc_lse.view(Hq, T) - lse).abs().max() < 2e-2
