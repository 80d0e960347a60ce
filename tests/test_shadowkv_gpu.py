"""ShadowKV on a CUDA device: the decode through the Triton kernels, the side stream and pinned gathers equals
the CPU reference path on the same inputs, and a steady decode step never waits for the GPU. Skipped without
a GPU (tests/kernels/test_shadowkv_decode.py runs the kernel path through the interpreter on a CPU)."""

import pytest
import torch

from localkv.offload import make_cache
from localkv.offload.store import Budgets
from test_model import _hf_and_ours

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PAGE = 32
OPTS = dict(budget=48, sink_tokens=8, local_chunks=4, page_tokens=PAGE, window_tokens=64, block_tokens=256)


def _model(device, dtype):
    with torch.random.fork_rng(devices=[]):   # the same weights for every device; later draws stay fresh
        torch.manual_seed(0)
        return _random_model(device, dtype)


def _random_model(device, dtype):
    _, model, args = _hf_and_ours("llama", max_pos=4096)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model = model.to(device, dtype)
    model.rope = type(model.rope)(args, device)
    return model, args


def _budgets(args, dtype, tmp_path, gpu_pages, cpu_pages, disk):
    page_bytes = 2 * args.n_kv_heads * PAGE * args.head_dim * dtype.itemsize * args.n_layers
    return Budgets(gpu_pages * page_bytes, cpu_pages * page_bytes, tmp_path if disk else None)


@pytest.mark.parametrize("gpu_pages,cpu_pages,disk,index_tier", [
    (None, None, False, "gpu"), (2, 100, False, "gpu"), (2, 3, True, "gpu"), (2, 100, False, "cpu")])
def test_cuda_decode_equals_the_cpu_reference(tmp_path, gpu_pages, cpu_pages, disk, index_tier):
    """index_tier="cpu": U and the landmarks in pinned CPU memory, read by the kernels over PCIe."""
    ids = torch.randint(0, 100, (700,))
    outs = []
    for device in ("cpu", "cuda"):
        model, args = _model(device, torch.float32)
        budgets = None if gpu_pages is None else _budgets(args, torch.float32, tmp_path / device, gpu_pages,
                                                           cpu_pages, disk)
        cache = make_cache("shadowkv", args, 1024, device=device, dtype=torch.float32, budgets=budgets,
                           index_tier=index_tier, **OPTS)
        x = ids.to(device)
        with torch.inference_mode():
            out = [model(x[:260], cache, all_logits=True), model(x[260:520], cache, all_logits=True)]
            out += [model(x[t:t + 1], cache, decode=True) for t in range(520, 600)]
            cache.truncate(555)
            out += [model(x[t:t + 1], cache, decode=True) for t in range(555, 580)]
        outs.append(torch.cat(out).cpu())
        if device == "cuda" and cpu_pages:
            assert cache.stats()["fetched_bytes_per_token"]["cpu"] > 0
        if device == "cuda" and index_tier == "cpu":
            stats = cache.stats()
            assert stats["index_tier"] == "cpu" and stats["index_host_bytes"] > 0
            # Each step reads every landmark in place, and U's rows of its chunks: counted as bytes over PCIe,
            # at least the landmarks of the first step's sealed chunks.
            first = args.n_layers * (520 - cache.config.window_tokens) // 8 * args.n_kv_heads * args.head_dim * 4
            assert stats["index_read_bytes_per_token"] >= first > 0
            assert stats["moved_bytes"]["h2d"] >= cache.index_reads
            assert cache.layers[0].lowrank.u.is_pinned() and cache.layers[0].index.landmarks.is_pinned()
            assert cache.static_view(0, torch.zeros(1, dtype=torch.int32, device=device)) is None  # eager steps
    scale = outs[0].abs().max()
    assert (outs[0] - outs[1]).abs().max() <= 1e-3 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_steady_decode_step_never_syncs(tmp_path, dtype):
    """A decode step that seals no page, ends no low-rank block and overflows no window reads nothing back
    from the GPU: values come from pinned pages by the kernel, on the side stream, with no count read back."""
    model, args = _model("cuda", dtype)
    cache = make_cache("shadowkv", args, 2048, device="cuda", dtype=dtype,
                       budgets=_budgets(args, dtype, tmp_path, 2, 100, False), **OPTS)
    ids = torch.randint(0, 100, (1200,), device="cuda")
    layer = cache.layers[0]
    checked = 0
    with torch.inference_mode():
        model(ids[:600], cache)
        for t in range(600, 700):
            n = cache.length
            token = ids[t:t + 1].clone()
            steady = (n % PAGE not in (0, PAGE - 1) and (n + 1) % OPTS["block_tokens"] != 0
                      and n + 1 - layer.W <= OPTS["window_tokens"] and t > 610)   # kernels tuned by then
            if steady:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    model(token, cache, decode=True)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                checked += 1
            else:
                model(token, cache, decode=True)
    assert checked > 20 and cache.stats()["fetched_bytes_per_token"]["cpu"] > 0
