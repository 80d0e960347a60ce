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
                           page_tokens=page, window_tokens=40, sink_tokens=8, local_chunks=4)
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


def test_graphed_step_through_kernels_matches_eager_references(monkeypatch, kernel_ran):
    """The graphed step's view (`shadowkv_graph`: device positions, `rope_append` writing the token's K/V and
    parking its key) through the kernels, against eager decode through the references."""
    from test_model import _hf_and_ours

    from localkv.offload.policies.shadowkv.graph import ShadowKVGraphView, plain_step

    _, model, args = _hf_and_ours("llama", max_pos=4096)
    model = model.to(DEVICE, torch.float32)
    model.rope = type(model.rope)(args, DEVICE)
    opts = dict(budget=48, page_tokens=32, window_tokens=64, block_tokens=64, rank=8, sink_tokens=8, local_chunks=4)
    ids = torch.randint(0, 100, (306,), device=DEVICE)
    eager, viewed = (make_cache("shadowkv", args, 512, device=DEVICE, dtype=torch.float32, **opts) for _ in range(2))
    length = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    plain = 0
    with torch.inference_mode():
        monkeypatch.setenv("LOCALKV_KERNELS", "ref")
        model(ids[:300], eager)
        model(ids[:300], viewed)
        for t in range(300, 306):
            monkeypatch.setenv("LOCALKV_KERNELS", "ref")
            want = model(ids[t:t + 1], eager, decode=True)
            monkeypatch.delenv("LOCALKV_KERNELS")
            start = viewed.reserve(1)
            if plain_step(viewed):
                plain += 1
                length.fill_(start + 1)
                view = ShadowKVGraphView(viewed, start, length)
                got = model.step(ids[t:t + 1], torch.tensor([start], device=DEVICE), view, decode=True)
                view.replayed()
                viewed.commit(1)
            else:
                got = model(ids[t:t + 1], viewed, decode=True)
            assert (got - want).abs().max() <= 1e-3 * want.abs().max()
    assert plain >= 4
    kernel_ran("rope_append")
    monkeypatch.setenv("LOCALKV_KERNELS", "ref")
    for la, lb in zip(eager.layers, viewed.layers):   # the parked keys reached the Gram sums (flushed on read)
        torch.testing.assert_close(la.lowrank.gram_full, lb.lowrank.gram_full, rtol=1e-4, atol=1e-3)
