"""topk_ids: the k largest scores' ids per row, ascending, ties to the lowest id, against a stable sort."""

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
