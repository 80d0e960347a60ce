"""gather_pages: chunks of a paged pool spread over device and pinned host segments, in one launch, against
one reference gather per segment; the per-tier counts of moved entries too."""

import pytest
import torch
from kernel_testing import DEVICE, pinned_if_cuda, poisoned

from localkv.kernels import gather_pages, gather_pages_ref


def _segments(n_seg, Hkv, rows, D, dtype):
    """Segments as the store's arenas are seen: (Hkv, rows, D) views with one head stride, every other one
    pinned host memory (the rest on the device)."""
    out = []
    for s in range(n_seg):
        x = (torch.randn(Hkv, rows, D) * 40).to(dtype if dtype.is_floating_point else torch.int16).to(dtype)
        out.append(pinned_if_cuda(x) if s % 2 else x.to(DEVICE))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8], ids=str)
@pytest.mark.parametrize("C,P,D", [(8, 32, 64), (4, 16, 6)])
def test_matches_reference(C, P, D, dtype, kernel_ran):
    Hkv, n_seg, pages_per_seg, n_sel, n_slots = 2, 3, 3, 9, 12
    rows = pages_per_seg * P
    views = _segments(n_seg, Hkv, rows, D, dtype)
    n_pages = n_seg * pages_per_seg + 1
    where = torch.randperm(n_seg * pages_per_seg)                       # page -> a page slot of some segment
    seg_of = torch.cat([where // pages_per_seg, torch.tensor([-1])])    # the last page is on disk
    base = torch.cat([(where % pages_per_seg) * (P // C), torch.tensor([0])])
    seg_of, base = seg_of.to(DEVICE), base.to(DEVICE)
    chunks = torch.stack([torch.randperm(n_pages * P // C)[:n_sel] for _ in range(Hkv)]).to(DEVICE)
    dst = torch.stack([torch.randperm(n_slots)[:n_sel] for _ in range(Hkv)]).to(DEVICE)
    dst[0, torch.randint(0, n_sel, (2,))] = -1                          # skipped entries (hits)
    kind = torch.tensor([0, 1, 0], device=DEVICE)
    out, ref = poisoned((Hkv, n_slots * C, D), dtype), poisoned((Hkv, n_slots * C, D), dtype)
    moved, ref_moved = (torch.zeros(3, dtype=torch.long, device=DEVICE) for _ in range(2))
    kw = dict(chunk_tokens=C, page_tokens=P, kind=kind)
    assert gather_pages(views, seg_of, base, chunks, dst, out, moved=moved, **kw) is out
    kernel_ran("gather_pages")
    gather_pages_ref(views, seg_of, base, chunks, dst, ref, moved=ref_moved, **kw)
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))  # bit-exact; unwritten slots still poisoned
    torch.testing.assert_close(moved, ref_moved)
    assert int(moved.sum()) == int((dst >= 0).sum())
    # Spot check against the pages themselves: entry (h, j) holds its chunk's run of its segment.
    for h in range(Hkv):
        for j in range(n_sel):
            c, d = int(chunks[h, j]), int(dst[h, j])
            s, p = int(seg_of[c * C // P]), c * C // P
            if d < 0 or s < 0:
                continue
            run = int(base[p]) + (c * C % P) // C
            want = views[s][h, run * C:(run + 1) * C].to(DEVICE)
            assert torch.equal(out[h, d * C:(d + 1) * C].view(torch.uint8), want.view(torch.uint8))


def test_rejects_views_of_other_layouts():
    a, b = torch.randn(2, 64, 8), torch.randn(2, 32, 8)
    idx = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="layout"):
        gather_pages([a, b], torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), idx, idx,
                     torch.empty(2, 8, 8), chunk_tokens=8, page_tokens=32)
