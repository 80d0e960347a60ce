"""merge_attention: Triton kernel against the torch reference and against attention over the union."""

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, assert_close, poisoned

from localkv.kernels import merge_attention, merge_attention_ref, merge_into, merge_into_ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("P,Tq,Hq,D", [(1, 1, 8, 64), (3, 4, 32, 128), (5, 16, 4, 80), (20, 2, 8, 64)])
def test_matches_reference(P, Tq, Hq, D, dtype, kernel_ran):
    outs = torch.randn(P, Tq, Hq, D, dtype=dtype, device=DEVICE)
    lses = torch.randn(P, Tq, Hq, device=DEVICE) * 5
    lses[0, 0, 0] = float("-inf")              # one empty part in one row...
    outs[0, 0, 0] = float("nan")               # ...whose out is garbage and must be ignored
    out, lse = poisoned((Tq, Hq, D), dtype), poisoned((Tq, Hq), torch.float32)
    merge_attention(outs, lses, out=out, lse_out=lse)
    kernel_ran("merge_attention")
    ref_out, ref_lse = merge_attention_ref(outs, lses)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, torch.float32, "lse")


def test_all_empty_rows_give_zero_and_minus_inf(kernel_ran):
    outs = [torch.randn(2, 4, 64, device=DEVICE) for _ in range(3)]
    lses = [torch.full((2, 4), float("-inf"), device=DEVICE) for _ in range(3)]
    lses[1][1] = 0.5                            # row (token 1) has one non-empty part
    out, lse = merge_attention(outs, lses)
    kernel_ran("merge_attention")
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    assert_close(out[1], outs[1][1], torch.float32)
    assert_close(lse[1], lses[1][1], torch.float32)


def test_equals_softmax_over_union(kernel_ran):
    """Partials of disjoint key sets merge to the attention over all keys."""
    Tq, H, D, L = 3, 4, 64, 50
    q = torch.randn(Tq, H, D, device=DEVICE)
    k, v = torch.randn(H, L, D, device=DEVICE), torch.randn(H, L, D, device=DEVICE)
    s = torch.einsum("thd,hld->thl", q, k) / D ** 0.5
    parts = [(0, 7), (7, 30), (30, 50)]
    outs = [torch.einsum("thl,hld->thd", torch.softmax(s[..., a:b], -1), v[:, a:b]) for a, b in parts]
    lses = [torch.logsumexp(s[..., a:b], -1) for a, b in parts]
    out, lse = merge_attention(outs, lses)
    kernel_ran("merge_attention")
    assert_close(out, torch.einsum("thl,hld->thd", torch.softmax(s, -1), v), torch.float32)
    assert_close(lse, torch.logsumexp(s, -1), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R,D", [(1, 64), (37, 128), (100, 80)])
def test_merge_into_matches_reference(R, D, dtype, kernel_ran):
    acc, acc_lse = torch.randn(R, D, device=DEVICE), torch.randn(R, device=DEVICE) * 5
    part, lse = torch.randn(R, D, dtype=dtype, device=DEVICE), torch.randn(R, device=DEVICE) * 5
    acc_lse[0] = float("-inf")                 # nothing accumulated yet in row 0: its acc is garbage
    acc[0] = float("nan")
    if R > 2:
        lse[1] = float("-inf")                 # an empty partial in row 1...
        part[1] = float("nan")                 # ...whose values must be ignored
        acc_lse[2], lse[2] = float("-inf"), float("-inf")   # row 2 has nothing at all
    want, want_lse = acc.clone(), acc_lse.clone()
    merge_into_ref(want, want_lse, part, lse)
    merge_into(acc, acc_lse, part, lse)
    kernel_ran("merge_into")
    assert_close(acc, want, torch.float32 if dtype == torch.float32 else dtype, "acc")
    assert_close(acc_lse[acc_lse.isfinite()], want_lse[want_lse.isfinite()], torch.float32, "lse")
    assert torch.equal(acc_lse.isinf(), want_lse.isinf())
    if R > 2:
        assert torch.all(acc[2] == 0)


def test_merge_into_folds_to_attention_over_union(kernel_ran):
    T, H, D, L = 5, 4, 64, 60
    q = torch.randn(T, H, D, device=DEVICE)
    k, v = torch.randn(H, L, D, device=DEVICE), torch.randn(H, L, D, device=DEVICE)
    s = torch.einsum("thd,hld->thl", q, k) * D ** -0.5
    want = torch.einsum("thl,hld->thd", torch.softmax(s, -1), v).reshape(T * H, D)
    acc = torch.zeros(T * H, D, device=DEVICE)
    acc_lse = torch.full((T * H,), float("-inf"), device=DEVICE)
    for part in (slice(0, 7), slice(7, 31), slice(31, L)):
        sp = s[..., part]
        lse = torch.logsumexp(sp, -1)
        out = torch.einsum("thl,hld->thd", torch.exp(sp - lse[..., None]), v[:, part])
        merge_into(acc, acc_lse, out.reshape(T * H, D), lse.reshape(T * H))
    kernel_ran("merge_into")
    assert_close(acc, want, torch.float32, "out")
    assert_close(acc_lse, torch.logsumexp(s, -1).reshape(T * H), torch.float32, "lse")
