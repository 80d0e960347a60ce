"""gather_pinned: chunks gathered from a (pinned) host pool by the GPU, against index_select + copy."""

import pytest
import torch
from kernel_testing import DEVICE, poisoned, pinned_if_cuda

from localkv.kernels import gather_pinned, gather_pinned_ref

# (Hkv, pool chunks N, chunk tokens, D, n_sel, destination slots or None)
CASES = {
    "normal": (2, 20, 8, 64, 7, None),
    "d128_many": (2, 40, 8, 128, 33, None),
    "one_chunk": (1, 3, 8, 64, 1, None),
    "chunk16_dst_slots": (3, 12, 16, 64, 5, 9),
    "odd_d": (2, 10, 8, 6, 4, None),
}


def _pool(shape, dtype):
    x = torch.randn(shape) * 40
    return pinned_if_cuda(x.to(dtype) if dtype.is_floating_point else x.to(torch.int16).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, dtype, kernel_ran):
    Hkv, N, chunk, D, n_sel, n_slots = CASES[name]
    src = _pool((Hkv, N * chunk, D), dtype)
    idx = torch.stack([torch.randperm(N)[:n_sel] for _ in range(Hkv)]).to(torch.int32).to(DEVICE)
    dst = None
    if n_slots is not None:
        dst = torch.stack([torch.randperm(n_slots)[:n_sel] for _ in range(Hkv)]).to(DEVICE)
    rows = (n_slots or n_sel) * chunk
    out, ref = poisoned((Hkv, rows, D), dtype), poisoned((Hkv, rows, D), dtype)
    assert gather_pinned(src, idx, out, dst=dst, chunk_tokens=chunk) is out
    kernel_ran("gather_pinned")
    gather_pinned_ref(src, idx, ref, dst=dst, chunk_tokens=chunk)
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))   # bit-exact, untouched slots still poisoned
    pool = src.view(Hkv, N, chunk * D).to(DEVICE)
    slots = out.view(Hkv, -1, chunk * D)
    for h in range(Hkv):
        where = dst[h].long() if dst is not None else torch.arange(n_sel, device=DEVICE)
        assert torch.equal(slots[h, where].view(torch.uint8), pool[h, idx[h].long()].view(torch.uint8))


def test_empty_list_writes_nothing(kernel_ran):
    src = _pool((2, 32, 64), torch.float32)
    out = poisoned((2, 16, 64), torch.float32)
    gather_pinned(src, torch.empty(2, 0, dtype=torch.int32, device=DEVICE), out)
    assert torch.isnan(out).all()


def test_rejects_non_contiguous_heads():
    src = torch.randn(2, 64, 32).transpose(1, 2)
    with pytest.raises(ValueError, match="contiguous"):
        gather_pinned(src, torch.zeros(2, 1, dtype=torch.int32), torch.empty(2, 8, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("by", ["dst", "only"])
def test_negative_slots_are_skipped(dtype, by, kernel_ran):
    """dst < 0, or (with ``only=(seg, s)``) seg != s, masks an entry out (its id may be anything): only the
    others move."""
    Hkv, N, chunk, D, n_sel, n_slots = 2, 16, 8, 64, 9, 12
    src = _pool((Hkv, N * chunk, D), dtype)
    idx = torch.randint(0, N, (Hkv, n_sel), device=DEVICE)
    dst = torch.stack([torch.randperm(n_slots)[:n_sel] for _ in range(Hkv)]).to(DEVICE)
    skip = torch.rand(Hkv, n_sel, device=DEVICE) < 0.5
    only = None
    if by == "only":   # seg: 3 where the entry moves, anything else where it does not
        seg = torch.where(skip, torch.randint(-1, 3, (Hkv, n_sel), device=DEVICE), 3)
        only = (seg, 3)
    dst_in = dst if by == "only" else torch.where(skip, -1, dst)
    dst = torch.where(skip, -1, dst)
    idx = torch.where(skip, 10 ** 9, idx)                      # out of range: must not be read
    out, ref = poisoned((Hkv, n_slots * chunk, D), dtype), poisoned((Hkv, n_slots * chunk, D), dtype)
    gather_pinned(src, idx, out, dst=dst_in, chunk_tokens=chunk, only=only)
    kernel_ran("gather_pinned")
    gather_pinned_ref(src, idx, ref, dst=dst_in, chunk_tokens=chunk, only=only)
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))
    pool, slots = src.view(Hkv, N, chunk * D).to(DEVICE), out.view(Hkv, n_slots, chunk * D)
    for h in range(Hkv):
        keep = dst[h] >= 0
        assert torch.equal(slots[h, dst[h][keep]], pool[h, idx[h][keep]])
        written = torch.zeros(n_slots, dtype=torch.bool, device=DEVICE)
        written[dst[h][keep]] = True
        assert torch.isnan(slots[h, ~written].float()).all()
