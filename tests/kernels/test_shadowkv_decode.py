"""ShadowKV decode through the Triton kernels (interpreted on a CPU, compiled on a GPU) against the same decode
through their torch references, on the same inputs: landmark scores, the top-k, slot assignment, the key
rebuild, the masked gathers of misses from device, CPU-tier and open pages (disk pages go through the host
either way), sparse attention."""

import pytest
import torch
from kernel_testing import DEVICE, INTERPRET

from localkv.offload import make_cache
from localkv.offload.store import Budgets


# The interpreter runs fp32 (16-bit dots are slow and inexact there); compiled on a GPU, bf16 as well.
DTYPES_HERE = [torch.float32] if INTERPRET else [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES_HERE, ids=str)
def test_decode_through_kernels_matches_references(dtype, monkeypatch, kernel_ran, tmp_path):
    from test_model import _hf_and_ours

    _, model, args = _hf_and_ours("llama", max_pos=4096)
    model = model.to(DEVICE, dtype)
    model.rope = type(model.rope)(args, DEVICE)
    page = 32
    page_bytes = 2 * args.n_kv_heads * page * args.head_dim * dtype.itemsize * args.n_layers
    budgets = Budgets(2 * page_bytes, 3 * page_bytes, tmp_path)  # device, CPU (pinned on a GPU), disk pages
    ids = torch.randint(0, 100, (340,), device=DEVICE)
    outs = []
    for path in ("ref", "kernels"):
        if path == "ref":
            monkeypatch.setenv("LOCALKV_KERNELS", "ref")
        else:
            monkeypatch.delenv("LOCALKV_KERNELS", raising=False)
        cache = make_cache("shadowkv", args, 512, device=DEVICE, dtype=dtype, budgets=budgets, budget=48,
                           page_tokens=page, window_tokens=40)
        with torch.inference_mode():
            out = [model(ids[:300], cache)]
            out += [model(ids[t:t + 1], cache, decode=True) for t in range(300, 306)]
            cache.truncate(302)
            out += [model(ids[t:t + 1], cache, decode=True) for t in range(302, 306)]
        outs.append(torch.cat(out).float())
        stats = cache.stats()
        assert stats["chunks_selected"] == 6 and stats["fetched_bytes_per_token"]["cpu"] > 0
    for op in ("chunk_scores", "topk_ids", "assign_slots", "lowrank_rope", "gather_pages", "sparse_attention"):
        kernel_ran(op)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    assert (outs[1] - outs[0]).abs().max() <= tol * outs[0].abs().max()
