"""Slots for a step's selected chunks in the device chunk buffer: hits keep theirs, misses take the least
recently used free ones. One program per KV head does what took about twenty small torch kernels a layer.

Tables of one KV head (a row of each):

- ``chunk_slot[c]``: the slot holding chunk c, or -1;  ``slot_chunk[s]``: the chunk slot s holds, or -1;
- ``slot_age[s]``: the step that last used slot s (0: never);  ``step``: this head's step count.

For the selected chunks ``sel`` (distinct): a chunk with a slot is a *hit* and keeps it. The m misses take the
m least recently used free slots (those no hit holds; ties to the lowest slot), the j-th miss in the order of
``sel`` the j-th of those slots in slot order. A miss's slot forgets its old chunk and holds the new one; every
selected slot is stamped with the new step.

Which m slots is a top-m: the kernel stamps the hits' slots first, then keys every free slot by how long ago
it was used (``now - age``, larger is older; a hit's slot keys as -inf) and takes the m largest keys as
`topk_ids` takes the largest scores, by its search and compaction. A step's free slots hold few distinct ages
(mostly the last two steps'), so the search's bracket starts narrow; it replaced a sort of every slot (11.0 µs
against 5.1 at a 128K step's shape on an H100, `WARPS`). The taken slots go through a small scratch row
(Triton has no gather from registers). Writes one program reads back after another of its threads made them
are ordered by a CTA barrier.
"""

from __future__ import annotations

import torch

from ._common import KERNEL_CALLS, check, next_pow2, tl, triton, use_triton
from .topk_ids import NEG_INF_KEY, _kth_largest, _take_top

WARPS = 4
"""Warps of a program (one KV head). On an H100 at the 128K step's shape (8 heads, 257 chunks into 514 slots,
graphed, one run): 5.1 µs at 4 warps, 5.0 at 8, 5.5 at 16; a sort of every slot took 11.0 in the same run, and
the torch reference 132.5."""


@triton.jit
def _assign_slots_kernel(
    sel_ptr, stride_sel,            # (Hkv, k) int64 selected chunks
    cs_ptr, stride_cs,              # chunk_slot (Hkv, >= n_chunks) int64
    sc_ptr, stride_sc,              # slot_chunk (Hkv, >= S) int64
    age_ptr, stride_age,            # slot_age (Hkv, >= S) int32
    step_ptr,                       # (Hkv,) int32
    order_ptr, stride_order,        # scratch (Hkv, S) int32: the slots the misses take, ascending
    slots_ptr, dst_ptr, stride_out,  # (Hkv, k) int64 outputs
    hits_ptr,                       # int64 counter, added to when COUNT_HITS
    k, S,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, COUNT_HITS: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    sel_ptr += h * stride_sel
    cs_ptr += h * stride_cs
    sc_ptr += h * stride_sc
    age_ptr += h * stride_age
    order_ptr += h * stride_order
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < k
    sel = tl.load(sel_ptr + offs_k, mask=mask_k, other=0)
    slot = tl.load(cs_ptr + sel, mask=mask_k, other=-1)
    hit = mask_k & (slot >= 0)
    miss = mask_k & (slot < 0)
    now = tl.load(step_ptr + h) + 1

    # The hits' slots take the new step; every other slot is free, keyed by how long ago it was used.
    tl.store(age_ptr + slot, now, mask=hit)
    tl.debug_barrier()
    offs_s = tl.arange(0, BLOCK_S)
    age = tl.load(age_ptr + offs_s, mask=offs_s < S, other=0)
    key = tl.where(age < now, now - age, NEG_INF_KEY)
    key = tl.where(offs_s < S, key, -2147483648)
    m = tl.sum(miss.to(tl.int32), 0)
    if m > 0:   # the m oldest free slots, ascending, into the scratch row
        t, above = _kth_largest(age_ptr, age_ptr, key, S, S, m, BLOCK_S, True, False)
        _take_top(age_ptr, age_ptr, key, S, S, t, above, m, order_ptr, BLOCK_S, True, False)
    tl.debug_barrier()

    # The j-th miss takes the j-th of them.
    rank = tl.cumsum(miss.to(tl.int32), 0) - 1
    new = tl.load(order_ptr + rank, mask=miss, other=0).to(tl.int64)
    tl.store(slots_ptr + h * stride_out + offs_k, tl.where(hit, slot, new), mask=mask_k)
    tl.store(dst_ptr + h * stride_out + offs_k, tl.where(miss, new, -1), mask=mask_k)

    # The misses' slots forget their old chunks, then hold the new ones.
    old = tl.load(sc_ptr + new, mask=miss, other=-1)
    tl.store(cs_ptr + old, tl.full((BLOCK_K,), -1, tl.int64), mask=miss & (old >= 0))
    tl.debug_barrier()
    tl.store(cs_ptr + sel, new, mask=miss)
    tl.store(sc_ptr + new, sel, mask=miss)
    tl.store(age_ptr + new, tl.full((BLOCK_K,), 0, tl.int32) + now, mask=miss)
    tl.store(step_ptr + h, now)
    if COUNT_HITS:
        tl.atomic_add(hits_ptr, tl.sum(hit.to(tl.int64), 0))


_TAKEN = 2 ** 31 - 1  # the reference's age of a slot a hit holds: never given to a miss


def assign_slots_ref(sel, chunk_slot, slot_chunk, slot_age, step, n_slots: int, hits=None):
    """Torch version of `assign_slots`. The tables need a spare last column (a target for masked scatters):
    ``chunk_slot (Hkv, n_chunks + 1)``, ``slot_chunk`` and ``slot_age (Hkv, n_slots + 1)``."""
    S, trash_slot, trash_chunk = n_slots, slot_chunk.shape[1] - 1, chunk_slot.shape[1] - 1
    slot = chunk_slot.gather(1, sel)                          # (Hkv, k), -1 where not buffered
    hit = slot >= 0
    miss = ~hit
    age = slot_age.clone()
    age.scatter_(1, torch.where(hit, slot, trash_slot), _TAKEN)
    lru = torch.argsort(age[:, :S], dim=1, stable=True)       # (Hkv, S) free slots, LRU first
    ids = torch.arange(S, device=sel.device).expand(sel.shape[0], S)
    oldest = torch.zeros_like(ids, dtype=torch.bool).scatter_(1, lru, ids < miss.sum(1, keepdim=True))
    taken = torch.where(oldest, ids, S).sort(dim=1).values    # the m oldest free slots, ascending, first
    rank = (torch.cumsum(miss, dim=1) - 1).clamp(min=0)       # each miss's rank among the misses
    new = taken.gather(1, rank)                               # (Hkv, k) the slot a miss takes
    slots = torch.where(hit, slot, new)
    dst = torch.where(miss, new, -1)
    old = slot_chunk.gather(1, new)
    chunk_slot.scatter_(1, torch.where(miss & (old >= 0), old, trash_chunk), -1)
    chunk_slot.scatter_(1, torch.where(miss, sel, trash_chunk), new)
    slot_chunk.scatter_(1, torch.where(miss, new, trash_slot), sel)
    step += 1
    slot_age.scatter_(1, slots, step[:, None].expand_as(slots))
    if hits is not None:
        hits += hit.sum()
    return slots, dst


def assign_slots(sel, chunk_slot, slot_chunk, slot_age, step, n_slots: int, hits=None):
    """Slots for the selected chunks ``sel (Hkv, k)`` int64 (distinct per head), updating the tables in place.

    Args:
        chunk_slot: (Hkv, n_chunks + 1) int64, the slot of each chunk or -1 (last column: spare).
        slot_chunk: (Hkv, n_slots + 1) int64, the chunk of each slot or -1 (last column: spare).
        slot_age: (Hkv, n_slots + 1) int32, the step that last used each slot.
        step: (Hkv,) int32, each head's step count, advanced by one.
        n_slots: slots per head, at least k.
        hits: optional int64 counter (one element), added the number of hits.

    Returns:
        slots (Hkv, k) int64: where each selected chunk is (or will be once fetched);
        dst (Hkv, k) int64: the slot to fetch into, -1 for hits (the `gather_pages` skip mask).
    """
    Hkv, k = sel.shape
    check(sel.dtype == torch.long and chunk_slot.dtype == torch.long and slot_chunk.dtype == torch.long
          and slot_age.dtype == torch.int32 and step.dtype == torch.int32, "dtypes: int64 tables, int32 ages/step")
    check(k <= n_slots < slot_chunk.shape[1] == slot_age.shape[1] and step.shape == (Hkv,),
          f"k={k} chunks for {n_slots} slots: tables (Hkv, n_slots + 1), step (Hkv,)")
    if not use_triton(sel, chunk_slot, slot_chunk, slot_age, step):
        return assign_slots_ref(sel, chunk_slot, slot_chunk, slot_age, step, n_slots, hits)
    slots = torch.empty_like(sel)
    dst = torch.empty_like(sel)
    if Hkv == 0 or k == 0:
        return slots, dst
    check(sel.stride(1) == 1 and all(t.stride(1) == 1 for t in (chunk_slot, slot_chunk, slot_age)),
          "last dims must be contiguous")
    order = torch.empty((Hkv, n_slots), dtype=torch.int32, device=sel.device)
    BLOCK_S = next_pow2(n_slots)
    KERNEL_CALLS["assign_slots"] += 1
    _assign_slots_kernel[(Hkv,)](
        sel, sel.stride(0), chunk_slot, chunk_slot.stride(0), slot_chunk, slot_chunk.stride(0),
        slot_age, slot_age.stride(0), step, order, order.stride(0), slots, dst, slots.stride(0),
        hits if hits is not None else step, k, n_slots,
        BLOCK_K=next_pow2(k), BLOCK_S=BLOCK_S, COUNT_HITS=hits is not None,
        num_warps=WARPS)
    return slots, dst
