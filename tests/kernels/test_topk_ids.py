"""topk_ids: the k largest scores' ids per row, ascending, ties to the lowest id, against a stable sort."""

import importlib

import pytest
import torch
from kernel_testing import DEVICE, poisoned

from localkv.kernels import topk_ids, topk_ids_ref

# (R, N, k): one block and several (the interpreter's blocks are 256 scores), k at the ends
CASES = {"decode": (8, 200, 26), "one": (3, 37, 1), "all": (2, 50, 50), "blocks": (3, 700, 90),
         "blocks_k1": (2, 600, 1), "empty_k": (2, 40, 0)}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, kernel_ran):
    R, N, k = CASES[name]
    scores = torch.randn(R, N, device=DEVICE)
    scores[:, torch.randperm(N)[:N // 5]] = float("-inf")      # excluded chunks
    out = poisoned((R, k), torch.long)
    assert topk_ids(scores, k, out=out) is out
    if k:
        kernel_ran("topk_ids")
    torch.testing.assert_close(out, topk_ids_ref(scores, k))


@pytest.mark.parametrize("name", ["decode", "blocks", "one"])
def test_exclusion_mask_reads_as_minus_inf(name, kernel_ran):
    """An exclusion mask (a column slice of a wider one, as the index keeps it) scores its entries -inf: the
    same ids as masking the scores first, and with k up to the entries left, no excluded id is taken."""
    R, N, k = CASES[name]
    scores = torch.randn(R, N, device=DEVICE)
    excluded = (torch.rand(R, N + 9, device=DEVICE) < 0.3)[:, :N]
    k = min(k, int((~excluded).sum(1).min()))
    out = topk_ids(scores, k, excluded=excluded)
    kernel_ran("topk_ids")
    torch.testing.assert_close(out, topk_ids_ref(scores.masked_fill(excluded, float("-inf")), k))
    torch.testing.assert_close(out, topk_ids_ref(scores, k, excluded))
    assert not excluded.gather(1, out).any()


@pytest.mark.parametrize("N", [300, 1000])
def test_ties_go_to_the_lowest_ids(N, kernel_ran):
    """Scores from a handful of values (negative, zero, positive, -inf): most of the k sit in ties."""
    values = torch.tensor([-2.5, -0.0, 0.0, 1.0, 3.0, float("-inf")], device=DEVICE)
    scores = values[torch.randint(0, len(values), (4, N), device=DEVICE)]
    for k in (1, N // 3, N - 1):
        out = topk_ids(scores, k)
        kernel_ran("topk_ids")
        torch.testing.assert_close(out, topk_ids_ref(scores, k))
        chosen = scores.gather(1, out)
        assert torch.all(out.diff(dim=1) > 0)                          # ascending, distinct
        assert torch.all(chosen.min(1).values >= scores.topk(k, dim=1).values[:, -1])


def test_rejects_k_past_the_row():
    with pytest.raises(ValueError):
        topk_ids(torch.zeros(2, 5, device=DEVICE), 6)


# The bisection's risks: ties at T across byte boundaries of the keys, keys equal in their high bits (every
# step decides), every sign and special value, rows of several blocks. Keys are made from float bit patterns.
topk_module = importlib.import_module("localkv.kernels.topk_ids")   # the package re-exports the function


def _check(scores: torch.Tensor, k: int) -> None:
    """Through a poisoned buffer, against the reference."""
    out = poisoned((scores.shape[0], k), torch.long)
    topk_ids(scores, k, out=out)
    torch.testing.assert_close(out, topk_ids_ref(scores, k))


def _near_boundaries(R: int, N: int) -> torch.Tensor:
    """Scores one ulp step, a digit and a carry apart: a random base pattern plus offsets straddling the
    byte boundaries (255 | 256, 65535 | 65536, ...), each repeated so ties fall on either side of T; some
    rows negated (the magnitude order flips) and a few excluded (-inf)."""
    offsets = torch.tensor([0, 1, 2, 255, 256, 257, 511, 65535, 65536, 65537, 2**24 - 1, 2**24, 2**24 + 1,
                            2**24 + 256, 2**25 - 1])
    base = int(torch.randint(0x00800000, 0x7C000000, ()))       # a normal float; + 2**25 stays below inf
    bits = base + offsets[torch.randint(0, len(offsets), (R, N))]
    scores = bits.to(torch.int32).view(torch.float32)
    scores[::2] = -scores[::2]
    scores[torch.rand(R, N) < 0.05] = float("-inf")
    return scores.to(DEVICE)


def _low_bits_only(R: int, N: int) -> torch.Tensor:
    """Scores sharing their top three bytes: only the last byte decides, with many repeats."""
    base = int(torch.randint(0x00800000, 0x7C000000, ())) & ~0xFF
    bits = base + torch.randint(0, 256, (R, N)) // 4 * 4
    scores = bits.to(torch.int32).view(torch.float32)
    scores[1::2] = -scores[1::2]
    return scores.to(DEVICE)


def _specials(R: int, N: int) -> torch.Tensor:
    """-inf, the extremes of both signs, denormals, -0.0 and 0.0 (which tie) and plain values."""
    values = torch.tensor([float("-inf"), -3.0e38, -1.5, -1e-40, -0.0, 0.0, 1e-45, 1e-40, 0.75, 2.0, 3.0e38])
    return values[torch.randint(0, len(values), (R, N))].to(DEVICE)


def _ks(N: int) -> list[int]:
    """The ends, and two random k."""
    return sorted({1, N, *torch.randint(1, N + 1, (2,)).tolist()})


@pytest.mark.parametrize("make", [_near_boundaries, _low_bits_only, _specials])
@pytest.mark.parametrize("N", [77, 300])
def test_digit_boundaries_and_special_values(make, N, kernel_ran):
    scores = make(3, N)
    for k in _ks(N):
        _check(scores, k)
    kernel_ran("topk_ids")


@pytest.mark.parametrize("N", [1, 5, 600])
def test_all_equal_rows(N, kernel_ran):
    """One value per row (a tie of the whole row at T, whatever k): the lowest ids win."""
    values = torch.tensor([float("-inf"), -2.0, -0.0, 0.0, 1e-40, 7.5])
    scores = values[torch.randperm(len(values))[:3]].repeat_interleave(N).view(3, N).to(DEVICE)
    for k in _ks(N):
        out = topk_ids(scores, k)
        torch.testing.assert_close(out, torch.arange(k, device=DEVICE).expand(3, k))
    kernel_ran("topk_ids")


def test_multi_block_rows(monkeypatch, kernel_ran):
    """Rows of several blocks, also on a GPU (whose blocks are otherwise MAX_BLOCK scores): counts summed
    over blocks, ties at T spread over blocks, a last block of one score."""
    monkeypatch.setattr(topk_module, "MAX_BLOCK", 256)
    N = 769
    values = torch.randn(5, device=DEVICE)
    scores = torch.where(torch.rand(4, N, device=DEVICE) < 0.5, torch.randn(4, N, device=DEVICE),
                         values[torch.randint(0, 5, (4, N), device=DEVICE)])
    scores[1] = _near_boundaries(1, N)[0]
    scores[2] = _low_bits_only(1, N)[0]
    for k in _ks(N):
        _check(scores, k)
    kernel_ran("topk_ids")



@pytest.mark.parametrize("N,temperature", [(200, 1.0), (1000, 4.0)])
def test_landmark_like_scores(N, temperature, kernel_ran):
    """Rows shaped like a decode step's: the max over a GQA group of softmax probabilities (a long tail of
    small positive scores, a few large), with the sink's chunks excluded. The search stops early here, at
    whichever end of its bracket T is; both ends and every k must give the reference's ids (one block, and
    several: the interpreter's blocks are 256 scores)."""
    R, G, D = 4, 4, 32
    logits = temperature * torch.randn(R, G, D, device=DEVICE) @ torch.randn(R, D, N, device=DEVICE) / D ** 0.5
    scores = torch.softmax(logits, -1).amax(1)
    excluded = torch.zeros(R, N, dtype=torch.bool, device=DEVICE)
    excluded[:, :2] = True
    for k in (1, 16, int(torch.randint(17, N - 2, ())), N - 2):
        out = poisoned((R, k), torch.long)
        topk_ids(scores, k, out=out, excluded=excluded)
        torch.testing.assert_close(out, topk_ids_ref(scores, k, excluded))
    kernel_ran("topk_ids")


@pytest.mark.parametrize("N,pad", [(200, 8), (37, 11), (700, 12)])
def test_padding_past_valid_is_never_taken(N, pad, kernel_ran):
    """Rows padded past ``valid`` (as a decode step aligns them) with scores that would win, NaN and +inf among
    them, and a mask whose padding columns say nothing: the ids are the reference's over the valid columns."""
    R = 3
    scores = torch.randn(R, N + pad, device=DEVICE)
    scores[:, N:] = torch.tensor([float("nan"), float("inf"), 1e30, 5.0], device=DEVICE)[torch.arange(pad) % 4]
    excluded = torch.rand(R, N + pad, device=DEVICE) < 0.2
    excluded[:, N:] = False
    for k in (1, N // 2, int((~excluded[:, :N]).sum(1).min())):
        out = poisoned((R, k), torch.long)
        topk_ids(scores, k, out=out, excluded=excluded, valid=N)
        torch.testing.assert_close(out, topk_ids_ref(scores[:, :N], k, excluded[:, :N]))
    kernel_ran("topk_ids")
