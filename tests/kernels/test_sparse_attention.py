"""sparse_attention: Triton kernel (split-K + LSE merge) against the torch reference and the model's attention."""

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, assert_close, poisoned

from localkv.kernels import merge_attention, sparse_attention, sparse_attention_ref
from localkv.offload.attention import causal_attention

CHUNK = 8

# (Tq, Hkv, G, D, S dense rows, n_slots, n_sel, split_tokens, causal)
CASES = {
    "normal": (1, 2, 4, 64, 40, 12, 5, None, True),
    "gqa8_d128_chunks_only": (2, 1, 8, 128, None, 10, 6, None, True),
    "mha_dense_only_ragged": (3, 2, 1, 64, 37, None, None, 16, True),
    "tq16_split_mid_chunk": (16, 1, 4, 64, 19, 9, 7, 20, True),
    "non_causal_dense": (4, 2, 4, 64, 21, 4, 3, 16, False),
    "one_chunk": (1, 2, 4, 128, None, 1, 1, None, True),
    "empty_list_with_dense": (2, 2, 4, 64, 13, 4, 0, None, True),
    "dense_shorter_than_tq": (4, 1, 4, 64, 2, 5, 2, None, True),
    "group3_d80": (2, 2, 3, 80, 11, 6, 4, 16, True),
}


def _inputs(case, dtype):
    Tq, Hkv, G, D, S, n_slots, n_sel, split, causal = case
    q = torch.randn(Tq, Hkv * G, D, dtype=dtype, device=DEVICE)
    dense = chunks = (None, None)
    idx = None
    if S is not None:
        dense = tuple(torch.randn(Hkv, S, D, dtype=dtype, device=DEVICE) for _ in range(2))
    if n_slots is not None:
        chunks = tuple(torch.randn(Hkv, n_slots * CHUNK, D, dtype=dtype, device=DEVICE) for _ in range(2))
        idx = torch.stack([torch.randperm(n_slots, device=DEVICE)[:n_sel] for _ in range(Hkv)]).to(torch.int32)
    return q, dense, chunks, idx, dict(chunk_tokens=CHUNK, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, dtype, kernel_ran):
    case = CASES[name]
    q, (kd, vd), (kc, vc), idx, kw = _inputs(case, dtype)
    Tq, Hq, D = q.shape
    out, lse = poisoned((Tq, Hq, D), dtype), poisoned((Tq, Hq), torch.float32)
    got_out, got_lse = sparse_attention(q, kd, vd, kc, vc, idx, split_tokens=case[7], out=out, lse_out=lse, **kw)
    kernel_ran("sparse_attention")
    assert got_out is out and got_lse is lse
    ref_out, ref_lse = sparse_attention_ref(q, kd, vd, kc, vc, idx, **kw)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, torch.float32 if dtype == torch.float32 else torch.float16, "lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_list_alone_gives_minus_inf(dtype, kernel_ran):
    q = torch.randn(3, 8, 64, dtype=dtype, device=DEVICE)
    kc = torch.randn(2, 4 * CHUNK, 64, dtype=dtype, device=DEVICE)
    idx = torch.empty(2, 0, dtype=torch.int32, device=DEVICE)
    out, lse = poisoned((3, 8, 64), dtype), poisoned((3, 8), torch.float32)
    sparse_attention(q, None, None, kc, kc, idx, out=out, lse_out=lse)
    kernel_ran("sparse_attention")
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_dense_causal_rule_matches_model_attention(kernel_ran):
    """The dense segment ending with the queries is the model's causal attention with q_start = S - Tq."""
    Tq, Hkv, G, D, S = 5, 2, 4, 64, 29
    q = torch.randn(Tq, Hkv * G, D, device=DEVICE)
    k, v = torch.randn(Hkv, S, D, device=DEVICE), torch.randn(Hkv, S, D, device=DEVICE)
    out, _ = sparse_attention(q, k, v, split_tokens=16)
    kernel_ran("sparse_attention")
    assert_close(out, causal_attention(q, k, v, q_start=S - Tq), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parts_merge_to_whole(dtype, kernel_ran):
    """Attention over dense + chunks == LSE merge of attention over each part alone."""
    q, (kd, vd), (kc, vc), idx, kw = _inputs(CASES["normal"], dtype)
    whole_out, whole_lse = sparse_attention(q, kd, vd, kc, vc, idx, **kw)
    a = sparse_attention(q, kd, vd, **kw)
    b = sparse_attention(q, None, None, kc, vc, idx, **kw)
    merged_out, merged_lse = merge_attention([a[0].float(), b[0].float()], [a[1], b[1]])
    kernel_ran("merge_attention")
    assert_close(merged_out, whole_out.float(), dtype, "out")
    assert_close(merged_lse, whole_lse, torch.float32, "lse")


def test_rejects_bad_shapes():
    q = torch.randn(1, 6, 64, device=DEVICE)
    k = torch.randn(4, 8, 64, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        sparse_attention(q, k, k)
    with pytest.raises(ValueError, match="dtype"):
        sparse_attention(q, k[:2].half(), k[:2].half())
    with pytest.raises(ValueError, match="together"):
        sparse_attention(q, None, None, k[:2], k[:2], None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("filled", [1, 23, 64])
def test_dense_len_reads_only_the_filled_rows(filled, dtype, kernel_ran):
    """A graphed decode passes a fixed buffer and its filled length on the device: rows past it (poisoned
    here) are never read, and the result equals attention over the filled rows alone."""
    Tq, Hkv, G, D, S = 1, 2, 4, 64, 64
    q = torch.randn(Tq, Hkv * G, D, dtype=dtype, device=DEVICE)
    k, v = (torch.randn(Hkv, S, D, dtype=dtype, device=DEVICE) for _ in range(2))
    k[:, filled:], v[:, filled:] = float("nan"), float("nan")
    n = torch.tensor([filled], dtype=torch.int32, device=DEVICE)
    out, lse = sparse_attention(q, k, v, causal=True, dense_len=n, split_tokens=16)
    kernel_ran("sparse_attention")
    want, want_lse = sparse_attention_ref(q, k[:, :filled], v[:, :filled], causal=True)
    assert_close(out, want, dtype, "out")
    assert_close(lse, want_lse, torch.float32, "lse")
