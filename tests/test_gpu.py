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
