"""chunk_scores: landmark (softmax mass) and min/max (upper bound) chunk scores with the GQA group max."""

import importlib

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, assert_close, poisoned

from localkv.kernels import chunk_scores, chunk_scores_ref, quantize_minmax

# (Tq, Hkv, G, D, C)
CASES = {
    "decode": (1, 2, 4, 64, 37),
    "tq16_gqa8_d128": (16, 1, 8, 128, 50),
    "one_chunk_mha": (3, 2, 1, 64, 1),
    "group3": (2, 2, 3, 64, 70),
    "many_blocks": (5, 1, 4, 128, 200),
}


def _q_abstracts(case, dtype):
    Tq, Hkv, G, D, C = case
    q = torch.randn(Tq, Hkv * G, D, dtype=dtype, device=DEVICE)
    landmarks = torch.randn(Hkv, C, D, dtype=dtype, device=DEVICE)
    kmin = torch.randn(Hkv, C, D, dtype=dtype, device=DEVICE)
    kmax = (kmin.float() + torch.rand(Hkv, C, D, device=DEVICE)).to(dtype)
    return q, landmarks, kmin, kmax


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("mode", ["landmark", "minmax"])
def test_matches_reference(mode, name, dtype, kernel_ran):
    q, landmarks, kmin, kmax = _q_abstracts(CASES[name], dtype)
    Hkv, C = kmin.shape[:2]
    out = poisoned((Hkv, C), torch.float32)
    kw = dict(landmarks=landmarks) if mode == "landmark" else dict(kmin=kmin, kmax=kmax)
    assert chunk_scores(q, out=out, **kw) is out
    kernel_ran("chunk_scores")
    # scores are fp32 sums of exact products of the inputs: fp32-tight for every input dtype, scaled by size
    ref = chunk_scores_ref(q, **kw)
    assert_close(out / ref.abs().max().clamp(min=1), ref / ref.abs().max().clamp(min=1), torch.float32, mode)


@pytest.mark.parametrize("mode", ["landmark", "minmax"])
def test_writes_a_column_slice_of_a_wider_buffer(mode, kernel_ran):
    """``out`` may be the first C columns of padded rows (as a decode step aligns them for the select): those
    are the reference's, and the padding is left as it was."""
    q, landmarks, kmin, kmax = _q_abstracts(CASES["decode"], torch.float32)
    Hkv, C = kmin.shape[:2]
    wide = poisoned((Hkv, C + 11), torch.float32)
    kw = dict(landmarks=landmarks) if mode == "landmark" else dict(kmin=kmin, kmax=kmax)
    chunk_scores(q, out=wide[:, :C], **kw)
    kernel_ran("chunk_scores")
    ref = chunk_scores_ref(q, **kw)
    assert_close(wide[:, :C] / ref.abs().max().clamp(min=1), ref / ref.abs().max().clamp(min=1), torch.float32, mode)
    assert wide[:, C:].isnan().all()


def test_landmark_scores_are_softmax_mass(kernel_ran):
    """With G = 1 the scores of a head sum to Tq over the chunks (each query's softmax sums to 1)."""
    Tq, Hkv, D, C = 4, 3, 64, 45
    out = chunk_scores(torch.randn(Tq, Hkv, D, device=DEVICE), torch.randn(Hkv, C, D, device=DEVICE))
    kernel_ran("chunk_scores")
    assert_close(out.sum(1), torch.full((Hkv,), float(Tq)), torch.float32)


def test_minmax_bounds_every_key_of_the_chunk(kernel_ran):
    Tq, Hkv, G, D, C, chunk = 2, 2, 4, 64, 20, 8
    q = torch.randn(Tq, Hkv * G, D, device=DEVICE)
    keys = torch.randn(Hkv, C, chunk, D, device=DEVICE)
    bound = chunk_scores(q, kmin=keys.amin(2), kmax=keys.amax(2))
    kernel_ran("chunk_scores")
    exact = torch.einsum("thgd,hcjd->hgtcj", q.view(Tq, Hkv, G, D), keys).amax((1, 2, 4))   # (Hkv, C)
    assert torch.all(bound >= exact - 1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_minmax_matches_reference_and_still_bounds(dtype, kernel_ran):
    """int8 abstracts with a scale per chunk: the kernel equals the reference on the dequantized values, and the
    bound still holds for every key of the chunk (kmin rounded down, kmax up), within a little of the fp one."""
    Tq, Hkv, G, D, C, chunk = 1, 2, 4, 64, 37, 16
    q = torch.randn(Tq, Hkv * G, D, device=DEVICE).to(dtype)
    keys = (3 * torch.randn(Hkv, C, chunk, D, device=DEVICE)).to(dtype)
    lo, hi, scale = quantize_minmax(keys.amin(2), keys.amax(2))
    assert torch.all(lo.float() * scale[..., None] <= keys.amin(2).float())
    assert torch.all(hi.float() * scale[..., None] >= keys.amax(2).float())
    got = chunk_scores(q, kmin=lo, kmax=hi, scale=scale)
    kernel_ran("chunk_scores")
    want = chunk_scores_ref(q, kmin=lo, kmax=hi, scale=scale)
    assert_close(got, want, dtype)
    exact = torch.einsum("thgd,hcjd->hgtcj", q.float().view(Tq, Hkv, G, D), keys.float()).amax((1, 2, 4))
    fp = chunk_scores_ref(q, kmin=keys.amin(2), kmax=keys.amax(2))
    tol = 0.02 * exact.abs().max().item()   # the dots round in the query's dtype
    assert torch.all(want >= exact - 1e-4) and torch.all(got >= exact - tol)
    assert torch.all(want - fp <= 2 * scale * q.float().abs().sum(-1).view(Tq, Hkv, G).amax((0, 2))[:, None])


def test_rejects_mixed_abstracts():
    q = torch.randn(1, 4, 64, device=DEVICE)
    lm = torch.randn(1, 5, 64, device=DEVICE)
    with pytest.raises(ValueError):
        chunk_scores(q, lm, kmin=lm, kmax=lm)
    with pytest.raises(ValueError):
        chunk_scores(q, kmin=lm)


@pytest.mark.parametrize("keep", [True, False], ids=["scores_in_registers", "scores_in_scratch"])
def test_landmark_launches_in_a_row(keep, monkeypatch, kernel_ran):
    """Launches of several sizes one after another, one query token or several, its raw scores kept in registers
    or in the scratch: each gives the reference, whatever the launches before it left in the published-stats
    words (each publishes into its epoch's parity and zeroes the other for the next)."""
    cs = importlib.import_module("localkv.kernels.chunk_scores")   # the package re-exports a function of that name
    if not keep:
        monkeypatch.setattr(cs, "KEEP_SCORES", 0)
    for Tq, C in [(1, 37), (1, 100), (2, 64), (1, 37), (3, 5), (1, 130), (1, 1)]:
        q = torch.randn(Tq, 8, 64, device=DEVICE)
        lm = torch.randn(2, C, 64, device=DEVICE)
        out = chunk_scores(q, lm, out=poisoned((2, C), torch.float32))
        ref = chunk_scores_ref(q, lm)
        assert_close(out / ref.abs().max(), ref / ref.abs().max(), torch.float32, f"Tq={Tq} C={C}")
    kernel_ran("chunk_scores")


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the wait spans many programs only on a GPU")
def test_landmark_wait_across_launches_and_graph_replays():
    """Thousands of chunks split over many programs per head, which wait for each other's stats: every eager
    launch and every CUDA-graph replay (the words and epochs carry over between them) must give the reference,
    with the scores in registers (one token, 16K chunks) or in the scratch (20K chunks, or four tokens), and
    sizes interleaved so that the programs per head change from launch to launch."""
    Hkv, G, D = 8, 4, 128
    cases = [(1, 16_000), (1, 20_000), (4, 20_000), (1, 3_000), (1, 16_001)]
    inputs = [(torch.randn(Tq, Hkv * G, D, dtype=torch.bfloat16, device="cuda"),
               torch.randn(Hkv, C, D, dtype=torch.bfloat16, device="cuda")) for Tq, C in cases]
    outs = [poisoned((Hkv, lm.shape[1]), torch.float32) for _, lm in inputs]

    def close(out, ref, what):   # probabilities of ~1/C: compared relative to the largest
        top = ref.abs().max()
        assert_close(out / top, ref / top, torch.float32, what)

    for rep in range(3):
        for (q, lm), out in zip(inputs, outs):
            out.fill_(float("nan"))
            close(chunk_scores(q, lm, out=out), chunk_scores_ref(q, lm), f"eager {rep}, C={lm.shape[1]}")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for (q, lm), out in zip(inputs, outs):
            chunk_scores(q, lm, out=out)
    for rep in range(5):
        for (q, _), out in zip(inputs, outs):
            q.copy_(torch.randn_like(q))
            out.fill_(float("nan"))
        graph.replay()
        for (q, lm), out in zip(inputs, outs):
            close(out, chunk_scores_ref(q, lm), f"replay {rep}, C={lm.shape[1]}")
