"""Gather selected chunks from a pinned host pool straight into a GPU buffer (zero-copy over PCIe).

The pool ``src (Hkv, N*chunk, D)`` lives in pinned CPU memory with each head's tokens contiguous, so a chunk
is one contiguous run of ``chunk*D`` elements. Given ``idx (Hkv, n_sel)`` the kernel, running on the GPU,
reads those runs through the host pointer (Triton accepts a pinned CPU tensor as a pointer argument on
CUDA; measured 91% of a contiguous pinned copy, research/ceilings.md) and writes them to
``out[h, dst[h, j]*chunk ...]`` with ``dst`` the destination slots (default ``j``: the chunks in list order);
an entry whose ``dst`` is negative is skipped, so a fixed-size list can carry a device-side mask (ShadowKV
fetches only the misses of its selection, and one tier's chunks per launch, without reading a count back).
No CPU gather, no staging buffer. Any dtype (int8/uint8 quantized pools too): rows are moved as 4-byte
words when the chunk allows. On the CPU interpreter both tensors are simply on the CPU.

The reference (and the path for a non-pinned host pool) gathers on the CPU with index_select into a pinned
staging buffer, then copies it to the device.
"""

from __future__ import annotations

import torch

from ._common import KERNEL_CALLS, check, interpreting, next_pow2, tl, triton, use_triton


@triton.jit
def _gather_pinned_kernel(
    src_ptr, stride_src_h,                  # pool (Hkv, N*CHUNK_ELEMS) (host or device): elements between heads
    idx_ptr, stride_ih,                     # idx (Hkv, n_sel) source chunk ids (device): between heads
    dst_ptr, stride_dh,                     # dst (Hkv, n_sel) destination slots (read only if HAS_DST)
    seg_ptr, stride_gh, match,              # seg (Hkv, n_sel): an entry moves only where seg == match (HAS_SEG)
    out_ptr, stride_oh,                     # out (Hkv, n_slots*CHUNK_ELEMS) (device): elements between heads
    n_sel,
    CHUNK_ELEMS: tl.constexpr,              # elements (words) per chunk: chunk_tokens * D
    BLOCK_E: tl.constexpr,                  # next power of two >= CHUNK_ELEMS
    CHUNKS_PER_PROG: tl.constexpr, HAS_DST: tl.constexpr, HAS_SEG: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)      # KV head
    offs_c = tl.program_id(1) * CHUNKS_PER_PROG + tl.arange(0, CHUNKS_PER_PROG)   # list positions
    mask_c = offs_c < n_sel
    if HAS_DST:
        dst_chunk = tl.load(dst_ptr + h * stride_dh + offs_c, mask=mask_c, other=-1).to(tl.int64)
        mask_c = mask_c & (dst_chunk >= 0)                                    # dst < 0: entry skipped
    if HAS_SEG:
        mask_c = mask_c & (tl.load(seg_ptr + h * stride_gh + offs_c, mask=mask_c, other=-1) == match)
    src_chunk = tl.load(idx_ptr + h * stride_ih + offs_c, mask=mask_c, other=0).to(tl.int64)
    if not HAS_DST:
        dst_chunk = offs_c.to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    mask = mask_c[:, None] & (offs_e < CHUNK_ELEMS)[None, :]
    x = tl.load(src_ptr + h * stride_src_h + src_chunk[:, None] * CHUNK_ELEMS + offs_e[None, :],
                mask=mask)                                                     # (CHUNKS_PER_PROG, BLOCK_E)
    tl.store(out_ptr + h * stride_oh + dst_chunk[:, None] * CHUNK_ELEMS + offs_e[None, :], x, mask=mask)


_CONFIGS = [triton.Config({"CHUNKS_PER_PROG": c}, num_warps=w)
            for c, w in [(1, 4), (2, 4), (4, 4), (4, 8), (8, 8), (16, 8)]]
_gather_pinned_tuned = triton.autotune(_CONFIGS, key=["CHUNK_ELEMS", "HAS_DST", "HAS_SEG"])(_gather_pinned_kernel)


def gather_pinned_ref(src, idx, out, *, dst=None, chunk_tokens: int = 8, only=None):
    """Torch version: index_select on the host into a pinned staging buffer, then one copy to ``out``
    (a device pool is gathered on the device). With ``dst``, only the entries whose slot is >= 0 move."""
    if only is not None:
        dst = torch.where(only[0] == only[1], dst, -1)
    Hkv, _, D = src.shape
    n_sel = idx.shape[1]
    pool = src.view(Hkv, -1, chunk_tokens * D)                      # (Hkv, N, chunk*D)
    slots = out.view(Hkv, -1, chunk_tokens * D)                     # (Hkv, n_slots, chunk*D)
    if dst is not None:
        where = src.device if src.device.type == "cpu" else out.device
        d, ids = dst.to(where, torch.long), idx.to(where, torch.long)
        keep = d >= 0                                                # dst < 0: entry skipped
        heads = torch.arange(Hkv, device=where)[:, None].expand_as(d)[keep]
        picked = pool[heads, ids[keep]]                              # (kept, chunk*D)
        slots[heads.to(out.device), d[keep].to(out.device)] = picked.to(out.device)
        return out
    if src.device.type == "cpu":
        ids = idx.to("cpu", torch.long)
        staging = torch.empty((Hkv, n_sel, chunk_tokens * D), dtype=src.dtype,
                              pin_memory=out.is_cuda)               # (Hkv, n_sel, chunk*D)
        for h in range(Hkv):
            torch.index_select(pool[h], 0, ids[h], out=staging[h])
        picked = staging.to(out.device, non_blocking=True)
    else:
        picked = pool[torch.arange(Hkv, device=src.device)[:, None], idx.to(src.device, torch.long)]
    slots[:, :n_sel].copy_(picked)
    return out


def _words(t: torch.Tensor, row_elems: int) -> tuple[torch.Tensor, int]:
    """View t as int32 words when its rows allow (fewer, wider elements per chunk), else as it is."""
    if t.element_size() < 4 and (t.shape[-1] * t.element_size()) % 4 == 0:
        try:
            return t.view(torch.int32), row_elems * t.element_size() // 4
        except RuntimeError:                                         # strides / offset not word-aligned
            pass
    return t, row_elems


def gather_pinned(src, idx, out, *, dst=None, chunk_tokens: int = 8, only=None):
    """Copy selected chunks of a (pinned host) pool into a device buffer, read by the GPU directly.

    Args:
        src: (Hkv, N*chunk_tokens, D) pool, pinned CPU memory (or any device memory); tokens of a head
            contiguous (src[h] contiguous).
        idx: (Hkv, n_sel) int32/int64 chunk ids into the pool, on out's device.
        out: (Hkv, n_slots*chunk_tokens, D) destination, same dtype as src, out[h] contiguous.
        dst: optional (Hkv, n_sel) int32/int64 destination slots in ``out`` (default: slot j for list entry j,
            which needs n_slots >= n_sel); slots must be distinct per head. A negative slot skips its entry
            (nothing read, nothing written; its ``idx`` may be out of range).
        chunk_tokens: tokens per chunk.
        only: optional ``(seg, s)``, seg (Hkv, n_sel) integers and s an int, with ``dst``: only the entries
            with ``seg == s`` move (one launch per pool of several, with no mask made for each).

    Returns:
        ``out``.
    """
    check(src.dim() == 3 and out.dim() == 3 and src.shape[0] == out.shape[0] and src.shape[2] == out.shape[2],
          f"src {tuple(src.shape)} / out {tuple(out.shape)}: want (Hkv, N*chunk, D) / (Hkv, n_slots*chunk, D)")
    check(src.dtype == out.dtype, f"src dtype {src.dtype} != out dtype {out.dtype}")
    Hkv, _, D = src.shape
    check(src.shape[1] % chunk_tokens == 0 and out.shape[1] % chunk_tokens == 0, "rows must be whole chunks")
    check(idx.dim() == 2 and idx.shape[0] == Hkv and idx.dtype in (torch.int32, torch.int64),
          f"idx must be (Hkv={Hkv}, n_sel) int32/int64, got {tuple(idx.shape)} {idx.dtype}")
    n_sel = idx.shape[1]
    check(dst is None or dst.shape == idx.shape, "dst must have idx's shape")
    check(only is None or (dst is not None and only[0].shape == idx.shape), "only needs dst, and seg of idx's shape")
    check(dst is not None or out.shape[1] >= n_sel * chunk_tokens, "out has fewer slots than idx entries")
    check(src.stride(2) == 1 and src.stride(1) == D and out.stride(2) == 1 and out.stride(1) == D,
          "src[h] and out[h] must be contiguous")
    if not use_triton(idx, out, dst, host=(src,)):
        return gather_pinned_ref(src, idx, out, dst=dst, chunk_tokens=chunk_tokens, only=only)
    if n_sel == 0:
        return out
    src_w, elems = _words(src, chunk_tokens * D)
    out_w, _ = _words(out, chunk_tokens * D)
    if out_w.dtype != src_w.dtype:                   # one side could not be viewed as words
        src_w, out_w, elems = src, out, chunk_tokens * D
    d = dst if dst is not None else idx
    seg, match = only if only is not None else (idx, 0)
    args = (src_w, src_w.stride(0), idx, idx.stride(0), d, d.stride(0), seg, seg.stride(0), int(match),
            out_w, out_w.stride(0), n_sel)
    meta = dict(CHUNK_ELEMS=elems, BLOCK_E=next_pow2(elems), HAS_DST=dst is not None, HAS_SEG=only is not None)
    KERNEL_CALLS["gather_pinned"] += 1
    if interpreting():
        _gather_pinned_kernel[(Hkv, -(-n_sel // 4))](*args, CHUNKS_PER_PROG=4, **meta)
    else:
        grid = lambda m: (Hkv, triton.cdiv(n_sel, m["CHUNKS_PER_PROG"]))  # noqa: E731
        _gather_pinned_tuned[grid](*args, **meta)
    return out
