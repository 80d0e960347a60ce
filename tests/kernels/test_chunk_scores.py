"""chunk_scores: landmark (softmax mass) and min/max (upper bound) chunk scores with the GQA group max."""

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, assert_close, poisoned

from localkv.kernels import chunk_scores, chunk_scores_ref

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


def test_rejects_mixed_abstracts():
    q = torch.randn(1, 4, 64, device=DEVICE)
    lm = torch.randn(1, 5, 64, device=DEVICE)
    with pytest.raises(ValueError):
        chunk_scores(q, lm, kmin=lm, kmax=lm)
    with pytest.raises(ValueError):
        chunk_scores(q, kmin=lm)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the per-head barrier spans many programs only on a GPU")
def test_landmark_barrier_across_launches_and_graph_replays():
    """Thousands of chunks split over many programs per head meet at the per-head barrier: every eager launch
    and every CUDA-graph replay (the counters carry over between them) must give the reference."""
    Hkv, G, D, C = 8, 4, 128, 20_000
    q = torch.randn(1, Hkv * G, D, dtype=torch.bfloat16, device="cuda")
    lm = torch.randn(Hkv, C, D, dtype=torch.bfloat16, device="cuda")
    ref = chunk_scores_ref(q, lm)
    out = poisoned((Hkv, C), torch.float32)

    def close(out, ref, what):   # probabilities of ~1/C: compared relative to the largest
        top = ref.abs().max()
        assert_close(out / top, ref / top, torch.float32, what)

    for _ in range(3):
        out.fill_(float("nan"))
        close(chunk_scores(q, lm, out=out), ref, "eager")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chunk_scores(q, lm, out=out)
    for _ in range(5):
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        close(out, chunk_scores_ref(q, lm), "replay")
