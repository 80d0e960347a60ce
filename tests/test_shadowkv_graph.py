"""The graphed ShadowKV decode step: its device-position view equals eager decode, warm-up and all (CPU), and
CUDA graphs replay it exactly over the tiers (GPU only)."""

import pytest
import torch

from localkv.offload import make_cache
from localkv.offload.policies.shadowkv.graph import ShadowKVGraphView, plain_step
from localkv.offload.store import Budgets
from localkv.runtime.graphs import DecodeGraphs
from test_shadowkv_gpu import _model

PAGE = 32
OPTS = dict(budget=48, sink_tokens=8, local_chunks=4, page_tokens=PAGE, window_tokens=64, block_tokens=64)


@pytest.fixture(autouse=True)
def torch_references(monkeypatch):
    monkeypatch.setenv("LOCALKV_KERNELS", "ref")   # the kernels' own tests cover them; here, the step's logic


@pytest.mark.parametrize("exact_keys", [True, False], ids=["kv", "values_only"])
def test_view_step_equals_eager_decode(exact_keys):
    """Steps through `ShadowKVGraphView` (positions from device tensors, host counts advanced after), each run
    twice with the warm-up's sums saved and restored in between, against a twin cache decoding eagerly. With
    ``exact_keys=False`` the step writes only the value into the open page (its key to a scratch page), and the
    steps run inside the first block of 256 tokens, whose keys (parked ones too) the basis keeps to make itself."""
    model, args = _model("cpu", torch.float32)
    ids = torch.randint(0, 100, (460,))
    prompt, opts = (300, OPTS) if exact_keys else (100, dict(OPTS, block_tokens=256))
    # rank 8 of 32 key columns: a reconstruction error well above rounding, so the parked keys' sums are checked
    eager, viewed = (make_cache("shadowkv", args, 1024, **opts, rank=8, exact_keys=exact_keys) for _ in range(2))
    length = torch.zeros(1, dtype=torch.int32)
    plain = 0
    with torch.inference_mode():
        model(ids[:prompt], eager)
        model(ids[:prompt], viewed)
        for t in range(prompt, prompt + 160):   # crosses page seals, block ends and window seals: eager steps between
            want = model(ids[t:t + 1], eager, decode=True)
            start = viewed.reserve(1)
            if plain_step(viewed):
                plain += 1
                length.fill_(start + 1)
                view = ShadowKVGraphView(viewed, start, length)
                step = lambda: model.step(ids[t:t + 1], torch.tensor([start]), view, decode=True)  # noqa: E731
                saved = view.save()
                step()                     # the capture's warm-up run
                view.restore(saved)
                got = step()               # the replay
                view.replayed()
                viewed.commit(1)
            else:
                got = model(ids[t:t + 1], viewed, decode=True)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert 100 < plain < 160
    # (hit rates differ: each warm-up run here fetched what its replay then found in the buffer)
    a, b = eager.stats(), viewed.stats()
    for key in ("chunks_selected", "reconstruction_error", "basis_refreshes", "rank"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
    for la, lb in zip(eager.layers, viewed.layers):
        # parked keys are summed in one matmul, eager ones a row at a time: fp32 order differs
        torch.testing.assert_close(la.lowrank.gram_full, lb.lowrank.gram_full, rtol=1e-4, atol=1e-3)   # sums of many products, in another order
        if not exact_keys:   # the store's values alike, no keys kept beside them; the first block's keys alike
            assert lb.cache.store.open.shape[1] == 1 and lb.lowrank.fixed
            torch.testing.assert_close(lb.cache.store.open, la.cache.store.open, atol=1e-4, rtol=1e-4)  # as logits
            # parked and eager keys come by different fp32 paths: 1.3e-5 apart after torch.manual_seed(205)
            torch.testing.assert_close(lb.lowrank.first, la.lowrank.first, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graphs_replay_eager_decode_over_the_tiers(tmp_path, dtype, monkeypatch):
    monkeypatch.delenv("LOCALKV_KERNELS")
    model, args = _model("cuda", dtype)
    page_bytes = 2 * args.n_kv_heads * PAGE * args.head_dim * dtype.itemsize * args.n_layers
    ids = torch.randint(0, 100, (800,), device="cuda")
    # bf16: the graph's fused RoPE / RMSNorm round differently from eager torch, and where two chunks' scores
    # are that close a partial selection (a discrete choice) differs from there on; with every chunk selected
    # the comparison is of the arithmetic alone. fp32 checks the partial selection.
    opts = dict(OPTS, budget=OPTS["budget"] if dtype == torch.float32 else 4096)
    eager, graphed = (make_cache("shadowkv", args, 1024, device="cuda", dtype=dtype,
                                 budgets=Budgets(2 * page_bytes, 100 * page_bytes), **opts) for _ in range(2))
    graphs = DecodeGraphs(model, graphed)
    close = []
    with torch.inference_mode():
        model(ids[:600], eager)
        model(ids[:600], graphed)
        for t in range(600, 800):
            want = model(ids[t:t + 1], eager, decode=True)[-1]
            got = graphs(int(ids[t]))
            if got is None:                # a step with host work: eager, as the engine runs it
                got = model(ids[t:t + 1], graphed, decode=True)[-1]
            # bf16: the graph's fused RoPE and RMSNorm round once, in fp32, where eager torch rounds after each op;
            # measured on an H100: 196 of 200 steps within 3% of the largest logit, the others within 5.4%
            tol = 1e-4 if dtype == torch.float32 else 6e-2
            close.append(float((got - want).abs().max() / (tol * want.abs().max())))
    assert max(close) <= 1, [(600 + t, round(c, 2)) for t, c in enumerate(close) if c > 1]
    assert graphed.length == eager.length == 800
    assert graphs.captures >= 2
    # a capture's warm-up fetches what its replay then finds: each capture adds at most one all-hit step of 200
    a, b = eager.stats(), graphed.stats()
    assert a["hit_rate"] - 1e-6 <= b["hit_rate"] <= a["hit_rate"] + graphs.captures / 200
    assert b["fetched_bytes_per_token"]["cpu"] > 0 or dtype != torch.float32   # bf16: all chunks stay buffered


def test_decode_graphs_over_shadowkv_prepare_ahead(monkeypatch):
    """`DecodeGraphs` on the CPU (`fake_graphs`; the view made as on a GPU, less the side stream): plain steps
    replay, the others run eagerly, each step's view and signature are prepared during the step before, and
    an edit (truncate, prefill) in between invalidates them. Logits equal a twin decoding eagerly."""
    from fake_graphs import cpu_graphs

    from localkv.offload.policies.shadowkv.cache import ShadowKV

    monkeypatch.setattr(ShadowKV, "static_view", lambda self, rows, length: (
        ShadowKVGraphView(self, self.length, length) if plain_step(self) else None))
    model, args = _model("cpu", torch.float32)
    ids = torch.randint(0, 100, (460,))
    eager, graphed = (make_cache("shadowkv", args, 1024, **OPTS) for _ in range(2))
    graphs = cpu_graphs(monkeypatch, model, graphed)
    replays = eager_steps = 0
    with torch.inference_mode():
        model(ids[:300], eager)
        model(ids[:300], graphed)
        for t in range(300, 460):   # page seals, block ends, window seals: eager steps between replays
            if t == 400:            # an edited turn: back to 380, the same length again with other ids
                other = torch.randint(0, 100, (20,))
                for cache in (eager, graphed):
                    cache.truncate(380)
                    model(other, cache)
            want = model(ids[t:t + 1], eager, decode=True)
            got = graphs(int(ids[t]))
            if got is None:
                got = model(ids[t:t + 1], graphed, decode=True)[-1]
                eager_steps += 1
            else:
                replays += 1
            torch.testing.assert_close(got, want[-1], atol=1e-4, rtol=1e-4)
    assert replays > 100 and eager_steps > 3 and graphs.captures >= 2
    assert graphs.prepared <= replays + 2 * eager_steps + 3   # after a replay the next step comes prepared
