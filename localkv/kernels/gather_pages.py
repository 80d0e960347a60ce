"""Gather chunks of a paged KV pool whose pages are spread over several buffers (segments), in one launch.

The tiered store keeps a layer's pages in arenas: tensors of device memory, of pinned CPU memory, and the open
page. Seen as chunk buffers ``(Hkv, rows, D)`` (each head's tokens contiguous, the same head stride in every
one), an arena is a *segment*. Chunk c (tokens ``c*C ..``) sits in page ``p = c*C // P`` at token offset
``c*C % P``; the page table says which segment holds page p (``seg_of[p]``, -1: on disk) and the number of
its first chunk there (``base[p]``). So the chunk is run ``base[p] + (c*C % P) // C`` of segment ``seg_of[p]``.

`gather_pinned` moves the chunks of one segment per launch; a ShadowKV step spans a handful of segments a
layer, so it took that many launches and the torch ops that worked out each chunk's segment and run. Here
one launch does all of it: the segments' base addresses sit in a device table (``segment_addresses``), and
each program reads its chunks from wherever they are, pinned host memory through the GPU's mapping of it
(zero-copy, as `gather_pinned`). Entries whose slot ``dst`` is negative, or whose page is on disk, move
nothing; the counts of moved entries per tier (``kind[s]`` of each segment, disk: 2) can be added to
``moved`` in the same launch.
"""

from __future__ import annotations

import torch

from ._common import KERNEL_CALLS, check, next_pow2, tl, triton, use_triton
from .gather_pinned import _words, gather_pinned_ref

DISK_KIND = 2  # the ``moved`` row of entries whose page is on disk (seg_of = -1)


@triton.jit
def _gather_pages_kernel(
    addr_ptr,                       # (n_seg,) int64: each segment's first word, as an address
    seg_ptr, base_ptr,              # (pages,) int64 page table: segment (-1: disk), first chunk's run there
    kind_ptr, moved_ptr,            # (n_seg,) int64 tier of each segment; (3,) int64 counters (COUNT)
    chunk_ptr, stride_ch,           # (Hkv, n_sel) int64 chunk ids
    dst_ptr, stride_dh,             # (Hkv, n_sel) int64 destination slots, -1: skip
    out_ptr, stride_oh,             # (Hkv, n_slots*CHUNK_ELEMS) words on the device
    n_sel, head_words, page_tokens, chunk_tokens,
    CHUNK_ELEMS: tl.constexpr, BLOCK_E: tl.constexpr, CHUNKS_PER_PROG: tl.constexpr, COUNT: tl.constexpr,
    DISK: tl.constexpr,             # the ``moved`` row of disk pages
):
    h = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * CHUNKS_PER_PROG + tl.arange(0, CHUNKS_PER_PROG)
    wanted = offs_c < n_sel
    d = tl.load(dst_ptr + h * stride_dh + offs_c, mask=wanted, other=-1)
    wanted = wanted & (d >= 0)
    tok = tl.load(chunk_ptr + h * stride_ch + offs_c, mask=wanted, other=0) * chunk_tokens
    page = tok // page_tokens
    seg = tl.load(seg_ptr + page, mask=wanted, other=-1)
    run = tl.load(base_ptr + page, mask=wanted, other=0) + (tok % page_tokens) // chunk_tokens
    move = wanted & (seg >= 0)
    if COUNT:
        kind = tl.where(seg >= 0, tl.load(kind_ptr + seg, mask=move, other=DISK), DISK)
        for t in tl.static_range(3):
            n = tl.sum((wanted & (kind == t)).to(tl.int64), 0)
            if n > 0:
                tl.atomic_add(moved_ptr + t, n)
    # Each entry's source: its segment's address, as a pointer to words, then the head and the run.
    src = tl.load(addr_ptr + seg, mask=move, other=0).to(tl.pointer_type(out_ptr.dtype.element_ty))
    offs_e = tl.arange(0, BLOCK_E)
    mask = move[:, None] & (offs_e < CHUNK_ELEMS)[None, :]
    x = tl.load(src[:, None] + h * head_words + run[:, None] * CHUNK_ELEMS + offs_e[None, :], mask=mask)
    tl.store(out_ptr + h * stride_oh + d[:, None] * CHUNK_ELEMS + offs_e[None, :], x, mask=mask)


def segment_addresses(views: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The device table of the segments' addresses that `gather_pages` reads (build it once per layout)."""
    return torch.tensor([v.data_ptr() for v in views], dtype=torch.int64).to(device)


def gather_pages_ref(views, seg_of, base, chunks, dst, out, *, chunk_tokens, page_tokens, kind=None, moved=None):
    """Torch version of `gather_pages`: the chunk's segment and run worked out with torch ops, then one
    `gather_pinned_ref` per segment."""
    tok = chunks * chunk_tokens
    page = tok // page_tokens
    seg = seg_of[page]
    run = base[page] + (tok % page_tokens) // chunk_tokens
    for s, view in enumerate(views):
        gather_pinned_ref(view, run, out, dst=dst, chunk_tokens=chunk_tokens, only=(seg, s))
    if moved is not None:
        kinds = torch.cat([kind[:len(views)], torch.tensor([DISK_KIND], device=kind.device)])
        moved.index_add_(0, kinds[seg].flatten(), (dst >= 0).flatten().long())   # seg -1: the disk row
    return out


def gather_pages(views, seg_of, base, chunks, dst, out, *, chunk_tokens, page_tokens, addr=None, kind=None,
                 moved=None):
    """Copy chunks of a paged pool, wherever their pages are, into slots of a device buffer, in one launch.

    Args:
        views: the segments, each (Hkv, rows, D) with ``view[h]`` contiguous and one head stride for all; on
            the device or in pinned CPU memory.
        seg_of, base: (pages,) int64 page table on the device: each page's segment (-1: on disk, not moved)
            and its first chunk's run number in that segment.
        chunks: (Hkv, n_sel) int64 chunk ids; dst: (Hkv, n_sel) int64 slots in ``out``, -1 skips the entry.
        out: (Hkv, n_slots*chunk_tokens, D) on the device, the views' dtype.
        addr: `segment_addresses(views)`, made once per layout (needed inside a CUDA graph capture).
        kind, moved: optional (n_seg,) int64 tier of each segment and (3,) int64 counters: the entries that
            move (disk ones too, which are left to the caller) are counted per tier.

    Returns:
        ``out``.
    """
    check(len(views) > 0 and all(v.dim() == 3 and v.shape[0] == out.shape[0] and v.shape[2] == out.shape[2]
                                 and v.dtype == out.dtype for v in views), "views: (Hkv, rows, D) of out's dtype")
    check(len({v.stride() for v in views}) == 1 and views[0].stride(1) == out.shape[2] and views[0].stride(2) == 1,
          "views must share one layout, each head's tokens contiguous")
    check(chunks.shape == dst.shape and chunks.dim() == 2 and chunks.shape[0] == out.shape[0], "chunks, dst: (Hkv, n)")
    check((kind is None) == (moved is None), "give kind and moved together")
    if not use_triton(chunks, dst, out, seg_of, host=tuple(views)):
        return gather_pages_ref(views, seg_of, base, chunks, dst, out, chunk_tokens=chunk_tokens,
                                page_tokens=page_tokens, kind=kind, moved=moved)
    Hkv, n_sel = chunks.shape
    if n_sel == 0:
        return out
    D = out.shape[2]
    check(out.stride(2) == 1 and out.stride(1) == D, "out[h] must be contiguous")
    elems = chunk_tokens * D
    as_words = [_words(t, elems)[0] for t in (out, *views)]   # 4-byte words where every buffer allows them
    out_w = as_words[0] if len({t.dtype for t in as_words}) == 1 else out
    ratio = out.element_size() / out_w.element_size()    # elements -> words
    if addr is None:
        addr = segment_addresses(views, out.device)
    check(addr.shape == (len(views),), "addr: one address per view")
    KERNEL_CALLS["gather_pages"] += 1
    per_prog = 4
    _gather_pages_kernel[(Hkv, triton.cdiv(n_sel, per_prog))](
        addr, seg_of, base, kind if kind is not None else seg_of, moved if moved is not None else seg_of,
        chunks, chunks.stride(0), dst, dst.stride(0), out_w, out_w.stride(0), n_sel,
        int(views[0].stride(0) * ratio), page_tokens, chunk_tokens,
        CHUNK_ELEMS=int(elems * ratio), BLOCK_E=next_pow2(int(elems * ratio)), CHUNKS_PER_PROG=per_prog,
        COUNT=moved is not None, DISK=DISK_KIND, num_warps=4)
    return out
