"""The graphed decode step: its static view of the KV equals eager decode (CPU), and CUDA graphs replay it
exactly (GPU only)."""

import pytest
import torch

from localkv.offload import make_cache
from localkv.runtime.graphs import DecodeGraphs, bucket_rows
from test_model import _hf_and_ours



@pytest.fixture(autouse=True)
def torch_references_on_cpu(monkeypatch):
    """On a CPU, the torch references even after tests/kernels set TRITON_INTERPRET=1 for the session: these
    tests are about the graphs' bookkeeping, and the interpreter made one of them take two minutes."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("LOCALKV_KERNELS", "ref")

def test_bucket_rows_cover_and_waste_little():
    for n in [1, 1000, 1025, 4097, 8192, 8193, 100_000, 1_000_000]:
        rows = bucket_rows(n, capacity=2_000_000)
        assert n <= rows < n + max(1024, n / 8)   # at most a 1K-row step, or 1/8 more rows
    assert bucket_rows(5000, capacity=4500) == 4500


def test_static_view_step_equals_eager_decode():
    """The graph's step (write index and filled length from device tensors) on a CPU, against eager decode."""
    _, model, args = _hf_and_ours("llama")
    ids = torch.randint(0, 100, (30,))
    eager, static = make_cache("exact", args, 2048), make_cache("exact", args, 2048)
    with torch.inference_mode():
        model(ids[:20], eager)
        model(ids[:20], static)
        length = torch.zeros(1, dtype=torch.int32)
        for t in range(20, 30):
            want = model(ids[t:t + 1], eager, decode=True)
            start = static.reserve(1)
            length.fill_(start + 1)
            view = static.static_view(bucket_rows(start + 1, static.capacity), length)
            got = model.step(ids[t:t + 1], torch.tensor([start]), view, decode=True)
            static.commit(1)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_replay_eager_decode(dtype):
    _, model, args = _hf_and_ours("llama", max_pos=4096)
    model = model.to("cuda", dtype)
    model.rope = type(model.rope)(args, "cuda")
    ids = torch.randint(0, 100, (1100,), device="cuda")
    eager, graphed = make_cache("exact", args, 4096), make_cache("exact", args, 4096)
    graphs = DecodeGraphs(model, graphed)
    with torch.inference_mode():
        model(ids[:1000], eager)
        model(ids[:1000], graphed)
        for t in range(1000, 1100):   # crosses the 1024-row bucket: a second graph, over grown buffers
            want = model(ids[t:t + 1], eager, decode=True)[-1]
            got = graphs(int(ids[t]))
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            assert (got - want).abs().max() <= tol * want.abs().max()
    assert graphed.length == eager.length == 1100
    assert graphs.captures >= 2


def test_decode_graphs_prepare_the_next_step_ahead(monkeypatch):
    """`DecodeGraphs` on the CPU (`fake_graphs`): each step's view is prepared during the step before, across a
    bucket's growth; a truncation and a prefill in between invalidate it. Logits equal eager decode's."""
    from fake_graphs import cpu_graphs

    _, model, args = _hf_and_ours("llama")
    ids = torch.randint(0, 100, (1100,))
    eager, graphed = make_cache("exact", args, 2048), make_cache("exact", args, 2048)
    graphs = cpu_graphs(monkeypatch, model, graphed)
    steps = 0
    with torch.inference_mode():
        model(ids[:1000], eager)
        model(ids[:1000], graphed)
        for t in range(1000, 1100):   # crosses the 1024-row bucket: a second graph, over grown buffers
            if t == 1050:             # an edited turn: back to 1040, the same length again with other ids
                other = torch.randint(0, 100, (10,))
                for cache in (eager, graphed):
                    cache.truncate(1040)
                    model(other, cache)
            want = model(ids[t:t + 1], eager, decode=True)[-1]
            got = graphs(int(ids[t]))
            steps += 1
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert graphed.length == eager.length == 1100
    assert graphs.captures >= 2
    assert graphs.prepared <= steps + 3   # one prepare a step: the first, and again after the edit
